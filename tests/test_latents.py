import shutil

import h5py
import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_model
from pipeline.io import sha256_file
from pipeline.latents import LatentsError, read_info, read_split


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
    # encodings are the encoder's z_e, and snapping them gives the codes
    with torch.no_grad():
        z_e = vqvae.encode(images)
    assert np.allclose(z_e.numpy(), split.encodings[:16], atol=1e-5)
    assert np.array_equal(vqvae.quantizer.snap(torch.from_numpy(split.encodings[:16])).numpy(), split.codes[:16])
    assert np.allclose(split.encodings.mean(axis=(0, 2, 3)), info.encoding_mean, atol=1e-4)
    assert np.allclose(split.encodings.std(axis=(0, 2, 3)), info.encoding_std, rtol=1e-3)


def test_augmented_copies_keep_labels_and_shapes(tiny_run, tiny_cfg):
    """train_aug holds `augment_copies` copies of every train image: copy c of image i is row
    c * N + i with image i's label, codes in [0, K), and the copies differ from the plain codes."""
    p = tiny_run / "latents" / "latents.h5"
    copies = tiny_cfg["latents"]["augment_copies"]
    assert copies >= 1
    info = read_info(p)
    train, _ = read_split(p, "train")
    aug, _ = read_split(p, "train_aug")
    n = len(train.labels)
    assert info.num_augmented == copies * n and info.augment["copies"] == copies
    assert (
        aug.codes.shape == (copies * n, 7, 7)
        and aug.encodings.shape == train.encodings.shape[:0] + (copies * n,) + train.encodings.shape[1:]
    )
    assert np.array_equal(aug.labels, np.tile(train.labels, copies))
    assert aug.codes.min() >= 0 and aug.codes.max() < info.num_embeddings
    # the copies are other images: their encoder outputs differ from the plain ones (codes may not,
    # with the tiny test VQ-VAE's few live codes)
    assert np.abs(aug.encodings[:n] - train.encodings).mean(axis=(1, 2, 3)).min() > 0


def test_random_affine_keeps_shape_and_is_identity_at_zero():
    from pipeline.augment import random_affine

    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(random_affine(x, 0.0, 0.0), x, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_affine(x, 10, 2, generator=g1, max_scale=0.1), random_affine(x, 10, 2, generator=g2, max_scale=0.1)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    # a pure shift moves a blob's centre of mass by at most max_shift pixels per axis, and keeps its mass
    blob = torch.zeros(64, 1, 28, 28)
    blob[:, :, 11:17, 11:17] = 1.0
    moved = random_affine(blob, 0.0, 2.0, generator=torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def com(im):
        return (
            torch.stack([(im[:, 0] * xs).sum((1, 2)), (im[:, 0] * ys).sum((1, 2))], 1) / im[:, 0].sum((1, 2))[:, None]
        )

    shift = com(moved) - com(blob)
    assert shift.abs().max() <= 2.0 + 1e-4 and shift.abs().max() > 1.0
    assert torch.allclose(moved.sum((1, 2, 3)), blob.sum((1, 2, 3)), rtol=1e-4)


def test_reading_train_aug_from_a_file_without_it_names_the_key(tiny_run, tmp_path):
    src = tiny_run / "latents" / "latents.h5"
    p = tmp_path / "latents.h5"
    shutil.copy(src, p)
    with h5py.File(p, "a") as f:
        del f["train_aug"]
    with pytest.raises(LatentsError, match=r"has no 'train_aug' split .*latents.augment_copies"):
        read_split(p, "train_aug")


def test_reader_rejects_other_checkpoint_and_schema(tiny_run, tmp_path):
    src = tiny_run / "latents" / "latents.h5"
    with pytest.raises(
        LatentsError, match=r"made from a VQ-VAE checkpoint with SHA-256 .* but the configured vqvae/model.pt has"
    ):
        read_info(src, expect_vqvae_sha256="0" * 64)
    p = tmp_path / "latents.h5"
    shutil.copy(src, p)
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(LatentsError, match=r"schema_version 0, expected 3"):
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
