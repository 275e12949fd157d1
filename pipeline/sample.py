"""Stage 6: draw samples from the PixelCNN prior and from the latent diffusion model.

* ``pixelcnn``: ancestral sampling in raster order through the **categorical sampling
  layer**: code c_ij ~ Categorical(softmax(logits_ij / tau)) (the step that makes a PixelCNN a
  generative model; van den Oord et al. 2016). ``pixelcnn_greedy`` takes argmax instead and,
  being deterministic, gives the same grid for every seed: the collapse the seed study saw.
* ``diffusion_ddpm``: DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).
* ``diffusion_ddim``: DDIM with S steps (Song et al. 2021, eq. 12; eta = 0 by default).

Diffusion samples use the EMA weights; the denoised latents are unscaled (x * std + mean),
snapped to the nearest codebook vectors and decoded by the VQ-VAE decoder. Each model writes
``samples/<model>.npy`` (float32 (N, 1, 28, 28) in [0, 1]; N = ``sample.num_samples``,
or ``sample.ddpm_num_samples`` for DDPM), ``samples/<model>.png`` (a 10x10
grid of the first 100) and ``samples/<model>.json`` (settings and seconds).
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import numpy as np
import torch

from pipeline.io import RunPaths, atomic_path, save_grid_png, sha256_file
from pipeline.runtime import Progress, autocast, log, resolve_device, stage_record

__all__ = ["SAMPLERS", "sample_pixelcnn", "sample_diffusion_latents", "sample"]

SAMPLERS = ("pixelcnn", "pixelcnn_greedy", "diffusion_ddim", "diffusion_ddpm")


@torch.no_grad()
def sample_pixelcnn(
    model: torch.nn.Module,
    num: int,
    shape: tuple[int, int] = (7, 7),
    temperature: float = 1.0,
    greedy: bool = False,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Ancestral sampling of code grids in raster order.

    Args:
        model: a :class:`~pipeline.models.pixelcnn.GatedPixelCNN` (codes -> logits (B, K, H, W)).
        num: number of grids.
        shape: (H, W) of the grid.
        temperature: tau > 0 of softmax(logits / tau); ignored when ``greedy``.
        greedy: argmax decoding instead of the categorical sampling layer.
        generator: RNG of the categorical draws.

    Returns:
        int64 (num, H, W) codes in [0, K).

    Raises:
        ValueError: temperature <= 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h, w = shape
    codes = torch.zeros(num, h, w, dtype=torch.long, device=device)
    for i in range(h):
        for j in range(w):
            logits = model(codes)[:, :, i, j].float()
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
    """Stage 6 for one sampler ``model`` (one of :data:`SAMPLERS`).

    Reads ``sample`` (seed, num_samples, ddpm_num_samples, batch_size, temperature, ddim_steps,
    ddim_eta, clip_denoised).

    Raises:
        ValueError: unknown sampler name.
        pipeline.checkpoint.CheckpointError: a model file that is not ours, does not fit, or was
            trained on latents of another ``vqvae/model.pt``.
    """
    from pipeline.checkpoint import CheckpointError
    from pipeline.diffusion import GaussianDiffusion
    from pipeline.train import load_model

    if model not in SAMPLERS:
        raise ValueError(f"unknown sampler {model!r}; expected one of {list(SAMPLERS)}")
    paths = RunPaths(run_dir)
    sec = cfg["sample"]
    out_npy = paths.samples(model, "npy")
    with stage_record("sample", cfg, out_npy.parent, metrics_name=f"{model}.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vqvae, _ = load_model(paths.vqvae_model, device=device)
        vq_sha = sha256_file(paths.vqvae_model)
        n, bs = int(sec["num_samples"]), int(sec["batch_size"])
        if model == "diffusion_ddpm" and sec.get("ddpm_num_samples"):
            n = int(sec["ddpm_num_samples"])
        g = torch.Generator(device=device).manual_seed(int(sec["seed"]))
        t0 = time.perf_counter()
        images = []
        if model.startswith("pixelcnn"):
            prior, state = load_model(paths.pixelcnn_model, device=device)
            if state.get("vqvae_sha256") not in (None, vq_sha):
                raise CheckpointError(f"{paths.pixelcnn_model} was trained on latents of another vqvae/model.pt; re-run train_pixelcnn")
            greedy = model == "pixelcnn_greedy"
            for start in range(0, n, bs):
                with autocast(device, cfg["bf16"]):
                    codes = sample_pixelcnn(prior, min(bs, n - start), temperature=float(sec["temperature"]), greedy=greedy, generator=g, device=device)
                with torch.no_grad():
                    images.append(vqvae.decode_codes(codes).float().cpu())
                log.info("sample %s: %d/%d", model, start + len(codes), n)
            metrics.update(temperature=None if greedy else float(sec["temperature"]), greedy=greedy)
        else:
            net, state = load_model(paths.diffusion_model, device=device, weights="ema")
            if state.get("vqvae_sha256") not in (None, vq_sha):
                raise CheckpointError(f"{paths.diffusion_model} was trained on latents of another vqvae/model.pt; re-run train_diffusion")
            diffusion = GaussianDiffusion(state["diffusion"]["schedule"], int(state["diffusion"]["timesteps"])).to(device)
            mean = state["latent_mean"].float().to(device)[None, :, None, None]
            std = state["latent_std"].float().to(device)[None, :, None, None]
            method = model.split("_", 1)[1]
            # x_0 is clipped to the per-channel range of the scaled train latents (stored with the model)
            clip = (state["latent_min"].float().to(device)[None, :, None, None], state["latent_max"].float().to(device)[None, :, None, None]) if sec["clip_denoised"] else None

            def eps_model(x, t):
                with autocast(device, cfg["bf16"]):
                    return net(x, t)

            for start in range(0, n, bs):
                m = min(bs, n - start)
                z = sample_diffusion_latents(eps_model, diffusion, m, vqvae.embedding_dim, method, int(sec["ddim_steps"]), float(sec["ddim_eta"]), g, device, progress_name=f"sample {model} batch {start // bs + 1}", clip=clip)
                with torch.no_grad():
                    codes = vqvae.quantizer.snap(z * std + mean)
                    images.append(vqvae.decode_codes(codes).float().cpu())
                log.info("sample %s: %d/%d", model, start + m, n)
            metrics.update(method=method, weights="ema", clip_denoised=bool(sec["clip_denoised"]), schedule=diffusion.schedule, timesteps=diffusion.num_timesteps, steps=int(sec["ddim_steps"]) if method == "ddim" else diffusion.num_timesteps, eta=float(sec["ddim_eta"]) if method == "ddim" else None)
        arr = torch.cat(images).numpy().astype(np.float32)
        seconds = time.perf_counter() - t0
        _save_npy(out_npy, arr)
        save_grid_png(paths.samples(model, "png"), arr[:100], nrow=10, scale=2)
        metrics.update(model=model, num_samples=n, seed=int(sec["seed"]), sampling_seconds=round(seconds, 3), seconds_per_1000=round(1000 * seconds / n, 3))
    return metrics
