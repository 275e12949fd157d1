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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import submitit

from pipeline.slurm_config import PARAM_MAP, DispatchError, load_cluster_config, stage_parameters
from pipeline.stages import get_stage

__all__ = [
    "DispatchError",
    "StageJob",
    "load_cluster_config",
    "stage_parameters",
    "submitit_parameters",
    "job_suffix",
    "apply_parameters",
    "run_in_job",
    "submit_stage",
    "resolve_account",
]

#: signals that make a waiting ``--submit`` command cancel its job: SIGTERM (Snakemake stopping,
#: scancel of the driver), SIGHUP (the SSH session dropped); SIGINT raises KeyboardInterrupt anyway
_CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def submitit_parameters(params: Mapping, name: str, account: str | None, setup: list[str] | None) -> dict:
    """The keyword arguments of ``executor.update_parameters`` for one stage job.

    ``tasks_per_node`` is ``gpus_per_node`` (one DDP task per GPU); ``mem_gb`` is the node's
    memory (``mem_per_gpu_gb`` times the GPUs when that is given); no ``--wckey`` is sent unless
    one is configured (submitit's default, ``submitit``, is rejected by clusters that check
    wckeys). ``account`` and ``setup`` are SLURM-only (omitted when None).
    """
    gpus = int(params.get("gpus_per_node", 1))
    sub = {PARAM_MAP[k]: v for k, v in params.items() if k in PARAM_MAP}
    if "mem_per_gpu_gb" in params:
        sub["mem_gb"] = float(params["mem_per_gpu_gb"]) * max(1, gpus)
    sub["tasks_per_node"] = max(1, gpus)
    sub.setdefault("timeout_min", 60)
    sub.setdefault("slurm_wckey", None)
    sub["name"] = name
    if account is not None:
        sub["slurm_account"] = account
    if setup is not None:
        sub["slurm_setup"] = list(setup)
    return sub


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
    """Join the torch.distributed group of a multi-task SLURM job; (rank, world_size).

    One task per GPU over all the job's nodes: submitit's ``TorchDistributedEnvironment`` exports
    ``RANK`` (``$SLURM_PROCID``), ``LOCAL_RANK`` (``$SLURM_LOCALID``: the GPU on this node),
    ``WORLD_SIZE`` (``$SLURM_NTASKS``) and the rendezvous ``MASTER_ADDR`` (the first node of
    ``$SLURM_JOB_NODELIST``) and ``MASTER_PORT`` (a port derived from the job id, so every task
    of every node agrees); ``NODE_RANK`` (``$SLURM_NODEID``) is exported as torchrun does. NCCL
    on GPUs, gloo on CPUs. Every rank logs where it sits.
    """
    import torch

    from pipeline.runtime import log

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return 0, 1
    dist_env = submitit.helpers.TorchDistributedEnvironment().export()
    os.environ["NODE_RANK"] = str(env.node)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend)
    log.info(
        "DDP rank %d of %d: node %s (node rank %d of %d), local rank %d, %s, rendezvous %s:%s",
        dist_env.rank,
        dist_env.world_size,
        os.environ.get("SLURMD_NODENAME", env.hostname),  # the SLURM node (several may share a host)
        env.node,
        env.num_nodes,
        dist_env.local_rank,
        backend,
        dist_env.master_addr,
        dist_env.master_port,
    )
    return dist_env.rank, dist_env.world_size


def _requeue_all_ranks(handler: Callable) -> Callable[[int], None]:
    """The hook a training loop calls once its checkpoint is on disk (every rank, after a
    barrier): rank 0 runs submitit's checkpoint-and-requeue handler (it pickles the job and
    calls ``scontrol requeue``, then ``sys.exit``); every rank then meets at a second barrier
    and only then leaves, with rank 0's exit code. So no rank exits while rank 0 is still
    saving or requeueing (submitit's handler itself returns on ranks > 0 for that reason)."""

    def hook(signum: int) -> None:
        import torch.distributed as dist

        from pipeline.runtime import dist_info

        rank, world = dist_info()
        code: Any = -1
        error: BaseException | None = None
        try:
            if rank == 0:
                handler(signum, None)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # e.g. UncompletedJobError: "timed-out too many times"
            error = exc
        if world > 1:
            dist.barrier()
        if error is not None:
            raise error
        raise SystemExit(code)

    return hook


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
        runtime.set_requeue_hook(_requeue_all_ranks(submitit_handler), signals=(usr_sig,))
    # The preflight (python -m pipeline doctor's checks) before anything else: a GPU job whose
    # torch cannot use its GPU fails here in seconds, with the fix in its log.
    from pipeline.doctor import preflight

    runtime.setup_logging()
    preflight(cfg, run_dir, log=runtime.log if int(os.environ.get("SLURM_PROCID", 0)) == 0 else None)
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
    suffix = job_suffix(stage, kwargs)
    # A fresh folder per submission: SLURM job ids restart when its state is purged.
    folder = Path(run_dir) / "logs" / f"{stage}{suffix}" / time.strftime("%Y%m%d-%H%M%S")
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=int(cluster_cfg.get("max_num_timeout", 3))
    )
    on_slurm = executor.cluster == "slurm"
    sub = submitit_parameters(
        params,
        name=f"{Path(run_dir).name}-{stage}{suffix}",
        account=acc if on_slurm else None,
        setup=list(cluster_cfg.get("setup") or []) if on_slurm else None,
    )
    apply_parameters(executor, sub)
    kw = dict(kwargs)
    kw["threads"] = int(params.get("cpus_per_task", kw.get("threads") or 1))
    # Submitted from inside a SLURM job (run_pipeline.sbatch: the driver is a job), sbatch would
    # hand the driver's SLURM_* variables (CPU binding, memory per CPU, ...) to the stage's job.
    with submitit.helpers.clean_env():
        job = executor.submit(StageJob(), stage, dict(cfg), run_dir, kw)
    print(f"{stage}{suffix}: submitted SLURM job {job.job_id} ({executor.cluster}); logs: {folder}", flush=True)
    if not wait:
        return job

    # If this waiting command is stopped (Snakemake shutting down after another job failed,
    # Ctrl-C, scancel of the driver, the SSH session dropped), cancel the SLURM job instead of
    # leaving it running with nobody waiting for it.
    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, _stop) for sig in _CANCEL_SIGNALS}
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"{stage}{suffix}: SLURM job {job.job_id} finished ({len(results)} task(s))", flush=True)
    return results[0]


def apply_parameters(executor: submitit.AutoExecutor, sub: Mapping[str, Any]) -> None:
    """Set :func:`submitit_parameters` on ``executor``. The local and debug executors get no
    ``slurm_*`` key (they know none); on SLURM the wckey goes to the SlurmExecutor under it,
    because AutoExecutor drops None values and so could not replace submitit's default
    ``--wckey=submitit`` by none at all."""
    sub = dict(sub)
    wckey = sub.pop("slurm_wckey", None)
    if executor.cluster != "slurm":
        executor.update_parameters(**{k: v for k, v in sub.items() if not k.startswith("slurm_")})
        return
    executor.update_parameters(**sub)
    executor._executor.update_parameters(wckey=wckey)


def job_suffix(stage: str, kwargs: Mapping[str, Any]) -> str:
    """What follows ``<run>-<stage>`` in a job name and log folder: ``_<set>`` for one sample set
    (nothing for several), ``_cond`` and ``_b<f>`` for the prior variants."""
    if stage == "sample" and kwargs.get("sample_set") and "sample_sets" not in kwargs:
        return f"_{kwargs['sample_set']}"
    if kwargs.get("budget") is not None or kwargs.get("conditional"):
        from pipeline.sets import budget_tag

        return ("_cond" if kwargs.get("conditional") else "") + budget_tag(kwargs.get("budget"))
    return ""


def shell_args(enabled: bool, cluster_config: str | None, account: str | None) -> str:
    """The CLI arguments a Snakemake rule appends to ``python -m pipeline <stage>``, quoted."""
    if not enabled:
        return "--local"
    return f"--submit --cluster-config {shlex.quote(str(cluster_config))} --account {shlex.quote(str(account))}"
