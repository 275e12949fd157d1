"""The evaluate stage: sample-quality numbers for every sample set, in one report per run.

The judges: the run's own digit classifier (``train_classifier``, on labelled data; its test
accuracy is part of the report: below ~97 % the numbers mean little) and/or the label-free
SimCLR encoder (``train_simclr``), as :func:`pipeline.sources.judges` decides. For every sample set, for
the real test images (the *floor*: what real data scores) and for two reference rows (blurred
real images, noise) :func:`score_set` computes

* ``confidence``: mean max softmax probability of the classifier, in [1/C, 1];
* ``class_entropy``: entropy (nats) of the histogram of predicted classes, in [0, ln C];
  low = some classes are never drawn (mode dropping);
* ``fd_train`` / ``fd_test``: the **Fréchet distance** between Gaussians fitted to the judge's
  features of the first N samples and of the real train images (all of them) / the first N
  real test images, d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Dowson & Landau
  1982; Heusel et al. 2017 eq. 6), computed with ``scipy.linalg.sqrtm`` as pytorch-fid does.
  N = ``evaluate.num_images`` (or fewer when a set has fewer images; the FD of the first n
  real test images against train, ``fd_floor_same_n``, is then the fair floor, since the FD
  estimate is biased upwards at small N); ``fd_ratio`` = fd_train / floor; the label-free
  judge's are ``features_fd``, ``features_fd_floor``, ``features_fd_ratio``, and
  ``headline_fd`` / ``headline_fd_floor`` / ``headline_fd_ratio`` repeat the leading judge's;
* ``precision`` / ``recall`` / ``coverage`` (and for the label-free judge ``density``):
  k-NN manifold metrics (Kynkäänniemi et al. 2019; Naeem et al. 2020);
* ``duplicates``: fraction of samples whose nearest other sample is within RMS pixel distance
  ``duplicate_threshold`` (mode collapse; greedy decoding gives 1.0);
* ``memorised``: fraction of samples closer (RMS) to a train image than the
  ``memorisation_quantile`` quantile of the real test images' distances to their nearest train image;
* ``label_accuracy`` (conditional sets): fraction the classifier assigns to the requested label;
* ``structure`` / ``noise_check``: :func:`noise_check`.

The training stages' metrics are carried into the same ``metrics.json`` (keys documented in
docs/reference.md); :mod:`pipeline.report` writes ``summary.md``, the TSVs and the plots.
Evaluation never runs under autocast: features and distances are float32/float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import report
from pipeline.augment import gaussian_blur
from pipeline.io import RunPaths, StageInputError, read_json, write_json
from pipeline.runtime import Progress, log, resolve_device, stage_record
from pipeline.sources import judges

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
    "JudgeSpace",
    "Judging",
    "build_judging",
    "score_set",
    "load_sample_set",
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
    queries: torch.Tensor,
    refs: torch.Tensor,
    exclude_self: bool = False,
    chunk: int = 1024,
    return_index: bool = False,
    progress_name: str | None = None,
):
    """RMS pixel distance from each query to its nearest reference image.

    Args:
        queries: float (N, ...) images; refs: float (M, ...) images of the same shape, or a
            :class:`pipeline.streaming.SplitImages` (read ``chunk`` rows at a time).
        exclude_self: ``queries`` is ``refs``: skip each image's distance to itself.
        return_index: also return the index (N,) int64 of each nearest reference.
        progress_name: log progress lines under this name (for large sets: N x M distances).

    Returns:
        float64 (N,) distances, sqrt(mean squared pixel difference) (images in [0, 1] give [0, 1]);
        with ``return_index``, (distances, indices).
    """
    if not isinstance(refs, torch.Tensor):
        return _nearest_streamed(queries, refs, chunk, return_index, progress_name)
    q, r = queries.flatten(1).double(), refs.flatten(1).double()
    d = q.shape[1]
    out, idx = [], []
    progress = Progress(progress_name or "", len(q), minimum=1 if progress_name else 2**62, every=chunk * 10)
    for s in range(0, len(q), chunk):
        dist = torch.cdist(q[s : s + chunk], r)
        if exclude_self:
            rows = torch.arange(len(dist))
            dist[rows, rows + s] = float("inf")
        best = dist.min(dim=1)
        out.append(best.values)
        idx.append(best.indices)
        progress.tick(min(s + chunk, len(q)))
    distances = (torch.cat(out) / math.sqrt(d)).numpy()
    return (distances, torch.cat(idx).numpy()) if return_index else distances


def _nearest_streamed(queries: torch.Tensor, refs, chunk: int, return_index: bool, progress_name: str | None):
    """:func:`nearest_neighbour_rms` against references read ``chunk`` rows at a time (a running
    minimum over the chunks: one chunk of references in memory)."""
    q = queries.flatten(1).double()
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)
    where = torch.zeros(len(q), dtype=torch.int64)
    progress = Progress(progress_name or "", len(refs), minimum=1 if progress_name else 2**62, every=chunk * 10)
    start = 0
    for r in refs.chunks(chunk):
        r = r.flatten(1).double()
        for s in range(0, len(q), chunk):
            m = torch.cdist(q[s : s + chunk], r).min(dim=1)
            better = m.values < best[s : s + chunk]
            best[s : s + chunk] = torch.where(better, m.values, best[s : s + chunk])
            where[s : s + chunk] = torch.where(better, m.indices + start, where[s : s + chunk])
        start += len(r)
        progress.tick(start)
    distances = (best / math.sqrt(q.shape[1])).numpy()
    return (distances, where.numpy()) if return_index else distances


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


#: a set is reported as noise when its coverage is nearer the noise row's than the real test
#: images' (the midpoint, not a fitted constant; validated on the ladders of docs/volumes.md,
#: "The noise check", in 3D and in 2D)
NOISE_STRUCTURE_THRESHOLD = 0.5
#: 2D images: the noise check's coverage is taken on the pixels average-pooled to about this many
#: pixels a side (28 x 28 -> 14 x 14), where blur and mild noise barely move a digit but noise and
#: an untrained model's blobs stay far (benchmarks/judge_ladder.py; docs/volumes.md)
NOISE_CHECK_SIDE = 14


def pooled_pixels(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> float32 (N, F): each image average-pooled by
    max(1, round(min(H, W) / NOISE_CHECK_SIDE)) and flattened: the noise check's 2D space."""
    f = max(1, round(min(x.shape[-2:]) / NOISE_CHECK_SIDE))
    return torch.nn.functional.avg_pool2d(x.float(), f).flatten(1).numpy()


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
    (1), ``structure = (c - c_noise) / (c_real - c_noise)``. Coverage, not FD or precision:
    FD alone does not tell an untrained model from a trained one in 3D, and noise can score a
    high precision (a tight cluster inside the real outliers' k-NN balls); coverage separates
    both. The measurements behind that choice and the threshold's validation
    (``benchmarks/noise_check.py``) are in docs/volumes.md, "The noise check".

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


def noise_images(train, n: int, seed: int = 0) -> torch.Tensor:
    """float (n, C, H, W) in [0, 1]: per-pixel Gaussian noise with the train images' per-pixel mean
    and std (clamped): the "noise" reference row, the far end of the scale. ``train``: float
    (N, C, H, W) in [0, 1], or a :class:`pipeline.streaming.SplitImages` (read in chunks)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(train, torch.Tensor):
        mean, std = train.float().mean(0), train.float().std(0)
    else:  # a streamed split: per-pixel moments batch by batch
        from pipeline.streaming import RunningMoments

        moments = RunningMoments()
        for chunk in train.chunks(1024):
            moments.add(chunk.flatten(1), full=False)
        shape = tuple(train.shape[1:])
        mean = torch.from_numpy(moments.mean()).float().view(shape)
        std = torch.from_numpy(moments.std()).float().view(shape)
    return (mean + std * torch.randn((n, *train.shape[1:]), generator=g)).clamp(0, 1)


# --- the evaluate stage ------------------------------------------------------------------------
@dataclass
class JudgeSpace:
    """One judge's feature space, built once per evaluation.

    Attributes:
        name: "classifier" (the run's digit classifier) or "features" (the label-free encoder).
        embed: float images (N, ...) in [0, 1] -> float features (N, F) numpy.
        train: features of all train images; stats: their (mean, covariance).
        test: features of the first ``num_images`` real test images.
    """

    name: str
    embed: Callable[[torch.Tensor], np.ndarray]
    train: np.ndarray
    stats: tuple[np.ndarray, np.ndarray]
    test: np.ndarray
    floors: dict[int, float] = field(default_factory=dict)

    def floor(self, n: int) -> float:
        """FD of the first n real test images against train: the floor of a set of n images."""
        if n not in self.floors:
            self.floors[n] = frechet_distance(*feature_statistics(self.test[:n]), *self.stats)
        return self.floors[n]


@dataclass
class Judging:
    """Everything :func:`score_set` compares a set with: the judges' spaces (the first leads the
    table's FD columns), the classifier and its outputs on the real test images, the train
    images, N, and the duplicate and memorisation thresholds (RMS pixel distances)."""

    spaces: dict[str, JudgeSpace]
    classifier: torch.nn.Module | None
    real_test: dict | None
    train_x: torch.Tensor
    num_images: int
    duplicate_threshold: float
    memorisation_threshold: float
    precision_recall_k: int
    device: torch.device
    batch_size: int
    train_histogram: np.ndarray | None = None
    pixel_train: np.ndarray | None = None

    @property
    def primary(self) -> str:
        return next(iter(self.spaces))


def _in_parts(embed: Callable, x: torch.Tensor, batch_size: int, name: str, parts: int = 10) -> np.ndarray:
    """``embed(x)`` in about ``parts`` parts of whole batches, with a progress line per part, for
    sets of 20 batches or more (the same batches as one call: the same features)."""
    if len(x) < 20 * batch_size:
        return embed(x)
    step = batch_size * -(-len(x) // (batch_size * parts))
    progress = Progress(name, len(x), every=1)
    out = []
    for s in range(0, len(x), step):
        out.append(embed(x[s : s + step]))
        progress.tick(min(s + step, len(x)))
    return np.concatenate(out)


def _streamed_features(embed: Callable, train, batch_size: int, keep: int, name: str):
    """A judge's features of a streamed train split (:class:`pipeline.streaming.SplitImages`):
    (the first ``keep`` rows' features (keep, F) for precision/recall, their (mean, covariance)
    over all rows, accumulated chunk by chunk: memory independent of the split's size)."""
    from pipeline.streaming import RunningMoments

    moments, first = RunningMoments(), []
    progress = Progress(name, len(train), every=1)
    size = batch_size * max(1, 10_000 // batch_size)
    done = 0
    for chunk in train.chunks(size):
        feats = np.asarray(embed(chunk))
        moments.add(feats)
        if sum(len(f) for f in first) < keep:
            first.append(feats[: keep - sum(len(f) for f in first)])
        done += len(chunk)
        progress.tick(done)
    return np.concatenate(first), (moments.mean(), moments.cov())


def build_judging(
    cfg: Mapping, paths: RunPaths, judge_names, train_x: torch.Tensor, test_x: torch.Tensor, device
) -> Judging:
    """Load the judges of ``judge_names`` and embed the train and the first ``num_images`` test
    images once (one pass per judge); derive the memorisation threshold from the real test
    images' distances to their nearest train image (``evaluate.memorisation_quantile``)."""
    from pipeline.checkpoint import load_model

    section = cfg["evaluate"]
    bs, n_eval = int(section["batch_size"]), min(int(section["num_images"]), len(test_x))
    clf = load_model(paths.classifier_model, device=device)[0] if "classifier" in judge_names else None
    enc = load_model(paths.simclr_model, device=device)[0] if "features" in judge_names else None
    embedders = {
        "classifier": lambda x: judge_images(clf, x.to(device), bs)["features"],
        "features": lambda x: enc.embed(x, bs).numpy(),
    }
    trained = {}
    for name in judge_names:
        label = f"evaluate: {name} features of the train images"
        if isinstance(train_x, torch.Tensor):
            feats = _in_parts(embedders[name], train_x, bs, label)
            trained[name] = (feats, feature_statistics(feats))
        else:
            trained[name] = _streamed_features(embedders[name], train_x, bs, n_eval, label)
    real_test = judge_images(clf, test_x[:n_eval].to(device), bs) if clf is not None else None
    spaces = {}
    for name in judge_names:
        test = real_test["features"] if name == "classifier" else embedders[name](test_x[:n_eval])
        spaces[name] = JudgeSpace(name, embedders[name], *trained[name], test)
    test_nn_train = nearest_neighbour_rms(test_x, train_x, progress_name="evaluate: test images' nearest train image")
    histogram, pixel_train = None, None
    if test_x.dim() == 4:  # the noise check's 2D space: the first n train images, pooled
        first = train_x[:n_eval] if isinstance(train_x, torch.Tensor) else next(train_x.chunks(n_eval))
        pixel_train = pooled_pixels(first)
    if train_x.dim() == 5:
        from pipeline.streaming import chunks_of
        from pipeline.volumes import intensity_counts

        counts = sum(intensity_counts(v) for v in chunks_of(train_x, 16))
        histogram = counts / max(counts.sum(), 1.0)
    return Judging(
        spaces=spaces,
        classifier=clf,
        real_test=real_test,
        train_x=train_x,
        num_images=n_eval,
        duplicate_threshold=float(section["duplicate_threshold"]),
        memorisation_threshold=float(np.quantile(test_nn_train, float(section["memorisation_quantile"]))),
        precision_recall_k=int(section.get("precision_recall_k", 3)),
        device=device,
        batch_size=bs,
        train_histogram=histogram,
        pixel_train=pixel_train,
    )


def _mean_over_draws(values: list[dict]) -> dict:
    """Key-wise mean of a list of dicts of floats."""
    return {key: float(np.mean([v[key] for v in values])) for key in values[0]}


def _judge_scores(judging: Judging, space: JudgeSpace, name: str, x: torch.Tensor, labels, n: int) -> dict:
    """One judge's numbers of a set: FD and its floor, precision, recall, density, coverage;
    for the classifier also confidence, class entropy, FD vs test and label accuracy. Keys as in
    ``metrics.json`` (docs/reference.md).

    ``x`` holds k >= 1 disjoint draws of ``n`` images (k n images, k = len(x) // n): FD, FD vs
    test, precision, recall, density and coverage are the means over the k draws of n (the
    expected score at N = n, which the floor at n is the real test images' draw of; its spread
    from draw to draw is ``*_fd_ratio_sd``), so that a set with more samples than N is judged
    at N with the variance of one draw cut by k (measured on anatomy3d: FD / floor of one
    draw of 40 has a standard deviation of about 0.8-1.1)."""
    real = name == "real_test"
    k = len(x) // n  # score_set hands over exactly k n images (the floor row: its first n)
    if space.name == "classifier":
        outputs = (
            judging.real_test if real else judge_images(judging.classifier, x.to(judging.device), judging.batch_size)
        )
        feats = space.test[:n] if real else outputs["features"]
    else:
        feats = space.test[:n] if real else space.embed(x)
    draws = np.split(np.asarray(feats)[: k * n], k)
    stats = [feature_statistics(d) for d in draws]
    fds = [frechet_distance(mu, sig, *space.stats) for mu, sig in stats]
    fd, floor = float(np.mean(fds)), space.floor(n)
    sd = float(np.std(fds, ddof=1) / floor) if k > 1 and floor > 0 else None
    pr = _mean_over_draws([precision_recall(space.train[:n], d, judging.precision_recall_k) for d in draws])
    if space.name != "classifier":
        return {
            "features_fd": fd,
            "features_fd_floor": floor,
            "features_fd_ratio": fd / floor if floor > 0 else None,
            "features_fd_ratio_sd": sd,
            "features_fd_draws": k,
            "features_precision": pr["precision"],
            "features_recall": pr["recall"],
            "features_density": pr["density"],
            "features_coverage": pr["coverage"],
        }
    test_stats = feature_statistics(space.test)
    fd_test = 0.0 if real else float(np.mean([frechet_distance(mu, sig, *test_stats) for mu, sig in stats]))
    return {
        "confidence": outputs["confidence"],
        "class_entropy": outputs["class_entropy"],
        "fd_train": fd,
        "fd_test": fd_test,
        "fd_floor_same_n": floor,
        "fd_ratio": fd / floor if floor > 0 else None,
        "fd_ratio_sd": sd,
        "fd_draws": k,
        "precision": pr["precision"],
        "recall": pr["recall"],
        "coverage": pr["coverage"],
        "label_accuracy": float((outputs["pred"][:n] == labels[:n]).mean()) if labels is not None else None,
    }


def score_set(judging: Judging, name: str, images: torch.Tensor, labels: np.ndarray | None, extra: dict) -> dict:
    """The row of one set in the report: float ``images`` (M, ...) in [0, 1] scored by every
    judge (:func:`_judge_scores`) at n = min(``num_images``, M) in k = M // n disjoint draws of n
    (FD, precision/recall/density/coverage and the 2D pixel coverage are means over the draws;
    memorisation counts all k n images; near-duplicates and the 3D scores read the first n;
    the floor row is one draw), then near-duplicates, memorisation and, for volumes, the 3D
    scores; ``extra`` (the sampler's record) is appended. ``labels``
    int (N,) are the requested classes of a conditional set (None otherwise); the name
    ``real_test`` scores the real test images against themselves (the floor row).

    ``headline_fd``, ``headline_fd_floor`` and ``headline_fd_ratio`` repeat the FD vs train, its
    floor and their ratio of the leading judge (``evaluation.judges[0]``: the classifier when it
    judges, else the label-free encoder): the study tables' FD columns; ``headline_fd_ratio_sd``
    its standard deviation over the draws (None for one draw) and ``headline_fd_draws`` k."""
    n = min(judging.num_images, len(images))
    k = 1 if name == "real_test" else max(1, len(images) // n)
    x, drawn = images[:n], images[: k * n]
    row = {"name": name, "n": n}
    for space in judging.spaces.values():
        row.update(_judge_scores(judging, space, name, drawn, labels, n))
    if judging.primary == "features":
        row.update(label_accuracy=None)
        lead = ("features_fd", "features_fd_floor", "features_fd_ratio", "features_fd_ratio_sd", "features_fd_draws")
    else:
        lead = ("fd_train", "fd_floor_same_n", "fd_ratio", "fd_ratio_sd", "fd_draws")
    headline = ("headline_fd", "headline_fd_floor", "headline_fd_ratio", "headline_fd_ratio_sd", "headline_fd_draws")
    row.update(zip(headline, (row[key] for key in lead)))
    nn_rms, nn_idx = nearest_neighbour_rms(drawn, judging.train_x, return_index=True)
    memorised = float((nn_rms < judging.memorisation_threshold).mean())  # over all k draws
    if judging.train_histogram is not None:
        from pipeline.volumes import volume_scores

        row.update(volume_scores(x, judging.train_x, judging.train_histogram, nn_idx[:n]))
    if judging.pixel_train is not None:  # the 2D noise check's coverage (:func:`_noise_checker`)
        draws = np.split(pooled_pixels(drawn), k)
        covs = [precision_recall(judging.pixel_train, d, judging.precision_recall_k)["coverage"] for d in draws]
        row["pixel_coverage"] = float(np.mean(covs))
    row.update(
        duplicates=near_duplicate_fraction(x, judging.duplicate_threshold),
        memorised=memorised,
        **extra,
    )
    return row


def load_sample_set(paths: RunPaths, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """A sample set's images and record: ``samples/<name>.npy`` (float32 (N, *shape) in [0, 1])
    and ``samples/<name>.json``.

    Raises:
        pipeline.io.StageInputError: a file is missing, or the images have another shape, dtype
            or value range (the file is named).
    """
    npy, rec_path = paths.samples(name, "npy"), paths.samples(name, "json")
    for f in (npy, rec_path):
        if not f.is_file():
            raise StageInputError(
                f" {f} does not exist; run `python -m pipeline sample --sample-set {name}` (or snakemake) first"
            )
    arr = np.load(npy)
    if (
        arr.ndim != 1 + len(shape)
        or arr.shape[1:] != tuple(shape)
        or arr.dtype != np.float32
        or not np.isfinite(arr).all()
        or arr.min() < 0
        or arr.max() > 1
    ):
        raise StageInputError(
            f"{npy} must hold float32 (N, {', '.join(map(str, shape))}) images in [0, 1] (the dataset's shape); "
            f"got {arr.dtype} {arr.shape}"
        )
    return arr, read_json(rec_path)


def _set_extra(record: Mapping, spec) -> dict:
    """The sampler's numbers a set's row carries (from ``samples/<set>.json``)."""
    return {
        "seconds_per_1000": record.get("seconds_per_1000"),
        "num_samples": record.get("num_samples"),
        "steps": record.get("steps"),
        "temperature": record.get("temperature"),
        "guidance_scale": spec.guidance,
        "prior_budget": record.get("prior_budget", 1.0),
        "prior_steps": record.get("prior_steps"),
        "prior_train_seconds": record.get("prior_train_seconds"),
    }


def _noise_checker(judging: Judging, floor_row: Mapping, noise_row: Mapping) -> tuple[str, Callable[[dict], None]]:
    """(the coverage key the noise check reads, a function that adds ``structure`` and
    ``noise_check`` to a row): for 2D images the coverage of the pooled pixels
    (:func:`pooled_pixels`; a classifier's features are not blur-invariant: it names 22 % of
    1.5-pixel-blurred test digits, which people read, and their coverage in its features is
    below the untrained model's), for volumes the label-free judge's."""
    if judging.pixel_train is not None:
        key = "pixel_coverage"
    else:
        key = "features_coverage" if "features" in judging.spaces else "coverage"

    def check(row: dict) -> None:
        row["structure"], row["noise_check"] = noise_check(row.get(key), noise_row.get(key), floor_row.get(key))

    return key, check


def _score_sample_sets(cfg, paths, judging, info, check) -> dict[str, dict]:
    """Every set of ``sample.sets`` scored (:func:`score_set`) and noise-checked, in order."""
    from pipeline.sets import parse_sample_set, requested_labels

    shape = tuple(judging.train_x.shape[1:])
    sets: dict[str, dict] = {}
    for name in cfg["sample"]["sets"]:
        spec = parse_sample_set(name)
        arr, record = load_sample_set(paths, name, shape)
        n_cls = int(record.get("num_classes") or info.num_classes)  # the prior's classes
        labels = requested_labels(len(arr), n_cls) if spec.conditional and judging.classifier is not None else None
        row = score_set(
            judging, name, torch.from_numpy(arr), labels, _set_extra({**record, "num_samples": len(arr)}, spec)
        )
        check(row)
        sets[name] = row
        log.info(
            "evaluate %s: FD %.3f (floor %.3f, %s judge), duplicates %.3f, noise check %s",
            name,
            row["headline_fd"],
            row["headline_fd_floor"],
            judging.primary,
            row["duplicates"],
            row["noise_check"],
        )
        if row["noise_check"] == "noise":
            log.warning("evaluate %s: the samples are reported as NOISE (structure %.2f)", name, row["structure"])
    return sets


def _tensorboard(folder, sets: Mapping[str, dict]) -> None:
    """Every set's FD / floor (the leading judge's), coverage and noise-check structure as
    TensorBoard scalars ``fd_over_floor/<set>``, ``coverage/<set>``, ``structure/<set>``, at the
    step count of the prior the set was drawn from."""
    from pipeline.training import TensorBoard

    board = TensorBoard(folder)
    for name, row in sets.items():
        step = int(row.get("prior_steps") or 0)
        cov = row.get("features_coverage", row.get("coverage"))
        values = {"fd_over_floor": row.get("headline_fd_ratio"), "coverage": cov, "structure": row.get("structure")}
        board.scalars(step, {f"{key}/{name}": v for key, v in values.items()}, prefix="")
    board.close()


def _train_reference(cfg: Mapping, paths: RunPaths, info, device):
    """The train images the judges compare against: float32 (N, C, *S) in [0, 1] in memory while
    they fit, else a :class:`pipeline.streaming.SplitImages` read in chunks (``data_loading``)."""
    from pipeline.data import read_dataset, split_length
    from pipeline.streaming import SplitImages, choose_path

    n = split_length(paths.dataset, "train")
    setting = str(cfg.get("data_loading", "auto"))
    path = choose_path(setting, 4 * n * int(np.prod(info.shape)), torch.device("cpu"))
    log.info("evaluate: %d train images, %s path (data_loading: %s)", n, path, setting)
    if path == "memory":
        return read_dataset(paths.dataset, "train").unit()
    return SplitImages(paths.dataset, "train", info.max_value)


def evaluate(cfg: Mapping, run_dir: str | os.PathLike, threads: int | None = None) -> dict:
    """The evaluate stage: judge every set of ``sample.sets`` and the real test images.

    Reads ``evaluate`` (judge, precision_recall_k, blur_sigma, num_images, duplicate_threshold,
    memorisation_quantile, batch_size) and ``sample.sets``; needs ``data/dataset.h5``, the
    judges' models (``classifier/model.pt`` and/or ``simclr/model.pt``) and
    ``samples/<set>.npy`` + ``.json`` for every set. Writes ``report/metrics.json`` (the report,
    keys in docs/reference.md), the tables and plots of :mod:`pipeline.report`
    (``summary.md``, ``sets.tsv``, ``<study>.tsv``, ``training_curves.png``) and the stage
    record ``report/record.json``.

    Raises:
        pipeline.io.StageInputError: a sample set's ``.npy`` or ``.json`` is missing or holds the
            wrong shape, dtype or value range (the file is named); the classifier judge asked
            for on unlabelled data.
    """
    from pipeline.data import read_dataset, read_info

    paths = RunPaths(run_dir)
    section = cfg["evaluate"]
    out = paths.report
    # the stage record (wall time, host) is record.json: metrics.json is the report itself
    with stage_record("evaluate", cfg, out, metrics_name="record.json", threads=threads) as metrics:
        device = resolve_device(cfg["device"])
        info = read_info(paths.dataset)
        judge_names = judges(cfg, info.num_classes)
        test = read_dataset(paths.dataset, "test")
        train_x, test_x = _train_reference(cfg, paths, info, device), test.unit()
        if len(test_x) < int(section["num_images"]):
            log.warning(
                "evaluate: the test split has %d images; Fréchet distances use N = %d, not %d",
                len(test_x),
                len(test_x),
                section["num_images"],
            )
        judging = build_judging(cfg, paths, judge_names, train_x, test_x, device)
        n_eval = judging.num_images
        none = {"seconds_per_1000": None}
        floor_row = score_set(judging, "real_test", test_x, test.labels, none)
        blur_px = float(section.get("blur_sigma", 1.0)) * test_x.shape[-1] / 28
        references = {
            "blurred_real": score_set(judging, "blurred_real", gaussian_blur(test_x[:n_eval], blur_px), None, none),
            "noise": score_set(judging, "noise", noise_images(train_x, n_eval, seed=0), None, none),
        }
        cov_key, check = _noise_checker(judging, floor_row, references["noise"])
        for row in (floor_row, *references.values()):
            check(row)
        sets = _score_sample_sets(cfg, paths, judging, info, check)
        stages = report.stage_metrics(paths)
        studies = report.build_studies(sets, stages)
        curves = report.plot_training_curves(paths.root, out / "training_curves.png")
        result = {
            "run": str(paths.root),
            "evaluation": {
                "judges": list(judge_names),
                "num_images": n_eval,
                "num_train_reference": len(train_x),
                "feature_dim": int(judging.spaces[judging.primary].train.shape[1]),
                "precision_recall_k": judging.precision_recall_k,
                "simclr_test_view_retrieval": stages.get("simclr", {}).get("test_view_retrieval"),
                "duplicate_threshold_rms": judging.duplicate_threshold,
                "memorisation_threshold_rms": judging.memorisation_threshold,
                "memorisation_quantile": float(section["memorisation_quantile"]),
                "blur_sigma_px": blur_px,
                "classifier_test_accuracy": stages.get("classifier", {}).get("test_accuracy"),
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
            "stages": stages,
            "studies": {k: [{c: r.get(c) for c, _ in v["columns"]} for r in v["rows"]] for k, v in studies.items()},
            "provenance": report.provenance(),
        }
        if "scaling" in studies:
            result["scaling_crossover"] = studies["scaling"]["crossover"]
        write_json(out / "metrics.json", result)
        report.write_tables(out, result, studies, volumes=train_x.dim() == 5)
        if cfg.get("tensorboard", True):
            _tensorboard(out / "tensorboard", sets)
        metrics.update(
            num_sets=len(sets),
            num_images=n_eval,
            floor_fd=floor_row["headline_fd"],
            noise_sets=result["evaluation"]["noise_check"]["noise_sets"],
            curves=curves,
        )
    return metrics
