"""FLOP counts of every stage from the models themselves, and the GPU time they imply.

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` run on the CPU over the
configured networks at the configured shapes (it counts matmuls and convolutions, forward and
backward; normalisations, activations and the optimizer are not counted: they are memory-bound
and small next to the convolutions here). A training step is one forward and backward of the
global batch; a sample set is ``num_samples`` times the network evaluations its sampler makes.

The time a count implies is ``max(FLOPs / sustained, sequential_calls * latency)``: small
networks at small batch are bound by kernel-launch latency, not by arithmetic, so both a
sustained throughput (TFLOP/s per GPU) and a per-call latency floor are assumptions, stated in
the cluster YAML (``assumed_tflops``, ``assumed_step_ms``) and printed by the plan. For the
A100 40 GB: 312 TFLOP/s dense bf16 peak (NVIDIA A100 datasheet), 156 TF32, 19.5 FP32.

Networks are built and run on PyTorch's ``meta`` device: shapes without values, so a 128³
volume costs nothing to count. :func:`stage_memory` measures a training stage's GPU memory the
same way: parameters, gradients, Adam's two moments and the EMA copy (fp32, 4 bytes each), plus
the activations autograd saves for backward (each saved tensor once, measured with
``torch.autograd.graph.saved_tensors_hooks`` at the per-GPU batch; 2 bytes per element under
bf16 autocast, 4 without), with and without gradient checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "StageCost",
    "StageMemory",
    "stage_cost",
    "stage_memory",
    "images_in_split",
    "estimate_seconds",
    "allreduce_seconds",
    "training_workload",
    "A100_PEAK_TFLOPS",
    "GPU_PEAK_BF16_TFLOPS",
    "peak_bf16_tflops",
]

#: NVIDIA A100 datasheet, dense (no sparsity), TFLOP/s.
A100_PEAK_TFLOPS = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}
#: dense bf16 tensor-core peaks (TFLOP/s) of the GPUs a first run may meet, from NVIDIA's
#: datasheets, by a substring of ``torch.cuda.get_device_name`` (first match wins)
GPU_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A40", 150.0),
    ("A10", 125.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU named ``device_name``; None for one not in
    :data:`GPU_PEAK_BF16_TFLOPS`."""
    for key, peak in GPU_PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


#: classes of the conditional models and the judge (the digits; the class embedding's size does
#: not change the counts measurably)
_CLASSES = 10

#: train / test sizes of the data sources (``data.max_train`` / ``max_test`` cap them)
#: (nifti: NFBS's 125 volumes, 110 / 15, when data.path cannot be read yet: the plan before the download)
_SOURCE_SIZES = {"mnist5k": (4500, 500), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "nifti": (110, 15)}


@dataclass(frozen=True)
class StageCost:
    """The arithmetic of one job.

    Attributes:
        flops: total floating-point operations (multiply and add counted as 2).
        calls: sequential network calls (optimizer steps, or sampler batches times evaluations):
            what a latency floor multiplies.
        detail: how the total was made, e.g. ``"2000 steps x 15.3 GFLOP"``.
        params: trainable parameters of a training stage's network (0 otherwise): what DDP
            all-reduces every step.
    """

    flops: float
    calls: int
    detail: str
    params: int = 0


def _count(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    torch.set_grad_enabled(True)
    return float(counter.get_total_flops())


def _train_step_flops(model, make_batch, loss_of, batch: int, probe: int = 4) -> float:
    """FLOPs of one forward + backward at ``batch`` (counted at ``probe`` and scaled: linear in B)."""
    import torch

    def step():
        out = loss_of(model, *make_batch(probe))
        out.backward()

    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _count(step) * batch / probe


def _training(model, make_batch, loss_of, section: Mapping[str, Any]) -> StageCost:
    """``section['steps']`` training steps of ``model`` at ``section['batch_size']``."""
    per = _train_step_flops(model, make_batch, loss_of, int(section["batch_size"]))
    steps = int(section["steps"])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return StageCost(per * steps, steps, f"{steps} steps x {per / 1e9:.2f} GFLOP", params)


def _noisy(channels: int, size: tuple[int, int], section: Mapping[str, Any]):
    """A batch maker of diffusion training inputs: (z_t (B, C, H, W), t (B,) int64), size = (H, W)."""
    import torch

    return lambda b: (torch.randn(b, channels, *size), torch.randint(0, int(section["timesteps"]), (b,)))


def _eps_loss(model, z, t):
    return model(z, t).pow(2).mean()


def _vqvae_loss(model, x):
    import torch.nn.functional as F

    xh, out = model(x)
    return F.mse_loss(xh, x) + out.commitment_loss


def _forward_flops(fn, *args) -> float:
    import torch

    with torch.no_grad():
        return _count(lambda: fn(*args))


def images_in_split(data: Mapping[str, Any]) -> tuple[int, int]:
    """(train, test) image counts of a ``data`` section (the source's sizes, capped)."""
    from pipeline.sources import expected_count

    source = data.get("source", "mnist5k")
    train, test = _SOURCE_SIZES.get(source, (60000, 10000))
    total = 5000 if source == "mnist5k" else expected_count(data)
    if total is not None and source == "nifti":
        total *= 1 + int(data.get("volume_copies") or 0)
    if total is not None:
        from pipeline.sources import test_count

        test = test_count(data.get("test_size", "auto"), total)
        train = total - test
    if data.get("max_train"):
        train = min(train, int(data["max_train"]))
    if data.get("max_test"):
        test = min(test, int(data["max_test"]))
    return train, test


def _evals_per_step(method: str) -> int:
    return 2 if method == "heun" else 1


def _networks(stage: str, full: Mapping[str, Any], flags: Mapping[str, Any]):
    """The stage's geometry and, for a training stage, (network, batch maker, loss, section),
    built on the current default device (:func:`stage_cost` and :func:`stage_memory` run it
    under ``torch.device("meta")``)."""
    import torch
    import torch.nn.functional as F

    from pipeline.config import variant_config
    from pipeline.diffusion import pixel_size
    from pipeline.models import UNET_KINDS, build_model, model_args
    from pipeline.sources import expected_shape

    vq = full["vqvae"]
    k, d = int(vq["num_embeddings"]), int(vq["embedding_dim"])
    img = tuple(expected_shape(full["data"]))  # (C, H, W), or (1, D, H, W) for volumes
    sd = len(img) - 1
    f = int(vq.get("downsample", 4))
    grid = tuple(side // f for side in img[1:])  # the code grid (7x7 for MNIST)
    geo = {"img": img, "sd": sd, "grid": grid, "k": k, "d": d}
    net = None
    if stage == "train_vqvae":
        net = build_model("vqvae", model_args("vqvae", vq, in_channels=img[0], spatial_dims=sd))
        return geo, (net, lambda b: (torch.rand(b, *img),), _vqvae_loss, vq)
    if stage == "train_classifier":
        section = full["classifier"]
        net = build_model("classifier", model_args("classifier", section, num_classes=_CLASSES, image_shape=img))
        batch = lambda b: (torch.rand(b, *img), torch.randint(0, 10, (b,)))  # noqa: E731
        return geo, (net, batch, lambda m, x, y: F.cross_entropy(m(x), y), section)
    if stage == "train_simclr":
        from pipeline.models.encoder import nt_xent

        section = full["simclr"]
        net = build_model("simclr", model_args("simclr", section, image_shape=img))
        batch = lambda b: (torch.rand(b, *img), torch.rand(b, *img))  # noqa: E731
        return geo, (net, batch, lambda m, a, b: nt_xent(m(a), m(b)), section)
    if stage in ("train_pixelcnn", "train_diffusion"):
        prior = stage.removeprefix("train_")
        conditional = bool(flags.get("conditional"))
        section = variant_config(full, prior, conditional=conditional, budget=flags.get("budget"))[prior]
        n_cls = _CLASSES if conditional else 0
        if prior == "pixelcnn":
            net = build_model(
                "pixelcnn", model_args("pixelcnn", section, in_channels=k, num_classes=n_cls, spatial_dims=sd)
            )
            codes = lambda b: (torch.randint(0, k, (b, *grid)),)  # noqa: E731
            return geo, (net, codes, lambda m, c: F.cross_entropy(m(c), c), section)
        kind = UNET_KINDS[section.get("network", "own")]
        net = build_model(kind, model_args(kind, section, in_channels=d, num_classes=n_cls, spatial_dims=sd))
        return geo, (net, _noisy(d, grid, section), _eps_loss, section)
    if stage == "train_pixel_diffusion":
        section = dict(full["pixel_diffusion"])
        section["steps"] = int(section["steps"] or full["diffusion"]["steps"])  # null: about the latent model's
        net = build_model("unet", model_args("unet", section, in_channels=img[0]))
        return geo, (net, _noisy(img[0], pixel_size(img[1:]), section), _eps_loss, section)
    return geo, None


def training_workload(stage: str, cfg: Mapping[str, Any], **flags: Any):
    """What the FLOP counter runs for a training stage, to run it for real (``benchmarks/
    gpu_acceptance.py`` measures the same network at the same batch the plan prices):
    ``(network, make_batch(b) -> inputs, loss_of(network, *inputs) -> scalar, section)``, built
    on the current default device (``with torch.device("cuda"):``), random inputs of the stage's
    shapes.

    Raises:
        KeyError: not a training stage.
    """
    _, training = _networks(stage, _full(cfg), flags)
    if training is None:
        raise KeyError(f"{stage!r} is not a training stage")
    return training


def stage_cost(stage: str, cfg: Mapping[str, Any], *, sample_sets: list[str] | None = None, **flags: Any) -> StageCost:
    """The FLOPs of one stage job under ``cfg`` (the stage's resolved config: what its
    ``--config-json`` holds, so top-level keys plus its sections), for images and for 3D
    volumes alike (the shapes come from :func:`pipeline.sources.expected_shape`).

    Args:
        stage: a stage name of :data:`pipeline.stages.STAGES`.
        cfg: the config the stage reads; sections a stage does not read may be missing (the
            packaged defaults fill them).
        sample_sets: for ``sample``, the sets this job draws.
        flags: ``budget`` (float) and ``conditional`` (bool) of a prior variant.

    Returns:
        A :class:`StageCost` (``flops`` 0 for stages without networks: prepare_data, timings).

    Raises:
        KeyError: unknown stage; ValueError: a sample set outside the grammar.
    """
    import torch

    if stage in ("prepare_data", "timings"):
        return StageCost(0.0, 0, "no network")
    with torch.device("meta"):
        return _stage_cost(stage, _full(cfg), sample_sets, flags)


def _full(cfg: Mapping[str, Any]) -> dict:
    from pipeline.config import load_default

    full = load_default()
    for key, value in cfg.items():
        full[key] = value
    return full


def _stage_cost(stage: str, full: dict, sample_sets, flags) -> StageCost:
    import torch

    from pipeline.diffusion import pixel_size
    from pipeline.models import UNET_KINDS, build_model, model_args
    from pipeline.sets import parse_sample_set

    geo, training = _networks(stage, full, flags)
    img, sd, grid, k, d = geo["img"], geo["sd"], geo["grid"], geo["k"], geo["d"]
    vq = full["vqvae"]
    if training is not None:
        return _training(*training)

    def vqvae():
        return build_model("vqvae", model_args("vqvae", vq, in_channels=img[0], spatial_dims=sd))

    if stage == "extract_latents":
        net = vqvae()
        train, test = images_in_split(full["data"])
        n = train * (1 + int(full["latents"].get("augment_copies", 0) or 0)) + test
        per = _forward_flops(lambda x: net.encode(x), torch.rand(1, *img))
        batches = -(-n // 500)
        return StageCost(per * n, batches, f"{n} images x {per / 1e6:.1f} MFLOP (encoder)")
    if stage == "sample":
        section = full["sample"]
        sets = list(sample_sets or ["pixelcnn"])
        decoder = vqvae()
        dec = _forward_flops(lambda c: decoder.decode_codes(c), torch.randint(0, k, (1, *grid)))
        total, calls, parts = 0.0, 0, []
        for name in sets:
            spec = parse_sample_set(name)
            n = int(section["num_samples"])
            guided = 2 if (spec.conditional or spec.autoguidance is not None) else 1
            n_cls = _CLASSES if spec.conditional else 0
            if spec.prior == "pixelcnn":
                sec_p = full["pixelcnn"]
                args = model_args("pixelcnn", sec_p, in_channels=k, num_classes=n_cls, spatial_dims=sd)
                net = build_model("pixelcnn", args)
                full_fwd = _forward_flops(lambda c, net=net: net(c), torch.randint(0, k, (1, *grid)))
                # raster sampling cropped to the first rows (planes): position (r, ...) runs rows 0..r
                per_row = math.prod(grid[1:])
                evals = sum(per_row * (r + 1) / grid[0] for r in range(grid[0]))
                per_sample = full_fwd * evals * guided + dec
                seq = math.prod(grid)
            else:
                pixel = spec.prior == "pixeldiff"
                sec_d = full["pixel_diffusion" if pixel else "diffusion"]
                shape = (1, img[0], *pixel_size(img[1:])) if pixel else (1, d, *grid)
                kind = "unet" if pixel else UNET_KINDS[sec_d.get("network", "own")]
                args = model_args(kind, sec_d, in_channels=shape[1], num_classes=n_cls, spatial_dims=sd)
                net = build_model(kind, args)
                fwd = _forward_flops(lambda z, net=net: net(z, torch.zeros(1, dtype=torch.long)), torch.randn(shape))
                if spec.method == "ddpm":
                    steps = int(sec_d["timesteps"])
                    if section.get("ddpm_num_samples"):
                        n = int(section["ddpm_num_samples"])
                else:
                    default = section["ddim_steps"] if spec.method == "ddim" else section["solver_steps"]
                    steps = int(spec.steps if spec.steps is not None else default)
                evals = steps * _evals_per_step(spec.method)
                per_sample = fwd * evals * guided + (0 if pixel else dec)
                seq = evals
            batches = -(-n // int(section["batch_size"]))
            total += per_sample * n
            calls += batches * seq * guided
            parts.append(f"{name} {n} x {per_sample / 1e9:.2f} GFLOP")
        return StageCost(total, calls, "; ".join(parts))
    if stage == "evaluate":
        sets = len(full["sample"]["sets"]) + 4  # the sample sets and the reference rows
        n = int(full["sample"]["num_samples"]) * sets + sum(images_in_split(full["data"]))
        per, names = 0.0, []
        from pipeline.sources import judges

        for judge in judges(full):
            kind, section = ("classifier", full["classifier"]) if judge == "classifier" else ("simclr", full["simclr"])
            extra = {"num_classes": _CLASSES} if kind == "classifier" else {}
            net = build_model(kind, model_args(kind, section, image_shape=img, **extra)).eval()
            fn = net if kind == "classifier" else net.features
            per += _forward_flops(lambda x, fn=fn: fn(x), torch.rand(1, *img))
            names.append(kind)
        return StageCost(per * n, -(-n // 500), f"{n} images x {per / 1e6:.1f} MFLOP ({' + '.join(names)})")
    raise KeyError(f"unknown stage {stage!r}")


@dataclass(frozen=True)
class StageMemory:
    """GPU memory of one training stage, per GPU, in GiB (2**30 bytes).

    Attributes:
        params: parameter count.
        states: weights + gradients + Adam's two moments (fp32: 16 bytes a parameter), plus 4
            for the EMA copy and 4 for the autoguidance snapshot when the stage keeps them.
        activations: what autograd saves for backward at the per-GPU batch, without checkpointing.
        activations_checkpointed: the same with the model's gradient checkpointing on: the
            saved tensors outside its regions, every region's inputs, and the largest region's
            own activations (recomputed one region at a time in backward).
        batch_per_gpu: the batch the activations are measured at.
        checkpointing: whether the stage's config turns checkpointing on.
    """

    params: int
    states: float
    activations: float
    activations_checkpointed: float | None
    batch_per_gpu: int
    checkpointing: bool

    def total_with(self, checkpointing: bool) -> float:
        """GiB the stage needs with checkpointing on or off (states + the activations it keeps;
        the plain activations where the network has no checkpointing)."""
        ckpt = self.activations_checkpointed
        return self.states + (ckpt if checkpointing and ckpt else self.activations)

    @property
    def total(self) -> float:
        """GiB the stage needs as configured."""
        return self.total_with(self.checkpointing)


def stage_memory(stage: str, cfg: Mapping[str, Any], gpus: int = 1, **flags: Any) -> StageMemory | None:
    """The GPU memory of a training stage at its configured shapes and batch (``batch_size``
    split over ``gpus`` DDP ranks), measured on the meta device; None for stages without
    training (their memory is one forward at a time: small next to training's).

    Activations are every tensor autograd saves for backward (counted once, parameters
    excluded: they are in ``states``), at 2 bytes an element under ``cfg["bf16"]`` and 4
    without (4 for the judges, which train in float32); it leaves out the allocator's slack,
    cuDNN workspaces and the CUDA context (about 0.5 to 1 GiB), which is why the plan warns at
    90 % of the GPU's memory. With checkpointing, region inputs are saved and each region is
    recomputed alone (Chen et al. 2016): saved_outside + sum(inputs) + max(region activations).

    Raises:
        KeyError: unknown stage (via :func:`stage_cost`'s stage names).
    """
    import torch

    if not stage.startswith("train_"):
        return None
    with torch.device("meta"):
        full = _full(cfg)
        _, training = _networks(stage, full, flags)
        if training is None:
            raise KeyError(f"unknown stage {stage!r}")
        net, make_batch, loss_of, section = training
        per_gpu = max(1, -(-int(section["batch_size"]) // max(1, gpus)))
        # the judges train in float32 whatever bf16 says (pipeline.precision)
        bytes_per = 2 if full.get("bf16") and stage not in ("train_classifier", "train_simclr") else 4
        params = sum(p.numel() for p in net.parameters())
        # an EMA copy of the weights (not the VQ-VAE: its ema_decay is the codebook's) and the
        # autoguidance snapshot, when the stage keeps them: 4 bytes a parameter each
        ema = 4 * (bool(section.get("ema_decay")) and stage != "train_vqvae") + 4 * bool(section.get("guide_fraction"))
        regions = net.checkpoint_regions() if hasattr(net, "checkpoint_regions") else []
        saved, inside, inputs = _saved_elements(net, make_batch(per_gpu), loss_of, regions)
    gib = 2.0**30
    ckpt = None
    if regions:
        ckpt = (saved - sum(inside) + sum(inputs) + max(inside)) * bytes_per / gib
    return StageMemory(
        params=params,
        states=params * (16 + ema) / gib,
        activations=saved * bytes_per / gib,
        activations_checkpointed=ckpt,
        batch_per_gpu=per_gpu,
        checkpointing=bool(section.get("gradient_checkpointing")),
    )


def _saved_elements(net, batch, loss_of, regions) -> tuple[int, list[int], list[int]]:
    """(elements saved for backward in all, per region: saved inside it, its input elements)."""
    import torch

    params = {id(p) for p in net.parameters()}
    seen: set[int] = set()
    keep: list = []  # the tensors stay alive, so no id is reused during the pass
    total = [0]

    def pack(t):
        if id(t) not in seen and id(t) not in params:
            seen.add(id(t))
            keep.append(t)
            total[0] += t.numel()
        return t

    inside = [0] * len(regions)
    inputs = [0] * len(regions)
    start = [0] * len(regions)
    handles = []
    for i, (first, last) in enumerate(regions):

        def pre(module, args, i=i):
            start[i] = total[0]
            inputs[i] = sum(a.numel() for a in args if isinstance(a, torch.Tensor))

        def post(module, args, out, i=i):
            inside[i] = total[0] - start[i]

        handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]
    net.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of(net, *batch)
    finally:
        for h in handles:
            h.remove()
    return total[0], inside, inputs


def allreduce_seconds(params: int, ranks: int, nodes: int, internode_gbps: float) -> float:
    """Seconds one DDP step spends all-reducing ``params`` float32 gradients over ``ranks``
    ranks on ``nodes`` nodes: a ring all-reduce moves ``2 (n - 1) / n`` times the gradient bytes
    through each rank's link (Patarasuk & Yuan 2009), and across nodes the link is the node's
    network at ``internode_gbps`` Gbit/s shared by its ranks (inside one node NVLink's ~300 GB/s
    makes it negligible: 0 is returned for one node). Assumes no overlap with the backward pass
    (DDP's bucketing overlaps some: an upper bound)."""
    if nodes <= 1 or ranks <= 1:
        return 0.0
    per_rank = 2.0 * (ranks - 1) / ranks * 4.0 * params
    ranks_per_node = max(1, ranks // nodes)
    return per_rank * ranks_per_node / (internode_gbps * 1e9 / 8.0)


def estimate_seconds(
    cost: StageCost,
    tflops: float,
    step_ms: float,
    startup_s: float = 60.0,
    ranks: int = 1,
    nodes: int = 1,
    internode_gbps: float = 100.0,
) -> float:
    """Wall seconds of a job: ``startup_s`` (Python, CUDA context, data) plus ``max(flops /
    (tflops * 1e12), calls * step_ms / 1000)`` plus, across nodes, ``calls`` times the gradient
    all-reduce (:func:`allreduce_seconds`). ``tflops`` is the whole job's (all its GPUs)."""
    comm = cost.calls * allreduce_seconds(cost.params, ranks, nodes, internode_gbps) if cost.params else 0.0
    return startup_s + max(cost.flops / (tflops * 1e12), cost.calls * step_ms / 1000.0) + comm
