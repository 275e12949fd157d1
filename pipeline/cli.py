"""Command line: run one stage, show the resolved config, or collect timings.

    python -m pipeline <stage> --run results/<run> [--configfile F] [--set key.sub=value ...]
    python -m pipeline sample --run results/<run> --sample-set diffusion_ddim_s25
    python -m pipeline evaluate --run results/<run>              # report/metrics.json, summary.md
    python -m pipeline config [--configfile F] [--set ...]      # print the resolved config
    python -m pipeline timings --run results/<run>               # write timings.json
    python -m pipeline plan --profile cluster/bigred200 [snakemake args]  # what would be submitted
    python -m pipeline doctor [--profile cluster/bigred200] [--configfile F]  # preflight: torch, CUDA, GPUs
    python -m pipeline export --run results/<run> --out <dir>   # safetensors + model card
    python -m pipeline train_diffusion --run results/<run> --submit [--account A]  # as a SLURM job

Every stage reads the packaged defaults, then ``--configfile`` files, then ``--config-json``
(what the Snakefile passes), then ``--set`` overrides; the result is validated and written
next to the stage's outputs as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, resolve
from pipeline.stages import STAGES, get_stage
from pipeline.timings import collect_timings

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Run one stage of vq-latent-pipeline.")
    p.add_argument(
        "stage",
        choices=[*STAGES, "config", "timings", "plan", "doctor", "export"],
        help="stage to run, 'config' to print the resolved config, 'timings' to sum stage wall times, "
        "'plan' to print what a Snakemake run would submit (its arguments go to snakemake -n), "
        "'doctor' to check this machine (torch build, driver, GPUs, NCCL, run folder, SLURM, device), "
        "'export' to write a run's models as safetensors with a model card",
    )
    p.add_argument("--run", help="run folder (default: results/<config key run>)")
    p.add_argument("--configfile", action="append", default=[], help="YAML file(s) merged over the packaged defaults")
    p.add_argument("--config-json", help="JSON object merged after the files (the Snakefile passes its config so)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override one key; value parsed as YAML",
    )
    p.add_argument(
        "--sample-set",
        dest="sample_set",
        action="append",
        default=None,
        help="sample set for the sample stage (default pixelcnn), e.g. pixelcnn, pixelcnn_ag1.5, "
        "diffusion_dpmsde_ag2, diffusion_ddim_s25, diffusion_dpmsde_g2, pixeldiff_ddim (grammar in "
        "docs/reference.md); repeat it to draw several sets one after another (one SLURM job with --submit)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="train_pixelcnn / train_diffusion: train for this factor times the configured steps "
        "into <prior>_b<f>/ (the quality-vs-compute study)",
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="train_pixelcnn / train_diffusion: the class-conditional variant <prior>_cond/ "
        "(label dropout, conditional_steps; for _g<s> sets)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="submit", action="store_false", help="run in this process (the default)")
    where.add_argument(
        "--submit", dest="submit", action="store_true", help="run as a SLURM job through submitit and wait for it"
    )
    p.add_argument(
        "--cluster-config",
        default="cluster/bigred200/slurm.yaml",
        help="per-stage SLURM parameters for --submit (default: %(default)s)",
    )
    p.add_argument("--account", default=None, help="SLURM account for --submit (default: $SLURM_ACCOUNT)")
    p.set_defaults(submit=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # everything after `plan` goes to snakemake's dry run
        from pipeline.plan import main as plan_main

        return plan_main(argv[1:], build_parser())
    if argv[:1] == ["doctor"]:
        from pipeline.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["export"]:
        from pipeline.export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args.configfile, args.config_json, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run) if args.run else Path("results") / cfg["run"]
    if args.stage == "config":
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    if args.stage == "timings":
        result = collect_timings(run_dir)
        print(yaml.safe_dump(result, sort_keys=False), end="")
        return 0
    kwargs = {"threads": args.threads}
    sets = args.sample_set or ["pixelcnn"]
    if args.stage == "sample":
        kwargs.update({"sample_sets": sets} if len(sets) > 1 else {"sample_set": sets[0]})
    if args.budget is not None or args.conditional:
        if args.stage not in ("train_pixelcnn", "train_diffusion"):
            print(
                f"error: --budget and --conditional apply to train_pixelcnn and train_diffusion, not {args.stage}",
                file=sys.stderr,
            )
            return 2
        kwargs.update(budget=args.budget, conditional=args.conditional)
    if args.submit:
        from pipeline.dispatch import DispatchError, submit_stage

        try:
            submit_stage(args.stage, cfg, str(run_dir), args.cluster_config, args.account, **kwargs)
        except DispatchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.io import DiskFullError, StageInputError
    from pipeline.latents import LatentsError
    from pipeline.runtime import DeviceError

    try:
        get_stage(args.stage)(cfg, str(run_dir), **kwargs)
    except (DataError, LatentsError, CheckpointError, DiskFullError, DeviceError, ConfigError, StageInputError) as exc:
        print(f"error: {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0
