"""``python -m pipeline doctor`` (issue #21): passes on this CPU machine with the default config,
fails with the Big Red 200 site config (no CUDA here) with the fix in its line, compares a torch
CUDA build with a driver, and the acceptance script runs as a CPU rehearsal. The SLURM side
(doctor inside a job, a GPU job failing fast) is in tests/test_slurm.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import ROOT, run_cli

from pipeline.doctor import check_driver, check_run_folder, profile_configfiles

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def lines(out: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) of doctor's output lines."""
    got = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("ok", "warn", "fail"):
            name, _, detail = rest.strip().partition("  ")
            got[name.strip()] = (status, detail.strip())
    return got


@no_gpu
def test_doctor_passes_with_the_default_config_on_a_cpu_machine():
    proc = run_cli("doctor", "--no-slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc.stdout)
    assert {"python", "torch", "cuda/driver", "gpus", "nccl", "run folder", "device"} <= set(got)
    assert all(status != "fail" for status, _ in got.values())
    assert got["device"] == ("ok", "device: auto -> CPU (no CUDA GPU)")
    assert torch.__version__ in got["torch"][1] and "CPU-only build" in got["torch"][1]
    assert "0 failed" in proc.stdout


@no_gpu
def test_doctor_fails_with_the_big_red_200_site_config_and_names_the_fix():
    assert profile_configfiles(ROOT / "cluster" / "bigred200") == ["cluster/bigred200/pipeline.yaml"]
    proc = run_cli("doctor", "--profile", "cluster/bigred200", "--no-slurm")
    assert proc.returncode == 1
    got = lines(proc.stdout)
    status, detail = got["device"]
    assert status == "fail" and detail.startswith("device: cuda: config key 'device' is 'cuda' but no CUDA GPU")
    assert "Fix: install a CUDA build of torch" in detail and "srun -p gpu-debug" in detail
    assert got["cuda/driver"][0] == "fail" and "needs a GPU node and a CUDA build of torch" in got["cuda/driver"][1]
    assert "failed (cuda/driver, device)" in proc.stdout


def test_doctor_reports_a_bad_config_key():
    proc = run_cli("doctor", "--set", "device=gpu")
    assert proc.returncode == 2 and "device" in proc.stderr


@pytest.mark.parametrize(
    ("built", "driver", "status", "words"),
    [
        ("13.0", {"version": "535.104.05", "cuda": (12, 2), "source": "nvml"}, "fail", "needs a driver for CUDA 13"),
        ("13.0", {"version": "575.51.03", "cuda": None, "source": "/proc"}, "fail", "whl/cu12"),
        ("12.6", {"version": "535.104.05", "cuda": (12, 2), "source": "nvml"}, "warn", "minor-version compat"),
        ("12.6", {"version": "580.65.06", "cuda": (13, 0), "source": "nvidia-smi"}, "ok", "CUDA 12.6 build"),
        ("13.0", {"version": "580.82.07", "cuda": None, "source": "/proc"}, "ok", "driver 580.82.07"),
        (None, {"version": "580.65.06", "cuda": (13, 0), "source": "nvml"}, "fail", "install a CUDA build"),
        (None, {"version": None, "cuda": None, "source": None}, "ok", "no NVIDIA driver (CPU)"),
    ],
)
def test_driver_check_catches_a_wheel_built_for_a_newer_cuda_than_the_driver(built, driver, status, words):
    check = check_driver("cuda" if status != "ok" or built else "auto", {}, driver=driver, built=built)
    assert check.status == status and words in check.detail, check


def test_run_folder_that_cannot_be_written_fails(tmp_path):
    assert check_run_folder(tmp_path / "results" / "r").status == "ok"  # nearest existing parent is writable
    bad = check_run_folder(__import__("pathlib").Path("/proc/vqlp-run"))
    assert bad.status == "fail" and "cannot write in /proc" in bad.detail


@pytest.mark.heavy
@no_gpu
def test_gpu_acceptance_script_is_a_cpu_rehearsal_here(tmp_path):
    """``python benchmarks/gpu_acceptance.py``: exit 0 on this machine, saying first that nothing
    was measured on a GPU; every part ran (the tiny chain in float32 and bf16, each training
    stage, each sampler, DDP over gloo)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("CPU REHEARSAL: no CUDA GPU here, NOTHING WAS MEASURED ON A GPU")
    result = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert result["gpu"] is False and all(result["passed"].values())
    assert [r["stage"] for r in result["training"]] == [
        "train_vqvae",
        "train_classifier",
        "train_pixelcnn",
        "train_diffusion",
    ]
    assert all(r["steps_per_s"] > 0 and r["achieved_tflops"] > 0 for r in result["training"])
    assert len(result["sampling"]) == 6 and all(r["images_per_s"] > 0 for r in result["sampling"])
    assert result["ddp"]["world_size"] == 2 and result["ddp"]["max_relative_difference"] < 1e-4
    assert "assumed_tflops:" in proc.stdout and "CPU rehearsal, NOT for slurm.yaml" in proc.stdout
