"""Stage 6: draw a *sample set* from the PixelCNN prior, the latent diffusion model or the
pixel-space diffusion baseline.

A sample set is named by what it draws; the grammar is written once, in :mod:`pipeline.sets`
(:data:`pipeline.sets.SAMPLE_SET_PATTERN`, parsed by :func:`pipeline.sets.parse_sample_set`;
docs/reference.md lists it). The samplers:

* ``pixelcnn``: ancestral sampling in raster order through the **categorical sampling layer**:
  code c_ij ~ Categorical(softmax(logits_ij / tau)) (the step that makes a PixelCNN a
  generative model; van den Oord et al. 2016); ``_greedy`` takes the argmax instead and, being
  deterministic, gives the same grid for every seed: the collapse the seed study saw.
* ``diffusion_ddpm``: DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2);
  ``diffusion_ddim``: DDIM with S steps (Song et al. 2021, eq. 12; eta = ``sample.ddim_eta``);
  ``diffusion_dpmpp`` / ``_dpmsde`` / ``_euler`` / ``_heun`` / ``_eulera``: diffusers' schedulers
  (DPM-Solver++(2M), Lu et al. 2022; its SDE variant; Karras et al. 2022's Euler and Heun;
  ancestral Euler) with S steps.
* ``_ag<w>``: autoguidance (Karras et al. 2024): the prediction D is replaced by
  D_guide + w (D - D_guide), the guide being the same model's early weights (``guide_fraction``);
  for the PixelCNN the logits are combined the same way. ``_g<s>``: class-conditional with
  classifier-free guidance scale s (label i % C for sample i); ``_b<f>``: the prior trained at f
  times its steps; ``_raw``: the raw instead of the EMA weights; ``pixeldiff_*``: the baseline.

Latent diffusion samples are unscaled (:class:`pipeline.latents.LatentScaling`), snapped to the
nearest codebook vectors and decoded by the VQ-VAE decoder. Each set writes ``samples/<set>.npy``
(float32 (N, C, H, W) in [0, 1]; N = ``sample.num_samples``, or ``sample.ddpm_num_samples`` for
DDPM sets), ``samples/<set>.png`` (a 10x10 grid of the first 100; one row per class for
conditional sets) and ``samples/<set>.json`` (settings, sampling seconds and seconds per 1000
images).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.diffusion import autoguidance, classifier_free_guidance
from pipeline.io import RunPaths, StageInputError, atomic_path, save_grid_png
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
    "Models",
    "load_models",
    "draw_set",
    "draw_pixelcnn",
    "draw_diffusion",
    "write_set",
    "set_record",
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
    guide: torch.nn.Module | None = None,
    autoguidance: float = 1.0,
    progress_name: str | None = None,
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
        guide: the guide for autoguidance, a weaker PixelCNN (the early snapshot): the logits
            become l_guide + w (l - l_guide) (Karras et al. 2024 eq. 2 applied to the logits).
        autoguidance: w of autoguidance (1 = none; needs ``guide``).
        progress_name: log progress lines (positions done, rate, eta) under this name.

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
    if autoguidance != 1.0 and guide is None:
        raise ValueError("autoguidance needs the guide (the early snapshot's weights)")
    codes = torch.zeros(num, *shape, dtype=torch.long, device=device)
    guided = labels is not None and guidance != 1.0
    if guided:
        both_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    progress = Progress(progress_name or "", math.prod(shape), minimum=1 if progress_name else 2**62)
    for k, pos in enumerate(itertools.product(*(range(s) for s in shape)), 1):
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
            logits = guidance_combine(logits, guide(ctx, labels)[at].float(), autoguidance)
        if greedy:
            codes[(slice(None), *pos)] = logits.argmax(dim=1)
        else:
            probs = torch.softmax(logits / temperature, dim=1)
            codes[(slice(None), *pos)] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        progress.tick(k)
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
            For a flow model (``prediction: flow``) "euler" and "heun" are diffusers' flow-matching
            schedulers (:func:`pipeline.diffusion.flow_sample_loop`); the others sample it as a
            VP model through the point of equal SNR.
        clip: optional (low, high) range of the predicted x_0 (see ``GaussianDiffusion``).

    Raises:
        ValueError: an unknown method.
    """
    from pipeline.diffusion import FLOW_SAMPLERS, SCHEDULER_SAMPLERS, flow_sample_loop, scheduler_sample_loop

    full = (num, channels, *shape)
    total = diffusion.num_timesteps if method == "ddpm" else ddim_steps
    if method == "heun":  # Heun's schedulers list 2 S - 1 timesteps (a corrector call at each but the last)
        total = 2 * ddim_steps - 1
    prog = Progress(progress_name, total) if progress_name else None
    every = max(1, total // 5)
    cb = (lambda k: prog.line(k) if k % every == 0 else None) if prog else None
    if diffusion.is_flow and method in FLOW_SAMPLERS:
        return flow_sample_loop(
            diffusion, model, full, method, ddim_steps, generator=generator, device=device, progress=cb, clip=clip
        )
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


@dataclass
class Models:
    """What a sample set draws with: the VQ-VAE (None for the pixel-space baseline) and the
    prior's network, its ``model.pt`` dict, the guide (the early snapshot autoguidance guides
    away from, or None), and the prior's number of classes (0: unconditional)."""

    vqvae: torch.nn.Module | None
    prior: torch.nn.Module
    state: dict
    guide: torch.nn.Module | None
    num_classes: int

    @property
    def trained(self) -> dict:
        """The prior's training metrics, as saved in its ``model.pt``."""
        return self.state.get("metrics") or {}


def load_models(paths: RunPaths, spec: SampleSpec, device) -> Models:
    """Load and check what ``spec`` draws with.

    Raises:
        pipeline.checkpoint.CheckpointError: a model file that is not ours, does not fit, or was
            trained on latents of another ``vqvae/model.pt``.
        pipeline.io.StageInputError: a conditional set of an unconditional prior.
    """
    from pipeline.checkpoint import CheckpointError, load_model, source_sha256

    vqvae = None
    if spec.prior != "pixeldiff":
        vqvae, _ = load_model(paths.vqvae_model, device=device)
    prior_path = paths.root / spec.model_folder / "model.pt"
    prior, state = load_model(prior_path, device=device, weights=spec.weights)
    stage = "train_pixelcnn" if spec.prior == "pixelcnn" else "train_diffusion"
    if vqvae is not None and state.get("vqvae_sha256") not in (None, source_sha256(paths.vqvae_model)):
        raise CheckpointError(f"{prior_path} was trained on latents of another vqvae/model.pt; re-run {stage}")
    guide = load_model(prior_path, device=device, weights="guide")[0] if spec.autoguidance is not None else None
    num_classes = int(getattr(prior, "num_classes", 0))
    if spec.conditional and not num_classes:
        raise StageInputError(
            f"sample set {spec.name!r} is class-conditional but {prior_path} is not; "
            f"train it with python -m pipeline {stage} --conditional"
        )
    return Models(vqvae, prior, state, guide, num_classes)


def draw_pixelcnn(models: Models, spec: SampleSpec, cfg: Mapping, n: int, labels, generator, device) -> tuple:
    """Images float32 (n, C, H, W) in [0, 1] (CPU) of a PixelCNN set, drawn in batches of
    ``sample.batch_size`` and decoded by the VQ-VAE; and the record's sampler keys."""
    section = cfg["sample"]
    tau = float(spec.temperature if spec.temperature is not None else section["temperature"])
    greedy = spec.method == "greedy"
    images = []
    for start in range(0, n, int(section["batch_size"])):
        m = min(int(section["batch_size"]), n - start)
        with autocast(device, cfg["bf16"]):
            codes = sample_pixelcnn(
                models.prior,
                m,
                shape=tuple(models.state.get("grid") or (7, 7)),
                temperature=tau,
                greedy=greedy,
                generator=generator,
                device=device,
                labels=labels[start : start + m] if labels is not None else None,
                guidance=spec.guidance if spec.conditional else 1.0,
                guide=models.guide,
                autoguidance=spec.autoguidance if spec.autoguidance is not None else 1.0,
                progress_name=f"sample {spec.name} batch {start // int(section['batch_size']) + 1} positions",
            )
        with torch.no_grad():
            images.append(models.vqvae.decode_codes(codes).float().cpu())
        log.info("sample %s: %d/%d", spec.name, start + m, n)
    return torch.cat(images), {
        "prior": "pixelcnn",
        "method": spec.method,
        "temperature": None if greedy else tau,
        "greedy": greedy,
    }


def _network(models: Models, spec: SampleSpec, labels, cfg: Mapping, device):
    """The network a diffusion sampler calls, f(x_t, t) under the run's precision: the prior,
    guided by its labels (classifier-free guidance) or by its guide (autoguidance)."""
    if spec.conditional:
        guided = classifier_free_guidance(models.prior, labels, spec.guidance, models.num_classes)
    elif models.guide is not None:
        guided = autoguidance(models.prior, models.guide, float(spec.autoguidance))
    else:
        guided = models.prior

    def network(x, t):
        with autocast(device, cfg["bf16"]):
            return guided(x, t)

    return network


def draw_diffusion(models: Models, spec: SampleSpec, cfg: Mapping, n: int, labels, generator, device) -> tuple:
    """Images float32 (n, C, H, W) in [0, 1] (CPU) of a latent or pixel-space diffusion set:
    latents are drawn in batches, unscaled (:class:`pipeline.latents.LatentScaling`), snapped to
    the nearest codebook vectors and decoded; pixel-space samples are cropped. And the record's
    sampler keys."""
    from pipeline.diffusion import GaussianDiffusion, pixel_size, pixel_space_to_images
    from pipeline.latents import LatentScaling

    section = cfg["sample"]
    diffusion = GaussianDiffusion(**models.state["diffusion"]).to(device)
    default_steps = section["ddim_steps"] if spec.method == "ddim" else section["solver_steps"]
    steps = int(spec.steps if spec.steps is not None else default_steps)
    if spec.prior == "diffusion":
        scaling = LatentScaling.from_state(models.state)
        channels, shape = models.vqvae.embedding_dim, tuple(models.state.get("grid") or (7, 7))
        clip = scaling.clip_range(device, len(shape)) if section["clip_denoised"] else None
    else:
        image_shape = tuple(models.state.get("image_shape") or (1, 28, 28))
        channels, shape = image_shape[0], pixel_size(image_shape[1:])
        one = torch.tensor(1.0, device=device)
        clip = (-one, one) if section["clip_denoised"] else None
    images, bs = [], int(section["batch_size"])
    for start in range(0, n, bs):
        m = min(bs, n - start)
        network = _network(models, spec, labels[start : start + m] if labels is not None else None, cfg, device)
        z = sample_diffusion_latents(
            network,
            diffusion,
            m,
            channels,
            spec.method,
            steps,
            float(section["ddim_eta"]),
            generator,
            device,
            shape=shape,
            progress_name=f"sample {spec.name} batch {start // bs + 1}",
            clip=clip,
        )
        with torch.no_grad():
            if spec.prior == "diffusion":
                codes = models.vqvae.quantizer.snap(scaling.unscale(z))
                images.append(models.vqvae.decode_codes(codes).float().cpu())
            else:
                images.append(pixel_space_to_images(z, image_shape[1:]).float().cpu())
        log.info("sample %s: %d/%d", spec.name, start + m, n)
    keys = {
        "prior": spec.prior,
        "method": spec.method,
        "weights": spec.weights,
        "clip_denoised": bool(section["clip_denoised"]),
        "schedule": diffusion.schedule,
        "timesteps": diffusion.num_timesteps,
        "prediction": diffusion.prediction,
        "scheduler": _scheduler_name(diffusion, spec.method),
        "steps": diffusion.num_timesteps if spec.method == "ddpm" else steps,
        "eta": float(section["ddim_eta"]) if spec.method == "ddim" else None,
    }
    return torch.cat(images), keys


def _scheduler_name(diffusion, method: str) -> str:
    """The sampler that draws ``method`` for this model: a diffusers class name, or ours."""
    from pipeline.diffusion import FLOW_SAMPLERS, SCHEDULER_SAMPLERS

    if diffusion.is_flow and method in FLOW_SAMPLERS:
        return f"diffusers.{FLOW_SAMPLERS[method]}"
    if method in SCHEDULER_SAMPLERS:
        name = f"diffusers.{SCHEDULER_SAMPLERS[method][0]}"
    else:
        name = {"ddim": "GaussianDiffusion.ddim_sample_loop", "ddpm": "GaussianDiffusion.p_sample_loop"}[method]
    return name + (" on the VP point of equal SNR" if diffusion.is_flow else "")


def write_set(paths: RunPaths, spec: SampleSpec, arr: np.ndarray, num_classes: int) -> None:
    """Write ``samples/<set>.npy`` and its grid ``.png`` (10x10, one row per class for a
    conditional set of 100 or more); for volumes a three-plane grid of the first 8 and the first
    4 as NIfTI (``samples/<set>/sample_<i>.nii.gz``, the dataset's reference affine). Atomic."""
    _save_npy(paths.samples(spec.name, "npy"), arr)
    if arr.ndim == 5:
        from pipeline.data import read_info
        from pipeline.volumes import save_three_plane_grid, write_nifti

        affine = read_info(paths.dataset).reference_affine
        save_three_plane_grid(paths.samples(spec.name, "png"), arr[:8], nrow=2, scale=3)
        for i in range(min(4, len(arr))):
            write_nifti(paths.root / "samples" / spec.name / f"sample_{i:03d}.nii.gz", arr[i], affine)
        return
    n = len(arr)
    if spec.conditional and n >= 100:
        grid = _rows_per_class(arr, requested_labels(n, num_classes))
    else:
        grid = arr[:100]
    save_grid_png(paths.samples(spec.name, "png"), grid, nrow=10, scale=2)


def set_record(spec: SampleSpec, models: Models, n: int, seed: int, seconds: float) -> dict:
    """The keys of ``samples/<set>.json`` besides the sampler's (what was drawn, from what, how fast)."""
    trained = models.trained
    return {
        "set": spec.name,
        "num_samples": n,
        "seed": seed,
        "conditional": spec.conditional,
        "guidance_scale": spec.guidance,
        "autoguidance": spec.autoguidance,
        "guide_step": trained.get("guide_step") if spec.autoguidance is not None else None,
        "labels": f"i % {models.num_classes} for sample i" if spec.conditional else None,
        "num_classes": models.num_classes or None,
        "sampling_seconds": round(seconds, 3),
        "seconds_per_1000": round(1000 * seconds / n, 3),
        "samples_per_s": round(n / max(seconds, 1e-9), 2),
        "prior_folder": spec.model_folder,
        "prior_budget": trained.get("budget", 1.0),
        "prior_steps": trained.get("steps"),
        "prior_train_seconds": trained.get("train_seconds"),
    }


def draw_set(cfg: Mapping, paths: RunPaths, spec: SampleSpec, device) -> tuple[np.ndarray, dict, Models, float]:
    """Draw the images of one sample set as the sample stage does (the Python API calls this
    too): N = ``sample.num_samples`` (``ddpm_num_samples`` for DDPM sets) in batches of
    ``sample.batch_size`` from a generator seeded with ``sample.seed``, so the same config, set,
    seed and N give the same images.

    Returns:
        (images float32 (N, C, H, W) or (N, C, D, H, W) in [0, 1], the sampler's record keys,
        the :class:`Models` drawn with, the seconds the drawing took (models loaded, not counted)).

    Raises:
        as :func:`load_models`.
    """
    section = cfg["sample"]
    n = int(section["num_samples"])
    if spec.method == "ddpm" and section.get("ddpm_num_samples"):
        n = int(section["ddpm_num_samples"])
    generator = torch.Generator(device=device).manual_seed(int(section["seed"]))
    models = load_models(paths, spec, device)
    labels = None
    if spec.conditional:
        labels = torch.from_numpy(requested_labels(n, models.num_classes)).to(device)
    draw = draw_pixelcnn if spec.prior == "pixelcnn" else draw_diffusion
    t0 = time.perf_counter()
    images, sampler = draw(models, spec, cfg, n, labels, generator, device)
    return images.numpy().astype(np.float32), sampler, models, time.perf_counter() - t0


def sample_one(cfg: Mapping, run_dir: str | os.PathLike, sample_set: str, threads: int | None = None) -> dict:
    """Draw one sample set ``sample_set`` (a name of the grammar above) and write its ``.npy``,
    grid ``.png`` and record ``.json``: draw (:func:`draw_set`: load and check the models, then
    :func:`draw_pixelcnn` or :func:`draw_diffusion`), write (:func:`write_set`), record.

    Reads ``sample`` (seed, num_samples, ddpm_num_samples, batch_size, temperature, ddim_steps,
    solver_steps, ddim_eta, clip_denoised) and the top-level ``device`` and ``bf16``.

    Raises:
        pipeline.io.StageInputError: a name outside the grammar, or a conditional set of an
            unconditional model.
        pipeline.checkpoint.CheckpointError: a model file that is not ours, does not fit, or was
            trained on latents of another ``vqvae/model.pt``.
    """
    try:
        spec = parse_sample_set(sample_set)
    except ValueError as exc:
        raise StageInputError(str(exc)) from None
    paths = RunPaths(run_dir)
    out = paths.samples(sample_set, "npy").parent
    with stage_record("sample", cfg, out, metrics_name=f"{sample_set}.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        arr, sampler, models, seconds = draw_set(cfg, paths, spec, device)
        write_set(paths, spec, arr, models.num_classes)
        metrics.update(sampler)
        metrics.update(set_record(spec, models, len(arr), int(cfg["sample"]["seed"]), seconds))
    return metrics
