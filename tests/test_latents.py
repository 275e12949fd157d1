import shutil

import h5py
import numpy as np
import pytest
import torch

from pipeline.io import sha256_file
from pipeline.latents import LatentsError, read_info, read_split
from pipeline.train import load_model


def test_latents_schema_and_values(tiny_run, tiny_cfg):
    p = tiny_run / "latents" / "latents.h5"
    vq_sha = sha256_file(tiny_run / "vqvae" / "model.pt")
    info = read_info(p, expect_vqvae_sha256=vq_sha)
    d = tiny_cfg["vqvae"]["embedding_dim"]
    assert (info.num_embeddings, info.embedding_dim) == (tiny_cfg["vqvae"]["num_embeddings"], d)
    assert info.latent_mean.shape == (d,) and (info.latent_std > 0).all()
    with h5py.File(p) as f:
        assert f["train/codes"].dtype == np.int16 and f["train/codes"].shape == (300, 7, 7)
        assert f["train/latents"].dtype == np.float32 and f["train/latents"].shape == (300, d, 7, 7)
        assert f["test/labels"].shape == (100,)
        assert f["train/latents"].chunks is not None and f["train/latents"].compression == "gzip"
    split, _ = read_split(p, "train")
    vqvae, _ = load_model(tiny_run / "vqvae" / "model.pt")
    # latents are exactly the codebook vectors of the codes, and the codes are the encoder's
    lookup = vqvae.quantizer.lookup(torch.from_numpy(split.codes.astype(np.int64))).numpy()
    assert np.array_equal(lookup, split.latents)
    from pipeline.data import read_dataset

    images = torch.from_numpy(read_dataset(tiny_run / "data" / "dataset.h5", "train").images[:16]).float() / 255
    with torch.no_grad():
        assert np.array_equal(vqvae.index_quantize(images).numpy(), split.codes[:16])
    # channel statistics match the stored attributes
    assert np.allclose(split.latents.mean(axis=(0, 2, 3)), info.latent_mean, atol=1e-4)


def test_reader_rejects_other_checkpoint_and_schema(tiny_run, tmp_path):
    src = tiny_run / "latents" / "latents.h5"
    with pytest.raises(LatentsError, match=r"made from a VQ-VAE checkpoint with SHA-256 .* but the configured vqvae/model.pt has"):
        read_info(src, expect_vqvae_sha256="0" * 64)
    p = tmp_path / "latents.h5"
    shutil.copy(src, p)
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(LatentsError, match=r"schema_version 0, expected 1"):
        read_info(p)
    shutil.copy(src, p)
    with h5py.File(p, "a") as f:
        data = f["test/codes"][...]
        del f["test/codes"]
        f["test/codes"] = data.astype(np.int64)
    with pytest.raises(LatentsError, match=r"'/test/codes' is int64 .* expected int16 \(N, 7, 7\)"):
        read_info(p)
    shutil.copy(src, p)
    with h5py.File(p, "a") as f:
        del f["train/latents"]
    with pytest.raises(LatentsError, match=r"dataset '/train/latents' is missing"):
        read_split(p, "train")
    with pytest.raises(LatentsError, match="does not exist"):
        read_info(tmp_path / "nope.h5")
