"""The streaming data path: HDF5 rows read in batches, the same batches as the memory path."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.streaming import Column, H5Rows, StageData, StepSampler, choose_path, iterate_rows
from pipeline.training import Batcher


@pytest.fixture()
def h5(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f["train/images"] = rng.integers(0, 256, (300, 1, 6, 6), dtype=np.uint8)
        f["train/labels"] = rng.integers(0, 10, 300)
        f["train_aug/images"] = rng.integers(0, 256, (50, 1, 6, 6), dtype=np.uint8)
    return path


def test_rows_are_read_for_any_indices_as_numpy_would_index(h5):
    with h5py.File(h5) as f:
        every = np.concatenate([f["train/images"][:], f["train_aug/images"][:]])
    rows = H5Rows({"images": Column(str(h5), ("train/images", "train_aug/images"), scale=255.0)})
    assert len(rows) == 350 and rows.float32_bytes == 350 * 36 * 4
    for idx in ([5, 3, 3, 349, 0], list(range(10, 42)), [299, 300], list(range(349, -1, -7)), [7]):
        got = rows.__getitems__(idx)
        assert torch.equal(got["index"], torch.tensor(idx))
        want = torch.from_numpy(every[idx].astype(np.float32)).div_(255.0)
        assert torch.equal(got["images"], want)


def test_columns_of_different_lengths_are_refused(h5):
    with pytest.raises(ValueError, match="different lengths"):
        H5Rows({"a": Column(str(h5), "train/images"), "b": Column(str(h5), "train_aug/images")})


def test_step_sampler_gives_the_batcher_s_indices_and_shards_them():
    b = Batcher(100, 8, seed=3)
    whole = list(StepSampler(b, 5, 30))
    assert len(whole) == 25 and whole[0] == b(5).tolist() and whole[-1] == b(29).tolist()
    shards = [list(StepSampler(b, 5, 30, rank=r, world=2)) for r in (0, 1)]
    assert shards[0][3] == b(8).tolist()[0::2] and shards[1][3] == b(8).tolist()[1::2]


def test_auto_picks_memory_while_the_rows_fit_and_a_bad_setting_is_named():
    cpu = torch.device("cpu")
    assert choose_path("auto", 1_000, cpu) == "memory"
    assert choose_path("auto", 1 << 60, cpu) == "stream"
    assert choose_path("stream", 1_000, cpu) == "stream"
    with pytest.raises(ValueError, match="data_loading.*'disk'"):
        choose_path("disk", 1, cpu)


@pytest.mark.parametrize("workers", [0, 2])
def test_both_paths_hand_the_same_rows_and_leave_the_global_rng_alone(h5, workers):
    cols = {"images": Column(str(h5), "train/images", scale=255.0), "labels": Column(str(h5), "train/labels", "int64")}
    b = Batcher(300, 32, seed=1)
    got = {}
    for path in ("memory", "stream"):
        data = StageData(cols, path, torch.device("cpu"), workers=workers)
        torch.manual_seed(0)
        data.start(b, 4, 20, rank=0, world=1, shard=True)
        rows = []
        for s in range(4, 20):
            idx = b(s)  # one step's indices: every column of the step is taken with them
            rows.append((data.take("images", idx, lambda t: t), data.take("labels", idx, lambda t: t)))
        got[path] = (rows, torch.rand(3))  # the loader drew nothing from the global RNG
        data.close()
    for (xm, ym), (xs, ys) in zip(got["memory"][0], got["stream"][0]):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    assert torch.equal(got["memory"][1], got["stream"][1])
    whole = torch.cat(list(StageData(cols, "stream", torch.device("cpu")).batches("images", 64)))
    assert torch.equal(whole, torch.cat([r["images"] for r in iterate_rows(cols, 100)]))


def test_a_loader_out_of_step_is_caught(h5):
    b = Batcher(300, 32, seed=1)
    data = StageData({"images": Column(str(h5), "train/images")}, "stream", torch.device("cpu"), workers=0)
    data.start(b, 0, 10, rank=0, world=1, shard=True)
    with pytest.raises(RuntimeError, match="not the one this step trains on"):
        data.take("images", b(1), lambda t: t)


def _children(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.append(int(stat.parent.name))
    return out


def test_workers_survive_the_signals_slurm_sends_every_process_of_a_job(h5):
    """SLURM sends its pre-timeout SIGUSR2 (and scancel's SIGTERM) to every process of the job:
    the DataLoader workers ignore them (the training process checkpoints and stops them)."""
    b = Batcher(300, 16, seed=0)
    data = StageData({"images": Column(str(h5), "train/images")}, "stream", torch.device("cpu"), workers=2)
    previous = signal.signal(signal.SIGUSR2, lambda *a: None)
    try:
        data.start(b, 0, 100, rank=0, world=1, shard=True)
        kids = _children(os.getpid())
        assert len(kids) >= 2
        for pid in kids:  # at once: some workers may still be starting (the signals are blocked then)
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        for s in range(100):
            data.take("images", b(s), lambda t: t)
        assert all(Path(f"/proc/{pid}").exists() for pid in kids)
    finally:
        data.close()
        signal.signal(signal.SIGUSR2, previous)
