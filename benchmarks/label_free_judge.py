"""Validation of the label-free judge on MNIST, where both judges exist.

    python benchmarks/label_free_judge.py --run results/judgeval [--threads 2] [--set simclr.steps=900]

On a finished run (labelled data, trained classifier, sample sets drawn), this trains the
label-free encoder (``python -m pipeline train_simclr``, skipped if ``simclr/model.pt`` exists)
and runs the evaluate stage with ``evaluate.judge=both``, so every set and reference row is
judged by the digit classifier and by the SimCLR features alike (``report/metrics.json``). It
prints, per row, FD / floor under each judge and the label-free precision, recall, density and
coverage, then Spearman's rank correlation (``scipy.stats.spearmanr``) of the two FD / floor
columns over all sample sets, and over the sets plus the reference rows (blurred_real, noise).
It exits 1 if rho over the sets is below ``--min-rho`` (0.9, the bar of issue #13). Every number comes from the stages.

The run used in docs/own-data.md is the default config with ten sample sets of spread quality
(``sample.sets`` listed there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="finished run on labelled data (classifier and sample sets)")
    p.add_argument("--configfile", action="append", default=[], help="the run's config file(s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-rho", type=float, default=0.9)
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. simclr.steps=900"
    )
    a = p.parse_args(argv)
    run = Path(a.run).resolve()
    cfg_files = a.configfile or [str(run / "samples" / "config.yaml")]
    base = [sys.executable, "-m", "pipeline"]
    common = ["--run", str(run), "--threads", str(a.threads)]
    for f in cfg_files:
        common += ["--configfile", f]
    for o in a.overrides:
        common += ["--set", o]
    if not (run / "simclr" / "model.pt").is_file():
        subprocess.run([*base, "train_simclr", *common], check=True, cwd=ROOT)
    subprocess.run([*base, "evaluate", *common, "--set", "evaluate.judge=both"], check=True, cwd=ROOT)
    m = json.loads((run / "report" / "metrics.json").read_text())
    from scipy.stats import spearmanr

    rows = {**m["references"], **m["sets"]}
    print("row\tclassifier FD/floor\tlabel-free FD/floor\tprecision\trecall\tdensity\tcoverage")
    for name, r in [("real_test", m["floor"]), *rows.items()]:
        print(
            f"{name}\t{r['fd_ratio']:.3f}\t{r['features_fd_ratio']:.3f}\t{r['features_precision']:.3f}\t"
            f"{r['features_recall']:.3f}\t{r['features_density']:.3f}\t{r['features_coverage']:.3f}"
        )
    sets = m["sets"]
    rho_sets = spearmanr([r["fd_ratio"] for r in sets.values()], [r["features_fd_ratio"] for r in sets.values()])[0]
    rho_all = spearmanr([r["fd_ratio"] for r in rows.values()], [r["features_fd_ratio"] for r in rows.values()])[0]
    print(f"Spearman rho over {len(sets)} sample sets: {rho_sets:.3f}")
    print(f"Spearman rho over {len(rows)} sets + reference rows: {rho_all:.3f}")
    print(f"encoder test view retrieval: {m['evaluation'].get('simclr_test_view_retrieval')}")
    ok = rho_sets >= a.min_rho
    print("PASS" if ok else f"FAIL: rho {rho_sets:.3f} < {a.min_rho}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
