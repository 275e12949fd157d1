"""The real Snakemake workflow on the tiny config: outputs, schemas, and what re-runs when."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from helpers import STAGE_TOP_LEVEL, snakemake_cmd

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
MODELS = yaml.safe_load(TINY.read_text())["sample"]["sets"]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, "--configfile", TINY, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count from a dry run's job-stats table."""
    out = snakemake(workdir, "-n", *args)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1]
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m.group(1) != "total"
    }


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    snakemake(wd, "--cores", "2")
    return wd


@pytest.mark.slow
def test_every_output_and_schema(workflow_run):
    run = workflow_run / "results" / "tiny"
    cfg = yaml.safe_load(TINY.read_text())
    for rel in [
        "data/dataset.h5",
        "vqvae/model.pt",
        "vqvae/metrics.json",
        "vqvae/reconstructions.png",
        "vqvae/train_log.csv",
        "latents/latents.h5",
        "pixelcnn/model.pt",
        "pixelcnn/metrics.json",
        "pixelcnn/train_log.csv",
        "diffusion/model.pt",
        "diffusion/metrics.json",
        "diffusion/train_log.csv",
        "timings.json",
        "pixelcnn_cond/model.pt",
        "diffusion_cond/model.pt",
        "classifier/model.pt",
        "classifier/metrics.json",
        "report/metrics.json",
        "report/summary.md",
        "report/sets.tsv",
        "report/training_curves.png",
        "report/sampling_layer.tsv",
        "report/diffusion_steps.tsv",
        "report/guidance.tsv",
    ]:
        assert (run / rel).is_file(), rel
    for stage in ["prepare_data", "train_vqvae", "extract_latents", "train_pixelcnn", "train_diffusion"]:
        assert (run / "logs" / f"{stage}.log").stat().st_size > 0
    with h5py.File(run / "data" / "dataset.h5") as f:
        assert f.attrs["schema_version"] == 2 and f.attrs["max_value"] == 255 and f.attrs["color"] == "gray"
        assert f["train/images"].shape == (cfg["data"]["max_train"], 1, 28, 28) and f["train/images"].dtype == np.uint8
        assert f["test/images"].shape == (cfg["data"]["max_test"], 1, 28, 28)
    with h5py.File(run / "latents" / "latents.h5") as f:
        assert f.attrs["schema_version"] == 3 and f.attrs["K"] == 128 and f.attrs["D"] == 16
        assert f["train/codes"].dtype == np.int16 and f["train/codes"].shape == (cfg["data"]["max_train"], 7, 7)
        assert f["train/latents"].dtype == np.float32 and f["train/latents"].shape == (
            cfg["data"]["max_train"],
            16,
            7,
            7,
        )
        assert list(f.attrs["grid"]) == [7, 7]
        assert len(f.attrs["vqvae_sha256"]) == 64
        copies = cfg["latents"]["augment_copies"]
        assert f["train_aug/codes"].shape == (copies * cfg["data"]["max_train"], 7, 7)
        assert np.array_equal(f["train_aug/labels"][:], np.tile(f["train/labels"][:], copies))
    for m in MODELS:
        arr = np.load(run / "samples" / f"{m}.npy")
        n = cfg["sample"]["ddpm_num_samples"] if m == "diffusion_ddpm" else cfg["sample"]["num_samples"]
        assert arr.shape == (n, 1, 28, 28) and arr.dtype == np.float32
        assert (run / "samples" / f"{m}.png").stat().st_size > 0
    diff_log = (run / "diffusion" / "train_log.csv").read_text().splitlines()
    assert diff_log[0].startswith("step,lr,loss") and diff_log[-1].startswith(str(cfg["diffusion"]["steps"]))
    diff = json.loads((run / "diffusion" / "metrics.json").read_text())
    for key in ("test_loss_ema", "test_loss_raw", "train_probe_loss_ema"):  # the gap: same estimator, train rows
        assert np.isfinite(diff[key]) and diff[key] > 0, key
    # each stage wrote the part of the config it read
    written = yaml.safe_load((run / "diffusion" / "config.yaml").read_text())
    assert (
        set(written) == STAGE_TOP_LEVEL | {"diffusion"} and written["diffusion"]["steps"] == cfg["diffusion"]["steps"]
    )
    timings = json.loads((run / "timings.json").read_text())
    assert {"train_vqvae", "train_diffusion", "sample_diffusion_ddpm", "train_classifier", "evaluate"} <= set(
        timings["stages"]
    )
    assert not (run / "pixel_diffusion").exists()  # the baseline trains only for a pixeldiff_* set


@pytest.mark.slow
def test_reruns_follow_config_sections(workflow_run):
    wd = workflow_run
    assert planned_jobs(wd) == {}  # complete: nothing to do
    # the unconditional model's steps re-run it and its three sample sets (ddim, ddpm, dpmsde_ag2),
    # not the class-conditional variant diffusion_cond/ (it reads conditional_steps)
    changed = planned_jobs(wd, "--config", "diffusion={steps: 21}")
    assert changed == {"train_diffusion": 1, "sample": 3, "evaluate": 1, "timings": 1, "all": 1}
    assert planned_jobs(wd, "--config", "diffusion={conditional_steps: 21}") == {
        "train_prior_variant": 1,
        "sample": 1,
        "evaluate": 1,
        "timings": 1,
        "all": 1,
    }
    # a recipe key is read by both models
    assert planned_jobs(wd, "--config", "diffusion={prediction: epsilon}") == {
        "train_diffusion": 1,
        "train_prior_variant": 1,
        "sample": 4,
        "evaluate": 1,
        "timings": 1,
        "all": 1,
    }
    # so does --forcerun train_diffusion
    assert planned_jobs(wd, "--forcerun", "train_diffusion") == changed
    # each sample set reads only its own keys: the temperature re-runs the three categorical PixelCNN
    # sets (not greedy, not diffusion), ddim_steps the two DDIM sets without _s<S>, solver_steps the dpmsde set
    after = {"evaluate": 1, "timings": 1, "all": 1}
    assert planned_jobs(wd, "--config", "sample={temperature: 0.9}") == {"sample": 3, **after}
    assert planned_jobs(wd, "--config", "sample={ddim_steps: 7}") == {"sample": 2, **after}
    assert planned_jobs(wd, "--config", "sample={solver_steps: 7}") == {"sample": 1, **after}
    # the judge and the evaluation settings re-run the evaluation only
    assert planned_jobs(wd, "--config", "classifier={steps: 21}") == {"train_classifier": 1, **after}
    assert planned_jobs(wd, "--config", "evaluate={num_images: 10}") == after
    # adding a sample set runs that set alone (and the evaluation)
    extra = wd / "extra.yaml"
    extra.write_text(yaml.safe_dump({"sample": {"sets": [*MODELS, "pixelcnn_t0.5"]}}))
    assert planned_jobs(wd, "--configfile", str(TINY), str(extra)) == {"sample": 1, **after}
    # a VQ-VAE change invalidates everything downstream, not the dataset
    vq = planned_jobs(wd, "--config", "vqvae={steps: 21}")
    assert "prepare_data" not in vq and vq["train_vqvae"] == 1 and vq["train_pixelcnn"] == 1
    # another run name is a separate, complete plan
    assert planned_jobs(wd, "--config", "run=try2")["prepare_data"] == 1


@pytest.mark.slow
def test_snakemake_report_holds_grids_curves_and_tables(workflow_run):
    """`snakemake --report` (Snakemake's own report) with every report() output and its caption."""
    import zipfile

    out = workflow_run / "report.zip"  # a .zip keeps the files; the .html variant embeds them
    snakemake(workflow_run, "--report", str(out))
    names = zipfile.ZipFile(out).namelist()
    text = " ".join(names)
    for part in [
        "reconstructions.png",
        "training_curves.png",
        "sets.tsv",
        "guidance.tsv",
        "sampling_layer.tsv",
        "metrics.json",
        *[f"{m}.png" for m in MODELS],
    ]:
        assert part in text, part
    snakemake(workflow_run, "--report", str(workflow_run / "report.html"))
    page = (workflow_run / "report.html").read_text()
    assert "Greedy decoding is deterministic" in page  # a caption, rendered
    assert "classifier-free" in page.lower() or "guidance scale" in page


@pytest.mark.slow
def test_pixel_baseline_trains_for_the_latent_models_wall_time(workflow_run):
    """A pixeldiff_* set trains the pixel-space baseline for the latent model's training seconds
    and adds the latent-vs-pixel table."""
    extra = workflow_run / "pixel.yaml"
    extra.write_text(yaml.safe_dump({"sample": {"sets": [*MODELS, "pixeldiff_ddim"]}}))
    snakemake(workflow_run, "--cores", "2", "--configfile", str(TINY), str(extra))
    run = workflow_run / "results" / "tiny"
    pix = json.loads((run / "pixel_diffusion" / "metrics.json").read_text())
    lat = json.loads((run / "diffusion" / "metrics.json").read_text())
    assert pix["time_budget_s"] == lat["train_seconds"] and pix["steps"] >= 1
    assert np.load(run / "samples" / "pixeldiff_ddim.npy").shape == (12, 1, 28, 28)
    report = json.loads((run / "report" / "metrics.json").read_text())
    rows = report["studies"]["latent_vs_pixel"]
    assert [r["name"] for r in rows] == ["diffusion_ddim", "pixeldiff_ddim"]
    assert all(r["train_images_per_s"] > 0 for r in rows)
    assert (run / "report" / "latent_vs_pixel.tsv").is_file()


@pytest.mark.slow
def test_bad_config_fails_before_any_job(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "diffusion={schedule: sigmoid}", check=False)
    assert proc.returncode != 0
    assert "sigmoid" in proc.stdout + proc.stderr


def test_snakemake_lint_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_single_stage_cli_writes_where_told(tiny_run, tmp_path):
    """`python -m pipeline <stage> --run ... --set ...` re-runs one stage alone."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    before = (run / "pixelcnn" / "model.pt").read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train_diffusion",
            "--run",
            str(run),
            "--configfile",
            str(TINY),
            "--set",
            "diffusion.steps=5",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((run / "diffusion" / "config.yaml").read_text())["diffusion"]["steps"] == 5
    assert "train_diffusion 5/5" in proc.stderr
    assert (run / "pixelcnn" / "model.pt").read_bytes() == before
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "train_diffusion", "--run", str(run), "--set", "diffusion.stepz=5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "did you mean 'diffusion.steps'" in bad.stderr


def test_cluster_profiles_dry_run_without_account_and_guard_site_config(tmp_path):
    """`snakemake --profile cluster/bigred200 -n` prints the plan anywhere; a --configfile that
    would silently drop the profile's site config (SLURM dispatch) is refused."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ACCOUNT"}
    base = snakemake_cmd(tmp_path)
    plan = subprocess.run(
        [*base, "--profile", str(ROOT / "cluster" / "bigred200"), "-n", "-p"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "--submit --cluster-config" in plan.stdout and "train_diffusion" in plan.stdout
    guard = subprocess.run(
        [*base, "--profile", str(ROOT / "cluster" / "bigred200"), "-n", "--configfile", str(TINY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert guard.returncode != 0
    assert (
        "--configfile replaced the profile's site config cluster/bigred200/pipeline.yaml; list it first"
        in guard.stdout + guard.stderr
    )


@pytest.mark.heavy
@pytest.mark.slow
def test_scaling_study_config_runs_end_to_end(workflow_run):
    """`--configfile pipeline/configs/scaling.yaml` over the tiny config: both unconditional priors
    at budgets 0.25, 0.5, 1 and 4 (the f = 1 models are the run's own), judged by the evaluate
    stage, with the table, the plot, the crossover sentence and the Snakemake report entries."""
    study = ROOT / "pipeline" / "configs" / "scaling.yaml"
    plan = planned_jobs(workflow_run, "--configfile", str(TINY), str(study))
    assert (
        plan["train_prior_variant"] == 6
    )  # {pixelcnn, diffusion} x {0.25, 0.5, 4}; f = 1 and the guided set reuse the run's models
    assert "train_pixelcnn" not in plan and "train_diffusion" not in plan
    snakemake(workflow_run, "--cores", "2", "--configfile", str(TINY), str(study))
    run = workflow_run / "results" / "tiny"
    cfg = yaml.safe_load(TINY.read_text())
    for prior in ("pixelcnn", "diffusion"):
        for f in (0.25, 0.5, 4):
            m = json.loads((run / f"{prior}_b{f:g}" / "metrics.json").read_text())
            assert m["steps"] == max(1, round(f * cfg[prior]["steps"])) and m["budget"] == f
    report = json.loads((run / "report" / "metrics.json").read_text())
    rows = report["studies"]["scaling"]
    for sampler in ("pixelcnn", "diffusion_dpmsde"):
        mine = [r for r in rows if r["sampler"] == sampler]
        assert [r["budget"] for r in mine] == [0.25, 0.5, 1.0, 4.0]
        secs = [r["prior_train_seconds"] for r in mine]
        assert secs[-1] > secs[0] > 0  # 16x the steps takes longer
    assert report["scaling_crossover"]["statement"] and report["scaling_crossover"]["pixelcnn"].startswith("pixelcnn")
    assert (run / "report" / "scaling.tsv").is_file() and (run / "report" / "scaling.png").stat().st_size > 0
    assert "**Crossover:**" in (run / "report" / "summary.md").read_text()


def test_ablation_row_retrains_one_prior_and_prints_the_evaluate_numbers(tiny_run, tmp_path):
    """benchmarks/ablation.py: links the base run's data/VQ-VAE/judge/latents, retrains only the
    prior the sets need with the override, and prints the evaluate stage's own numbers. The override
    is flow matching: trained by the stage, drawn by diffusers' flow-matching Euler scheduler
    (``_euler``) and, for the conditional model, by DDIM through the VP point of equal SNR."""
    out = tmp_path / "abl"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ablation.py"),
            "--base",
            str(tiny_run),
            "--out",
            str(out),
            "--name",
            "flow",
            "--configfile",
            str(TINY),
            "--set",
            "diffusion.prediction=flow",
            "--sets",
            "diffusion_euler",
            "diffusion_ddim_g2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [r[1] for r in rows] == ["diffusion_euler", "diffusion_ddim_g2"]
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert float(rows[0][2]) == pytest.approx(report["sets"]["diffusion_euler"]["fd_ratio"], abs=0.005)
    for folder in ("diffusion", "diffusion_cond"):  # retrained here, with the override
        assert not (out / folder).is_symlink()
        assert json.loads((out / folder / "metrics.json").read_text())["prediction"] == "flow"
    for name in ("diffusion_euler", "diffusion_ddim_g2"):
        record = json.loads((out / "samples" / f"{name}.json").read_text())
        assert record["prediction"] == "flow" and np.isfinite(np.load(out / "samples" / f"{name}.npy")).all()
    assert (out / "vqvae").is_symlink() and not (out / "pixelcnn").exists()
