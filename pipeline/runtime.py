"""What every stage does around its work: logging, device choice, seeding, timing, records.

``stage_record`` wraps a stage body: it configures log lines that read well in a file, writes
the resolved config next to the outputs, times the stage and writes ``metrics.json`` with the
wall time. Imports torch lazily so the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import stage_view, write_config
from pipeline.io import write_json

__all__ = [
    "DeviceError",
    "StopSignals",
    "set_requeue_hook",
    "dist_info",
    "log",
    "setup_logging",
    "resolve_device",
    "seed_everything",
    "autocast",
    "stage_record",
    "Progress",
]

log = logging.getLogger("pipeline")


class DeviceError(RuntimeError):
    """The configured device is not available."""


_REQUEUE: dict = {"hook": None, "signals": ()}


def set_requeue_hook(hook, signals=()) -> None:
    """Register what a training loop calls after saving on ``signals`` (inside a SLURM job:
    submitit's checkpoint-and-requeue handler). Set by :mod:`pipeline.dispatch` only."""
    _REQUEUE["hook"], _REQUEUE["signals"] = hook, tuple(signals)


class StopSignals:
    """Turn SIGTERM (and, inside a SLURM job, the pre-timeout signal) into a flag.

    A training loop checks :attr:`requested` at each step boundary, saves its checkpoint and
    calls :meth:`after_checkpoint`: inside a submitit job that hands over to submitit's
    checkpoint-and-requeue (the job is requeued and resumes from the checkpoint); otherwise it
    raises ``SystemExit(128 + signal)``. The signal handler itself never touches training state,
    so the checkpoint is always taken between two optimizer steps. Handlers are installed in the
    main thread only and restored on exit.
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _flag(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, *_REQUEUE["signals"]):
                self._previous[sig] = signal.signal(sig, self._flag)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def after_checkpoint(self) -> None:
        signum = self.requested
        if _REQUEUE["hook"] is not None and signum in _REQUEUE["signals"]:
            _REQUEUE["hook"](signum)
        raise SystemExit(128 + int(signum or 0))


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the torch.distributed group, or (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event, with a timestamp: ``2026-11-21 07:30:00 INFO train_vqvae | ...``."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def resolve_device(name: str):
    """``auto`` -> CUDA if available else CPU; ``cpu``; ``cuda`` (error if no GPU).

    Raises:
        DeviceError: ``device: cuda`` on a machine where ``torch.cuda.is_available()`` is false.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "config key 'device' is 'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is False); use "
                "device: auto or cpu"
            )
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"config key 'device': expected auto, cpu or cuda, got {name!r}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16`` is true; a no-op context otherwise."""
    import torch

    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Progress:
    """Periodic progress lines: ``<name> 200/2000 (10%) 12.3 it/s, eta 2m26s | key=value ...``."""

    def __init__(self, name: str, total: int, start: int = 0):
        self.name, self.total, self.start = name, total, start
        self.t0 = time.perf_counter()

    def line(self, done: int, **values: Any) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        msg = (
            f"{self.name} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) {rate:.2f} it/s, eta {eta_s}"
            + (f" | {vals}" if vals else "")
        )
        log.info(msg)
        return msg


@contextlib.contextmanager
def stage_record(
    stage: str, cfg: Mapping, out_dir: str | os.PathLike, metrics_name: str = "metrics.json", threads: int | None = None
) -> Iterator[dict]:
    """Run a stage body: log its start and end, write ``config.yaml`` (the top-level keys and the
    stage's own section: what it read) and ``metrics_name``.

    Yields a dict the body fills with metrics; ``wall_time_s`` (seconds, this invocation plus
    any ``resumed_wall_time_s`` the body sets from a checkpoint), ``stage``, ``host`` and
    ``finished`` are added. Nothing is written if the body raises. Under torch.distributed only
    rank 0 writes and logs (other ranks log warnings only).
    """
    import torch

    rank, world = dist_info()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)  # one copy of each line
    if threads:
        torch.set_num_threads(threads)
    if cfg.get("deterministic"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_config(stage_view(cfg, stage), out / "config.yaml")
    log.info("%s: start (run folder %s, torch threads %d)", stage, out.parent, torch.get_num_threads())
    t0 = time.perf_counter()
    metrics: dict = {}
    yield metrics
    wall = time.perf_counter() - t0 + float(metrics.pop("resumed_wall_time_s", 0.0))
    record = {
        "stage": stage,
        **metrics,
        "wall_time_s": round(wall, 3),
        "world_size": world,
        "host": socket.gethostname(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if rank == 0:
        write_json(out / metrics_name, record)
    log.info("%s: done in %.1f s", stage, wall)
