"""A dataset larger than a memory limit runs through the chain under that limit, from an HDF5
source through prepare_data (read and written block by block) to evaluate (rows streamed from
HDF5), where the in-memory path is killed.

The limit is a memory cgroup (v1 or v2; what SLURM's ``--mem`` sets up on a cluster), which
counts the resident memory of the stage's process and its DataLoader workers. Skipped where no
cgroup can be made, except under CI=true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
LIMIT = 600 * 2**20  # the stage's process (~400 MB with torch) plus 200 MB
ROWS = 110_000  # 28x28 images: 86 MB as uint8 on disk, 345 MB as float32 in memory


def _cgroup_root() -> tuple[Path, str] | None:
    """(a writable memory cgroup parent, "v1" | "v2") or None."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, "v1"
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split() and os.access(v2, os.W_OK):
        return v2, "v2"
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh memory cgroup of ``limit`` bytes (swap off for it where the kernel allows);
    yields a function that wraps a command to run inside it."""
    found = _cgroup_root()
    if found is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI=true but no memory cgroup can be made for the memory-limit test")
        pytest.skip("no writable memory cgroup here")
    root, version = found
    group = root / f"vqlp-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        if version == "v1":
            (group / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):
                (group / "memory.swappiness").write_text("0")
        else:
            (group / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
        procs = group / "cgroup.procs"
        yield lambda cmd: ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                group.rmdir()
                break
            import time

            time.sleep(0.1)


def _big_source(tiny_run: Path, path: Path) -> list[str]:
    """An HDF5 source of ROWS + 500 28x28 digits (the tiny run's images rolled by a few pixels,
    written in chunks) and the ``--set`` s that make it the run's data."""
    with h5py.File(tiny_run / "data" / "dataset.h5") as f:
        base = np.concatenate([f["train/images"][:, 0], f["test/images"][:, 0]])
        labels = np.concatenate([f["train/labels"][:], f["test/labels"][:]])
    n = ROWS + 500
    with h5py.File(path, "w") as g:
        images = g.create_dataset("images", (n, 28, 28), np.uint8, chunks=(1024, 28, 28), compression="gzip")
        out_labels = g.create_dataset("labels", (n,), np.int64)
        for start in range(0, n, len(base)):
            k = min(len(base), n - start)
            images[start : start + k] = np.roll(base[:k], (start // len(base)) % 5 - 2, axis=-1)
            out_labels[start : start + k] = labels[:k]
    sets = ["data.source=hdf5", f"data.path={path}", "data.labels_key=labels", "data.test_size=500"]
    return [v for s in [*sets, "data.max_train=null", "data.max_test=null"] for v in ("--set", s)]


def _stage(wrap, stage: str, run: Path, *sets: str) -> subprocess.CompletedProcess:
    """``python -m pipeline <stage>`` on the tiny config with ``sets``, inside ``wrap``."""
    cmd = [sys.executable, "-m", "pipeline", stage, "--run", str(run), "--configfile", str(TINY), "--threads", "2"]
    cmd += ["--set", "latents.augment_copies=0", "--set", "data_workers=1", "--set", "tensorboard=false", *sets]
    return subprocess.run(wrap(cmd), capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.heavy
def test_a_dataset_larger_than_the_memory_limit_runs_streamed(tiny_run, tmp_path):
    run = tmp_path / "big"
    data = _big_source(tiny_run, tmp_path / "source.h5")
    float32_bytes = ROWS * 28 * 28 * 4
    assert float32_bytes > LIMIT / 2  # with the ~400 MB of the process itself: over the limit
    with memory_cgroup(LIMIT) as wrap:
        # prepare_data reads the source and writes dataset.h5 block by block
        done = _stage(wrap, "prepare_data", run, *data)
        assert done.returncode == 0, f"prepare_data under {LIMIT >> 20} MiB:\n{done.stderr[-3000:]}"
        # today's whole-split path under the same limit: killed by the cgroup (or out of memory)
        forced = _stage(wrap, "train_vqvae", run, *data, "--set", "data_loading=memory", "--set", "vqvae.steps=5")
        assert forced.returncode != 0
        assert not (run / "vqvae" / "model.pt").exists()
        shutil.rmtree(run / "vqvae", ignore_errors=True)
        for stage, extra in (
            ("train_vqvae", []),
            ("extract_latents", []),
            ("train_classifier", []),
            ("train_pixelcnn", []),
            ("train_diffusion", []),
            ("sample", ["--sample-set", "pixelcnn"]),
            ("evaluate", ["--set", "sample.sets=[pixelcnn]"]),
        ):
            done = _stage(wrap, stage, run, *data, *extra)
            assert done.returncode == 0, f"{stage} under {LIMIT >> 20} MiB:\n{done.stderr[-3000:]}"
            if stage in ("train_vqvae", "train_classifier", "evaluate"):  # the images: over the budget
                assert "stream path (data_loading: auto)" in done.stderr, (stage, done.stderr[-2000:])
    with h5py.File(run / "data" / "dataset.h5") as f:
        assert f["train/images"].shape == (ROWS, 1, 28, 28) and f["test/images"].shape == (500, 1, 28, 28)
        assert int(f.attrs["num_classes"]) == 10 and set(np.unique(f["train/labels"][:])) == set(range(10))
    with h5py.File(run / "latents" / "latents.h5") as f:
        assert f["train/codes"].shape[0] == ROWS
    assert (run / "report" / "metrics.json").is_file()
