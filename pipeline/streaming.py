"""Training data in memory or streamed from HDF5: the same batches in the same order either way.

A training stage reads its rows (images and labels of ``dataset.h5``, codes and latents of
``latents.h5``) through a :class:`StageData`:

* **memory**: the whole split as tensors on the device, indexed per step (fastest while it fits);
* **stream**: a ``torch.utils.data.DataLoader`` over :class:`H5Rows` with worker processes and
  prefetching, whose batch sampler (:class:`StepSampler`) yields, for every step from the resume
  step on, the indices :class:`pipeline.training.Batcher` gives that step (this rank's shard of
  them under DDP, when the stage needs only its shard). Each worker opens the HDF5 file itself.

:func:`choose_path` picks one by size (``data_loading: auto``) or as forced (``memory`` /
``stream``). Rows are converted the same way on both paths (uint8/uint16 pixels to float32 in
[0, 1] by one division; codes to int64), so a training run, its weights and its exact resume do
not depend on the path (tested). A library module: h5py, numpy and torch only.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_LOADING",
    "Column",
    "H5Rows",
    "StepSampler",
    "StageData",
    "choose_path",
    "memory_budget_bytes",
    "iterate_rows",
    "SplitImages",
    "chunks_of",
    "RunningMoments",
]

#: the HDF5 chunk cache of each open file of the stream path (per process: bounded, whatever
#: the data's size)
CHUNK_CACHE_BYTES = 32 * 2**20

#: the values of the config key ``data_loading``
DATA_LOADING = ("auto", "memory", "stream")


@dataclass(frozen=True)
class Column:
    """One column of a stage's rows: the HDF5 dataset ``key`` of ``path`` (or several, ``keys``
    concatenated in order: a split and its augmented copies) and how its rows become a tensor:
    ``scale`` divides (pixels / max_value -> float32 in [0, 1]); ``dtype`` "float32" or "int64";
    ``transform`` (optional) maps the converted float32 tensor (e.g. the latent scaling)."""

    path: str
    key: str | tuple[str, ...]
    dtype: str = "float32"
    scale: float | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def convert(self, rows: np.ndarray) -> torch.Tensor:
        """HDF5 rows -> a CPU tensor, the same conversion as the in-memory path."""
        if self.dtype == "int64":
            return torch.from_numpy(rows.astype(np.int64))
        t = torch.from_numpy(rows.astype(np.float32))
        if self.scale is not None:
            t = t.div_(float(self.scale))
        return t if self.transform is None else self.transform(t)


def _read_rows(dataset, idx: np.ndarray) -> np.ndarray:
    """``dataset[idx]`` for any int indices (h5py's fancy reads need them increasing and unique)."""
    if len(idx) == 0:
        return dataset[0:0]
    lo, hi = int(idx.min()), int(idx.max())
    if hi - lo + 1 == len(idx) and np.all(np.diff(idx) == 1):  # a contiguous run: one slice read
        return dataset[lo : hi + 1]
    order = np.argsort(idx, kind="stable")
    uniq, inverse = np.unique(idx[order], return_inverse=True)
    if uniq[-1] - uniq[0] + 1 <= 2 * len(uniq):  # dense: one slice read beats h5py's point selection
        rows = dataset[int(uniq[0]) : int(uniq[-1]) + 1][uniq - uniq[0]]
    else:
        rows = dataset[uniq] if len(uniq) > 1 else dataset[int(uniq[0]) : int(uniq[0]) + 1]
    out = np.empty((len(idx), *rows.shape[1:]), dtype=rows.dtype)
    out[order] = rows[inverse]
    return out


class H5Rows(torch.utils.data.Dataset):
    """Rows of a split stored in HDF5 (a map-style dataset whose ``__getitems__`` reads a whole
    batch at once): ``rows[idx] -> {name: CPU tensor (len(idx), ...)}`` for the :class:`Column`
    s of ``columns``. The files are opened lazily in each process (DataLoader workers included).

    Raises:
        ValueError: columns of different lengths.
    """

    def __init__(self, columns: Mapping[str, Column]):
        import h5py

        self.columns = dict(columns)
        lengths, self.offsets, self.row_elements, self.row_shapes = set(), {}, 0, {}
        for name, col in self.columns.items():
            keys = (col.key,) if isinstance(col.key, str) else tuple(col.key)
            with h5py.File(col.path, "r") as f:
                sizes = [len(f[k]) for k in keys]
                self.row_shapes[name] = tuple(f[keys[0]].shape[1:])
                self.row_elements += int(np.prod(self.row_shapes[name]))
            self.offsets[name] = (keys, np.cumsum([0, *sizes]))
            lengths.add(sum(sizes))
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")
        self.length = lengths.pop()
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return self.length

    @property
    def float32_bytes(self) -> int:
        """The rows' size as float32: what the memory path holds."""
        return 4 * self.row_elements * self.length

    def _rows(self, name: str, col: Column, idx: np.ndarray) -> np.ndarray:
        import h5py

        if col.path not in self._files:  # a bounded chunk cache: the chunks a batch shares are decompressed once
            self._files[col.path] = h5py.File(col.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=100_003)
        f = self._files[col.path]
        keys, bounds = self.offsets[name]
        if len(keys) == 1:
            return _read_rows(f[keys[0]], idx)
        part = np.searchsorted(bounds, idx, side="right") - 1
        first = _read_rows(f[keys[0]], idx[:0])
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for p, key in enumerate(keys):
            sel = np.flatnonzero(part == p)
            if len(sel):
                out[sel] = _read_rows(f[key], idx[sel] - bounds[p])
        return out

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        out = {name: col.convert(self._rows(name, col, idx)) for name, col in self.columns.items()}
        out["index"] = torch.from_numpy(idx)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getstate__(self):  # open handles do not pickle to the workers: each opens its own
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


class StepSampler(torch.utils.data.Sampler):
    """The batch indices of steps ``start`` .. ``steps - 1`` as :class:`pipeline.training.Batcher`
    gives them (a seeded permutation per epoch), this rank's shard ``idx[rank::world]`` of each
    when ``shard``."""

    def __init__(self, batcher, start: int, steps: int, rank: int = 0, world: int = 1, shard: bool = True):
        self.batcher, self.start, self.steps = batcher, start, steps
        self.rank, self.world, self.shard = rank, world, shard

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            idx = self.batcher(step)
            if self.shard and self.world > 1:
                idx = idx[self.rank :: self.world]
            yield idx.tolist()


def _cgroup_headroom() -> int | None:
    """Bytes this process's memory cgroup (v1 or v2; a SLURM job's ``--mem`` is one) can still
    take (limit - usage), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory") / rel
            limit_f, usage_f = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        elif controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / rel
            limit_f, usage_f = base / "memory.max", base / "memory.current"
        else:
            continue
        try:
            limit, usage = limit_f.read_text().strip(), int(usage_f.read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def memory_budget_bytes(device: torch.device) -> int:
    """What the memory path may hold: a quarter of what this process can still take on the CPU
    (the least of ``MemAvailable``, its memory cgroup's headroom, e.g. a SLURM job's ``--mem``,
    and its address-space limit), half of the GPU's free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        room = info.get("MemAvailable", info.get("MemTotal", 0))
    except OSError:
        room = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        room = min(room, cgroup)
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        status = Path("/proc/self/status").read_text()
        vms = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")), 0)
        room = min(room, max(0, soft - vms))
    return int(room // 4)


def choose_path(setting: str, float32_bytes: int, device: torch.device) -> str:
    """``memory`` or ``stream`` for ``data_loading`` = ``setting``: as forced, or by size (the
    rows as float32 against :func:`memory_budget_bytes`).

    Raises:
        ValueError: another setting.
    """
    if setting not in DATA_LOADING:
        raise ValueError(f"config key 'data_loading': expected one of {list(DATA_LOADING)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "memory" if float32_bytes <= memory_budget_bytes(device) else "stream"


def iterate_rows(columns: Mapping[str, Column], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of ``columns`` in order, ``batch_size`` at a time, as CPU tensors: the streamed
    form of a whole-split pass (test metrics, statistics)."""
    rows = H5Rows(columns)
    for start in range(0, len(rows), batch_size):
        yield rows.__getitems__(range(start, min(start + batch_size, len(rows))))


_JOB_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")


@contextlib.contextmanager
def _signals_blocked():
    """Block the job signals in this thread (children started meanwhile inherit the mask)."""
    from multiprocessing import resource_tracker

    sigs = {getattr(signal, n) for n in _JOB_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    # multiprocessing's resource tracker (a process the workers' shared memory needs) starts with
    # the mask too, and starting it unblocks SIGINT and SIGTERM here: block them again after it
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(worker_id: int) -> None:
    """A DataLoader worker's start: its own HDF5 handles (none inherited through the fork), and
    the job signals ignored (then unblocked)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, H5Rows):
        info.dataset._files = {}
    sigs = {getattr(signal, n) for n in _JOB_SIGNALS}
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def _as_is(batch):
    """The DataLoader's collate function: ``H5Rows.__getitems__`` already made the batch."""
    return batch


class StageData:
    """A training stage's rows on one path (:func:`choose_path`).

    Args:
        columns: name -> :class:`Column` of the training split.
        path: "memory" or "stream".
        device: where :meth:`take` hands rows.
        workers: DataLoader worker processes (stream path; 0 reads in the training process).
        prefetch: batches each worker reads ahead.
        rows: the :class:`H5Rows` of ``columns`` when already made (their sizes read once).
    """

    def __init__(
        self,
        columns: Mapping[str, Column],
        path: str,
        device: torch.device,
        workers: int = 2,
        prefetch: int = 2,
        rows: H5Rows | None = None,
    ):
        self.columns, self.path, self.device = dict(columns), path, device
        self.workers, self.prefetch = workers, prefetch
        self.rows = rows if rows is not None else H5Rows(self.columns)
        self._shard = slice(None)
        self.tensors: dict[str, torch.Tensor] = {}
        if path == "memory":
            every = self.rows.__getitems__(range(len(self.rows)))
            self.tensors = {k: v.to(device) for k, v in every.items() if k != "index"}
        self._loader: Iterator | None = None
        self._current: dict | None = None
        self.shard_loading = True

    def __len__(self) -> int:
        return len(self.rows)

    def start(self, batcher, start: int, steps: int, rank: int, world: int, shard: bool) -> None:
        """Begin a training run at step ``start`` (the stream path's loader yields the batches of
        steps ``start`` .. ``steps - 1``; ``shard``: load only this rank's shard of each)."""
        self.shard_loading = shard
        self._shard = slice(rank, None, world)
        if self.path != "stream":
            return
        sampler = StepSampler(batcher, start, steps, rank, world, shard)
        loader = torch.utils.data.DataLoader(
            self.rows,
            batch_sampler=sampler,
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            collate_fn=_as_is,
            worker_init_fn=_worker_init,
            pin_memory=self.device.type == "cuda",
            # forked (PyTorch's default on Linux): a worker shares the training process's pages
            # (a spawned one would import torch again, ~250 MB each); HDF5 files are opened per
            # worker after the fork (H5Rows opens lazily), never inherited open
            multiprocessing_context="fork" if self.workers else None,
            # its own generator: the loader's worker seed must not draw from the global RNG, which
            # the training loop checkpoints (a draw there would shift the run's random numbers)
            generator=torch.Generator().manual_seed(0),
        )
        # SLURM signals every process of the job (the pre-timeout SIGUSR2, scancel's SIGTERM): the
        # workers must ignore them (the training process checkpoints and stops, and the workers
        # with it). They are blocked while the workers start, a mask the workers inherit, so no
        # signal can kill one before its worker_init_fn has set them to be ignored.
        with _signals_blocked():
            self._loader = iter(loader)

    def take(self, name: str, idx: torch.Tensor, shard: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Column ``name`` of the global batch ``idx`` (B,) on the device: this rank's shard when
        ``shard`` is given (``shard(t) = t[rank::world]``), else the whole batch.

        Raises:
            RuntimeError: the stream path handed rows of other indices than ``idx`` (a loader
                out of step with the training loop), or the whole batch was asked for while
                only shards are loaded.
        """
        if self.path == "memory":
            rows = self.tensors[name][idx]
            return shard(rows) if shard is not None else rows
        if self._current is None or self._current["_step_idx"] is not idx:
            batch = next(self._loader)
            want = idx.cpu()
            want = want[self._shard] if self.shard_loading else want
            if not torch.equal(batch["index"], want):
                raise RuntimeError("the streamed batch is not the one this step trains on")
            self._current = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self._current["_step_idx"] = idx
        rows = self._current[name]
        if self.shard_loading:
            if shard is None:
                raise RuntimeError(f"column {name!r}: the whole batch was asked for, but only shards are loaded")
            return rows
        return shard(rows) if shard is not None else rows

    def batches(self, name: str, batch_size: int) -> Iterator[torch.Tensor]:
        """Column ``name`` of every row, in order, ``batch_size`` rows at a time, on the device:
        a whole-split pass (train metrics, statistics) that holds one batch on the stream path."""
        if self.path == "memory":
            t = self.tensors[name]
            for start in range(0, len(t), batch_size):
                yield t[start : start + batch_size]
            return
        for batch in iterate_rows({name: self.columns[name]}, batch_size):
            yield batch[name].to(self.device)

    def close(self) -> None:
        self._loader = None
        self._current = None


class SplitImages:
    """The images of one split of ``dataset.h5`` as float32 (N, C, *S) in [0, 1], never held
    whole: what the evaluate stage reads of the train split when it does not fit in memory
    (:func:`choose_path`). Indexing with int indices reads those rows; :meth:`chunks` reads
    them all in order, ``size`` at a time.
    """

    def __init__(self, dataset: str | os.PathLike, split: str, max_value: float):
        self.column = Column(str(dataset), f"{split}/images", "float32", scale=float(max_value))
        self.rows = H5Rows({"x": self.column})
        self.shape = (len(self.rows), *self.rows.row_shapes["x"])

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx) -> torch.Tensor:
        return self.rows.__getitems__(np.asarray(idx, dtype=np.int64).reshape(-1))["x"]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for batch in iterate_rows({"x": self.column}, size):
            yield batch["x"]


def chunks_of(images, size: int) -> Iterator[torch.Tensor]:
    """``images`` (a tensor, or :class:`SplitImages`) ``size`` rows at a time, in order."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), size):
            yield images[start : start + size]
    else:
        yield from images.chunks(size)


class RunningMoments:
    """Mean and unbiased (co)variance of rows added batch by batch, in float64 (Chan et al. 1979
    pairwise update): ``add(x)`` with x (B, F); :meth:`mean`, :meth:`cov` (F, F), :meth:`std`
    (F,). The streamed form of ``np.cov(rowvar=False)`` / ``Tensor.std(0)``, equal to them up to
    float64 rounding.

    Raises:
        ValueError: :meth:`cov` or :meth:`std` with fewer than 2 rows.
    """

    def __init__(self):
        self.n, self._mean, self._m2, self._sq = 0, None, None, None

    def add(self, x, full: bool = True) -> None:
        """Rows x (B, F) (numpy or torch); ``full``: keep the covariance (else the variance)."""
        x = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(len(x), -1)
        if not len(x):
            return
        b, mean_b = len(x), x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred if full else (centred**2).sum(axis=0)
        if self.n == 0:
            self.n, self._mean, self._m2 = b, mean_b, m2_b
            return
        delta, n = mean_b - self._mean, self.n + b
        corr = np.outer(delta, delta) if full else delta**2
        self._m2 = self._m2 + m2_b + corr * (self.n * b / n)
        self._mean = self._mean + delta * (b / n)
        self.n = n

    def mean(self) -> np.ndarray:
        return self._mean

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"need at least 2 rows, got {self.n}")
        return self._m2 / (self.n - 1)

    def std(self) -> np.ndarray:
        m2 = np.diag(self._m2) if self._m2.ndim == 2 else self._m2
        if self.n < 2:
            raise ValueError(f"need at least 2 rows, got {self.n}")
        return np.sqrt(m2 / (self.n - 1))
