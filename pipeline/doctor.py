"""``python -m pipeline doctor``: a preflight of the machine a run is about to use.

    python -m pipeline doctor [--profile cluster/bigred200] [--configfile F ...] [--set k=v ...]

One line per check, each ``ok``, ``warn`` or ``fail``, and exit status 1 when any check fails:
Python and which torch (the environment's or another one by path), torch's CUDA build against
the NVIDIA driver, the GPUs torch sees (compute capability, bf16, TF32), NCCL for multi-GPU
stages, free space and write access in the run folder, SLURM and the account, and the config's
``device``. Run it on the login node after installing; every SLURM stage job runs the same
checks before its stage starts (:func:`preflight`, called by :mod:`pipeline.dispatch`), so a GPU
job that cannot use its GPU fails in seconds with the fix in its log instead of training on the
CPU until its time limit.

A driver module (like :mod:`pipeline.plan`): it reads the config and the cluster YAML and
imports torch; no stage imports it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["Check", "run_checks", "format_checks", "preflight", "profile_configfiles", "main"]

#: the oldest driver of each CUDA major version (NVIDIA's CUDA Toolkit release notes, table 3:
#: "CUDA Toolkit and Minimum Required Driver Version for CUDA Minor Version Compatibility")
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
#: below this many GB free in the run folder's file system the check warns
MIN_FREE_GB = 5.0


@dataclass(frozen=True)
class Check:
    """One preflight result: ``status`` is "ok", "warn" or "fail"; ``detail`` one line (with the
    fix on a failure)."""

    name: str
    status: str
    detail: str


def _version_tuple(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in (text or "").split(".") if p.isdigit())
    except ValueError:
        return ()


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check(
        "python",
        "ok" if ok else "fail",
        f"Python {sys.version.split()[0]} at {sys.executable}" + ("" if ok else " (needs >= 3.10)"),
    )


def check_torch() -> Check:
    """Which torch: its version, build and path, and whether it lies in this environment
    (``sys.prefix``); a torch from elsewhere (a module's site-packages or ``PYTHONPATH``)
    shadowing the environment's is the classic cause of a wrong CUDA build on a cluster."""
    try:
        import torch
    except ImportError as exc:
        return Check("torch", "fail", f"cannot import torch ({exc}): pip install torch (docs/cluster.md)")
    from pipeline.runtime import torch_build

    path = Path(torch.__file__).resolve().parent
    inside = any(path.is_relative_to(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix} if p)
    venv = sys.prefix != sys.base_prefix
    if venv and not path.is_relative_to(Path(sys.prefix).resolve()):
        return Check(
            "torch",
            "warn",
            f"{torch_build()} from {path}, outside this environment ({sys.prefix}): another torch (a module's "
            "or PYTHONPATH's) shadows the environment's; unset PYTHONPATH or pip install torch in the environment",
        )
    where = "this environment" if inside else "outside sys.prefix"
    return Check("torch", "ok", f"{torch_build()} from {path} ({where})")


def check_driver(
    device: str,
    allocation: Mapping[str, str],
    driver: Mapping | None = None,
    built: str | None = "this torch",
) -> Check:
    """torch's CUDA build against the NVIDIA driver: a driver supports every CUDA release up to the
    one it reports, and within one major version the older ones' minor-version compatibility
    (NVIDIA's compatibility guide), so torch's CUDA major must not pass the driver's.

    Args:
        device, allocation: the config's ``device`` and :func:`pipeline.runtime.gpu_allocation`.
        driver: :func:`pipeline.runtime.nvidia_driver`'s answer (read from this machine when None).
        built: torch's CUDA version ("13.0"; None for a CPU-only build); this torch's by default.
    """
    import torch

    from pipeline.runtime import nvidia_driver

    driver = nvidia_driver() if driver is None else driver
    if built == "this torch":
        built = torch.version.cuda

    def build() -> str:  # the build compared (a test may pass another)
        return f"torch {torch.__version__} ({f'CUDA {built} build' if built else 'CPU-only build'})"

    wants_gpu = device != "cpu" and (device == "cuda" or bool(allocation))
    if not driver["version"]:
        if not built:
            if wants_gpu:
                return Check(
                    "cuda/driver",
                    "fail",
                    f"{build()}; no NVIDIA driver: device {device!r} needs a GPU node and a CUDA build of torch "
                    "(docs/cluster.md, 'Which torch'), or set device: cpu",
                )
            return Check("cuda/driver", "ok", f"{build()}; no NVIDIA driver (CPU)")
        status = "fail" if wants_gpu else "ok"
        return Check(
            "cuda/driver",
            status,
            f"{build()}; no NVIDIA driver on this machine"
            + (": run on a GPU node (a job with --gpus)" if wants_gpu else " (CPU; fine on a login node)"),
        )
    if driver["cuda"]:
        have = tuple(driver["cuda"])
        drv = f"NVIDIA driver {driver['version']} (supports CUDA up to {have[0]}.{have[1]})"
    else:  # /proc gives no CUDA version: the newest major whose oldest driver this one reaches
        reached = [m for m, v in MIN_DRIVER.items() if _version_tuple(driver["version"]) >= _version_tuple(v)]
        have = (max(reached), 99) if reached else (0, 0)
        drv = f"NVIDIA driver {driver['version']} (CUDA {have[0]}.x by its version)"
    if not built:
        return Check(
            "cuda/driver",
            "fail" if device != "cpu" else "warn",
            f"{build()} on a machine with {drv}: install a CUDA build of torch (docs/cluster.md, 'Which torch')",
        )
    major, minor = _version_tuple(built)[:2]
    if have[0] < major:
        variant = {12: "cu126", 11: "cu118"}.get(have[0])
        fix = (
            f"install a torch built for CUDA {have[0]} (pip install torch==<version> --index-url "
            f"https://download.pytorch.org/whl/{variant}) or ask for a newer driver"
            if variant
            else "ask the site for a newer driver"
        )
        return Check(
            "cuda/driver",
            "fail",
            f"{build()} needs a driver for CUDA {major} (>= {MIN_DRIVER.get(major, '?')}); this {drv}: {fix}",
        )
    if have < (major, minor):
        return Check(
            "cuda/driver",
            "warn",
            f"{build()} on {drv}: runs by minor-version compatibility (kernels needing a newer driver fail)",
        )
    return Check("cuda/driver", "ok", f"{build()} on {drv}")


def check_gpus(device: str, allocation: Mapping[str, str]) -> Check:
    """The GPUs torch sees, their compute capability and bf16/TF32 support (TF32 and fast bf16
    need Ampere, compute capability 8.0, or newer)."""
    import torch

    if not torch.cuda.is_available():
        given = ", ".join(f"{k}={v}" for k, v in allocation.items())
        if allocation and device != "cpu":
            return Check("gpus", "fail", f"this job was given GPUs ({given}) but torch sees none")
        if allocation:
            return Check("gpus", "warn", f"this job was given GPUs ({given}) but torch sees none; device: cpu runs on")
        return Check("gpus", "ok", "no CUDA GPU (runs on the CPU)")
    parts, status = [], "ok"
    for i in range(torch.cuda.device_count()):
        cc = torch.cuda.get_device_capability(i)
        props = torch.cuda.get_device_properties(i)
        ampere = cc >= (8, 0)
        if not ampere:
            status = "warn"
        parts.append(
            f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB, compute {cc[0]}.{cc[1]}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() and ampere else 'emulated/slow'}, "
            f"TF32 {'yes' if ampere else 'no'})"
        )
    return Check("gpus", status, "; ".join(parts))


def check_nccl(cluster_cfg: Mapping | None) -> Check:
    """NCCL for the stages the cluster YAML runs on several GPUs (DDP over NCCL on CUDA; gloo on
    the CPU)."""
    import torch
    import torch.distributed as dist

    multi = []
    if cluster_cfg:
        from pipeline.slurm_config import stage_parameters
        from pipeline.stages import STAGES

        multi = [
            s
            for s in STAGES
            if int(stage_parameters(cluster_cfg, s).get("gpus_per_node", 1))
            * int(stage_parameters(cluster_cfg, s).get("nodes", 1))
            > 1
        ]
    if not dist.is_available():
        return Check("nccl", "fail" if multi else "warn", "torch.distributed is not available in this torch build")
    if not torch.cuda.is_available():
        gloo = dist.is_gloo_available()
        return Check(
            "nccl", "ok" if gloo else "warn", f"CPU: DDP would use gloo ({'available' if gloo else 'missing'})"
        )
    if dist.is_nccl_available():
        version = ".".join(map(str, torch.cuda.nccl.version()))
        what = f"multi-GPU stages: {', '.join(multi)}" if multi else "no multi-GPU stage configured"
        return Check("nccl", "ok", f"NCCL {version} ({what})")
    return Check(
        "nccl",
        "fail" if multi else "warn",
        "NCCL is not available in this torch build"
        + (f"; needed by {', '.join(multi)} (gpus_per_node > 1)" if multi else ""),
    )


def check_run_folder(run_dir: Path) -> Check:
    """Free space and write access where the run writes (the nearest existing parent)."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".vqlp-doctor-"):
            pass
    except OSError as exc:
        return Check("run folder", "fail", f"{run_dir}: cannot write in {probe} ({exc.strerror})")
    status = "ok" if free_gb >= MIN_FREE_GB else "warn"
    return Check(
        "run folder",
        status,
        f"{run_dir}: writable, {free_gb:.1f} GB free" + ("" if status == "ok" else f" (under {MIN_FREE_GB:g} GB)"),
    )


def _run(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def check_slurm(cfg: Mapping) -> list[Check]:
    """SLURM reachable (``scontrol ping``) when the config submits stages, and the account
    accepted where ``sacctmgr`` can tell (an association of this user with it)."""
    slurm = cfg.get("slurm") or {}
    enabled = bool(slurm.get("enabled"))
    if not shutil.which("sbatch"):
        status = "fail" if enabled else "ok"
        return [
            Check(
                "slurm",
                status,
                "no sbatch on PATH" + (": slurm.enabled needs a SLURM login node" if enabled else " (stages run here)"),
            )
        ]
    proc = _run(["scontrol", "ping"])
    up = proc is not None and proc.returncode == 0 and " UP" in proc.stdout.replace("\n", " ")
    ping = (proc.stdout.strip().splitlines() or ["no answer"])[0] if proc else "scontrol failed"
    checks = [Check("slurm", "ok" if up else ("fail" if enabled else "warn"), ping)]
    account = slurm.get("account") or os.environ.get("SLURM_ACCOUNT")
    if not enabled:
        return checks
    if not account:
        checks.append(Check("account", "warn", "no account: set slurm.account or export SLURM_ACCOUNT=<account>"))
        return checks
    import getpass

    user = getpass.getuser()
    if not shutil.which("sacctmgr"):
        checks.append(Check("account", "warn", f"{account}: no sacctmgr here to check it"))
        return checks
    proc = _run(
        ["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={user}", f"account={account}", "format=account"]
    )
    if proc is None or proc.returncode != 0:
        checks.append(Check("account", "warn", f"{account}: sacctmgr could not tell"))
    elif proc.stdout.strip():
        checks.append(Check("account", "ok", f"{account}: user {user} is associated with it"))
    else:
        checks.append(
            Check(
                "account",
                "fail",
                f"{account}: user {user} has no association with this account "
                "(sacctmgr show assoc); check the name (e.g. r00000)",
            )
        )
    return checks


def check_device(cfg: Mapping, allocation: Mapping[str, str]) -> Check:
    """The config's ``device`` (and ``bf16``) against what this machine has: the same decision as
    :func:`pipeline.runtime.resolve_device`, which every stage makes."""
    from pipeline.runtime import DeviceError, resolve_device

    name = str(cfg.get("device", "auto"))
    bf16 = " with bf16 autocast" if cfg.get("bf16") else ""
    try:
        dev = resolve_device(name)
    except DeviceError as exc:
        hint = ""
        if "SLURM_JOB_ID" not in os.environ and (cfg.get("slurm") or {}).get("enabled"):
            hint = (
                " (on a login node this is expected: run the same command on a GPU node, "
                "srun -p gpu-debug --gpus-per-node 1 -A <account> -t 10 python -m pipeline doctor ...)"
            )
        return Check("device", "fail", f"device: {name}: {exc}{hint}")
    except ValueError as exc:
        return Check("device", "fail", str(exc))
    if dev.type == "cpu":
        why = "said explicitly" if name == "cpu" else "no CUDA GPU"
        return Check("device", "ok", f"device: {name} -> CPU ({why}){bf16}")
    return Check("device", "ok", f"device: {name} -> {dev}{bf16}")


def run_checks(cfg: Mapping, run_dir: str | os.PathLike, slurm: bool = True) -> list[Check]:
    """Every check of the preflight, in order (``slurm``: include the SLURM/account checks)."""
    from pipeline.runtime import gpu_allocation

    allocation = gpu_allocation()
    cluster_cfg = None
    cc_path = (cfg.get("slurm") or {}).get("cluster_config")
    if cc_path and Path(cc_path).is_file():
        from pipeline.slurm_config import load_cluster_config

        try:
            cluster_cfg = load_cluster_config(cc_path)
        except Exception:  # its own check below names the problem
            cluster_cfg = None
    name = str(cfg.get("device", "auto"))
    checks = [check_python(), check_torch(), check_driver(name, allocation), check_gpus(name, allocation)]
    checks += [check_nccl(cluster_cfg), check_run_folder(Path(run_dir))]
    if slurm:
        checks += check_slurm(cfg)
    checks.append(check_device(cfg, allocation))
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check: ``ok   torch        torch 2.13.0+cpu (CPU-only build) from ...``."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status:<4} {c.name:<{width}}  {c.detail}" for c in checks) + "\n"


def preflight(cfg: Mapping, run_dir: str | os.PathLike, log=None) -> list[Check]:
    """The checks every SLURM stage job runs before its stage (no SLURM/account checks: the job
    is already running). Logs them (``log.info``) and raises on a failure.

    Raises:
        pipeline.runtime.DeviceError: a check failed; the message is the failed lines.
    """
    from pipeline.runtime import DeviceError

    checks = run_checks(cfg, run_dir, slurm=False)
    if log is not None:
        for line in format_checks(checks).splitlines():
            log.info("doctor: %s", line)
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise DeviceError("; ".join(f"{c.name}: {c.detail}" for c in failed))
    return checks


def profile_configfiles(profile: str | os.PathLike) -> list[str]:
    """The ``configfiles`` a Snakemake profile folder's ``config.yaml`` lists (what
    ``snakemake --profile`` would merge first).

    Raises:
        pipeline.config.ConfigError: no such profile, or its config.yaml is not a mapping.
    """
    from pipeline.config import ConfigError

    path = Path(profile) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {str(profile)!r} has no config.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    files = data.get("configfiles") or []
    return [files] if isinstance(files, str) else list(files)


def main(argv: list[str]) -> int:
    """``python -m pipeline doctor``: print the checks; 0 when none failed, 1 otherwise, 2 for a
    bad config."""
    from pipeline.config import ConfigError, resolve

    p = argparse.ArgumentParser(prog="python -m pipeline doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", help="a Snakemake profile folder: its configfiles are merged first")
    p.add_argument("--configfile", action="append", default=[], help="YAML file(s) merged over the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    p.add_argument("--run", help="run folder (default: results/<config key run>)")
    p.add_argument("--no-slurm", action="store_true", help="skip the SLURM and account checks")
    args = p.parse_args(argv)
    try:
        files = (profile_configfiles(args.profile) if args.profile else []) + list(args.configfile)
        cfg = resolve(files, None, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run) if args.run else Path("results") / cfg["run"]
    checks = run_checks(cfg, run_dir, slurm=not args.no_slurm)
    print(format_checks(checks), end="")
    failed = [c.name for c in checks if c.status == "fail"]
    print(f"doctor: {len(checks)} checks, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0
