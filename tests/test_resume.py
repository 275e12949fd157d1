"""Exact resume: a training stage interrupted at an arbitrary step and resumed ends with weights
bit-for-bit equal to an uninterrupted run; SIGKILL never leaves a file taken as finished."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from helpers import snakemake_cmd

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
FOLDER = {"train_vqvae": "vqvae", "train_pixelcnn": "pixelcnn", "train_diffusion": "diffusion"}
SECTION = {"train_vqvae": "vqvae", "train_pixelcnn": "pixelcnn", "train_diffusion": "diffusion"}
STEPS = 400


def stage_cmd(stage: str, run: Path, *sets: str) -> list[str]:
    sec = SECTION[stage]
    return [
        sys.executable,
        "-m",
        "pipeline",
        stage,
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--threads",
        "1",
        "--set",
        "deterministic=true",
        "--set",
        f"{sec}.steps={STEPS}",
        "--set",
        f"{sec}.log_every=10",
        *sets,
    ]


def fresh_copy(tiny_run: Path, dest: Path, stage: str) -> Path:
    shutil.copytree(tiny_run, dest)
    folder = dest / FOLDER[stage]
    for f in ("model.pt", "metrics.json", "train_log.csv", "checkpoint.pt"):
        (folder / f).unlink(missing_ok=True)
    return dest


def run_until(cmd: list[str], pattern: str, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` once a stderr line matches ``pattern``; return (rc, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines, sent, t0 = [], False, time.monotonic()
    try:
        for line in proc.stderr:
            lines.append(line)
            if not sent and re.search(pattern, line):
                proc.send_signal(sig)
                sent = True
            if time.monotonic() - t0 > timeout:
                break
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent, "".join(lines)[-2000:]
    return rc, "".join(lines)


def weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    out = {f"model.{k}": v for k, v in state["model"].items()}
    if state.get("ema"):
        out.update({f"ema.{k}": v for k, v in state["ema"].items()})
    if state.get("guide"):  # the autoguidance snapshot, taken before the interruption: restored on resume
        out.update({f"guide.{k}": v for k, v in state["guide"].items()})
    return out


def assert_bit_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory) -> dict:
    out = {}
    for stage in FOLDER:
        run = fresh_copy(tiny_run, tmp_path_factory.mktemp(f"ref_{stage}") / "tiny", stage)
        subprocess.run(stage_cmd(stage, run), check=True, capture_output=True, cwd=ROOT)
        out[stage] = run / FOLDER[stage] / "model.pt"
    return out


@pytest.mark.parametrize("stage", list(FOLDER))
def test_sigterm_at_arbitrary_step_then_resume_is_bit_exact(stage, tiny_run, uninterrupted, tmp_path):
    run = fresh_copy(tiny_run, tmp_path / "tiny", stage)
    # no periodic checkpoint: the one resumed from is the one SIGTERM makes, mid-epoch
    rc, err = run_until(
        stage_cmd(stage, run, "--set", f"{SECTION[stage]}.checkpoint_every=100000"),
        rf"{stage} (1[3-9]\d|2\d\d)/{STEPS}",
        signal.SIGTERM,
    )
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved at step" in err
    assert not (run / FOLDER[stage] / "model.pt").exists()  # no finished output
    assert (run / FOLDER[stage] / "checkpoint.pt").exists()
    done = subprocess.run(
        stage_cmd(stage, run, "--set", f"{SECTION[stage]}.checkpoint_every=100000"),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"resumed from .* at step \d+", done.stderr)
    assert_bit_equal(run / FOLDER[stage] / "model.pt", uninterrupted[stage])
    # the log is continuous: one row per 10 steps, no gap, no repeat
    steps = [int(line.split(",")[0]) for line in (run / FOLDER[stage] / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(10, STEPS + 1, 10))


def test_sigkill_after_checkpoint_then_resume_is_bit_exact(tiny_run, uninterrupted, tmp_path):
    stage = "train_diffusion"
    run = fresh_copy(tiny_run, tmp_path / "tiny", stage)
    cmd = stage_cmd(stage, run, "--set", "diffusion.checkpoint_every=50")
    rc, _ = run_until(cmd, rf"{stage} (2[2-9]\d)/{STEPS}", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (run / "diffusion" / "model.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    assert_bit_equal(run / "diffusion" / "model.pt", uninterrupted[stage])


def test_sigkill_during_latent_extraction_leaves_no_latents_file(tiny_run, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    (run / "latents" / "latents.h5").unlink()
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "extract_latents",
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--set",
        "latents.batch_size=1",
        "--threads",
        "1",
    ]
    rc, _ = run_until(cmd, r"extract_latents: start", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (run / "latents" / "latents.h5").exists()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    with h5py.File(run / "latents" / "latents.h5") as f:
        assert f["train/codes"].shape[0] == 300


def test_snakemake_killed_mid_training_recovers_with_rerun_incomplete(tmp_path):
    """SIGKILL to Snakemake and its job mid-training: no output is taken as finished, and
    `snakemake --rerun-incomplete` completes the run, resuming the stage from its checkpoint."""
    base = snakemake_cmd(
        tmp_path,
        "--configfile",
        TINY,
        "--cores",
        "2",
        "--config",
        "diffusion={steps: 600, log_every: 20, checkpoint_every: 100}",
        "sample={sets: [diffusion_ddim]}",
    )
    proc = subprocess.Popen(
        base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"train_diffusion (2\d\d|3\d\d)/600", line):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("train_diffusion" in line for line in seen), "".join(seen)[-2000:]
    run = tmp_path / "results" / "tiny"
    assert not (run / "diffusion" / "model.pt").exists()
    assert (run / "diffusion" / "checkpoint.pt").exists()
    # a killed driver leaves Snakemake's directory lock: --unlock, then --rerun-incomplete
    subprocess.run([*base, "--unlock"], check=True, capture_output=True, cwd=ROOT, timeout=120)
    done = subprocess.run([*base, "--rerun-incomplete"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in (run / "logs" / "train_diffusion.log").read_text()
    assert torch.load(run / "diffusion" / "model.pt", weights_only=True)["kind"] == "unet"
    assert (run / "samples" / "diffusion_ddim.png").is_file()


# --- the streaming data path (data_loading: stream) gives the same run --------------------------
STREAM = ("--set", "data_loading=stream", "--set", "data_workers=2")


@pytest.mark.parametrize("stage", list(FOLDER))
def test_stream_path_trains_the_same_weights_as_the_memory_path(stage, tiny_run, uninterrupted, tmp_path):
    """The same batches in the same order: the streamed run (HDF5 -> DataLoader with 2 worker
    processes) ends with weights bit-equal to the in-memory run (tiny data: auto -> memory)."""
    run = fresh_copy(tiny_run, tmp_path / "tiny", stage)
    done = subprocess.run(stage_cmd(stage, run, *STREAM), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stream path (data_loading: stream)" in done.stderr
    assert_bit_equal(run / FOLDER[stage] / "model.pt", uninterrupted[stage])
    streamed = json.loads((run / FOLDER[stage] / "metrics.json").read_text())
    in_memory = json.loads((uninterrupted[stage].parent / "metrics.json").read_text())
    for key in ("train_recon_mse", "train_perplexity", "num_train_grids", "num_train_latents"):
        if key in in_memory:
            assert streamed[key] == pytest.approx(in_memory[key], rel=1e-6), key


def test_sigkill_then_resume_on_the_stream_path_is_bit_exact(tiny_run, uninterrupted, tmp_path):
    stage = "train_pixelcnn"
    run = fresh_copy(tiny_run, tmp_path / "tiny", stage)
    cmd = stage_cmd(stage, run, "--set", "pixelcnn.checkpoint_every=50", *STREAM)
    rc, _ = run_until(cmd, rf"{stage} (2[2-9]\d)/{STEPS}", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (run / "pixelcnn" / "model.pt").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"resumed from .* at step [12]\d\d", done.stderr)
    assert_bit_equal(run / "pixelcnn" / "model.pt", uninterrupted[stage])
