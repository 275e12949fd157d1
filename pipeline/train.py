"""The training stages: VQ-VAE, classifier (the judge), SimCLR encoder (the label-free judge),
PixelCNN prior, latent diffusion and the pixel-space diffusion baseline, each
``fn(cfg, run_dir, threads=None, ...)`` (``pipeline.stages``).

Each stage is a :class:`pipeline.training.TrainingStage`: it says what it reads, which network
it builds (through ``pipeline.models.build_model`` from ``model_args``, stored in ``model.pt``
as ``args``), how a batch becomes a loss and what it measures afterwards; the scaffold does the
rest (stage record, device, seed, :class:`pipeline.training.TrainLoop` with EMA, DDP and exact
resume from ``<stage>/checkpoint.pt``, ``model.pt``, ``metrics.json``, ``train_log.csv``).
:func:`pipeline.checkpoint.load_model` rebuilds the model from the file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import gaussian_blur, random_affine
from pipeline.diffusion import images_to_pixel_space
from pipeline.io import RunPaths, StageInputError, save_grid_png
from pipeline.latents import read_split
from pipeline.models import model_args as build_args
from pipeline.runtime import autocast, dist_info, log
from pipeline.training import TrainingStage, TrainResult, checkpoint_steps, drop_labels, guide_step

__all__ = [
    "train_vqvae",
    "train_pixelcnn",
    "train_diffusion",
    "train_classifier",
    "train_simclr",
    "contrastive_views",
    "train_pixel_diffusion",
    "evaluate_vqvae",
]


# --- stage 2: VQ-VAE --------------------------------------------------------------------------
def vq_batch_size(image_shape, batch_size: int = 1000) -> int:
    """Images per batch of a VQ-VAE pass: at most ``batch_size`` and about 4M voxels."""
    return min(batch_size, max(1, 2**22 // max(1, int(np.prod(image_shape)))))


@torch.no_grad()
def evaluate_vqvae(model, images, batch_size: int = 1000) -> dict:
    """Reconstruction MSE on [0, 1] pixels, codebook perplexity and codes in use over ``images``.

    Args:
        images: float (N, C, H, W) (or (N, C, D, H, W) volumes) in [0, 1] on the model's device,
            cut into batches of :func:`vq_batch_size`; or an iterable of such batches (a
            streamed split, :meth:`pipeline.streaming.StageData.batches`).

    Returns:
        {"recon_mse": float, "perplexity": float (exp of the code-histogram entropy, in
        [1, K]), "codes_in_use": int}.
    """
    model.eval()
    k = model.num_embeddings
    if isinstance(images, torch.Tensor):
        whole, bs = images, vq_batch_size(images.shape[1:], batch_size)
        images = (whole[s : s + bs] for s in range(0, len(whole), bs))
    counts, se, n = None, 0.0, 0
    for x in images:
        xh, vq = model(x)
        se += float(F.mse_loss(xh.float(), x, reduction="sum"))
        n += x.numel()
        c = torch.bincount(vq.codes.flatten(), minlength=k).double()
        counts = c if counts is None else counts + c
    p = counts / counts.sum()
    perplexity = float(torch.exp(torch.special.entr(p).sum()))  # entr(0) = 0 exactly
    return {"recon_mse": se / n, "perplexity": perplexity, "codes_in_use": int((counts > 0).sum())}


def _image_column(paths: RunPaths, transform=None):
    """The train images of ``dataset.h5`` as a :class:`pipeline.streaming.Column` (float32 in
    [0, 1], optionally mapped by ``transform``) and the dataset's :class:`ImageInfo`."""
    from pipeline.data import read_info
    from pipeline.streaming import Column

    info = read_info(paths.dataset)
    return Column(str(paths.dataset), "train/images", "float32", float(info.max_value), transform), info


def _label_column(paths: RunPaths):
    from pipeline.streaming import Column

    return Column(str(paths.dataset), "train/labels", "int64")


def _images(paths: RunPaths, split: str, device) -> tuple[torch.Tensor, np.ndarray]:
    from pipeline.data import read_dataset

    data = read_dataset(paths.dataset, split)
    return data.unit().to(device), data.labels


def _test_split(paths: RunPaths, device) -> tuple:
    """(test images, test labels) of ``dataset.h5`` on ``device``: images float (N, C, *S) in
    [0, 1], labels int64 (N,). The test split stays in memory (``data.test_size: auto`` caps it
    at 500); the train split is the stage's :class:`pipeline.streaming.StageData`."""
    test_x, test_y = _images(paths, "test", device)
    return test_x, torch.from_numpy(test_y).to(device)


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


class VQVAEStage(TrainingStage):
    """Stage 2: the VQ-VAE on ``dataset.h5``'s train split. Measures the test and train
    reconstruction MSE, perplexity and codes in use; writes ``reconstructions.png`` (or, for
    volumes, SSIM/PSNR, a three-plane grid and NIfTI reconstructions)."""

    name, kind, section_name = "train_vqvae", "vqvae", "vqvae"

    def read(self, device):
        from pipeline.data import check_divisible, read_dataset

        column, info = _image_column(self.paths)
        self.data = self.stage_data({"images": column}, device)
        self.test = read_dataset(self.paths.dataset, "test")  # its affines too, for the volumes' NIfTI reconstructions
        self.test_x = self.test.unit().to(device)
        self.image_shape = tuple(info.shape)
        self.spatial_dims = len(self.image_shape) - 1  # 3 for NIfTI volumes (N, 1, D, H, W)
        check_divisible(self.image_shape[1:], self.cfg, str(self.paths.dataset))
        return len(self.data)

    def model_args(self):
        return build_args("vqvae", self.section, in_channels=int(self.image_shape[0]), spatial_dims=self.spatial_dims)

    def compute_loss(self, net, idx, shard):
        x = self.data.take("images", idx, shard)
        xh, vq = net(x)
        recon = F.mse_loss(xh.float(), x)
        return recon + vq.commitment_loss, {
            "recon_mse": recon.detach(),
            "commitment": vq.commitment_loss.detach(),
            "perplexity": vq.perplexity,
            "codes_in_use": torch.unique(vq.codes).numel(),  # in this batch
        }

    def tensorboard_images(self):
        """The first 8 test images above their reconstructions (the middle slice of volumes)."""
        x = self.test_x[:8]
        recon = self.model_for_images(x)[0].float()
        if x.dim() == 5:
            x, recon = x[:, :, x.shape[2] // 2], recon[:, :, recon.shape[2] // 2]
        rows = [torch.cat(list(x), dim=-1), torch.cat(list(recon), dim=-1)]  # (C, H, 8W) each
        return {"reconstructions": torch.cat(rows, dim=-2)}

    def before_training(self, model, device):
        self.model_for_images = model

    def measure(self, model, result):
        test_m = evaluate_vqvae(model, self.test_x)
        train_m = evaluate_vqvae(model, self.data.batches("images", vq_batch_size(self.image_shape)))
        metrics = {
            "test_recon_mse": test_m["recon_mse"],
            "test_perplexity": test_m["perplexity"],
            "test_codes_in_use": test_m["codes_in_use"],
            "train_recon_mse": train_m["recon_mse"],
            "train_codes_in_use": train_m["codes_in_use"],
            "num_embeddings": self.section["num_embeddings"],
            "codebook_restarts": int(model.quantizer.restarts),
        }
        if self.spatial_dims == 3:
            if dist_info()[0] == 0:
                _write_volume_reconstructions(model, self.test_x, self.test.extra.get("affines"), self.out, metrics)
            return metrics
        with torch.no_grad():
            originals = self.test_x[:20]
            recons = model(originals)[0].float()
        grid = torch.cat([originals[:10], recons[:10], originals[10:20], recons[10:20]]).cpu().numpy()
        if dist_info()[0] == 0:
            save_grid_png(self.out / "reconstructions.png", grid, nrow=10, scale=3)
        return metrics

    summary_format = (
        "train_vqvae: test MSE {test_recon_mse:.5f}, perplexity {test_perplexity:.1f}, "
        "{test_codes_in_use}/{num_embeddings} codes in use"
    )


def train_vqvae(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 2: train the VQ-VAE on ``dataset.h5``'s train split; write ``vqvae/model.pt``,
    ``metrics.json`` (test recon MSE, perplexity, codes in use), ``reconstructions.png``
    (test originals above their reconstructions) and ``train_log.csv``. Reads ``vqvae``."""
    return VQVAEStage(cfg, run_dir, threads).run()


class PriorStage(TrainingStage):
    """A prior trained on ``latents.h5`` (PixelCNN or latent diffusion), unconditional or its
    class-conditional variant, at a training budget: the config it reads is
    :func:`pipeline.config.variant_config`'s and its folder :func:`pipeline.sets.prior_folder`'s."""

    def __init__(self, cfg, run_dir, threads=None, budget: float | None = None, conditional: bool = False):
        from pipeline.config import variant_config
        from pipeline.sets import prior_folder

        super().__init__(
            variant_config(cfg, self.section_name, conditional=conditional, budget=budget), run_dir, threads
        )
        self.budget, self.conditional = budget, conditional
        self.out = self.paths.root / prior_folder(self.section_name, budget, conditional)

    def read_latents(self, device):
        """The test split of ``latents.h5`` in memory, the train split's HDF5 keys (with the
        ``train_aug`` rows when ``augmented``) for :meth:`train_column`, and the number of classes
        a conditional variant uses (its null label is that number).

        Raises:
            pipeline.io.StageInputError: the conditional variant on unlabelled data.
            pipeline.latents.LatentsError: a file made from another ``vqvae/model.pt``, or
                ``augmented`` without augmented rows.
        """
        from pipeline.checkpoint import source_sha256
        from pipeline.latents import train_splits

        self.vq_sha = source_sha256(self.paths.vqvae_model)
        self.test, self.info = read_split(self.paths.latents, "test", expect_vqvae_sha256=self.vq_sha)
        self.train_splits = train_splits(self.paths.latents, augmented=bool(self.section.get("augmented", False)))
        self.test_y = torch.from_numpy(self.test.labels).to(device)
        self.n_cls = self.info.num_classes if self.conditional else 0  # label n_cls is the null label
        if self.conditional and not self.n_cls:
            raise StageInputError(f"{self.paths.latents}: the data has no labels; a class-conditional prior needs them")
        self.p_drop = float(self.section.get("label_dropout", 0.0))

    def train_column(self, name: str, dtype: str = "float32", transform=None):
        """Column ``name`` ("codes", "latents", "encodings", "labels") of the train rows."""
        from pipeline.streaming import Column

        return Column(str(self.paths.latents), tuple(f"{s}/{name}" for s in self.train_splits), dtype, None, transform)

    def labels_for(self, idx, shard):
        """This rank's labels of the global batch ``idx``, dropped to the null label with
        probability ``label_dropout`` (drawn for the whole batch, so every rank draws alike), or
        None for an unconditional prior."""
        if not self.n_cls:
            return None
        return drop_labels(self.data.take("labels", idx, shard), self.p_drop, self.n_cls, batch=len(idx), shard=shard)

    def guide_step(self):
        return guide_step(self.section)

    def prior_metrics(self, result: TrainResult) -> dict:
        return {
            "conditional": bool(self.n_cls),
            "vqvae_sha256": self.vq_sha,
            "budget": 1.0 if self.budget is None else float(self.budget),
            "guide_step": guide_step(self.section),
        }


# --- stage 4: PixelCNN prior --------------------------------------------------------------------
class PixelCNNStage(PriorStage):
    """Stage 4: the gated PixelCNN on the train codes; measures the test NLL (nats and bits per
    code; for the conditional variant also given the true label)."""

    name, kind, section_name = "train_pixelcnn", "pixelcnn", "pixelcnn"

    def read(self, device):
        self.read_latents(device)
        columns = {"codes": self.train_column("codes", "int64")}
        if self.n_cls:
            columns["labels"] = self.train_column("labels", "int64")
        self.data = self.stage_data(columns, device)
        self.test_c = torch.from_numpy(self.test.codes.astype(np.int64)).to(device)
        return len(self.data)

    def model_args(self):
        grid = len(self.info.grid)
        return build_args(
            "pixelcnn", self.section, in_channels=self.info.num_embeddings, num_classes=self.n_cls, spatial_dims=grid
        )

    def compute_loss(self, net, idx, shard):
        c = self.data.take("codes", idx, shard)
        y = self.labels_for(idx, shard)
        loss = F.cross_entropy((net(c) if y is None else net(c, y)).float(), c)
        return loss, {"bits_per_code": loss.detach() / math.log(2)}

    def ema_decay(self):
        return float(self.section["ema_decay"]) if self.section.get("ema_decay") else None

    @torch.no_grad()
    def test_nll(self, judged, labels: torch.Tensor | None) -> float:
        """Mean NLL (nats per code) of the test codes under ``judged`` (given ``labels``)."""
        judged.eval()
        total, c = 0.0, self.test_c
        for s in range(0, len(c), 500):
            y = None if labels is None else labels[s : s + 500]
            total += float(F.cross_entropy(judged(c[s : s + 500], y).float(), c[s : s + 500], reduction="sum"))
        return total / c.numel()

    def measure(self, model, result):
        judged = result.ema.module if result.ema is not None else model  # the weights that are sampled
        uncond = self.test_nll(judged, None)
        metrics = {"test_nll_nats_per_code": uncond, "test_nll_bits_per_code": uncond / math.log(2)}
        if self.n_cls:
            cond = self.test_nll(judged, self.test_y)
            metrics.update(
                test_nll_conditional_nats_per_code=cond, test_nll_conditional_bits_per_code=cond / math.log(2)
            )
        metrics.update(train_final_loss=result.final_loss, num_train_grids=len(self.data))
        return {**metrics, **self.prior_metrics(result)}

    def checkpoint_extra(self, result):
        return {"vqvae_sha256": self.vq_sha, "grid": list(self.info.grid)}

    def summary(self, m):
        cond = f", conditional {m['test_nll_conditional_nats_per_code']:.4f}" if self.n_cls else ""
        nats = m["test_nll_nats_per_code"]
        return f"{self.out.name}: test NLL {nats:.4f} nats/code ({nats / math.log(2):.4f} bits/code){cond}"


def train_pixelcnn(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None, **variant: Any) -> dict:
    """Stage 4: train the gated PixelCNN on the train codes of ``latents.h5``; write
    ``<folder>/model.pt``, ``metrics.json`` (test NLL in nats and bits per code; for the
    conditional variant also the class-conditional NLL) and ``train_log.csv``.

    Args:
        variant: ``budget`` and ``conditional`` (:class:`PriorStage`).
        budget: train for this factor times ``steps`` (the quality-vs-compute study), into
            ``pixelcnn[_cond]_b<f>/``.
        conditional: the class-conditional variant ``pixelcnn_cond/``: p(c | y) with the null label
            (the number of classes) substituted with probability ``label_dropout`` (so
            classifier-free guidance can mix the two), ``conditional_steps`` steps;
            ``test_nll_*`` is then the NLL under the null label and ``test_nll_conditional_*``
            under the true label. Without it the prior is unconditional and never sees a label
            (the study's subject).
    """
    return PixelCNNStage(cfg, run_dir, threads, **variant).run()


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
        t = diffusion.sample_timesteps(len(z), x.device, generator=g)
        noise = torch.randn(z.shape, device=x.device, generator=g)
        total += float(
            diffusion.eps_mse(net, z, t, noise, labels=None if labels is None else labels[s : s + chunk]).sum()
        )
    return total / len(x)


def _make_diffusion(section: Mapping):
    """The ``GaussianDiffusion`` of a diffusion config section (schedule, timesteps, prediction,
    loss_weighting, min_snr_gamma, flow_time)."""
    from pipeline.diffusion import GaussianDiffusion

    return GaussianDiffusion(
        section["schedule"],
        int(section["timesteps"]),
        prediction=section.get("prediction", "epsilon"),
        loss_weighting=section.get("loss_weighting", "none"),
        min_snr_gamma=float(section.get("min_snr_gamma", 5.0)),
        flow_time=section.get("flow_time", "logit_normal"),
    )


class DenoiserMixin:
    """A U-Net trained as a denoiser of the column ``x`` of :attr:`data` (float (N, C, *S): scaled
    latents or pixel-space images; ``self.sample_shape`` = (C, *S)) under ``self.diffusion``'s
    objective (DDPM eq. 14 with the configured prediction and weighting): per step t ~ U{0..T-1}
    (flow: t = sigma T, sigma logit-normal or uniform; :meth:`GaussianDiffusion.sample_timesteps`)
    and noise ~ N(0, I) are drawn for the global batch and sharded; a conditional prior's labels
    are dropped to the null label with probability ``label_dropout`` (:meth:`labels_for`;
    classifier-free guidance training)."""

    n_cls = 0

    def before_training(self, model, device):
        self.device = device
        self.diffusion = _make_diffusion(self.section).to(device)

    #: TensorBoard (and train_log.csv) log the loss in this many equal bands of timesteps
    timestep_buckets = 4

    def compute_loss(self, net, idx, shard):
        n, device, T = len(idx), self.device, self.diffusion.num_timesteps
        t = self.diffusion.sample_timesteps(n, device)
        noise = torch.randn((n, *self.sample_shape), device=device)
        y = self.labels_for(idx, shard) if self.n_cls else None
        losses = self.diffusion.training_losses(net, self.data.take("x", idx, shard), shard(t), shard(noise), labels=y)
        return losses.mean(), self.bucket_losses(losses.detach(), shard(t), T)

    def bucket_losses(self, losses, t, T: int) -> dict:
        """Mean loss per band of timesteps, ``loss_t<lo>-<hi>`` (0 for a band this batch missed:
        with a batch of 32 and 4 bands, a chance of 1e-4)."""
        out, k = {}, self.timestep_buckets
        for b in range(k):
            lo, hi = b * T // k, (b + 1) * T // k
            inside = (t >= lo) & (t < hi)
            out[f"loss_t{lo}-{hi - 1}"] = (losses * inside).sum() / inside.sum().clamp(min=1)
        return out

    def ema_decay(self):
        return float(self.section["ema_decay"])


class DiffusionStage(DenoiserMixin, PriorStage):
    """Stage 5: latent diffusion on the train latents scaled to unit variance per channel
    (:class:`pipeline.latents.LatentScaling`); measures the test epsilon-MSE of the EMA and raw
    weights (and of the true labels for the conditional variant), and the same epsilon-MSE of the
    EMA weights on as many train rows (``train_probe_loss_ema``: the generalisation gap; the
    training loss itself is weighted by the objective and not comparable)."""

    name, kind, section_name = "train_diffusion", "unet", "diffusion"

    def read(self, device):
        from pipeline.latents import LatentScaling
        from pipeline.models import UNET_KINDS
        from pipeline.streaming import iterate_rows

        self.read_latents(device)
        kind = "encodings" if self.section.get("latent", "quantized") == "encoder" else "latents"
        raw = self.train_column(kind)
        self.scaling = LatentScaling.fit(self.info, kind, (b[kind] for b in iterate_rows({kind: raw}, 4096)))
        columns = {"x": self.train_column(kind, transform=self.scaling.scale)}
        if self.n_cls:
            columns["labels"] = self.train_column("labels", "int64")
        self.data = self.stage_data(columns, device)
        self.sample_shape = (self.info.embedding_dim, *self.info.grid)
        self.test_z = self.scaling.scale(torch.from_numpy(getattr(self.test, kind)).to(device))
        # as many train rows as test rows, for the same test loss on both (the generalisation gap)
        probe = next(iterate_rows({"x": columns["x"]}, len(self.test_z)))["x"]
        self.train_probe_z = probe.to(device)
        self.kind = UNET_KINDS[self.section.get("network", "own")]  # the project's U-Net or MONAI's
        return len(self.data)

    def model_args(self):
        return build_args(
            self.kind,
            self.section,
            in_channels=self.info.embedding_dim,
            num_classes=self.n_cls,
            spatial_dims=len(self.info.grid),
        )

    def measure(self, model, result):
        seed = int(self.section["seed"]) + 1
        losses = {
            "ema": _test_loss(self.diffusion, result.ema.module, self.test_z, seed),
            "raw": _test_loss(self.diffusion, model, self.test_z, seed),
            "train_ema": _test_loss(self.diffusion, result.ema.module, self.train_probe_z, seed),
        }
        if self.n_cls:
            losses["conditional_ema"] = _test_loss(self.diffusion, result.ema.module, self.test_z, seed, self.test_y)
        self.losses = losses
        metrics = {
            "final_train_loss": result.final_loss,
            "test_loss_ema": losses["ema"],
            "test_loss_raw": losses["raw"],
            "train_probe_loss_ema": losses["train_ema"],
            "schedule": self.section["schedule"],
            "timesteps": self.diffusion.num_timesteps,
            "prediction": self.diffusion.prediction,
            "loss_weighting": self.diffusion.loss_weighting,
            "latent": self.section.get("latent", "quantized"),
            "num_train_latents": len(self.data),
        }
        if self.n_cls:
            metrics["test_loss_conditional_ema"] = losses["conditional_ema"]
        return {**metrics, **self.prior_metrics(result)}

    def checkpoint_extra(self, result):
        return {
            "diffusion": self.diffusion.config(),
            **self.scaling.state(),
            "vqvae_sha256": self.vq_sha,
            "grid": list(self.info.grid),
        }

    summary_format = (
        "{folder}: final train loss {final_train_loss:.4f}, test loss EMA {test_loss_ema:.4f} / raw {test_loss_raw:.4f}"
        " (EMA on as many train rows {train_probe_loss_ema:.4f})"
    )


def train_diffusion(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None, **variant: Any) -> dict:
    """Stage 5: train a latent diffusion model (``prediction`` and ``loss_weighting`` of the
    config: epsilon/v/x0, min-SNR) on the train latents scaled to unit variance per channel;
    write ``<folder>/model.pt`` (raw and EMA weights, the autoguidance guide, the schedule and
    the scaling), ``metrics.json`` (final train loss, test epsilon-MSE of the EMA and raw weights)
    and ``train_log.csv``.

    Args:
        variant: ``budget`` and ``conditional`` (:class:`PriorStage`).
        budget: train for this factor times ``steps``, into ``diffusion[_cond]_b<f>/``.
        conditional: the class-conditional variant ``diffusion_cond/``: the U-Net takes labels,
            the null label with probability ``label_dropout`` (classifier-free guidance training,
            Ho & Salimans 2022), ``conditional_steps`` steps; its test losses are those of the
            null label, and ``test_loss_conditional_ema`` that of the true labels. Without it the
            model is unconditional and never sees a label (the study's subject).
    """
    return DiffusionStage(cfg, run_dir, threads, **variant).run()


# --- the judge: a digit classifier -------------------------------------------------------------
@torch.no_grad()
def classifier_accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction in [0, 1] of ``images`` float (N, C, H, W) whose argmax class equals ``labels`` int (N,)."""
    probs, _ = model.predict(images)
    return float((probs.argmax(1) == labels.cpu()).float().mean())


class ClassifierStage(TrainingStage):
    """The digit classifier that judges samples, with random rotation/translation; measures
    train and test accuracy. Trains in float32 whatever ``bf16`` says (a measuring instrument)."""

    name, kind, section_name, float32 = "train_classifier", "classifier", "classifier", True

    def read(self, device):
        from pipeline.data import read_num_classes

        column, info = _image_column(self.paths)
        self.data = self.stage_data({"images": column, "labels": _label_column(self.paths)}, device)
        self.test_x, self.test_y = _test_split(self.paths, device)
        self.image_shape = tuple(info.shape)
        self.n_cls = read_num_classes(self.paths.dataset)
        if self.n_cls < 2:
            raise StageInputError(
                f"{self.paths.dataset} has {self.n_cls} classes: the classifier judge needs labelled data; set "
                "evaluate.judge: features (the label-free judge)"
            )
        return len(self.data)

    #: the augmentation is drawn for the whole batch (global RNG, alike on every rank)
    shard_loading = False

    def model_args(self):
        return build_args("classifier", self.section, num_classes=self.n_cls, image_shape=self.image_shape)

    def compute_loss(self, net, idx, shard):
        section, x = self.section, self.data.take("images", idx)
        if section["augment_degrees"] or section["augment_shift"]:  # global RNG: checkpointed, same on every rank
            x = random_affine(x, float(section["augment_degrees"]), float(section["augment_shift"]))
        logits = net(shard(x))
        y = self.data.take("labels", idx, shard)
        return F.cross_entropy(logits.float(), y), {"accuracy": (logits.argmax(1) == y).float().mean()}

    def measure(self, model, result):
        return {
            "test_accuracy": classifier_accuracy(model, self.test_x, self.test_y),
            "train_accuracy": self.train_accuracy(model),
            "num_test": len(self.test_x),
        }

    @torch.no_grad()
    def train_accuracy(self, model) -> float:
        """Accuracy in [0, 1] on the train split (in memory, or streamed a batch at a time)."""
        if self.data.path == "memory":
            return classifier_accuracy(model, self.data.tensors["images"], self.data.tensors["labels"])
        correct = sum(
            int((model.predict(x)[0].argmax(1) == y.cpu()).sum())
            for x, y in zip(self.data.batches("images", 1000), self.data.batches("labels", 1000))
        )
        return correct / len(self.data)

    summary_format = (
        "train_classifier: test accuracy {test_accuracy:.4f} ({num_test} images), train accuracy {train_accuracy:.4f}"
    )


def train_classifier(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Train the digit classifier that judges samples (``pipeline.evaluate``) on the run's train
    split, with random rotation/translation; write ``classifier/model.pt`` and ``metrics.json``
    (train and test accuracy in [0, 1]) and ``train_log.csv``.

    Reads ``classifier`` (seed, channels, feature_dim, dropout, augment_degrees, augment_shift,
    steps, batch_size, lr, log_every, checkpoint_every)."""
    return ClassifierStage(cfg, run_dir, threads).run()


# --- the label-free judge: a SimCLR encoder ----------------------------------------------------
def contrastive_views(x: torch.Tensor, section: Mapping) -> torch.Tensor:
    """One random view of each image for SimCLR (Chen et al. 2020 sec. 3; global torch RNG, so a
    resumed run repeats it): random rotation/translation/zoom, optional horizontal flip,
    brightness and contrast jitter, Gaussian noise, clamped to [0, 1].

    Args:
        x: float (B, C, H, W) in [0, 1], or volumes (B, C, D, H, W) (rotation in the H-W planes).
        sec: the ``simclr`` section (augment_* keys).

    Returns:
        float, the shape of x, in [0, 1].
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    per_image = (b, *([1] * (x.dim() - 1)))
    v = random_affine(
        x,
        float(section["augment_degrees"]),
        float(section["augment_shift"]) * min(h, w),
        max_scale=float(section["augment_scale"]),
    )
    if section["augment_flip"]:
        flip = torch.rand(b, device=x.device) < 0.5
        v = torch.where(flip.view(per_image), v.flip(-1), v)
    j = float(section["augment_jitter"])
    if j:
        contrast = 1 + (torch.rand(per_image, device=x.device) * 2 - 1) * j
        bright = (torch.rand(per_image, device=x.device) * 2 - 1) * j * 0.5
        mean = v.mean(dim=tuple(range(1, v.dim())), keepdim=True)
        v = (v - mean) * contrast + mean + bright
    if float(section.get("augment_blur", 0)):  # Gaussian blur of random strength (SimCLR appendix A)
        sigma = float(torch.rand(())) * float(section["augment_blur"]) * min(h, w) / 28
        if sigma > 0.1:
            v = gaussian_blur(v, sigma)
    if float(section["augment_noise"]):
        v = v + torch.randn_like(v) * float(section["augment_noise"])
    return v.clamp(0, 1)


class SimCLRStage(TrainingStage):
    """The label-free judge: a :class:`pipeline.models.FeatureEncoder` trained by SimCLR's NT-Xent
    loss (Chen et al. 2020, eq. 1) on two random views of the train images, never their labels;
    measures the top-1 retrieval accuracy of the test images' two views. Trains in float32.

    Under DDP each rank contrasts the views of its own shard of the batch (its negatives are
    the shard's other images)."""

    name, kind, section_name, float32 = "train_simclr", "simclr", "simclr", True

    #: the views are drawn for the whole batch (global RNG, alike on every rank)
    shard_loading = False

    def read(self, device):
        column, info = _image_column(self.paths)
        self.data = self.stage_data({"images": column}, device)
        self.test_x, _ = _test_split(self.paths, device)
        self.image_shape = tuple(info.shape)
        return len(self.data)

    def model_args(self):
        return build_args("simclr", self.section, image_shape=self.image_shape)

    def compute_loss(self, net, idx, shard):
        from pipeline.models.encoder import nt_xent

        x = self.data.take("images", idx)
        v1, v2 = (
            contrastive_views(x, self.section),
            contrastive_views(x, self.section),
        )  # global RNG: same on every rank
        return nt_xent(net(shard(v1)), net(shard(v2)), float(self.section["temperature"])), {}

    def measure(self, model, result):
        section = self.section
        g = torch.Generator().manual_seed(int(section["seed"]) + 1)
        state = torch.random.get_rng_state()
        torch.random.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        n = min(len(self.test_x), 500)
        h1 = F.normalize(model.embed(contrastive_views(self.test_x[:n], section)), dim=1)
        h2 = F.normalize(model.embed(contrastive_views(self.test_x[:n], section)), dim=1)
        torch.random.set_rng_state(state)
        self.n_retrieval = n
        retrieval = float(((h1 @ h2.t()).argmax(1) == torch.arange(n)).float().mean())
        return {"final_train_loss": result.final_loss, "test_view_retrieval": retrieval}

    def summary(self, m):
        return (
            f"train_simclr: NT-Xent {m['final_train_loss']:.3f}, test view retrieval "
            f"{m['test_view_retrieval']:.3f} ({self.n_retrieval} images)"
        )


def train_simclr(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Train the label-free judge (:class:`SimCLRStage`); write ``simclr/model.pt``,
    ``metrics.json`` (final loss, the top-1 retrieval accuracy of the test images' two views in
    [0, 1]) and ``train_log.csv``."""
    return SimCLRStage(cfg, run_dir, threads).run()


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
        t = diffusion.sample_timesteps(b, x.device, generator=g)
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


class PixelDiffusionStage(DenoiserMixin, TrainingStage):
    """The baseline: the same U-Net family, noise schedule and objective as ``train_diffusion``,
    trained on the train images themselves (in [-1, 1], padded to the next power of two: 28x28 ->
    32x32). With ``pixel_diffusion.steps: null`` the step count is chosen so that training takes
    as long as ``train_diffusion``'s did (measured from a 10-step probe; a resumed run keeps the
    count of its checkpoint, :func:`pipeline.training.checkpoint_steps`)."""

    name, kind, section_name = "train_pixel_diffusion", "unet", "pixel_diffusion"
    budget_s: float | None = None

    def read(self, device):
        column, info = _image_column(self.paths, transform=images_to_pixel_space)
        self.data = self.stage_data({"x": column}, device)
        self.test_x, _ = _test_split(self.paths, device)
        self.test_p = images_to_pixel_space(self.test_x)
        self.image_shape = tuple(info.shape)
        self.sample_shape = tuple(self.test_p.shape[1:])
        return len(self.data)

    def model_args(self):
        return build_args("unet", self.section, in_channels=int(self.image_shape[0]))

    def before_training(self, model, device):
        from pipeline.io import read_json

        super().before_training(model, device)
        if self.section["steps"] is not None:
            return
        latent_metrics = self.paths.diffusion_model.parent / "metrics.json"
        if not latent_metrics.is_file():
            raise StageInputError(
                f"pixel_diffusion.steps is null (match the latent model's training time) but {latent_metrics} does "
                "not exist; run train_diffusion first or set pixel_diffusion.steps"
            )
        self.budget_s = float(read_json(latent_metrics)["train_seconds"])
        steps = checkpoint_steps(self.out, self.section)
        if steps is None:
            steps, per_step = _steps_for_budget(
                model,
                self.diffusion,
                self.probe_rows(),
                int(self.section["batch_size"]),
                float(self.section["lr"]),
                self.budget_s,
                bf16=self.cfg["bf16"],
            )
            log.info(
                "train_pixel_diffusion: %.3f s/step measured; %d steps fit in the latent model's %.1f training seconds",
                per_step,
                steps,
                self.budget_s,
            )
        self.section["steps"] = steps
        self.section["log_every"] = min(int(self.section["log_every"]), int(steps))

    def probe_rows(self) -> torch.Tensor:
        """The rows the step-time probe trains on: the whole train split in memory, else its
        first 4,096 rows (the probe measures time, not quality)."""
        if self.data.path == "memory":
            return self.data.tensors["x"]
        return next(self.data.batches("x", 4096))

    def measure(self, model, result):
        return {
            "final_train_loss": result.final_loss,
            "test_loss_ema": _test_loss(self.diffusion, result.ema.module, self.test_p, int(self.section["seed"]) + 1),
            "schedule": self.section["schedule"],
            "timesteps": self.diffusion.num_timesteps,
            "time_budget_s": self.budget_s,
        }

    def checkpoint_extra(self, result):
        return {"diffusion": self.diffusion.config(), "space": "pixel", "image_shape": list(self.image_shape)}

    @property
    def model_path(self):
        return self.paths.pixel_diffusion_model

    summary_format = "train_pixel_diffusion: {steps} steps in {train_seconds:.1f} s, test loss EMA {test_loss_ema:.4f}"


def train_pixel_diffusion(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Baseline stage (:class:`PixelDiffusionStage`): writes ``pixel_diffusion/model.pt``,
    ``metrics.json`` (train images/s, seconds, final and test loss) and ``train_log.csv``.

    Raises:
        pipeline.io.StageInputError: ``steps: null`` but ``diffusion/metrics.json`` does not exist.
    """
    return PixelDiffusionStage(cfg, run_dir, threads).run()
