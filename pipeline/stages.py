"""The stage registry: stage name -> top-level callable ``fn(cfg, run_dir, threads=None, **kw)``.

Callables are imported lazily (``python -m pipeline timings`` does not import torch) and are
plain module-level functions, so they pickle by reference: the SLURM dispatcher hands the
same callable to submitit unchanged.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

from pipeline.io import RunPaths, read_json, write_json

__all__ = ["STAGES", "get_stage", "collect_timings"]

STAGES: dict[str, str] = {
    "prepare_data": "pipeline.data:prepare_data",
    "train_vqvae": "pipeline.train:train_vqvae",
    "extract_latents": "pipeline.latents:extract_latents",
    "train_pixelcnn": "pipeline.train:train_pixelcnn",
    "train_diffusion": "pipeline.train:train_diffusion",
    "train_classifier": "pipeline.train:train_classifier",
    "train_pixel_diffusion": "pipeline.train:train_pixel_diffusion",
    "sample": "pipeline.sample:sample",
    "evaluate": "pipeline.evaluate:evaluate",
}


def get_stage(name: str) -> Callable:
    """The callable of stage ``name``.

    Raises:
        KeyError: unknown stage (the valid names are listed).
    """
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; expected one of {list(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def collect_timings(run_dir: str | os.PathLike) -> dict:
    """Sum the ``wall_time_s`` of every stage record of a run into ``<run>/timings.json``.

    Reads ``data/``, ``vqvae/``, ``latents/``, ``classifier/``, ``pixelcnn/``, ``diffusion/``,
    ``pixel_diffusion/``, the variants' ``pixelcnn_*/`` and ``diffusion_*/`` ``metrics.json``,
    ``report/record.json`` and ``samples/<set>.json``; missing records are skipped.

    Returns:
        {"stages": {name: seconds}, "total_s": seconds}.
    """
    paths = RunPaths(run_dir)
    stages: dict[str, float] = {}
    for folder, name in (("data", "prepare_data"), ("vqvae", "train_vqvae"), ("latents", "extract_latents"), ("classifier", "train_classifier"), ("pixelcnn", "train_pixelcnn"), ("diffusion", "train_diffusion"), ("pixel_diffusion", "train_pixel_diffusion"), ("report", "evaluate")):
        f = paths.root / folder / ("record.json" if folder == "report" else "metrics.json")
        if f.is_file():
            stages[name] = float(read_json(f)["wall_time_s"])
    # the priors' variants: pixelcnn_cond/, diffusion_b4/, ... (train_<folder>)
    for prefix in ("pixelcnn_", "diffusion_"):
        for f in sorted(paths.root.glob(f"{prefix}*/metrics.json")):
            stages[f"train_{f.parent.name}"] = float(read_json(f)["wall_time_s"])
    for f in sorted((paths.root / "samples").glob("*.json")):
        stages[f"sample_{f.stem}"] = float(read_json(f)["wall_time_s"])
    result = {"stages": stages, "total_s": round(sum(stages.values()), 3)}
    write_json(paths.timings, result)
    return result
