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
* Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models": the
  ``v`` parametrisation v = alpha_t eps - sigma_t x_0 (sec. 4, eq. 9 and appendix D), with
  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); x_0 = alpha_t x_t - sigma_t v and
  eps = sigma_t x_t + alpha_t v.
* Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": the loss of
  timestep t weighted by min(SNR_t, gamma) / SNR_t for epsilon-, min(SNR_t, gamma) / (SNR_t + 1)
  for v- and min(SNR_t, gamma) for x_0-prediction (sec. 3.4; SNR_t = abar_t / (1 - abar_t)), as
  diffusers' ``train_text_to_image.py`` does.
* Liu, Gong & Liu 2022, "Flow Straight and Fast" (rectified flow) and Lipman et al. 2022, "Flow
  Matching for Generative Modeling"; Esser et al. 2024 (Stable Diffusion 3), sec. 3.1 and 5.3.2:
  ``prediction: flow`` trains on the straight path x_sigma = (1 - sigma) x_0 + sigma eps,
  sigma in (0, 1), with the velocity target v = eps - x_0 (dx_sigma / dsigma), sigma drawn
  logit-normal (sigmoid of N(0, 1), SD3's ``lognorm(0, 1)``) or uniform. The network sees
  timestep sigma T (diffusers' convention). Sampled by diffusers' ``FlowMatchEulerDiscreteScheduler``
  / ``FlowMatchHeunDiscreteScheduler`` (:func:`flow_sample_loop`), or by every VP sampler here
  through the point of equal signal-to-noise ratio (:meth:`GaussianDiffusion.vp_epsilon_network`:
  x_vp = (alpha + s) x_sigma at sigma = s / (alpha + s)).
* Lu et al. 2022, "DPM-Solver++" and Karras et al. 2022, "Elucidating the Design Space" (EDM):
  these samplers are not re-implemented here; :func:`scheduler_sample_loop` drives diffusers'
  tested schedulers (``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``,
  ``HeunDiscreteScheduler``, ...) with our schedule's betas.

Named schedules never change once committed: a trained checkpoint stores the name and T.
Timesteps are integers in [0, T); index t here is DDPM's t+1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SCHEDULES",
    "PREDICTIONS",
    "LOSS_WEIGHTINGS",
    "FLOW_TIMES",
    "SCHEDULER_SAMPLERS",
    "FLOW_SAMPLERS",
    "flow_sample_loop",
    "make_betas",
    "GaussianDiffusion",
    "ddim_timesteps",
    "guidance_combine",
    "autoguidance",
    "classifier_free_guidance",
    "scheduler_sample_loop",
    "images_to_pixel_space",
    "pixel_size",
    "pixel_space_to_images",
]

SCHEDULES = ("linear", "cosine")
#: What the network predicts: the noise (DDPM), v (Salimans & Ho 2022) or x_0 itself.
PREDICTIONS = ("epsilon", "v", "x0", "flow")
#: How ``prediction: flow`` draws sigma in training: logit-normal (Esser et al. 2024 eq. 19, m = 0,
#: s = 1) or uniform on (0, 1) (Liu et al. 2022).
FLOW_TIMES = ("logit_normal", "uniform")
#: Per-timestep loss weights: none (DDPM's simple loss in the prediction's own units) or min-SNR-gamma.
LOSS_WEIGHTINGS = ("none", "min_snr")


def make_betas(name: str, timesteps: int) -> np.ndarray:
    """The beta_t of a named schedule as float64 (T,).

    Args:
        name: "linear" (Ho et al. 2020 sec. 4: linspace(1e-4, 0.02, T), scaled by 1000/T so
            that other T keep the same total noise, as improved-diffusion does; exact for
            T=1000; clipped at 0.999 for very small T) or "cosine" (Nichol & Dhariwal 2021
            eq. 17 with s=0.008, beta <= 0.999).
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
    """The DDPM forward process, its training objective and its DDPM/DDIM samplers.

    Args:
        schedule: "linear" or "cosine" (see :func:`make_betas`).
        timesteps: T (1000 in DDPM).
        prediction: what the network outputs (:data:`PREDICTIONS`): "epsilon" (the noise, DDPM
            eq. 14), "v" (v = alpha_t eps - sigma_t x_0, Salimans & Ho 2022 eq. 9), "x0", or
            "flow" (rectified flow: the velocity eps - x_0 on the straight path; module
            docstring). With "flow" timesteps are real, t = sigma T in (0, T), and the schedule
            only serves the VP samplers (:meth:`vp_epsilon_network`).
        loss_weighting: "none" (the plain MSE of the prediction) or "min_snr" (Hang et al. 2023).
        min_snr_gamma: gamma of min-SNR weighting (5 in the paper).
        flow_time: how "flow" draws sigma (:data:`FLOW_TIMES`).

    Buffers (float32, (T,)): betas, alphas_cumprod (abar_t), alphas_cumprod_prev,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_variance (beta~_t),
    posterior_log_variance_clipped, posterior_mean_coef1 (c0_t), posterior_mean_coef2 (ct_t),
    snr (abar_t / (1 - abar_t)). All are computed in float64 and stored in float32.

    Raises:
        ValueError: unknown schedule, prediction, loss weighting or flow time (the valid names
            are listed), T < 2, or gamma <= 0.
    """

    def __init__(
        self,
        schedule: str = "linear",
        timesteps: int = 1000,
        prediction: str = "epsilon",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        flow_time: str = "logit_normal",
    ):
        super().__init__()
        if flow_time not in FLOW_TIMES:
            raise ValueError(f"unknown flow time sampling {flow_time!r}; expected one of {list(FLOW_TIMES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {loss_weighting!r}; expected one of {list(LOSS_WEIGHTINGS)}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.schedule = schedule
        self.num_timesteps = timesteps
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.flow_time = flow_time
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
            "snr": abar / (1.0 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)
        self._betas64 = betas

    def config(self) -> dict:
        """The constructor arguments, as stored in a checkpoint (``diffusion`` entry)."""
        return {
            "schedule": self.schedule,
            "timesteps": self.num_timesteps,
            "prediction": self.prediction,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
            "flow_time": self.flow_time,
        }

    @property
    def is_flow(self) -> bool:
        """Whether this is rectified flow (``prediction: flow``) rather than VP diffusion."""
        return self.prediction == "flow"

    def sample_timesteps(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps of a batch: int64 (n,) uniform on {0..T-1} (DDPM), or for flow
        float32 (n,) t = sigma T, sigma logit-normal or uniform (:data:`FLOW_TIMES`), clamped to
        [1e-5, 1 - 1e-5]."""
        if not self.is_flow:
            return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        if self.flow_time == "uniform":
            u = torch.rand((n,), device=device, generator=generator)
        else:
            u = torch.sigmoid(torch.randn((n,), device=device, generator=generator))
        return u.clamp(1e-5, 1 - 1e-5) * self.num_timesteps

    def _sigma(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Flow's sigma = t / T as float (B, 1, ...) broadcastable to ``ndim`` dims."""
        return (t.float() / self.num_timesteps).view(-1, *([1] * (ndim - 1)))

    # forward process -------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4).

        Args:
            x_start: x_0, float (B, ...).
            t: int64 (B,) in [0, T).
            noise: eps, same shape as x_start.

        For flow: x_sigma = (1 - sigma) x_0 + sigma eps with sigma = t / T (t float).
        """
        if self.is_flow:
            sigma = self._sigma(t, x_start.dim())
            return (1 - sigma) * x_start + sigma * noise
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
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps
        )

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) (eq. 4 solved for eps)."""
        nd = x_t.dim()
        return (x_t - _extract(self.sqrt_alphas_cumprod, t, nd) * x_start) / _extract(
            self.sqrt_one_minus_alphas_cumprod, t, nd
        )

    # parametrisations -------------------------------------------------------------------
    def target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_0, eps, t): eps, v = alpha_t eps - sigma_t x_0
        (Salimans & Ho 2022 eq. 9), x_0, or the flow velocity eps - x_0, by ``prediction``.
        Float, the shape of ``x_start``."""
        if self.prediction == "epsilon":
            return noise
        if self.is_flow:
            return noise - x_start
        if self.prediction == "x0":
            return x_start
        nd = x_start.dim()
        return (
            _extract(self.sqrt_alphas_cumprod, t, nd) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, nd) * x_start
        )

    def split_output(
        self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from a network output in the ``prediction`` parametrisation.

        For v: x_0 = alpha_t x_t - sigma_t v and eps = sigma_t x_t + alpha_t v (Salimans & Ho 2022,
        appendix D); for x_0: eps from eq. 4; for flow (v = eps - x_0 at sigma = t / T):
        x_0 = x_t - sigma v and eps = x_t + (1 - sigma) v. ``t`` is int64 (B,) in [0, T) (float
        for flow).
        """
        output = output.float()
        if self.is_flow:
            sigma = self._sigma(t, x_t.dim())
            return x_t - sigma * output, x_t + (1 - sigma) * output
        if self.prediction == "epsilon":
            return self.predict_start_from_noise(x_t, t, output), output
        if self.prediction == "x0":
            return output, self.predict_noise_from_start(x_t, t, output)
        nd = x_t.dim()
        a, s = _extract(self.sqrt_alphas_cumprod, t, nd), _extract(self.sqrt_one_minus_alphas_cumprod, t, nd)
        return a * x_t - s * output, s * x_t + a * output

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-example weights float (B,) of timesteps int64 (B,) in [0, T).

        ``none``: 1. ``min_snr`` (Hang et al. 2023 sec. 3.4): min(SNR_t, gamma) divided by SNR_t
        (epsilon), by SNR_t + 1 (v) or by 1 (x0): the same weight on the implied x_0 error,
        min(SNR_t, gamma), whatever the network predicts. For flow, SNR = ((1 - sigma) / sigma)^2
        and the x_0 error is sigma times the velocity error: weight sigma^2 min(SNR, gamma).
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        if self.is_flow:
            sigma = t.float() / self.num_timesteps
            return sigma**2 * torch.clamp(((1 - sigma) / sigma) ** 2, max=self.min_snr_gamma)
        snr = self.snr.gather(0, t.long())
        w = torch.clamp(snr, max=self.min_snr_gamma)
        if self.prediction == "epsilon":
            return w / snr
        if self.prediction == "v":
            return w / (snr + 1.0)
        return w

    # training ---------------------------------------------------------------------------
    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example loss w_t ||target - f_theta(x_t, t)||^2, averaged over non-batch dims: with
        epsilon-prediction and no weighting, DDPM's simple loss (eq. 14). ``labels`` int (B,), if
        given, is passed as ``model(x_t, t, labels)`` (class-conditional training). Returns float (B,)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t) if labels is None else model(x_t, t, labels)
        mse = (out.float() - self.target(x_start, noise, t)).pow(2).flatten(1).mean(1)
        return mse * self.loss_weights(t) if self.loss_weighting != "none" else mse

    def eps_mse(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unweighted ||eps - eps_hat||^2 per example, float (B,), whatever the parametrisation: the
        one test loss that compares models trained with different objectives."""
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t) if labels is None else model(x_t, t, labels)
        _, eps = self.split_output(x_t, t, out)
        return (eps - noise).pow(2).flatten(1).mean(1)

    def _denoise(self, model, x: torch.Tensor, t: torch.Tensor, clip) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = self.split_output(x, t, model(x, t))
        if clip is not None:
            x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
            eps = self.predict_noise_from_start(x, t, x0)
        return x0, eps

    def epsilon_predictor(
        self, model: Callable[..., torch.Tensor], clip: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The network as an epsilon-predictor at real-valued timesteps, for diffusers' schedulers.

        Returns ``eps(x_t, t)``: x_t float (B, ...) in the VP parametrisation (what a scheduler's
        ``scale_model_input`` hands back), t a scalar or (B,) tensor of timesteps in [0, T - 1]
        (Euler/Heun use fractional ones: abar_t is then interpolated linearly in log-SNR between
        the integer steps). The network's output is turned into (x0_hat, eps_hat); with ``clip``
        x0_hat is clipped to [low, high] and eps re-derived from it (as :meth:`ddim_sample_loop`).
        A flow network is seen through :meth:`vp_epsilon_network`.
        """
        if self.is_flow:
            return self.as_vp().epsilon_predictor(self.vp_epsilon_network(model), clip)
        log_snr = torch.log(self.snr.double())

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
            lo = tt.floor().long().clamp(0, self.num_timesteps - 1)
            hi = (lo + 1).clamp(max=self.num_timesteps - 1)
            frac = (tt - lo.float()).double()
            ls = log_snr.to(x.device)
            lam = ls[lo] * (1 - frac) + ls[hi] * frac
            abar = torch.sigmoid(lam).float().view(-1, *([1] * (x.dim() - 1)))
            a, s = abar.sqrt(), (1 - abar).sqrt()
            out = model(x, tt).float()
            if self.prediction == "epsilon":
                x0, e = (x - s * out) / a, out
            elif self.prediction == "x0":
                x0, e = out, (x - a * out) / s
            else:
                x0, e = a * x - s * out, s * x + a * out
            if clip is not None:
                x0 = torch.maximum(torch.minimum(x0, clip[1]), clip[0])
                e = (x - a * x0) / s
            return e

        return eps

    def as_vp(self) -> GaussianDiffusion:
        """The epsilon-prediction VP diffusion of this schedule (on this object's device): what the
        VP samplers run with a flow network seen through :meth:`vp_epsilon_network`."""
        return GaussianDiffusion(self.schedule, self.num_timesteps, "epsilon").to(self.betas.device)

    def vp_epsilon_network(
        self, model: Callable[..., torch.Tensor]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A flow network as an epsilon-network of this object's VP schedule, so that every VP
        sampler (DDPM, DDIM, diffusers' DPM-Solver++ ...) can draw from it.

        At VP timestep t (alpha = sqrt(abar_t), s = sqrt(1 - abar_t); real t interpolated in
        log-SNR as :meth:`epsilon_predictor`), x_vp = alpha x_0 + s eps is (alpha + s) times the
        flow point of equal SNR, sigma = s / (alpha + s); the flow network's v there gives
        eps = x + (1 - sigma) v (x = x_vp / (alpha + s)).

        Returns:
            ``eps(x_vp, t)`` -> float (B, ...); use it with an epsilon-prediction
            ``GaussianDiffusion`` of the same schedule.

        Raises:
            ValueError: this object is not a flow (``prediction != "flow"``).
        """
        if not self.is_flow:
            raise ValueError(f"vp_epsilon_network needs prediction 'flow', this diffusion predicts {self.prediction!r}")
        log_snr = torch.log(self.snr.double())
        T = self.num_timesteps

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
            lo = tt.floor().long().clamp(0, T - 1)
            hi = (lo + 1).clamp(max=T - 1)
            frac = (tt - lo.float()).double()
            ls = log_snr.to(x.device)
            abar = torch.sigmoid(ls[lo] * (1 - frac) + ls[hi] * frac).float()
            a, s = abar.sqrt(), (1 - abar).sqrt()
            sigma = s / (a + s)
            shape = (-1, *([1] * (x.dim() - 1)))
            xf = x / (a + s).view(shape)
            v = model(xf, sigma * T).float()
            return xf + (1 - sigma).view(shape) * v

        return eps

    # sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
        clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling over all T steps (Algorithm 2), sigma_t^2 = beta~_t.

        Args:
            model: the network f_theta(x_t, t) in this object's ``prediction`` parametrisation.
            shape: (B, C, H, W) of the samples.
            generator: torch.Generator for x_T and every step's noise (same seed, same samples).
            progress: called with the number of steps done.
            clip: (low, high) tensors broadcastable to ``shape``: the predicted x_0 is clipped to
                this range before the posterior mean is formed (DDPM's ``clip_denoised``, which
                clips images to [-1, 1]; for latents, the data's per-channel range).

        Returns:
            float32 x_0 of ``shape``.

        A flow model is sampled through :meth:`as_vp` and :meth:`vp_epsilon_network`.
        """
        if self.is_flow:
            return self.as_vp().p_sample_loop(self.vp_epsilon_network(model), shape, generator, device, progress, clip)
        x = torch.randn(shape, generator=generator, device=device)
        for i, step in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0, _ = self._denoise(model, x, t, clip)
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
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
        clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021 eq. 12) over S = ``steps`` timesteps.

        x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
        eta = 0 is deterministic given x_T. The last step goes to abar = 1 (x_0 = x0_hat).
        With ``clip`` (see :meth:`p_sample_loop`) x0_hat is clipped and eps re-derived from it,
        as improved-diffusion's ``ddim_sample`` does. A flow model is sampled through
        :meth:`as_vp` and :meth:`vp_epsilon_network`.
        """
        if self.is_flow:
            vp, net = self.as_vp(), self.vp_epsilon_network(model)
            return vp.ddim_sample_loop(net, shape, steps, eta, generator, device, progress, clip)
        ts = ddim_timesteps(self.num_timesteps, steps)
        x = torch.randn(shape, generator=generator, device=device)
        abar = self.alphas_cumprod
        for i, step in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0, eps = self._denoise(model, x, t, clip)
            a_t = abar[step]
            a_prev = abar[prev] if prev >= 0 else torch.ones((), device=abar.device)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
            x = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0.0)) * eps
            if eta > 0 and prev >= 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=device)
            if progress is not None:
                progress(i + 1)
        return x

    def diffusers_scheduler(self, sampler: str):
        """A diffusers scheduler of this schedule's betas (``trained_betas``), epsilon-prediction,
        for the sampler ``sampler`` of :data:`SCHEDULER_SAMPLERS`.

        Raises:
            ValueError: unknown sampler name (the valid ones are listed).
        """
        if sampler not in SCHEDULER_SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SCHEDULER_SAMPLERS)}")
        import diffusers

        cls_name, kwargs = SCHEDULER_SAMPLERS[sampler]
        cls = getattr(diffusers, cls_name)
        return cls(
            num_train_timesteps=self.num_timesteps,
            trained_betas=self._betas64.tolist(),
            prediction_type="epsilon",
            **kwargs,
        )


#: Samplers run through diffusers' schedulers: name -> (scheduler class, keyword arguments).
#: ``dpmpp``: DPM-Solver++(2M) (Lu et al. 2022, multistep, second order, data prediction);
#: ``dpmsde``: its SDE variant (stochastic, same order); ``euler``: Karras et al. 2022 Algorithm
#: 2's Euler steps (first order, deterministic); ``heun``: the same with Heun's second-order
#: correction (2 network calls per step); ``eulera``: ancestral Euler (stochastic). All use
#: "trailing" timestep spacing (the first step at t = T - 1, as our DDIM does).
SCHEDULER_SAMPLERS: dict[str, tuple[str, dict]] = {
    "dpmpp": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    ),
    "dpmsde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"},
    ),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "eulera": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


#: Flow-matching samplers (diffusers): name -> scheduler class. ``euler``: Euler steps of the
#: flow ODE dx/dsigma = v (Esser et al. 2024's sampler); ``heun``: Heun's second order (2
#: network calls per step). Both step sigma from 1 to 0 uniformly (``shift`` 1).
FLOW_SAMPLERS: dict[str, str] = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}


@torch.no_grad()
def flow_sample_loop(
    diffusion: GaussianDiffusion,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    sampler: str = "euler",
    steps: int = 30,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample a flow model (``prediction: flow``) with a diffusers flow-matching scheduler
    (:data:`FLOW_SAMPLERS`): x_1 ~ N(0, I), then ``steps`` steps of the scheduler from sigma = 1
    to 0, the network called at timestep sigma T. With ``clip`` the implied x_0 = x - sigma v is
    clipped to [low, high] and v re-derived from it.

    Args:
        model: the flow network f(x_sigma, sigma T) -> v, float (B, ...).
        shape: (B, C, *S); steps: scheduler steps (Heun calls the network twice per step).

    Returns:
        float32 samples of ``shape``.

    Raises:
        ValueError: not a flow model, an unknown sampler, or steps < 1.
    """
    if not diffusion.is_flow:
        raise ValueError(f"flow samplers need prediction 'flow'; this model predicts {diffusion.prediction!r}")
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; expected one of {sorted(FLOW_SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    import diffusers

    T = diffusion.num_timesteps
    scheduler = getattr(diffusers, FLOW_SAMPLERS[sampler])(num_train_timesteps=T, shift=1.0)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device)
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.as_tensor(t, device=device).float().reshape(1).expand(shape[0])
        v = model(x, tt).float()
        if clip is not None:
            sigma = (tt / T).clamp(min=1e-6).view(-1, *([1] * (x.dim() - 1)))
            x0 = torch.maximum(torch.minimum(x - sigma * v, clip[1]), clip[0])
            v = (x - x0) / sigma
        x = scheduler.step(v, t, x).prev_sample
        if progress is not None:
            progress(i + 1)
    return x.float()


@torch.no_grad()
def scheduler_sample_loop(
    diffusion: GaussianDiffusion,
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    sampler: str = "dpmpp",
    steps: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample with one of diffusers' schedulers (:data:`SCHEDULER_SAMPLERS`) in ``steps`` steps.

    The standard diffusers loop (``set_timesteps``; x_T ~ N(0, init_noise_sigma^2 I); per step
    ``scale_model_input``, the network, ``step``) with the network wrapped by
    :meth:`GaussianDiffusion.epsilon_predictor` (any parametrisation, optional x0 clipping). The
    scheduler is built from this schedule's betas, so its alphas_cumprod equal ours.

    Args:
        model: the network f(x_t, t) in ``diffusion.prediction``'s parametrisation.
        shape: (B, C, H, W); steps: number of scheduler steps (Heun calls the network twice per step).
        generator: RNG of x_T and of the stochastic samplers' noise.

    Returns:
        float32 samples of ``shape``.

    Raises:
        ValueError: unknown sampler or steps < 1.
    """
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    scheduler = diffusion.diffusers_scheduler(sampler)
    scheduler.set_timesteps(steps, device=device)
    eps = diffusion.epsilon_predictor(model, clip)
    x = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        out = eps(inp, t)
        kwargs = {"generator": generator} if "generator" in _step_params(scheduler) else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        if progress is not None:
            progress(i + 1)
    return x.float()


def _step_params(scheduler) -> set:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond): classifier-free guidance of two predictions.

    Convention (diffusers' ``guidance_scale`` s): s = 0 is the unconditional prediction, s = 1
    the conditional one (no guidance), s > 1 guides. Ho & Salimans 2022 (eq. 6) write
    (1 + w) eps(z, c) - w eps(z), i.e. w = s - 1. Works on any same-shape float tensors (noise
    predictions, or PixelCNN logits).
    """
    return uncond + scale * (cond - uncond)


def autoguidance(
    model: Callable[..., torch.Tensor], guide: Callable[..., torch.Tensor], weight: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself",
    eq. 2): D_w(x; t) = D_guide(x; t) + w (D(x; t) - D_guide(x; t)), w >= 1 pushing samples away
    from where the guide, a weaker version of the same model (here: its snapshot after a fraction
    of the training), errs. Applied to the network outputs: every parametrisation (epsilon, v,
    x0) is affine in the output at fixed (x_t, t), so this equals guiding the denoised x0.

    Args:
        model, guide: networks ``f(x_t, t)`` of the same parametrisation.
        weight: w (1 = the model alone, 0 = the guide alone).

    Returns:
        ``f(x_t, t)`` -> float (B, ...) guided output.

    Raises:
        ValueError: weight < 0.
    """
    if weight < 0:
        raise ValueError(f"autoguidance weight must be >= 0, got {weight}")

    def out(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guidance_combine(model(x, t).float(), guide(x, t).float(), weight)

    return out


def classifier_free_guidance(
    model: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    scale: float,
    null_label: int,
    batched: bool | None = None,
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


# --- the pixel-space baseline's data map -------------------------------------------------------
def pixel_size(hw) -> tuple[int, int]:
    """The padded size of pixel-space diffusion: each side to the next power of two (28 -> 32)."""
    return tuple(1 << (int(v) - 1).bit_length() for v in hw)


def images_to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> float (N, C, H', W') in [-1, 1], H' and W' the next powers
    of two (28x28 -> 32x32), padded symmetrically with -1 (black), the input range of pixel-space
    DDPM (Ho et al. 2020 sec. 4)."""
    (ph, pw), (h, w) = pixel_size(x.shape[-2:]), x.shape[-2:]
    top, left = (ph - h) // 2, (pw - w) // 2
    return F.pad(x * 2 - 1, (left, pw - w - left, top, ph - h - top), value=-1.0)


def pixel_space_to_images(x: torch.Tensor, hw=(28, 28)) -> torch.Tensor:
    """Inverse of :func:`images_to_pixel_space` for images of size ``hw``: crop the centre
    H x W and map [-1, 1] to [0, 1] (clamped)."""
    h, w = (int(v) for v in hw)
    ph, pw = x.shape[-2:]
    top, left = (ph - h) // 2, (pw - w) // 2
    return ((x[..., top : top + h, left : left + w] + 1) / 2).clamp(0, 1)
