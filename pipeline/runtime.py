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
    "requeue_signals",
    "dist_info",
    "log",
    "setup_logging",
    "resolve_device",
    "gpu_allocation",
    "nvidia_driver",
    "torch_build",
    "no_cuda_message",
    "claim_gpu",
    "seed_everything",
    "autocast",
    "stage_record",
    "where_it_ran",
    "configure_cuda",
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


def requeue_signals() -> tuple[int, ...]:
    """The signals that mean "checkpoint and requeue" in this process (empty outside a SLURM job)."""
    return _REQUEUE["signals"]


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


_CLAIMED: dict[str, Any] = {}


def claim_gpu(lock_dir: str | os.PathLike, count: int, wait_s: float = 600.0) -> int:
    """Claim one of ``count`` GPUs for this process: the first index whose lock file
    ``<lock_dir>/gpu<i>.lock`` this process can ``flock``; held until the process exits (the
    lock is released by the kernel even on SIGKILL). The one-allocation mode
    (``run_allocation.sbatch``) sets ``$VQLP_GPU_LOCKS`` so that concurrent stages inside one
    allocation of several GPUs each take their own; Snakemake's ``--resources gpu=N`` keeps at
    most N such stages running, so a free GPU normally exists at once.

    Returns:
        The claimed index in [0, count) (the same one on a second call in this process).

    Raises:
        DeviceError: no GPU came free within ``wait_s`` seconds.
    """
    import fcntl

    if "index" in _CLAIMED:
        return _CLAIMED["index"]
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for i in range(max(1, count)):
            handle = open(folder / f"gpu{i}.lock", "a+")  # noqa: SIM115 (held for the process lifetime)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _CLAIMED.update(index=i, handle=handle)
            return i
        if time.monotonic() > deadline:
            raise DeviceError(f"all {count} GPUs of {folder} stayed claimed for {wait_s:.0f} s")
        time.sleep(1.0)


#: the variables by which SLURM tells a job step its GPUs (SLURM_JOB_GPUS and SLURM_GPUS_ON_NODE
#: for --gres/--gpus* jobs; CUDA_VISIBLE_DEVICES, set by SLURM's GRES plugin, counts only inside a job)
_GPU_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def gpu_allocation(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The GPU variables of the SLURM job this process runs in, when the job was given GPUs:
    ``{name: value}`` of ``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``, ``SLURM_GPUS_ON_NODE`` (not "0")
    and, inside a job (``SLURM_JOB_ID`` set), a non-empty ``CUDA_VISIBLE_DEVICES``. Empty outside
    SLURM and in jobs without GPUs."""
    env = os.environ if environ is None else environ
    found = {k: env[k] for k in _GPU_VARS if env.get(k, "").strip()}
    if found.get("SLURM_GPUS_ON_NODE", "").strip() == "0":
        del found["SLURM_GPUS_ON_NODE"]
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if (found or env.get("SLURM_JOB_ID")) and visible not in ("", "-1", "NoDevFiles"):
        found["CUDA_VISIBLE_DEVICES"] = visible
    return found


def nvidia_driver() -> dict[str, Any]:
    """The NVIDIA driver of this machine, read without torch: through NVML (``libnvidia-ml.so.1``,
    the library ``nvidia-smi`` uses), else ``nvidia-smi``, else ``/proc/driver/nvidia/version``.

    Returns:
        ``{"version": "580.65.06" or None, "cuda": (13, 0) or None (the newest CUDA the driver
        supports), "source": "nvml" | "nvidia-smi" | "/proc" | None}``; all None where no driver
        is found (a CPU node, or a container without the driver's files).
    """
    import ctypes
    import re
    import shutil
    import subprocess

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                buf = ctypes.create_string_buffer(96)
                version = buf.value.decode() if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0 else None
                cuda = ctypes.c_int()
                ok = nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda)) == 0
                return {
                    "version": version,
                    "cuda": (cuda.value // 1000, cuda.value % 1000 // 10) if ok else None,
                    "source": "nvml",
                }
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            text = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        ver = re.search(r"Driver Version:\s*([\d.]+)", text)
        cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
        if ver:
            return {
                "version": ver.group(1),
                "cuda": (int(cuda.group(1)), int(cuda.group(2))) if cuda else None,
                "source": "nvidia-smi",
            }
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        ver = re.search(r"Kernel Module\s+([\d.]+)", text)
        if ver:
            return {"version": ver.group(1), "cuda": None, "source": "/proc"}
    except OSError:
        pass
    return {"version": None, "cuda": None, "source": None}


def torch_build() -> str:
    """``torch 2.13.0+cpu (CPU-only build)`` or ``torch 2.13.0 (CUDA 13.0 build)``: torch's
    version and the CUDA it was built for (``torch.version.cuda``)."""
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda} build' if cuda else 'CPU-only build'})"


def no_cuda_message(name: str, allocation: Mapping[str, str]) -> str:
    """The one line a stage fails with when it wants CUDA (``device: cuda``, or ``auto`` in a job
    given GPUs) and torch sees none: what was asked, torch's version and CUDA build, the driver
    version where it can be read, and the fix."""
    driver = nvidia_driver()
    where = (
        f"this SLURM job was given GPUs ({', '.join(f'{k}={v}' for k, v in allocation.items())})"
        if allocation
        else f"config key 'device' is {name!r}"
    )
    if driver["version"]:
        cuda = f", CUDA {driver['cuda'][0]}.{driver['cuda'][1]}" if driver["cuda"] else ""
        drv = f"NVIDIA driver {driver['version']}{cuda}"
    else:
        drv = "no NVIDIA driver found"
    import torch

    if not torch.version.cuda:
        fix = "install a CUDA build of torch (docs/cluster.md, 'Which torch')"
    elif driver["version"]:
        fix = "install a torch built for a CUDA the driver supports (docs/cluster.md, 'Which torch')"
    else:
        fix = "run on a GPU node (a job with --gpus) or check the node's driver"
    return (
        f"{where} but no CUDA GPU is visible to {torch_build()}; {drv}. Fix: {fix}; "
        "`python -m pipeline doctor` checks it; or set device: cpu to run on the CPU on purpose"
    )


def resolve_device(name: str):
    """The torch device of config key ``device``: ``cpu``; ``cuda`` (error if torch sees no GPU);
    ``auto``: CUDA if torch sees a GPU, else the CPU -- except inside a SLURM job that was given
    GPUs (:func:`gpu_allocation`), where a torch that cannot use them is an error, not a silent
    fall-back to hours of CPU training inside a GPU allocation.

    The CUDA index: ``$LOCAL_RANK`` under DDP; else, with ``$VQLP_GPU_LOCKS`` set (the
    one-allocation mode) and several GPUs visible, the one :func:`claim_gpu` takes; else 0.

    Raises:
        DeviceError: ``cuda``, or ``auto`` in a GPU job, where ``torch.cuda.is_available()`` is
            false; one line from :func:`no_cuda_message` (torch build, driver, fix).
        ValueError: another name.
    """
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config key 'device': expected auto, cpu or cuda, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        allocation = gpu_allocation()
        if name == "cuda" or allocation:
            raise DeviceError(no_cuda_message(name, allocation))
        return torch.device("cpu")
    count = max(torch.cuda.device_count(), 1)
    if "LOCAL_RANK" in os.environ or dist_info()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
    if os.environ.get("VQLP_GPU_LOCKS") and count > 1:
        return torch.device("cuda", claim_gpu(os.environ["VQLP_GPU_LOCKS"], count))
    return torch.device("cuda", 0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, bf16: bool):
    """bf16 autocast on ``device`` (CUDA or CPU) when ``bf16`` is true; a no-op context otherwise.

    bf16 is real on CPUs too (``torch.autocast("cpu", dtype=torch.bfloat16)``), so ``bf16: true``
    means the same numerics on a laptop as on an A100, and the tests run the GPU presets' path.
    The regions that stay float32 inside it are listed in :mod:`pipeline.precision`."""
    from pipeline.precision import bf16_autocast

    return bf16_autocast(device, bf16)


class Progress:
    """Periodic progress lines that read well in a SLURM log file:
    ``<name> 200/2000 (10%) 12.3 it/s, eta 2m26s | key=value ...``.

    Args:
        name: what is counted (the line's first word).
        total: the count at the end.
        start: the count already done (a resumed loop).
        every: :meth:`tick` logs when the count reaches a multiple of this (default: a tenth of
            ``total``) and at the end; loops shorter than ``minimum`` log nothing from ``tick``.
    """

    def __init__(self, name: str, total: int, start: int = 0, every: int | None = None, minimum: int = 0):
        self.name, self.total, self.start = name, total, start
        self.every = max(1, every if every is not None else total // 10)
        self.quiet = total < minimum
        self.t0 = time.perf_counter()

    def tick(self, done: int, **values: Any) -> None:
        """Log :meth:`line` when ``done`` is a multiple of ``every`` or the end."""
        if not self.quiet and (done % self.every == 0 or done == self.total):
            self.line(done, **values)

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


def configure_cuda(cfg: Mapping) -> dict:
    """The CUDA precision switches of the config, applied when a GPU is visible (no-ops on a CPU).

    ``tf32`` (default true): TF32 tensor-core matmuls and convolutions on Ampere and later
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``; a 10-bit
    mantissa for the products, fp32 accumulation). ``cudnn_benchmark`` (default false): cuDNN
    autotunes each convolution's algorithm on first use (faster for fixed shapes, not bit-exact
    across runs, and off under ``deterministic``). bf16 autocast is separate (:func:`autocast`).
    Returns what is in effect: ``{"tf32": bool, "cudnn_benchmark": bool, "cuda": bool}``.
    """
    import torch

    cuda = torch.cuda.is_available()
    tf32 = bool(cfg.get("tf32", True)) and cuda
    bench = bool(cfg.get("cudnn_benchmark", False)) and cuda and not cfg.get("deterministic")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = bench
    return {"tf32": tf32, "cudnn_benchmark": bench, "cuda": cuda}


#: SLURM job variables recorded in a stage's ``where`` (the record key -> the variable)
_SLURM_VARS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "job_name": "SLURM_JOB_NAME",
    "partition": "SLURM_JOB_PARTITION",
    "account": "SLURM_JOB_ACCOUNT",
    "node": "SLURMD_NODENAME",
    "nodes": "SLURM_JOB_NODELIST",
    "ntasks": "SLURM_NTASKS",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "mem_per_node_mb": "SLURM_MEM_PER_NODE",
    "mem_per_cpu_mb": "SLURM_MEM_PER_CPU",
    "gpus_on_node": "SLURM_GPUS_ON_NODE",
    "restart_count": "SLURM_RESTART_COUNT",
}


def where_it_ran() -> dict:
    """Where this process runs: host, SLURM job (id, name, partition, account, node, tasks,
    CPUs, memory in MB, GPUs, requeue count; None outside SLURM), the visible GPUs' model names
    and the peak GPU memory allocated so far by this process (GB, None without CUDA).
    ``sacct -j <job_id>`` and ``seff <job_id>`` take the recorded ``slurm.job_id``."""
    import torch

    slurm = {k: os.environ.get(v) for k, v in _SLURM_VARS.items()} if "SLURM_JOB_ID" in os.environ else None
    gpus, peak = None, None
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        peak = round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 1e9, 3)
    return {
        "host": socket.gethostname(),
        "slurm": slurm,
        "gpus": gpus,
        "peak_gpu_memory_gb": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


@contextlib.contextmanager
def stage_record(
    stage: str, cfg: Mapping, out_dir: str | os.PathLike, metrics_name: str = "metrics.json", threads: int | None = None
) -> Iterator[dict]:
    """Run a stage body: log its start and end, write ``config.yaml`` (the top-level keys and the
    stage's own section: what it read) and ``metrics_name``.

    Yields a dict the body fills with metrics; ``wall_time_s`` (seconds, this invocation plus
    any ``resumed_wall_time_s`` the body sets from a checkpoint), ``stage``, ``host``, ``where``
    (:func:`where_it_ran`: SLURM job id, node, GPU model, peak GPU memory, precision switches)
    and ``finished`` are added. The CUDA precision switches are applied first
    (:func:`configure_cuda`). Nothing is written if the body raises. Under torch.distributed only
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
    precision = configure_cuda(cfg)
    if precision["cuda"]:
        torch.cuda.reset_peak_memory_stats()
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
        "where": {
            **where_it_ran(),
            "bf16": bool(cfg.get("bf16")),
            "tf32": precision["tf32"],
            "cudnn_benchmark": precision["cudnn_benchmark"],
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if rank == 0:
        write_json(out / metrics_name, record)
    log.info("%s: done in %.1f s", stage, wall)
