"""Gaussian diffusion: noise schedules, q_sample, the training loss, DDPM and DDIM sampling.

A plain object that takes the network as an argument and owns none (openai/improved-diffusion
``gaussian_diffusion.py``); the schedule tensors are buffers of an ``nn.Module`` so they move
with ``.to(device)`` (lucidrains/denoising-diffusion-pytorch). Sources:

* Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): forward process
  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (eq. 4); the posterior
  q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) with mu~_t = c0_t x_0 + ct_t x_t (eq. 6-7);
  epsilon-prediction with the simple MSE loss (eq. 14); ancestral sampling (Algorithm 2) with
  sigma_t^2 = beta~_t; the ``linear`` schedule beta_t from 1e-4 to 0.02 (sec. 4).
* Nichol & Dhariwal 2021, "Improved DDPM": the ``cosine`` schedule (eq. 17), s = 0.008,
  beta_t clipped at 0.999.
* Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): the update of eq. 12
  on a sub-sequence of S timesteps, deterministic when eta = 0.
* Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": one network trained with label
  dropout gives eps(z, c) and eps(z); sampling uses (1 + w) eps(z, c) - w eps(z) (eq. 6).

Named schedules never change once committed: a trained checkpoint stores the name and T.
Timesteps are integers in [0, T); index t here is DDPM's t+1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["SCHEDULES", "make_betas", "GaussianDiffusion", "ddim_timesteps", "guidance_combine", "classifier_free_guidance"]

SCHEDULES = ("linear", "cosine")


def make_betas(name: str, timesteps: int) -> np.ndarray:
    """The beta_t of a named schedule as float64 (T,).

    Args:
        name: "linear" (Ho et al. 2020 sec. 4: linspace(1e-4, 0.02, T), scaled by 1000/T so
            that other T keep the same total noise, as improved-diffusion does; exact for
            T=1000; clipped at 0.999 for very small T) or "cosine" (Nichol & Dhariwal 2021 eq. 17 with s=0.008, beta <= 0.999).
        timesteps: T >= 2.

    Raises:
        ValueError: unknown name (the valid names are listed) or T < 2.
    """
    if timesteps < 2:
        raise ValueError(f"timesteps must be >= 2, got {timesteps}")
    if name == "linear":
        scale = 1000.0 / timesteps
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64), 0.999)
    if name == "cosine":
        s = 0.008

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999) for i in range(timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {list(SCHEDULES)}")


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """S evenly spaced timesteps from T-1 down to 0 (the "trailing" spacing), descending.

    Raises:
        ValueError: if not 1 <= steps <= timesteps.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}], got {steps}")
    ts = np.round(np.linspace(timesteps - 1, 0, steps)).astype(np.int64)
    return sorted(set(int(t) for t in ts), reverse=True)


def _extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return a.gather(0, t.long()).float().view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """The DDPM forward process and its samplers for epsilon-prediction networks.

    Args:
        schedule: "linear" or "cosine" (see :func:`make_betas`).
        timesteps: T (1000 in DDPM).

    Buffers (float32, (T,)): betas, alphas_cumprod (abar_t), alphas_cumprod_prev,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_variance (beta~_t),
    posterior_log_variance_clipped, posterior_mean_coef1 (c0_t), posterior_mean_coef2 (ct_t).
    All are computed in float64 and stored in float32.
    """

    def __init__(self, schedule: str = "linear", timesteps: int = 1000):
        super().__init__()
        self.schedule = schedule
        self.num_timesteps = timesteps
        betas = make_betas(schedule, timesteps)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        buffers = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            # beta~_0 = 0: use beta~_1 in the log, as DDPM's code does
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    # forward process -------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4).

        Args:
            x_start: x_0, float (B, ...).
            t: int64 (B,) in [0, T).
            noise: eps, same shape as x_start.
        """
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        nd = x_t.dim()
        mean = _extract(self.posterior_mean_coef1, t, nd) * x_start + _extract(self.posterior_mean_coef2, t, nd) * x_t
        return mean, _extract(self.posterior_variance, t, nd), _extract(self.posterior_log_variance_clipped, t, nd)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (inverse of eq. 4)."""
        nd = x_t.dim()
        return _extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps

    # training ---------------------------------------------------------------------------
    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-example simple loss ||eps - eps_theta(x_t, t)||^2, averaged over non-batch dims
        (DDPM eq. 14). ``labels`` int (B,), if given, is passed as ``model(x_t, t, labels)``
        (class-conditional training). Returns float (B,)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        eps = model(x_t, t) if labels is None else model(x_t, t, labels)
        return (eps.float() - noise).pow(2).flatten(1).mean(1)

    # sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        generator: Optional[torch.Generator] = None,
        device: torch.device | str = "cpu",
        progress: Optional[Callable[[int], None]] = None,
        clip: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling over all T steps (Algorithm 2), sigma_t^2 = beta~_t.

        Args:
            model: eps_theta(x_t, t).
            shape: (B, C, H, W) of the samples.
            generator: torch.Generator for x_T and every step's noise (same seed, same samples).
            progress: called with the number of steps done.
            clip: (low, high) tensors broadcastable to ``shape``: the predicted x_0 is clipped to
                this range before the posterior mean is formed (DDPM's ``clip_denoised``, which
                clips images to [-1, 1]; for latents, the data's per-channel range).

        Returns:
            float32 x_0 of ``shape``.
        """
        x = torch.randn(shape, generator=generator, device=device)
        for i, step in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = model(x, t).float()
            x0 = self.predict_start_from_noise(x, t, eps)
            if clip is not None:
                x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
            mean, _, log_var = self.q_posterior_mean_variance(x0, x, t)
            if step > 0:
                noise = torch.randn(shape, generator=generator, device=device)
                x = mean + torch.exp(0.5 * log_var) * noise
            else:
                x = mean
            if progress is not None:
                progress(i + 1)
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        steps: int = 50,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str = "cpu",
        progress: Optional[Callable[[int], None]] = None,
        clip: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021 eq. 12) over S = ``steps`` timesteps.

        x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
        eta = 0 is deterministic given x_T. The last step goes to abar = 1 (x_0 = x0_hat).
        With ``clip`` (see :meth:`p_sample_loop`) x0_hat is clipped and eps re-derived from it,
        as improved-diffusion's ``ddim_sample`` does.
        """
        ts = ddim_timesteps(self.num_timesteps, steps)
        x = torch.randn(shape, generator=generator, device=device)
        abar = self.alphas_cumprod
        for i, step in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = model(x, t).float()
            x0 = self.predict_start_from_noise(x, t, eps)
            a_t = abar[step]
            if clip is not None:
                x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
                eps = (x - torch.sqrt(a_t) * x0) / torch.sqrt(1 - a_t)
            a_prev = abar[prev] if prev >= 0 else torch.ones((), device=abar.device)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
            x = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0.0)) * eps
            if eta > 0 and prev >= 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
            if progress is not None:
                progress(i + 1)
        return x


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond): classifier-free guidance of two predictions.

    Convention (diffusers' ``guidance_scale`` s): s = 0 is the unconditional prediction, s = 1
    the conditional one (no guidance), s > 1 guides. Ho & Salimans 2022 (eq. 6) write
    (1 + w) eps(z, c) - w eps(z), i.e. w = s - 1. Works on any same-shape float tensors (noise
    predictions, or PixelCNN logits).
    """
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(
    model: Callable[..., torch.Tensor], labels: torch.Tensor, scale: float, null_label: int, batched: Optional[bool] = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A guided eps(x_t, t) for the samplers (Ho & Salimans 2022, sec. 3.2 and eq. 6).

    Args:
        model: conditional network ``model(x, t, labels)``; label ``null_label`` is "no label".
        labels: int (B,) requested classes.
        scale: guidance scale s >= 0 (see :func:`guidance_combine`).
        null_label: the null label index (the networks' ``num_classes``).
        batched: run the conditional and the unconditional pass as one batch of 2B. Default:
            only when both are needed (s != 1); s = 1 is one conditional pass.

    Returns:
        ``eps(x, t)`` -> float (B, ...) guided prediction.

    Raises:
        ValueError: scale < 0.
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if batched is None:
        batched = scale != 1.0
    null = torch.full_like(labels, null_label)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not batched:
            return model(x, t, labels)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
        cond, uncond = out.chunk(2)
        return guidance_combine(cond, uncond, scale)

    return eps
