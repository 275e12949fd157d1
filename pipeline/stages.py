"""The stage table: every stage's name, callable, config sections, output folder, record file and
whether it runs as a SLURM job. The one place the list of stages is written.

Everything that needs the list derives it from here: :data:`pipeline.config.STAGE_SECTIONS`
(what each stage reads, hence the Snakefile's params and ``config.yaml`` of every stage),
:func:`pipeline.timings.collect_timings` (where each stage's record is), the CLI's stage choices,
:meth:`pipeline.io.RunPaths.stage_dir`, and the tests that check the Snakefile's rules,
``cluster/bigred200/run_stage.sbatch`` and the profiles' ``set-threads`` against it.

A leaf module (standard library only): callables are imported lazily (``python -m pipeline
timings`` does not import torch) and are plain module-level functions, so they pickle by
reference: the SLURM dispatcher hands the same callable to submitit unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Stage", "TABLE", "STAGES", "get_stage"]


@dataclass(frozen=True)
class Stage:
    """One stage of the chain.

    Attributes:
        name: the stage, e.g. ``train_diffusion`` (``python -m pipeline <name>``, the Snakemake rule).
        target: ``"module:function"`` of its callable ``fn(cfg, run_dir, threads=None, **kw)``.
        sections: the config sections it reads besides the top-level keys.
        folder: its output folder under ``results/<run>/``.
        record: its stage record in that folder (``<set>.json`` per sample set for ``sample``).
        slurm: submitted as a SLURM job when ``slurm.enabled`` (else it runs where Snakemake runs).
    """

    name: str
    target: str
    sections: tuple[str, ...]
    folder: str
    record: str
    slurm: bool


TABLE: tuple[Stage, ...] = (
    Stage("prepare_data", "pipeline.data:prepare_data", ("data",), "data", "metrics.json", False),
    Stage("train_vqvae", "pipeline.train:train_vqvae", ("vqvae",), "vqvae", "metrics.json", True),
    Stage("extract_latents", "pipeline.latents:extract_latents", ("latents",), "latents", "metrics.json", True),
    Stage("train_classifier", "pipeline.train:train_classifier", ("classifier",), "classifier", "metrics.json", True),
    Stage("train_simclr", "pipeline.train:train_simclr", ("simclr",), "simclr", "metrics.json", True),
    Stage("train_pixelcnn", "pipeline.train:train_pixelcnn", ("pixelcnn",), "pixelcnn", "metrics.json", True),
    Stage("train_diffusion", "pipeline.train:train_diffusion", ("diffusion",), "diffusion", "metrics.json", True),
    Stage(
        "train_pixel_diffusion",
        "pipeline.train:train_pixel_diffusion",
        ("pixel_diffusion",),
        "pixel_diffusion",
        "metrics.json",
        True,
    ),
    Stage("sample", "pipeline.sample:sample", ("sample",), "samples", "<set>.json", True),
    # the sample sets to judge are sample.sets
    Stage("evaluate", "pipeline.evaluate:evaluate", ("evaluate", "sample"), "report", "record.json", True),
)

#: name -> :class:`Stage`, in chain order.
STAGES: dict[str, Stage] = {s.name: s for s in TABLE}


def get_stage(name: str) -> Callable:
    """The callable of stage ``name``.

    Raises:
        KeyError: unknown stage (the valid names are listed).
    """
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; expected one of {list(STAGES)}")
    module, func = STAGES[name].target.split(":")
    return getattr(importlib.import_module(module), func)
