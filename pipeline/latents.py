"""``latents.h5``: its schema, its only writer (the extract_latents stage) and its only reader.

Writer and reader share one definition (:data:`SCHEMA`), as rosinality/vq-vae-2-pytorch's
``extract_code.py`` and ``dataset.py`` share ``CodeRow``.

Schema (version 1), for each split ``train`` and ``test``::

    /<split>/codes    int16   (N, 7, 7)     codebook indices in [0, K)
    /<split>/latents  float32 (N, D, 7, 7)  the quantized embeddings e_{codes}
    /<split>/labels   int64   (N,)
    attrs: schema_version=1, K, D, vqvae_sha256 (SHA-256 of the vqvae/model.pt bytes),
           latent_mean, latent_std (float64 (D,): per-channel mean and std of the train
           latents, used to scale the latents to unit variance for diffusion)

Datasets are chunked and gzip-compressed; the writer encodes in batches and writes each batch
as it comes (the dataset is never held whole in memory as latents); the file is written under
a temporary name and renamed only when complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from pipeline.io import RunPaths, atomic_path, sha256_file

__all__ = ["SCHEMA_VERSION", "SCHEMA", "LatentsError", "LatentsInfo", "LatentSplit", "read_info", "read_split", "extract_latents"]

SCHEMA_VERSION = 1
SPLITS = ("train", "test")

#: dataset name -> (dtype, shape after N, with "D" for the embedding dimension)
SCHEMA: dict[str, tuple[np.dtype, tuple]] = {
    "codes": (np.dtype(np.int16), (7, 7)),
    "latents": (np.dtype(np.float32), ("D", 7, 7)),
    "labels": (np.dtype(np.int64), ()),
}


class LatentsError(ValueError):
    """``latents.h5`` does not match the schema or the configured VQ-VAE; the file is named."""


@dataclass
class LatentsInfo:
    """The attributes of a ``latents.h5``: K, D, vqvae_sha256, latent_mean/std float64 (D,)."""

    num_embeddings: int
    embedding_dim: int
    vqvae_sha256: str
    latent_mean: np.ndarray
    latent_std: np.ndarray


@dataclass
class LatentSplit:
    """One split in memory: codes int16 (N, 7, 7), latents float32 (N, D, 7, 7), labels int64 (N,)."""

    codes: np.ndarray
    latents: np.ndarray
    labels: np.ndarray


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise LatentsError(f"latents file {str(path)!r} does not exist (run the extract_latents stage)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise LatentsError(f"{path}: not a readable HDF5 file ({exc})") from None


def _validate(f, path: Path, expect_vqvae_sha256: Optional[str]) -> LatentsInfo:
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LatentsError(f"{path}: schema_version {version}, expected {SCHEMA_VERSION}; re-run extract_latents")
    for attr in ("K", "D", "vqvae_sha256", "latent_mean", "latent_std"):
        if attr not in f.attrs:
            raise LatentsError(f"{path}: attribute {attr!r} is missing")
    info = LatentsInfo(int(f.attrs["K"]), int(f.attrs["D"]), str(f.attrs["vqvae_sha256"]), np.asarray(f.attrs["latent_mean"], dtype=np.float64), np.asarray(f.attrs["latent_std"], dtype=np.float64))
    if expect_vqvae_sha256 is not None and info.vqvae_sha256 != expect_vqvae_sha256:
        raise LatentsError(
            f"{path}: made from a VQ-VAE checkpoint with SHA-256 {info.vqvae_sha256[:12]}..., but the configured "
            f"vqvae/model.pt has {expect_vqvae_sha256[:12]}...; re-run extract_latents"
        )
    for split in SPLITS:
        n = None
        for name, (dtype, tail) in SCHEMA.items():
            key = f"{split}/{name}"
            if key not in f:
                raise LatentsError(f"{path}: dataset '/{key}' is missing")
            ds = f[key]
            shape = tuple(info.embedding_dim if d == "D" else d for d in tail)
            if ds.dtype != dtype or tuple(ds.shape[1:]) != shape:
                raise LatentsError(f"{path}: '/{key}' is {ds.dtype} {ds.shape}, expected {dtype} (N, {', '.join(map(str, shape))})")
            if n is not None and ds.shape[0] != n:
                raise LatentsError(f"{path}: '/{key}' has {ds.shape[0]} rows, other datasets of '{split}' have {n}")
            n = ds.shape[0]
    return info


def read_info(path: str | os.PathLike, expect_vqvae_sha256: Optional[str] = None) -> LatentsInfo:
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


def read_split(path: str | os.PathLike, split: str, expect_vqvae_sha256: Optional[str] = None) -> tuple[LatentSplit, LatentsInfo]:
    """Validate the file and read one split into memory (MNIST-sized data fits easily).

    Raises:
        LatentsError: see :func:`read_info`; also an unknown split name.
    """
    if split not in SPLITS:
        raise LatentsError(f"unknown split {split!r}; expected one of {SPLITS}")
    p = Path(path)
    with _open(p) as f:
        info = _validate(f, p, expect_vqvae_sha256)
        g = f[split]
        return LatentSplit(g["codes"][...], g["latents"][...], g["labels"][...]), info


def _check_free_space(dest: Path, dataset: Path, d: int) -> None:
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
    need = n * (d * 49 * 4 + 49 * 2 + 8) + (1 << 20)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise DiskFullError(errno.ENOSPC, f"disk full: writing {dest} needs up to {need / 1e6:.1f} MB but {free / 1e6:.1f} MB are free; nothing was written")


def extract_latents(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 3: encode every image of ``dataset.h5`` with the trained VQ-VAE into ``latents.h5``.

    Reads ``latents.batch_size``. Images are read, encoded and written batch by batch.

    Returns:
        metrics dict (N per split, codes in use, wall time).

    Raises:
        pipeline.io.DiskFullError: not enough free space for the file (checked before writing).
    """
    import h5py
    import torch

    from pipeline.data import read_dataset
    from pipeline.runtime import log, resolve_device, stage_record
    from pipeline.train import load_model

    paths = RunPaths(run_dir)
    bs = int(cfg["latents"]["batch_size"])
    with stage_record("extract_latents", cfg, paths.latents.parent, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vqvae, _ = load_model(paths.vqvae_model, device=device)
        vqvae.eval()
        k, d = vqvae.num_embeddings, vqvae.embedding_dim
        vq_sha = sha256_file(paths.vqvae_model)
        _check_free_space(paths.latents, paths.dataset, d)
        used = np.zeros(k, dtype=np.int64)
        s1 = np.zeros(d, dtype=np.float64)
        s2 = np.zeros(d, dtype=np.float64)
        count = 0
        with atomic_path(paths.latents, suffix=".h5") as tmp, h5py.File(tmp, "w") as out:
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["K"] = k
            out.attrs["D"] = d
            out.attrs["vqvae_sha256"] = vq_sha
            for split in SPLITS:
                data = read_dataset(paths.dataset, split)
                n = len(data.labels)
                g = out.create_group(split)
                chunk = max(1, min(n, 256))
                dsets = {
                    name: g.create_dataset(name, shape=(n, *(d if x == "D" else x for x in tail)), dtype=dtype, chunks=(chunk, *(d if x == "D" else x for x in tail)), compression="gzip")
                    for name, (dtype, tail) in SCHEMA.items()
                }
                for start in range(0, n, bs):
                    x = torch.from_numpy(data.images[start : start + bs]).to(device).float().div_(255.0)
                    with torch.no_grad():
                        codes = vqvae.index_quantize(x)
                        lat = vqvae.quantizer.lookup(codes)
                    codes_np = codes.cpu().numpy()
                    lat_np = lat.cpu().numpy().astype(np.float32)
                    dsets["codes"][start : start + len(codes_np)] = codes_np.astype(np.int16)
                    dsets["latents"][start : start + len(codes_np)] = lat_np
                    dsets["labels"][start : start + len(codes_np)] = data.labels[start : start + len(codes_np)]
                    if split == "train":
                        used += np.bincount(codes_np.ravel(), minlength=k)
                        s1 += lat_np.sum(axis=(0, 2, 3), dtype=np.float64)
                        s2 += (lat_np.astype(np.float64) ** 2).sum(axis=(0, 2, 3))
                        count += lat_np.shape[0] * lat_np.shape[2] * lat_np.shape[3]
                metrics[f"num_{split}"] = n
                log.info("extract_latents: %s %d images encoded", split, n)
            mean = s1 / max(count, 1)
            std = np.sqrt(np.maximum(s2 / max(count, 1) - mean**2, 1e-12))
            out.attrs["latent_mean"] = mean
            out.attrs["latent_std"] = std
        metrics.update(codes_in_use_train=int((used > 0).sum()), K=k, D=d, vqvae_sha256=vq_sha)
    return metrics
