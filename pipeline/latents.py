"""``latents.h5``: its schema, its only writer (the extract_latents stage) and its only reader.

Writer and reader share one definition (:data:`SCHEMA`), as rosinality/vq-vae-2-pytorch's
``extract_code.py`` and ``dataset.py`` share ``CodeRow``.

Schema (version 3), for each split ``train`` and ``test``, and for ``train_aug`` when
``latents.augment_copies`` > 0; (h, w) is the code grid, H/f x W/f of the images (7 x 7 for
MNIST at f = 4)::

    /<split>/codes      int16   (N, h, w)     codebook indices in [0, K)
    /<split>/latents    float32 (N, D, h, w)  the quantized embeddings e_{codes}
    /<split>/encodings  float32 (N, D, h, w)  the encoder outputs z_e before quantization
    /<split>/labels     int64   (N,)          -1 = unlabelled
    (for 3D volumes the grid is (d, h, w): codes (N, d, h, w), latents (N, D, d, h, w))
    attrs: schema_version=3, K, D, grid ([h, w] or [d, h, w]), num_classes (from dataset.h5; 0 = unlabelled),
           vqvae_sha256 (SHA-256 of the vqvae/model.pt bytes),
           latent_mean, latent_std, encoding_mean, encoding_std (float64 (D,): per-channel mean
           and std of the plain train latents / encodings, used to scale them to unit variance
           for diffusion), augment (JSON: copies, degrees, shift, scale, seed)

``train_aug`` holds the codes of ``copies`` randomly rotated, scaled and shifted versions of
every train image (``pipeline.augment.random_affine``, seeded; copy c of image i is row
c * N + i, its label is image i's): more code grids for the priors without new images.

Datasets are chunked and gzip-compressed; the writer encodes in batches and writes each batch
as it comes (the dataset is never held whole in memory as latents); the file is written under
a temporary name and renamed only when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import RunPaths, atomic_path, sha256_file

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA",
    "AUG_SPLIT",
    "LatentsError",
    "LatentsInfo",
    "LatentSplit",
    "read_info",
    "read_split",
    "extract_latents",
]

SCHEMA_VERSION = 3
#: versions read_info still reads (version 2: a 7x7 grid, no ``grid`` attribute)
READABLE_VERSIONS = (2, 3)
SPLITS = ("train", "test")
#: the optional split of augmented train copies
AUG_SPLIT = "train_aug"

#: dataset name -> (dtype, shape after N, with "D" for the embedding dimension and "grid" for the
#: code grid's sides, (h, w) or (d, h, w))
SCHEMA: dict[str, tuple[np.dtype, tuple]] = {
    "codes": (np.dtype(np.int16), ("grid",)),
    "latents": (np.dtype(np.float32), ("D", "grid")),
    "encodings": (np.dtype(np.float32), ("D", "grid")),
    "labels": (np.dtype(np.int64), ()),
}


def _shape(tail: tuple, d: int, grid: tuple) -> tuple:
    out: list = []
    for x in tail:
        out += list(grid) if x == "grid" else [d if x == "D" else x]
    return tuple(out)


class LatentsError(ValueError):
    """``latents.h5`` does not match the schema or the configured VQ-VAE; the file is named."""


@dataclass
class LatentsInfo:
    """The attributes of a ``latents.h5``: K, D, vqvae_sha256, latent_mean/std and
    encoding_mean/std float64 (D,), the augmentation settings, the number of augmented rows,
    the number of classes of the labels (from ``dataset.h5``; 0 = unlabelled) and the code grid
    (h, w)."""

    num_embeddings: int
    embedding_dim: int
    vqvae_sha256: str
    latent_mean: np.ndarray
    latent_std: np.ndarray
    encoding_mean: np.ndarray
    encoding_std: np.ndarray
    augment: dict
    num_augmented: int = 0
    num_classes: int = 0
    grid: tuple = (7, 7)

    def scaling(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float64 (D,) of ``kind`` "latents" (quantized) or "encodings" (z_e)."""
        return (self.latent_mean, self.latent_std) if kind == "latents" else (self.encoding_mean, self.encoding_std)


@dataclass
class LatentSplit:
    """One split in memory: codes int16 (N, h, w), latents and encodings float32 (N, D, h, w),
    labels int64 (N,)."""

    codes: np.ndarray
    latents: np.ndarray
    encodings: np.ndarray
    labels: np.ndarray


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise LatentsError(f"latents file {str(path)!r} does not exist (run the extract_latents stage)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise LatentsError(f"{path}: not a readable HDF5 file ({exc})") from None


def _validate(f, path: Path, expect_vqvae_sha256: str | None) -> LatentsInfo:
    version = f.attrs.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise LatentsError(f"{path}: schema_version {version}, expected {SCHEMA_VERSION}; re-run extract_latents")
    for attr in ("K", "D", "vqvae_sha256", "latent_mean", "latent_std", "encoding_mean", "encoding_std", "augment"):
        if attr not in f.attrs:
            raise LatentsError(f"{path}: attribute {attr!r} is missing")
    vec = {
        k: np.asarray(f.attrs[k], dtype=np.float64)
        for k in ("latent_mean", "latent_std", "encoding_mean", "encoding_std")
    }
    try:
        augment = json.loads(str(f.attrs["augment"]))
    except json.JSONDecodeError:
        raise LatentsError(f"{path}: attribute 'augment' is not JSON") from None
    info = LatentsInfo(int(f.attrs["K"]), int(f.attrs["D"]), str(f.attrs["vqvae_sha256"]), augment=augment, **vec)
    if "grid" in f.attrs:
        info.grid = tuple(int(v) for v in f.attrs["grid"])
    if "num_classes" in f.attrs:
        info.num_classes = int(f.attrs["num_classes"])
    else:  # written before the attribute: 1 + the largest label
        info.num_classes = 1 + max(int(f[f"{s}/labels"][...].max(initial=-1)) for s in SPLITS if f"{s}/labels" in f)
    if expect_vqvae_sha256 is not None and info.vqvae_sha256 != expect_vqvae_sha256:
        raise LatentsError(
            f"{path}: made from a VQ-VAE checkpoint with SHA-256 {info.vqvae_sha256[:12]}..., but the configured "
            f"vqvae/model.pt has {expect_vqvae_sha256[:12]}...; re-run extract_latents"
        )
    for split in SPLITS + ((AUG_SPLIT,) if AUG_SPLIT in f else ()):
        n = None
        for name, (dtype, tail) in SCHEMA.items():
            key = f"{split}/{name}"
            if key not in f:
                raise LatentsError(f"{path}: dataset '/{key}' is missing")
            ds = f[key]
            shape = _shape(tail, info.embedding_dim, info.grid)
            if ds.dtype != dtype or tuple(ds.shape[1:]) != shape:
                raise LatentsError(
                    f"{path}: '/{key}' is {ds.dtype} {ds.shape}, expected {dtype} (N, {', '.join(map(str, shape))})"
                )
            if n is not None and ds.shape[0] != n:
                raise LatentsError(f"{path}: '/{key}' has {ds.shape[0]} rows, other datasets of '{split}' have {n}")
            n = ds.shape[0]
        if split == AUG_SPLIT:
            info.num_augmented = int(n)
    return info


def read_info(path: str | os.PathLike, expect_vqvae_sha256: str | None = None) -> LatentsInfo:
    """Validate the whole file and return its attributes.

    Args:
        expect_vqvae_sha256: if given, the file must have been made from this checkpoint.

    Raises:
        LatentsError: missing file, other schema version, missing dataset or attribute, wrong
            shape or dtype, or a VQ-VAE checkpoint hash mismatch.
    """
    p = Path(path)
    with _open(p) as f:
        return _validate(f, p, expect_vqvae_sha256)


def read_split(
    path: str | os.PathLike, split: str, expect_vqvae_sha256: str | None = None
) -> tuple[LatentSplit, LatentsInfo]:
    """Validate the file and read one split into memory (MNIST-sized data fits easily).

    Args:
        split: "train", "test" or "train_aug" (the augmented train copies; the file must have them).

    Raises:
        LatentsError: see :func:`read_info`; also an unknown split name, or "train_aug" in a
            file written with ``latents.augment_copies: 0``.
    """
    if split not in SPLITS + (AUG_SPLIT,):
        raise LatentsError(f"unknown split {split!r}; expected one of {SPLITS + (AUG_SPLIT,)}")
    p = Path(path)
    with _open(p) as f:
        info = _validate(f, p, expect_vqvae_sha256)
        if split not in f:
            raise LatentsError(
                f"{p}: has no '{split}' split (written with latents.augment_copies: 0); set latents.augment_copies > 0 "
                "and re-run extract_latents"
            )
        g = f[split]
        return LatentSplit(*(g[name][...] for name in ("codes", "latents", "encodings", "labels"))), info


def _check_free_space(dest: Path, dataset: Path, d: int, copies: int = 0, downsample: int = 4) -> None:
    """Refuse to start when the uncompressed size of ``latents.h5`` exceeds the free space.

    HDF5 can crash the process on a failed write, so a full disk is detected before writing.

    Raises:
        pipeline.io.DiskFullError: naming the file, the bytes needed and the bytes free.
    """
    import errno
    import shutil

    import h5py

    from pipeline.io import DiskFullError

    with h5py.File(dataset, "r") as f:
        n = sum(f[f"{s}/labels"].shape[0] for s in SPLITS if f"{s}/labels" in f)
        n += copies * (f["train/labels"].shape[0] if "train/labels" in f else 0)
        sides = f["train/images"].shape[2:] if "train/images" in f else (28, 28)
    cells = int(np.prod([s // downsample for s in sides]))
    need = n * (2 * d * cells * 4 + cells * 2 + 8) + (1 << 20)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full: writing {dest} needs up to {need / 1e6:.1f} MB but {free / 1e6:.1f} MB are free; nothing was "
            "written",
        )


def _augmented_train(
    images: np.ndarray, copies: int, degrees: float, shift: float, scale: float, seed: int, max_value: int = 255
):
    """Yield (start row, float images (N, C, H, W) in [0, 1]) of ``copies`` augmented copies of
    ``images`` uint8/uint16 (N, C, H, W) in 0..max_value, copy by copy, with a generator seeded by ``seed``."""
    import torch

    from pipeline.augment import random_affine

    g = torch.Generator().manual_seed(seed)
    n = len(images)
    for c in range(copies):
        x = torch.from_numpy(images.astype(np.float32)).div_(float(max_value))
        yield c * n, random_affine(x, degrees, shift, generator=g, max_scale=scale).clamp_(0, 1)


def extract_latents(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 3: encode every image of ``dataset.h5`` with the trained VQ-VAE into ``latents.h5``.

    Reads ``latents`` (batch_size, augment_copies, augment_degrees, augment_shift,
    augment_scale, seed). Images are read, encoded and written batch by batch; with
    ``augment_copies`` > 0 the ``train_aug`` split holds the codes of that many augmented copies
    of every train image.

    Returns:
        metrics dict (N per split, codes in use, wall time).

    Raises:
        pipeline.io.DiskFullError: not enough free space for the file (checked before writing).
    """
    import h5py
    import torch

    from pipeline.checkpoint import load_model
    from pipeline.data import read_dataset, read_num_classes
    from pipeline.data import read_info as read_image_info
    from pipeline.runtime import log, resolve_device, stage_record

    paths = RunPaths(run_dir)
    sec = cfg["latents"]
    bs = int(sec["batch_size"])
    copies = int(sec.get("augment_copies", 0))
    augment = {
        "copies": copies,
        "degrees": float(sec.get("augment_degrees", 0.0)),
        "shift": float(sec.get("augment_shift", 0.0)),
        "scale": float(sec.get("augment_scale", 0.0)),
        "seed": int(sec.get("seed", 0)),
    }
    with stage_record("extract_latents", cfg, paths.latents.parent, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vqvae, _ = load_model(paths.vqvae_model, device=device)
        vqvae.eval()
        k, d = vqvae.num_embeddings, vqvae.embedding_dim
        vq_sha = sha256_file(paths.vqvae_model)
        _check_free_space(paths.latents, paths.dataset, d, copies, getattr(vqvae, "downsample", 4))
        used = np.zeros(k, dtype=np.int64)
        sums = {
            kind: [np.zeros(d, dtype=np.float64), np.zeros(d, dtype=np.float64)] for kind in ("latents", "encodings")
        }
        count = 0

        def encode(x: torch.Tensor) -> dict[str, np.ndarray]:
            with torch.no_grad():
                z_e = vqvae.encode(x.to(device))
                codes = vqvae.quantizer.snap(z_e)
                lat = vqvae.quantizer.lookup(codes)
            return {
                "codes": codes.cpu().numpy().astype(np.int16),
                "latents": lat.cpu().numpy().astype(np.float32),
                "encodings": z_e.float().cpu().numpy(),
            }

        with atomic_path(paths.latents, suffix=".h5") as tmp, h5py.File(tmp, "w") as out:
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["K"] = k
            out.attrs["D"] = d
            out.attrs["num_classes"] = read_num_classes(paths.dataset)
            sides = read_image_info(paths.dataset).shape[1:]  # (H, W) or (D, H, W)
            f = getattr(vqvae, "downsample", 4)
            grid = tuple(int(s) // f for s in sides)
            if copies and len(grid) == 3:
                from pipeline.io import StageInputError

                raise StageInputError("latents.augment_copies > 0 is for 2D images; set it to 0 for volumes")
            if len(grid) == 3:  # about 4M voxels per batch of volumes
                bs = min(bs, max(1, 2**22 // int(np.prod(sides))))
            out.attrs["grid"] = list(grid)
            out.attrs["vqvae_sha256"] = vq_sha
            out.attrs["augment"] = json.dumps(augment, sort_keys=True)

            def create(split: str, n: int) -> dict:
                g = out.create_group(split)
                chunk = max(1, min(n, 256))
                return {
                    name: g.create_dataset(
                        name,
                        shape=(n, *_shape(tail, d, grid)),
                        dtype=dtype,
                        chunks=(chunk, *_shape(tail, d, grid)),
                        compression="gzip",
                    )
                    for name, (dtype, tail) in SCHEMA.items()
                }

            train_images = None
            for split in SPLITS:
                data = read_dataset(paths.dataset, split)
                n = len(data.labels)
                dsets = create(split, n)
                for start in range(0, n, bs):
                    x = torch.from_numpy(data.images[start : start + bs].astype(np.float32)).div_(float(data.max_value))
                    enc = encode(x)
                    m = len(enc["codes"])
                    for name, arr in enc.items():
                        dsets[name][start : start + m] = arr
                    dsets["labels"][start : start + m] = data.labels[start : start + m]
                    if split == "train":
                        used += np.bincount(enc["codes"].ravel().astype(np.int64), minlength=k)
                        axes = (0, *range(2, enc["latents"].ndim))  # all but the channel
                        for kind in ("latents", "encodings"):
                            sums[kind][0] += enc[kind].sum(axis=axes, dtype=np.float64)
                            sums[kind][1] += (enc[kind].astype(np.float64) ** 2).sum(axis=axes)
                        count += m * int(np.prod(enc["codes"].shape[1:]))
                if split == "train":
                    train_images, train_labels, max_value = data.images, data.labels, data.max_value
                metrics[f"num_{split}"] = n
                log.info("extract_latents: %s %d images encoded", split, n)
            if copies:
                n = len(train_labels)
                dsets = create(AUG_SPLIT, copies * n)
                aug_used = np.zeros(k, dtype=np.int64)
                for row0, xa in _augmented_train(
                    train_images,
                    copies,
                    augment["degrees"],
                    augment["shift"],
                    augment["scale"],
                    augment["seed"],
                    max_value,
                ):
                    for start in range(0, n, bs):
                        enc = encode(xa[start : start + bs])
                        m = len(enc["codes"])
                        for name, arr in enc.items():
                            dsets[name][row0 + start : row0 + start + m] = arr
                        dsets["labels"][row0 + start : row0 + start + m] = train_labels[start : start + m]
                        aug_used += np.bincount(enc["codes"].ravel().astype(np.int64), minlength=k)
                metrics[f"num_{AUG_SPLIT}"] = copies * n
                metrics["codes_in_use_train_aug"] = int((aug_used > 0).sum())
                log.info(
                    "extract_latents: %s %d augmented copies encoded (%d per train image)",
                    AUG_SPLIT,
                    copies * n,
                    copies,
                )
            for kind, attr in (("latents", "latent"), ("encodings", "encoding")):
                mean = sums[kind][0] / max(count, 1)
                std = np.sqrt(np.maximum(sums[kind][1] / max(count, 1) - mean**2, 1e-12))
                out.attrs[f"{attr}_mean"] = mean
                out.attrs[f"{attr}_std"] = std
        metrics.update(codes_in_use_train=int((used > 0).sum()), K=k, D=d, vqvae_sha256=vq_sha, augment=augment)
    return metrics
