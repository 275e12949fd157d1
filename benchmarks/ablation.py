"""One ablation: retrain one prior with config overrides on an existing run's data, VQ-VAE and
judge, draw its sample sets and evaluate them with the run's own evaluate stage.

    python benchmarks/ablation.py --base results/default --name v_pred \
        --set diffusion.prediction=v --sets diffusion_ddim [--stage train_diffusion] [--threads 2]

Makes ``results/ablation/<name>/`` with links to the base run's ``data/``, ``vqvae/`` and
``classifier/`` (and ``latents/`` unless a ``latents.*`` key is overridden, when it is re-extracted),
runs the training stage(s) the overrides touch, the ``sample`` stage for every set and the
``evaluate`` stage, and prints one TSV row per set: name, FD / floor, FD, class entropy,
duplicates, memorised, label accuracy, training seconds of the prior, the overrides, then
the label-free coverage and the noise check ("-" where a judge does not apply: 3D volumes and
unlabelled data have no classifier, so the label-free simclr/ is linked and judges). Every
number comes from the stages themselves (``report/metrics.json``); nothing is computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIOR_STAGE = {"pixelcnn": "train_pixelcnn", "diffusion": "train_diffusion", "pixel_diffusion": "train_pixel_diffusion"}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base", default="results/default", help="finished run whose data, VQ-VAE and classifier are reused"
    )
    p.add_argument("--name", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--configfile", action="append", default=[])
    p.add_argument("--sets", nargs="+", required=True, help="sample sets to draw and judge")
    p.add_argument(
        "--stage",
        action="append",
        default=None,
        help="training stage(s) to run (default: the priors of the sets; 'none': sample the base run's priors)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep an existing trained prior in the ablation folder")
    p.add_argument("--out", default=None, help="the ablation's run folder (default results/ablation/<name>)")
    a = p.parse_args(argv)

    base = (ROOT / a.base).resolve()
    out = Path(a.out).resolve() if a.out else ROOT / "results" / "ablation" / a.name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ablation.log"
    sections = {o.split("=", 1)[0].split(".")[0] for o in a.overrides}
    for folder in ("data", "vqvae", "classifier", "simclr") + (() if "latents" in sections else ("latents",)):
        link = out / folder
        if (base / folder).exists() and not link.exists():  # simclr/: the label-free judge (3D, own data)
            os.symlink(base / folder, link)
    common = (
        ["--run", str(out), "--threads", str(a.threads)]
        + sum((["--configfile", c] for c in a.configfile), [])
        + sum((["--set", o] for o in a.overrides), [])
    )
    common += ["--set", "sample.sets=[" + ",".join(a.sets) + "]"]
    py = [sys.executable, "-m", "pipeline"]
    if "latents" in sections and not (out / "latents" / "latents.h5").exists():
        run(py + ["extract_latents"] + common, log)
    from pipeline.sets import parse_sample_set

    specs = {s: parse_sample_set(s) for s in a.sets}
    # the model folders the sets are drawn from: pixelcnn/, diffusion_cond/, pixelcnn_b4/, ...
    folders = sorted({sp.model_folder for sp in specs.values()})
    prior_of = {sp.model_folder: ("pixel_diffusion" if sp.prior == "pixeldiff" else sp.prior) for sp in specs.values()}
    if a.stage == ["none"]:  # sample the base run's own priors
        for folder in folders:
            if not (out / folder).exists():
                os.symlink(base / folder, out / folder)
    else:
        wanted = set(a.stage) if a.stage else {PRIOR_STAGE[prior_of[f]] for f in folders}
        for folder in folders:
            stage = PRIOR_STAGE[prior_of[folder]]
            if stage not in wanted or (a.reuse and (out / folder / "model.pt").exists()):
                continue
            spec = next(sp for sp in specs.values() if sp.model_folder == folder)
            flags = (["--conditional"] if spec.conditional else []) + (
                ["--budget", f"{spec.budget:g}"] if spec.budget not in (None, 1.0) else []
            )
            run(py + [stage] + flags + common, log)
    for s in a.sets:
        run(py + ["sample", "--sample-set", s] + common, log)
    run(py + ["evaluate"] + common, log)
    m = json.loads((out / "report" / "metrics.json").read_text())
    for s in a.sets:
        r = m["sets"][s]
        secs = r.get("prior_train_seconds")

        def f3(key, r=r):
            return "-" if r.get(key) is None else f"{r[key]:.3f}"

        print(
            "\t".join(
                [
                    a.name,
                    s,
                    f"{r['headline_fd_ratio']:.2f}",
                    f"{r['headline_fd']:.3f}",
                    f3("class_entropy"),
                    f3("duplicates"),
                    f3("memorised"),
                    f3("label_accuracy"),
                    f"{secs}",
                    " ".join(a.overrides),
                    f"coverage {f3('features_coverage')} noise check {r.get('noise_check')}",
                ]
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
