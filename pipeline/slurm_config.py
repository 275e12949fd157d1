"""The cluster YAML (``cluster/<name>/slurm.yaml``): its keys, their checks, and the parameters
of one stage. A leaf below :mod:`pipeline.dispatch` (which submits) and :mod:`pipeline.doctor`
and :mod:`pipeline.plan` (which only read it): yaml and the stage table, no submitit, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from pipeline.stages import STAGES

__all__ = ["DispatchError", "PARAM_MAP", "load_cluster_config", "stage_parameters"]

#: keys of a stage entry in the cluster YAML and the submitit parameter each becomes
PARAM_MAP = {
    "partition": "slurm_partition",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "timeout_min": "timeout_min",
    "nodes": "nodes",
    "constraint": "slurm_constraint",
    "qos": "slurm_qos",
    "signal_delay_s": "slurm_signal_delay_s",
    "mail_type": "slurm_mail_type",
    "mail_user": "slurm_mail_user",
    "exclusive": "slurm_exclusive",
    "wckey": "slurm_wckey",
    "exclude": "slurm_exclude",
    "comment": "slurm_comment",
    "additional_parameters": "slurm_additional_parameters",
    "srun_args": "slurm_srun_args",
}
#: keys of a stage entry that are ours, not submitit's: memory per GPU (the node's ``--mem`` is
#: this times ``gpus_per_node``) and what the plan assumes: sustained TFLOP/s per GPU and a
#: per-call latency floor in ms, and each GPU's memory in GB, against which the plan checks a
#: training stage's estimated need (:mod:`pipeline.plan`)
_OWN_KEYS = {"mem_per_gpu_gb", "assumed_tflops", "assumed_step_ms", "assumed_internode_gbps", "gpu_memory_gb"}
_MEMORY_KEYS = ("mem_gb", "mem_per_gpu_gb")
_MAIL_TYPES = {
    "NONE",
    "BEGIN",
    "END",
    "FAIL",
    "REQUEUE",
    "ALL",
    "INVALID_DEPEND",
    "STAGE_OUT",
    "TIME_LIMIT",
    "TIME_LIMIT_90",
    "TIME_LIMIT_80",
    "TIME_LIMIT_50",
    "ARRAY_TASKS",
}
#: the type each key must have (YAML values are checked before anything is submitted)
_TYPES = {
    "partition": str,
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem_gb": (int, float),
    "mem_per_gpu_gb": (int, float),
    "timeout_min": int,
    "nodes": int,
    "constraint": str,
    "qos": str,
    "signal_delay_s": int,
    "mail_type": str,
    "mail_user": str,
    "exclusive": (bool, str),
    "wckey": (str, type(None)),
    "exclude": str,
    "comment": str,
    "additional_parameters": dict,
    "srun_args": list,
    "assumed_tflops": (int, float),
    "assumed_step_ms": (int, float),
    "assumed_internode_gbps": (int, float),
    "gpu_memory_gb": (int, float),
}


class DispatchError(RuntimeError):
    """A SLURM submission could not be made, or the job did not finish; the message says why."""


def _check_entry(path: Path, where: str, entry: Mapping) -> None:
    bad = set(entry) - set(PARAM_MAP) - _OWN_KEYS
    if bad:
        raise DispatchError(
            f"{path}: {where} has unknown keys {sorted(bad)}; expected some of {sorted(set(PARAM_MAP) | _OWN_KEYS)}"
        )
    for key, value in entry.items():
        kind = _TYPES[key]
        if isinstance(value, bool) and kind in (int, (int, float)) or not isinstance(value, kind):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise DispatchError(f"{path}: {where}.{key} is {value!r}; expected {names}")
    if "mem_gb" in entry and "mem_per_gpu_gb" in entry:
        raise DispatchError(f"{path}: {where} sets both mem_gb and mem_per_gpu_gb; keep one")
    if "mail_type" in entry:
        unknown = {t.strip().upper() for t in entry["mail_type"].split(",")} - _MAIL_TYPES
        if unknown:
            raise DispatchError(
                f"{path}: {where}.mail_type has {sorted(unknown)}; expected a comma list of {sorted(_MAIL_TYPES)}"
            )
    if "srun_args" in entry and not all(isinstance(a, str) for a in entry["srun_args"]):
        raise DispatchError(f"{path}: {where}.srun_args must be a list of strings, got {entry['srun_args']!r}")


def load_cluster_config(path: str | os.PathLike) -> dict:
    """Read a cluster YAML: ``defaults`` (applied to every stage), ``stages.<stage>`` overrides,
    ``setup`` (shell lines run in the job before Python starts, e.g. ``module load``),
    ``max_num_timeout`` (requeues after a time limit).

    Stage keys (each optional): ``partition``, ``gpus_per_node`` (> 1: DDP, one task per GPU),
    ``cpus_per_task`` (per task, so per GPU), ``mem_gb`` (per node) or ``mem_per_gpu_gb`` (the
    node's memory is this times ``gpus_per_node``), ``timeout_min``, ``signal_delay_s``,
    ``nodes``, ``constraint``, ``qos``, ``mail_type`` (e.g. ``END,FAIL``), ``mail_user``,
    ``exclusive``, ``wckey`` (null: none; submitit's default ``submitit`` is never sent),
    ``exclude``, ``comment``, ``additional_parameters`` (any other ``#SBATCH --key=value``, as
    a mapping), ``srun_args`` (a list passed to the ``srun`` inside the job), ``assumed_tflops``
    and ``assumed_step_ms`` (sustained TFLOP/s per GPU and per-call latency the plan assumes),
    ``assumed_internode_gbps`` (the network between nodes, Gbit/s per node, for ``nodes > 1``).

    Raises:
        DispatchError: missing file, not YAML, keys that are not SLURM parameters we know, or a
            value of the wrong type (the message names the file, the key and what was expected).
    """
    p = Path(path)
    if not p.is_file():
        raise DispatchError(f"cluster config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DispatchError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise DispatchError(f"{p}: expected a mapping with defaults, stages, setup, max_num_timeout")
    unknown = set(data) - {"defaults", "stages", "setup", "max_num_timeout"}
    if unknown:
        raise DispatchError(
            f"{p}: unknown top-level keys {sorted(unknown)}; expected defaults, stages, setup, max_num_timeout"
        )
    stages = data.get("stages") or {}
    bad_stages = set(stages) - set(STAGES)
    if bad_stages:
        raise DispatchError(f"{p}: stages has unknown stages {sorted(bad_stages)}; expected some of {list(STAGES)}")
    for where, entry in [("defaults", data.get("defaults") or {})] + [
        (f"stages.{k}", v or {}) for k, v in stages.items()
    ]:
        _check_entry(p, where, entry)
    setup = data.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise DispatchError(f"{p}: setup must be a list of shell lines, got {setup!r}")
    return data


def stage_parameters(cluster: Mapping, stage: str) -> dict:
    """The cluster YAML's defaults updated by the stage's entry (our key names). A stage entry
    that sets a memory key (``mem_gb`` or ``mem_per_gpu_gb``) replaces the defaults' memory."""
    params = dict(cluster.get("defaults") or {})
    entry = (cluster.get("stages") or {}).get(stage) or {}
    if any(k in entry for k in _MEMORY_KEYS):
        for k in _MEMORY_KEYS:
            params.pop(k, None)
    params.update(entry)
    return params
