"""Does the judge rank a known ladder? Spearman rho of every candidate score (issue #24).

    python benchmarks/judge_ladder.py --run results/anatomy3d --configfile pipeline/configs/anatomy3d.yaml
    python benchmarks/judge_ladder.py --run results/default                   # the 2D ladder

On a finished run it builds rungs whose order is known and judges each with the evaluate
stage's own judges (:func:`pipeline.evaluate.build_judging`, :func:`pipeline.evaluate.score_set`),
against the run's train images, N = ``evaluate.num_images``:

* four degradation families of the real test images, each at three or four levels (level 0 = the real
  test images themselves): Gaussian **blur** (std in voxels or pixels), additive Gaussian
  **noise** (std in [0, 1] units, clipped), **intensity** scaled down (the darker, flatter
  volumes 3D diffusion drew), and **elastic** warps (MONAI ``Rand3DElastic`` /
  ``Rand2DElastic``, seeded). In 3D the warps start at twice ``data.volume_elastic``'s 20
  voxels: the train and test volumes are themselves warped copies up to that magnitude, so a
  warp inside it is no degradation (measured: magnitudes 2, 4 and 8 left every score unmoved);
* the run's diffusion model at training budgets 1 and ``--budgets`` (fractions, default 0.5,
  0.25 and 0.01, the last one untrained; trained with ``python -m pipeline train_diffusion
  --budget f`` and sampled as ``<trained>_b<f>`` if missing, ``--trained`` the fully trained
  model's set, ``diffusion_dpmsde`` by default): more training ranks better. A model's set of
  k N samples is judged as the evaluate stage judges it, the mean of k draws of N.

Candidate scores, each turned so that lower is better: the label-free (or classifier) FD,
1 - coverage, 1 - precision, 1 - recall, -density (Naeem et al. 2020), the noise check's
``1 - structure``, MONAI's ``MMDMetric`` (Gretton et al. 2012, linear kernel, unbiased) on the
judge's features and on the voxels, the intensity histogram's W1 (3D), 1 - MS-SSIM to the
nearest train volume (3D), and combinations (:data:`COMBINATIONS`). It prints every rung's
row, then each candidate's Spearman rho against the known order per family, their mean and
their minimum. ``frd-score`` (Fréchet Radiomics Distance) was a candidate; it needs
``pyradiomics``, which has no wheel for Python 3.11 and does not build here.

For 2D runs it also prints the noise check's verdict per rung: the legible rungs must pass, the
noise row and the untrained model must not.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: family -> levels 1..k (level 0 is the real test images)
LEVELS = {
    "blur": (0.5, 1.0, 1.5, 2.5),  # Gaussian std, voxels / pixels
    "noise": (0.03, 0.1, 0.3),  # additive Gaussian std, [0, 1] units
    "intensity": (0.9, 0.75, 0.5),  # x * s
    "elastic": (40.0, 80.0, 160.0),  # 3D: Rand3DElastic magnitude, voxels, smoothing sigma 5
}
#: 2D elastic levels: Rand2DElastic magnitude (pixels) on a 7-pixel control grid
ELASTIC_2D = (1.0, 2.0, 4.0)


def degrade(x: torch.Tensor, family: str, level: float, seed: int = 0) -> torch.Tensor:
    """float (N, C, *S) in [0, 1] -> the same degraded, in [0, 1] (seeded)."""
    from pipeline.augment import gaussian_blur

    g = torch.Generator().manual_seed(seed)
    if family == "blur":
        return gaussian_blur(x, level)
    if family == "noise":
        return (x + level * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if family == "intensity":
        return x * level
    from monai.transforms import Rand2DElastic, Rand3DElastic

    if x.dim() == 5:
        t = Rand3DElastic(prob=1.0, sigma_range=(5, 5), magnitude_range=(level, level), padding_mode="zeros")
    else:
        t = Rand2DElastic(prob=1.0, spacing=(7, 7), magnitude_range=(level, level), padding_mode="zeros")
    t.set_random_state(seed)
    return torch.stack([torch.as_tensor(t(v)).float() for v in x]).clamp(0, 1)


def mmd(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """MONAI's unbiased linear-kernel MMD of two sets of the same size (rows = samples)."""
    from monai.metrics import MMDMetric

    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    n = min(len(a), len(b))
    return float(MMDMetric()(a[:n].reshape(n, 1, -1), b[:n].reshape(n, 1, -1)))


#: combinations of two scores (each already "lower is better"), tried beside the single scores
COMBINATIONS = {
    "log FD/floor + (1 - structure)": lambda r: math.log(max(r["fd_ratio"], 1e-9)) + r["1-structure"],
    "FD/floor x (1 + 1 - coverage)": lambda r: r["fd_ratio"] * (2 - r["coverage"]),
}


def candidates(
    row: dict, judging, space: str, x: torch.Tensor, feats: np.ndarray, floor_row: dict, noise_row: dict
) -> dict:
    """The candidate scores (lower is better) of one evaluate-stage row; ``feats``: the judge's
    features of its first n images ``x``."""
    from pipeline.evaluate import noise_check

    pre = "features_" if space == "features" else ""
    fd_key = "features_fd" if space == "features" else "fd_train"
    cov = row[f"{pre}coverage"]
    structure, _ = noise_check(cov, noise_row[f"{pre}coverage"], floor_row[f"{pre}coverage"])
    n = len(x)
    out = {
        "FD": row[fd_key],
        "fd_ratio": row["headline_fd_ratio"],
        "1-coverage": 1 - cov,
        "1-precision": 1 - row[f"{pre}precision"],
        "1-recall": 1 - row[f"{pre}recall"],
        "1-structure": 1 - (structure if structure is not None else 0.0),
        "MMD features (MONAI)": mmd(judging.spaces[space].train[:n], feats),
        "MMD voxels (MONAI)": mmd(judging.train_x[:n].flatten(1), x[:n].flatten(1)),
    }
    if f"{pre}density" in row:  # the label-free judge reports density; the classifier does not
        out["-density"] = -row[f"{pre}density"]
    if "intensity_w1" in row:
        out["intensity W1"] = row["intensity_w1"]
        out["1-MS-SSIM nearest train"] = 1 - row["ms_ssim_nearest_train"]
    for name, f in COMBINATIONS.items():
        out[name] = f(out | {"coverage": cov})
    return out


#: the coverage k of the noise-check candidates (the evaluate stage's precision_recall_k is 3)
CHECK_KS = (3, 5, 10)


def structure_candidates(
    feats: dict[str, np.ndarray], train: np.ndarray, fds: dict[str, float], pixels=None, pixel_train=None
) -> dict:
    """Noise-check candidates per rung: coverage at each k of :data:`CHECK_KS` placed between the
    noise row (0) and the real test images (1), the same on log FD, and their maximum.

    Args:
        feats: rung -> judge features (n, F), with "real_test" and "noise" among them.
        train: the first n train features (the real k-NN balls).
        fds: rung -> FD against the train features (the floor is real_test's).
        pixels, pixel_train: 2D only: rung -> pooled pixels (:func:`pipeline.evaluate.pooled_pixels`)
            and the first n train images pooled: the evaluate stage's 2D check.
    """
    from pipeline.evaluate import precision_recall

    out: dict[str, dict] = {name: {} for name in feats}
    for k in CHECK_KS:
        cov = {name: precision_recall(train, f, k)["coverage"] for name, f in feats.items()}
        lo, hi = cov["noise"], cov["real_test"]
        for name in feats:
            out[name][f"coverage k={k}"] = (cov[name] - lo) / (hi - lo) if hi - lo > 1e-9 else float("nan")
    lo, hi = math.log(fds["noise"]), math.log(fds["real_test"])
    for name in feats:
        out[name]["log FD"] = (lo - math.log(fds[name])) / (lo - hi)
        out[name]["max(coverage k=3, log FD)"] = max(out[name]["coverage k=3"], out[name]["log FD"])
    if pixels is not None:
        cov = {name: precision_recall(pixel_train, p, 3)["coverage"] for name, p in pixels.items()}
        lo, hi = cov["noise"], cov["real_test"]
        for name in feats:
            out[name]["pooled pixels k=3 (the 2D check)"] = (cov[name] - lo) / (hi - lo)
    return out


def ensure_budget_sets(
    run: Path, configfiles: list[str], budgets: list[float], threads: int, trained: str = "diffusion_dpmsde"
) -> list[str]:
    """Train (``--budget f``) and sample ``<trained>_b<f>`` (e.g. ``diffusion_dpmsde_b0.5``) for
    each budget if missing."""
    base = [sys.executable, "-m", "pipeline"]
    common = ["--run", str(run), "--threads", str(threads)]
    for f in configfiles:
        common += ["--configfile", str(Path(f).resolve())]
    names = []
    for f in budgets:
        name = f"{trained}_b{f:g}"
        if not (run / f"diffusion_b{f:g}" / "model.pt").is_file():
            subprocess.run([*base, "train_diffusion", *common, "--budget", str(f)], check=True, cwd=ROOT)
        if not (run / "samples" / f"{name}.npy").is_file():
            subprocess.run([*base, "sample", *common, "--sample-set", name], check=True, cwd=ROOT)
        names.append(name)
    return names


def spearman(scores: list[float]) -> float:
    """Spearman rho of ``scores`` against their position (0 = best rung)."""
    from scipy.stats import spearmanr

    if len(set(scores)) < 2:
        return float("nan")
    return float(spearmanr(np.arange(len(scores)), scores).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run (its judges trained, its sets drawn)")
    p.add_argument("--configfile", action="append", default=[], help="the run's config file(s) (none: the default's)")
    p.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[0.5, 0.25, 0.01],
        help="training fractions besides 1 (0.01: untrained)",
    )
    p.add_argument("--trained", default="diffusion_dpmsde", help="the fully trained model's set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write every row and rho here")
    a = p.parse_args(argv)
    from pipeline.config import resolve
    from pipeline.data import read_dataset, read_info
    from pipeline.evaluate import _train_reference, build_judging, noise_check, noise_images, pooled_pixels, score_set
    from pipeline.io import RunPaths
    from pipeline.sources import judges

    torch.set_num_threads(a.threads)
    run = Path(a.run).resolve()
    cfg = resolve(a.configfile, overrides=[f"run={run.name}"])
    paths = RunPaths(run)
    info = read_info(paths.dataset)
    names = judges(cfg, info.num_classes)
    space = names[0]
    train_x = _train_reference(cfg, paths, info, torch.device("cpu"))
    test = read_dataset(paths.dataset, "test")
    test_x = test.unit()
    judging = build_judging(cfg, paths, names, train_x, test_x, torch.device("cpu"))
    n = judging.num_images
    none = {"seconds_per_1000": None}
    floor_row = score_set(judging, "real_test", test_x, test.labels, none)
    noise_x = noise_images(train_x, n, seed=0)
    noise_row = score_set(judging, "noise", noise_x, None, none)

    rungs: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for family, levels in LEVELS.items():
        if family == "elastic" and test_x.dim() == 4:
            levels = ELASTIC_2D
        rungs[family] = [("real_test", test_x[:n])] + [
            (f"{family} {lv:g}", degrade(test_x[:n], family, lv)) for lv in levels
        ]
    budget_sets = ensure_budget_sets(run, a.configfile, sorted(a.budgets, reverse=True), a.threads, a.trained)
    models = [a.trained, *budget_sets]
    # every sample of a model: score_set judges k N samples as the mean of k draws of N (the
    # evaluate stage's rule); the candidates outside score_set read the first N
    rungs["training"] = [(m, torch.from_numpy(np.load(run / "samples" / f"{m}.npy"))) for m in models]

    rows: dict[str, dict] = {}
    cands: dict[str, dict] = {}
    feats: dict[str, np.ndarray] = {}
    pixels: dict[str, np.ndarray] = {}
    for items in [*rungs.values(), [("noise", noise_x)]]:
        for name, x in items:
            if name in cands:
                continue
            row = {"real_test": floor_row, "noise": noise_row}.get(name) or score_set(judging, name, x, None, none)
            rows[name] = row
            js = judging.spaces[space]
            feats[name] = js.test[:n] if name == "real_test" else js.embed(x[:n])
            cands[name] = candidates(row, judging, space, x[:n], feats[name], floor_row, noise_row)
            if x.dim() == 4:
                pixels[name] = pooled_pixels(x[:n])
    keys = list(next(iter(cands.values())))
    print("rung\t" + "\t".join(keys) + "\tnoise check")
    for name, c in cands.items():
        pre = "features_" if space == "features" else ""
        key = "pixel_coverage" if judging.pixel_train is not None else f"{pre}coverage"  # the evaluate stage's
        verdict = noise_check(rows[name][key], noise_row[key], floor_row[key])[1]
        print(name + "\t" + "\t".join(f"{c[k]:.4g}" for k in keys) + f"\t{verdict}")
    print()
    families = list(rungs)
    print("| score | " + " | ".join(f"rho {f}" for f in families) + " | mean rho | min rho |")
    print("|---|" + "---|" * (len(families) + 2))
    rho = {}
    for k in keys:
        per = [spearman([cands[name][k] for name, _ in rungs[f]]) for f in families]
        rho[k] = per
        ok = [v for v in per if math.isfinite(v)]
        mean = float(np.mean(ok)) if ok else float("nan")
        low = float(np.min(ok)) if ok else float("nan")
        print(f"| {k} | " + " | ".join(f"{v:.2f}" for v in per) + f" | {mean:.2f} | {low:.2f} |")
    fd_key = "features_fd" if space == "features" else "fd_train"
    checks = structure_candidates(
        feats,
        judging.spaces[space].train[:n],
        {k: r[fd_key] for k, r in rows.items()},
        pixels or None,
        judging.pixel_train,
    )
    ck = list(checks["noise"])
    print()
    print("noise-check candidates (structure: 0 = the noise row, 1 = the real test images)")
    print("| rung | " + " | ".join(ck) + " |")
    print("|---|" + "---|" * len(ck))
    for name, c in checks.items():
        print(f"| {name} | " + " | ".join(f"{c[k]:.2f}" for k in ck) + " |")
    if a.json:
        a.json.write_text(
            json.dumps({"families": families, "rho": rho, "rows": cands, "checks": checks}, indent=1, default=float)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
