"""Sampling: the seed study's point, and the sample files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoint import load_model
from pipeline.sample import sample_pixelcnn


def test_greedy_collapses_categorical_does_not(tiny_run):
    prior, _ = load_model(tiny_run / "pixelcnn" / "model.pt")
    draws = {}
    for greedy in (True, False):
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            draws[greedy, seed] = sample_pixelcnn(prior, 8, greedy=greedy, generator=g)
    assert torch.equal(draws[True, 0], draws[True, 1])  # argmax: same images whatever the seed
    assert (draws[True, 0] == draws[True, 0][0]).all()  # and every sample in a batch is the same
    assert not torch.equal(draws[False, 0], draws[False, 1])  # the categorical layer samples
    again = sample_pixelcnn(prior, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[False, 0])  # same seed, same samples


def test_temperature_sharpens(tiny_run):
    prior, _ = load_model(tiny_run / "pixelcnn" / "model.pt")
    cold = sample_pixelcnn(prior, 64, temperature=0.05, generator=torch.Generator().manual_seed(0))
    hot = sample_pixelcnn(prior, 64, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(cold.flatten(1), dim=0)) < len(torch.unique(hot.flatten(1), dim=0))


def test_sample_files(tiny_run, tiny_cfg):
    for model in tiny_cfg["sample"]["sets"]:
        n = tiny_cfg["sample"]["ddpm_num_samples"] if model == "diffusion_ddpm" else tiny_cfg["sample"]["num_samples"]
        arr = np.load(tiny_run / "samples" / f"{model}.npy")
        assert arr.dtype == np.float32 and arr.shape == (n, 1, 28, 28)
        assert arr.min() >= 0 and arr.max() <= 1
        img = Image.open(tiny_run / "samples" / f"{model}.png")
        assert img.mode == "L" and img.width > 28
        record = json.loads((tiny_run / "samples" / f"{model}.json").read_text())
        assert record["num_samples"] == n and record["wall_time_s"] > 0
    ddpm = json.loads((tiny_run / "samples" / "diffusion_ddpm.json").read_text())
    assert ddpm["steps"] == tiny_cfg["diffusion"]["timesteps"] and ddpm["weights"] == "ema"
    timings = json.loads((tiny_run / "timings.json").read_text())
    assert set(timings["stages"]) >= {
        "prepare_data",
        "train_vqvae",
        "extract_latents",
        "train_pixelcnn",
        "train_diffusion",
        "sample_pixelcnn",
    }
    assert timings["total_s"] == round(sum(timings["stages"].values()), 3)


def test_stage_records(tiny_run):
    import yaml

    for folder in ("data", "vqvae", "latents", "pixelcnn", "diffusion"):
        metrics = json.loads((tiny_run / folder / "metrics.json").read_text())
        assert metrics["wall_time_s"] > 0
        assert yaml.safe_load((tiny_run / folder / "config.yaml").read_text())["device"] == "cpu"
        assert not (tiny_run / folder / "checkpoint.pt").exists()
    vq = json.loads((tiny_run / "vqvae" / "metrics.json").read_text())
    assert 1 <= vq["test_perplexity"] <= 128 and vq["test_codes_in_use"] <= 128
    # the reported test MSE is that of the saved model on the saved test split
    from pipeline.checkpoint import load_model
    from pipeline.data import read_dataset
    from pipeline.train import evaluate_vqvae

    model, _ = load_model(tiny_run / "vqvae" / "model.pt")
    test = torch.from_numpy(read_dataset(tiny_run / "data" / "dataset.h5", "test").images).float() / 255
    again = evaluate_vqvae(model, test)
    assert again["recon_mse"] == pytest.approx(vq["test_recon_mse"], rel=1e-5)
    assert again["codes_in_use"] == vq["test_codes_in_use"]
    pc = json.loads((tiny_run / "pixelcnn" / "metrics.json").read_text())
    assert 0 < pc["test_nll_nats_per_code"] < np.log(128) + 1


def test_several_sample_sets_in_one_call(tiny_run, tmp_path):
    """`sample --sample-set a --sample-set b` (what one SLURM job runs for a run's sets) draws
    each set into its own files and record, the same as one call per set."""
    import shutil
    from pathlib import Path

    from helpers import run_cli

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    sets = ["pixelcnn", "diffusion_ddim"]
    for name in sets:
        (run / "samples" / f"{name}.json").unlink()
    tiny = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
    proc = run_cli("sample", "--run", run, "--configfile", tiny, *[a for s in sets for a in ("--sample-set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in sets:
        record = json.loads((run / "samples" / f"{name}.json").read_text())
        assert record["set"] == name
        assert np.array_equal(np.load(run / "samples" / f"{name}.npy"), np.load(tiny_run / "samples" / f"{name}.npy"))


def test_monai_unet_trains_and_samples_through_the_diffusion_stages(tiny_run, tiny_cfg, tmp_path):
    """``diffusion.network: monai``: MONAI's DiffusionModelUNet behind the project's interface,
    trained by train_diffusion and drawn by the sample stage like the own U-Net."""
    import copy
    import shutil

    from pipeline.models import MonaiUNet
    from pipeline.stages import get_stage

    run = tmp_path / "monai"
    for folder in ("data", "vqvae", "latents"):
        shutil.copytree(tiny_run / folder, run / folder)
    cfg = copy.deepcopy(tiny_cfg)
    cfg["diffusion"]["network"] = "monai"
    get_stage("train_diffusion")(cfg, str(run), threads=2)
    net, state = load_model(run / "diffusion" / "model.pt")
    assert state["kind"] == "monai_unet" and isinstance(net, MonaiUNet)
    own, _ = load_model(tiny_run / "diffusion" / "model.pt")
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in own.parameters())
    rec = get_stage("sample")(cfg, str(run), sample_set="diffusion_ddim", threads=2)
    arr = np.load(run / "samples" / "diffusion_ddim.npy")
    assert arr.shape[1:] == (1, 28, 28) and 0 <= arr.min() and arr.max() <= 1 and rec["prior"] == "diffusion"
    with pytest.raises(ValueError, match="network: own"):
        net.enable_gradient_checkpointing(True)
