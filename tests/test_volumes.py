"""3D volumes from NIfTI (issue #14, first part; docs/volumes.md): the reader and its
preprocessing (RAS+, voxel size, crop/pad, mask, percentile scaling), dataset.h5 with
(N, 1, D, H, W) volumes and their affines, NIfTI out, three-plane grids, and one clear line
for each kind of bad input. Volumes are synthetic (written with nibabel) and nibabel's own
bundled ``anatomical.nii``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT, prepare, snakemake_cmd
from PIL import Image

from pipeline.config import resolve
from pipeline.data import DataError, check_divisible, read_dataset, read_info
from pipeline.stages import get_stage
from pipeline.volumes import load_nifti, mid_slices, save_three_plane_grid, write_nifti

TINY = [ROOT / "tests" / "configs" / "tiny.yaml", ROOT / "tests" / "configs" / "tiny_own.yaml"]
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def cfg_for(folder: Path, *over: str) -> dict:
    return resolve(TINY, overrides=["data.source=nifti", f"data.path={folder}", "data.test_size=2", *over])


def blob_volume(rng, shape=(20, 24, 16), centre=None) -> np.ndarray:
    """A smooth bright ellipsoid on a dark background, plus a little noise (float32)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    c = np.zeros(3) if centre is None else np.asarray(centre)
    r = np.sqrt((((grid - c[:, None, None, None]) / 0.6) ** 2).sum(0))
    return (np.clip(1.2 - r, 0, None) * 1000 + rng.normal(0, 5, shape)).clip(0).astype(np.float32)


def write_set(folder: Path, n: int = 6, shape=(20, 24, 16), affine=None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    for i in range(n):
        img = nib.Nifti1Image(blob_volume(rng, shape, centre=rng.uniform(-0.2, 0.2, 3)), aff)
        img.to_filename(str(folder / f"sub-{i:02d}_T1w.nii.gz"))
    return folder


# --- reading and preprocessing ---------------------------------------------------------------
def test_prepare_data_writes_volumes_with_affines(tmp_path):
    folder = write_set(tmp_path / "vols")
    ds = prepare(cfg_for(folder, "data.voxel_size=4", "data.volume_shape=[12, 12, 8]"), tmp_path / "run")
    info = read_info(ds)
    assert info.spatial_dims == 3 and info.shape == (1, 12, 12, 8) and info.max_value == 65535
    assert info.value_range == (0.0, 1.0) and info.num_classes == 0
    train, test = read_dataset(ds, "train"), read_dataset(ds, "test")
    assert train.images.shape == (4, 1, 12, 12, 8) and test.images.shape == (2, 1, 12, 12, 8)
    assert train.images.dtype == np.uint16 and train.images.max() == 65535  # scaled to [0, 1]
    assert train.extra["affines"].shape == (4, 4, 4) and train.extra["intensity_range"].shape == (4, 2)
    assert np.allclose(np.abs(np.diag(train.extra["affines"][0])[:3]), 4.0)  # 4 mm voxels
    assert np.allclose(info.reference_affine, train.extra["affines"][0])
    lo, hi = train.extra["intensity_range"][0]
    assert 0 <= lo < hi <= 1300
    with h5py.File(ds) as f:
        assert len(f.attrs["sha256"]) > 64 and '"volume_shape": [12, 12, 8]' in f.attrs["preprocessing"]
    example = nib.load(str(ds.parent / "example.nii.gz"))  # the first train volume, to open in a viewer
    assert example.shape == (12, 12, 8) and np.allclose(example.affine, info.reference_affine)
    assert np.allclose(np.asarray(example.dataobj), train.images[0, 0] / 65535, atol=1e-6)
    assert Image.open(ds.parent / "mid_slices.png").size[0] > 3 * 12


def test_volumes_are_reoriented_to_ras(tmp_path):
    """A volume stored left-right flipped (LAS affine) with a bright voxel at the right edge
    comes out with that voxel at the high-D (right) end, the same as an RAS copy of it."""
    vol = np.zeros((8, 8, 8), np.float32)
    vol[1:3, 2:6, 2:6] = 1.0 + np.arange(2)[:, None, None]
    vol += 0.01
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[0, 3] = 14.0
    (tmp_path / "a").mkdir()
    nib.Nifti1Image(vol, las).to_filename(str(tmp_path / "a" / "las.nii"))
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(vol[::-1].copy(), ras).to_filename(str(tmp_path / "a" / "ras.nii"))
    vs = load_nifti(resolve(TINY, overrides=["data.source=nifti", f"data.path={tmp_path / 'a'}"])["data"])
    a, b = vs.volumes[0, 0], vs.volumes[1, 0]
    assert np.allclose(a, b) and a[5:7].mean() > a[1:3].mean()  # the bright block is on the right
    assert np.allclose(vs.affines[0], vs.affines[1]) and nib.aff2axcodes(vs.affines[0]) == ("R", "A", "S")


def test_nibabels_anatomical_with_a_mask(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "m").mkdir()
    shutil.copy(ANATOMICAL, tmp_path / "v" / "anat.nii")
    img = nib.load(str(ANATOMICAL))
    data = np.asarray(img.dataobj)
    mask = (data > np.percentile(data, 60)).astype(np.uint8)
    nib.Nifti1Image(mask, img.affine).to_filename(str(tmp_path / "m" / "anat.nii.gz"))
    cfg = resolve(
        TINY,
        overrides=[
            "data.source=nifti",
            f"data.path={tmp_path / 'v'}",
            f"data.masks={tmp_path / 'm'}",
            "data.voxel_size=4",
            "data.volume_shape=[16, 20, 12]",
        ],
    )["data"]
    vs = load_nifti(cfg)
    v = vs.volumes[0, 0]
    assert v.shape == (16, 20, 12) and 0 <= v.min() and v.max() <= 1
    assert (v == 0).mean() > 0.3 and (v > 0.5).any()  # outside the mask is 0, inside the anatomy
    assert set(vs.digests) == {"anat.nii", "masks/anat.nii.gz"}


def test_a_list_file_and_a_4d_volume_with_an_index(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    four = np.stack([blob_volume(np.random.default_rng(1)), blob_volume(np.random.default_rng(2))], axis=-1)
    nib.Nifti1Image(four, np.diag([2.0, 2, 2, 1])).to_filename(str(folder / "four.nii.gz"))
    (tmp_path / "list.txt").write_text("# volumes\nvols/sub-00_T1w.nii.gz\nvols/four.nii.gz\n\n")
    over = ["data.source=nifti", f"data.path={tmp_path / 'list.txt'}"]
    with pytest.raises(
        DataError, match=r"four.nii.gz: a 4D volume \(20, 24, 16, 2\), expected 3D \(set data.volume_index"
    ):
        load_nifti(resolve(TINY, overrides=over)["data"])
    vs = load_nifti(resolve(TINY, overrides=[*over, "data.volume_index=1"])["data"])
    assert vs.origins == ["sub-00_T1w.nii.gz", "four.nii.gz"] and vs.volumes.shape == (2, 1, 20, 24, 16)


def test_a_package_path_and_seeded_augmented_copies(tmp_path):
    """The embedded default's data: nibabel's own anatomical.nii by a package: path, with seeded
    MONAI-augmented copies pooled before the split (same seed, same volumes)."""
    over = ["data.path=package:nibabel/tests/data/anatomical.nii", "data.volume_shape=[32, 40, 24]"]
    over += ["data.volume_copies=5", "data.test_size=2"]
    ds = prepare(cfg_for(tmp_path, *over), tmp_path / "r1")
    train, test = read_dataset(ds, "train"), read_dataset(ds, "test")
    assert train.images.shape == (4, 1, 32, 40, 24) and test.images.shape == (2, 1, 32, 40, 24)
    both = np.concatenate([train.images, test.images]).astype(np.float32)
    assert min(np.abs(both[i] - both[j]).mean() for i in range(6) for j in range(i)) > 100  # all differ
    again = read_dataset(prepare(cfg_for(tmp_path, *over), tmp_path / "r2"), "train")
    assert np.array_equal(again.images, train.images)
    with h5py.File(ds) as f:
        assert '"volume_copies": 5' in f.attrs["preprocessing"] and "anatomical.nii" in f.attrs["sha256"]
    with pytest.raises(DataError, match=r"package 'no_such_pkg' is not installed"):
        prepare(cfg_for(tmp_path, "data.path=package:no_such_pkg/x.nii"), tmp_path / "r3")


# --- NIfTI out and grids ------------------------------------------------------------------------
def test_write_nifti_keeps_the_reference_affine(tmp_path):
    folder = write_set(tmp_path / "vols")
    ds = prepare(cfg_for(folder, "data.volume_shape=[20, 24, 16]"), tmp_path / "run")
    info, test = read_info(ds), read_dataset(ds, "test")
    vol = test.images[0].astype(np.float32) / 65535
    write_nifti(tmp_path / "out" / "sample_000.nii.gz", vol, info.reference_affine)
    back = nib.load(str(tmp_path / "out" / "sample_000.nii.gz"))
    assert back.shape == (20, 24, 16) and np.allclose(back.affine, info.reference_affine)
    assert np.allclose(np.asarray(back.dataobj), vol[0]) and back.header.get_sform(coded=True)[1] == 2
    assert not list((tmp_path / "out").glob(".*tmp*"))  # the temporary file was renamed
    with pytest.raises(ValueError, match=r"expects \(D, H, W\)"):
        write_nifti(tmp_path / "x.nii", np.zeros((2, 3)), np.eye(4))


def test_three_plane_grid(tmp_path):
    vols = np.zeros((2, 1, 10, 12, 8), np.float32)
    vols[:, :, 5, :, :] = 1.0  # the sagittal mid-plane is bright, the others cut through it as a line
    ax, co, sa = mid_slices(vols[0])
    assert ax.shape == (12, 10) and co.shape == (8, 10) and sa.shape == (8, 12)
    assert sa.min() == 1.0 and ax[:, 5].min() == 1.0 and ax.mean() < 0.2
    save_three_plane_grid(tmp_path / "g.png", vols, nrow=2, scale=1)
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "L" and im.size == (6 * (12 + 2) + 2, 12 + 4)


# --- bad input: one clear line, nothing written -------------------------------------------------
def _fails(cfg: dict, run: Path, match: str) -> None:
    with pytest.raises(DataError, match=match):
        prepare(cfg, run)
    assert not (run / "data" / "dataset.h5").exists()


def test_a_file_that_is_not_nifti(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    (folder / "broken.nii").write_bytes(b"not a nifti header" * 30)
    _fails(cfg_for(folder), tmp_path / "r1", r"broken.nii: not a readable NIfTI file")
    (folder / "broken.nii").unlink()
    (folder / "notes.txt").write_text("hi")
    _fails(cfg_for(folder), tmp_path / "r2", r"notes.txt: not a NIfTI file \(expected .nii or .nii.gz")


def test_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(cfg_for(tmp_path / "empty"), tmp_path / "r", r"empty: no NIfTI volumes found")


def test_mixed_shapes_without_resampling(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    write_set(tmp_path / "other", n=1, shape=(18, 24, 16))
    shutil.copy(tmp_path / "other" / "sub-00_T1w.nii.gz", folder / "sub-99_T1w.nii.gz")
    _fails(
        cfg_for(folder), tmp_path / "r", r"sub-99_T1w.nii.gz: shape \(18, 24, 16\) after preprocessing, but .* set data"
    )
    assert prepare(cfg_for(folder, "data.volume_shape=[20, 24, 16]"), tmp_path / "ok").is_file()


def test_nan_and_all_zero_volumes(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    bad = blob_volume(np.random.default_rng(0))
    bad[3, 4, 5] = np.nan
    nib.Nifti1Image(bad, np.eye(4)).to_filename(str(folder / "nan.nii.gz"))
    _fails(cfg_for(folder), tmp_path / "r1", r"nan.nii.gz: 1 NaN/Inf voxels, expected finite")
    (folder / "nan.nii.gz").unlink()
    nib.Nifti1Image(np.zeros((20, 24, 16), np.float32), np.eye(4)).to_filename(str(folder / "zero.nii.gz"))
    _fails(cfg_for(folder), tmp_path / "r2", r"zero.nii.gz: every voxel is 0.0 \(an empty volume\)")


def test_a_mask_of_another_shape_and_a_missing_mask(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    (tmp_path / "m").mkdir()
    for f in sorted(folder.iterdir())[:2]:
        nib.Nifti1Image(np.ones((20, 24, 16), np.uint8), np.eye(4)).to_filename(str(tmp_path / "m" / f.name))
    _fails(cfg_for(folder, f"data.masks={tmp_path / 'm'}"), tmp_path / "r1", r"sub-02_T1w.nii.gz: no mask sub-02_T1w")
    nib.Nifti1Image(np.ones((10, 24, 16), np.uint8), np.eye(4)).to_filename(str(tmp_path / "m" / "sub-02_T1w.nii.gz"))
    _fails(
        cfg_for(folder, f"data.masks={tmp_path / 'm'}"),
        tmp_path / "r2",
        r"sub-02_T1w.nii.gz: its mask is \(10, 24, 16\), expected the volume's shape \(20, 24, 16\)",
    )


def test_a_missing_affine(tmp_path):
    folder = write_set(tmp_path / "vols", n=3)
    img = nib.Nifti1Image(blob_volume(np.random.default_rng(0)), None)
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    img.to_filename(str(folder / "noaff.nii.gz"))
    _fails(cfg_for(folder), tmp_path / "r", r"noaff.nii.gz: no affine \(sform_code and qform_code are 0\)")


def test_a_shape_not_divisible_by_the_downsampling_factor(tmp_path):
    with pytest.raises(
        DataError, match=r"volumes are 20x24x18, not divisible by vqvae.downsample 4; set data.volume_shape"
    ):
        check_divisible((20, 24, 18), {"vqvae": {"downsample": 4}}, "dataset.h5")
    check_divisible((20, 24, 16), {"vqvae": {"downsample": 4}}, "dataset.h5")


def test_the_3d_chain_vqvae_latents_priors_samples(tmp_path):
    """The same VQ-VAE with spatial_dims 3, sized from dataset.h5: codes on a (D/f, H/f, W/f)
    grid, SSIM/PSNR of the test reconstructions, NIfTI reconstructions with the test affines;
    latents.h5 on that grid, with augmented copies; the PixelCNN and the latent diffusion U-Net in 3D; samples as NIfTI
    and three-plane grids; the 3D encoder and the evaluate stage's 3D checks."""
    folder = write_set(tmp_path / "vols", n=10)
    over = ["data.voxel_size=2.5", "data.volume_shape=[16, 16, 12]", "vqvae.steps=30", "vqvae.batch_size=4"]
    over += ["latents.augment_copies=1", "data.test_size=4", "diffusion.augmented=true"]
    cfg = cfg_for(folder, *over)
    run = tmp_path / "run"
    prepare(cfg, run)
    m = get_stage("train_vqvae")(cfg, str(run), threads=2)
    assert -1 <= m["test_ssim"] <= 1 and np.isfinite(m["test_psnr_db"]) and m["test_codes_in_use"] >= 1
    import torch

    from pipeline.checkpoint import load_model

    model = load_model(run / "vqvae" / "model.pt", device="cpu")[0]
    assert model.spatial_dims == 3
    assert model.index_quantize(torch.rand(1, 1, 16, 16, 12)).shape == (1, 4, 4, 3)
    rec = nib.load(str(run / "vqvae" / "reconstructions" / "test_000_reconstruction.nii.gz"))
    assert rec.shape == (16, 16, 12)
    assert np.allclose(rec.affine, read_dataset(run / "data" / "dataset.h5", "test").extra["affines"][0])
    assert Image.open(run / "vqvae" / "reconstructions.png").size[0] > 6 * 16
    get_stage("extract_latents")(cfg, str(run), threads=2)  # latents.h5 on the 3D code grid
    from pipeline.latents import read_split

    train, info = read_split(run / "latents" / "latents.h5", "train")
    assert info.grid == (4, 4, 3) and train.codes.shape == (6, 4, 4, 3) and train.latents.shape[1:] == (16, 4, 4, 3)
    # one augmented copy of every train volume (the data.volume_* transform), for the priors
    aug, _ = read_split(run / "latents" / "latents.h5", "train_aug")
    assert aug.codes.shape == (6, 4, 4, 3) and not np.array_equal(aug.encodings, train.encodings)
    # both priors on the 3D codes: the gated PixelCNN with its depth stack, and latent diffusion with
    # the same U-Net in 3D; samples decoded to volumes
    get_stage("train_pixelcnn")(cfg, str(run), threads=2)
    get_stage("train_diffusion")(cfg, str(run), threads=2)
    for name in ("pixelcnn", "pixelcnn_ag2", "diffusion_ddim", "diffusion_dpmsde_ag2"):
        get_stage("sample")(cfg, str(run), sample_set=name, threads=2)
        arr = np.load(run / "samples" / f"{name}.npy")
        assert arr.shape == (12, 1, 16, 16, 12) and 0 <= arr.min() and arr.max() <= 1
        nii = nib.load(str(run / "samples" / name / "sample_000.nii.gz"))
        assert np.allclose(nii.affine, read_info(run / "data" / "dataset.h5").reference_affine)
        assert np.allclose(np.asarray(nii.dataobj), arr[0, 0])
        assert Image.open(run / "samples" / f"{name}.png").mode == "L"
    # the evaluate stage on volumes: the label-free judge in a 3D encoder's features, the reference
    # rows, and the 3D checks (MS-SSIM between samples and to the nearest train volume, intensity W1)
    get_stage("train_simclr")(cfg, str(run), threads=2)
    cfg["sample"]["sets"] = ["pixelcnn", "diffusion_ddim"]
    get_stage("evaluate")(cfg, str(run), threads=2)
    report = json.loads((run / "report" / "metrics.json").read_text())
    assert report["evaluation"]["judges"] == ["features"]
    rows = [report["floor"], *report["references"].values(), *report["sets"].values()]
    for row in rows:
        assert 0 <= row["ms_ssim_pairs"] <= 1 and 0 <= row["ms_ssim_nearest_train"] <= 1
        assert 0 <= row["intensity_w1"] <= 1 and row["features_fd_ratio"] > 0
    assert report["floor"]["intensity_w1"] < report["references"]["noise"]["intensity_w1"]
    assert "MS-SSIM between samples" in (run / "report" / "summary.md").read_text()


def test_reconstruction_quality_tells_a_copy_from_noise():
    from pipeline.volumes import reconstruction_quality

    rng = np.random.default_rng(0)
    vols = np.stack([blob_volume(rng, (16, 16, 12)) / 1300 for _ in range(2)])[:, None].clip(0, 1)
    same = reconstruction_quality(vols, vols)
    noisy = reconstruction_quality(vols, (vols + rng.normal(0, 0.05, vols.shape)).clip(0, 1))
    noise = reconstruction_quality(vols, rng.uniform(0, 1, vols.shape))
    assert same["test_ssim"] == pytest.approx(1.0) and same["test_psnr_db"] == np.inf
    assert (
        1 > noisy["test_ssim"] > noise["test_ssim"] and 20 < noisy["test_psnr_db"] < 30 and noise["test_psnr_db"] < 10
    )


def test_ms_ssim_and_the_intensity_distance():
    import torch

    from pipeline.volumes import histogram_distance, intensity_histogram, ms_ssim

    rng = np.random.default_rng(0)
    vols = torch.from_numpy(np.stack([blob_volume(rng, (24, 24, 24)) / 1300 for _ in range(3)])[:, None]).clamp(0, 1)
    noise = torch.rand_like(vols)
    same, other, vs_noise = ms_ssim(vols, vols), ms_ssim(vols, vols.roll(1, 0)), ms_ssim(vols, noise)
    assert np.allclose(same, 1) and (vs_noise < 0.2).all() and (other > vs_noise).all()
    h = intensity_histogram(vols)
    assert histogram_distance(h, h) == 0 and histogram_distance(h, intensity_histogram(noise)) > 0.2
    assert histogram_distance(h, intensity_histogram(vols * 0.5)) == pytest.approx(float(vols.mean()) * 0.5, abs=0.02)


def test_a_volume_shape_not_divisible_stops_train_vqvae(tmp_path):
    folder = write_set(tmp_path / "vols", n=4)
    cfg = cfg_for(folder, "data.volume_shape=[16, 16, 10]")
    prepare(cfg, tmp_path / "run")
    with pytest.raises(DataError, match=r"volumes are 16x16x10, not divisible by vqvae.downsample 4"):
        get_stage("train_vqvae")(cfg, str(tmp_path / "run"))


@pytest.mark.slow
def test_snakemake_runs_the_shipped_3d_config_on_tiny_models(tmp_path):
    """The real workflow on pipeline/configs/anatomy3d.yaml (nibabel's anatomy and its augmented
    copies) with tiny models: the 3D chain end to end (its flow-matching prior on the latents and
    their augmented copies, drawn by the flow Euler scheduler), NIfTI samples and the 3D report
    columns."""
    cmd = snakemake_cmd(
        tmp_path,
        "--configfile",
        ROOT / "pipeline" / "configs" / "anatomy3d.yaml",
        *TINY,
        "--cores",
        "2",
        "--config",
        "data={volume_copies: 11, test_size: 4}",
        "latents={augment_copies: 1}",
        "sample={sets: [pixelcnn, diffusion_euler], num_samples: 10}",
        "evaluate={num_images: 10}",
        "vqvae={steps: 20, batch_size: 4}",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "results" / "tiny"  # tests/configs/tiny.yaml names the run
    assert read_info(run / "data" / "dataset.h5").shape == (1, 32, 40, 24)
    assert nib.load(str(run / "samples" / "pixelcnn" / "sample_000.nii.gz")).shape == (32, 40, 24)
    summary = (run / "report" / "summary.md").read_text()
    assert "MS-SSIM between samples" in summary and "label-free FD" in summary
    assert json.loads((run / "vqvae" / "metrics.json").read_text())["test_ssim"] <= 1


def test_the_latent_augmentation_of_volumes_warps_without_touching_intensities():
    """volume_transform(intensity=False) (latents.augment_intensity: false) moves voxels only: a
    uniform volume stays uniform where no zero padding enters; the full transform
    (data.volume_copies, the latent copies by default) changes its values (gamma, bias field,
    noise)."""
    from pipeline.config import resolve
    from pipeline.volumes import augment_one, volume_transform

    cfg = resolve([ROOT / "pipeline" / "configs" / "anatomy3d.yaml"])["data"]
    vol = np.full((1, 24, 24, 24), 0.5, np.float32)
    inner = (slice(None), slice(8, 16), slice(8, 16), slice(8, 16))
    geometric = augment_one(volume_transform(cfg, 0, intensity=False), vol)
    full = augment_one(volume_transform(cfg, 0), vol)
    assert np.allclose(geometric[inner], 0.5, atol=1e-4)
    assert np.abs(full[inner] - 0.5).max() > 0.01
