"""What several test files run: the pipeline's command line and Snakemake, from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pipeline_cmd(*args) -> list[str]:
    """The argv of ``python -m pipeline <args>`` (arguments passed through ``str``)."""
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def snakemake_cmd(workdir, *args) -> list[str]:
    """The argv of Snakemake on the repository's Snakefile with working directory ``workdir``."""
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *map(str, args)]


def run_cli(*args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline <args>`` from the repository root; the finished process with text
    stdout and stderr (not checked: the tests read the codes)."""
    return subprocess.run(pipeline_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def prepare(cfg: dict, run: Path) -> Path:
    """Run the prepare_data stage of ``cfg`` into the run folder ``run``; the dataset.h5 path."""
    from pipeline.stages import get_stage

    get_stage("prepare_data")(cfg, str(run))
    return run / "data" / "dataset.h5"


#: the top-level keys every stage's config.yaml holds beside its own section (written out here,
#: not read from pipeline.config: the tests check the code against it)
STAGE_TOP_LEVEL = {
    "run",
    "device",
    "bf16",
    "tf32",
    "cudnn_benchmark",
    "deterministic",
    "tensorboard",
    "data_loading",
    "data_workers",
}
