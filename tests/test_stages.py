"""The stage table (pipeline/stages.py) is the one list of stages: the Snakefile's rules, the
CLI, run_stage.sbatch and the cluster profiles' set-threads agree with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import STAGE_SECTIONS, load_default, stage_view
from pipeline.io import RunPaths
from pipeline.stages import STAGES, TABLE, get_stage

ROOT = Path(__file__).resolve().parents[1]
#: Snakefile rules that are not stages: the target, the run's timings, the priors' variants
#: (train_pixelcnn / train_diffusion with --conditional or --budget) and all sample sets in one
#: SLURM job (the sample stage with several --sample-set)
NOT_STAGES = {"all", "timings", "train_prior_variant", "sample_sets"}


def snakefile_rules() -> dict[str, str]:
    """Rule name -> its text, from the Snakefile and the rule files it includes."""
    text = "\n".join(p.read_text() for p in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))])
    bodies = re.split(r"^ *rule (\w+):\n", text, flags=re.M)
    return dict(zip(bodies[1::2], bodies[2::2]))


def test_every_stage_has_its_callable_sections_and_folder():
    defaults = load_default()
    for stage in TABLE:
        assert callable(get_stage(stage.name)), stage.name
        assert all(s in defaults for s in stage.sections), stage
        assert set(stage_view(defaults, stage.name)) >= set(stage.sections)
        assert STAGE_SECTIONS[stage.name] == stage.sections
        assert RunPaths("r").stage_dir(stage.name) == Path("r") / stage.folder


def test_snakefile_has_one_rule_per_stage_and_dispatches_exactly_the_slurm_stages():
    rules = snakefile_rules()
    assert set(rules) - NOT_STAGES == set(STAGES)
    for name, body in rules.items():
        dispatched = "dispatch=DISPATCH" in body
        if name in STAGES:
            assert dispatched == STAGES[name].slurm, name
            assert f'stage_shell("{name}"' in body, name  # the one command of every stage rule
    assert "dispatch=DISPATCH" in rules["train_prior_variant"]
    assert "dispatch=DISPATCH" in rules["sample_sets"] and 'stage_shell("sample"' in rules["sample_sets"]


def test_cli_offers_every_stage():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for name in STAGES:
        assert name in out


def test_run_stage_sbatch_and_profiles_agree_with_the_table():
    script = (ROOT / "cluster" / "bigred200" / "run_stage.sbatch").read_text()
    case = re.search(r"^\s*([a-z_|]+)\) shift ;;", script, re.M).group(1).split("|")
    assert case == list(STAGES)
    slurm_rules = {n for n, body in snakefile_rules().items() if "dispatch=DISPATCH" in body}
    for profile in ("bigred200", "local"):
        threads = yaml.safe_load((ROOT / "cluster" / profile / "config.yaml").read_text())["set-threads"]
        assert set(threads) == slurm_rules, profile


def test_snakefile_includes_the_rule_files_and_snakefmt_is_clean():
    import shutil

    main = (ROOT / "Snakefile").read_text()
    for rule_file in sorted((ROOT / "rules").glob("*.smk")):
        assert f'include: "rules/{rule_file.name}"' in main, rule_file.name
    exe = shutil.which("snakefmt")
    if exe is None:
        import pytest

        pytest.skip("snakefmt is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--check", "Snakefile", "rules"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
