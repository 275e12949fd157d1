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
* ``diffusion_dpmpp`` / ``_dpmsde`` / ``_euler`` / ``_heun`` / ``_eulera``: diffusers' schedulers
  (DPM-Solver++(2M), Lu et al. 2022; its SDE variant; Karras et al. 2022's Euler and Heun; ancestral
  Euler) with S steps (default ``sample.solver_steps``).
* ``_raw``: the raw instead of the EMA weights. ``pixeldiff_*``: the pixel-space baseline.
* ``_ag<w>``: unconditional with autoguidance (Karras et al. 2024): the network's prediction D
  is replaced by D_bad + w (D - D_bad), D_bad being the same model's early snapshot
  (``guide_snapshot``); for the PixelCNN the logits are combined the same way.
* ``_g<s>``: class-conditional, requested label i % C for sample i (C classes in the data), with classifier-free
  guidance scale s (diffusers' convention: s = 1 is the conditional model, no guidance; Ho &
  Salimans' w = s - 1); PixelCNN logits are guided the same way. Without ``_g`` a conditional
  model is sampled with the null label, i.e. unconditionally.

Latent diffusion samples are unscaled (x * std + mean), snapped to the nearest codebook vectors
and decoded by the VQ-VAE decoder. Each set writes ``samples/<set>.npy`` (float32 (N, C, H, W)
in [0, 1]; N = ``sample.num_samples``, or ``sample.ddpm_num_samples`` for DDPM sets),
``samples/<set>.png`` (a 10x10 grid of the first 100; one row per class for conditional sets)
and ``samples/<set>.json`` (settings, sampling seconds and seconds per 1000 images).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping

import numpy as np
import torch

from pipeline.io import RunPaths, StageInputError, atomic_path, save_grid_png, sha256_file
from pipeline.runtime import Progress, autocast, log, resolve_device, stage_record
from pipeline.sets import SAMPLE_SET_PATTERN, SampleSpec, parse_sample_set, requested_labels

__all__ = [
    "SAMPLE_SET_PATTERN",
    "SampleSpec",
    "parse_sample_set",
    "requested_labels",
    "sample_pixelcnn",
    "sample_diffusion_latents",
    "sample",
    "sample_one",
]


def _rows_per_class(arr: np.ndarray, labels: np.ndarray, per_row: int = 10) -> np.ndarray:
    """The first ``per_row`` images of each label 0..C-1 (C = 1 + the largest label), class by
    class (a grid row per class)."""
    return np.concatenate([arr[labels == d][:per_row] for d in range(int(labels.max()) + 1)])


@torch.no_grad()
def sample_pixelcnn(
    model: torch.nn.Module,
    num: int,
    shape: tuple[int, int] = (7, 7),
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    guide_model: torch.nn.Module | None = None,
    autoguidance: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling of code grids in raster order.

    Args:
        model: a :class:`~pipeline.models.pixelcnn.GatedPixelCNN` (codes -> logits (B, K, H, W)).
        num: number of grids.
        shape: (H, W) of the grid, or (D, H, W) for a 3D PixelCNN (raster order: planes, rows, columns).
        temperature: tau > 0 of softmax(logits / tau); ignored when ``greedy``.
        greedy: argmax decoding instead of the categorical sampling layer.
        generator: RNG of the categorical draws.
        labels: int (num,) classes for a conditional model (None: null label / unconditional).
        guidance: classifier-free guidance scale s on the logits, l_u + s (l_c - l_u)
            (:func:`pipeline.diffusion.guidance_combine`); 1 = plain conditional.
        guide_model: a weaker PixelCNN (the early snapshot) for autoguidance: the logits become
            l_bad + w (l - l_bad) (Karras et al. 2024 eq. 2 applied to the logits).
        autoguidance: w of autoguidance (1 = none; needs ``guide_model``).

    Returns:
        int64 (num, *shape) codes in [0, K).

    Raises:
        ValueError: temperature <= 0, or guidance without labels.
    """
    from pipeline.diffusion import guidance_combine

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is None and guidance != 1.0:
        raise ValueError("classifier-free guidance needs labels")
    if autoguidance != 1.0 and guide_model is None:
        raise ValueError("autoguidance needs guide_model (the snapshot weights)")
    codes = torch.zeros(num, *shape, dtype=torch.long, device=device)
    guided = labels is not None and guidance != 1.0
    if guided:
        both_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    for pos in itertools.product(*(range(s) for s in shape)):
        # the masked convolutions are causal along the first grid axis (rows; planes in 3D): the
        # logits at pos depend on the slices <= pos[0] only, so the ones after it are not computed
        # (4/7 of the full cost on a 7x7 grid, same logits)
        ctx = codes[:, : pos[0] + 1]
        at = (slice(None), slice(None), *pos)
        if guided:
            cond, uncond = model(torch.cat([ctx, ctx]), both_labels)[at].float().chunk(2)
            logits = guidance_combine(cond, uncond, guidance)
        else:
            logits = model(ctx, labels)[at].float()
        if autoguidance != 1.0:
            logits = guidance_combine(logits, guide_model(ctx, labels)[at].float(), autoguidance)
        if greedy:
            codes[(slice(None), *pos)] = logits.argmax(dim=1)
        else:
            probs = torch.softmax(logits / temperature, dim=1)
            codes[(slice(None), *pos)] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return codes


def sample_diffusion_latents(
    model: torch.nn.Module,
    diffusion,
    num: int,
    channels: int,
    method: str = "ddim",
    ddim_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    shape: tuple[int, int] = (7, 7),
    progress_name: str | None = None,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw ``num`` scaled latents float (num, channels, H, W).

    Args:
        model: the network f(x_t, t) in ``diffusion.prediction``'s parametrisation.
        method: "ddpm" (all T steps), "ddim" (``ddim_steps`` steps, ``eta``) or a diffusers
            scheduler of :data:`pipeline.diffusion.SCHEDULER_SAMPLERS` (``ddim_steps`` steps).
        clip: optional (low, high) range of the predicted x_0 (see ``GaussianDiffusion``).

    Raises:
        ValueError: an unknown method.
    """
    from pipeline.diffusion import SCHEDULER_SAMPLERS, scheduler_sample_loop

    full = (num, channels, *shape)
    total = diffusion.num_timesteps if method == "ddpm" else ddim_steps
    prog = Progress(progress_name, total) if progress_name else None
    every = max(1, total // 5)
    cb = (lambda k: prog.line(k) if k % every == 0 else None) if prog else None
    if method == "ddim":
        return diffusion.ddim_sample_loop(
            model, full, steps=ddim_steps, eta=eta, generator=generator, device=device, progress=cb, clip=clip
        )
    if method == "ddpm":
        return diffusion.p_sample_loop(model, full, generator=generator, device=device, progress=cb, clip=clip)
    if method in SCHEDULER_SAMPLERS:
        return scheduler_sample_loop(
            diffusion,
            model,
            full,
            sampler=method,
            steps=ddim_steps,
            generator=generator,
            device=device,
            progress=cb,
            clip=clip,
        )
    raise ValueError(
        f"unknown diffusion sampling method {method!r}; expected 'ddpm', 'ddim' or one of {sorted(SCHEDULER_SAMPLERS)}"
    )


def _save_npy(path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def sample(
    cfg: Mapping,
    run_dir: str | os.PathLike,
    sample_set: str = "pixelcnn",
    threads: int | None = None,
    sample_sets: list[str] | None = None,
) -> dict:
    """Stage 6: draw sample set ``sample_set`` (a name of the grammar above), or every set of
    ``sample_sets`` one after another (what one SLURM job draws for a run's sets).

    Returns:
        The set's record (``samples/<set>.json``), or ``{set: record}`` for ``sample_sets``.

    Raises:
        as :func:`sample_one`, for the first set that fails (the sets before it are written).
    """
    if sample_sets is not None:
        return {name: sample_one(cfg, run_dir, name, threads) for name in sample_sets}
    return sample_one(cfg, run_dir, sample_set, threads)


def sample_one(cfg: Mapping, run_dir: str | os.PathLike, sample_set: str, threads: int | None = None) -> dict:
    """Draw one sample set ``sample_set`` (a name of the grammar above) and write its ``.npy``,
    grid ``.png`` and record ``.json``.

    Reads ``sample`` (seed, num_samples, ddpm_num_samples, batch_size, temperature, ddim_steps,
    ddim_eta, clip_denoised).

    Raises:
        pipeline.io.StageInputError: a name outside the grammar, or a conditional set of an
            unconditional model.
        pipeline.checkpoint.CheckpointError: a model file that is not ours, does not fit, or was
            trained on latents of another ``vqvae/model.pt``.
    """
    from pipeline.checkpoint import CheckpointError, load_model
    from pipeline.diffusion import GaussianDiffusion, autoguidance, classifier_free_guidance, pixel_space_to_images

    try:
        spec = parse_sample_set(sample_set)
    except ValueError as exc:
        raise StageInputError(str(exc)) from None
    paths = RunPaths(run_dir)
    sec = cfg["sample"]
    out_npy = paths.samples(sample_set, "npy")
    with stage_record("sample", cfg, out_npy.parent, metrics_name=f"{sample_set}.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        n, bs = int(sec["num_samples"]), int(sec["batch_size"])
        if spec.method == "ddpm" and sec.get("ddpm_num_samples"):
            n = int(sec["ddpm_num_samples"])
        g = torch.Generator(device=device).manual_seed(int(sec["seed"]))
        if spec.prior != "pixeldiff":
            vqvae, _ = load_model(paths.vqvae_model, device=device)
            vq_sha = sha256_file(paths.vqvae_model)
        prior_path = paths.root / spec.model_folder / "model.pt"
        net, state = load_model(prior_path, device=device, weights=spec.weights)
        trained = state.get("metrics") or {}
        weak = load_model(prior_path, device=device, weights="guide")[0] if spec.autoguidance is not None else None
        if spec.prior != "pixeldiff" and state.get("vqvae_sha256") not in (None, vq_sha):
            stage = "train_pixelcnn" if spec.prior == "pixelcnn" else "train_diffusion"
            raise CheckpointError(f"{prior_path} was trained on latents of another vqvae/model.pt; re-run {stage}")
        num_classes = int(getattr(net, "num_classes", 0))
        if spec.conditional and not num_classes:
            stage = "train_pixelcnn" if spec.prior == "pixelcnn" else "train_diffusion"
            raise StageInputError(
                f"sample set {sample_set!r} is class-conditional but {prior_path} is not; "
                f"train it with python -m pipeline {stage} --conditional"
            )
        labels_all = torch.from_numpy(requested_labels(n, num_classes)).to(device) if spec.conditional else None
        t0 = time.perf_counter()
        images = []
        if spec.prior == "pixelcnn":
            tau = float(spec.temperature if spec.temperature is not None else sec["temperature"])
            greedy = spec.method == "greedy"
            for start in range(0, n, bs):
                m = min(bs, n - start)
                y = labels_all[start : start + m] if spec.conditional else None
                with autocast(device, cfg["bf16"]):
                    codes = sample_pixelcnn(
                        net,
                        m,
                        shape=tuple(state.get("grid") or (7, 7)),
                        temperature=tau,
                        greedy=greedy,
                        generator=g,
                        device=device,
                        labels=y,
                        guidance=spec.guidance if spec.conditional else 1.0,
                        guide_model=weak,
                        autoguidance=spec.autoguidance if spec.autoguidance is not None else 1.0,
                    )
                with torch.no_grad():
                    images.append(vqvae.decode_codes(codes).float().cpu())
                log.info("sample %s: %d/%d", sample_set, start + m, n)
            metrics.update(prior="pixelcnn", method=spec.method, temperature=None if greedy else tau, greedy=greedy)
        else:
            diffusion = GaussianDiffusion(**state["diffusion"]).to(device)
            default_steps = sec["ddim_steps"] if spec.method == "ddim" else sec["solver_steps"]
            steps = int(spec.steps if spec.steps is not None else default_steps)
            if spec.prior == "diffusion":
                channels, shape = vqvae.embedding_dim, tuple(state["grid"]) if "grid" in state else (7, 7)
                per_channel = (1, -1, *([1] * len(shape)))  # (1, D, 1, 1), or (1, D, 1, 1, 1) for volumes
                mean = state["latent_mean"].float().to(device).view(per_channel)
                std = state["latent_std"].float().to(device).view(per_channel)
                # x_0 is clipped to the per-channel range of the scaled train latents (stored with the model)
                clip = (
                    (
                        state["latent_min"].float().to(device).view(per_channel),
                        state["latent_max"].float().to(device).view(per_channel),
                    )
                    if sec["clip_denoised"]
                    else None
                )
            else:
                from pipeline.diffusion import pixel_size

                image_shape = tuple(state.get("image_shape") or (1, 28, 28))
                channels, shape = image_shape[0], pixel_size(image_shape[1:])
                clip = (
                    (torch.tensor(-1.0, device=device), torch.tensor(1.0, device=device))
                    if sec["clip_denoised"]
                    else None
                )
            for start in range(0, n, bs):
                m = min(bs, n - start)
                if spec.conditional:
                    guided = classifier_free_guidance(net, labels_all[start : start + m], spec.guidance, num_classes)
                elif weak is not None:
                    guided = autoguidance(net, weak, float(spec.autoguidance))
                else:
                    guided = net

                def eps_model(x, t, guided=guided):
                    with autocast(device, cfg["bf16"]):
                        return guided(x, t)

                z = sample_diffusion_latents(
                    eps_model,
                    diffusion,
                    m,
                    channels,
                    spec.method,
                    steps,
                    float(sec["ddim_eta"]),
                    g,
                    device,
                    shape=shape,
                    progress_name=f"sample {sample_set} batch {start // bs + 1}",
                    clip=clip,
                )
                with torch.no_grad():
                    if spec.prior == "diffusion":
                        codes = vqvae.quantizer.snap(z * std + mean)
                        images.append(vqvae.decode_codes(codes).float().cpu())
                    else:
                        images.append(pixel_space_to_images(z, image_shape[1:]).float().cpu())
                log.info("sample %s: %d/%d", sample_set, start + m, n)
            metrics.update(
                prior=spec.prior,
                method=spec.method,
                weights=spec.weights,
                clip_denoised=bool(sec["clip_denoised"]),
                schedule=diffusion.schedule,
                timesteps=diffusion.num_timesteps,
                prediction=diffusion.prediction,
                steps=diffusion.num_timesteps if spec.method == "ddpm" else steps,
                eta=float(sec["ddim_eta"]) if spec.method == "ddim" else None,
            )
        arr = torch.cat(images).numpy().astype(np.float32)
        seconds = time.perf_counter() - t0
        _save_npy(out_npy, arr)
        if arr.ndim == 5:  # volumes: three-plane grid of the first 8, the first 4 as NIfTI
            from pipeline.data import read_info
            from pipeline.volumes import save_three_plane_grid, write_nifti

            affine = read_info(paths.dataset).reference_affine
            save_three_plane_grid(paths.samples(sample_set, "png"), arr[:8], nrow=2, scale=3)
            for i in range(min(4, n)):
                write_nifti(paths.root / "samples" / sample_set / f"sample_{i:03d}.nii.gz", arr[i], affine)
        else:
            grid = (
                _rows_per_class(arr, requested_labels(n, num_classes)) if spec.conditional and n >= 100 else arr[:100]
            )
            save_grid_png(paths.samples(sample_set, "png"), grid, nrow=10, scale=2)
        metrics.update(
            model=sample_set,  # the record key stays "model" (samples/<set>.json)
            num_samples=n,
            seed=int(sec["seed"]),
            conditional=spec.conditional,
            guidance_scale=spec.guidance,
            autoguidance=spec.autoguidance,
            guide_step=trained.get("guide_step") if spec.autoguidance is not None else None,
            labels=f"i % {num_classes} for sample i" if spec.conditional else None,
            num_classes=num_classes or None,
            sampling_seconds=round(seconds, 3),
            seconds_per_1000=round(1000 * seconds / n, 3),
            samples_per_s=round(n / max(seconds, 1e-9), 2),
            prior_folder=spec.model_folder,
            prior_budget=trained.get("budget", 1.0),
            prior_steps=trained.get("steps"),
            prior_train_seconds=trained.get("train_seconds"),
        )
    return metrics
