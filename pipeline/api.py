"""A finished run, or its export, from Python: its sample sets and metrics, new samples, and the
VQ-VAE's encoder and decoder.

    from pipeline.api import Run

    run = Run.open("results/default")              # or a folder written by `python -m pipeline export`
    run.sets                                        # ['pixelcnn', 'pixelcnn_ag1.5', ...]
    run.metrics["sets"]["diffusion_dpmsde_ag2"]["headline_fd_ratio"]
    x = run.sample("diffusion_dpmsde_ag2", n=16, seed=0)     # float32 (16, 1, 28, 28) in [0, 1]
    z = run.encode(x)                               # {"codes": (16, 7, 7), "latents": ..., "encodings": ...}
    y = run.decode(codes=z["codes"])                # float32 (16, 1, 28, 28) in [0, 1]

Drawing calls the sample stage's own function (:func:`pipeline.sample.draw_set`) with the run's
config, so a set, seed and N give the same images as ``python -m pipeline sample`` with
``sample.seed`` and ``sample.num_samples`` set to them; encoding calls latent extraction's
(:func:`pipeline.latents.encode_batch`). No second implementation. An export opens the same way
(its ``model.safetensors`` files load through :mod:`pipeline.checkpoint` without unpickling).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipeline.config import deep_merge, load_default
from pipeline.io import RunPaths, read_json
from pipeline.stages import TABLE

__all__ = ["Run", "run_config"]


def run_config(root: str | os.PathLike) -> dict:
    """The resolved config of a run folder: an export's ``config.yaml``, else the packaged
    defaults updated by every stage's ``<stage>/config.yaml`` (each holds the top-level keys and
    the sections that stage read), in chain order.

    Raises:
        FileNotFoundError: the folder holds no stage's config (not a run).
    """
    root = Path(root)
    if (root / "config.yaml").is_file():
        return yaml.safe_load((root / "config.yaml").read_text())
    cfg, found = load_default(), False
    for stage in TABLE:
        path = root / stage.folder / "config.yaml"
        if path.is_file():
            cfg, found = deep_merge(cfg, yaml.safe_load(path.read_text()) or {}), True
    if not found:
        raise FileNotFoundError(f"{root} is not a run folder (no <stage>/config.yaml) nor an export")
    return cfg


class Run:
    """A run folder (or an export) opened for use from Python.

    Args:
        root: the folder.
        config: its resolved config (:func:`run_config`).
        device: "cpu", "cuda" or "auto" (as the config key ``device``).
    """

    def __init__(self, root: Path, config: Mapping[str, Any], device: str = "cpu"):
        from pipeline.runtime import resolve_device

        self.root, self.config = Path(root), dict(config)
        self.device = resolve_device(device)
        self.paths = RunPaths(self.root)
        self._vqvae = None

    @classmethod
    def open(cls, path: str | os.PathLike, device: str = "cpu") -> Run:
        """Open a run folder (``results/<run>``) or an export folder.

        Raises:
            FileNotFoundError: not a run nor an export.
        """
        return cls(Path(path), run_config(path), device)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, sets={self.sets})"

    @property
    def sets(self) -> list[str]:
        """The sample sets of the run's config (``sample.sets``)."""
        return list(self.config["sample"]["sets"])

    @property
    def metrics(self) -> dict | None:
        """The evaluate stage's ``report/metrics.json`` (keys in docs/reference.md), or None
        before the evaluate stage ran."""
        path = self.paths.report / "metrics.json"
        return read_json(path) if path.is_file() else None

    def sample(self, name: str, n: int | None = None, seed: int | None = None) -> np.ndarray:
        """Draw sample set ``name`` (any name of the grammar in :mod:`pipeline.sets`, not only the
        run's own sets, as long as the prior it needs was trained).

        Args:
            n: how many images (default ``sample.num_samples``).
            seed: the sampler's seed (default ``sample.seed``).

        Returns:
            float32 (n, C, H, W) (or (n, C, D, H, W) for volumes) in [0, 1]: equal to
            ``samples/<name>.npy`` of ``python -m pipeline sample`` run with the same set, seed
            and N (and ``sample.batch_size``) on the same device.

        Raises:
            ValueError: a name outside the grammar.
            pipeline.checkpoint.CheckpointError: the prior of the set was not trained.
        """
        from pipeline.sample import draw_set
        from pipeline.sets import parse_sample_set

        spec = parse_sample_set(name)
        section = dict(self.config["sample"])
        if n is not None:
            section["num_samples"] = int(n)
            if section.get("ddpm_num_samples"):
                section["ddpm_num_samples"] = int(n)
        if seed is not None:
            section["seed"] = int(seed)
        cfg = {**self.config, "sample": section}
        return draw_set(cfg, self.paths, spec, self.device)[0]

    @property
    def vqvae(self) -> torch.nn.Module:
        """The run's VQ-VAE (eval mode, on the run's device)."""
        if self._vqvae is None:
            from pipeline.checkpoint import load_model

            self._vqvae = load_model(self.paths.vqvae_model, device=self.device)[0]
        return self._vqvae

    def encode(self, images: np.ndarray | torch.Tensor, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Images float (N, C, H, W) in [0, 1] (numpy or torch) -> {"codes": int64 (N, h, w),
        "latents": float32 (N, D, h, w) (the codebook vectors of the codes), "encodings": float32
        (N, D, h, w) (z_e)}, in batches of ``latents.batch_size``, as ``latents.h5`` holds them.

        Raises:
            ValueError: the image sides are not multiples of the VQ-VAE's ``downsample``.
        """
        from pipeline.latents import encode_batch

        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        bs = int(batch_size or self.config["latents"]["batch_size"])
        parts = [encode_batch(self.vqvae, x[s : s + bs], self.device) for s in range(0, len(x), bs)]
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        out["codes"] = out["codes"].astype(np.int64)
        return out

    def decode(self, codes: np.ndarray | None = None, latents: np.ndarray | None = None) -> np.ndarray:
        """Codes int (N, h, w) in [0, K), or latents float (N, D, h, w), -> images float32
        (N, C, H, W) in [0, 1] through the VQ-VAE's decoder (latents are decoded as they are,
        without snapping them to the codebook).

        Raises:
            ValueError: neither or both given.
        """
        if (codes is None) == (latents is None):
            raise ValueError("decode takes codes or latents (one of them)")
        with torch.no_grad():
            if codes is not None:
                out = self.vqvae.decode_codes(torch.as_tensor(np.asarray(codes)).long().to(self.device))
            else:
                out = self.vqvae.decode(torch.as_tensor(np.asarray(latents, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()
