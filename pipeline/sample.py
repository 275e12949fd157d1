"""Stage 6: draw a *sample set* from the PixelCNN prior, the latent diffusion model or the
pixel-space diffusion baseline.

A sample set is named by what it draws (:func:`parse_sample_set`, the grammar is
:data:`SAMPLE_SET_PATTERN`)::

    pixelcnn[_greedy | _t<tau>][_g<s>]
    diffusion_ddpm[_raw][_g<s>]      diffusion_ddim[_s<S>][_raw][_g<s>]
    pixeldiff_ddpm[_raw]             pixeldiff_ddim[_s<S>][_raw]

* ``pixelcnn``: ancestral sampling in raster order through the **categorical sampling
  layer**: code c_ij ~ Categorical(softmax(logits_ij / tau)) (the step that makes a PixelCNN a
  generative model; van den Oord et al. 2016); ``_t<tau>`` sets tau (default
  ``sample.temperature``). ``_greedy`` takes argmax instead and, being deterministic, gives the
  same grid for every seed: the collapse the seed study saw.
* ``diffusion_ddpm``: DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).
* ``diffusion_ddim``: DDIM with S steps (Song et al. 2021, eq. 12; eta = ``sample.ddim_eta``);
  ``_s<S>`` sets S (default ``sample.ddim_steps``).
* ``_raw``: the raw instead of the EMA weights. ``pixeldiff_*``: the pixel-space baseline.
* ``_g<s>``: class-conditional, requested label i % 10 for sample i, with classifier-free
  guidance scale s (diffusers' convention: s = 1 is the conditional model, no guidance; Ho &
  Salimans' w = s - 1); PixelCNN logits are guided the same way. Without ``_g`` a conditional
  model is sampled with the null label, i.e. unconditionally.

Latent diffusion samples are unscaled (x * std + mean), snapped to the nearest codebook vectors
and decoded by the VQ-VAE decoder. Each set writes ``samples/<set>.npy`` (float32 (N, 1, 28, 28)
in [0, 1]; N = ``sample.num_samples``, or ``sample.ddpm_num_samples`` for DDPM sets),
``samples/<set>.png`` (a 10x10 grid of the first 100; one row per digit for conditional sets)
and ``samples/<set>.json`` (settings, sampling seconds and seconds per 1000 images).
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import numpy as np
import torch

from pipeline.io import RunPaths, StageInputError, atomic_path, save_grid_png, sha256_file
from pipeline.sets import SAMPLE_SET_PATTERN, SampleSpec, parse_sample_set, requested_labels
from pipeline.runtime import Progress, autocast, log, resolve_device, stage_record

__all__ = ["SAMPLE_SET_PATTERN", "SampleSpec", "parse_sample_set", "requested_labels", "sample_pixelcnn", "sample_diffusion_latents", "sample"]

def _rows_per_digit(arr: np.ndarray, labels: np.ndarray, per_row: int = 10) -> np.ndarray:
    """The first ``per_row`` images of each label 0..9, digit by digit (a grid row per digit)."""
    return np.concatenate([arr[labels == d][:per_row] for d in range(10)])


@torch.no_grad()
def sample_pixelcnn(
    model: torch.nn.Module,
    num: int,
    shape: tuple[int, int] = (7, 7),
    temperature: float = 1.0,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    labels: Optional[torch.Tensor] = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling of code grids in raster order.

    Args:
        model: a :class:`~pipeline.models.pixelcnn.GatedPixelCNN` (codes -> logits (B, K, H, W)).
        num: number of grids.
        shape: (H, W) of the grid.
        temperature: tau > 0 of softmax(logits / tau); ignored when ``greedy``.
        greedy: argmax decoding instead of the categorical sampling layer.
        generator: RNG of the categorical draws.
        labels: int (num,) classes for a conditional model (None: null label / unconditional).
        guidance: classifier-free guidance scale s on the logits, l_u + s (l_c - l_u)
            (:func:`pipeline.diffusion.guidance_combine`); 1 = plain conditional.

    Returns:
        int64 (num, H, W) codes in [0, K).

    Raises:
        ValueError: temperature <= 0, or guidance without labels.
    """
    from pipeline.diffusion import guidance_combine

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is None and guidance != 1.0:
        raise ValueError("classifier-free guidance needs labels")
    h, w = shape
    codes = torch.zeros(num, h, w, dtype=torch.long, device=device)
    guided = labels is not None and guidance != 1.0
    if guided:
        both_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    for i in range(h):
        for j in range(w):
            if guided:
                cond, uncond = model(torch.cat([codes, codes]), both_labels)[:, :, i, j].float().chunk(2)
                logits = guidance_combine(cond, uncond, guidance)
            else:
                logits = model(codes, labels)[:, :, i, j].float()
            if greedy:
                codes[:, i, j] = logits.argmax(dim=1)
            else:
                probs = torch.softmax(logits / temperature, dim=1)
                codes[:, i, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return codes


def sample_diffusion_latents(
    model: torch.nn.Module,
    diffusion,
    num: int,
    channels: int,
    method: str = "ddim",
    ddim_steps: int = 50,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    shape: tuple[int, int] = (7, 7),
    progress_name: Optional[str] = None,
    clip: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Draw ``num`` scaled latents float (num, channels, H, W) with DDPM or DDIM.

    ``clip``: optional (low, high) range of the predicted x_0 (see ``GaussianDiffusion``)."""
    full = (num, channels, *shape)
    prog = Progress(progress_name, ddim_steps if method == "ddim" else diffusion.num_timesteps) if progress_name else None
    every = max(1, (ddim_steps if method == "ddim" else diffusion.num_timesteps) // 5)
    cb = (lambda k: prog.line(k) if k % every == 0 else None) if prog else None
    if method == "ddim":
        return diffusion.ddim_sample_loop(model, full, steps=ddim_steps, eta=eta, generator=generator, device=device, progress=cb, clip=clip)
    if method == "ddpm":
        return diffusion.p_sample_loop(model, full, generator=generator, device=device, progress=cb, clip=clip)
    raise ValueError(f"unknown diffusion sampling method {method!r}; expected 'ddim' or 'ddpm'")


def _save_npy(path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def sample(cfg: Mapping, run_dir: str | os.PathLike, model: str = "pixelcnn", threads: int | None = None) -> dict:
    """Stage 6 for one sample set ``model`` (a name of the grammar above).

    Reads ``sample`` (seed, num_samples, ddpm_num_samples, batch_size, temperature, ddim_steps,
    ddim_eta, clip_denoised).

    Raises:
        pipeline.io.StageInputError: a name outside the grammar, or a conditional set of an
            unconditional model.
        pipeline.checkpoint.CheckpointError: a model file that is not ours, does not fit, or was
            trained on latents of another ``vqvae/model.pt``.
    """
    from pipeline.checkpoint import CheckpointError
    from pipeline.diffusion import GaussianDiffusion, classifier_free_guidance
    from pipeline.train import load_model, pixel_space_to_images

    try:
        spec = parse_sample_set(model)
    except ValueError as exc:
        raise StageInputError(str(exc)) from None
    paths = RunPaths(run_dir)
    sec = cfg["sample"]
    out_npy = paths.samples(model, "npy")
    with stage_record("sample", cfg, out_npy.parent, metrics_name=f"{model}.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        n, bs = int(sec["num_samples"]), int(sec["batch_size"])
        if spec.method == "ddpm" and sec.get("ddpm_num_samples"):
            n = int(sec["ddpm_num_samples"])
        labels_all = torch.from_numpy(requested_labels(n)).to(device) if spec.conditional else None
        g = torch.Generator(device=device).manual_seed(int(sec["seed"]))
        if spec.prior != "pixeldiff":
            vqvae, _ = load_model(paths.vqvae_model, device=device)
            vq_sha = sha256_file(paths.vqvae_model)
        prior_path = {"pixelcnn": paths.pixelcnn_model, "diffusion": paths.diffusion_model, "pixeldiff": paths.pixel_diffusion_model}[spec.prior]
        net, state = load_model(prior_path, device=device, weights=spec.weights)
        if spec.prior != "pixeldiff" and state.get("vqvae_sha256") not in (None, vq_sha):
            stage = "train_pixelcnn" if spec.prior == "pixelcnn" else "train_diffusion"
            raise CheckpointError(f"{prior_path} was trained on latents of another vqvae/model.pt; re-run {stage}")
        num_classes = int(getattr(net, "num_classes", 0))
        if spec.conditional and not num_classes:
            section = "pixelcnn" if spec.prior == "pixelcnn" else "diffusion"
            raise StageInputError(f"sample set {model!r} is class-conditional but {prior_path} is not; train it with {section}.conditional: true")
        t0 = time.perf_counter()
        images = []
        if spec.prior == "pixelcnn":
            tau = float(spec.temperature if spec.temperature is not None else sec["temperature"])
            greedy = spec.method == "greedy"
            for start in range(0, n, bs):
                m = min(bs, n - start)
                y = labels_all[start : start + m] if spec.conditional else None
                with autocast(device, cfg["bf16"]):
                    codes = sample_pixelcnn(net, m, temperature=tau, greedy=greedy, generator=g, device=device, labels=y, guidance=spec.guidance if spec.conditional else 1.0)
                with torch.no_grad():
                    images.append(vqvae.decode_codes(codes).float().cpu())
                log.info("sample %s: %d/%d", model, start + m, n)
            metrics.update(prior="pixelcnn", method=spec.method, temperature=None if greedy else tau, greedy=greedy)
        else:
            diffusion = GaussianDiffusion(state["diffusion"]["schedule"], int(state["diffusion"]["timesteps"])).to(device)
            steps = int(spec.steps if spec.steps is not None else sec["ddim_steps"])
            if spec.prior == "diffusion":
                channels, shape = vqvae.embedding_dim, (7, 7)
                mean = state["latent_mean"].float().to(device)[None, :, None, None]
                std = state["latent_std"].float().to(device)[None, :, None, None]
                # x_0 is clipped to the per-channel range of the scaled train latents (stored with the model)
                clip = (state["latent_min"].float().to(device)[None, :, None, None], state["latent_max"].float().to(device)[None, :, None, None]) if sec["clip_denoised"] else None
            else:
                channels, shape = 1, (32, 32)
                clip = (torch.tensor(-1.0, device=device), torch.tensor(1.0, device=device)) if sec["clip_denoised"] else None
            for start in range(0, n, bs):
                m = min(bs, n - start)
                guided = classifier_free_guidance(net, labels_all[start : start + m], spec.guidance, num_classes) if spec.conditional else net

                def eps_model(x, t):
                    with autocast(device, cfg["bf16"]):
                        return guided(x, t)

                z = sample_diffusion_latents(eps_model, diffusion, m, channels, spec.method, steps, float(sec["ddim_eta"]), g, device, shape=shape, progress_name=f"sample {model} batch {start // bs + 1}", clip=clip)
                with torch.no_grad():
                    if spec.prior == "diffusion":
                        codes = vqvae.quantizer.snap(z * std + mean)
                        images.append(vqvae.decode_codes(codes).float().cpu())
                    else:
                        images.append(pixel_space_to_images(z).float().cpu())
                log.info("sample %s: %d/%d", model, start + m, n)
            metrics.update(
                prior=spec.prior, method=spec.method, weights=spec.weights, clip_denoised=bool(sec["clip_denoised"]), schedule=diffusion.schedule,
                timesteps=diffusion.num_timesteps, steps=steps if spec.method == "ddim" else diffusion.num_timesteps,
                eta=float(sec["ddim_eta"]) if spec.method == "ddim" else None,
            )
        arr = torch.cat(images).numpy().astype(np.float32)
        seconds = time.perf_counter() - t0
        _save_npy(out_npy, arr)
        grid = _rows_per_digit(arr, requested_labels(n)) if spec.conditional and n >= 100 else arr[:100]
        save_grid_png(paths.samples(model, "png"), grid, nrow=10, scale=2)
        metrics.update(
            model=model, num_samples=n, seed=int(sec["seed"]), conditional=spec.conditional, guidance_scale=spec.guidance,
            labels="i % 10 for sample i" if spec.conditional else None,
            sampling_seconds=round(seconds, 3), seconds_per_1000=round(1000 * seconds / n, 3),
        )
    return metrics
