"""Sample-set names: what a set draws, parsed from its name (no torch: the Snakefile imports this).

Grammar (:data:`SAMPLE_SET_PATTERN`)::

    pixelcnn[_greedy | _t<tau>][_g<s>]
    diffusion_ddpm[_raw][_g<s>]      diffusion_ddim[_s<S>][_raw][_g<s>]
    pixeldiff_ddpm[_raw]             pixeldiff_ddim[_s<S>][_raw]

``_greedy`` argmax decoding; ``_t<tau>`` temperature; ``_s<S>`` DDIM steps; ``_raw`` raw instead
of EMA weights; ``_g<s>`` class-conditional with classifier-free guidance scale s (diffusers'
convention, s = 1: conditional, no guidance); ``pixeldiff`` the pixel-space baseline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

__all__ = ["SAMPLE_SET_PATTERN", "SampleSpec", "parse_sample_set", "requested_labels", "studies_for"]

_NUM = r"\d+(?:\.\d+)?"
#: Regular expression of a valid sample-set name (also used by the schema and the Snakefile).
SAMPLE_SET_PATTERN = (
    rf"pixelcnn(?:_greedy|_t{_NUM})?(?:_g{_NUM})?"
    rf"|diffusion_ddpm(?:_raw)?(?:_g{_NUM})?|diffusion_ddim(?:_s\d+)?(?:_raw)?(?:_g{_NUM})?"
    rf"|pixeldiff_ddpm(?:_raw)?|pixeldiff_ddim(?:_s\d+)?(?:_raw)?"
)


@dataclass(frozen=True)
class SampleSpec:
    """What a sample set draws.

    Attributes:
        name: the set's name.
        prior: "pixelcnn", "diffusion" (latent) or "pixeldiff" (pixel-space baseline).
        method: "categorical" or "greedy" (PixelCNN); "ddpm" or "ddim" (diffusion).
        temperature: tau for categorical sampling (None: ``sample.temperature``).
        steps: DDIM steps S (None: ``sample.ddim_steps``).
        weights: "ema" or "raw" (diffusion).
        guidance: classifier-free guidance scale s (None: unconditional sampling).
    """

    name: str
    prior: str
    method: str
    temperature: Optional[float] = None
    steps: Optional[int] = None
    weights: str = "ema"
    guidance: Optional[float] = None

    @property
    def conditional(self) -> bool:
        return self.guidance is not None


def parse_sample_set(name: str) -> SampleSpec:
    """Parse a sample-set name (see the module docstring).

    Raises:
        ValueError: the name does not follow the grammar; the message gives it.
    """
    if not re.fullmatch(SAMPLE_SET_PATTERN, name):
        raise ValueError(
            f"unknown sample set {name!r}; expected pixelcnn[_greedy|_t<tau>][_g<s>], "
            f"diffusion_ddpm[_raw][_g<s>], diffusion_ddim[_s<S>][_raw][_g<s>], pixeldiff_ddpm[_raw] or pixeldiff_ddim[_s<S>][_raw]"
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
    if kw.get("temperature") == 0 or kw.get("steps") == 0:
        raise ValueError(f"sample set {name!r}: temperature and DDIM steps must be > 0")
    return SampleSpec(name=name, prior=prior, method=method, **kw)


def requested_labels(n: int) -> np.ndarray:
    """The labels a conditional sample set asks for: int64 (n,), sample i gets i % 10."""
    return np.arange(n, dtype=np.int64) % 10


def studies_for(names: Iterable[str]) -> list[str]:
    """The study tables a list of sample sets makes (``pipeline.evaluate``; the report's TSVs):
    ``sampling_layer`` (greedy or several temperatures of the unconditional PixelCNN),
    ``diffusion_steps`` (two or more unconditional latent-diffusion sets), ``latent_vs_pixel``
    (a pixeldiff set with its latent twin), ``guidance`` (any conditional set)."""
    specs = [parse_sample_set(n) for n in names]
    have = {s.name for s in specs}
    pcnn = [s for s in specs if s.prior == "pixelcnn" and not s.conditional]
    diff = [s for s in specs if s.prior == "diffusion" and not s.conditional]
    out = []
    if len(pcnn) > 1 or any(s.method == "greedy" for s in pcnn):
        out.append("sampling_layer")
    if len(diff) > 1:
        out.append("diffusion_steps")
    if any(s.prior == "pixeldiff" and "diffusion" + s.name[len("pixeldiff"):] in have for s in specs):
        out.append("latent_vs_pixel")
    if any(s.conditional for s in specs):
        out.append("guidance")
    return out
