import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.config import resolve
from pipeline.data import (
    IDX_FILES,
    DataError,
    Split,
    load_idx_source,
    load_mnist5k,
    parse_idx,
    read_dataset,
    write_dataset,
)


def write_idx(
    path: Path, kind: str, arr: np.ndarray, magic: int | None = None, dims=None, gz: bool = True, extra: bytes = b""
) -> Path:
    magic = magic if magic is not None else (0x803 if kind == "images" else 0x801)
    dims = dims if dims is not None else arr.shape
    raw = (
        struct.pack(">I", magic)[:3]
        + bytes([len(dims)])
        + struct.pack(f">{len(dims)}I", *dims)
        + arr.astype(np.uint8).tobytes()
        + extra
    )
    raw = struct.pack(">I", magic) + raw[4:] if magic is not None else raw
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_idx_folder(folder: Path, n_train=30, n_test=10, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        write_idx(folder / IDX_FILES[f"{split}_images"], "images", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / IDX_FILES[f"{split}_labels"], "labels", rng.integers(0, 10, n))
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in IDX_FILES.values()}


def test_parse_idx_roundtrip(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    p = write_idx(tmp_path / "x-images-idx3-ubyte.gz", "images", imgs)
    assert np.array_equal(parse_idx(p, "images"), imgs.astype(np.uint8))
    labels = np.array([1, 2, 3])
    q = write_idx(tmp_path / "x-labels-idx1-ubyte", "labels", labels, gz=False)
    assert parse_idx(q, "labels").tolist() == [1, 2, 3]


def test_parse_idx_errors_name_the_file(tmp_path):
    imgs = np.zeros((2, 28, 28))
    wrong_magic = write_idx(tmp_path / "a.gz", "images", imgs, magic=0x801)
    with pytest.raises(DataError, match=r"a\.gz: magic number 0x00000801, expected 0x00000803"):
        parse_idx(wrong_magic, "images")
    wrong_dims = write_idx(tmp_path / "b.gz", "images", np.zeros((2, 32, 32)))
    with pytest.raises(DataError, match=r"b\.gz: image dimensions \(32, 32\), expected \(28, 28\)"):
        parse_idx(wrong_dims, "images")
    short = write_idx(tmp_path / "c.gz", "images", imgs, dims=(3, 28, 28))
    with pytest.raises(DataError, match=r"c\.gz: header says 3 items"):
        parse_idx(short, "images")
    good = write_idx(tmp_path / "d.gz", "images", imgs).read_bytes()
    (tmp_path / "e.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"e\.gz: gzip stream is corrupt or truncated"):
        parse_idx(tmp_path / "e.gz", "images")
    with pytest.raises(DataError, match="does not exist"):
        parse_idx(tmp_path / "missing.gz", "images")


def test_idx_source_from_path(tmp_path):
    make_idx_folder(tmp_path / "mnist", 30, 10)
    cfg = resolve(overrides=["data.source=mnist", f"data.path={tmp_path / 'mnist'}"])["data"]
    splits, digests = load_idx_source(cfg)
    assert splits["train"].images.shape == (30, 1, 28, 28) and splits["test"].labels.shape == (10,)
    assert set(digests) == set(IDX_FILES.values())


def test_idx_source_missing_file_without_download(tmp_path):
    cfg = resolve(overrides=["data.source=fashion_mnist", f"data.path={tmp_path}"])["data"]
    with pytest.raises(
        DataError,
        match="train-images-idx3-ubyte.gz does not exist; "
        "put the fashion_mnist IDX files in data.path or set data.download: true",
    ):
        load_idx_source(cfg)


@pytest.fixture
def http_server(tmp_path):
    """A static file server on 127.0.0.1 (random port) serving tmp_path/www; shut down after."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_checks_sha256_and_skips_dead_mirror(tmp_path, http_server):
    root, url = http_server
    digests = make_idx_folder(root / "mnist", 20, 5)
    dest = tmp_path / "dl"
    overrides = [
        "data.source=mnist",
        f"data.path={dest}",
        "data.download=true",
        "data.timeout_s=5",
        f"data.mirrors=['http://127.0.0.1:9/nothing/', '{url}mnist/']",
    ]
    import json

    splits, got = load_idx_source(
        resolve(json_text=json.dumps({"data": {"sha256": digests}}), overrides=overrides)["data"]
    )
    assert got == digests and splits["train"].images.shape == (20, 1, 28, 28)
    assert not list(dest.glob("*.tmp"))  # no temporary files left


def test_download_sha256_mismatch_is_an_error(tmp_path, http_server):
    root, url = http_server
    make_idx_folder(root / "mnist", 5, 5)
    dest = tmp_path / "dl"
    cfg = resolve(
        overrides=["data.source=mnist", f"data.path={dest}", "data.download=true", f"data.mirrors=['{url}mnist/']"]
    )["data"]
    # the built-in checksums are those of the real MNIST files, not of these test files
    with pytest.raises(
        DataError,
        match=r"(?s)could not download 'train-images-idx3-ubyte.gz'"
        r".*SHA-256 mismatch: got [0-9a-f]{64}, expected 440fcabf",
    ):
        load_idx_source(cfg)
    assert not dest.exists() or not any(dest.iterdir())  # nothing half-written


def test_mnist5k_split_is_stratified_and_seeded():
    cfg = resolve()["data"]
    a, digests = load_mnist5k(cfg)
    assert a["train"].images.shape == (4500, 1, 28, 28) and a["train"].images.dtype == np.uint8
    assert np.bincount(a["test"].labels).tolist() == [50] * 10
    assert list(digests) == ["mnist_5k.csv.gz"]
    b, _ = load_mnist5k(cfg)
    c, _ = load_mnist5k({**cfg, "seed": 1})
    assert np.array_equal(a["test"].labels, b["test"].labels)
    assert not np.array_equal(a["test"].images, c["test"].images)


def test_dataset_h5_schema_checks(tmp_path):
    split = Split(np.zeros((4, 1, 28, 28), np.uint8), np.arange(4))
    p = tmp_path / "dataset.h5"
    write_dataset(p, {"train": split, "test": split}, "mnist5k", {"f": "0" * 64}, 0)
    assert read_dataset(p, "train").images.shape == (4, 1, 28, 28)
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(DataError, match=r"dataset.h5: schema_version 99, expected 2"):
        read_dataset(p, "train")
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 1
        del f["test/labels"]
    with pytest.raises(DataError, match=r"dataset '/test/labels' is missing"):
        read_dataset(p, "test")


def test_prepare_data_output(tiny_run):
    p = tiny_run / "data" / "dataset.h5"
    with h5py.File(p) as f:
        assert f.attrs["schema_version"] == 2 and f.attrs["source"] == "mnist5k"
        assert f["train/images"].dtype == np.uint8 and f["train/images"].shape == (300, 1, 28, 28)
        assert f["test/labels"].shape == (100,)
        assert len(f.attrs["sha256"]) > 64


def test_the_number_of_classes_comes_from_the_labels(tiny_run, tmp_path):
    """dataset.h5 records num_classes (1 + the largest label); the classifier, the conditional
    priors (through latents.h5) and the sample sets read it instead of a literal 10."""
    import shutil

    import h5py

    from pipeline.data import Split, num_classes_of, read_num_classes, write_dataset
    from pipeline.latents import read_split
    from pipeline.sets import requested_labels

    path = tiny_run / "data" / "dataset.h5"
    assert read_num_classes(path) == 10
    assert read_split(tiny_run / "latents" / "latents.h5", "train")[1].num_classes == 10
    three = {
        "train": Split(np.zeros((4, 1, 28, 28), np.uint8), np.array([0, 2, 1, 2])),
        "test": Split(np.zeros((2, 1, 28, 28), np.uint8), np.array([0, 1])),
    }
    write_dataset(tmp_path / "three.h5", three, "test", {}, 0)
    assert num_classes_of(three) == 3 and read_num_classes(tmp_path / "three.h5") == 3
    # a file written before the attribute: counted from the labels
    old = tmp_path / "old.h5"
    shutil.copy(tmp_path / "three.h5", old)
    with h5py.File(old, "a") as f:
        del f.attrs["num_classes"]
    assert read_num_classes(old) == 3
    assert requested_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
