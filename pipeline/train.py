"""The training stages: VQ-VAE, classifier (the judge), PixelCNN prior, latent diffusion and the
pixel-space diffusion baseline, each ``fn(cfg, run_dir, threads=None, ...)`` (``pipeline.stages``).

Each stage reads its inputs, builds its model through ``pipeline.models.build_model`` from
``model_args`` (the constructor kwargs, stored in ``model.pt`` as ``args``), trains it with
:class:`pipeline.training.TrainLoop` (step-counted, EMA, DDP, exact resume from
``<stage>/checkpoint.pt``), measures it and writes ``model.pt``, ``metrics.json`` and
``train_log.csv``; :func:`pipeline.checkpoint.load_model` rebuilds the model from the file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoint as ckpt_io
from pipeline.augment import gaussian_blur, random_affine
from pipeline.diffusion import images_to_pixel_space
from pipeline.io import RunPaths, StageInputError, save_grid_png, sha256_file
from pipeline.models import build_model
from pipeline.models import model_args as build_args
from pipeline.runtime import (
    autocast,
    dist_info,
    log,
    resolve_device,
    seed_everything,
    stage_record,
)
from pipeline.training import drop_labels, finish_training, snapshot_step, train_loop

__all__ = [
    "train_vqvae",
    "train_pixelcnn",
    "train_diffusion",
    "train_classifier",
    "train_encoder",
    "contrastive_views",
    "train_pixel_diffusion",
    "evaluate_vqvae",
]


# --- stage 2: VQ-VAE --------------------------------------------------------------------------
@torch.no_grad()
def evaluate_vqvae(model, images: torch.Tensor, batch_size: int = 1000) -> dict:
    """Reconstruction MSE on [0, 1] pixels, codebook perplexity and codes in use over ``images``.

    Args:
        images: float (N, C, H, W) (or (N, C, D, H, W) volumes) in [0, 1] on the model's device;
            batches of at most ``batch_size`` and about 4M voxels.

    Returns:
        {"recon_mse": float, "perplexity": float (exp of the code-histogram entropy, in
        [1, K]), "codes_in_use": int}.
    """
    model.eval()
    k = model.num_embeddings
    counts = torch.zeros(k, dtype=torch.float64, device=images.device)
    se = 0.0
    batch_size = min(batch_size, max(1, 2**22 // max(1, images[0].numel())))
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        xh, vq = model(x)
        se += float(F.mse_loss(xh.float(), x, reduction="sum"))
        counts += torch.bincount(vq.codes.flatten(), minlength=k).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(torch.special.entr(p).sum()))  # entr(0) = 0 exactly
    return {"recon_mse": se / images.numel(), "perplexity": perplexity, "codes_in_use": int((counts > 0).sum())}


def _images(paths: RunPaths, split: str, device) -> tuple[torch.Tensor, np.ndarray]:
    from pipeline.data import read_dataset

    data = read_dataset(paths.dataset, split)
    return data.unit().to(device), data.labels


def _write_volume_reconstructions(model, test_x: torch.Tensor, affines, out, metrics: dict) -> None:
    """3D: SSIM/PSNR of the test reconstructions, their three-plane grid (each input beside its
    reconstruction) and the first two as NIfTI (input and reconstruction, each volume's affine
    from ``affines`` (N, 4, 4), or the identity when None)."""
    from pipeline.volumes import reconstruction_quality, save_three_plane_grid, write_nifti

    model.eval()
    with torch.no_grad():
        recons = torch.cat([model(test_x[i : i + 1])[0].float() for i in range(len(test_x))])
    x, xh = test_x.float().cpu().numpy(), recons.cpu().numpy()
    metrics.update(reconstruction_quality(x, xh))
    n = min(4, len(x))
    pairs = np.stack([v for i in range(n) for v in (x[i], xh[i])])
    save_three_plane_grid(out / "reconstructions.png", pairs, nrow=2, scale=3)
    for i in range(min(2, len(x))):
        aff = affines[i] if affines is not None else np.eye(4)
        write_nifti(out / "reconstructions" / f"test_{i:03d}_input.nii.gz", x[i], aff)
        write_nifti(out / "reconstructions" / f"test_{i:03d}_reconstruction.nii.gz", xh[i], aff)


def train_vqvae(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 2: train the VQ-VAE on ``dataset.h5``'s train split; write ``vqvae/model.pt``,
    ``metrics.json`` (test recon MSE, perplexity, codes in use), ``reconstructions.png``
    (test originals above their reconstructions) and ``train_log.csv``."""
    paths = RunPaths(run_dir)
    sec = cfg["vqvae"]
    out = paths.vqvae_model.parent
    with stage_record("train_vqvae", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        from pipeline.data import check_divisible, read_dataset

        train_x, _ = _images(paths, "train", device)
        test = read_dataset(paths.dataset, "test")  # its affines too, for the volumes' NIfTI reconstructions
        test_x = test.unit().to(device)

        spatial_dims = train_x.ndim - 2  # 3 for NIfTI volumes (N, 1, D, H, W)
        check_divisible(train_x.shape[2:], cfg, str(paths.dataset))
        model_args = build_args("vqvae", sec, in_channels=int(train_x.shape[1]), spatial_dims=spatial_dims)
        seed_everything(int(sec["seed"]))
        model = build_model("vqvae", model_args).to(device)
        model.enable_gradient_checkpointing(bool(sec["gradient_checkpointing"]))  # memory for compute: docs/volumes.md

        def compute_loss(net, idx, shard):
            x = shard(train_x[idx])
            xh, vq = net(x)
            recon = F.mse_loss(xh.float(), x)
            return recon + vq.commitment_loss, {
                "recon_mse": recon.detach(),
                "commitment": vq.commitment_loss.detach(),
                "perplexity": vq.perplexity,
            }

        res = train_loop(
            stage="train_vqvae",
            model=model,
            kind="vqvae",
            model_args=model_args,
            section=sec,
            compute_loss=compute_loss,
            n_data=len(train_x),
            out_dir=out,
            device=device,
            bf16=cfg["bf16"],
        )
        test_m = evaluate_vqvae(model, test_x)
        train_m = evaluate_vqvae(model, train_x)
        metrics.update(
            test_recon_mse=test_m["recon_mse"],
            test_perplexity=test_m["perplexity"],
            test_codes_in_use=test_m["codes_in_use"],
            train_recon_mse=train_m["recon_mse"],
            train_codes_in_use=train_m["codes_in_use"],
            num_embeddings=sec["num_embeddings"],
            codebook_restarts=int(model.quantizer.restarts),
            steps=sec["steps"],
            train_seconds=round(res.elapsed_s, 2),
        )
        if spatial_dims == 3:
            if dist_info()[0] == 0:
                _write_volume_reconstructions(model, test_x, test.extra.get("affines"), out, metrics)
        else:
            with torch.no_grad():
                originals = test_x[:20]
                recons = model(originals)[0].float()
            grid = torch.cat([originals[:10], recons[:10], originals[10:20], recons[10:20]]).cpu().numpy()
            if dist_info()[0] == 0:
                save_grid_png(out / "reconstructions.png", grid, nrow=10, scale=3)
        finish_training(paths.vqvae_model, "vqvae", model_args, model, res, metrics)
        log.info(
            "train_vqvae: test MSE %.5f, perplexity %.1f, %d/%d codes in use",
            test_m["recon_mse"],
            test_m["perplexity"],
            test_m["codes_in_use"],
            sec["num_embeddings"],
        )
    return metrics


def _read_latents(paths: RunPaths, augmented: bool = False):
    """Both splits of ``latents.h5``, refusing a file made from another ``vqvae/model.pt``.

    Args:
        augmented: append the ``train_aug`` rows (codes of augmented train images) to the train split.

    Returns:
        (SHA-256 of vqvae/model.pt, train LatentSplit, test LatentSplit, LatentsInfo).

    Raises:
        pipeline.latents.LatentsError: see ``read_split``; ``augmented`` with a file that has no
            augmented copies.
    """
    from pipeline.latents import AUG_SPLIT, LatentSplit, read_split

    vq_sha = sha256_file(paths.vqvae_model)
    train, info = read_split(paths.latents, "train", expect_vqvae_sha256=vq_sha)
    test, _ = read_split(paths.latents, "test", expect_vqvae_sha256=vq_sha)
    if augmented:
        aug, _ = read_split(paths.latents, AUG_SPLIT, expect_vqvae_sha256=vq_sha)
        train = LatentSplit(
            *(np.concatenate([getattr(train, f), getattr(aug, f)]) for f in ("codes", "latents", "encodings", "labels"))
        )
    return vq_sha, train, test, info


# --- stage 4: PixelCNN prior --------------------------------------------------------------------
def train_pixelcnn(
    cfg: Mapping,
    run_dir: str | os.PathLike,
    threads: int | None = None,
    budget: float | None = None,
    conditional: bool = False,
) -> dict:
    """Stage 4: train the gated PixelCNN on the train codes of ``latents.h5``; write
    ``<folder>/model.pt``, ``metrics.json`` (test NLL in nats and bits per code; for the
    conditional variant also the class-conditional NLL) and ``train_log.csv``.

    Args:
        budget: train for this factor times ``steps`` (the quality-vs-compute study), into
            ``pixelcnn[_cond]_b<f>/``.
        conditional: the class-conditional variant ``pixelcnn_cond/``: p(c | y) with a null label
            10 substituted with probability ``label_dropout`` (so classifier-free guidance can mix
            the two), ``conditional_steps`` steps; ``test_nll_*`` is then the NLL under the null
            label and ``test_nll_conditional_*`` under the true label. Without it the prior is
            unconditional and never sees a label (the study's subject).
    """
    from pipeline.config import variant_config
    from pipeline.sets import prior_folder

    paths = RunPaths(run_dir)
    cfg = variant_config(cfg, "pixelcnn", conditional=conditional, budget=budget)
    sec = cfg["pixelcnn"]
    out = paths.root / prior_folder("pixelcnn", budget, conditional)
    with stage_record("train_pixelcnn", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vq_sha, train, test, info = _read_latents(paths, augmented=bool(sec.get("augmented", False)))
        train_c = torch.from_numpy(train.codes.astype(np.int64)).to(device)
        test_c = torch.from_numpy(test.codes.astype(np.int64)).to(device)
        train_y, test_y = torch.from_numpy(train.labels).to(device), torch.from_numpy(test.labels).to(device)
        n_cls = info.num_classes if conditional else 0  # from the dataset's labels; label n_cls is the null label
        if conditional and not n_cls:
            raise StageInputError(f"{paths.latents}: the data has no labels; a class-conditional prior needs them")
        model_args = build_args(
            "pixelcnn", sec, in_channels=info.num_embeddings, num_classes=n_cls, spatial_dims=len(info.grid)
        )
        p_drop = float(sec.get("label_dropout", 0.0))
        seed_everything(int(sec["seed"]))
        model = build_model("pixelcnn", model_args).to(device)
        model.enable_gradient_checkpointing(bool(sec["gradient_checkpointing"]))  # memory for compute: docs/volumes.md

        def compute_loss(net, idx, shard):
            c = shard(train_c[idx])
            if not n_cls:
                return F.cross_entropy(net(c).float(), c), {}
            y = shard(drop_labels(train_y[idx], p_drop, n_cls))
            return F.cross_entropy(net(c, y).float(), c), {}

        res = train_loop(
            stage="train_pixelcnn",
            model=model,
            kind="pixelcnn",
            model_args=model_args,
            section=sec,
            compute_loss=compute_loss,
            n_data=len(train_c),
            out_dir=out,
            device=device,
            bf16=cfg["bf16"],
            ema_decay=float(sec["ema_decay"]) if sec.get("ema_decay") else None,
            snapshot_step=snapshot_step(sec),
        )

        judged = res.ema.module if res.ema is not None else model  # the weights that are sampled

        @torch.no_grad()
        def nll(labels: torch.Tensor | None) -> float:
            judged.eval()
            total = 0.0
            for s in range(0, len(test_c), 500):
                y = None if labels is None else labels[s : s + 500]
                total += float(
                    F.cross_entropy(judged(test_c[s : s + 500], y).float(), test_c[s : s + 500], reduction="sum")
                )
            return total / test_c.numel()

        uncond = nll(None)
        metrics.update(test_nll_nats_per_code=uncond, test_nll_bits_per_code=uncond / math.log(2))
        if n_cls:
            cond = nll(test_y)
            metrics.update(
                test_nll_conditional_nats_per_code=cond, test_nll_conditional_bits_per_code=cond / math.log(2)
            )
        metrics.update(
            conditional=bool(n_cls),
            train_final_loss=res.final_loss,
            steps=sec["steps"],
            num_train_grids=len(train_c),
            train_seconds=round(res.elapsed_s, 2),
            vqvae_sha256=vq_sha,
        )
        metrics["budget"] = 1.0 if budget is None else float(budget)
        metrics["guide_step"] = snapshot_step(sec)
        finish_training(
            out / "model.pt", "pixelcnn", model_args, model, res, metrics, vqvae_sha256=vq_sha, grid=list(info.grid)
        )
        log.info(
            f"{out.name}: test NLL %.4f nats/code (%.4f bits/code)%s",
            uncond,
            uncond / math.log(2),
            f", conditional {metrics['test_nll_conditional_nats_per_code']:.4f}" if n_cls else "",
        )
    return metrics


# --- stage 5: latent diffusion ------------------------------------------------------------------
@torch.no_grad()
def _test_loss(
    diffusion, net, x: torch.Tensor, seed: int, labels: torch.Tensor | None = None, chunk: int = 500
) -> float:
    """Mean unweighted epsilon-MSE (DDPM eq. 14) of ``net`` over test data x (N, ...), whatever its
    parametrisation (:meth:`GaussianDiffusion.eps_mse`), with t and noise drawn from a generator
    seeded with ``seed`` (the same draws for every network compared)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    total = 0.0
    for s in range(0, len(x), chunk):
        z = x[s : s + chunk]
        t = torch.randint(0, diffusion.num_timesteps, (len(z),), device=x.device, generator=g)
        noise = torch.randn(z.shape, device=x.device, generator=g)
        total += float(
            diffusion.eps_mse(net, z, t, noise, labels=None if labels is None else labels[s : s + chunk]).sum()
        )
    return total / len(x)


def _train_denoiser(
    stage: str,
    model: torch.nn.Module,
    model_args: Mapping,
    sec: Mapping,
    diffusion,
    x: torch.Tensor,
    out,
    device: torch.device,
    bf16: bool,
    labels: torch.Tensor | None = None,
    p_drop: float = 0.0,
    n_cls: int = 0,
    snapshot: int | None = None,
    kind: str = "unet",
):
    """Train the U-Net ``model`` (factory kind ``kind``) as a denoiser of ``x`` float (N, C, H, W)
    (the scaled latents or the pixel-space images) under ``diffusion``'s objective (DDPM eq. 14 with the configured
    prediction and weighting): per step t ~ U{0..T-1} and noise ~ N(0, I) are drawn for the
    global batch and sharded; with ``n_cls``, labels int (N,) are dropped to the null label with
    probability ``p_drop`` (classifier-free guidance training). Returns the
    :class:`pipeline.training.TrainResult` of :func:`pipeline.training.train_loop`."""
    T = diffusion.num_timesteps

    def compute_loss(net, idx, shard):
        t = torch.randint(0, T, (len(idx),), device=device)
        noise = torch.randn((len(idx), *x.shape[1:]), device=device)
        y = shard(drop_labels(labels[idx], p_drop, n_cls)) if n_cls else None
        return diffusion.training_losses(net, shard(x[idx]), shard(t), shard(noise), labels=y).mean(), {}

    return train_loop(
        stage=stage,
        model=model,
        kind=kind,
        model_args=model_args,
        section=sec,
        compute_loss=compute_loss,
        n_data=len(x),
        out_dir=out,
        device=device,
        bf16=bf16,
        ema_decay=float(sec["ema_decay"]),
        snapshot_step=snapshot,
    )


def _make_diffusion(sec: Mapping):
    """The ``GaussianDiffusion`` of a diffusion config section (schedule, timesteps, prediction,
    loss_weighting, min_snr_gamma)."""
    from pipeline.diffusion import GaussianDiffusion

    return GaussianDiffusion(
        sec["schedule"],
        int(sec["timesteps"]),
        prediction=sec.get("prediction", "epsilon"),
        loss_weighting=sec.get("loss_weighting", "none"),
        min_snr_gamma=float(sec.get("min_snr_gamma", 5.0)),
    )


def train_diffusion(
    cfg: Mapping,
    run_dir: str | os.PathLike,
    threads: int | None = None,
    budget: float | None = None,
    conditional: bool = False,
) -> dict:
    """Stage 5: train a latent diffusion model (``prediction`` and ``loss_weighting`` of the
    config: epsilon/v/x0, min-SNR) on the train latents scaled to unit variance per channel;
    write ``<folder>/model.pt`` (raw and EMA weights, the autoguidance snapshot, the schedule and
    the scaling), ``metrics.json`` (final train loss, test epsilon-MSE of the EMA and raw weights)
    and ``train_log.csv``.

    Args:
        budget: train for this factor times ``steps``, into ``diffusion[_cond]_b<f>/``.
        conditional: the class-conditional variant ``diffusion_cond/``: the U-Net takes labels,
            null label 10 with probability ``label_dropout`` (classifier-free guidance training,
            Ho & Salimans 2022), ``conditional_steps`` steps; its test losses are those of the
            null label, and ``test_loss_conditional_ema`` that of the true labels. Without it the
            model is unconditional and never sees a label (the study's subject).
    """
    from pipeline.config import variant_config
    from pipeline.sets import prior_folder

    paths = RunPaths(run_dir)
    cfg = variant_config(cfg, "diffusion", conditional=conditional, budget=budget)
    sec = cfg["diffusion"]
    out = paths.root / prior_folder("diffusion", budget, conditional)
    with stage_record("train_diffusion", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vq_sha, train, test, info = _read_latents(paths, augmented=bool(sec.get("augmented", False)))
        kind = "encodings" if sec.get("latent", "quantized") == "encoder" else "latents"
        mean_np, std_np = info.scaling(kind)
        per_channel = (1, -1, *([1] * len(info.grid)))  # (1, D, 1, 1) or (1, D, 1, 1, 1) for volumes
        mean = torch.tensor(mean_np, dtype=torch.float32, device=device).view(per_channel)
        std = torch.tensor(std_np, dtype=torch.float32, device=device).view(per_channel)
        train_z = (torch.from_numpy(getattr(train, kind)).to(device) - mean) / std
        test_z = (torch.from_numpy(getattr(test, kind)).to(device) - mean) / std
        n_cls = info.num_classes if conditional else 0  # from the dataset's labels; label n_cls is the null label
        if conditional and not n_cls:
            raise StageInputError(f"{paths.latents}: the data has no labels; a class-conditional prior needs them")
        from pipeline.models import UNET_KINDS

        unet_kind = UNET_KINDS[sec.get("network", "own")]  # the project's U-Net or MONAI's
        model_args = build_args(
            unet_kind, sec, in_channels=info.embedding_dim, num_classes=n_cls, spatial_dims=len(info.grid)
        )
        train_y, test_y = torch.from_numpy(train.labels).to(device), torch.from_numpy(test.labels).to(device)
        p_drop = float(sec.get("label_dropout", 0.0))
        seed_everything(int(sec["seed"]))
        model = build_model(unet_kind, model_args).to(device)
        model.enable_gradient_checkpointing(bool(sec["gradient_checkpointing"]))  # memory for compute: docs/volumes.md
        diffusion = _make_diffusion(sec).to(device)
        T = diffusion.num_timesteps
        res = _train_denoiser(
            "train_diffusion",
            model,
            model_args,
            sec,
            diffusion,
            train_z,
            out,
            device,
            cfg["bf16"],
            labels=train_y,
            p_drop=p_drop,
            n_cls=n_cls,
            snapshot=snapshot_step(sec),
            kind=unet_kind,
        )
        ema = res.ema
        seed = int(sec["seed"]) + 1
        losses = {
            "ema": _test_loss(diffusion, ema.module, test_z, seed),
            "raw": _test_loss(diffusion, model, test_z, seed),
        }
        if n_cls:
            losses["conditional_ema"] = _test_loss(diffusion, ema.module, test_z, seed, test_y)
        metrics.update(
            final_train_loss=res.final_loss,
            test_loss_ema=losses["ema"],
            test_loss_raw=losses["raw"],
            conditional=bool(n_cls),
            schedule=sec["schedule"],
            timesteps=T,
            prediction=diffusion.prediction,
            loss_weighting=diffusion.loss_weighting,
            latent=sec.get("latent", "quantized"),
            num_train_latents=len(train_z),
            steps=sec["steps"],
            train_seconds=round(res.elapsed_s, 2),
            vqvae_sha256=vq_sha,
        )
        if n_cls:
            metrics["test_loss_conditional_ema"] = losses["conditional_ema"]
        metrics["budget"] = 1.0 if budget is None else float(budget)
        metrics["guide_step"] = snapshot_step(sec)
        finish_training(
            out / "model.pt",
            unet_kind,
            model_args,
            model,
            res,
            metrics,
            diffusion=diffusion.config(),
            latent=sec.get("latent", "quantized"),
            latent_mean=torch.tensor(mean_np),
            latent_std=torch.tensor(std_np),
            latent_min=train_z.amin(dim=(0, *range(2, train_z.dim()))).cpu(),
            latent_max=train_z.amax(dim=(0, *range(2, train_z.dim()))).cpu(),
            vqvae_sha256=vq_sha,
            grid=list(info.grid),
        )
        log.info(
            f"{out.name}: final train loss %.4f, test loss EMA %.4f / raw %.4f",
            res.final_loss,
            losses["ema"],
            losses["raw"],
        )
    return metrics


# --- the judge: a digit classifier -------------------------------------------------------------
@torch.no_grad()
def classifier_accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction in [0, 1] of ``images`` float (N, C, H, W) whose argmax class equals ``labels`` int (N,)."""
    probs, _ = model.predict(images)
    return float((probs.argmax(1) == labels.cpu()).float().mean())


def train_classifier(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Train the digit classifier that judges samples (``pipeline.evaluate``) on the run's train
    split, with random rotation/translation; write ``classifier/model.pt`` and ``metrics.json``
    (train and test accuracy in [0, 1]) and ``train_log.csv``.

    Reads ``classifier`` (seed, channels, feature_dim, dropout, augment_degrees, augment_shift,
    steps, batch_size, lr, log_every, checkpoint_every)."""
    paths = RunPaths(run_dir)
    sec = cfg["classifier"]
    out = paths.classifier_model.parent
    with stage_record("train_classifier", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        train_x, train_y = _images(paths, "train", device)
        test_x, test_y = _images(paths, "test", device)
        train_y, test_y = torch.from_numpy(train_y).to(device), torch.from_numpy(test_y).to(device)
        from pipeline.data import read_num_classes

        n_cls = read_num_classes(paths.dataset)
        if n_cls < 2:
            raise StageInputError(
                f"{paths.dataset} has {n_cls} classes: the classifier judge needs labelled data; set "
                "evaluate.judge: features (the label-free judge)"
            )
        model_args = build_args("classifier", sec, num_classes=n_cls, image_shape=tuple(train_x.shape[1:]))
        seed_everything(int(sec["seed"]))
        model = build_model("classifier", model_args).to(device)

        def compute_loss(net, idx, shard):
            x = train_x[idx]
            if sec["augment_degrees"] or sec["augment_shift"]:
                x = random_affine(
                    x, float(sec["augment_degrees"]), float(sec["augment_shift"])
                )  # global RNG: checkpointed, same on every rank
            logits = net(shard(x))
            y = shard(train_y[idx])
            loss = F.cross_entropy(logits.float(), y)
            return loss, {"accuracy": (logits.argmax(1) == y).float().mean()}

        res = train_loop(
            stage="train_classifier",
            model=model,
            kind="classifier",
            model_args=model_args,
            section=sec,
            compute_loss=compute_loss,
            n_data=len(train_x),
            out_dir=out,
            device=device,
            bf16=False,  # the judge is a measuring instrument: float32 whatever bf16 says (pipeline/precision.py)
        )
        test_acc = classifier_accuracy(model, test_x, test_y)
        train_acc = classifier_accuracy(model, train_x, train_y)
        metrics.update(
            test_accuracy=test_acc,
            train_accuracy=train_acc,
            num_test=len(test_x),
            steps=sec["steps"],
            train_seconds=round(res.elapsed_s, 2),
        )
        finish_training(paths.classifier_model, "classifier", model_args, model, res, metrics)
        log.info(
            "train_classifier: test accuracy %.4f (%d images), train accuracy %.4f", test_acc, len(test_x), train_acc
        )
    return metrics


# --- the label-free judge: a SimCLR encoder ----------------------------------------------------
def contrastive_views(x: torch.Tensor, sec: Mapping) -> torch.Tensor:
    """One random view of each image for SimCLR (Chen et al. 2020 sec. 3; global torch RNG, so a
    resumed run repeats it): random rotation/translation/zoom, optional horizontal flip,
    brightness and contrast jitter, Gaussian noise, clamped to [0, 1].

    Args:
        x: float (B, C, H, W) in [0, 1], or volumes (B, C, D, H, W) (rotation in the H-W planes).
        sec: the ``encoder`` section (augment_* keys).

    Returns:
        float, the shape of x, in [0, 1].
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    per_image = (b, *([1] * (x.dim() - 1)))
    v = random_affine(
        x, float(sec["augment_degrees"]), float(sec["augment_shift"]) * min(h, w), max_scale=float(sec["augment_scale"])
    )
    if sec["augment_flip"]:
        flip = torch.rand(b, device=x.device) < 0.5
        v = torch.where(flip.view(per_image), v.flip(-1), v)
    j = float(sec["augment_jitter"])
    if j:
        contrast = 1 + (torch.rand(per_image, device=x.device) * 2 - 1) * j
        bright = (torch.rand(per_image, device=x.device) * 2 - 1) * j * 0.5
        mean = v.mean(dim=tuple(range(1, v.dim())), keepdim=True)
        v = (v - mean) * contrast + mean + bright
    if float(sec.get("augment_blur", 0)):  # Gaussian blur of random strength (SimCLR appendix A)
        sigma = float(torch.rand(())) * float(sec["augment_blur"]) * min(h, w) / 28
        if sigma > 0.1:
            v = gaussian_blur(v, sigma)
    if float(sec["augment_noise"]):
        v = v + torch.randn_like(v) * float(sec["augment_noise"])
    return v.clamp(0, 1)


def train_encoder(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Train the label-free judge: a :class:`pipeline.models.FeatureEncoder` by SimCLR's NT-Xent
    loss (Chen et al. 2020, eq. 1) on two random views (:func:`contrastive_views`) of the train
    images, never their labels. Writes ``encoder/model.pt``, ``metrics.json`` (final loss, the
    top-1 retrieval accuracy of the test images' two views in [0, 1]) and ``train_log.csv``.

    Under DDP each rank contrasts the views of its own shard of the batch (its negatives are
    the shard's other images)."""
    from pipeline.models.encoder import nt_xent

    paths = RunPaths(run_dir)
    sec = cfg["encoder"]
    out = paths.encoder_model.parent
    with stage_record("train_encoder", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        train_x, _ = _images(paths, "train", device)
        test_x, _ = _images(paths, "test", device)
        model_args = build_args("encoder", sec, image_shape=tuple(train_x.shape[1:]))
        seed_everything(int(sec["seed"]))
        model = build_model("encoder", model_args).to(device)
        tau = float(sec["temperature"])

        def compute_loss(net, idx, shard):
            x = train_x[idx]
            v1, v2 = contrastive_views(x, sec), contrastive_views(x, sec)  # global RNG: same on every rank
            loss = nt_xent(net(shard(v1)), net(shard(v2)), tau)
            return loss, {}

        res = train_loop(
            stage="train_encoder",
            model=model,
            kind="encoder",
            model_args=model_args,
            section=sec,
            compute_loss=compute_loss,
            n_data=len(train_x),
            out_dir=out,
            device=device,
            bf16=False,  # the label-free judge: float32 too
        )
        g = torch.Generator().manual_seed(int(sec["seed"]) + 1)
        state = torch.random.get_rng_state()
        torch.random.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        n = min(len(test_x), 500)
        h1 = F.normalize(model.embed(contrastive_views(test_x[:n], sec)), dim=1)
        h2 = F.normalize(model.embed(contrastive_views(test_x[:n], sec)), dim=1)
        torch.random.set_rng_state(state)
        retrieval = float(((h1 @ h2.t()).argmax(1) == torch.arange(n)).float().mean())
        metrics.update(
            final_train_loss=res.final_loss,
            test_view_retrieval=retrieval,
            steps=sec["steps"],
            train_seconds=round(res.elapsed_s, 2),
        )
        finish_training(paths.encoder_model, "encoder", model_args, model, res, metrics)
        log.info("train_encoder: NT-Xent %.3f, test view retrieval %.3f (%d images)", res.final_loss, retrieval, n)
    return metrics


# --- baseline: diffusion in pixel space ---------------------------------------------------------
def _steps_for_budget(
    model: torch.nn.Module,
    diffusion,
    x: torch.Tensor,
    batch_size: int,
    lr: float,
    budget_s: float,
    probe_steps: int = 10,
    bf16: bool = False,
) -> tuple[int, float]:
    """Optimizer steps of ``model`` that fit in ``budget_s`` seconds, measured on a throwaway copy
    (its own RNG, so the real run's RNG is untouched) under the run's precision (``bf16``).
    Returns (steps >= 1, seconds per step)."""
    import copy

    probe = copy.deepcopy(model).train()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    g = torch.Generator(device=x.device).manual_seed(12345)
    b = min(batch_size, len(x))
    times = []
    for _ in range(probe_steps + 2):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (b,), device=x.device, generator=g)
        t = torch.randint(0, diffusion.num_timesteps, (b,), device=x.device, generator=g)
        noise = torch.randn((b, *x.shape[1:]), device=x.device, generator=g)
        with autocast(x.device, bf16):
            loss = diffusion.training_losses(probe, x[idx], t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_step = float(np.median(times[2:]))  # the first steps warm up allocators and kernels
    return max(1, int(budget_s / per_step)), per_step


def train_pixel_diffusion(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Baseline stage: the same U-Net family, noise schedule and objective as ``train_diffusion``, trained on
    the train images themselves (in [-1, 1], padded to the next power of two: 28x28 -> 32x32) instead of the
    VQ-VAE latents.

    With ``pixel_diffusion.steps: null`` the step count is chosen so that training takes as long
    as ``train_diffusion``'s training did (``diffusion/metrics.json`` ``train_seconds``),
    measured from a 10-step probe: the equal-wall-time comparison of latent vs pixel space
    (Rombach et al. 2022's argument). A resumed run keeps the step count of its checkpoint.
    Writes ``pixel_diffusion/model.pt``, ``metrics.json`` (train images/s, seconds, final and
    test loss) and ``train_log.csv``.

    Raises:
        pipeline.io.StageInputError: ``steps: null`` but ``diffusion/metrics.json`` does not exist.
    """
    from pipeline.io import read_json

    paths = RunPaths(run_dir)
    sec = dict(cfg["pixel_diffusion"])
    out = paths.pixel_diffusion_model.parent
    with stage_record("train_pixel_diffusion", cfg, out, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        train_x, _ = _images(paths, "train", device)
        test_x, _ = _images(paths, "test", device)
        train_p, test_p = images_to_pixel_space(train_x), images_to_pixel_space(test_x)
        model_args = build_args("unet", sec, in_channels=int(train_x.shape[1]))
        seed_everything(int(sec["seed"]))
        model = build_model("unet", model_args).to(device)
        model.enable_gradient_checkpointing(bool(sec["gradient_checkpointing"]))  # memory for compute: docs/volumes.md
        diffusion = _make_diffusion(sec).to(device)
        T = diffusion.num_timesteps
        budget = None
        if sec["steps"] is None:
            latent_metrics = paths.diffusion_model.parent / "metrics.json"
            if not latent_metrics.is_file():
                raise StageInputError(
                    f"pixel_diffusion.steps is null (match the latent model's training time) but {latent_metrics} does "
                    "not exist; run train_diffusion first or set pixel_diffusion.steps"
                )
            budget = float(read_json(latent_metrics)["train_seconds"])
            ckpt = RunPaths.checkpoint(out)
            resumed_steps = None
            if ckpt.exists():
                state = ckpt_io.load(ckpt, map_location="cpu")
                if {k: v for k, v in state.get("section", {}).items() if k != "steps"} == {
                    k: v for k, v in sec.items() if k != "steps"
                }:
                    resumed_steps = int(state["section"]["steps"])
            if resumed_steps is not None:
                sec["steps"] = resumed_steps
            else:
                sec["steps"], per_step = _steps_for_budget(
                    model, diffusion, train_p, int(sec["batch_size"]), float(sec["lr"]), budget, bf16=cfg["bf16"]
                )
                log.info(
                    "train_pixel_diffusion: %.3f s/step measured; %d steps fit in the latent model's %.1f training "
                    "seconds",
                    per_step,
                    sec["steps"],
                    budget,
                )
            sec["log_every"] = min(int(sec["log_every"]), int(sec["steps"]))

        res = _train_denoiser(
            "train_pixel_diffusion", model, model_args, sec, diffusion, train_p, out, device, cfg["bf16"]
        )
        test_loss = _test_loss(diffusion, res.ema.module, test_p, int(sec["seed"]) + 1)
        steps = int(sec["steps"])
        metrics.update(
            final_train_loss=res.final_loss,
            test_loss_ema=test_loss,
            schedule=sec["schedule"],
            timesteps=T,
            steps=steps,
            time_budget_s=budget,
            train_seconds=round(res.elapsed_s, 2),
        )
        finish_training(
            paths.pixel_diffusion_model,
            "unet",
            model_args,
            model,
            res,
            metrics,
            diffusion=diffusion.config(),
            space="pixel",
            image_shape=list(train_x.shape[1:]),
        )
        log.info("train_pixel_diffusion: %d steps in %.1f s, test loss EMA %.4f", steps, res.elapsed_s, test_loss)
    return metrics
