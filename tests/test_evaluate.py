"""The evaluate stage: the Fréchet distance, the other sample-quality numbers, and metrics.json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import (
    class_entropy,
    feature_statistics,
    frechet_distance,
    near_duplicate_fraction,
    nearest_neighbour_rms,
)
from pipeline.sets import parse_sample_set

ROOT = Path(__file__).resolve().parents[1]


def _gauss(n, dim, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) * scale + shift


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = _gauss(2000, 16, 0)
    mu, sig = feature_statistics(f)
    assert frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_with_a_known_shift():
    f = _gauss(2000, 16, 0)
    mu, sig = feature_statistics(f)
    dists = []
    for delta in (0.0, 0.1, 0.5, 1.0, 2.0):
        mu2, sig2 = feature_statistics(f + delta)  # every coordinate shifted by delta: |mu1 - mu2|^2 = 16 delta^2
        d = frechet_distance(mu, sig, mu2, sig2)
        assert d == pytest.approx(16 * delta**2, rel=1e-6, abs=1e-6)
        dists.append(d)
    assert all(a < b for a, b in zip(dists, dists[1:]))


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # d^2 = |mu1 - mu2|^2 + sum (s1 - s2)^2 for diagonal covariances (standard deviations s)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    d = frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert d == pytest.approx(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum(), rel=1e-9)
    # and it is symmetric
    assert frechet_distance(mu2, np.diag(s2**2), mu1, np.diag(s1**2)) == pytest.approx(d, rel=1e-9)


def test_frechet_distance_of_two_samples_of_one_distribution_is_small_and_shrinks_with_n():
    small = [
        frechet_distance(*feature_statistics(_gauss(n, 8, 1)), *feature_statistics(_gauss(n, 8, 2)))
        for n in (100, 10000)
    ]
    assert small[1] < small[0] and small[1] < 0.05
    assert (
        frechet_distance(*feature_statistics(_gauss(1000, 8, 1)), *feature_statistics(_gauss(1000, 8, 2, scale=2.0)))
        > 5
    )


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_class_entropy():
    assert class_entropy(np.arange(1000) % 10) == pytest.approx(math.log(10))
    assert class_entropy(np.full(100, 3)) == 0.0
    assert class_entropy(np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))


def test_near_duplicates_and_nearest_neighbours():
    g = torch.Generator().manual_seed(0)
    distinct = torch.rand(20, 1, 28, 28, generator=g)
    assert near_duplicate_fraction(distinct, 0.05) == 0.0
    same = distinct[:1].repeat(20, 1, 1, 1)
    assert near_duplicate_fraction(same, 0.05) == 1.0
    half = torch.cat([distinct[:10], distinct[:10] + 0.01])  # each image has a twin at RMS 0.01
    assert near_duplicate_fraction(half, 0.05) == 1.0 and near_duplicate_fraction(half, 0.005) == 0.0
    d = nearest_neighbour_rms(distinct[:3] + 0.1, distinct)
    assert np.allclose(d, 0.1, atol=1e-6)  # a constant offset of 0.1 is RMS 0.1


def _documented_keys() -> set[str]:
    """The keys docs/reference.md's "report/metrics.json" section documents (first column, in backticks)."""
    text = (ROOT / "docs" / "reference.md").read_text()
    section = text.split("## `report/metrics.json`")[1].split("\n## ")[0]
    keys = set()
    for first_cell in re.findall(r"^\| ([^|]+) \|", section, re.M):
        keys |= set(re.findall(r"`([a-z0-9_]+)`", first_cell))
    return keys


def test_evaluate_writes_a_complete_documented_metrics_json(tiny_run, tiny_cfg):
    report = tiny_run / "report"
    m = json.loads((report / "metrics.json").read_text())
    documented = _documented_keys()
    assert {"run", "evaluation", "floor", "sets", "stages", "studies"} <= set(m)
    assert set(m["sets"]) == set(tiny_cfg["sample"]["sets"])
    keys = set(m) | set(m["evaluation"]) | set(m["floor"]) | set(m["stages"]) | set(m["studies"])
    for row in m["sets"].values():
        keys |= set(row)
    for stage in m["stages"].values():
        keys |= set(stage)
    undocumented = keys - documented
    assert not undocumented, f"metrics.json keys missing from docs/reference.md: {sorted(undocumented)}"
    n = tiny_cfg["evaluate"]["num_images"]
    for name, row in m["sets"].items():
        assert row["n"] == min(n, row["num_samples"])
        assert 0.1 <= row["confidence"] <= 1 and 0 <= row["class_entropy"] <= math.log(10) + 1e-9
        assert row["fd_train"] >= 0 and 0 <= row["duplicates"] <= 1 and 0 <= row["memorised"] <= 1
        assert (row["label_accuracy"] is not None) == parse_sample_set(name).conditional
    assert m["sets"]["pixelcnn_greedy"]["duplicates"] == 1.0  # argmax: every sample is the same grid
    assert m["sets"]["pixelcnn_greedy"]["class_entropy"] == 0.0
    assert m["floor"]["name"] == "real_test" and m["floor"]["fd_ratio"] == pytest.approx(1.0)
    assert m["stages"]["classifier"]["test_accuracy"] == m["evaluation"]["classifier_test_accuracy"]
    assert {"vqvae", "classifier", "pixelcnn", "diffusion"} <= set(m["stages"])
    assert {"sampling_layer", "diffusion_steps", "guidance"} <= set(m["studies"])
    summary = (report / "summary.md").read_text()
    assert "| real_test |" in summary and "| pixelcnn_greedy |" in summary
    for name in ("sets.tsv", "sampling_layer.tsv", "guidance.tsv", "training_curves.png"):
        assert (report / name).stat().st_size > 0


def test_evaluate_names_a_missing_sample_file(tiny_run, tiny_cfg, tmp_path):
    import shutil

    from pipeline.evaluate import evaluate
    from pipeline.io import StageInputError

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    (run / "samples" / "pixelcnn.npy").unlink()
    with pytest.raises(StageInputError, match=r"pixelcnn\.npy does not exist"):
        evaluate(tiny_cfg, str(run))
    np.save(run / "samples" / "pixelcnn.npy", np.zeros((3, 28, 28), np.float32))
    with pytest.raises(StageInputError, match=r"float32 \(N, 1, 28, 28\)"):
        evaluate(tiny_cfg, str(run))


def test_scaling_crossover_by_hand():
    """Two log-log straight lines: PixelCNN FD/floor 8, 6 at 100, 400 s; diffusion 12, 3 at 100, 400 s.
    log-linear interpolation crosses where log(8) + a x = log(12) + b x, x = log(sec / 100) / log(4)."""
    import math

    from pipeline.report import scaling_crossover, scaling_rows
    from pipeline.sets import parse_sample_set

    sets = {
        "pixelcnn": {"headline_fd_ratio": 8.0, "prior_train_seconds": 100.0},
        "pixelcnn_b4": {"headline_fd_ratio": 6.0, "prior_train_seconds": 400.0},
        "diffusion_dpmsde": {"headline_fd_ratio": 12.0, "prior_train_seconds": 100.0},
        "diffusion_dpmsde_b4": {"headline_fd_ratio": 3.0, "prior_train_seconds": 400.0},
        "diffusion_dpmsde_g2": {
            "headline_fd_ratio": 2.0,
            "prior_train_seconds": 100.0,
        },  # conditional: not in the study
    }
    rows = scaling_rows(sets, {n: parse_sample_set(n) for n in sets})
    assert [(r["sampler"], r["budget"]) for r in rows] == [
        ("diffusion_dpmsde", 1.0),
        ("diffusion_dpmsde", 4.0),
        ("pixelcnn", 1.0),
        ("pixelcnn", 4.0),
    ]
    c = scaling_crossover(rows)
    x = math.log(12 / 8) / (math.log(12 / 8) + math.log(6 / 3))  # fraction of the log-seconds interval
    assert c["seconds"] == pytest.approx(100 * 4**x, rel=0.02)
    assert "overtakes the PixelCNN (pixelcnn) at about" in c["statement"]
    assert c["at_budgets"] == [(1.0, 8.0, 12.0), (4.0, 6.0, 3.0)]
    ahead = scaling_crossover(
        [dict(r, headline_fd_ratio=r["headline_fd_ratio"] / 10) if r["prior"] == "diffusion" else r for r in rows]
    )
    assert ahead["seconds"] is None and "ahead of the PixelCNN" in ahead["statement"]
    never = scaling_crossover(
        [dict(r, headline_fd_ratio=r["headline_fd_ratio"] * 10) if r["prior"] == "diffusion" else r for r in rows]
    )
    assert never["seconds"] is None and "never overtakes" in never["statement"]


def test_a_set_of_k_n_samples_is_judged_as_the_mean_of_k_draws_of_n(tiny_run, tiny_cfg, tmp_path):
    """evaluate.num_images = n with 2 n samples: FD, coverage and memorisation equal the mean of
    the two halves judged alone; the spread over the draws is their standard deviation / floor."""
    import copy
    import shutil

    from pipeline.evaluate import evaluate

    run = tmp_path / "draws"
    shutil.copytree(tiny_run, run)
    samples = np.load(run / "samples" / "diffusion_ddim.npy")
    n = len(samples) // 2
    cfg = copy.deepcopy(tiny_cfg)
    cfg["evaluate"]["num_images"] = n
    cfg["sample"]["sets"] = ["diffusion_ddim"]

    def judged(images):
        np.save(run / "samples" / "diffusion_ddim.npy", images)
        evaluate(cfg, str(run), threads=1)
        return json.loads((run / "report" / "metrics.json").read_text())["sets"]["diffusion_ddim"]

    both = judged(samples[: 2 * n])
    header = (run / "report" / "sets.tsv").read_text().splitlines()[0]
    first, second = judged(samples[:n]), judged(samples[n : 2 * n])
    assert (both["fd_draws"], first["fd_draws"], first["fd_ratio_sd"]) == (2, 1, None)
    assert both["fd_train"] == pytest.approx((first["fd_train"] + second["fd_train"]) / 2, rel=1e-6)
    assert both["headline_fd_ratio"] == pytest.approx((first["fd_ratio"] + second["fd_ratio"]) / 2, rel=1e-6)
    spread = abs(first["fd_ratio"] - second["fd_ratio"]) / math.sqrt(2)
    assert both["fd_ratio_sd"] == pytest.approx(spread, rel=1e-6, abs=1e-9)
    assert both["coverage"] == pytest.approx((first["coverage"] + second["coverage"]) / 2)
    assert both["memorised"] == pytest.approx((first["memorised"] + second["memorised"]) / 2)
    assert both["duplicates"] == first["duplicates"]  # near-duplicates: the first draw
    assert "FD / floor sd" in header  # the spread's column: only where a set was judged in 2+ draws
    assert "FD / floor sd" not in (run / "report" / "sets.tsv").read_text().splitlines()[0]
