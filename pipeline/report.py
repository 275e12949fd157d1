"""The evaluate stage's report: ``summary.md``, the TSV tables, the study tables and the plots.

The evaluate stage (:mod:`pipeline.evaluate`) computes the numbers; this module lays them out.
What it writes into ``report/``: ``summary.md`` (the judge and reference sentences, the
unconditional, conditional and all-sets tables, one table per study, the training stages),
``sets.tsv`` and ``<study>.tsv``, ``training_curves.png`` and, for the quality-vs-compute study,
``scaling.png``.

The studies are a registry (:data:`STUDIES`): a builder per study turns the judged sets into
rows and columns; :func:`pipeline.sets.studies_for` says which ones a run's sets make. Adding a
study is one builder here (and its name there). The training stages' numbers carried into
``metrics.json`` and the summary's training table come from one list, :data:`TRAINING_TABLE`.

A library below the evaluate stage: it imports no stage module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import RunPaths, atomic_path, atomic_write_text, read_json

__all__ = [
    "SET_COLUMNS",
    "FEATURE_COLUMNS",
    "NOISE_COLUMNS",
    "VOLUME_COLUMNS",
    "TRAINING_TABLE",
    "STUDIES",
    "set_columns",
    "judge_sentence",
    "noise_sentence",
    "plot_training_curves",
    "provenance",
    "stage_metrics",
    "scaling_rows",
    "scaling_crossover",
    "plot_scaling",
    "build_studies",
    "write_tables",
]


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
    ("fd_ratio_sd", "FD / floor sd"),
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
    ("features_fd_ratio_sd", "label-free FD / floor sd"),
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


def judge_sentence(evaluation: Mapping, judge_names, n_eval: int, n_train: int, floor_row: Mapping, sets=None) -> str:
    """The summary's sentence on what judged the samples and how to read the FD columns (``sets``:
    the set rows, for the number of draws of N each was judged in)."""
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
            f"{_fmt(evaluation.get('simclr_test_view_retrieval'))}); `label-free FD` in its features, N = {n_eval} "
            f"against all {n_train} train images."
        )
    parts.append(
        "`FD / floor` divides by the FD of N real test images against train (`real_test` row: the floor, "
        f"{floor_row['headline_fd']:.3f})."
    )
    draws = sorted({int(r.get("headline_fd_draws") or 1) for r in sets or ()})
    if draws and draws[-1] > 1:
        parts.append(
            f"A set of k N samples is judged in k disjoint draws of N (k = {', '.join(map(str, draws))}): its FD, "
            "precision, recall, density and coverage are the means over the draws and `FD / floor sd` their spread."
        )
    return " ".join(parts)


def noise_sentence(check: Mapping) -> str:
    """The summary's line on the noise check (``metrics.json`` ``evaluation.noise_check``)."""
    judge = {
        "features_coverage": "label-free",
        "pixel_coverage": "pooled-pixel (14 x 14)",
    }.get(check["coverage"], "classifier")
    found = ", ".join(f"`{n}`" for n in check["noise_sets"]) or "none"
    return (
        f"**Noise check:** `structure` places a set's {judge} coverage between the `noise` row's "
        f"({_fmt(check['noise_coverage'])}, = 0) and the real test images' ({_fmt(check['real_coverage'])}, = 1); "
        f"below {check['threshold']:g} the set is reported as noise. Sets reported as noise: {found}.\n"
    )


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
    FD at its largest budget; rows carry ``headline_fd_ratio``). Returns {"pixelcnn": sampler, "diffusion": sampler,
    "statement": one sentence, "seconds": the crossover training seconds or None, "at_budgets":
    [(budget, FD ratio PixelCNN, FD ratio diffusion)] at the budgets both have}.
    """
    by: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get("prior_train_seconds") and r.get("headline_fd_ratio"):
            by.setdefault(r["prior"], {}).setdefault(r["sampler"], []).append(r)
    if "pixelcnn" not in by or "diffusion" not in by:
        return {"statement": "needs both priors at two or more budgets", "seconds": None, "at_budgets": []}

    def best(curves: dict[str, list[dict]]) -> tuple[str, list[dict]]:
        name = min(curves, key=lambda k: sorted(curves[k], key=lambda r: r["budget"])[-1]["headline_fd_ratio"])
        return name, sorted(curves[name], key=lambda r: r["prior_train_seconds"])

    pixelcnn_sampler, pixelcnn_curve = best(by["pixelcnn"])
    diffusion_sampler, diffusion_curve = best(by["diffusion"])

    def interp(curve: list[dict], train_s: float) -> float | None:
        xs = [math.log(r["prior_train_seconds"]) for r in curve]
        ys = [math.log(r["headline_fd_ratio"]) for r in curve]
        x = math.log(train_s)
        if x < xs[0] or x > xs[-1]:
            return None
        return math.exp(float(np.interp(x, xs, ys)))

    grid = sorted({r["prior_train_seconds"] for r in pixelcnn_curve + diffusion_curve})
    lo, hi = (
        max(pixelcnn_curve[0]["prior_train_seconds"], diffusion_curve[0]["prior_train_seconds"]),
        min(pixelcnn_curve[-1]["prior_train_seconds"], diffusion_curve[-1]["prior_train_seconds"]),
    )
    grid = [g for g in grid if lo <= g <= hi]
    dense = sorted(set(grid + [math.exp(v) for v in np.linspace(math.log(lo), math.log(hi), 200)])) if lo < hi else grid
    curves = [
        (train_s, interp(diffusion_curve, train_s), interp(pixelcnn_curve, train_s)) for train_s in dense
    ]  # each curve interpolated once
    diffs = [(train_s, d - p) for train_s, d, p in curves if d is not None and p is not None]
    pixelcnn_at = {r["budget"]: r["headline_fd_ratio"] for r in pixelcnn_curve}
    at_budgets = [
        (b, pixelcnn_at[b], r["headline_fd_ratio"]) for r in diffusion_curve for b in [r["budget"]] if b in pixelcnn_at
    ]
    seconds = None
    if not diffs:
        statement = "the two priors' training times do not overlap; compare the budgets directly"
    elif all(d < 0 for _, d in diffs):
        statement = (
            f"latent diffusion ({diffusion_sampler}) is ahead of the PixelCNN ({pixelcnn_sampler}) "
            f"at every training time both were measured at ({lo:.0f}-{hi:.0f} s)"
        )
    elif all(d >= 0 for _, d in diffs):
        statement = (
            f"latent diffusion ({diffusion_sampler}) never overtakes the PixelCNN ({pixelcnn_sampler}) "
            f"between {lo:.0f} and {hi:.0f} training seconds"
        )
    else:
        for (s0, d0), (s1, d1) in zip(diffs, diffs[1:]):
            if d0 >= 0 > d1:
                seconds = s0 + (s1 - s0) * d0 / (d0 - d1)
                break
        if seconds is None:
            statement = (
                f"the curves cross but diffusion ({diffusion_sampler}) ends behind the PixelCNN "
                f"({pixelcnn_sampler}) at {hi:.0f} s"
            )
        else:
            statement = (
                f"latent diffusion ({diffusion_sampler}) overtakes the PixelCNN ({pixelcnn_sampler}) "
                f"at about {seconds:.0f} training seconds"
            )
    return {
        "pixelcnn": pixelcnn_sampler,
        "diffusion": diffusion_sampler,
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
        ax.plot([r["prior_train_seconds"] for r in rs], [r["headline_fd_ratio"] for r in rs], style, label=name)
        for r in rs:
            ax.annotate(
                f"{r['budget']:g}x",
                (r["prior_train_seconds"], r["headline_fd_ratio"]),
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


# --- the training stages' numbers ----------------------------------------------------------------
@dataclass(frozen=True)
class TrainingRow:
    """One training stage in the report: the keys of its ``metrics.json`` carried into the
    report's ``metrics.json`` (``shown`` first, then ``more``), and its row of the summary's
    training table (``label`` and the ``shown`` values, ``digits`` after the point; no row
    when ``label`` is None)."""

    folder: str
    label: str | None
    shown: tuple[str, ...]
    more: tuple[str, ...] = ()
    digits: int = 3


_PRIOR_MORE = ("conditional", "steps", "train_seconds")
_DIFFUSION_MORE = ("conditional", "train_seconds", "train_images_per_s", "steps")
#: the one list of what the report carries from each training stage, in the report's order
TRAINING_TABLE: tuple[TrainingRow, ...] = (
    TrainingRow(
        "vqvae",
        "test reconstruction MSE / perplexity / codes in use",
        ("test_recon_mse", "test_perplexity", "test_codes_in_use"),
        ("num_embeddings", "train_seconds"),
    ),
    TrainingRow("classifier", "test accuracy", ("test_accuracy",), ("train_accuracy", "num_test", "train_seconds")),
    TrainingRow(
        "simclr",
        "label-free judge: final NT-Xent / test view retrieval",
        ("final_train_loss", "test_view_retrieval"),
        ("steps", "train_seconds"),
    ),
    TrainingRow(
        "pixelcnn",
        "test NLL nats/code (unconditional prior)",
        ("test_nll_nats_per_code",),
        ("test_nll_bits_per_code", "test_nll_conditional_nats_per_code", *_PRIOR_MORE),
    ),
    TrainingRow(
        "pixelcnn_cond",
        "test NLL nats/code (null label / given the label)",
        ("test_nll_nats_per_code", "test_nll_conditional_nats_per_code"),
        ("test_nll_bits_per_code", *_PRIOR_MORE),
    ),
    TrainingRow(
        "diffusion",
        "final train loss / test epsilon-MSE EMA / raw",
        ("final_train_loss", "test_loss_ema", "test_loss_raw"),
        ("test_loss_conditional_ema", *_DIFFUSION_MORE),
        digits=4,
    ),
    TrainingRow(
        "diffusion_cond",
        "test epsilon-MSE EMA (null label / given the label)",
        ("test_loss_ema", "test_loss_conditional_ema"),
        ("final_train_loss", "test_loss_raw", *_DIFFUSION_MORE),
        digits=4,
    ),
    TrainingRow(
        "pixel_diffusion",
        None,
        (),
        ("final_train_loss", "test_loss_ema", "train_seconds", "train_images_per_s", "steps", "time_budget_s"),
    ),
)


def stage_metrics(paths: RunPaths) -> dict[str, dict]:
    """The training stages' own numbers (:data:`TRAINING_TABLE`'s keys) of the stages this run
    has, by folder."""
    out = {}
    for row in TRAINING_TABLE:
        f = paths.root / row.folder / "metrics.json"
        if f.is_file():
            m = read_json(f)
            out[row.folder] = {k: m[k] for k in (*row.shown, *row.more) if k in m}
    return out


def _training_table(stages: Mapping[str, dict]) -> str:
    rows = [
        {
            "stage": r.folder,
            "metric": r.label,
            "value": " / ".join(_fmt(stages[r.folder].get(k), r.digits) for k in r.shown),
        }
        for r in TRAINING_TABLE
        if r.label and r.folder in stages
    ]
    return _table(rows, [("stage", "stage"), ("metric", "metric"), ("value", "value")])[0]


# --- the studies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyInput:
    """What a study builder reads: the judged sets by name, every set's parsed name, the sets at
    the default training budget, and the training stages' numbers (:func:`stage_metrics`)."""

    sets: Mapping[str, dict]
    specs: Mapping
    default: Mapping
    stages: Mapping[str, dict]


@dataclass(frozen=True)
class Study:
    """A study table: its title and columns [(row key, header)], and the builder of its rows."""

    name: str
    title: str
    columns: list[tuple[str, str]]
    rows: Callable[[StudyInput], list[dict]]


#: the study tables, in the report's order (:func:`pipeline.sets.studies_for` says which a run makes)
STUDIES: dict[str, Study] = {}


def _study(name: str, title: str, columns: list[tuple[str, str]]):
    def register(fn: Callable[[StudyInput], list[dict]]):
        STUDIES[name] = Study(name, title, columns, fn)
        return fn

    return register


def _autoguided(spec) -> str:
    return f", autoguidance w = {spec.autoguidance:g}" if spec.autoguidance is not None else ""


@_study(
    "scaling",
    "Quality vs training compute: the unconditional priors at several training budgets "
    "(same latents; f = multiple of the configured steps)",
    [
        ("prior", "prior"),
        ("sampler", "sampler"),
        ("name", "set"),
        ("budget", "budget f"),
        ("prior_steps", "train steps"),
        ("prior_train_seconds", "train s"),
        ("headline_fd", "FD vs train"),
        ("headline_fd_ratio", "FD / floor"),
        ("class_entropy", "class entropy (nats)"),
        ("duplicates", "duplicates"),
        ("memorised", "memorised"),
    ],
)
def _scaling_study(given: StudyInput) -> list[dict]:
    return scaling_rows(given.sets, given.specs)


@_study(
    "sampling_layer",
    "PixelCNN: the categorical sampling layer (greedy argmax vs sampling at temperature tau)",
    [
        ("decoding", "decoding"),
        ("name", "set"),
        ("duplicates", "duplicates"),
        ("class_entropy", "class entropy (nats)"),
        ("headline_fd", "FD vs train"),
        ("headline_fd_ratio", "FD / floor"),
        ("confidence", "confidence"),
    ],
)
def _sampling_layer_study(given: StudyInput) -> list[dict]:
    sets, specs = given.sets, given.default
    names = [n for n, s in specs.items() if s.prior == "pixelcnn" and not s.conditional]

    def decoding(n: str) -> str:
        if specs[n].method == "greedy":
            return "greedy (argmax)"
        return f"categorical, tau = {sets[n]['temperature']:g}{_autoguided(specs[n])}"

    def order(n: str) -> tuple:
        return specs[n].autoguidance or 0.0, -1.0 if specs[n].method == "greedy" else sets[n]["temperature"]

    return [{"decoding": decoding(n), **sets[n]} for n in sorted(names, key=order)]


@_study(
    "diffusion_steps",
    "Latent diffusion: the sampler (DDPM over all T steps, DDIM and diffusers' solvers with S steps), "
    "autoguidance, EMA vs raw weights",
    [
        ("sampler", "sampler"),
        ("weights", "weights"),
        ("name", "set"),
        ("n", "N"),
        ("headline_fd", "FD vs train"),
        ("headline_fd_floor", "floor at N"),
        ("headline_fd_ratio", "FD / floor"),
        ("seconds_per_1000", "s / 1000 images"),
        ("class_entropy", "class entropy (nats)"),
    ],
)
def _diffusion_steps_study(given: StudyInput) -> list[dict]:
    sets, specs = given.sets, given.default
    names = [n for n, s in specs.items() if s.prior == "diffusion" and not s.conditional]

    def order(n: str) -> tuple:
        s = specs[n]
        return s.weights != "ema", s.autoguidance or 0.0, s.method == "ddpm", s.method, sets[n]["steps"]

    def sampler(n: str) -> str:
        method = SAMPLER_NAMES.get(specs[n].method, specs[n].method)
        return f"{method}, {sets[n]['steps']} steps{_autoguided(specs[n])}"

    return [{"sampler": sampler(n), "weights": specs[n].weights, **sets[n]} for n in sorted(names, key=order)]


@_study(
    "latent_vs_pixel",
    "Latent vs pixel space, equal training wall time (same U-Net family and schedule)",
    [
        ("space", "space"),
        ("name", "set"),
        ("train_images_per_s", "train images/s"),
        ("train_steps", "train steps"),
        ("train_seconds", "train s"),
        ("seconds_per_1000", "sampling s / 1000"),
        ("headline_fd", "FD vs train"),
        ("headline_fd_ratio", "FD / floor"),
        ("class_entropy", "class entropy (nats)"),
    ],
)
def _latent_vs_pixel_study(given: StudyInput) -> list[dict]:
    sets, specs = given.sets, given.default
    names = [n for n, s in specs.items() if (s.prior == "diffusion" and not s.conditional) or s.prior == "pixeldiff"]
    rows = []
    for n in sorted(names, key=lambda n: (specs[n].method, sets[n]["steps"], specs[n].weights, specs[n].prior)):
        s = specs[n]
        partner = ("pixeldiff" if s.prior == "diffusion" else "diffusion") + n[len(s.prior) :]
        if partner not in sets:
            continue
        train = given.stages.get("diffusion" if s.prior == "diffusion" else "pixel_diffusion", {})
        rows.append(
            {
                "space": "latent (VQ-VAE 16x7x7)" if s.prior == "diffusion" else "pixel (1x32x32)",
                "train_images_per_s": train.get("train_images_per_s"),
                "train_seconds": train.get("train_seconds"),
                "train_steps": train.get("steps"),
                **sets[n],
            }
        )
    return rows


@_study(
    "guidance",
    "Class-conditional samples: label accuracy per guidance scale s "
    "(diffusers' convention; Ho & Salimans' w = s - 1; s = 1 is no guidance)",
    [
        ("prior", "prior"),
        ("name", "set"),
        ("guidance_scale", "s"),
        ("w", "w"),
        ("label_accuracy", "label accuracy"),
        ("headline_fd", "FD vs train"),
        ("headline_fd_ratio", "FD / floor"),
        ("class_entropy", "class entropy (nats)"),
        ("seconds_per_1000", "s / 1000 images"),
    ],
)
def _guidance_study(given: StudyInput) -> list[dict]:
    specs = given.default
    names = sorted((n for n, s in specs.items() if s.conditional), key=lambda n: (specs[n].prior, specs[n].guidance))
    return [
        {"prior": specs[n].prior, "guidance_scale": specs[n].guidance, "w": specs[n].guidance - 1, **given.sets[n]}
        for n in names
    ]


def build_studies(sets: Mapping[str, dict], stages: Mapping[str, dict]) -> dict[str, dict]:
    """The study tables the run's sets make: {study: {"title", "columns", "rows"}} (the scaling
    study adds its ``crossover``, :func:`scaling_crossover`)."""
    from pipeline.sets import parse_sample_set, studies_for

    specs = {name: parse_sample_set(name) for name in sets}
    default = {n: s for n, s in specs.items() if s.budget in (None, 1.0)}
    given = StudyInput(sets, specs, default, stages)
    wanted = set(studies_for(sets))
    studies = {}
    for name, study in STUDIES.items():
        if name in wanted:
            studies[name] = {"title": study.title, "columns": study.columns, "rows": study.rows(given)}
    if "scaling" in studies:
        studies["scaling"]["crossover"] = scaling_crossover(studies["scaling"]["rows"])
    return studies


# --- summary.md and the TSVs ---------------------------------------------------------------------
def _header(result: Mapping, run: Path) -> list[str]:
    ev, prov = result["evaluation"], result["provenance"]
    dirty = " (with uncommitted changes)" if prov["dirty"] else ""
    return [
        f"# Sample quality of run `{run.name}`\n",
        f"Made at commit `{prov['commit']}`{dirty} by the evaluate stage "
        f"(`python -m pipeline evaluate --run {run}`, run by `snakemake`), {prov['date']}.\n",
        judge_sentence(
            ev, ev["judges"], ev["num_images"], ev["num_train_reference"], result["floor"], result["sets"].values()
        ),
        f"Reference rows: `blurred_real` (the test images blurred, Gaussian sigma {ev['blur_sigma_px']:.2g} px) "
        "and `noise` (per-pixel Gaussian noise with the train images' mean and std): a good set lies between the "
        f"floor and them. Precision/recall: k-NN manifolds (k = {ev['precision_recall_k']}) against N train images "
        f"(Kynkäänniemi et al. 2019). Near-duplicates: nearest other sample within RMS "
        f"{ev['duplicate_threshold_rms']:g}; memorised: nearer to a train image than "
        f"{100 * ev['memorisation_quantile']:g} % of real test images are "
        f"(RMS {ev['memorisation_threshold_rms']:.3f}).\n",
        noise_sentence(ev["noise_check"]),
    ]


def write_tables(out: Path, result: Mapping, studies: Mapping[str, dict], volumes: bool = False) -> None:
    """Write ``summary.md``, ``sets.tsv``, ``<study>.tsv`` (and ``scaling.png``) of an evaluation
    into ``out``, all atomically. ``result`` is the report's ``metrics.json`` content (floor,
    references, sets, stages, evaluation, provenance), ``studies`` :func:`build_studies`'s."""
    from pipeline.sets import parse_sample_set

    sets, floor, refs = result["sets"], result["floor"], list(result["references"].values())
    every = [floor, *refs, *sets.values()]
    columns = [  # the spread over draws only where a set was judged in more than one draw of N
        c
        for c in set_columns(result["evaluation"]["judges"], volumes=volumes)
        if not c[0].endswith("fd_ratio_sd") or any(r.get(c[0]) is not None for r in every)
    ]
    md_sets, tsv_sets = _table([floor, *refs, *sets.values()], columns)
    atomic_write_text(out / "sets.tsv", tsv_sets)
    specs = {n: parse_sample_set(n) for n in sets}
    default = [n for n in sets if specs[n].budget in (None, 1.0)]
    uncond = [sets[n] for n in default if not specs[n].conditional]
    cond = [sets[n] for n in default if specs[n].conditional]
    lines = _header(result, Path(result["run"]))
    if uncond:
        lines += ["## Unconditional samples (the study's question)\n", _table([floor, *refs, *uncond], columns)[0]]
    if cond:
        lines += ["## Class-conditional samples\n", _table([floor, *refs, *cond], columns)[0]]
    lines += ["## All sample sets\n", md_sets]
    for key, study in studies.items():
        md, tsv = _table(study["rows"], study["columns"])
        atomic_write_text(out / f"{key}.tsv", tsv)
        lines += [f"## {study['title']}\n", md]
        if key == "scaling":
            lines += [f"**Crossover:** {study['crossover']['statement']}. Plot: `scaling.png`.\n"]
            plot_scaling(study["rows"], out / "scaling.png")
    lines += ["## Training stages\n", _training_table(result["stages"])]
    atomic_write_text(out / "summary.md", "\n".join(lines))
