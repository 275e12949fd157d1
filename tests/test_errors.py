"""The catalogue of bad input: each entry fails with a message naming the file, key or value.

(Entries tested elsewhere: IDX truncated / wrong magic / wrong dimensions / corrupt gzip and a
SHA-256 mismatch in test_data.py; latents.h5 of another schema version, missing dataset, wrong
dtype, other VQ-VAE checkpoint in test_latents.py; config unknown key, wrong type, zero steps,
unknown schedule in test_config.py; a SLURM profile without an account in test_slurm.py.)
"""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import run_cli

from pipeline.checkpoint import CheckpointError, load, load_model, save
from pipeline.config import resolve
from pipeline.data import IDX_FILES, DataError, load_idx_source, read_dataset
from pipeline.models import build_model
from pipeline.runtime import DeviceError, resolve_device

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Announces 10,000 bytes, sends 100, and hangs up: a connection dropped mid-file."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"x" * 98)
        self.wfile.flush()
        self.connection.shutdown(2)

    def log_message(self, *args):
        pass


@pytest.fixture
def dropping_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_connection_dropped_mid_file(dropping_server, tmp_path):
    cfg = resolve(
        overrides=[
            "data.source=mnist",
            f"data.path={tmp_path}",
            "data.download=true",
            f"data.mirrors=['{dropping_server}']",
            "data.timeout_s=5",
        ]
    )["data"]
    with pytest.raises(
        DataError,
        match=r"(?s)could not download 'train-images-idx3-ubyte.gz'.*connection dropped after 100 of 10000 bytes",
    ):
        load_idx_source(cfg)
    assert not any(tmp_path.iterdir())  # no partial file left


def test_every_mirror_down_lists_each(tmp_path):
    cfg = resolve(
        overrides=[
            "data.source=mnist",
            f"data.path={tmp_path}",
            "data.download=true",
            "data.mirrors=['http://127.0.0.1:9/a/', 'http://127.0.0.1:9/b/']",
            "data.timeout_s=2",
        ]
    )["data"]
    with pytest.raises(
        DataError, match=r"(?s)tried:\n  http://127.0.0.1:9/a/train-images.*\n  http://127.0.0.1:9/b/train-images"
    ):
        load_idx_source(cfg)


def test_idx_images_and_labels_of_different_lengths(tmp_path):
    from tests.test_data import make_idx_folder, write_idx

    make_idx_folder(tmp_path, 30, 10)
    write_idx(tmp_path / IDX_FILES["test_labels"], "labels", np.zeros(9))
    with pytest.raises(DataError, match=r"test has 10 images but 9 labels"):
        load_idx_source(resolve(overrides=["data.source=mnist", f"data.path={tmp_path}"])["data"])


def test_dataset_h5_wrong_shape_and_not_hdf5(tmp_path):
    p = tmp_path / "dataset.h5"
    with h5py.File(p, "w") as f:
        f.attrs["schema_version"] = 1
        f["train/images"] = np.zeros((3, 28, 28), np.uint8)
        f["train/labels"] = np.zeros(3, np.int64)
    with pytest.raises(DataError, match=r"'/train/images' is uint8 \(3, 28, 28\), expected uint8 \(N, C, H, W\)"):
        read_dataset(p, "train")
    q = tmp_path / "text.h5"
    q.write_text("hello")
    with pytest.raises(DataError, match=r"text.h5: not a readable HDF5 file"):
        read_dataset(q, "train")


def test_checkpoint_from_another_architecture_names_the_keys(tmp_path):
    small = build_model("pixelcnn", {"num_embeddings": 16, "hidden_channels": 8, "num_layers": 2})
    save(
        tmp_path / "model.pt",
        {
            "kind": "pixelcnn",
            "args": {"num_embeddings": 16, "hidden_channels": 8, "num_layers": 3},
            "model": small.state_dict(),
        },
    )
    with pytest.raises(
        CheckpointError, match=r"model.pt: checkpoint does not fit the model architecture: missing keys \['layers.2"
    ):
        load_model(tmp_path / "model.pt")
    save(
        tmp_path / "wide.pt",
        {
            "kind": "pixelcnn",
            "args": {"num_embeddings": 16, "hidden_channels": 12, "num_layers": 2},
            "model": small.state_dict(),
        },
    )
    with pytest.raises(
        CheckpointError, match=r"shape mismatch embedding.weight: checkpoint \(16, 8\) vs model \(16, 12\)"
    ):
        load_model(tmp_path / "wide.pt")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/vqlp-pwned"),))


def test_checkpoint_that_is_not_ours(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"junk.pt: not a vq-latent-pipeline checkpoint or corrupt"):
        load(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: not a vq-latent-pipeline checkpoint \(no format tag"):
        load(tmp_path / "other.pt")
    # a pickle that would run code: weights_only refuses it and nothing runs
    Path("/tmp/vqlp-pwned").unlink(missing_ok=True)
    torch.save({"format": "vq-latent-pipeline", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a vq-latent-pipeline checkpoint or corrupt"):
        load(tmp_path / "evil.pt")
    assert not Path("/tmp/vqlp-pwned").exists()
    with pytest.raises(CheckpointError, match=r"checkpoint version 99, this code reads version 1"):
        save(tmp_path / "v.pt", {})
        data = torch.load(tmp_path / "v.pt", weights_only=True)
        data["version"] = 99
        torch.save(data, tmp_path / "v.pt")
        load(tmp_path / "v.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu():
    with pytest.raises(DeviceError, match=r"config key 'device' is 'cuda' but no CUDA GPU is visible to torch "):
        resolve_device("cuda")
    proc = run_cli("train_vqvae", "--run", "/nonexistent/run", "--set", "device=cuda")
    assert proc.returncode == 1 and "error: train_vqvae: config key 'device' is 'cuda'" in proc.stderr
    assert "CPU-only build" in proc.stderr and "Fix: install a CUDA build of torch" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0"},
        {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"},
        {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0,1"},
    ],
)
def test_a_gpu_job_without_usable_cuda_fails_instead_of_training_on_the_cpu(monkeypatch, env):
    for key in ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DeviceError) as err:
        resolve_device("auto")
    line = str(err.value)
    assert "\n" not in line and line.startswith("this SLURM job was given GPUs (")
    assert f"torch {torch.__version__} (CPU-only build)" in line and "no NVIDIA driver found" in line
    assert "Fix: install a CUDA build of torch" in line and "set device: cpu" in line
    assert resolve_device("cpu").type == "cpu"  # device: cpu said explicitly still runs
    monkeypatch.delenv("SLURM_JOB_ID")
    if set(env) == {"SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES"}:  # outside a job, CUDA_VISIBLE_DEVICES is no allocation
        assert resolve_device("auto").type == "cpu"


def test_missing_input_file_is_named(tmp_path):
    proc = run_cli("train_vqvae", "--run", str(tmp_path / "r"), "--configfile", str(TINY))
    assert proc.returncode == 1
    assert (
        f"dataset file '{tmp_path / 'r' / 'data' / 'dataset.h5'}' does not exist (run the prepare_data stage)"
        in proc.stderr
    )


@pytest.fixture
def tiny_fs(tmp_path, request):
    """A real, tiny filesystem (tmpfs of ``request.param``): it fills up like a full disk.
    Skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("tiny_fs", ["256k"], indirect=True)
def test_disk_full_while_writing_dataset(tiny_fs):
    run = tiny_fs / "r"
    proc = run_cli(
        "prepare_data",
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--set",
        "data.max_train=4500",
        "--set",
        "data.max_test=500",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"disk full while writing {run / 'data' / 'dataset.h5'} (nothing was replaced" in proc.stderr
    assert not (run / "data" / "dataset.h5").exists() and not list((run / "data").glob("*.tmp"))


@pytest.mark.parametrize("tiny_fs", ["1m"], indirect=True)
def test_disk_full_before_writing_latents(tiny_run, tiny_fs):
    import shutil

    run = tiny_fs / "r"
    for rel in ("data/dataset.h5", "vqvae/model.pt"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_run / rel, run / rel)
    proc = run_cli("extract_latents", "--run", str(run), "--configfile", str(TINY))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"disk full: writing {run / 'latents' / 'latents.h5'} needs up to" in proc.stderr
    assert not (run / "latents" / "latents.h5").exists()


def test_prior_trained_on_another_vqvae_is_refused_by_the_sampler(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "pixelcnn" / "model.pt", weights_only=True)
    state["vqvae_sha256"] = "0" * 64
    torch.save(state, run / "pixelcnn" / "model.pt")
    proc = run_cli("sample", "--sample-set", "pixelcnn", "--run", str(run), "--configfile", str(TINY))
    assert proc.returncode == 1
    assert (
        f"error: sample: {run / 'pixelcnn' / 'model.pt'} was trained on latents of another vqvae/model.pt; re-run "
        "train_pixelcnn" in proc.stderr
    )


@pytest.mark.parametrize("tiny_fs", ["256k"], indirect=True)
def test_disk_full_while_saving_a_checkpoint(tiny_fs):
    """torch gives no reason for a failed write; on a full filesystem that is a DiskFullError."""
    from pipeline.io import DiskFullError

    with pytest.raises(DiskFullError, match=r"disk full while writing .*model.pt \(nothing was replaced"):
        save(tiny_fs / "model.pt", {"model": {"w": torch.zeros(512, 1024)}})
    assert not list(tiny_fs.iterdir())  # neither the file nor its temporary remains


def test_other_write_failures_are_not_called_disk_full(tmp_path):
    from pipeline.io import DiskFullError, atomic_path

    with pytest.raises(RuntimeError, match="file write failed") as info:
        with atomic_path(tmp_path / "x.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert not isinstance(info.value, DiskFullError)  # plenty of space here: not a full disk


def test_conditional_set_of_an_unconditional_model_and_unknown_sets_are_named(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    shutil.copy(
        run / "pixelcnn" / "model.pt", run / "pixelcnn_cond" / "model.pt"
    )  # an unconditional model where the conditional one belongs
    proc = run_cli("sample", "--sample-set", "pixelcnn_g2", "--run", str(run), "--configfile", str(TINY))
    assert proc.returncode == 1
    assert (
        f"error: sample: sample set 'pixelcnn_g2' is class-conditional but {run / 'pixelcnn_cond' / 'model.pt'} is "
        "not; train it with python -m pipeline train_pixelcnn --conditional" in proc.stderr
    )
    proc = run_cli("sample", "--sample-set", "diffusion_ddim_t2", "--run", str(run), "--configfile", str(TINY))
    assert (
        proc.returncode == 1
        and "error: sample: unknown sample set 'diffusion_ddim_t2'; "
        "expected pixelcnn[_greedy|_t<tau>][_g<s>|_ag<w>][_b<f>]"
        in proc.stderr
    )


def test_pixel_baseline_without_the_latent_models_time_is_named(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    (run / "data").mkdir(parents=True)
    shutil.copy(tiny_run / "data" / "dataset.h5", run / "data" / "dataset.h5")
    proc = run_cli("train_pixel_diffusion", "--run", str(run), "--configfile", str(TINY))
    assert proc.returncode == 1
    assert (
        "error: train_pixel_diffusion: pixel_diffusion.steps is null (match the latent model's training time) but "
        f"{run / 'diffusion' / 'metrics.json'} does not exist" in proc.stderr
    )
