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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["StageCost", "stage_cost", "images_in_split", "estimate_seconds", "A100_PEAK_TFLOPS"]

#: NVIDIA A100 datasheet, dense (no sparsity), TFLOP/s.
A100_PEAK_TFLOPS = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}

#: classes of the conditional models and the judge (the digits; the class embedding's size does
#: not change the counts measurably)
_CLASSES = 10

#: train / test sizes of the data sources (``data.max_train`` / ``max_test`` cap them)
_SOURCE_SIZES = {"mnist5k": (4500, 500), "mnist": (60000, 10000), "fashion_mnist": (60000, 10000)}


@dataclass(frozen=True)
class StageCost:
    """The arithmetic of one job.

    Attributes:
        flops: total floating-point operations (multiply and add counted as 2).
        calls: sequential network calls (optimizer steps, or sampler batches times evaluations):
            what a latency floor multiplies.
        detail: how the total was made, e.g. ``"2000 steps x 15.3 GFLOP"``.
    """

    flops: float
    calls: int
    detail: str


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
    return StageCost(per * steps, steps, f"{steps} steps x {per / 1e9:.2f} GFLOP")


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
    if total is not None:
        ts = data.get("test_size", 500)
        test = int(round(ts * total)) if isinstance(ts, float) and ts < 1 else int(ts)
        train = total - test
    if data.get("max_train"):
        train = min(train, int(data["max_train"]))
    if data.get("max_test"):
        test = min(test, int(data["max_test"]))
    return train, test


def _evals_per_step(method: str) -> int:
    return 2 if method == "heun" else 1


def stage_cost(stage: str, cfg: Mapping[str, Any], *, sample_sets: list[str] | None = None, **flags: Any) -> StageCost:
    """The FLOPs of one stage job under ``cfg`` (the stage's resolved config: what its
    ``--config-json`` holds, so top-level keys plus its sections).

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
    import torch.nn.functional as F

    from pipeline.config import load_default, variant_config
    from pipeline.models import build_model, model_args
    from pipeline.sets import parse_sample_set

    full = load_default()
    for key, value in cfg.items():
        full[key] = value
    from pipeline.diffusion import pixel_size
    from pipeline.sources import expected_shape

    if stage in ("prepare_data", "timings"):
        return StageCost(0.0, 0, "no network")
    if full["data"]["source"] == "nifti":  # the 3D networks are not in this version yet (issue #14)
        return StageCost(0.0, 0, "3D volumes: not priced in this version")
    vq = full["vqvae"]
    k, d = int(vq["num_embeddings"]), int(vq["embedding_dim"])
    img = expected_shape(full["data"])  # (C, H, W): (1, 28, 28) for MNIST
    f = int(vq.get("downsample", 4))
    gh, gw = img[1] // f, img[2] // f  # the code grid (7x7 for MNIST)
    ph, pw = pixel_size(img[1:])

    def vqvae():
        return build_model("vqvae", model_args("vqvae", vq, in_channels=img[0]))

    if stage == "train_vqvae":
        net = vqvae()
        return _training(net, lambda b: (torch.rand(b, *img),), _vqvae_loss, vq)
    if stage == "extract_latents":
        net = vqvae()
        train, test = images_in_split(full["data"])
        n = train * (1 + int(full["latents"].get("augment_copies", 0) or 0)) + test
        per = _forward_flops(lambda x: net.encode(x), torch.rand(1, *img))
        batches = -(-n // 500)
        return StageCost(per * n, batches, f"{n} images x {per / 1e6:.1f} MFLOP (encoder)")
    if stage == "train_classifier":
        sec = full["classifier"]
        net = build_model("classifier", model_args("classifier", sec, num_classes=_CLASSES, image_shape=img))
        return _training(
            net,
            lambda b: (torch.rand(b, *img), torch.randint(0, 10, (b,))),
            lambda m, x, y: F.cross_entropy(m(x), y),
            sec,
        )
    if stage == "train_encoder":
        from pipeline.models.encoder import nt_xent

        sec = full["encoder"]
        net = build_model("encoder", model_args("encoder", sec, image_shape=img))
        return _training(
            net, lambda b: (torch.rand(b, *img), torch.rand(b, *img)), lambda m, a, b: nt_xent(m(a), m(b)), sec
        )
    if stage in ("train_pixelcnn", "train_diffusion"):
        prior = stage.removeprefix("train_")
        conditional = bool(flags.get("conditional"))
        sec = variant_config(full, prior, conditional=conditional, budget=flags.get("budget"))[prior]
        n_cls = _CLASSES if conditional else 0
        if prior == "pixelcnn":
            net = build_model("pixelcnn", model_args("pixelcnn", sec, in_channels=k, num_classes=n_cls))
            codes = lambda b: (torch.randint(0, k, (b, gh, gw)),)  # noqa: E731
            return _training(net, codes, lambda m, c: F.cross_entropy(m(c), c), sec)
        net = build_model("unet", model_args("unet", sec, in_channels=d, num_classes=n_cls))
        return _training(net, _noisy(d, (gh, gw), sec), _eps_loss, sec)
    if stage == "train_pixel_diffusion":
        sec = dict(full["pixel_diffusion"])
        sec["steps"] = int(sec["steps"] or full["diffusion"]["steps"])  # null: about the latent model's
        net = build_model("unet", model_args("unet", sec, in_channels=img[0]))
        return _training(net, _noisy(img[0], (ph, pw), sec), _eps_loss, sec)
    if stage == "sample":
        sec = full["sample"]
        sets = list(sample_sets or ["pixelcnn"])
        decoder = vqvae()
        dec = _forward_flops(lambda c: decoder.decode_codes(c), torch.randint(0, k, (1, gh, gw)))
        total, calls, parts = 0.0, 0, []
        for name in sets:
            spec = parse_sample_set(name)
            n = int(sec["num_samples"])
            guided = 2 if (spec.conditional or spec.autoguidance is not None) else 1
            n_cls = _CLASSES if spec.conditional else 0
            if spec.prior == "pixelcnn":
                sec_p = full["pixelcnn"]
                net = build_model("pixelcnn", model_args("pixelcnn", sec_p, in_channels=k, num_classes=n_cls))
                full_fwd = _forward_flops(lambda c, net=net: net(c), torch.randint(0, k, (1, gh, gw)))
                # row-cropped raster sampling: position (r, c) runs the net on rows 0..r
                evals = sum(gw * (r + 1) / gh for r in range(gh))
                per_sample = full_fwd * evals * guided + dec
                seq = gh * gw
            else:
                pixel = spec.prior == "pixeldiff"
                sec_d = full["pixel_diffusion" if pixel else "diffusion"]
                shape = (1, img[0], ph, pw) if pixel else (1, d, gh, gw)
                net = build_model("unet", model_args("unet", sec_d, in_channels=shape[1], num_classes=n_cls))
                fwd = _forward_flops(lambda z, net=net: net(z, torch.zeros(1, dtype=torch.long)), torch.randn(shape))
                if spec.method == "ddpm":
                    steps = int(sec_d["timesteps"])
                    if sec.get("ddpm_num_samples"):
                        n = int(sec["ddpm_num_samples"])
                else:
                    default = sec["ddim_steps"] if spec.method == "ddim" else sec["solver_steps"]
                    steps = int(spec.steps if spec.steps is not None else default)
                evals = steps * _evals_per_step(spec.method)
                per_sample = fwd * evals * guided + (0 if pixel else dec)
                seq = evals
            batches = -(-n // int(sec["batch_size"]))
            total += per_sample * n
            calls += batches * seq * guided
            parts.append(f"{name} {n} x {per_sample / 1e9:.2f} GFLOP")
        return StageCost(total, calls, "; ".join(parts))
    if stage == "evaluate":
        sec = full["classifier"]
        net = build_model("classifier", model_args("classifier", sec, num_classes=_CLASSES, image_shape=img)).eval()
        per = _forward_flops(lambda x: net(x), torch.rand(1, *img))
        sets = len(full["sample"]["models"]) + 4  # the sample sets and the reference rows
        n = int(full["sample"]["num_samples"]) * sets + sum(images_in_split(full["data"]))
        return StageCost(per * n, -(-n // 500), f"{n} images x {per / 1e6:.1f} MFLOP (classifier)")
    raise KeyError(f"unknown stage {stage!r}")


def estimate_seconds(cost: StageCost, tflops: float, step_ms: float, startup_s: float = 60.0) -> float:
    """Wall seconds of a job: ``startup_s`` (Python, CUDA context, data) plus
    ``max(flops / (tflops * 1e12), calls * step_ms / 1000)``."""
    return startup_s + max(cost.flops / (tflops * 1e12), cost.calls * step_ms / 1000.0)
