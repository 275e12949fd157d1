"""Sample-set names: what a set draws, parsed from its name (no torch: the Snakefile imports this).

Grammar (:data:`SAMPLE_SET_PATTERN`)::

    pixelcnn[_greedy | _t<tau>][_g<s> | _ag<w>][_b<f>]
    diffusion_ddpm[_raw][_g<s> | _ag<w>][_b<f>]      diffusion_<solver>[_s<S>][_raw][_g<s> | _ag<w>][_b<f>]
    pixeldiff_ddpm[_raw]                    pixeldiff_<solver>[_s<S>][_raw]

with <solver> one of :data:`SOLVERS`: ``ddim`` (our DDIM) or a diffusers scheduler (``dpmpp``
DPM-Solver++(2M), ``dpmsde`` its SDE variant, ``euler``, ``heun``, ``eulera`` ancestral Euler).
``_greedy`` argmax decoding; ``_t<tau>`` temperature; ``_s<S>`` solver steps; ``_raw`` raw instead
of EMA weights; ``_g<s>`` class-conditional with classifier-free guidance scale s (diffusers'
convention, s = 1: conditional, no guidance); ``_ag<w>`` unconditional with **autoguidance**
(Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2): the
prediction D_bad + w (D - D_bad), where D_bad is the same model's snapshot after a fraction
``guide_fraction`` of its training (w = 1: no guidance); ``_b<f>`` drawn from a prior trained at f times
the configured ``steps`` (the training budget of the quality-vs-compute study; the model lives in
``<prior>_b<f>/``, f = 1 is the default model); ``pixeldiff`` the pixel-space baseline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SOLVERS",
    "SAMPLE_SET_PATTERN",
    "PRIOR_FOLDERS",
    "SampleSpec",
    "budget_tag",
    "prior_folder",
    "parse_sample_set",
    "base_name",
    "requested_labels",
    "studies_for",
]

_NUM = r"\d+(?:\.\d+)?"
#: Few-step samplers: our DDIM, and diffusers' schedulers (``pipeline.diffusion.SCHEDULER_SAMPLERS``).
SOLVERS = ("ddim", "dpmpp", "dpmsde", "euler", "heun", "eulera")
_SOLVER = "(?:" + "|".join(SOLVERS) + ")"
#: Regular expression of a valid sample-set name (also used by the schema and the Snakefile).
SAMPLE_SET_PATTERN = (
    rf"pixelcnn(?:_greedy|_t{_NUM})?(?:_g{_NUM}|_ag{_NUM})?(?:_b{_NUM})?"
    rf"|diffusion_ddpm(?:_raw)?(?:_g{_NUM}|_ag{_NUM})?(?:_b{_NUM})?|diffusion_{_SOLVER}(?:_s\d+)?(?:_raw)?(?:_g{_NUM}|_ag{_NUM})?(?:_b{_NUM})?"
    rf"|pixeldiff_ddpm(?:_raw)?|pixeldiff_{_SOLVER}(?:_s\d+)?(?:_raw)?"
)


@dataclass(frozen=True)
class SampleSpec:
    """What a sample set draws.

    Attributes:
        name: the set's name.
        prior: "pixelcnn", "diffusion" (latent) or "pixeldiff" (pixel-space baseline).
        method: "categorical" or "greedy" (PixelCNN); "ddpm" or one of :data:`SOLVERS` (diffusion).
        temperature: tau for categorical sampling (None: ``sample.temperature``).
        steps: solver steps S (None: ``sample.ddim_steps`` for DDIM, ``sample.solver_steps`` for
            the diffusers schedulers).
        weights: "ema" or "raw" (diffusion).
        guidance: classifier-free guidance scale s (None: unconditional sampling).
        budget: training-budget factor f of the prior (None: the default model, f = 1).
        autoguidance: weight w of autoguidance by the prior's early snapshot (None: none).
    """

    name: str
    prior: str
    method: str
    temperature: float | None = None
    steps: int | None = None
    weights: str = "ema"
    guidance: float | None = None
    budget: float | None = None
    autoguidance: float | None = None

    @property
    def conditional(self) -> bool:
        return self.guidance is not None

    @property
    def model_folder(self) -> str:
        """The run folder of the prior this set draws from: ``pixelcnn``, ``diffusion`` (the
        unconditional models), ``pixelcnn_cond``, ``diffusion_cond`` (the class-conditional ones,
        for ``_g<s>`` sets), ``pixel_diffusion``; with ``_b<f>`` for a training budget f != 1."""
        return prior_folder(self.prior, self.budget, self.conditional)


#: prior of a sample-set name -> its training stage's folder (and the stage's name without "train_")
PRIOR_FOLDERS = {"pixelcnn": "pixelcnn", "diffusion": "diffusion", "pixeldiff": "pixel_diffusion"}


def budget_tag(budget: float | None) -> str:
    """``""`` for the default budget (None or 1), else ``"_b<f>"`` with f written shortest (``_b0.25``, ``_b4``)."""
    return "" if budget is None or float(budget) == 1.0 else f"_b{float(budget):g}"


def prior_folder(prior: str, budget: float | None = None, conditional: bool = False) -> str:
    """The folder of ``prior`` ("pixelcnn", "diffusion", "pixeldiff"; or the folder name itself),
    class-conditional or not, trained at ``budget``: e.g. ``diffusion``, ``diffusion_cond``, ``pixelcnn_b4``."""
    return PRIOR_FOLDERS.get(prior, prior) + ("_cond" if conditional else "") + budget_tag(budget)


def parse_sample_set(name: str) -> SampleSpec:
    """Parse a sample-set name (see the module docstring).

    Raises:
        ValueError: the name does not follow the grammar; the message gives it.
    """
    if not re.fullmatch(SAMPLE_SET_PATTERN, name):
        raise ValueError(
            f"unknown sample set {name!r}; expected pixelcnn[_greedy|_t<tau>][_g<s>|_ag<w>][_b<f>], "
            "diffusion_ddpm[_raw][_g<s>|_ag<w>][_b<f>], diffusion_<solver>[_s<S>][_raw][_g<s>|_ag<w>][_b<f>], "
            "pixeldiff_ddpm[_raw] or pixeldiff_<solver>[_s<S>][_raw] "
            f"with <solver> one of {', '.join(SOLVERS)}"
        )
    parts = name.split("_")
    prior, rest = parts[0], parts[1:]
    kw: dict = {}
    method = "categorical" if prior == "pixelcnn" else rest.pop(0)
    for p in rest:
        if p == "greedy":
            method = "greedy"
        elif p == "raw":
            kw["weights"] = "raw"
        elif p[0] == "t":
            kw["temperature"] = float(p[1:])
        elif p[0] == "s":
            kw["steps"] = int(p[1:])
        elif p[0] == "g":
            kw["guidance"] = float(p[1:])
        elif p[0] == "b":
            kw["budget"] = float(p[1:])
        elif p.startswith("ag"):
            kw["autoguidance"] = float(p[2:])
    if kw.get("temperature") == 0 or kw.get("steps") == 0 or kw.get("budget") == 0:
        raise ValueError(f"sample set {name!r}: temperature, solver steps and budget must be > 0")
    return SampleSpec(name=name, prior=prior, method=method, **kw)


def requested_labels(n: int, num_classes: int) -> np.ndarray:
    """The labels a conditional sample set asks for: int64 (n,), sample i gets i % num_classes
    (the conditional prior's classes, from the dataset's labels)."""
    return np.arange(n, dtype=np.int64) % num_classes


def base_name(name: str) -> str:
    """A set's name without its ``_b<f>`` budget suffix (the same sampler on the default model)."""
    return re.sub(rf"_b{_NUM}$", "", name)


def studies_for(names: Iterable[str]) -> list[str]:
    """The study tables a list of sample sets makes (``pipeline.evaluate``; the report's TSVs):
    ``scaling`` (an unconditional set at a training budget f != 1: quality vs training compute),
    ``sampling_layer`` (greedy or several temperatures of the unconditional PixelCNN),
    ``diffusion_steps`` (two or more unconditional latent-diffusion sets), ``latent_vs_pixel``
    (a pixeldiff set with its latent twin), ``guidance`` (any conditional set). Sets at a budget
    other than the default appear only in ``scaling``."""
    specs = [parse_sample_set(n) for n in names]
    default = [s for s in specs if s.budget in (None, 1.0)]
    have = {s.name for s in default}
    pcnn = [s for s in default if s.prior == "pixelcnn" and not s.conditional]
    diff = [s for s in default if s.prior == "diffusion" and not s.conditional]
    out = []
    if any(s.budget not in (None, 1.0) and not s.conditional for s in specs):
        out.append("scaling")
    if len(pcnn) > 1 or any(s.method == "greedy" for s in pcnn):
        out.append("sampling_layer")
    if len(diff) > 1:
        out.append("diffusion_steps")
    if any(s.prior == "pixeldiff" and "diffusion" + s.name[len("pixeldiff") :] in have for s in default):
        out.append("latent_vs_pixel")
    if any(s.conditional for s in default):
        out.append("guidance")
    return out
