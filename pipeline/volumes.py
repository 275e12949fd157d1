"""3D volumes from NIfTI files: the reader of ``data.source: nifti``, the NIfTI writer of samples
and reconstructions, and three-plane PNG grids (issue #14).

Every volume goes through the same steps, in this order (read with nibabel):

1. **checks**: a NIfTI-1/2 file; 3D, or 4D with ``data.volume_index`` naming the volume; an
   affine (``sform_code`` or ``qform_code`` > 0; nibabel would otherwise invent one from the
   voxel sizes); finite voxels; not constant (an all-zero volume has no anatomy to scale);
2. **orientation**: reoriented to the closest canonical orientation, RAS+
   (``nibabel.as_closest_canonical``): array axes (D, H, W) run left->right, posterior->anterior,
   inferior->superior;
3. **voxel size**: ``data.voxel_size`` (mm, one number or [x, y, z]) resamples with
   ``nibabel.processing.resample_to_output`` (scipy spline of order ``data.volume_interpolation``:
   nearest 0, linear 1, cubic 3); ``null`` keeps the file's grid;
4. **shape**: ``data.volume_shape`` [D, H, W] cuts or zero-pads each axis about its centre;
   ``null`` keeps the shape, and then every volume must have the same one;
5. **mask** (optional, ``data.masks``: a folder with a mask of the same file name per volume,
   the volume's own grid): resampled by nearest neighbour with the volume; voxels outside it
   are set to 0;
6. **intensity**: clipped at the ``data.clip_percentiles`` [lo, hi] (percent) of the voxels
   inside the mask (or of all non-zero voxels without one) and scaled to [0, 1].

The affine of each preprocessed volume (voxel indices of the stored array -> mm, RAS) is kept,
so samples written with :func:`write_nifti` overlay the inputs in any viewer.

Errors are :class:`pipeline.io.DataError`: one line naming the file and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.io import DataError, atomic_path, sha256_file

__all__ = [
    "NIFTI_SUFFIXES",
    "VolumeSet",
    "nifti_files",
    "read_volume",
    "preprocess_volume",
    "load_nifti",
    "iter_nifti",
    "write_nifti",
    "mid_slices",
    "save_three_plane_grid",
    "reconstruction_quality",
    "ms_ssim",
    "intensity_counts",
    "intensity_histogram",
    "histogram_distance",
    "volume_scores",
    "resolve_path",
    "augment_volumes",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: data.volume_interpolation -> scipy spline order
ORDERS = {"nearest": 0, "linear": 1, "cubic": 3}


def _is_nifti_name(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _strip_suffix(name: str) -> str:
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


@dataclass
class VolumeSet:
    """Preprocessed volumes of a NIfTI source.

    Attributes:
        volumes: float32 (N, 1, D, H, W) in [0, 1].
        affines: float64 (N, 4, 4): voxel index (i, j, k, 1) of the stored array -> mm (RAS+).
        intensity_range: float32 (N, 2): the clip values (input units) that 0 and 1 stand for.
        origins: N file names.
        digests: file -> SHA-256 of every file read (volumes and masks).
        preprocessing: the settings applied (for ``dataset.h5``'s ``preprocessing`` attribute).
    """

    volumes: np.ndarray
    affines: np.ndarray
    intensity_range: np.ndarray
    origins: list
    digests: dict
    preprocessing: dict


def resolve_path(path: str | os.PathLike) -> Path:
    """``data.path`` as a file system path; ``package:<module>/<file>`` names a file inside an
    installed package (e.g. ``package:nibabel/tests/data/anatomical.nii``, the T1 volume that
    nibabel's wheel ships), found without importing more than the package itself.

    Raises:
        DataError: the package is not installed."""
    text = str(path)
    if not text.startswith("package:"):
        return Path(text).expanduser()
    import importlib.util

    module, _, rest = text.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.path {text!r}: package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def nifti_files(path: str | os.PathLike) -> list[Path]:
    """The NIfTI files of ``data.path``: a folder (its ``*.nii`` / ``*.nii.gz``, sorted; other
    files are an error, hidden ones are skipped), one ``.nii``/``.nii.gz`` file, or a list file
    (one path per line, relative to the list's folder; ``#`` comments and blank lines skipped).
    ``package:<module>/<path>`` is resolved by :func:`resolve_path`.

    Raises:
        DataError: missing path, an empty folder or list, a file that is not ``.nii``/``.nii.gz``.
    """
    p = resolve_path(path)
    if p.is_file() and _is_nifti_name(p):
        return [p]
    if not p.exists():
        raise DataError(f"{p}: data.path does not exist (a folder of .nii/.nii.gz files or a list file)")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        where = str(p)
    else:
        lines = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
        files = [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln]
        where = f"{p} (list file)"
        for f in files:
            if not f.is_file():
                raise DataError(f"{p}: listed volume {f} does not exist")
    if not files:
        raise DataError(f"{where}: no NIfTI volumes found (expected .nii or .nii.gz files)")
    for f in files:
        if not _is_nifti_name(f):
            raise DataError(f"{f}: not a NIfTI file (expected .nii or .nii.gz in {where})")
    return files


def read_volume(path: str | os.PathLike, volume_index: int | None = None):
    """Load one NIfTI volume and check it (step 1 above).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        volume_index: for a 4D file, the index along the 4th axis; None refuses 4D files.

    Returns:
        a 3D ``nibabel.Nifti1Image`` (or Nifti2Image), float32 data, the file's affine.

    Raises:
        DataError: not NIfTI (or unreadable), not 3D, an index out of range, no affine,
            NaN/Inf voxels, a constant volume.
    """
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several kinds for bad files
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{p}: a {type(img).__name__}, expected a NIfTI-1 or NIfTI-2 image")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        volume_index = 0 if volume_index is None else volume_index
    if len(shape) == 4:
        if volume_index is None:
            raise DataError(f"{p}: a 4D volume {shape}, expected 3D (set data.volume_index to pick one of {shape[3]})")
        if not 0 <= int(volume_index) < shape[3]:
            raise DataError(f"{p}: data.volume_index {volume_index} is outside the {shape[3]} volumes of {shape}")
        img = img.slicer[..., int(volume_index)]
    elif len(shape) != 3:
        raise DataError(f"{p}: a {len(shape)}D image {shape}, expected a 3D volume")
    if img.header.get_sform(coded=True)[1] in (0, None) and img.header.get_qform(coded=True)[1] in (0, None):
        raise DataError(f"{p}: no affine (sform_code and qform_code are 0), so its orientation is unknown")
    data = np.asarray(img.dataobj, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{p}: {int(bad.sum())} NaN/Inf voxels, expected finite intensities")
    if float(data.max()) == float(data.min()):
        raise DataError(f"{p}: every voxel is {float(data.min())} (an empty volume), expected an image")
    return nib.Nifti1Image(data, img.affine, img.header)


def _crop_or_pad(data: np.ndarray, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Cut or zero-pad each axis about its centre to ``shape``; the affine follows."""
    out = np.zeros(tuple(shape), data.dtype)
    src, dst, shift = [], [], np.zeros(3)
    for ax, (n, m) in enumerate(zip(data.shape, shape, strict=True)):
        start = (n - m) // 2  # > 0: crop, < 0: pad
        shift[ax] = start
        s0, d0 = max(start, 0), max(-start, 0)
        length = min(n - s0, m - d0)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[tuple(dst)] = data[tuple(src)]
    t = np.eye(4)
    t[:3, 3] = shift
    return out, affine @ t


def preprocess_volume(img, cfg: Mapping, mask=None, where: str = "") -> tuple[np.ndarray, np.ndarray, tuple]:
    """Steps 2-6 above on one checked volume.

    Args:
        img: 3D nibabel image (from :func:`read_volume`).
        cfg: the ``data`` section (``voxel_size``, ``volume_shape``, ``volume_interpolation``,
            ``clip_percentiles``).
        mask: a 3D nibabel image on the volume's grid, or None.
        where: the file name for errors.

    Returns:
        (float32 (D, H, W) in [0, 1], float64 (4, 4) affine, (lo, hi) clip values).

    Raises:
        DataError: a mask of another shape, an empty mask, a bad interpolation name, a
            percentile range outside 0..100, nothing left after clipping.
    """
    import nibabel as nib
    from nibabel.processing import resample_to_output

    interp = cfg.get("volume_interpolation") or "linear"
    if interp not in ORDERS:
        raise DataError(f"data.volume_interpolation {interp!r}: expected one of {', '.join(ORDERS)}")
    if mask is not None:
        if mask.shape[:3] != img.shape:
            raise DataError(f"{where}: its mask is {mask.shape}, expected the volume's shape {img.shape}")
        m = (np.asarray(mask.dataobj)[..., 0] if mask.ndim == 4 else np.asarray(mask.dataobj)) > 0
        if not m.any():
            raise DataError(f"{where}: its mask is empty (no voxel > 0)")
        mask = nib.Nifti1Image(m.astype(np.uint8), img.affine)
    img = nib.as_closest_canonical(img)
    mask = nib.as_closest_canonical(mask) if mask is not None else None
    vs = cfg.get("voxel_size")
    if vs is not None:
        vs = [float(vs)] * 3 if isinstance(vs, int | float) else [float(v) for v in vs]
        img = resample_to_output(img, vs, order=ORDERS[interp])
        if mask is not None:
            mask = nib.processing.resample_from_to(mask, img, order=0)
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = img.affine.copy()
    m = np.asarray(mask.dataobj) > 0 if mask is not None else None
    shape = cfg.get("volume_shape")
    if shape is not None:
        shape = [int(shape)] * 3 if isinstance(shape, int) else [int(v) for v in shape]
        data, new_affine = _crop_or_pad(data, affine, shape)
        if m is not None:
            m, _ = _crop_or_pad(m, affine, shape)
        affine = new_affine
    if m is not None:
        data = np.where(m, data, 0.0).astype(np.float32)
    lo_p, hi_p = (float(v) for v in cfg.get("clip_percentiles") or (0.0, 100.0))
    if not 0 <= lo_p < hi_p <= 100:
        raise DataError(f"data.clip_percentiles [{lo_p}, {hi_p}]: expected 0 <= lo < hi <= 100")
    inside = data[m] if m is not None else data[data != 0]
    if inside.size == 0:
        raise DataError(f"{where}: no voxel left inside the mask or the volume_shape crop")
    lo, hi = np.percentile(inside, [lo_p, hi_p])
    if hi <= lo:
        raise DataError(f"{where}: the {lo_p}th and {hi_p}th percentiles are both {lo}; nothing to scale")
    out = np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if m is not None:
        out[~m] = 0.0
    return out, affine, (float(lo), float(hi))


def iter_nifti(cfg: Mapping):
    """Read and preprocess the volumes of ``data.path`` one at a time (``data.source: nifti``).

    Returns:
        (files, generator, digests): the NIfTI files found; a generator of (file name, volume
        float32 (D, H, W) in [0, 1], affine float64 (4, 4), intensity range (lo, hi)) per file,
        in that order; and the dict file -> SHA-256 (volumes and masks) that the generator
        fills as it reads.

    Raises:
        DataError: see :func:`nifti_files`, :func:`read_volume`, :func:`preprocess_volume`;
            volumes of different shapes after preprocessing (no ``data.voxel_size`` /
            ``data.volume_shape`` to make them one), a mask folder without a volume's mask (from
            the generator, at the volume concerned).
    """
    if not cfg.get("path"):
        raise DataError("data.path must name a folder (or list file) of NIfTI volumes (data.source: nifti)")
    files = nifti_files(cfg["path"])
    masks = Path(cfg["masks"]).expanduser() if cfg.get("masks") else None
    digests: dict = {}

    def volumes():
        import nibabel as nib

        shape0 = None
        for f in files:
            img = read_volume(f, cfg.get("volume_index"))
            digests[f.name] = sha256_file(f)
            mask = None
            if masks is not None:
                stem = _strip_suffix(f.name)
                mf = next((masks / (stem + s) for s in NIFTI_SUFFIXES if (masks / (stem + s)).is_file()), None)
                if mf is None:
                    raise DataError(f"{f}: no mask {_strip_suffix(f.name)}.nii(.gz) in data.masks {masks}")
                try:
                    mask = nib.load(str(mf))
                except Exception as exc:  # noqa: BLE001
                    raise DataError(f"{mf}: not a readable NIfTI mask ({type(exc).__name__})") from None
                digests[f"masks/{mf.name}"] = sha256_file(mf)
            v, a, r = preprocess_volume(img, cfg, mask, where=str(f))
            if shape0 is not None and v.shape != shape0:
                raise DataError(
                    f"{f}: shape {v.shape} after preprocessing, but {files[0].name} has {shape0}; set "
                    "data.voxel_size and/or data.volume_shape [D, H, W] to bring every volume to one grid"
                )
            shape0 = v.shape
            yield f.name, v, a, r

    return files, volumes(), digests


def preprocessing_record(cfg: Mapping, shape) -> dict:
    """The preprocessing settings of a NIfTI source (``dataset.h5``'s ``preprocessing``)."""
    return {
        "orientation": "RAS (nibabel.as_closest_canonical)",
        "voxel_size_mm": cfg.get("voxel_size"),
        "volume_shape": [int(v) for v in shape],
        "volume_interpolation": cfg.get("volume_interpolation") or "linear",
        "clip_percentiles": list(cfg.get("clip_percentiles") or (0.0, 100.0)),
        "masks": str(Path(cfg["masks"]).expanduser()) if cfg.get("masks") else None,
        "volume_index": cfg.get("volume_index"),
    }


def load_nifti(cfg: Mapping) -> VolumeSet:
    """Read and preprocess every volume of ``data.path`` (``data.source: nifti``) into memory
    (``prepare_data`` uses :func:`iter_nifti`, one volume at a time).

    Raises:
        DataError: as :func:`iter_nifti`.
    """
    files, gen, digests = iter_nifti(cfg)
    names, vols, affs, ranges = [], [], [], []
    for name, v, a, r in gen:
        names.append(name)
        vols.append(v)
        affs.append(a)
        ranges.append(r)
    return VolumeSet(
        volumes=np.stack(vols)[:, None],
        affines=np.stack(affs).astype(np.float64),
        intensity_range=np.asarray(ranges, np.float32),
        origins=names,
        digests=digests,
        preprocessing=preprocessing_record(cfg, vols[0].shape),
    )


def write_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write one volume as a float32 NIfTI-1 file, atomically (``.nii`` or ``.nii.gz`` by name).

    Args:
        volume: float (D, H, W) or (1, D, H, W), e.g. a sample in [0, 1].
        affine: float (4, 4), voxel index -> mm (the dataset's reference affine).

    Raises:
        ValueError: another rank, an affine that is not 4 x 4.
    """
    import nibabel as nib

    v = np.asarray(volume, np.float32)
    v = v[0] if v.ndim == 4 and v.shape[0] == 1 else v
    a = np.asarray(affine, np.float64)
    if v.ndim != 3 or a.shape != (4, 4):
        raise ValueError(f"write_nifti expects (D, H, W) and a 4x4 affine, got {v.shape} and {a.shape}")
    img = nib.Nifti1Image(v, a)
    img.header.set_xyzt_units("mm")
    img.set_sform(a, code=2)  # aligned to the inputs' space
    img.set_qform(a, code=2)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        _save_as(img, tmp, suffix)


def _save_as(img, tmp: Path, suffix: str) -> None:
    """nibabel picks the format from the file name: write under a name that ends in ``suffix``
    and move it onto the temporary path that :func:`pipeline.io.atomic_path` renames."""
    named = tmp.with_name(tmp.name + suffix)
    img.to_filename(str(named))
    os.replace(named, tmp)


def mid_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three mid-slices of a RAS+ volume (D, H, W) (or (1, D, H, W)), for display:
    axial (H x D at the middle W, anterior up), coronal (W x D at the middle H, superior up),
    sagittal (W x H at the middle D, superior up), each a float 2D array."""
    v = np.asarray(volume)
    v = v[0] if v.ndim == 4 else v
    d, h, w = v.shape
    axial = np.rot90(v[:, :, w // 2])  # rows: anterior -> posterior after rot90, columns: left -> right
    coronal = np.rot90(v[:, h // 2, :])
    sagittal = np.rot90(v[d // 2, :, :])
    return axial, coronal, sagittal


def save_three_plane_grid(path: str | os.PathLike, volumes: np.ndarray, nrow: int = 4, scale: int = 2) -> None:
    """A PNG grid with one row of three mid-slices (axial, coronal, sagittal) per volume,
    ``nrow`` volumes per grid row, written atomically.

    Args:
        volumes: float (N, 1, D, H, W) in [0, 1] (clipped).

    Raises:
        ValueError: another rank.
    """
    from pipeline.io import save_grid_png

    v = np.asarray(volumes, np.float32)
    if v.ndim != 5 or v.shape[1] != 1:
        raise ValueError(f"save_three_plane_grid expects (N, 1, D, H, W), got {v.shape}")
    side = max(v.shape[2:])
    tiles = []
    for vol in v:
        for s in mid_slices(vol):
            t = np.zeros((side, side), np.float32)
            y, x = (side - s.shape[0]) // 2, (side - s.shape[1]) // 2
            t[y : y + s.shape[0], x : x + s.shape[1]] = s
            tiles.append(t)
    save_grid_png(path, np.stack(tiles)[:, None], nrow=3 * max(1, min(nrow, len(v))), scale=scale)


def reconstruction_quality(originals: np.ndarray, reconstructions: np.ndarray) -> dict:
    """Mean SSIM (Wang et al. 2004, eq. 13, on scikit-image's uniform 7-voxel window, in 3D) and
    PSNR (dB) of volume pairs, by ``skimage.metrics``, data range 1.

    Args:
        originals, reconstructions: float (N, 1, D, H, W) in [0, 1], every side >= 7 for SSIM.

    Returns:
        {"test_ssim": float in [-1, 1], "test_psnr_db": float (inf for identical volumes)}.

    Raises:
        ValueError: shapes that differ.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = np.asarray(originals, np.float64), np.clip(np.asarray(reconstructions, np.float64), 0, 1)
    if a.shape != b.shape:
        raise ValueError(f"reconstruction_quality: shapes {a.shape} and {b.shape} differ")
    win = min(7, *(s if s % 2 else s - 1 for s in a.shape[2:]))
    ssim = [structural_similarity(x[0], y[0], data_range=1.0, win_size=win) for x, y in zip(a, b, strict=True)]
    psnr = [peak_signal_noise_ratio(x[0], y[0], data_range=1.0) for x, y in zip(a, b, strict=True)]
    return {"test_ssim": float(np.mean(ssim)), "test_psnr_db": float(np.mean(psnr))}


#: Wang et al. 2003 (MS-SSIM, sec. 3), the weights of scales 1..5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 7) -> np.ndarray:
    """Multi-scale SSIM (Wang et al. 2003, eq. 7) of volume pairs, by MONAI's
    ``MultiScaleSSIMMetric`` (Gaussian window, sigma 1.5), data range 1. Uses as many dyadic scales
    as the volumes allow (the coarsest side must exceed (kernel_size - 1) * 2**(scales - 1), up to
    the paper's 5), with the paper's weights of those scales renormalised to sum to 1.

    Args:
        a, b: float (N, 1, D, H, W) in [0, 1], every side > kernel_size - 1.

    Returns:
        float64 (N,) in [0, 1] (MONAI clips negative contrast terms): 1 = identical.
    """
    from monai.metrics import MultiScaleSSIMMetric

    side = min(a.shape[2:])
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side > (kernel_size - 1) * 2**scales:
        scales += 1
    w = np.asarray(MS_SSIM_WEIGHTS[:scales])
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=1.0, kernel_size=kernel_size, weights=tuple((w / w.sum()).tolist())
    )
    with torch.no_grad():
        return metric(a.float().clamp(0, 1), b.float().clamp(0, 1)).double().flatten().cpu().numpy()


def intensity_counts(volumes: torch.Tensor, bins: int = 64) -> np.ndarray:
    """Voxel counts float64 (bins,) of float volumes in [0, 1] in ``bins`` equal bins (they add
    up over batches: the streamed form of :func:`intensity_histogram`)."""
    return torch.histc(volumes.float().clamp(0, 1), bins=bins, min=0.0, max=1.0).double().numpy()


def intensity_histogram(volumes: torch.Tensor, bins: int = 64) -> np.ndarray:
    """Normalised histogram float64 (bins,) of all voxel values of float volumes in [0, 1]."""
    h = torch.histc(volumes.float().clamp(0, 1), bins=bins, min=0.0, max=1.0).double()
    return (h / h.sum().clamp_min(1)).numpy()


def histogram_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Wasserstein-1 (earth mover's) distance between two histograms on [0, 1] with equal bins:
    sum |CDF_p - CDF_q| * bin width, in intensity units (0 = the same distribution, 1 at most)."""
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() / len(p))


def volume_scores(x: torch.Tensor, train: torch.Tensor, train_hist: np.ndarray, nearest: np.ndarray) -> dict:
    """The 3D checks of one set for the evaluate stage.

    Args:
        x: float (n, 1, D, H, W) in [0, 1]; train: float (N, 1, D, H, W) train volumes;
        train_hist: :func:`intensity_histogram` of ``train``; nearest: int (n,) index of each
            volume's nearest train volume (RMS).

    Returns:
        {"ms_ssim_pairs": mean MS-SSIM of consecutive pairs (i, i + 1) of the set: diversity (real
        volumes give the reference; 1 = all alike); "ms_ssim_nearest_train": mean MS-SSIM of each
        volume with its nearest train volume: memorisation (a copy gives 1); "intensity_w1": W1
        distance of the set's voxel histogram to the train volumes'}.
    """
    pairs = ms_ssim(x, x.roll(-1, 0)) if len(x) > 1 else np.asarray([np.nan])
    return {
        "ms_ssim_pairs": float(np.mean(pairs)),
        "ms_ssim_nearest_train": float(np.mean(ms_ssim(x, train[torch.as_tensor(nearest)]))),
        "intensity_w1": histogram_distance(intensity_histogram(x), train_hist),
    }


def augment_volumes(volumes: np.ndarray, copies: int, cfg: Mapping, seed: int) -> np.ndarray:
    """``copies`` seeded random variants of every volume, by MONAI's transforms in this order:
    ``Rand3DElastic`` (elastic deformation of magnitude up to ``data.volume_elastic`` voxels,
    smoothing sigma 4-6 voxels, with rotation up to ``data.volume_degrees`` about every axis,
    zoom within +-``data.volume_scale`` and shifts up to ``data.volume_shift`` voxels),
    ``RandBiasField`` (coefficients up to ``data.volume_bias_field``), ``RandAdjustContrast``
    (gamma in [1 / g, g], g = ``data.volume_gamma``) and ``RandGaussianNoise`` (std
    ``data.volume_noise``); clipped to [0, 1].

    Args:
        volumes: float32 (N, 1, D, H, W) in [0, 1].
        copies: variants per volume (>= 1).
        cfg: the resolved ``data`` section (its ``volume_*`` keys).
        seed: seeds MONAI's transform RNG (``Compose.set_random_state``).

    Returns:
        float32 (copies * N, 1, D, H, W) in [0, 1]; row c * N + i is copy c of volume i.
    """
    transform = volume_transform(cfg, seed)
    out = np.empty((copies * len(volumes), *volumes.shape[1:]), np.float32)
    for c in range(copies):
        for i, v in enumerate(volumes):
            out[c * len(volumes) + i] = augment_one(transform, v)
    return out


def volume_transform(cfg: Mapping, seed: int, intensity: bool = True):
    """The seeded MONAI transform of :func:`augment_volumes` (its docstring gives the steps);
    ``intensity=False`` keeps its geometric half only (elastic + affine: no bias field, gamma or
    noise): the latent copies of volumes with ``latents.augment_intensity: false``."""
    import math

    from monai.transforms import Compose, Rand3DElastic, RandAdjustContrast, RandBiasField, RandGaussianNoise

    rad = math.radians(float(cfg["volume_degrees"]))
    g = float(cfg["volume_gamma"])
    transform = Compose(
        [
            Rand3DElastic(
                prob=1.0,
                sigma_range=(4, 6),
                magnitude_range=(0, float(cfg["volume_elastic"])),
                rotate_range=(rad,) * 3,
                scale_range=(float(cfg["volume_scale"]),) * 3,
                translate_range=(float(cfg["volume_shift"]),) * 3,
                padding_mode="zeros",
                mode="bilinear",
            ),
        ]
        + (
            [
                RandBiasField(prob=1.0, coeff_range=(0.0, float(cfg["volume_bias_field"]))),
                RandAdjustContrast(prob=1.0, gamma=(1 / g, g)),
                RandGaussianNoise(prob=1.0, std=float(cfg["volume_noise"])),
            ]
            if intensity
            else []
        )
    )
    transform.set_random_state(seed)
    return transform


def augment_one(transform, volume: np.ndarray) -> np.ndarray:
    """One draw of ``transform`` (:func:`volume_transform`) on float32 (1, D, H, W) in [0, 1],
    clipped to [0, 1]."""
    y = transform(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)))
    return np.clip(np.asarray(torch.as_tensor(y)), 0.0, 1.0)
