"""Your own images: readers of image folders, ``.npz`` / ``.npy`` arrays and HDF5 files, the
embedded non-MNIST sets, and the one preprocessing path they share.

Every reader returns :class:`RawImages` (a list of ``(H, W, C)`` arrays in the file's own
dtype, optional labels, the files read and their SHA-256); :func:`standardise` then applies,
in this order and always the same way:

1. **colour**: ``data.color`` (``gray``, ``rgb``, ``rgba``) converts every image; ``null`` keeps
   the channels the data has (1 gray, 3 rgb, 4 rgba) and refuses a mix or 2 channels, so the
   colour is never guessed silently;
2. **intensity**: integer data keep their bit depth (``uint8``: 0..255; ``uint16``: 0..65535, or
   ``data.bit_depth`` bits); float data need ``data.value_range: [lo, hi]`` and are stored as
   uint16 of ``(x - lo) / (hi - lo)``. The range is recorded in ``dataset.h5`` so that samples
   map back (:func:`pipeline.data.to_input_range`);
3. **size**: ``data.size`` (``[H, W]`` or one int) with ``data.resize`` ``resize`` (straight to
   H x W) or ``center_crop`` (scale the shorter side to fit, then cut the centre, as
   torchvision's ``Resize`` + ``CenterCrop``), resampled by Pillow with ``data.interpolation``
   (``nearest``, ``bilinear``, ``bicubic``, ``lanczos``, ``box``, ``hamming``); without
   ``data.size`` all images must already have one size.

Errors are :class:`pipeline.io.DataError` (also ``pipeline.data.DataError``) with one line naming
the file and what was expected.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io import DataError, StageInputError, sha256_file

__all__ = [
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "RawImages",
    "read_folder",
    "read_array_file",
    "read_hdf5",
    "load_photos",
    "load_sklearn_digits",
    "standardise",
    "survey",
    "Standardiser",
    "ImageRows",
    "load_source",
]

#: File suffixes the folder reader accepts (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: ``data.interpolation`` names -> Pillow resampling filter names.
INTERPOLATIONS = {
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "lanczos": "LANCZOS",
    "box": "BOX",
    "hamming": "HAMMING",
}
_COLORS = {1: "gray", 3: "rgb", 4: "rgba"}
_CHANNELS = {"gray": 1, "rgb": 3, "rgba": 4}


def _error(msg: str) -> DataError:
    return DataError(msg)


@dataclass
class RawImages:
    """What a reader found, before :func:`standardise`.

    Attributes:
        images: :class:`ImageRows` (or a list) of N arrays (H_i, W_i, C_i) in the source dtype
            (uint8, uint16, bool, int or float); sizes and channels may differ between images.
            The readers' rows are lazy (files, memory-mapped ``.npy``, HDF5 datasets): a row is
            read when it is asked for, so a source larger than memory is never held whole.
        labels: int64 (N,) class indices or None (unlabelled).
        class_names: the class of each label index (folder names), or None.
        origins: N strings naming where each image came from (file, or file[index]); a lazy
            sequence for arrays.
        digests: file name -> SHA-256 of every file read.
        given_split: None (split later), or "train"/"test" per image (N,) when the data came
            split (``train/`` and ``test/`` sub-folders, or ``test_images_key``).
        modes: Pillow mode per image (folder reader) or None.
        value_range: the range float pixels are in when ``data.value_range`` is not set (embedded
            sets that know it), or None.
    """

    images: list | ImageRows
    labels: np.ndarray | None
    origins: list | _Origins
    digests: dict
    class_names: list | None = None
    given_split: np.ndarray | None = None
    modes: list | None = field(default=None)
    value_range: list | None = None


# --- lazy rows ----------------------------------------------------------------------------
#: bytes of source rows read at a time (a block of an array or HDF5 dataset, a batch of files)
READ_BLOCK_BYTES = 8 << 20


class ImageRows:
    """N images read on demand: ``len(rows)``, ``rows.read(idx)`` (a list of (H, W, C) arrays
    in the order of ``idx``), ``rows[i]``, iteration in blocks, and ``rows.header(i)``
    ((H, W, C), dtype) when it is known without reading the pixels (else None).

    Subclasses implement ``__len__`` and ``_read_sorted`` (ascending unique indices)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _read_sorted(self, idx: np.ndarray) -> list:
        raise NotImplementedError

    def header(self, i: int):
        """((H, W, C), numpy dtype) of image ``i`` without its pixels, or None when unknown."""
        return None

    def read(self, idx) -> list:
        """Images at ``idx`` (ints in [0, N)), in that order (duplicates allowed)."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        uniq, inv = np.unique(idx, return_inverse=True)
        got = self._read_sorted(uniq)
        return [got[k] for k in inv]

    def __getitem__(self, i: int):
        return self.read([int(i)])[0]

    def __bool__(self) -> bool:
        return len(self) > 0

    def block_rows(self) -> int:
        """Rows per read block (about :data:`READ_BLOCK_BYTES`)."""
        return 256

    def __iter__(self):
        n, step = len(self), self.block_rows()
        for start in range(0, n, step):
            yield from self._read_sorted(np.arange(start, min(n, start + step)))


class ListRows(ImageRows):
    """Images already in memory (the embedded sets, tests)."""

    def __init__(self, images: list):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def _read_sorted(self, idx):
        return [self.images[int(i)] for i in idx]

    def header(self, i):
        return self.images[i].shape, self.images[i].dtype


#: Pillow modes whose pixels need not be read to know what :func:`_pil_to_array` returns
#: (channels and dtype); "P" depends on the palette's transparency, "I" on the values
_MODE_HEADER = {
    "L": (1, np.uint8),
    "1": (1, np.uint8),
    "RGB": (3, np.uint8),
    "CMYK": (3, np.uint8),
    "YCbCr": (3, np.uint8),
    "LAB": (3, np.uint8),
    "HSV": (3, np.uint8),
    "RGBA": (4, np.uint8),
    "LA": (4, np.uint8),
    "I;16": (1, np.uint16),
    "I;16B": (1, np.uint16),
    "I;16L": (1, np.uint16),
    "F": (1, np.float32),
}


class FileRows(ImageRows):
    """Image files read with Pillow, one at a time (:func:`_pil_to_array`)."""

    def __init__(self, files: list):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def _read_sorted(self, idx):
        return [_pil_to_array(self.files[int(i)])[0] for i in idx]

    def block_rows(self) -> int:
        return 64

    def header(self, i):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as im:
                mode, (w, h) = im.mode, im.size
                if mode == "P":
                    mode = "RGBA" if "transparency" in im.info else "RGB"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise _error(f"{self.files[i]}: cannot be read as an image ({exc})") from None
        if mode not in _MODE_HEADER:
            return None
        c, dtype = _MODE_HEADER[mode]
        return (h, w, c), np.dtype(dtype)


class ArrayRows(ImageRows):
    """Rows of an (N, ...) array-like (NumPy array, ``np.load(mmap_mode="r")``, or an HDF5
    dataset opened lazily from ``(path, key)``), returned as (H, W, C) by ``layout``.

    Raises:
        DataError: the array's rank or layout does not give (N, H, W, C) (see :func:`_to_nhwc`).
    """

    def __init__(self, array=None, layout: str | None = None, where: str = "", h5: tuple | None = None):
        self._array, self._h5, self._file = array, h5, None
        self.layout, self.where = layout, where
        shape, dtype = self._meta()
        probe = _to_nhwc(np.empty((0, *shape[1:]), dtype), layout, where, shape)  # raises for a wrong rank
        self.n, self.row_shape, self.dtype = int(shape[0]), probe.shape[1:], np.dtype(dtype)

    def _meta(self):
        if self._h5 is None:
            return self._array.shape, self._array.dtype
        ds = self._dataset()
        return ds.shape, ds.dtype

    def _dataset(self):
        if self._file is None:
            import h5py

            self._file = h5py.File(self._h5[0], "r")
        return self._file[self._h5[1]]

    def __getstate__(self):  # an open HDF5 file does not pickle; reopen where unpickled
        return {**self.__dict__, "_file": None}

    def __len__(self) -> int:
        return self.n

    def header(self, i):
        return self.row_shape, self.dtype

    def block_rows(self) -> int:
        return max(1, READ_BLOCK_BYTES // max(1, int(np.prod(self.row_shape)) * self.dtype.itemsize))

    def _read_sorted(self, idx):
        src = self._array if self._h5 is None else self._dataset()
        out = []
        step = self.block_rows()
        for k in range(0, len(idx), step):
            part = idx[k : k + step]
            lo, hi = int(part[0]), int(part[-1]) + 1
            if hi - lo <= 4 * len(part):  # dense: one contiguous read, then pick
                block = np.asarray(src[lo:hi])[part - lo]
            else:
                block = np.asarray(src[part] if self._h5 is None else src[part.tolist()])
            out += list(_to_nhwc(block, self.layout, self.where))
        return out


class ConcatRows(ImageRows):
    """Several :class:`ImageRows` one after another (a train and a given test part)."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int):
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.parts[p], i - int(self.starts[p])

    def header(self, i):
        part, j = self._locate(int(i))
        return part.header(j)

    def _read_sorted(self, idx):
        out = []
        for p, part in enumerate(self.parts):
            sel = idx[(idx >= self.starts[p]) & (idx < self.starts[p + 1])]
            if len(sel):
                out += part._read_sorted(sel - self.starts[p])
        return out


class _Origins:
    """Lazy ``origins`` of array rows: ``where[i]`` per part, without N strings in memory."""

    def __init__(self, parts: list[tuple[str, int]]):
        self.parts = parts
        self.starts = np.cumsum([0] + [n for _, n in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        return f"{self.parts[p][0]}[{i - int(self.starts[p])}]"

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def as_rows(images) -> ImageRows:
    """``images`` as :class:`ImageRows` (a list is wrapped in :class:`ListRows`)."""
    return images if isinstance(images, ImageRows) else ListRows(images)


# --- folders ------------------------------------------------------------------------------
def _pil_to_array(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":  # palette: expand to what the palette holds
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if mode == "1" else "RGB")
                mode = im.mode
            elif mode == "LA":
                im = im.convert("RGBA")
                mode = im.mode
            arr = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _error(f"{path}: cannot be read as an image ({exc})") from None
    if mode in ("I;16", "I;16B", "I;16L"):
        arr = arr.astype(np.uint16)
    elif mode == "I":
        if arr.min() < 0 or arr.max() > 65535:
            raise _error(f"{path}: 32-bit integer pixels outside 0..65535 ({arr.min()}..{arr.max()})")
        arr = arr.astype(np.uint16)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, mode


def _image_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            raise _error(f"{folder}: holds both image files and the sub-folder {p.name!r}; use one layout")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise _error(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        files.append(p)
    return files


def _scan(folder: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files of ``folder``: flat (unlabelled) or one sub-folder per class (ImageFolder)."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    dirs = [p for p in entries if p.is_dir()]
    if not entries:
        raise _error(f"{folder}: the folder is empty (expected image files, or one sub-folder per class)")
    if not dirs:
        return _image_files(folder), None, None
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise _error(f"{folder}: holds class sub-folders and the file {stray[0].name!r}; use one layout")
    files, labels = [], []
    for idx, d in enumerate(dirs):  # ImageFolder: classes = sorted sub-folder names
        got = _image_files(d)
        if not got:
            raise _error(f"{d}: class folder is empty")
        files += got
        labels += [idx] * len(got)
    return files, labels, [d.name for d in dirs]


def read_folder(path: str | os.PathLike) -> RawImages:
    """Images in a folder, read with Pillow: flat (unlabelled), one sub-folder per class as
    ``torchvision.datasets.ImageFolder`` (classes = sorted sub-folder names, labels 0..n-1), or
    ``train/`` and ``test/`` sub-folders (a given split), each flat or by class. The pixels are
    read later, image by image (:class:`FileRows`); an unreadable image is found by
    :func:`survey`.

    Raises:
        DataError: missing or empty folder, a non-image file, an unreadable image, mixed
            layouts, different classes in train/ and test/.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _error(f"data.path {str(folder)!r} is not a folder")
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    parts = [("train", folder / "train"), ("test", folder / "test")] if names == {"train", "test"} else [(None, folder)]
    files, labels, split, class_names = [], [], [], None
    for part, sub in parts:
        f, lab, cls = _scan(sub)
        if part == "test" and cls != class_names:
            raise _error(f"{sub}: classes {cls} differ from those of {folder / 'train'}: {class_names}")
        class_names = cls
        files += f
        labels += lab or []
        split += [part] * len(f)
    return RawImages(
        images=FileRows(files),
        labels=np.asarray(labels, np.int64) if class_names else None,
        origins=[str(p) for p in files],
        digests=_digests(folder, files),
        class_names=class_names,
        given_split=np.asarray(split) if parts[0][0] else None,
    )


def _digests(folder: Path, files: list) -> dict:
    from pipeline.runtime import Progress

    out = {}
    progress = Progress(f"prepare_data: hashing {folder}", len(files), minimum=2000)
    for i, p in enumerate(files, 1):
        out[str(p.relative_to(folder))] = sha256_file(p)
        progress.tick(i)
    return out


# --- arrays -------------------------------------------------------------------------------
def _to_nhwc(arr: np.ndarray, layout: str | None, where: str, shape=None) -> np.ndarray:
    if arr.ndim == 3 and layout in (None, "NHW"):
        return arr[..., None]
    if arr.ndim == 4 and layout in (None, "NHWC"):
        return arr
    if arr.ndim == 4 and layout == "NCHW":
        return np.moveaxis(arr, 1, -1)
    expect = {None: "(N, H, W) or (N, H, W, C)", "NHW": "(N, H, W)", "NHWC": "(N, H, W, C)", "NCHW": "(N, C, H, W)"}
    shape = tuple(arr.shape if shape is None else shape)
    raise _error(f"{where}: array of shape {shape} (rank {len(shape)}), expected {expect[layout]} (data.layout)")


def _labels(arr, n: int, where: str) -> np.ndarray:
    lab = np.asarray(arr)
    if lab.ndim != 1 or len(lab) != n:
        raise _error(f"{where}: labels of shape {lab.shape}, expected ({n},), one per image")
    if not np.issubdtype(lab.dtype, np.integer):
        if lab.dtype.kind in "US":  # class names: sorted, as ImageFolder
            names = sorted(set(lab.tolist()))
            return np.asarray([names.index(v) for v in lab.tolist()], np.int64)
        if not np.all(np.mod(lab, 1) == 0):
            raise _error(f"{where}: labels must be integers or class names, got {lab.dtype} values")
    lab = lab.astype(np.int64)
    if lab.min(initial=0) < 0:
        raise _error(f"{where}: labels must be >= 0, got {lab.min()}")
    return lab


def _raw_from_arrays(parts: list[tuple[str | None, object, np.ndarray | None, str]], digests, layout) -> RawImages:
    """``parts``: (given split or None, array-like or ("h5", path, key), labels or None, where)."""
    rows, labels, names, split = [], [], [], []
    has_labels = {lab is not None for _, _, lab, _ in parts}
    if len(has_labels) > 1:
        raise _error(f"{parts[0][3]}: labels given for the train images but not the test images (or the reverse)")
    for part, arr, lab, where in parts:
        if isinstance(arr, tuple):
            x = ArrayRows(layout=layout, where=where, h5=arr[1:])
        else:
            x = ArrayRows(arr, layout, where)
        rows.append(x)
        names.append((where, len(x)))
        split += [part] * len(x)
        if lab is not None:
            labels.append(_labels(lab, len(x), where))
    return RawImages(
        images=rows[0] if len(rows) == 1 else ConcatRows(rows),
        labels=np.concatenate(labels) if labels else None,
        origins=_Origins(names),
        digests=digests,
        given_split=np.asarray(split) if parts[0][0] else None,
    )


def read_array_file(cfg: Mapping) -> RawImages:
    """``data.source: npz`` or ``npy``: images (N, H, W), (N, H, W, C) or, with
    ``data.layout: NCHW``, (N, C, H, W); labels (N,) from ``data.labels_key`` (npz) or
    ``data.labels_path`` (npy); optional given test split ``data.test_images_key`` /
    ``data.test_labels_key`` (npz). An ``.npy`` is memory-mapped (rows read as needed, so it may
    be larger than memory); an ``.npz`` member is decompressed whole (use ``.npy`` or HDF5 for
    data larger than memory).

    Raises:
        DataError: missing file, not a NumPy file, a missing key (the keys present are listed),
            wrong rank, labels of another length.
    """
    source = cfg["source"]
    path = Path(str(cfg.get("path") or "")).expanduser()
    if not cfg.get("path") or not path.is_file():
        raise _error(f"data.path {str(cfg.get('path'))!r} is not a file (data.source: {source})")
    digests = {path.name: sha256_file(path)}
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if source == "npy" else None)
    except (ValueError, OSError, EOFError) as exc:
        raise _error(f"{path}: not a NumPy {'.npz' if source == 'npz' else '.npy'} file ({exc})") from None
    if source == "npy":
        if not isinstance(loaded, np.ndarray):
            raise _error(f"{path}: is an .npz archive; set data.source: npz")
        lab = None
        if cfg.get("labels_path"):
            lp = Path(cfg["labels_path"]).expanduser()
            if not lp.is_file():
                raise _error(f"data.labels_path {str(lp)!r} does not exist")
            lab = np.load(lp, allow_pickle=False)
            digests[lp.name] = sha256_file(lp)
        return _raw_from_arrays([(None, loaded, lab, str(path))], digests, cfg.get("layout"))
    if isinstance(loaded, np.ndarray):
        raise _error(f"{path}: is a single .npy array; set data.source: npy")
    with loaded:
        keys = list(loaded.files)

        def get(key: str | None, what: str):
            if key is None:
                return None
            if key not in keys:
                raise _error(f"{path}: has no array {key!r} (data.{what}); it holds {keys}")
            return loaded[key]

        parts = [
            ("train" if cfg.get("test_images_key") else None, get(cfg.get("images_key") or "images", "images_key"))
        ]
        parts[0] += (get(cfg.get("labels_key"), "labels_key"), f"{path}:{cfg.get('images_key') or 'images'}")
        if cfg.get("test_images_key"):
            parts.append(
                (
                    "test",
                    get(cfg["test_images_key"], "test_images_key"),
                    get(cfg.get("test_labels_key"), "test_labels_key"),
                    f"{path}:{cfg['test_images_key']}",
                )
            )
    return _raw_from_arrays(parts, digests, cfg.get("layout"))


def read_hdf5(cfg: Mapping) -> RawImages:
    """``data.source: hdf5``: the dataset ``data.images_key`` (default ``images``) of the HDF5 file
    ``data.path``, labels from ``data.labels_key``, a given test split from
    ``data.test_images_key`` / ``data.test_labels_key``; shapes as :func:`read_array_file`.
    Images are read block by block when they are used (:class:`ArrayRows`); labels at once.

    Raises:
        DataError: missing or non-HDF5 file, a dataset name that does not exist (the datasets
            present are listed), wrong rank, labels of another length.
    """
    import h5py

    path = Path(str(cfg.get("path") or "")).expanduser()
    if not cfg.get("path") or not path.is_file():
        raise _error(f"data.path {str(cfg.get('path'))!r} is not a file (data.source: hdf5)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _error(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        present: list[str] = []
        f.visititems(lambda name, obj: present.append(name) if isinstance(obj, h5py.Dataset) else None)

        def get(key: str | None, what: str):
            if key is None:
                return None
            if key.strip("/") not in present:
                raise _error(f"{path}: has no dataset {key!r} (data.{what}); it holds {present}")
            return ("h5", str(path), key) if what.endswith("images_key") else f[key][...]

        key = cfg.get("images_key") or "images"
        parts = [
            (
                "train" if cfg.get("test_images_key") else None,
                get(key, "images_key"),
                get(cfg.get("labels_key"), "labels_key"),
                f"{path}:{key}",
            )
        ]
        if cfg.get("test_images_key"):
            tk = cfg["test_images_key"]
            parts.append(
                ("test", get(tk, "test_images_key"), get(cfg.get("test_labels_key"), "test_labels_key"), f"{path}:{tk}")
            )
    return _raw_from_arrays(parts, {path.name: sha256_file(path)}, cfg.get("layout"))


# --- embedded sets ------------------------------------------------------------------------
#: The colour photographs scikit-image and scikit-learn ship in their wheels (loaded offline).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "china", "flower")


def _photo(name: str):
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
        import sklearn.datasets

        file = Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
        return img, file
    import skimage.data

    img = getattr(skimage.data, name)()
    file = {"immunohistochemistry": "ihc.png", "hubble_deep_field": "hubble_deep_field.jpg", "rocket": "rocket.jpg"}
    return img, Path(skimage.data.__file__).parent / file.get(name, f"{name}.png")


def load_photos(cfg: Mapping) -> RawImages:
    """``data.source: photos``: seeded random ``data.photo_crop`` x ``data.photo_crop`` RGB crops of
    the eight colour photographs shipped by scikit-image and scikit-learn (:data:`PHOTOS`), each
    first scaled (Pillow, ``data.interpolation``) so that its shorter side is
    ``data.photo_short_side`` pixels; ``data.num_crops`` crops in all, the photo index as label
    (``data.photo_labels: true``) or unlabelled. Real images of another shape (32x32x3 by
    default) that load without a network.
    """
    from PIL import Image

    rng = np.random.default_rng(int(cfg["seed"]))
    side, crop, n = int(cfg["photo_short_side"]), int(cfg["photo_crop"]), int(cfg["num_crops"])
    if crop > side:
        raise _error(f"data.photo_crop {crop} is larger than data.photo_short_side {side}")
    resample = getattr(Image.Resampling, INTERPOLATIONS[cfg.get("interpolation") or "bicubic"])
    photos, digests = [], {}
    for name in PHOTOS:
        img, file = _photo(name)
        if file is not None and Path(file).is_file():
            digests[Path(file).name] = sha256_file(file)
        im = Image.fromarray(np.asarray(img)[..., :3].astype(np.uint8))
        s = side / min(im.size)
        photos.append(np.asarray(im.resize((round(im.width * s), round(im.height * s)), resample)))
    which = rng.integers(0, len(photos), n)
    images, origins = [], []
    for k in which:
        h, w = photos[k].shape[:2]
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        images.append(photos[k][y : y + crop, x : x + crop].copy())
        origins.append(f"{PHOTOS[k]}[{y}:{y + crop}, {x}:{x + crop}]")
    labels = which.astype(np.int64) if cfg.get("photo_labels") else None
    return RawImages(images, labels, origins, digests, class_names=list(PHOTOS) if labels is not None else None)


def load_sklearn_digits(cfg: Mapping) -> RawImages:
    """``data.source: sklearn_digits``: the 1,797 8x8 handwritten digits of
    ``sklearn.datasets.load_digits`` (UCI optdigits; values 0..16, stored as the range [0, 16]),
    labelled 0..9; set ``data.size`` to upsample them (e.g. 64)."""
    import sklearn.datasets
    from sklearn.datasets import load_digits

    d = load_digits()
    file = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    images = list(d.images.astype(np.float32)[..., None])
    return RawImages(
        images,
        d.target.astype(np.int64),
        [f"load_digits()[{i}]" for i in range(len(images))],
        {file.name: sha256_file(file)} if file.is_file() else {},
        class_names=[str(i) for i in range(10)],
        value_range=[0.0, 16.0],
    )


# --- one preprocessing path ---------------------------------------------------------------
def _convert_color(arr: np.ndarray, target: str, where: str) -> np.ndarray:
    c = arr.shape[-1]
    want = _CHANNELS[target]
    if c == want:
        return arr
    if target == "gray":
        if c not in (3, 4):
            raise _error(f"{where}: {c} channels cannot be converted to gray")
        # ITU-R 601-2 luma, the weights of Pillow's convert("L")
        y = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return (np.round(y) if arr.dtype.kind in "ui" else y).astype(arr.dtype)[..., None]
    if c == 1:
        rgb = np.repeat(arr, 3, axis=-1)
    elif c == 4 and target == "rgb":
        return arr[..., :3]
    elif c == 3:
        rgb = arr
    else:
        raise _error(f"{where}: {c} channels cannot be converted to {target}")
    if target == "rgba":
        full = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
        return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), full, arr.dtype)], axis=-1)
    return rgb


def _resize(arr: np.ndarray, size: tuple[int, int], mode: str, interpolation: str) -> np.ndarray:
    """float32 (H, W, C) -> float32 (size[0], size[1], C), per channel in Pillow mode "F"."""
    from PIL import Image

    resample = getattr(Image.Resampling, INTERPOLATIONS[interpolation])
    h, w = arr.shape[:2]
    th, tw = size
    out = []
    for c in range(arr.shape[-1]):
        im = Image.fromarray(np.ascontiguousarray(arr[..., c], dtype=np.float32), mode="F")
        if mode == "center_crop":
            s = max(th / h, tw / w)
            rh, rw = max(th, round(h * s)), max(tw, round(w * s))
            if (rh, rw) != (h, w):
                im = im.resize((rw, rh), resample)
            top, left = (rh - th) // 2, (rw - tw) // 2
            im = im.crop((left, top, left + tw, top + th))
        elif (th, tw) != (h, w):
            im = im.resize((tw, th), resample)
        out.append(np.asarray(im, np.float32))
    return np.stack(out, -1)


def _first_seen(keys, origins) -> dict:
    """key -> the origin of the first image with that key (channels, size), in order."""
    out: dict = {}
    for key, origin in zip(keys, origins):
        out.setdefault(key, origin)
    return out


class Standardiser:
    """Colour, intensity and size (module docstring) for one image at a time, with the settings
    :func:`survey` found for the whole source.

    Attributes:
        meta: ``color``, ``max_value``, ``value_range``, ``input_dtype``, ``preprocessing``
            (see :func:`standardise`).
        shape: (C, H, W) of every image it returns.
        store: numpy dtype of what it returns (uint8 or uint16).
    """

    def __init__(self, color, dtype, max_value, store, value_range, target, mode, interp, sizes, float_range):
        self.color, self.dtype, self.max_value, self.store = color, dtype, int(max_value), store
        self.target, self.mode, self.interp, self.float_range = target, mode, interp, float_range
        self.shape = (_CHANNELS[color], *target)
        resized = len(sizes) > 1 or target not in sizes
        self.meta = {
            "color": color,
            "max_value": int(max_value),
            "value_range": [float(v) for v in value_range],
            "input_dtype": str(dtype),
            "preprocessing": {
                "size": list(target),
                "resize": mode if resized else None,
                "interpolation": interp if resized else None,
                "input_sizes": sorted({f"{h}x{w}" for h, w in sizes}),
            },
        }

    def __call__(self, img: np.ndarray, where: str) -> np.ndarray:
        """(H, W, C) source array -> (C, H, W) ``store`` array in [0, max_value]."""
        img = _convert_color(img, self.color, where)
        if img.dtype == np.bool_:
            img = img.astype(np.uint8) * 255
        if self.float_range is not None:
            lo, hi = self.float_range
            img = (img.astype(np.float32) - lo) / (hi - lo) * self.max_value
        else:
            img = img.astype(np.float32)
        if img.shape[:2] != self.target:
            img = _resize(img, self.target, self.mode, self.interp)
        return np.clip(np.round(img), 0, self.max_value).astype(self.store).transpose(2, 0, 1)


class _Survey:
    """What one pass over a source's images found (the first image seen for each key)."""

    def __init__(self):
        self.chans, self.dtypes, self.sizes = {}, {}, {}
        self.lo, self.hi = None, None  # integer pixel range
        self.nonfinite = None  # first image with NaN or inf
        self.out_of_range = None  # first float image outside data.value_range: (where, min, max)

    def header(self, shape, dtype, where: str) -> None:
        self.chans.setdefault(shape[-1], where)
        self.dtypes.setdefault(np.dtype(dtype), where)
        self.sizes.setdefault(tuple(shape[:2]), where)

    def pixels(self, img: np.ndarray, where: str, float_range) -> None:
        self.header(img.shape, img.dtype, where)
        if img.dtype == np.bool_:
            lo, hi = 0, 255 * int(img.any())
        elif img.dtype.kind in "ui":
            lo, hi = int(img.min()), int(img.max())
        else:
            if self.nonfinite is None and not np.isfinite(img).all():
                self.nonfinite = where
                return
            if float_range is not None and self.out_of_range is None:
                a, b = float_range
                if img.min() < a - 1e-6 * (b - a) or img.max() > b + 1e-6 * (b - a):
                    self.out_of_range = (where, float(img.min()), float(img.max()))
            return
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)


def _needs_pixels(dtype, cfg: Mapping) -> bool:
    """Whether the pixel values must be looked at (8-bit data with no declared bit depth need not)."""
    return not (np.dtype(dtype) == np.uint8 and cfg.get("bit_depth") is None)


def survey(raw: RawImages, cfg: Mapping) -> Standardiser:
    """Pass 1 of :func:`standardise` over every image (one at a time, headers only where the
    pixels cannot matter: 8-bit images without ``data.bit_depth``): find the colour, pixel type,
    bit depth and size the source gets, and check every image.

    Args:
        raw: what a reader returned.
        cfg: the ``data`` section (``color``, ``bit_depth``, ``value_range``, ``size``,
            ``resize``, ``interpolation``).

    Returns:
        the :class:`Standardiser` to apply to each image (pass 2).

    Raises:
        DataError: as :func:`standardise`.
    """
    from pipeline.runtime import Progress

    rows = as_rows(raw.images)
    if not rows:
        raise _error(f"{raw.origins[0] if len(raw.origins) else 'data.path'}: no images found")
    value_range = cfg.get("value_range") or raw.value_range
    float_range = None if value_range is None else tuple(map(float, value_range))
    sv = _Survey()
    n = len(rows)
    progress = Progress("prepare_data: checking the images", n, minimum=2000)
    pending = []  # images whose header is not enough

    def flush():
        for i, img in zip(pending, rows.read(pending)):
            sv.pixels(img, raw.origins[i], float_range)
        pending.clear()

    for i in range(n):
        head = rows.header(i)
        if head is None or _needs_pixels(head[1], cfg):
            pending.append(i)
            if len(pending) >= rows.block_rows():
                flush()
        else:
            sv.header(*head, raw.origins[i])
        progress.tick(i + 1)
    flush()
    return _settle(sv, raw, cfg, value_range)


def _settle(sv: _Survey, raw: RawImages, cfg: Mapping, value_range) -> Standardiser:
    """The settings (and the errors) of what :func:`survey` found, in the order colour,
    intensity, size."""
    first = raw.origins[0]
    # 1. colour
    color = cfg.get("color")
    if color is None:
        if len(sv.chans) > 1:
            (c1, o1), (c2, o2) = list(sv.chans.items())[:2]
            raise _error(
                f"{o2}: {_COLORS.get(c2, c2)} ({c2} channels) but {o1} is {_COLORS.get(c1, c1)} ({c1}); "
                "set data.color: gray, rgb or rgba"
            )
        c = next(iter(sv.chans))
        if c not in _COLORS:
            raise _error(f"{first}: {c} channels; set data.color: gray, rgb or rgba")
        color = _COLORS[c]
    else:
        for c, o in sv.chans.items():
            if c not in _COLORS:  # 2 channels (or 5+): nothing to convert from
                raise _error(f"{o}: {c} channels cannot be converted to {color}")
    # 2. intensity
    if len(sv.dtypes) > 1:
        raise _error(f"{first}: images of several pixel types {sorted(map(str, sv.dtypes))}; convert them to one")
    dtype = next(iter(sv.dtypes))
    bit_depth = cfg.get("bit_depth")
    float_range = None
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if dtype.kind == "f":
        if value_range is None:
            raise _error(
                f"{first}: float pixels ({dtype}); set data.value_range: [lo, hi] (the values of black and white)"
            )
        lo, hi = map(float, value_range)
        if not hi > lo:
            raise _error(f"data.value_range {value_range}: hi must be > lo")
        if sv.nonfinite is not None:
            raise _error(f"{sv.nonfinite}: NaN or infinite pixels")
        if sv.out_of_range is not None:
            o, a, b = sv.out_of_range
            raise _error(f"{o}: values {a:g}..{b:g} outside data.value_range [{lo:g}, {hi:g}]")
        max_value, store = 65535, np.uint16
        if bit_depth is not None:
            raise _error(f"{first}: data.bit_depth {bit_depth} is for integer pixels; these are {dtype}")
        float_range = (lo, hi)
    elif dtype.kind in "ui":
        native = 8 if dtype.itemsize == 1 else 16
        bits = int(bit_depth) if bit_depth is not None else native
        data_min = 0 if sv.lo is None else sv.lo
        data_max = (2**native - 1) if sv.hi is None else sv.hi  # not looked at: 8-bit, no declared depth
        if data_min < 0:
            raise _error(f"{first}: negative integer pixels ({data_min}); give float data with data.value_range")
        if bit_depth is not None and native < bits:
            raise _error(
                f"{first}: {native}-bit pixels ({dtype}, max {data_max}) but data.bit_depth is {bits}; "
                f"declare data.bit_depth: {native} (or null)"
            )
        if sv.hi is not None and data_max > 2**bits - 1:
            raise _error(f"{first}: pixel value {data_max} does not fit data.bit_depth {bits} (max {2**bits - 1})")
        if bits > 16:
            raise _error(f"{first}: {dtype} pixels with values up to {data_max}; at most 16 bits are supported")
        max_value = 2**bits - 1
        store = np.uint8 if bits <= 8 else np.uint16
        if value_range is None:
            value_range = [0, max_value]
    else:
        raise _error(f"{first}: pixels of type {dtype}; expected unsigned integers or floats")
    # 3. size
    size = cfg.get("size")
    if size is None:
        if len(sv.sizes) > 1:
            (s1, o1), (s2, o2) = list(sv.sizes.items())[:2]
            raise _error(
                f"{o2}: {s2[0]}x{s2[1]} pixels but {o1} is {s1[0]}x{s1[1]}; set data.size (and data.resize) to use both"
            )
        target = next(iter(sv.sizes))
    else:
        target = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode, interp = cfg.get("resize") or "resize", cfg.get("interpolation") or "bicubic"
    return Standardiser(color, dtype, max_value, store, value_range, target, mode, interp, set(sv.sizes), float_range)


def standardise(raw: RawImages, cfg: Mapping) -> tuple[np.ndarray, dict]:
    """Apply colour, intensity and size (module docstring) to every image, in memory:
    :func:`survey`, then its :class:`Standardiser` on each image (``prepare_data`` writes
    ``dataset.h5`` block by block with the same two passes instead).

    Args:
        raw: what a reader returned.
        cfg: the ``data`` section (``color``, ``bit_depth``, ``value_range``, ``size``,
            ``resize``, ``interpolation``).

    Returns:
        (images uint8 or uint16 (N, C, H, W), meta) with meta keys ``color``, ``max_value``
        (255, 65535 or 2**bit_depth - 1), ``value_range`` [lo, hi] (the input units that 0 and
        max_value stand for), ``input_dtype`` and ``preprocessing`` (size, resize,
        interpolation, input sizes seen).

    Raises:
        DataError: no images, mixed channels without ``data.color``, 2 channels, mixed sizes
            without ``data.size``, float data without ``data.value_range`` or outside it, NaN or
            infinite pixels, data deeper than the declared ``data.bit_depth`` or shallower
            (8-bit data declared 16-bit), an unreadable image.
    """
    std = survey(raw, cfg)
    rows = as_rows(raw.images)
    out = np.empty((len(rows), *std.shape), std.store)
    for k, img in enumerate(rows):
        out[k] = std(img, raw.origins[k])
    return out, std.meta


def manifest_digest(digests: Mapping[str, str]) -> str:
    """SHA-256 of the ``sha256sum``-format listing of ``digests`` (one line per file, sorted)."""
    text = "".join(f"{v}  {k}\n" for k, v in sorted(digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def load_source(cfg: Mapping) -> RawImages:
    """Dispatch ``data.source`` (folder, npz, npy, hdf5, photos, sklearn_digits) to its reader."""
    source = cfg["source"]
    if source == "folder":
        if not cfg.get("path"):
            raise _error("data.path must name the image folder (data.source: folder)")
        return read_folder(cfg["path"])
    if source in ("npz", "npy"):
        return read_array_file(cfg)
    if source == "hdf5":
        return read_hdf5(cfg)
    if source == "photos":
        return load_photos(cfg)
    if source == "sklearn_digits":
        return load_sklearn_digits(cfg)
    if source == "nifti":
        raise _error("data.source nifti holds 3D volumes: read them with pipeline.volumes.load_nifti")
    raise _error(f"data.source {source!r} has no reader in pipeline.sources")


#: ``data.test_size: auto``: this share of the images, at least ``AUTO_TEST_MIN`` and at most
#: ``AUTO_TEST_MAX`` (500 for MNIST-sized sets, as before), and never more than a quarter of them
AUTO_TEST_SHARE, AUTO_TEST_MIN, AUTO_TEST_MAX = 0.1, 50, 500


def test_count(test_size: int | float | str, n: int) -> int:
    """The test split's size for ``data.test_size`` and n images: an int as it is, a fraction
    (< 1) of n, or ``auto``: round(0.1 n) clipped to [50, 500] and to n // 4 (so 5,000 images
    give 500 and a folder of 200 gives 50; docs/own-data.md says what N the judge needs)."""
    if test_size == "auto":
        return min(max(int(round(AUTO_TEST_SHARE * n)), AUTO_TEST_MIN), AUTO_TEST_MAX, n // 4)
    return int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)


def split_indices(
    n: int, labels: np.ndarray | None, test_size: int | float | str, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices (``sklearn.model_selection.train_test_split``), stratified by
    label when there are labels, every class has at least 2 images and both splits can hold
    every class (else a plain seeded split). ``test_size``: see :func:`test_count`.

    Raises:
        DataError: test_size leaves no train or no test image.
    """
    from sklearn.model_selection import train_test_split

    k = test_count(test_size, n)
    if not 1 <= k < n:
        raise _error(f"{where}: {n} images cannot give a test split of {k} (data.test_size {test_size})")
    idx = np.arange(n)
    strat = None
    if labels is not None:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        if counts.min() >= 2 and k >= len(counts) and n - k >= len(counts):
            strat = labels
    tr, te = train_test_split(idx, test_size=k, stratify=strat, random_state=seed)
    return np.sort(tr) if strat is None else tr, np.sort(te) if strat is None else te


def given_or_split(raw: RawImages, cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: the given split, or :func:`split_indices` by ``data.test_size``."""
    if raw.given_split is not None:
        return np.flatnonzero(raw.given_split == "train"), np.flatnonzero(raw.given_split == "test")
    return split_indices(len(as_rows(raw.images)), raw.labels, cfg["test_size"], int(cfg["seed"]), raw.origins[0])


def has_labels(dcfg: Mapping) -> bool:
    """Whether ``data`` will carry labels, known before anything is read (the Snakefile decides
    the judges from it): the MNIST sources and sklearn_digits always, photos with
    ``photo_labels``, arrays with ``labels_key`` / ``labels_path``, a folder when it (or its
    ``train/``) holds sub-folders (ImageFolder classes)."""
    source = dcfg["source"]
    if source in ("mnist5k", "mnist", "fashion_mnist", "sklearn_digits"):
        return True
    if source == "photos":
        return bool(dcfg.get("photo_labels"))
    if source == "npy":
        return bool(dcfg.get("labels_path"))
    if source in ("npz", "hdf5"):
        return bool(dcfg.get("labels_key"))
    if source == "nifti":  # volumes are unlabelled
        return False
    folder = Path(str(dcfg.get("path") or "")).expanduser()
    if not dcfg.get("path") or not folder.is_dir():
        return False
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        folder = folder / "train"
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def expected_shape(dcfg: Mapping) -> tuple[int, ...]:
    """(C, H, W) that ``dataset.h5`` will hold, known before prepare_data runs (for the FLOP plan):
    from ``data.size`` and ``data.color`` when set, else the source's own shape (MNIST 28x28, the
    photos' crop, the digits' 8x8), else the first image or array of ``data.path``; (1, 28, 28)
    when nothing can be read yet. For ``nifti``: (1, D, H, W) from ``data.volume_shape``, else
    the first volume's header (before resampling), else (1, 64, 64, 64)."""
    source = dcfg["source"]
    if source == "nifti":
        if dcfg.get("volume_shape"):
            return (1, *(int(v) for v in dcfg["volume_shape"]))
        try:
            import nibabel as nib

            from pipeline.volumes import nifti_files

            return (1, *(int(v) for v in nib.load(str(nifti_files(dcfg["path"])[0])).shape[:3]))
        except Exception:  # noqa: BLE001 - a plan before the data exists
            return (1, 64, 64, 64)
    c = {"gray": 1, "rgb": 3, "rgba": 4}.get(dcfg.get("color") or "", 3 if source == "photos" else None)
    hw = None
    if dcfg.get("size") is not None:
        size = dcfg["size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if source in ("mnist5k", "mnist", "fashion_mnist"):
        return (c or 1, *(hw or (28, 28)))
    if source == "sklearn_digits":
        return (c or 1, *(hw or (8, 8)))
    if source == "photos":
        return (c, *(hw or (int(dcfg["photo_crop"]),) * 2))
    try:
        path = Path(str(dcfg.get("path"))).expanduser()
        if source == "folder":
            first = next(p for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
            arr, _ = _pil_to_array(first)
            shape = arr.shape
        elif source == "npy":
            shape = _to_nhwc(np.load(path, mmap_mode="r")[:1], dcfg.get("layout"), str(path)).shape[1:]
        elif source == "npz":
            head = _npz_member_shape(path, dcfg.get("images_key") or "images")
            shape = _to_nhwc(np.empty((1, *head[1:]), np.uint8), dcfg.get("layout"), str(path)).shape[1:]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                shape = _to_nhwc(f[dcfg.get("images_key") or "images"][:1], dcfg.get("layout"), str(path)).shape[1:]
    except Exception:  # noqa: BLE001 - a plan before the data exists: fall back to MNIST's shape
        return (c or 1, *(hw or (28, 28)))
    return (c or int(shape[-1]), *(hw or (int(shape[0]), int(shape[1]))))


def _npz_member_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in the ``.npz`` at ``path`` from its ``.npy`` header alone (the
    archive member is not decompressed past the header). Raises KeyError for a missing key."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(int(v) for v in read(fh)[0])


def expected_count(dcfg: Mapping) -> int | None:
    """Images the source will give, known before prepare_data (for the FLOP plan): the embedded
    sets' sizes, the files of a folder, the first axis of an array or HDF5 dataset (read lazily);
    None for the IDX sources or when nothing can be read yet."""
    source = dcfg["source"]
    if source == "photos":
        return int(dcfg["num_crops"])
    if source == "nifti":  # volumes before the volume_copies (pipeline.flops.images_in_split adds them)
        from pipeline.volumes import nifti_files

        try:
            return len(nifti_files(dcfg["path"]))
        except Exception:  # noqa: BLE001 - a plan before the data exists
            return None
    if source == "sklearn_digits":
        return 1797
    try:
        path = Path(str(dcfg.get("path"))).expanduser()
        if source == "folder":
            return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if source == "npy":
            return int(np.load(path, mmap_mode="r").shape[0])
        if source == "npz":
            return _npz_member_shape(path, dcfg.get("images_key") or "images")[0]
        if source == "hdf5":
            import h5py

            with h5py.File(path, "r") as f:
                return int(f[dcfg.get("images_key") or "images"].shape[0])
    except Exception:  # noqa: BLE001 - a plan before the data exists
        return None
    return None


def judges(cfg: Mapping, num_classes: int | None = None) -> tuple[str, ...]:
    """The evaluate stage's judges: the one rule that the Snakefile (which judges to train), the
    evaluate stage (which judges to run) and the FLOP plan (which to price) all ask.

    ``evaluate.judge``: ``classifier``, ``features`` (the label-free SimCLR encoder), ``both``
    (("classifier", "features"): the classifier leads), or ``auto``: the classifier when the data
    has labels, else the label-free features. Whether it has labels: ``num_classes`` >= 2 when the
    dataset exists (``dataset.h5``'s number of classes), else :func:`has_labels` from the config.

    Raises:
        pipeline.io.StageInputError: the classifier asked for on a dataset of fewer than 2 classes
            (only with ``num_classes``: before the data exist nothing can be known).
    """
    j = cfg["evaluate"].get("judge", "auto")
    labelled = has_labels(cfg["data"]) if num_classes is None else num_classes >= 2
    names = {"auto": ("classifier",) if labelled else ("features",), "both": ("classifier", "features")}
    out = names.get(j, (j,))
    if num_classes is not None and "classifier" in out and num_classes < 2:
        raise StageInputError(f"evaluate.judge {j!r} needs labelled data, but the dataset has {num_classes} classes")
    return out
