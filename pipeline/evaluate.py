"""The evaluate stage: sample-quality numbers for every sample set, in one table per run.

The judge is the run's own digit classifier (``train_classifier``; its test accuracy is part of
the report: below ~97 % the numbers mean little). For every sample set and for the real test
images (the *floor*: what real data scores) the stage computes

* ``confidence``: mean max softmax probability of the classifier, in [0.1, 1];
* ``class_entropy``: entropy (nats) of the histogram of predicted classes, in [0, ln 10 = 2.303];
  low = some digits are never drawn (mode dropping);
* ``fd_train`` / ``fd_test``: the **Fréchet distance** between Gaussians fitted to the
  classifier's penultimate features of the first N samples and of the real train images (all
  of them) / the first N real test images, d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))
  (Dowson & Landau 1982; Heusel et al. 2017 eq. 6), computed with ``scipy.linalg.sqrtm`` as
  pytorch-fid does. N = ``evaluate.num_images`` (or fewer when a set has fewer images; the FD
  of the first n real test images against train, ``fd_floor_same_n``, is then the fair floor,
  since the FD estimate is biased upwards at small N);
* ``duplicates``: fraction of samples whose nearest other sample is within RMS pixel distance
  ``duplicate_threshold`` (mode collapse; greedy decoding gives 1.0);
* ``memorised``: fraction of samples closer (RMS) to a train image than the
  ``memorisation_quantile`` quantile of the real test images' distances to their nearest train image;
* ``label_accuracy`` (conditional sets): fraction the classifier assigns to the requested label.

The training stages' metrics (VQ-VAE MSE and perplexity, PixelCNN NLL, diffusion losses,
training speed) are carried into the same file. Outputs in ``report/``: ``metrics.json`` (keys
documented in docs/reference.md), ``summary.md`` (the tables), ``sets.tsv`` and one TSV per study, and
``training_curves.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import gaussian_blur
from pipeline.io import RunPaths, StageInputError, atomic_path, atomic_write_text, read_json, write_json
from pipeline.runtime import log, resolve_device, stage_record

__all__ = [
    "frechet_distance",
    "feature_statistics",
    "class_entropy",
    "nearest_neighbour_rms",
    "near_duplicate_fraction",
    "judge_images",
    "precision_recall",
    "gaussian_blur",
    "noise_images",
    "noise_check",
    "stage_judges",
    "set_columns",
    "plot_training_curves",
    "scaling_rows",
    "scaling_crossover",
    "plot_scaling",
    "evaluate",
]


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean float64 (F,) and covariance float64 (F, F) (unbiased, rows = observations) of
    features (N, F), N >= 2.

    Raises:
        ValueError: fewer than 2 rows.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features (N >= 2, F), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) (Dowson & Landau 1982;
    the FID of Heusel et al. 2017, eq. 6). The matrix square root is ``scipy.linalg.sqrtm``;
    as in pytorch-fid, a singular product is regularised with ``eps`` I and a negligible
    imaginary part from round-off is dropped.

    Args:
        mu1, mu2: float (F,) means; sigma1, sigma2: float (F, F) covariances.

    Returns:
        d^2 >= 0 (float, in squared feature units).

    Raises:
        ValueError: shapes differ, or sqrtm has a significant imaginary part.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    import warnings

    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if caught or not np.isfinite(covmean).all():  # singular product (fewer samples than features)
        offset = np.eye(len(mu1)) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, float(np.abs(covmean).max()))):
            raise ValueError(f"sqrtm has a significant imaginary part: {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(max(0.0, diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def class_entropy(predicted: np.ndarray, num_classes: int = 10) -> float:
    """Entropy in nats of the histogram of int (N,) predicted classes: 0 (one class) to ln(num_classes)."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log(p)).sum()))  # max: no -0.0 for a single class


def nearest_neighbour_rms(
    queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False, chunk: int = 1024, return_index: bool = False
):
    """RMS pixel distance from each query to its nearest reference image.

    Args:
        queries: float (N, ...) images; refs: float (M, ...) images of the same shape.
        exclude_self: ``queries`` is ``refs``: skip each image's distance to itself.
        return_index: also return the index (N,) int64 of each nearest reference.

    Returns:
        float64 (N,) distances, sqrt(mean squared pixel difference) (images in [0, 1] give [0, 1]);
        with ``return_index``, (distances, indices).
    """
    q, r = queries.flatten(1).double(), refs.flatten(1).double()
    d = q.shape[1]
    out, idx = [], []
    for s in range(0, len(q), chunk):
        dist = torch.cdist(q[s : s + chunk], r)
        if exclude_self:
            rows = torch.arange(len(dist))
            dist[rows, rows + s] = float("inf")
        best = dist.min(dim=1)
        out.append(best.values)
        idx.append(best.indices)
    distances = (torch.cat(out) / math.sqrt(d)).numpy()
    return (distances, torch.cat(idx).numpy()) if return_index else distances


def near_duplicate_fraction(images: torch.Tensor, threshold: float) -> float:
    """Fraction in [0, 1] of ``images`` (N >= 2, ...) whose nearest other image is within RMS
    pixel distance ``threshold``."""
    if len(images) < 2:
        return 0.0
    return float((nearest_neighbour_rms(images, images, exclude_self=True) < threshold).mean())


def judge_images(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> dict:
    """Classifier outputs for float (N, 1, 28, 28) images in [0, 1]: {"probs": (N, C),
    "features": (N, F), "pred": int (N,), "confidence": mean max softmax, "class_entropy": nats}."""
    probs, feats = classifier.predict(images, batch_size=batch_size)
    pred = probs.argmax(1).numpy()
    num_classes = probs.shape[1]
    return {
        "probs": probs.numpy(),
        "features": feats.numpy(),
        "pred": pred,
        "confidence": float(probs.max(1).values.mean()),
        "class_entropy": class_entropy(pred, num_classes),
    }


def plot_training_curves(run_dir: str | os.PathLike, path: str | os.PathLike) -> list[str]:
    """One panel per training stage's ``train_log.csv`` (loss against step, log scale); returns
    the stages drawn. Writes ``path`` (PNG) atomically."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(run_dir)
    stages = [
        s
        for s in ("vqvae", "classifier", "pixelcnn", "pixelcnn_cond", "diffusion", "diffusion_cond", "pixel_diffusion")
        if (root / s / "train_log.csv").is_file()
    ]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(3.2 * max(1, len(stages)), 2.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        with open(root / stage / "train_log.csv") as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in rows]
        ax.plot(steps, [float(r["loss"]) for r in rows], marker=".")
        ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return stages


def _carry(paths: RunPaths) -> dict:
    """The training stages' own metrics (those that exist), by stage."""
    pcnn = (
        "test_nll_nats_per_code",
        "test_nll_bits_per_code",
        "test_nll_conditional_nats_per_code",
        "conditional",
        "steps",
        "train_seconds",
    )
    diff = (
        "final_train_loss",
        "test_loss_ema",
        "test_loss_raw",
        "test_loss_conditional_ema",
        "conditional",
        "train_seconds",
        "train_images_per_s",
        "steps",
    )
    keep = {
        "vqvae": ("test_recon_mse", "test_perplexity", "test_codes_in_use", "num_embeddings", "train_seconds"),
        "classifier": ("test_accuracy", "train_accuracy", "num_test", "train_seconds"),
        "encoder": ("final_train_loss", "test_view_retrieval", "steps", "train_seconds"),
        "pixelcnn": pcnn,
        "pixelcnn_cond": pcnn,
        "diffusion": diff,
        "diffusion_cond": diff,
        "pixel_diffusion": (
            "final_train_loss",
            "test_loss_ema",
            "train_seconds",
            "train_images_per_s",
            "steps",
            "time_budget_s",
        ),
    }
    out = {}
    for stage, keys in keep.items():
        f = paths.root / stage / "metrics.json"
        if f.is_file():
            m = read_json(f)
            out[stage] = {k: m[k] for k in keys if k in m}
    return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 10**-digits):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> tuple[str, str]:
    """(markdown, TSV) of ``rows`` with ``columns`` = [(key, header)]."""
    md = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    tsv = ["\t".join(h for _, h in columns)]
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |")
        tsv.append("\t".join(_fmt(r.get(k)) for k, _ in columns))
    return "\n".join(md) + "\n", "\n".join(tsv) + "\n"


SET_COLUMNS = [
    ("name", "set"),
    ("n", "N"),
    ("confidence", "confidence"),
    ("class_entropy", "class entropy (nats)"),
    ("fd_train", "FD vs train"),
    ("fd_test", "FD vs test"),
    ("fd_ratio", "FD / floor"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("duplicates", "duplicates"),
    ("memorised", "memorised"),
    ("label_accuracy", "label accuracy"),
    ("seconds_per_1000", "s / 1000 images"),
]
#: the label-free judge's columns
FEATURE_COLUMNS = [
    ("features_fd", "label-free FD"),
    ("features_fd_ratio", "label-free FD / floor"),
    ("features_precision", "label-free precision"),
    ("features_recall", "label-free recall"),
    ("features_density", "label-free density"),
    ("features_coverage", "label-free coverage"),
]


#: the noise check's columns (:func:`noise_check`), after the judges' columns
NOISE_COLUMNS = [
    ("structure", "structure (0 noise, 1 real)"),
    ("noise_check", "noise check"),
]

#: a set is reported as noise when its coverage is nearer the noise row's than the real test
#: images' (the midpoint, not a fitted constant; validated in docs/volumes.md, "The noise check")
NOISE_STRUCTURE_THRESHOLD = 0.5


def noise_check(
    coverage: float | None,
    noise_coverage: float | None,
    real_coverage: float | None,
    threshold: float = NOISE_STRUCTURE_THRESHOLD,
) -> tuple[float | None, str]:
    """Is a sample set noise? The verdict the study's 3D latent diffusion needed: its loss had
    converged and its samples were pure noise.

    The score is where the set's **coverage** (Naeem et al. 2020, eq. 4: the fraction of real
    images with a sample inside their k-NN ball) lies between two rows judged in the same
    features by the same evaluation: the ``noise`` reference row (0) and the real test images
    (1), ``structure = (c - c_noise) / (c_real - c_noise)``. Coverage, not FD or precision: on
    the 3D default FD / floor of an untrained diffusion model (8.0) is *below* the trained one's
    (9.0) and noise scores precision 1.0 (a tight cluster inside the real outliers' balls), while
    coverage is 0.15 for both noise and the untrained model against 0.70 for the trained one.
    Validated on 29 rows of two runs (``benchmarks/noise_check.py``; docs/volumes.md): every
    set without anatomy scored <= 0.44, every structured set >= 0.56.

    Args:
        coverage, noise_coverage, real_coverage: in [0, 1], or None / NaN (not computed).
        threshold: the structure below which the set is called noise.

    Returns:
        (structure, verdict): structure a float (about 0 to 1; can leave that range) or None;
        verdict "noise", "pass", or "undecided" when a coverage is missing or the judge does not
        separate real images from noise (c_real - c_noise < 0.1).
    """
    vals = (coverage, noise_coverage, real_coverage)
    if any(v is None or not math.isfinite(v) for v in vals):
        return None, "undecided"
    if real_coverage - noise_coverage < 0.1:
        return None, "undecided"
    structure = (coverage - noise_coverage) / (real_coverage - noise_coverage)
    return float(structure), "noise" if structure < threshold else "pass"


#: the 3D checks of volume sets (:func:`pipeline.volumes.volume_scores`)
VOLUME_COLUMNS = [
    ("ms_ssim_pairs", "MS-SSIM between samples"),
    ("ms_ssim_nearest_train", "MS-SSIM to nearest train"),
    ("intensity_w1", "intensity W1"),
]


def set_columns(judge_names, volumes: bool = False) -> list[tuple[str, str]]:
    """The table columns for the judges in use: the classifier's (:data:`SET_COLUMNS`), the
    label-free ones (:data:`FEATURE_COLUMNS`) before duplicates, or both; then the noise check
    (:data:`NOISE_COLUMNS`) and, for 3D volume sets, :data:`VOLUME_COLUMNS`."""
    tail = [c for c in SET_COLUMNS if c[0] in ("duplicates", "memorised", "label_accuracy", "seconds_per_1000")]
    head = [c for c in SET_COLUMNS if c not in tail]
    extra = NOISE_COLUMNS + (VOLUME_COLUMNS if volumes else [])
    if "classifier" not in judge_names:
        return head[:2] + FEATURE_COLUMNS + extra + [c for c in tail if c[0] != "label_accuracy"]
    return head + (FEATURE_COLUMNS if "features" in judge_names else []) + extra + tail


def judge_sentence(evaluation: Mapping, judge_names, n_eval: int, n_train: int, floor_row: Mapping) -> str:
    """The summary's sentence on what judged the samples and how to read the FD columns."""
    parts = []
    if "classifier" in judge_names:
        parts.append(
            f"Judge: the run's classifier, test accuracy {_fmt(evaluation.get('classifier_test_accuracy'))}; "
            f"Fréchet distances (FD) in its penultimate features, N = {n_eval} images per set against all "
            f"{n_train} train images (`FD vs train`) and the first {n_eval} test images (`FD vs test`)."
        )
    if "features" in judge_names:
        parts.append(
            "Label-free judge: a SimCLR encoder trained on the train split without labels (view retrieval "
            f"{_fmt(evaluation.get('encoder_test_view_retrieval'))}); `label-free FD` in its features, N = {n_eval} "
            f"against all {n_train} train images."
        )
    parts.append(
        "`FD / floor` divides by the FD of N real test images against train (`real_test` row: the floor, "
        f"{floor_row['fd_train']:.3f})."
    )
    return " ".join(parts)


def noise_sentence(check: Mapping) -> str:
    """The summary's line on the noise check (``metrics.json`` ``evaluation.noise_check``)."""
    judge = "label-free" if check["coverage"] == "features_coverage" else "classifier"
    found = ", ".join(f"`{n}`" for n in check["noise_sets"]) or "none"
    return (
        f"**Noise check:** `structure` places a set's {judge} coverage between the `noise` row's "
        f"({_fmt(check['noise_coverage'])}, = 0) and the real test images' ({_fmt(check['real_coverage'])}, = 1); "
        f"below {check['threshold']:g} the set is reported as noise. Sets reported as noise: {found}.\n"
    )


def stage_judges(cfg: Mapping, num_classes: int) -> tuple[str, ...]:
    """The judges of this evaluation: ``evaluate.judge``, with ``auto`` = the classifier when the
    dataset has labels (``num_classes`` >= 2), else the label-free features.

    Raises:
        pipeline.io.StageInputError: the classifier asked for on unlabelled data.
    """
    j = cfg["evaluate"].get("judge", "auto")
    names = {"auto": ("classifier",) if num_classes >= 2 else ("features",), "both": ("classifier", "features")}
    out = names.get(j, (j,))
    if "classifier" in out and num_classes < 2:
        raise StageInputError(f"evaluate.judge {j!r} needs labelled data, but the dataset has {num_classes} classes")
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2) with ``prdc`` (Naeem et
    al. 2020's implementation), plus its density and coverage (Naeem et al. 2020, "Reliable
    Fidelity and Diversity Metrics for Generative Models", eq. 3-4).

    Precision counts a sample as realistic if it falls inside *any* real sample's k-NN ball, so a
    tight cluster of bad samples inside one real outlier's large ball scores high (Naeem et al.,
    sec. 3); density (the mean number of real balls around a sample, / k: about 1 for real data)
    and coverage (the fraction of real samples with a generated one inside their ball) do not
    have that failure, which is why the label-free judge reports them too.

    Args:
        real, fake: float (N, F) and (M, F) features; k: the k-th nearest neighbour radius.

    Returns:
        {"precision", "recall", "density", "coverage"}: floats; precision, recall and coverage in
        [0, 1], density >= 0 (unbounded above, 1 on average for real data); all NaN when a set
        has fewer than 3 rows. k is lowered to the smaller set's size - 2 when needed.
    """
    import contextlib
    import io

    from prdc import compute_prdc

    k = min(k, len(real) - 2, len(fake) - 2)  # prdc needs k + 1 < the smaller set's size
    if k < 1:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), float("nan"))
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = compute_prdc(np.asarray(real, np.float32), np.asarray(fake, np.float32), nearest_k=k)
    return {key: float(v) for key, v in out.items()}


def noise_images(train: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """float (n, C, H, W) in [0, 1]: per-pixel Gaussian noise with the train images' per-pixel mean
    and std (clamped): the "noise" reference row, the far end of the scale."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train.float().mean(0), train.float().std(0)
    return (mean + std * torch.randn((n, *train.shape[1:]), generator=g)).clamp(0, 1)


def scaling_rows(sets: dict, specs: dict) -> list[dict]:
    """Rows of the quality-vs-compute study: every unconditional set whose sampler was drawn at
    two or more training budgets (the default model is budget 1), sorted by sampler and budget."""
    from pipeline.sets import base_name

    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if not spec.conditional and spec.prior in ("pixelcnn", "diffusion"):
            groups.setdefault(base_name(name), []).append(name)
    rows = []
    for base, names in sorted(groups.items()):
        if len(names) < 2:
            continue
        for n in names:
            budget = specs[n].budget if specs[n].budget is not None else 1.0
            rows.append({**sets[n], "prior": specs[n].prior, "sampler": base, "budget": float(budget)})
    return sorted(rows, key=lambda r: (r["prior"], r["sampler"], r["budget"]))


def scaling_crossover(rows: list[dict]) -> dict:
    """Where latent diffusion overtakes the PixelCNN in FD / floor against training seconds.

    Each prior's curve is the piecewise-linear interpolation of log FD / floor in log training
    seconds between its measured budgets (the best sampler per prior: the one with the lowest
    FD at its largest budget). Returns {"pixelcnn": sampler, "diffusion": sampler,
    "statement": one sentence, "seconds": the crossover training seconds or None, "at_budgets":
    [(budget, FD ratio PixelCNN, FD ratio diffusion)] at the budgets both have}.
    """
    by: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get("prior_train_seconds") and r.get("fd_ratio"):
            by.setdefault(r["prior"], {}).setdefault(r["sampler"], []).append(r)
    if "pixelcnn" not in by or "diffusion" not in by:
        return {"statement": "needs both priors at two or more budgets", "seconds": None, "at_budgets": []}

    def best(curves: dict[str, list[dict]]) -> tuple[str, list[dict]]:
        name = min(curves, key=lambda k: sorted(curves[k], key=lambda r: r["budget"])[-1]["fd_ratio"])
        return name, sorted(curves[name], key=lambda r: r["prior_train_seconds"])

    pc_name, pc = best(by["pixelcnn"])
    df_name, df = best(by["diffusion"])

    def interp(curve: list[dict], sec: float) -> float | None:
        xs = [math.log(r["prior_train_seconds"]) for r in curve]
        ys = [math.log(r["fd_ratio"]) for r in curve]
        x = math.log(sec)
        if x < xs[0] or x > xs[-1]:
            return None
        return math.exp(float(np.interp(x, xs, ys)))

    grid = sorted({r["prior_train_seconds"] for r in pc + df})
    lo, hi = (
        max(pc[0]["prior_train_seconds"], df[0]["prior_train_seconds"]),
        min(pc[-1]["prior_train_seconds"], df[-1]["prior_train_seconds"]),
    )
    grid = [g for g in grid if lo <= g <= hi]
    dense = sorted(set(grid + [math.exp(v) for v in np.linspace(math.log(lo), math.log(hi), 200)])) if lo < hi else grid
    curves = [(sec, interp(df, sec), interp(pc, sec)) for sec in dense]  # each curve interpolated once
    diffs = [(sec, d - p) for sec, d, p in curves if d is not None and p is not None]
    pc_b = {r["budget"]: r["fd_ratio"] for r in pc}
    at_budgets = [(b, pc_b[b], r["fd_ratio"]) for r in df for b in [r["budget"]] if b in pc_b]
    seconds = None
    if not diffs:
        statement = "the two priors' training times do not overlap; compare the budgets directly"
    elif all(d < 0 for _, d in diffs):
        statement = (
            f"latent diffusion ({df_name}) is ahead of the PixelCNN ({pc_name}) "
            f"at every training time both were measured at ({lo:.0f}-{hi:.0f} s)"
        )
    elif all(d >= 0 for _, d in diffs):
        statement = (
            f"latent diffusion ({df_name}) never overtakes the PixelCNN ({pc_name}) "
            f"between {lo:.0f} and {hi:.0f} training seconds"
        )
    else:
        for (s0, d0), (s1, d1) in zip(diffs, diffs[1:]):
            if d0 >= 0 > d1:
                seconds = s0 + (s1 - s0) * d0 / (d0 - d1)
                break
        if seconds is None:
            statement = f"the curves cross but diffusion ({df_name}) ends behind the PixelCNN ({pc_name}) at {hi:.0f} s"
        else:
            statement = (
                f"latent diffusion ({df_name}) overtakes the PixelCNN ({pc_name}) "
                f"at about {seconds:.0f} training seconds"
            )
    return {
        "pixelcnn": pc_name,
        "diffusion": df_name,
        "statement": statement,
        "seconds": seconds,
        "at_budgets": at_budgets,
    }


def plot_scaling(rows: list[dict], path: str | os.PathLike) -> None:
    """FD / floor against training seconds (log-log), one line per sampler of each prior; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["sampler"], []).append(r)
    for name, rs in sorted(groups.items()):
        rs = sorted((r for r in rs if r.get("prior_train_seconds")), key=lambda r: r["prior_train_seconds"])
        if not rs:
            continue
        style = "o-" if rs[0]["prior"] == "diffusion" else "s--"
        ax.plot([r["prior_train_seconds"] for r in rs], [r["fd_ratio"] for r in rs], style, label=name)
        for r in rs:
            ax.annotate(
                f"{r['budget']:g}x",
                (r["prior_train_seconds"], r["fd_ratio"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds of the prior")
    ax.set_ylabel("FD / real floor")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def provenance() -> dict:
    """{"commit": the git commit of the pipeline's source (or "unknown"), "dirty": uncommitted
    changes, "date": ISO date and time} for the report's header."""
    import subprocess
    import time

    src = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    commit, dirty = "unknown", False
    try:
        commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "dirty": dirty, "date": time.strftime("%Y-%m-%d %H:%M")}


#: Readable names of the diffusion samplers in the study tables.
SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "dpmpp": "DPM-Solver++(2M)",
    "dpmsde": "DPM-Solver++ SDE",
    "euler": "Euler",
    "heun": "Heun",
    "eulera": "Euler ancestral",
}


def _studies(sets: dict, stage_metrics: dict) -> dict[str, dict]:
    """The study tables, built from whichever sample sets the run has: {study: {"rows", "columns", "title"}}."""
    from pipeline.sets import parse_sample_set, studies_for

    all_specs = {name: parse_sample_set(name) for name in sets}
    specs = {n: s for n, s in all_specs.items() if s.budget in (None, 1.0)}
    wanted = set(studies_for(sets))
    studies: dict[str, dict] = {}

    if "scaling" in wanted:
        rows = scaling_rows(sets, all_specs)
        studies["scaling"] = {
            "title": "Quality vs training compute: the unconditional priors at several training budgets "
            "(same latents; f = multiple of the configured steps)",
            "rows": rows,
            "columns": [
                ("prior", "prior"),
                ("sampler", "sampler"),
                ("name", "set"),
                ("budget", "budget f"),
                ("prior_steps", "train steps"),
                ("prior_train_seconds", "train s"),
                ("fd_train", "FD vs train"),
                ("fd_ratio", "FD / floor"),
                ("class_entropy", "class entropy (nats)"),
                ("duplicates", "duplicates"),
                ("memorised", "memorised"),
            ],
            "crossover": scaling_crossover(rows),
        }

    pcnn = [n for n, s in specs.items() if s.prior == "pixelcnn" and not s.conditional]
    if "sampling_layer" in wanted:

        def decoding(n: str) -> str:
            if specs[n].method == "greedy":
                return "greedy (argmax)"
            ag = f", autoguidance w = {specs[n].autoguidance:g}" if specs[n].autoguidance is not None else ""
            return f"categorical, tau = {sets[n]['temperature']:g}{ag}"

        rows = sorted(
            (
                {
                    "decoding": decoding(n),
                    "_key": (
                        specs[n].autoguidance or 0.0,
                        -1.0 if specs[n].method == "greedy" else sets[n]["temperature"],
                    ),
                    **sets[n],
                }
                for n in pcnn
            ),
            key=lambda r: r["_key"],
        )
        studies["sampling_layer"] = {
            "title": "PixelCNN: the categorical sampling layer (greedy argmax vs sampling at temperature tau)",
            "rows": rows,
            "columns": [
                ("decoding", "decoding"),
                ("name", "set"),
                ("duplicates", "duplicates"),
                ("class_entropy", "class entropy (nats)"),
                ("fd_train", "FD vs train"),
                ("fd_ratio", "FD / floor"),
                ("confidence", "confidence"),
            ],
        }

    diff = [n for n, s in specs.items() if s.prior == "diffusion" and not s.conditional]
    if "diffusion_steps" in wanted:

        def key(n):
            s = specs[n]
            return (s.weights != "ema", s.autoguidance or 0.0, s.method == "ddpm", s.method, sets[n]["steps"])

        def sampler(n: str) -> str:
            ag = f", autoguidance w = {specs[n].autoguidance:g}" if specs[n].autoguidance is not None else ""
            return f"{SAMPLER_NAMES.get(specs[n].method, specs[n].method)}, {sets[n]['steps']} steps{ag}"

        rows = [{"sampler": sampler(n), "weights": specs[n].weights, **sets[n]} for n in sorted(diff, key=key)]
        studies["diffusion_steps"] = {
            "title": "Latent diffusion: the sampler (DDPM over all T steps, DDIM and diffusers' solvers with S steps), "
            "autoguidance, EMA vs raw weights",
            "rows": rows,
            "columns": [
                ("sampler", "sampler"),
                ("weights", "weights"),
                ("name", "set"),
                ("n", "N"),
                ("fd_train", "FD vs train"),
                ("fd_floor_same_n", "floor at N"),
                ("fd_ratio", "FD / floor"),
                ("seconds_per_1000", "s / 1000 images"),
                ("class_entropy", "class entropy (nats)"),
            ],
        }

    pix = [n for n, s in specs.items() if s.prior == "pixeldiff"]
    if "latent_vs_pixel" in wanted:
        rows = []
        for n in sorted(
            diff + pix,
            key=lambda n: (specs[n].method, sets[n]["steps"], specs[n].weights, specs[n].prior != "diffusion"),
        ):
            s = specs[n]
            partner = ("pixeldiff" if s.prior == "diffusion" else "diffusion") + n[len(s.prior) :]
            if partner not in sets:
                continue
            train = stage_metrics.get("diffusion" if s.prior == "diffusion" else "pixel_diffusion", {})
            rows.append(
                {
                    "space": "latent (VQ-VAE 16x7x7)" if s.prior == "diffusion" else "pixel (1x32x32)",
                    "train_images_per_s": train.get("train_images_per_s"),
                    "train_seconds": train.get("train_seconds"),
                    "train_steps": train.get("steps"),
                    **sets[n],
                }
            )
        studies["latent_vs_pixel"] = {
            "title": "Latent vs pixel space, equal training wall time (same U-Net family and schedule)",
            "rows": rows,
            "columns": [
                ("space", "space"),
                ("name", "set"),
                ("train_images_per_s", "train images/s"),
                ("train_steps", "train steps"),
                ("train_seconds", "train s"),
                ("seconds_per_1000", "sampling s / 1000"),
                ("fd_train", "FD vs train"),
                ("fd_ratio", "FD / floor"),
                ("class_entropy", "class entropy (nats)"),
            ],
        }

    cond = [n for n, s in specs.items() if s.conditional]
    if "guidance" in wanted:
        rows = [
            {"prior": specs[n].prior, "guidance_scale": specs[n].guidance, "w": specs[n].guidance - 1, **sets[n]}
            for n in sorted(cond, key=lambda n: (specs[n].prior, specs[n].guidance))
        ]
        studies["guidance"] = {
            "title": "Class-conditional samples: label accuracy per guidance scale s "
            "(diffusers' convention; Ho & Salimans' w = s - 1; s = 1 is no guidance)",
            "rows": rows,
            "columns": [
                ("prior", "prior"),
                ("name", "set"),
                ("guidance_scale", "s"),
                ("w", "w"),
                ("label_accuracy", "label accuracy"),
                ("fd_train", "FD vs train"),
                ("fd_ratio", "FD / floor"),
                ("class_entropy", "class entropy (nats)"),
                ("seconds_per_1000", "s / 1000 images"),
            ],
        }
    return studies


def evaluate(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """The evaluate stage: judge every set of ``sample.models`` and the real test images.

    Reads ``evaluate`` (num_images, duplicate_threshold, memorisation_quantile, batch_size)
    and ``sample.models``; needs ``classifier/model.pt``, ``data/dataset.h5`` and
    ``samples/<set>.npy`` + ``.json`` for every set. Writes ``report/metrics.json``,
    ``report/summary.md``, ``report/sets.tsv``, ``report/<study>.tsv``,
    ``report/training_curves.png`` and the stage record ``report/record.json``.

    Raises:
        pipeline.io.StageInputError: a sample set's ``.npy`` or ``.json`` is missing, or holds
            the wrong shape, dtype or value range (the file is named).
    """
    from pipeline.checkpoint import load_model
    from pipeline.data import read_dataset, read_info
    from pipeline.sets import parse_sample_set, requested_labels

    paths = RunPaths(run_dir)
    sec = cfg["evaluate"]
    out = paths.report
    # the stage record (wall time, host) is record.json: metrics.json is the report itself
    with stage_record("evaluate", cfg, out, metrics_name="record.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        bs = int(sec["batch_size"])
        info = read_info(paths.dataset)
        judge_names = stage_judges(cfg, info.num_classes)
        train = read_dataset(paths.dataset, "train")
        test = read_dataset(paths.dataset, "test")
        train_x, test_x = train.unit(), test.unit()
        n_eval = min(int(sec["num_images"]), len(test_x))
        if n_eval < int(sec["num_images"]):
            log.warning(
                "evaluate: the test split has %d images; Fréchet distances use N = %d, not %d",
                len(test_x),
                n_eval,
                sec["num_images"],
            )
        clf = load_model(paths.classifier_model, device=device)[0] if "classifier" in judge_names else None
        enc = load_model(paths.encoder_model, device=device)[0] if "features" in judge_names else None
        k_pr = int(sec.get("precision_recall_k", 3))
        spaces = {}  # judge -> {"train": features of all train images, "real_pr": first-N train, "test": ...}
        for jn in judge_names:
            embed = (lambda x: judge_images(clf, x.to(device), bs)["features"]) if jn == "classifier" else None
            if jn == "features":
                embed = lambda x: enc.embed(x, bs).numpy()  # noqa: E731
            f_train = embed(train_x)
            spaces[jn] = {"embed": embed, "train": f_train, "stats": feature_statistics(f_train), "floors": {}}
        real_test = judge_images(clf, test_x[:n_eval].to(device), bs) if clf is not None else None
        if clf is not None:
            mu_te, sig_te = feature_statistics(real_test["features"])
        # the classifier's test features are real_test's (one pass over the test images per judge)
        test_feats = {
            jn: real_test["features"] if jn == "classifier" else sp["embed"](test_x[:n_eval])
            for jn, sp in spaces.items()
        }

        def floor(jn: str, n: int) -> float:
            sp = spaces[jn]
            if n not in sp["floors"]:
                mu, sig = feature_statistics(test_feats[jn][:n])
                sp["floors"][n] = frechet_distance(mu, sig, *sp["stats"])
            return sp["floors"][n]

        test_nn_train = nearest_neighbour_rms(test_x, train_x)
        volumes = train_x.dim() == 5
        if volumes:
            from pipeline.volumes import intensity_histogram, volume_scores

            train_hist = intensity_histogram(train_x)
        mem_threshold = float(np.quantile(test_nn_train, float(sec["memorisation_quantile"])))
        dup_threshold = float(sec["duplicate_threshold"])
        primary = judge_names[0]

        def judge(name: str, images: torch.Tensor, labels: np.ndarray | None, extra: dict) -> dict:
            n = min(n_eval, len(images))
            x = images[:n]
            row = {"name": name, "n": n}
            for jn in judge_names:
                if name == "real_test":
                    feats = test_feats[jn][:n]
                elif jn == "classifier":
                    j = judge_images(clf, x.to(device), bs)
                    feats = j["features"]
                else:
                    feats = spaces[jn]["embed"](x)
                mu, sig = feature_statistics(feats)
                fd = frechet_distance(mu, sig, *spaces[jn]["stats"])
                fl = floor(jn, n)
                pr = precision_recall(spaces[jn]["train"][:n], feats, k_pr)
                if jn == "classifier":
                    j = real_test if name == "real_test" else j
                    row.update(
                        confidence=j["confidence"],
                        class_entropy=j["class_entropy"],
                        fd_train=fd,
                        fd_test=frechet_distance(mu, sig, mu_te, sig_te) if name != "real_test" else 0.0,
                        fd_floor_same_n=fl,
                        fd_ratio=fd / fl if fl > 0 else None,
                        precision=pr["precision"],
                        recall=pr["recall"],
                        coverage=pr["coverage"],
                        label_accuracy=float((j["pred"][:n] == labels[:n]).mean()) if labels is not None else None,
                    )
                else:
                    row.update(
                        features_fd=fd,
                        features_fd_floor=fl,
                        features_fd_ratio=fd / fl if fl > 0 else None,
                        features_precision=pr["precision"],
                        features_recall=pr["recall"],
                        features_density=pr["density"],
                        features_coverage=pr["coverage"],
                    )
            if primary == "features":  # the table's FD columns are the primary judge's
                row.update(fd_train=row["features_fd"], fd_floor_same_n=row["features_fd_floor"])
                row.update(fd_ratio=row["features_fd_ratio"], label_accuracy=None)
            nn_rms, nn_idx = nearest_neighbour_rms(x, train_x, return_index=True)
            if volumes:
                row.update(volume_scores(x, train_x, train_hist, nn_idx))
            row.update(
                duplicates=near_duplicate_fraction(x, dup_threshold),
                memorised=float((nn_rms < mem_threshold).mean()),
                **extra,
            )
            return row

        floor_row = judge("real_test", test_x, test.labels, {"seconds_per_1000": None})
        references = {
            "blurred_real": judge(
                "blurred_real",
                gaussian_blur(test_x[:n_eval], float(sec.get("blur_sigma", 1.0)) * test_x.shape[-1] / 28),
                None,
                {"seconds_per_1000": None},
            ),
            "noise": judge("noise", noise_images(train_x, n_eval, seed=0), None, {"seconds_per_1000": None}),
        }
        # the noise check scores coverage in the label-free features when that judge is in use
        cov_key = "features_coverage" if "features" in judge_names else "coverage"

        def check_noise(row: dict) -> None:
            row["structure"], row["noise_check"] = noise_check(
                row.get(cov_key), references["noise"].get(cov_key), floor_row.get(cov_key)
            )

        for row in (floor_row, *references.values()):
            check_noise(row)
        sets: dict[str, dict] = {}
        for name in cfg["sample"]["models"]:
            spec = parse_sample_set(name)
            npy, rec_path = paths.samples(name, "npy"), paths.samples(name, "json")
            for f in (npy, rec_path):
                if not f.is_file():
                    raise StageInputError(
                        f" {f} does not exist; run `python -m pipeline sample --sample-set {name}` (or snakemake) first"
                    )
            arr = np.load(npy)
            want = tuple(train_x.shape[1:])
            if (
                arr.ndim != train_x.dim()
                or arr.shape[1:] != want
                or arr.dtype != np.float32
                or not np.isfinite(arr).all()
                or arr.min() < 0
                or arr.max() > 1
            ):
                raise StageInputError(
                    f"{npy} must hold float32 (N, {', '.join(map(str, want))}) images in [0, 1] (the dataset's shape); "
                    f"got {arr.dtype} {arr.shape}"
                )
            rec = read_json(rec_path)
            n_cls = int(rec.get("num_classes") or info.num_classes)  # the prior's classes
            labels = requested_labels(len(arr), n_cls) if spec.conditional and clf is not None else None
            sets[name] = judge(
                name,
                torch.from_numpy(arr),
                labels,
                {
                    "seconds_per_1000": rec.get("seconds_per_1000"),
                    "num_samples": len(arr),
                    "steps": rec.get("steps"),
                    "temperature": rec.get("temperature"),
                    "guidance_scale": spec.guidance,
                    "prior_budget": rec.get("prior_budget", 1.0),
                    "prior_steps": rec.get("prior_steps"),
                    "prior_train_seconds": rec.get("prior_train_seconds"),
                },
            )
            check_noise(sets[name])
            log.info(
                "evaluate %s: FD %.3f (floor %.3f, %s judge), duplicates %.3f, noise check %s",
                name,
                sets[name]["fd_train"],
                sets[name]["fd_floor_same_n"],
                primary,
                sets[name]["duplicates"],
                sets[name]["noise_check"],
            )
            if sets[name]["noise_check"] == "noise":
                log.warning(
                    "evaluate %s: the samples are reported as NOISE (structure %.2f)", name, sets[name]["structure"]
                )

        stage_metrics = _carry(paths)
        studies = _studies(sets, stage_metrics)
        curves = plot_training_curves(paths.root, out / "training_curves.png")
        result = {
            "run": str(paths.root),
            "evaluation": {
                "judges": list(judge_names),
                "num_images": n_eval,
                "num_train_reference": len(train_x),
                "feature_dim": int(spaces[primary]["train"].shape[1]),
                "precision_recall_k": k_pr,
                "encoder_test_view_retrieval": stage_metrics.get("encoder", {}).get("test_view_retrieval"),
                "duplicate_threshold_rms": dup_threshold,
                "memorisation_threshold_rms": mem_threshold,
                "memorisation_quantile": float(sec["memorisation_quantile"]),
                "classifier_test_accuracy": stage_metrics.get("classifier", {}).get("test_accuracy"),
                "noise_check": {
                    "coverage": cov_key,
                    "threshold": NOISE_STRUCTURE_THRESHOLD,
                    "noise_coverage": references["noise"].get(cov_key),
                    "real_coverage": floor_row.get(cov_key),
                    "noise_sets": [n for n, r in sets.items() if r["noise_check"] == "noise"],
                },
            },
            "floor": floor_row,
            "references": references,
            "sets": sets,
            "stages": stage_metrics,
            "studies": {k: [{c: r.get(c) for c, _ in v["columns"]} for r in v["rows"]] for k, v in studies.items()},
            "provenance": provenance(),
        }
        if "scaling" in studies:
            result["scaling_crossover"] = studies["scaling"]["crossover"]
            plot_scaling(studies["scaling"]["rows"], out / "scaling.png")
        write_json(out / "metrics.json", result)
        columns = set_columns(judge_names, volumes=volumes)
        refs = list(references.values())
        md_sets, tsv_sets = _table([floor_row, *refs, *sets.values()], columns)
        atomic_write_text(out / "sets.tsv", tsv_sets)
        specs = {n: parse_sample_set(n) for n in sets}
        uncond = [r for n, r in sets.items() if not specs[n].conditional and specs[n].budget in (None, 1.0)]
        cond = [r for n, r in sets.items() if specs[n].conditional and specs[n].budget in (None, 1.0)]
        prov = result["provenance"]
        lines = [
            f"# Sample quality of run `{paths.root.name}`\n",
            f"Made at commit `{prov['commit']}`{' (with uncommitted changes)' if prov['dirty'] else ''} by the "
            "evaluate stage "
            f"(`python -m pipeline evaluate --run {paths.root}`, run by `snakemake`), {prov['date']}.\n",
            judge_sentence(result["evaluation"], judge_names, n_eval, len(train_x), floor_row),
            f"Reference rows: `blurred_real` (the test images blurred, Gaussian sigma "
            f"{float(sec.get('blur_sigma', 1.0)) * test_x.shape[-1] / 28:.2g} px) and `noise` (per-pixel Gaussian "
            "noise with the train images' mean and std): a good set lies between the floor and them. "
            f"Precision/recall: k-NN manifolds (k = {k_pr}) against N train images (Kynkäänniemi et al. 2019). "
            f"Near-duplicates: nearest other sample within RMS {dup_threshold:g}; memorised: nearer to a train image "
            "than "
            f"{100 * float(sec['memorisation_quantile']):g} % of real test images are (RMS {mem_threshold:.3f}).\n",
            noise_sentence(result["evaluation"]["noise_check"]),
        ]
        if uncond:
            lines += [
                "## Unconditional samples (the study's question)\n",
                _table([floor_row, *refs, *uncond], columns)[0],
            ]
        if cond:
            lines += ["## Class-conditional samples\n", _table([floor_row, *refs, *cond], columns)[0]]
        lines += ["## All sample sets\n", md_sets]
        for key, study in studies.items():
            md, tsv = _table(study["rows"], study["columns"])
            atomic_write_text(out / f"{key}.tsv", tsv)
            lines += [f"## {study['title']}\n", md]
            if key == "scaling":
                lines += [f"**Crossover:** {study['crossover']['statement']}. Plot: `scaling.png`.\n"]
        st = stage_metrics
        lines += [
            "## Training stages\n",
            _table(
                [
                    row
                    for row in [
                        {
                            "stage": "vqvae",
                            "metric": "test reconstruction MSE / perplexity / codes in use",
                            "value": " / ".join(
                                _fmt(st.get("vqvae", {}).get(k))
                                for k in ("test_recon_mse", "test_perplexity", "test_codes_in_use")
                            ),
                        },
                        {
                            "stage": "classifier",
                            "metric": "test accuracy",
                            "value": _fmt(st.get("classifier", {}).get("test_accuracy")),
                        },
                        {
                            "stage": "encoder",
                            "metric": "label-free judge: final NT-Xent / test view retrieval",
                            "value": " / ".join(
                                _fmt(st.get("encoder", {}).get(k)) for k in ("final_train_loss", "test_view_retrieval")
                            ),
                        },
                        {
                            "stage": "pixelcnn",
                            "metric": "test NLL nats/code (unconditional prior)",
                            "value": _fmt(st.get("pixelcnn", {}).get("test_nll_nats_per_code")),
                        },
                        {
                            "stage": "pixelcnn_cond",
                            "metric": "test NLL nats/code (null label / given the label)",
                            "value": " / ".join(
                                _fmt(st.get("pixelcnn_cond", {}).get(k))
                                for k in ("test_nll_nats_per_code", "test_nll_conditional_nats_per_code")
                            ),
                        },
                        {
                            "stage": "diffusion",
                            "metric": "final train loss / test epsilon-MSE EMA / raw",
                            "value": " / ".join(
                                _fmt(st.get("diffusion", {}).get(k), 4)
                                for k in ("final_train_loss", "test_loss_ema", "test_loss_raw")
                            ),
                        },
                        {
                            "stage": "diffusion_cond",
                            "metric": "test epsilon-MSE EMA (null label / given the label)",
                            "value": " / ".join(
                                _fmt(st.get("diffusion_cond", {}).get(k), 4)
                                for k in ("test_loss_ema", "test_loss_conditional_ema")
                            ),
                        },
                    ]
                    if row["stage"] in st  # the stages this run has
                ],
                [("stage", "stage"), ("metric", "metric"), ("value", "value")],
            )[0],
        ]
        atomic_write_text(out / "summary.md", "\n".join(lines))
        metrics.update(
            num_sets=len(sets),
            num_images=n_eval,
            floor_fd=floor_row["fd_train"],
            noise_sets=result["evaluation"]["noise_check"]["noise_sets"],
            curves=curves,
        )
    return metrics
