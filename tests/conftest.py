"""Shared fixtures: the tiny config and one tiny run made in-process by the real stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return resolve([TINY])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_cfg) -> Path:
    """A complete tiny run (every stage, every sample set, the evaluation) in a temporary results folder."""
    from pipeline.stages import get_stage
    from pipeline.timings import collect_timings

    run = tmp_path_factory.mktemp("results") / "tiny"
    for stage in (
        "prepare_data",
        "train_vqvae",
        "extract_latents",
        "train_classifier",
        "train_pixelcnn",
        "train_diffusion",
    ):
        get_stage(stage)(tiny_cfg, str(run), threads=2)
    for stage in ("train_pixelcnn", "train_diffusion"):  # the class-conditional variants, for the _g<s> sets
        get_stage(stage)(tiny_cfg, str(run), threads=2, conditional=True)
    for model in tiny_cfg["sample"]["sets"]:
        get_stage("sample")(tiny_cfg, str(run), sample_set=model, threads=2)
    get_stage("evaluate")(tiny_cfg, str(run), threads=2)
    collect_timings(run)
    return run
