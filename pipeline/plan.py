"""What a Snakemake invocation would submit, before anything is submitted.

    python -m pipeline plan --profile cluster/bigred200 [any snakemake arguments]

runs Snakemake's dry run (``-n -p``) with the given arguments, reads back the
``python -m pipeline <stage> ...`` command of every job it would run, and prints one row per
job: where it runs (a SLURM job or the Snakemake host), partition, GPUs, CPUs per task, memory,
time limit and account from the cluster YAML the command names, the stage's FLOPs counted from
its models at its configured sizes (:mod:`pipeline.flops`), the time they imply at the YAML's
``assumed_tflops`` / ``assumed_step_ms``, the GPU-hours (estimated, and at most: the time
limit), and for training stages the GPU memory per GPU (:func:`pipeline.flops.stage_memory`),
with a warning that names the fix when it passes 90 % of the YAML's ``gpu_memory_gb``. Only
jobs that would run are listed: a finished stage costs nothing. The dry run needs
no account; the plan shows the placeholder where none is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PlanRow", "dry_run_commands", "plan_rows", "format_plan", "main"]

ROOT = Path(__file__).resolve().parents[1]
_COMMAND = re.compile(r"python -m pipeline (\S+)(.*)$")
#: what the plan assumes when the cluster YAML does not say (an A100 40 GB, bf16): sustained
#: TFLOP/s (~20 % of the 312 dense bf16 peak), per-call latency floor (ms), job start-up (s)
DEFAULT_TFLOPS, DEFAULT_STEP_MS, STARTUP_S = 60.0, 3.0, 60.0
#: the network between nodes the plan assumes when the cluster YAML does not say (Gbit/s per
#: node; Big Red 200's Slingshot is quoted at 200, a conservative half of it)
DEFAULT_INTERNODE_GBPS = 100.0


@dataclass
class PlanRow:
    """One job of the plan (times in seconds; ``None`` where a value does not apply)."""

    job: str
    stage: str
    where: str
    partition: str | None
    gpus: int
    cpus: int | None
    mem_gb: float | None
    timeout_min: int | None
    account: str | None
    tflop: float
    detail: str
    est_s: float
    gpu_hours: float
    max_gpu_hours: float | None
    gpu_mem_gib: float | None = None  # estimated per GPU as configured (training stages)
    gpu_mem_other_gib: float | None = None  # the same with gradient checkpointing toggled
    gpu_memory_gb: float | None = None  # the GPU's memory (cluster YAML gpu_memory_gb)
    section: str | None = None  # the config section of the trained network
    nodes: int = 1  # SLURM nodes; ``gpus`` is the job's total (nodes x gpus_per_node)
    comm_s: float = 0.0  # of est_s: the gradient all-reduce across nodes (assumed network)


def dry_run_commands(snakemake_args: list[str], snakefile: Path | None = None) -> tuple[list[str], dict]:
    """The ``python -m pipeline ...`` commands of the jobs Snakemake's dry run would run, and the
    config that run resolved (the Snakefile writes it to ``$VQLP_PLAN_CONFIG``).

    Raises:
        RuntimeError: the dry run failed (its output tail is in the message).
    """
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile or ROOT / "Snakefile"), "-n", "-p", *snakemake_args]
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "config.json"
        env = {**os.environ, "VQLP_PLAN_CONFIG": str(dump)}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd(), env=env)
        config = json.loads(dump.read_text()) if dump.is_file() else {}
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake dry run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    out = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        m = _COMMAND.search(line.strip())
        if m:
            out.append(f"{m.group(1)}{m.group(2)}")
    return out, config


def plan_rows(commands: list[str], config: dict | None, parser: argparse.ArgumentParser) -> list[PlanRow]:
    """One :class:`PlanRow` per command (``<stage> <options>``, as :func:`dry_run_commands` returns),
    its FLOPs counted under ``config`` (the run's resolved config) updated by the command's own
    ``--config-json``; ``parser`` is the ``python -m pipeline`` parser (:func:`pipeline.cli.build_parser`).

    Raises:
        pipeline.dispatch.DispatchError: a cluster YAML a command names is missing or invalid.
    """
    from pipeline.dispatch import job_suffix, load_cluster_config, stage_parameters, submitit_parameters
    from pipeline.flops import estimate_seconds, stage_cost, stage_memory

    rows = []
    for command in commands:
        words = shlex.split(command)
        cut = [i for i, w in enumerate(words) if w in ("|", "2>&1", "&&", ";") or w.startswith(">")]
        args = parser.parse_args(words[: cut[0]] if cut else words)
        cfg = {**(config or {}), **(json.loads(args.config_json) if args.config_json else {})}
        sets = args.sample_set or ["pixelcnn"]
        flags = {"budget": args.budget, "conditional": args.conditional}
        kw = {"sample_sets": sets} if args.stage == "sample" and len(sets) > 1 else {"sample_set": sets[0]}
        cost = stage_cost(args.stage, cfg, sample_sets=sets if args.stage == "sample" else None, **flags)
        run = Path(args.run).name if args.run else cfg.get("run", "default")
        suffix = job_suffix(args.stage, {**(kw if args.stage == "sample" else {}), **flags})
        if args.submit:
            params = stage_parameters(load_cluster_config(args.cluster_config), args.stage)
            sub = submitit_parameters(params, name=f"{run}-{args.stage}{suffix}", account=args.account, setup=None)
            nodes = int(params.get("nodes", 1))
            gpus = int(params.get("gpus_per_node", 1)) * nodes
            tflops = float(params.get("assumed_tflops", DEFAULT_TFLOPS)) * gpus
            gbps = float(params.get("assumed_internode_gbps", DEFAULT_INTERNODE_GBPS))
            step_ms = float(params.get("assumed_step_ms", DEFAULT_STEP_MS))
            est = estimate_seconds(cost, tflops, step_ms, STARTUP_S, ranks=gpus, nodes=nodes, internode_gbps=gbps)
            comm = est - estimate_seconds(cost, tflops, step_ms, STARTUP_S)
            timeout = int(sub["timeout_min"])
            mem = stage_memory(args.stage, cfg, gpus, **flags)
            other = None
            if mem is not None and mem.activations_checkpointed is not None:
                other = mem.total_with(not mem.checkpointing)
            rows.append(
                PlanRow(
                    job=sub["name"],
                    stage=args.stage,
                    where="SLURM",
                    partition=params.get("partition"),
                    gpus=gpus,
                    cpus=params.get("cpus_per_task"),
                    mem_gb=sub.get("mem_gb"),
                    timeout_min=timeout,
                    account=args.account,
                    tflop=cost.flops / 1e12,
                    detail=cost.detail,
                    est_s=est,
                    gpu_hours=est * gpus / 3600,
                    max_gpu_hours=timeout * gpus / 60,
                    gpu_mem_gib=None if mem is None else mem.total,
                    gpu_mem_other_gib=other,
                    gpu_memory_gb=params.get("gpu_memory_gb"),
                    section=_SECTIONS.get(args.stage),
                    nodes=nodes,
                    comm_s=comm,
                )
            )
        else:
            rows.append(
                PlanRow(
                    job=f"{run}-{args.stage}{suffix}",
                    stage=args.stage,
                    where="here",
                    partition=None,
                    gpus=0,
                    cpus=args.threads,
                    mem_gb=None,
                    timeout_min=None,
                    account=None,
                    tflop=cost.flops / 1e12,
                    detail=cost.detail,
                    est_s=float("nan"),
                    gpu_hours=0.0,
                    max_gpu_hours=None,
                )
            )
    return rows


#: the config section of each training stage's network (for the plan's checkpointing advice)
_SECTIONS = {
    "train_vqvae": "vqvae",
    "train_pixelcnn": "pixelcnn",
    "train_diffusion": "diffusion",
    "train_pixel_diffusion": "pixel_diffusion",
    "train_simclr": "simclr",
    "train_classifier": "classifier",
}
#: the plan warns when a stage's estimate passes this fraction of the GPU's memory (the estimate
#: leaves out the CUDA context, cuDNN workspaces and the allocator's slack)
MEMORY_WARN_FRACTION = 0.9


def _gpus(row: PlanRow) -> str:
    """``4`` on one node, ``2x4`` (nodes x GPUs per node) on several."""
    return str(row.gpus) if row.nodes <= 1 else f"{row.nodes}x{row.gpus // row.nodes}"


def _minutes(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds / 60:.1f}"


def format_plan(rows: list[PlanRow]) -> str:
    """The plan as a Markdown table with totals and the assumptions, warning about any job whose
    estimate exceeds its time limit."""
    cols = ["job", "runs", "partition", "GPUs", "CPUs/task", "mem GB", "limit min", "account", "TFLOP", "est. min"]
    cols += ["GPU-h (max)", "GPU mem GiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append(
            f"| {r.job} | {r.where} | {r.partition or '-'} | {_gpus(r)} | {r.cpus or '-'} | "
            f"{'-' if r.mem_gb is None else f'{r.mem_gb:g}'} | {r.timeout_min or '-'} | {r.account or '-'} | "
            f"{r.tflop:.2f} | {_minutes(r.est_s)} | {r.gpu_hours:.3f} "
            f"({'-' if r.max_gpu_hours is None else f'{r.max_gpu_hours:.2f}'}) | "
            f"{'-' if r.gpu_mem_gib is None else f'{r.gpu_mem_gib:.2f}'} |"
        )
    slurm = [r for r in rows if r.where == "SLURM"]
    lines.append("")
    lines.append(
        f"{len(rows)} job(s), {len(slurm)} submitted to SLURM; {sum(r.tflop for r in rows):.1f} TFLOP; "
        f"estimated {sum(r.gpu_hours for r in slurm):.2f} GPU-hours "
        f"(at most {sum(r.max_gpu_hours or 0 for r in slurm):.2f} if every job ran to its time limit)."
    )
    lines.append(
        f"Estimate per job: {STARTUP_S:.0f} s start-up + max(FLOPs / (assumed_tflops x GPUs), calls x "
        "assumed_step_ms), from the cluster YAML (default "
        f"{DEFAULT_TFLOPS:g} TFLOP/s, {DEFAULT_STEP_MS:g} ms); FLOPs counted from the models (pipeline/flops.py)."
    )
    multi = [r for r in slurm if r.nodes > 1]
    if multi:
        lines.append(
            "GPUs NxG: N nodes x G GPUs per node, one DDP rank per GPU (the global batch split over all). Across "
            "nodes each step adds a ring all-reduce of the fp32 gradients over the network (assumed_internode_gbps, "
            f"default {DEFAULT_INTERNODE_GBPS:g} Gbit/s per node): "
            + "; ".join(f"{r.job} {r.comm_s / 60:.1f} min of its {r.est_s / 60:.1f}" for r in multi)
            + " (docs/cluster.md: when two nodes pay off)."
        )
    if any(r.gpu_mem_gib is not None for r in slurm):
        lines.append(
            "GPU mem: per GPU, training stages only: weights, gradients, Adam and EMA (fp32) plus the activations "
            "saved for backward at the per-GPU batch (bf16 when bf16: true), measured on the meta device "
            "(pipeline/flops.py stage_memory); the CUDA context and workspaces (~1 GiB) come on top."
        )
    for r in slurm:
        if r.timeout_min and r.est_s > 60 * r.timeout_min:
            lines.append(f"WARNING: {r.job} is estimated at {r.est_s / 60:.0f} min, over its {r.timeout_min} min limit")
        cap = r.gpu_memory_gb
        if cap and r.gpu_mem_gib is not None and r.gpu_mem_gib > MEMORY_WARN_FRACTION * cap:
            fix = f"lower {r.section}.batch_size"
            if r.gpu_mem_other_gib is not None and r.gpu_mem_other_gib < r.gpu_mem_gib:
                fix = f"set {r.section}.gradient_checkpointing: true ({r.gpu_mem_other_gib:.1f} GiB) or " + fix
            lines.append(
                f"WARNING: {r.job} needs about {r.gpu_mem_gib:.1f} GiB per GPU, over {MEMORY_WARN_FRACTION:.0%} of "
                f"the {cap:g} GB GPU: {fix}"
            )
    if any(r.where == "here" and r.tflop > 0 for r in rows):
        lines.append(
            "Jobs that run here (no SLURM dispatch: the one-allocation mode, or a laptop) have no estimate: "
            "the per-stage plan (--profile cluster/bigred200) gives their GPU time."
        )
    details = [f"- {r.job}: {r.detail}" for r in rows if r.detail != "no network"]
    return "\n".join(lines + ["", "FLOPs:"] + details) + "\n"


def main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    """``python -m pipeline plan [snakemake args]``: print the plan; 1 if the dry run fails.
    ``parser`` reads the stage commands back (the CLI passes its own)."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        rows = plan_rows(*dry_run_commands(argv), parser)
    except Exception as exc:  # the dry run's or the cluster YAML's message, as it is
        print(f"error: plan: {exc}", file=sys.stderr)
        return 1
    print(format_plan(rows), end="")
    return 0
