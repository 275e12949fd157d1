"""Neural networks (``nn.Module`` s only) and the one factory that builds them.

``build_model(kind, args)`` is the only place a model constructor is called, for training and
for loading a checkpoint alike (improved-diffusion's ``create_model_and_diffusion``, nanoGPT's
``GPTConfig(**checkpoint["model_args"])``): a checkpoint stores ``kind`` and ``args``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pipeline.models.classifier import DigitClassifier
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.models.unet import UNet
from pipeline.models.vqvae import VQVAE

__all__ = ["MODEL_KINDS", "build_model", "VQVAE", "GatedPixelCNN", "UNet", "DigitClassifier"]

MODEL_KINDS: dict[str, type[nn.Module]] = {
    "vqvae": VQVAE,
    "pixelcnn": GatedPixelCNN,
    "unet": UNet,
    "classifier": DigitClassifier,
}


def build_model(kind: str, args: Mapping[str, Any]) -> nn.Module:
    """Build a model of ``kind`` ("vqvae", "pixelcnn", "unet", "classifier") from keyword ``args``.

    Raises:
        ValueError: unknown kind, or arguments the constructor does not take (named).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    try:
        return MODEL_KINDS[kind](**dict(args))
    except TypeError as exc:
        raise ValueError(f"cannot build {kind!r} from arguments {sorted(args)}: {exc}") from None
