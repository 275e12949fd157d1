"""``timings.json``: the wall time of every stage of a run, read from the stage records."""

from __future__ import annotations

import os

from pipeline.io import RunPaths, read_json, write_json
from pipeline.stages import TABLE

__all__ = ["collect_timings"]

#: the priors whose model variants (``<prior>_cond/``, ``<prior>_b<f>/``) are timed as ``train_<folder>``
VARIANT_PRIORS = ("pixelcnn", "diffusion")


def collect_timings(run_dir: str | os.PathLike) -> dict:
    """Sum the ``wall_time_s`` of every stage record of a run into ``<run>/timings.json``.

    Reads each stage's record (:data:`pipeline.stages.TABLE`: ``<folder>/<record>``), the priors'
    variants' ``pixelcnn_*/`` and ``diffusion_*/`` ``metrics.json`` and every ``samples/<set>.json``;
    missing records are skipped.

    Returns:
        {"stages": {name: seconds}, "total_s": seconds}.
    """
    paths = RunPaths(run_dir)
    stages: dict[str, float] = {}
    for stage in TABLE:
        if stage.name == "sample":
            continue
        f = paths.stage_dir(stage.name) / stage.record
        if f.is_file():
            stages[stage.name] = float(read_json(f)["wall_time_s"])
    for prefix in VARIANT_PRIORS:
        for f in sorted(paths.root.glob(f"{prefix}_*/metrics.json")):
            stages[f"train_{f.parent.name}"] = float(read_json(f)["wall_time_s"])
    for f in sorted(paths.stage_dir("sample").glob("*.json")):
        stages[f"sample_{f.stem}"] = float(read_json(f)["wall_time_s"])
    result = {"stages": stages, "total_s": round(sum(stages.values()), 3)}
    write_json(paths.timings, result)
    return result
