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
    "LatentScaling",
    "read_info",
    "read_split",
    "train_splits",
    "encode_batch",
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


@dataclass(frozen=True)
class LatentScaling:
    """The map between the VQ-VAE's latents and the space the latent diffusion model works in:
    per channel, z_scaled = (z - mean) / std, unit variance per channel (Rombach et al. 2022,
    sec. 4.3.2 and appendix G, rescale their latents to unit variance the same way), and the
    per-channel range of the scaled train latents, to which a sampler clips its predicted x_0.
    Made once by the training stage (:meth:`fit`), saved with the prior (:meth:`state`) and read
    by the sampler (:meth:`from_state`): the one definition both sides use.

    Attributes:
        kind: "latents" (the quantized codebook vectors) or "encodings" (the encoder's z_e).
        mean, std: float64 (D,) numpy, from ``latents.h5``'s attributes.
        low, high: float32 (D,) tensors (CPU), the min and max of the scaled train latents.
    """

    kind: str
    mean: np.ndarray
    std: np.ndarray
    low: object = None
    high: object = None

    @staticmethod
    def _per_channel(v, device, spatial: int):
        import torch

        return torch.as_tensor(v).float().to(device).view(1, -1, *([1] * spatial))

    @classmethod
    def fit(cls, info: LatentsInfo, kind: str, train) -> LatentScaling:
        """The scaling of ``kind`` with the per-channel range of the scaled train latents
        ``train``: float32 (N, D, *grid) tensors, the whole split or its batches one after
        another (an iterable: one pass, one batch held)."""
        import torch

        mean, std = info.scaling(kind)
        scaling = cls(kind, mean, std)
        low = high = None
        for batch in [train] if isinstance(train, torch.Tensor) else train:
            scaled = scaling.scale(batch)
            dims = (0, *range(2, scaled.dim()))
            lo, hi = scaled.amin(dim=dims).cpu(), scaled.amax(dim=dims).cpu()
            low = lo if low is None else torch.minimum(low, lo)
            high = hi if high is None else torch.maximum(high, hi)
        return cls(kind, mean, std, low, high)

    def scale(self, z):
        """Latents float (N, D, *grid) tensor -> the diffusion model's space, same shape."""
        spatial = z.dim() - 2
        return (z - self._per_channel(self.mean, z.device, spatial)) / self._per_channel(self.std, z.device, spatial)

    def unscale(self, x):
        """The diffusion model's space (N, D, *grid) -> latents, x * std + mean."""
        spatial = x.dim() - 2
        return x * self._per_channel(self.std, x.device, spatial) + self._per_channel(self.mean, x.device, spatial)

    def clip_range(self, device, spatial: int) -> tuple:
        """(low, high) float32 (1, D, 1, ...) on ``device``: the range the sampler clips x_0 to."""
        return self._per_channel(self.low, device, spatial), self._per_channel(self.high, device, spatial)

    def state(self) -> dict:
        """What ``model.pt`` stores (keys ``latent``, ``latent_mean``, ``latent_std`` float64
        tensors, ``latent_min``, ``latent_max`` float32 tensors)."""
        import torch

        return {
            "latent": "quantized" if self.kind == "latents" else "encoder",
            "latent_mean": torch.tensor(self.mean),
            "latent_std": torch.tensor(self.std),
            "latent_min": self.low,
            "latent_max": self.high,
        }

    @classmethod
    def from_state(cls, state: Mapping) -> LatentScaling:
        """The scaling saved in a prior's ``model.pt`` (:meth:`state`)."""
        kind = "encodings" if state.get("latent", "quantized") == "encoder" else "latents"
        return cls(
            kind,
            state["latent_mean"].double().numpy(),
            state["latent_std"].double().numpy(),
            state["latent_min"].float(),
            state["latent_max"].float(),
        )


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


def train_splits(path: str | os.PathLike, augmented: bool = False) -> tuple[str, ...]:
    """The groups of the train rows: ``("train",)``, with ``augmented`` also ``"train_aug"`` (the
    codes of augmented train images, appended in that order).

    Raises:
        LatentsError: ``augmented`` with a file written with ``latents.augment_copies: 0``.
    """
    if not augmented:
        return ("train",)
    p = Path(path)
    with _open(p) as f:
        if AUG_SPLIT not in f:
            raise LatentsError(
                f"{p}: has no '{AUG_SPLIT}' split (written with latents.augment_copies: 0); set "
                "latents.augment_copies > 0 and re-run extract_latents"
            )
    return ("train", AUG_SPLIT)


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


def _augmented_batches(
    path,
    copies: int,
    degrees: float,
    shift: float,
    scale: float,
    seed: int,
    bs: int,
    volume_cfg=None,
    intensity: bool = True,
):
    """Yield (start row, float images (B, C, *S) in [0, 1], labels int64 (B,)) of ``copies``
    augmented copies of the train split of ``dataset.h5`` at ``path``, copy by copy and batch by
    batch (one batch in memory), seeded by ``seed``: images by :func:`pipeline.augment.random_affine`
    (``degrees``, ``shift``, ``scale``), volumes by the ``data.volume_*`` transform of
    ``volume_cfg`` (:func:`pipeline.volumes.volume_transform`: elastic + affine, and with
    ``intensity`` its bias field, gamma and noise too). On ``anatomy3d.yaml``, whose train
    volumes are already such copies, the second intensity draw widens the law of the mean
    intensity (1st percentile 0.37 in train, 0.23 in the copies) and still wins: the warp alone
    gave worse FD / floor (docs/ablations.md A5)."""
    import torch

    from pipeline.augment import random_affine
    from pipeline.data import iter_split

    g = torch.Generator().manual_seed(seed)
    transform = None
    row = 0
    for _ in range(copies):
        for batch in iter_split(path, "train", bs):
            x = torch.from_numpy(batch.images.astype(np.float32)).div_(float(batch.max_value))
            if x.dim() == 5:
                from pipeline.volumes import augment_one, volume_transform

                transform = transform or volume_transform(volume_cfg, seed, intensity=intensity)
                xa = torch.stack([torch.from_numpy(augment_one(transform, v.numpy())) for v in x])
            else:
                xa = random_affine(x, degrees, shift, generator=g, max_scale=scale).clamp_(0, 1)
            yield row, xa, batch.labels
            row += len(x)


def encode_batch(vqvae, x, device) -> dict[str, np.ndarray]:
    """Images float (B, C, *S) in [0, 1] -> {"codes": int16 (B, *grid), "latents": float32 (B, D,
    *grid) (the codebook vectors of the codes), "encodings": float32 (B, D, *grid) (z_e)}, in
    float32 (never under autocast: the codes are the float32 encoder's)."""
    import torch

    with torch.no_grad():
        z_e = vqvae.encode(x.to(device))
        codes = vqvae.quantizer.snap(z_e)
        lat = vqvae.quantizer.lookup(codes)
    return {
        "codes": codes.cpu().numpy().astype(np.int16),
        "latents": lat.cpu().numpy().astype(np.float32),
        "encodings": z_e.float().cpu().numpy(),
    }


class _TrainStatistics:
    """What the train split's latents add up to: code counts (K,) and, per channel, the sums
    of the latents and encodings and of their squares (float64), for the scaling attributes."""

    def __init__(self, k: int, d: int):
        self.used = np.zeros(k, dtype=np.int64)
        self.sums = {kind: [np.zeros(d, np.float64), np.zeros(d, np.float64)] for kind in ("latents", "encodings")}
        self.count = 0

    def add(self, enc: Mapping[str, np.ndarray]) -> None:
        self.used += np.bincount(enc["codes"].ravel().astype(np.int64), minlength=len(self.used))
        axes = (0, *range(2, enc["latents"].ndim))  # all but the channel
        for kind in ("latents", "encodings"):
            self.sums[kind][0] += enc[kind].sum(axis=axes, dtype=np.float64)
            self.sums[kind][1] += (enc[kind].astype(np.float64) ** 2).sum(axis=axes)
        self.count += len(enc["codes"]) * int(np.prod(enc["codes"].shape[1:]))

    def write(self, attrs) -> None:
        """The per-channel mean and std float64 (D,) of the latents and encodings as attributes."""
        for kind, attr in (("latents", "latent"), ("encodings", "encoding")):
            mean = self.sums[kind][0] / max(self.count, 1)
            std = np.sqrt(np.maximum(self.sums[kind][1] / max(self.count, 1) - mean**2, 1e-12))
            attrs[f"{attr}_mean"] = mean
            attrs[f"{attr}_std"] = std


def _create_split(out, split: str, n: int, d: int, grid: tuple) -> dict:
    """The datasets of one split in the open ``latents.h5`` ``out`` (gzip, chunks of about
    :data:`pipeline.data.CHUNK_BYTES`: the streaming path reads random rows)."""
    from pipeline.data import stream_chunk_rows

    g = out.create_group(split)
    return {
        name: g.create_dataset(
            name,
            shape=(n, *_shape(tail, d, grid)),
            dtype=dtype,
            chunks=(stream_chunk_rows(_shape(tail, d, grid), np.dtype(dtype).itemsize, n), *_shape(tail, d, grid)),
            compression="gzip",
        )
        for name, (dtype, tail) in SCHEMA.items()
    }


def _write_rows(dsets: Mapping, row0: int, enc: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
    m = len(enc["codes"])
    for name, arr in enc.items():
        dsets[name][row0 : row0 + m] = arr
    dsets["labels"][row0 : row0 + m] = labels


def _write_augmented(
    out, encode, dataset, n: int, augment: Mapping, bs: int, d: int, grid: tuple, volume_cfg=None
) -> dict:
    """The ``train_aug`` split: the codes of ``copies`` seeded augmented copies of each of the
    ``n`` train images of ``dataset`` (volumes: with the ``data.volume_*`` transform of
    ``volume_cfg``), batch by batch; its metrics (rows, codes in use)."""
    copies = augment["copies"]
    dsets = _create_split(out, AUG_SPLIT, copies * n, d, grid)
    used = np.zeros(out.attrs["K"], dtype=np.int64)
    a = augment
    batches = _augmented_batches(
        dataset, copies, a["degrees"], a["shift"], a["scale"], a["seed"], bs, volume_cfg, a["intensity"]
    )
    for row0, xa, labels in batches:
        enc = encode(xa)
        _write_rows(dsets, row0, enc, labels)
        used += np.bincount(enc["codes"].ravel().astype(np.int64), minlength=len(used))
    return {f"num_{AUG_SPLIT}": copies * n, "codes_in_use_train_aug": int((used > 0).sum())}


def _return_large_buffers() -> None:
    """glibc only: allocations over 128 KiB are mmapped and given back when freed. By default the
    threshold rises with each large free, and the per-batch arrays of a long pass then come from
    the heap and fragment it: measured, extract_latents' peak grew 409 -> 573 MB from 20,000 to
    320,000 images, and stayed at 396 MB at 320,000 with this setting."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def extract_latents(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 3: encode every image of ``dataset.h5`` with the trained VQ-VAE into ``latents.h5``.

    Reads ``latents`` (batch_size, augment_copies, augment_degrees, augment_shift,
    augment_scale, augment_intensity, seed). Images are read, encoded (:func:`encode_batch`) and written batch by
    batch (its memory does not grow with the data); with ``augment_copies`` > 0 the
    ``train_aug`` split holds the codes of that many augmented copies of every train image
    (volumes: drawn with the ``data.volume_*`` transform, :func:`pipeline.volumes.volume_transform`,
    its elastic + affine half unless ``augment_intensity``).

    Returns:
        metrics dict (N per split, codes in use, wall time).

    Raises:
        pipeline.io.DiskFullError: not enough free space for the file (checked before writing).
    """
    import h5py
    import torch

    from pipeline.checkpoint import load_model
    from pipeline.data import iter_split, read_num_classes, split_length
    from pipeline.data import read_info as read_image_info
    from pipeline.runtime import log, resolve_device, stage_record

    paths = RunPaths(run_dir)
    section = cfg["latents"]
    bs = int(section["batch_size"])
    _return_large_buffers()
    copies = int(section.get("augment_copies", 0))
    augment = {
        "copies": copies,
        "degrees": float(section.get("augment_degrees", 0.0)),
        "shift": float(section.get("augment_shift", 0.0)),
        "scale": float(section.get("augment_scale", 0.0)),
        "seed": int(section.get("seed", 0)),
        "intensity": bool(section.get("augment_intensity", True)),
    }
    with stage_record("extract_latents", cfg, paths.latents.parent, threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        vqvae, _ = load_model(paths.vqvae_model, device=device)
        vqvae.eval()
        k, d = vqvae.num_embeddings, vqvae.embedding_dim
        vq_sha = sha256_file(paths.vqvae_model)
        _check_free_space(paths.latents, paths.dataset, d, copies, getattr(vqvae, "downsample", 4))
        stats = _TrainStatistics(k, d)
        sides = read_image_info(paths.dataset).shape[1:]  # (H, W) or (D, H, W)
        grid = tuple(int(s) // getattr(vqvae, "downsample", 4) for s in sides)
        if len(grid) == 3:  # about 4M voxels per batch of volumes
            bs = min(bs, max(1, 2**22 // int(np.prod(sides))))

        def encode(x: torch.Tensor) -> dict[str, np.ndarray]:
            return encode_batch(vqvae, x, device)

        with atomic_path(paths.latents, suffix=".h5") as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update(schema_version=SCHEMA_VERSION, K=k, D=d, num_classes=read_num_classes(paths.dataset))
            out.attrs.update(grid=list(grid), vqvae_sha256=vq_sha, augment=json.dumps(augment, sort_keys=True))
            for split in SPLITS:  # batch by batch: one batch of images in memory
                n = split_length(paths.dataset, split)
                dsets = _create_split(out, split, n, d, grid)
                start = 0
                for batch in iter_split(paths.dataset, split, bs):
                    x = torch.from_numpy(batch.images.astype(np.float32)).div_(float(batch.max_value))
                    enc = encode(x)
                    _write_rows(dsets, start, enc, batch.labels)
                    start += len(x)
                    if split == "train":
                        stats.add(enc)
                metrics[f"num_{split}"] = n
                log.info("extract_latents: %s %d images encoded", split, n)
            if copies:
                metrics.update(
                    _write_augmented(
                        out, encode, paths.dataset, metrics["num_train"], augment, bs, d, grid, cfg["data"]
                    )
                )
                log.info("extract_latents: %s augmented copies encoded (%d per train image)", AUG_SPLIT, copies)
            stats.write(out.attrs)
        metrics.update(codes_in_use_train=int((stats.used > 0).sum()), K=k, D=d, vqvae_sha256=vq_sha, augment=augment)
    return metrics
