"""Run a stage in this process, or submit it as a SLURM job through submitit and wait for it.

The only module that imports submitit. The SLURM parameters of every stage live in one YAML file
per cluster (``cluster/<name>/slurm.yaml``; dinov2's ``get_slurm_executor_parameters``), read by
:func:`load_cluster_config`. The callable submitted is a :class:`StageJob` (a module-level,
``Checkpointable`` class: it pickles by reference and is requeued after a time limit), which
runs :func:`run_in_job`, which calls the same stage callable that ``python -m pipeline <stage>``
calls in-process.

Multi-GPU: a stage with ``gpus_per_node: N > 1`` runs N tasks per node; each task exports the
torch.distributed variables with ``submitit.helpers.TorchDistributedEnvironment().export()``,
joins a process group (NCCL on CUDA, gloo on CPU) and trains with DistributedDataParallel; rank 0
alone writes outputs and logs. ``batch_size`` is the global batch: each of the N ranks takes
batch_size / N examples of it, so the learning rate needs no rescaling and N ranks follow the
same optimisation path as one process.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit
import yaml

from pipeline.stages import get_stage

__all__ = [
    "DispatchError",
    "StageJob",
    "load_cluster_config",
    "stage_parameters",
    "run_in_job",
    "submit_stage",
    "resolve_account",
]

#: keys of a stage entry in the cluster YAML and the submitit parameter each becomes
_PARAM_MAP = {
    "partition": "slurm_partition",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "timeout_min": "timeout_min",
    "nodes": "nodes",
    "constraint": "slurm_constraint",
    "qos": "slurm_qos",
    "signal_delay_s": "slurm_signal_delay_s",
}


class DispatchError(RuntimeError):
    """A SLURM submission could not be made, or the job did not finish; the message says why."""


def load_cluster_config(path: str | os.PathLike) -> dict:
    """Read a cluster YAML: ``defaults`` (applied to every stage), ``stages.<stage>`` overrides,
    ``setup`` (shell lines run in the job before Python starts, e.g. ``module load``),
    ``max_num_timeout`` (requeues after a time limit).

    Raises:
        DispatchError: missing file, not YAML, or keys that are not SLURM parameters we know.
    """
    p = Path(path)
    if not p.is_file():
        raise DispatchError(f"cluster config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DispatchError(f"{p}: not valid YAML ({exc})") from None
    unknown = set(data) - {"defaults", "stages", "setup", "max_num_timeout"}
    if unknown:
        raise DispatchError(
            f"{p}: unknown top-level keys {sorted(unknown)}; expected defaults, stages, setup, max_num_timeout"
        )
    for where, entry in [("defaults", data.get("defaults") or {})] + [
        (f"stages.{k}", v or {}) for k, v in (data.get("stages") or {}).items()
    ]:
        bad = set(entry) - set(_PARAM_MAP)
        if bad:
            raise DispatchError(f"{p}: {where} has unknown keys {sorted(bad)}; expected some of {sorted(_PARAM_MAP)}")
    return data


def stage_parameters(cluster: Mapping, stage: str) -> dict:
    """The cluster YAML's defaults updated by the stage's entry (our key names)."""
    params = dict(cluster.get("defaults") or {})
    params.update((cluster.get("stages") or {}).get(stage) or {})
    return params


def resolve_account(account: str | None) -> str:
    """The SLURM account: the given one, else ``$SLURM_ACCOUNT``.

    Raises:
        DispatchError: neither is set (raised before anything is submitted).
    """
    acc = account or os.environ.get("SLURM_ACCOUNT")
    if not acc:
        raise DispatchError(
            "no SLURM account: pass --config slurm={account: <name>} (or --account) or export SLURM_ACCOUNT=<name>"
        )
    return acc


def _init_distributed() -> tuple[int, int]:
    """Join the torch.distributed group of a multi-task SLURM job; (rank, world_size)."""
    import torch

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return 0, 1
    dist_env = submitit.helpers.TorchDistributedEnvironment().export()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend)
    return dist_env.rank, dist_env.world_size


def run_in_job(stage: str, cfg: Mapping, run_dir: str, kwargs: Mapping[str, Any]) -> dict:
    """What runs in each SLURM task: join the process group if there are several tasks, run the
    stage, leave the group. Returns the stage's metrics (from every rank)."""
    import torch

    from pipeline import runtime

    # submitit bound SLURM's pre-timeout signal to its checkpoint-and-requeue handler. Defer it:
    # the training loop saves at the next step boundary, then calls that handler (requeue + exit).
    usr_sig = signal.SIGUSR2
    submitit_handler = signal.getsignal(usr_sig)
    if callable(submitit_handler):
        runtime.set_requeue_hook(lambda signum: submitit_handler(signum, None), signals=(usr_sig,))
    rank, world = _init_distributed()
    try:
        result = get_stage(stage)(dict(cfg), run_dir, **dict(kwargs))
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    # The work is done and saved: a pre-timeout signal that arrives while the process winds down
    # must neither requeue the finished job nor kill it (the job would end FAILED; seen in CI).
    if threading.current_thread() is threading.main_thread():
        signal.signal(usr_sig, signal.SIG_IGN)
    return {"rank": rank, "world_size": world, **(result or {})}


_ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "REQUEUED",
    "RESIZING",
    "SUSPENDED",
    "UNKNOWN",
    "READY",
}


def _final_state(job, wait_s: float = 30.0) -> str:
    """The job's SLURM state once accounting has recorded its end (polled up to ``wait_s``)."""
    state = "UNKNOWN"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = str(job.watcher.get_state(job.job_id, mode="force"))
        except Exception:  # sacct unreachable: report what we have
            return state
        if state.split()[0] not in _ACTIVE_STATES or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


class StageJob(submitit.helpers.Checkpointable):
    """The callable submitted to SLURM: ``StageJob()(stage, cfg, run_dir, kwargs)`` runs
    :func:`run_in_job`. Being ``Checkpointable``, a job that hits its time limit (or is
    preempted) is requeued with the same arguments, up to ``max_num_timeout`` times; the stage
    then resumes from its ``checkpoint.pt``."""

    def __call__(self, stage: str, cfg: Mapping, run_dir: str, kwargs: Mapping[str, Any]) -> dict:
        return run_in_job(stage, cfg, run_dir, kwargs)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def submit_stage(
    stage: str,
    cfg: Mapping,
    run_dir: str | os.PathLike,
    cluster_config: str | os.PathLike,
    account: str | None = None,
    wait: bool = True,
    cluster: str | None = None,
    **kwargs: Any,
):
    """Submit ``stage`` as one SLURM job (``<run>-<stage>``) and, with ``wait``, block until it ends.

    Args:
        cluster_config: the cluster YAML (see :func:`load_cluster_config`).
        account: SLURM account; ``$SLURM_ACCOUNT`` when None.
        cluster: submitit cluster ("slurm", "local" or "debug"); None lets submitit choose
            (SLURM when ``sbatch`` is on the PATH).
        kwargs: passed to the stage (``threads`` is replaced by the job's ``cpus_per_task``).

    Returns:
        The stage's metrics from rank 0 (``wait``) or the submitit job.

    Raises:
        DispatchError: no account, a bad cluster YAML, or a job that failed, timed out or was
            cancelled: the message holds the job id, its SLURM state and the tail of its stderr.
    """
    cluster_cfg = load_cluster_config(cluster_config)
    params = stage_parameters(cluster_cfg, stage)
    acc = resolve_account(account)
    run_dir = str(run_dir)
    run_name = Path(run_dir).name
    suffix = f"_{kwargs['sample_set']}" if stage == "sample" and "sample_set" in kwargs else ""
    if kwargs.get("budget") is not None or kwargs.get("conditional"):
        from pipeline.sets import budget_tag

        suffix = ("_cond" if kwargs.get("conditional") else "") + budget_tag(kwargs.get("budget"))
    # A fresh folder per submission: SLURM job ids restart when its state is purged.
    folder = Path(run_dir) / "logs" / f"{stage}{suffix}" / time.strftime("%Y%m%d-%H%M%S")
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=int(cluster_cfg.get("max_num_timeout", 3))
    )
    gpus = int(params.get("gpus_per_node", 1))
    sub = {_PARAM_MAP[k]: v for k, v in params.items()}
    sub["tasks_per_node"] = max(1, gpus)
    sub.setdefault("timeout_min", 60)
    executor.update_parameters(name=f"{run_name}-{stage}{suffix}", **sub)
    if executor.cluster == "slurm":
        setup = list(cluster_cfg.get("setup") or [])
        executor.update_parameters(slurm_account=acc, slurm_setup=setup)
    kw = dict(kwargs)
    kw["threads"] = int(params.get("cpus_per_task", kw.get("threads") or 1))
    job = executor.submit(StageJob(), stage, dict(cfg), run_dir, kw)
    print(f"{stage}{suffix}: submitted SLURM job {job.job_id} ({executor.cluster}); logs: {folder}", flush=True)
    if not wait:
        return job

    # If this waiting command is stopped (Snakemake shutting down after another job failed,
    # Ctrl-C, scancel of the driver), cancel the SLURM job instead of leaving it running.
    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        results = job.results()
    except KeyboardInterrupt:
        job.cancel(check=False)
        print(f"{stage}{suffix}: interrupted; cancelled SLURM job {job.job_id}", flush=True)
        raise
    except Exception as exc:  # submitit raises FailedJobError / UncompletedJobError
        state = _final_state(job)
        stderr = Path(str(job.paths.stderr).replace("%t", "0"))
        raise DispatchError(
            f"{stage}{suffix}: SLURM job {job.job_id} ended in state {state}.\n"
            f"stderr: {stderr}\n--- last lines ---\n{_tail(stderr)}\n--- submitit ---\n{str(exc)[-2000:]}"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{stage}{suffix}: SLURM job {job.job_id} finished ({len(results)} task(s))", flush=True)
    return results[0]


def shell_args(enabled: bool, cluster_config: str | None, account: str | None) -> str:
    """The CLI arguments a Snakemake rule appends to ``python -m pipeline <stage>``, quoted."""
    if not enabled:
        return "--local"
    return f"--submit --cluster-config {shlex.quote(str(cluster_config))} --account {shlex.quote(str(account))}"
