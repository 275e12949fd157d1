"""Small file helpers shared by every stage: the run layout, atomic writes, hashes, PNG grids.

A leaf module (numpy, Pillow and the standard library only). Every writer here writes to a
temporary file in the destination folder and renames it into place, so a file either is
complete or is not there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DiskFullError",
    "RunPaths",
    "atomic_path",
    "atomic_write_text",
    "write_json",
    "read_json",
    "sha256_file",
    "save_grid_png",
    "image_grid",
    "StageInputError",
    "DataError",
]


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run, derived from ``results/<run>/``; the only place file names live.

    The Snakefile uses the same relative names (checked by the end-to-end test).
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset.h5"

    @property
    def vqvae_model(self) -> Path:
        return self.root / "vqvae" / "model.pt"

    @property
    def latents(self) -> Path:
        return self.root / "latents" / "latents.h5"

    @property
    def pixelcnn_model(self) -> Path:
        return self.root / "pixelcnn" / "model.pt"

    @property
    def diffusion_model(self) -> Path:
        return self.root / "diffusion" / "model.pt"

    @property
    def classifier_model(self) -> Path:
        return self.root / "classifier" / "model.pt"

    @property
    def simclr_model(self) -> Path:
        """The label-free judge (train_simclr)."""
        return self.root / "simclr" / "model.pt"

    @property
    def pixel_diffusion_model(self) -> Path:
        return self.root / "pixel_diffusion" / "model.pt"

    @property
    def report(self) -> Path:
        """The evaluate stage's folder (metrics.json, summary.md, tables, plots)."""
        return self.root / "report"

    def samples(self, model: str, ext: str) -> Path:
        return self.root / "samples" / f"{model}.{ext}"

    @staticmethod
    def checkpoint(stage_dir: str | os.PathLike) -> Path:
        """The fixed-name resume checkpoint in a training stage's folder: the one name used to
        save, to resume and to remove it."""
        return Path(stage_dir) / "checkpoint.pt"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def stage_dir(self, stage: str) -> Path:
        """The output folder of ``stage`` (:data:`pipeline.stages.STAGES`)."""
        from pipeline.stages import STAGES

        return self.root / STAGES[stage].folder


class DataError(ValueError):
    """An input file or ``dataset.h5`` is not what was expected; the message names the file
    (raised by :mod:`pipeline.data` and :mod:`pipeline.sources`)."""


class StageInputError(ValueError):
    """A stage's input is missing or not what it needs (the file, key or value is named)."""


class DiskFullError(OSError):
    """Writing a file failed because the disk (or a quota, or a file size limit) is full."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXT = ("No space left", "File too large", "Disk quota exceeded")
_NEARLY_FULL_BYTES = 64 << 20


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (or what caused it) is a write failure for lack of space in ``folder``.

    An errno or message that says so counts. torch's writer gives no reason ("iostream error",
    "unexpected pos ..."), so an OSError or RuntimeError raised while writing counts too when
    the filesystem really has under 64 MiB free.
    """
    io_error = False
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _FULL_TEXT):
            return True
        io_error = io_error or isinstance(exc, (OSError, RuntimeError))
        exc = exc.__cause__ or exc.__context__
    if io_error:
        import shutil

        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``suffix`` is kept at the end of the temporary name (some writers look at it).

    Raises:
        DiskFullError: the write failed for lack of space (ENOSPC, EDQUOT, EFBIG, or h5py's
            and torch's wrappers of them; torch's reason-less write errors count only when the
            filesystem has under 64 MiB free); the message names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and _is_disk_full(exc, path.parent):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {path} (nothing was replaced; free space and re-run): {str(exc)[:300]}",
            ) from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Mapping) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object; raises ``ValueError`` naming the file when it is not valid JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 picture.

    Args:
        images: float array (N, C, H, W), C = 1 (gray), 3 (RGB) or 4 (RGBA), values in [0, 1]
            (clipped), N <= nrow * ncol.
        nrow: images per row; rows = ceil(N / nrow).
        pad: pixels of black between tiles.

    Returns:
        uint8 array (rows*(H+pad)+pad, nrow*(W+pad)+pad) for C = 1, else (..., ..., C).

    Raises:
        ValueError: another rank or channel count.
    """
    imgs = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3, 4):
        raise ValueError(f"image_grid expects (N, C, H, W) with C in 1, 3, 4, got {imgs.shape}")
    n, ch, h, w = imgs.shape
    rows = -(-n // nrow)
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, ch), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + h, x : x + w] = np.round(imgs[i].transpose(1, 2, 0) * 255).astype(np.uint8)
    return out[..., 0] if ch == 1 else out


def save_grid_png(path: str | os.PathLike, images: np.ndarray, nrow: int = 10, scale: int = 2) -> None:
    """Save ``images`` (N, C, H, W) in [0, 1] (C = 1, 3 or 4) as a PNG grid, upscaled ``scale``
    times, atomically."""
    from PIL import Image

    grid = image_grid(images, nrow)
    img = Image.fromarray(grid, mode={2: "L", 3: {3: "RGB", 4: "RGBA"}.get(grid.shape[-1])}[grid.ndim])
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
