"""``python -m pipeline export --run results/<run> --out <dir>``: a finished run's trained models
as safetensors files with a model card, in a layout the Python API opens like a run.

What the folder holds (every file written atomically)::

    <out>/README.md                    the model card: YAML front matter (the Hugging Face model
                                       card convention) and the data and its hash, the config,
                                       the commit, the evaluate stage's metrics, the sample grids,
                                       licence, intended use and the commands that made it
    <out>/config.yaml                  the run's resolved config (:func:`pipeline.api.run_config`)
    <out>/<model>/model.safetensors    the weights (raw, EMA, the autoguidance guide) and
    <out>/<model>/model.json           kind, constructor args and the other entries of model.pt
                                       (:func:`pipeline.checkpoint.export_model`)
    <out>/samples/<set>.png            the sample grids
    <out>/report/metrics.json          the evaluate stage's report
    <out>/data/info.json               the dataset's shape, classes, source and source hashes

``pipeline.api.Run.open(<out>)`` opens it as it opens the run and draws bit-identical samples for
the same set, seed and N; loading it runs no pickled code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from pipeline.io import atomic_write_text, read_json

__all__ = ["export_run", "model_card", "main"]

#: what each model folder is, in the card's words
_WHAT = {
    "vqvae": "VQ-VAE (van den Oord et al. 2017): images to a grid of codebook indices and back",
    "pixelcnn": "gated PixelCNN prior over the code grids (van den Oord et al. 2016), unconditional",
    "diffusion": "latent diffusion (Ho et al. 2020; Rombach et al. 2022) over the VQ-VAE's latents, unconditional",
    "pixelcnn_cond": "class-conditional PixelCNN prior (classifier-free guidance)",
    "diffusion_cond": "class-conditional latent diffusion model (classifier-free guidance)",
    "pixel_diffusion": "pixel-space diffusion baseline",
    "classifier": "the judge: a digit classifier trained on the run's train split",
    "simclr": "the label-free judge: a SimCLR encoder trained on the run's train split",
}


def _model_folders(run: Path) -> list[str]:
    return sorted(p.parent.name for p in run.glob("*/model.pt"))


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Export every trained model of ``run_dir`` (each ``<folder>/model.pt``) and the run's
    config, report, grids and data facts into ``out_dir``, then write the model card.

    Returns:
        The written weights files.

    Raises:
        FileNotFoundError: ``run_dir`` has no trained model.
        pipeline.checkpoint.CheckpointError: a model file that is not ours.
    """
    from pipeline.api import run_config
    from pipeline.checkpoint import export_model

    run, out = Path(run_dir), Path(out_dir)
    folders = _model_folders(run)
    if not folders:
        raise FileNotFoundError(f"{run} has no trained model (<folder>/model.pt); run the pipeline first")
    written = [export_model(run / f / "model.pt", out / f) for f in folders]
    cfg = run_config(run)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    for png in sorted((run / "samples").glob("*.png")):
        (out / "samples").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, out / "samples" / png.name)
    report = run / "report" / "metrics.json"
    if report.is_file():
        (out / "report").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, out / "report" / "metrics.json")
    info = _data_info(run)
    atomic_write_text(out / "data" / "info.json", json.dumps(info, indent=1) + "\n")
    atomic_write_text(out / "README.md", model_card(run, cfg, folders, info))
    return written


def _data_info(run: Path) -> dict:
    """The dataset's facts for the card and the API: shape, classes, split sizes, source, hashes."""
    info: dict = {}
    record = run / "data" / "metrics.json"
    if record.is_file():
        m = read_json(record)
        keys = ("source", "image_shape", "color", "num_classes", "num_train", "num_test", "sha256")
        info = {k: m.get(k) for k in keys}
    dataset = run / "data" / "dataset.h5"
    if dataset.is_file():
        from pipeline.io import sha256_file

        info["dataset_h5_sha256"] = sha256_file(dataset)
    return info


def _commit(run: Path) -> str:
    report = run / "report" / "metrics.json"
    if report.is_file():
        prov = read_json(report).get("provenance") or {}
        return f"{prov.get('commit', 'unknown')}{' (with uncommitted changes)' if prov.get('dirty') else ''}"
    return "unknown (no report)"


def _metrics_table(run: Path) -> tuple[str, list[dict]]:
    report = run / "report" / "metrics.json"
    if not report.is_file():
        return "No evaluation: the evaluate stage has not run.\n", []
    m = read_json(report)
    judge = m["evaluation"]["judges"][0]
    rows = [
        "| set | FD / floor | coverage | memorised | noise check |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    index = []
    for name, row in m["sets"].items():
        cov = row.get("features_coverage", row.get("coverage"))
        ratio = row.get("headline_fd_ratio")
        rows.append(
            f"| `{name}` | {ratio:.2f} | {cov:.2f} | {row.get('memorised', 0):.3f} | {row.get('noise_check')} |"
            if ratio is not None and cov is not None
            else f"| `{name}` | – | – | – | {row.get('noise_check')} |"
        )
        index.append({"type": "fd_over_floor", "name": f"FD / floor, {name}", "value": ratio})
    floor = m["floor"].get("headline_fd")
    text = (
        f"Judged by the evaluate stage (judge: {judge}; N = {m['evaluation']['num_images']} images per set; FD "
        f"divided by that of N real test images, {floor:.3f}, so real data scores 1; lower is better):\n\n"
        + "\n".join(rows)
        + "\n"
    )
    return text, index


def model_card(run: Path, cfg: Mapping, folders: list[str], info: Mapping) -> str:
    """The export's ``README.md``: YAML front matter in the Hugging Face model card convention
    (license, library, tags, pipeline tag, datasets, metrics) and the card's sections."""
    metrics_text, metrics = _metrics_table(run)
    source = info.get("source") or cfg["data"]["source"]
    front = {
        "license": "mit",
        "library_name": "vq-latent-pipeline",
        "pipeline_tag": "unconditional-image-generation",
        "tags": ["vq-vae", "pixelcnn", "latent-diffusion", "autoguidance", "safetensors"],
        "datasets": [str(source)],
        "metrics": ["fd_over_floor"],
        "model-index": [
            {
                "name": run.name,
                "results": [
                    {
                        "task": {"type": "unconditional-image-generation"},
                        "dataset": {"name": str(source), "type": str(source)},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    models = "\n".join(
        f"| `{f}/` | {_WHAT.get(f.split('_b')[0], 'a prior trained at another budget')} |" for f in folders
    )
    hashes = "\n".join(f"- `{name}`: sha256 `{digest}`" for name, digest in (info.get("sha256") or {}).items())
    grids = "\n".join(f"![{p.stem}](samples/{p.name})" for p in sorted((run / "samples").glob("*.png"))[:4])
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# `{run.name}`: VQ-VAE, PixelCNN prior and latent diffusion (vq-latent-pipeline)\n\n"
        + "Generative models of images trained by vq-latent-pipeline from the run folder "
        + f"`{run}`.\n\n| folder | model |\n| --- | --- |\n{models}\n\n"
        + "## Data\n\n"
        + f"Source `{source}`: {info.get('num_train')} train and {info.get('num_test')} test images of shape "
        + f"{info.get('image_shape')} ({info.get('num_classes') or 'no'} classes). The source files:\n\n"
        + (hashes or "- (no hash recorded)")
        + f"\n\n`dataset.h5` sha256 `{info.get('dataset_h5_sha256', 'unknown')}`.\n\n"
        + "## Training\n\n"
        + f"The resolved config is `config.yaml`; the code is at commit `{_commit(run)}`. Every model's "
        + "constructor arguments and training metrics are in its `model.json`.\n\n"
        + "## Evaluation\n\n"
        + metrics_text
        + "\n## Samples\n\n"
        + (grids or "(no sample grids)")
        + "\n\n## How to use\n\n```python\nfrom pipeline.api import Run\n\n"
        + "run = Run.open('<this folder>')\n"
        + f"x = run.sample('{cfg['sample']['sets'][-1]}', n=16, seed=0)  # float32 (16, C, H, W) in [0, 1]\n```\n\n"
        + "Loading reads safetensors and JSON only (no pickled code).\n\n"
        + "## Intended use and limits\n\n"
        + "Research on generative models and their evaluation: reproducing the study's comparison of a PixelCNN "
        + "prior with latent diffusion, and a starting point for new runs. The models learn only the training "
        + "data's distribution; they are not for clinical or other decisions about people, and their samples are "
        + "not data.\n\n"
        + "## Licence\n\n"
        + "The weights and code: MIT. The training data keeps the terms of its source.\n\n"
        + "## Commands that made it\n\n```bash\n"
        + "snakemake --cores 2 --configfile config.yaml   # this folder's config.yaml: the run's resolved config\n"
        + f"python -m pipeline export --run {run} --out <this folder>\n```\n"
    )


def main(argv: list[str]) -> int:
    """``python -m pipeline export --run R --out D``: 0 on success, 1 with one line on an error."""
    from pipeline.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="python -m pipeline export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the run folder (results/<run>)")
    p.add_argument("--out", required=True, help="the export folder (created; files in it are replaced)")
    args = p.parse_args(argv)
    try:
        written = export_run(args.run, args.out)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"error: export: {exc}", file=sys.stderr)
        return 1
    print(f"export: {len(written)} model(s) to {args.out}: " + ", ".join(str(w) for w in written))
    return 0
