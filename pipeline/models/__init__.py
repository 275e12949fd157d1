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
from pipeline.models.encoder import FeatureEncoder
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.models.unet import MonaiUNet, UNet
from pipeline.models.vqvae import VQVAE

__all__ = [
    "MODEL_KINDS",
    "UNET_KINDS",
    "build_model",
    "model_args",
    "VQVAE",
    "GatedPixelCNN",
    "UNet",
    "MonaiUNet",
    "DigitClassifier",
    "FeatureEncoder",
]

MODEL_KINDS: dict[str, type[nn.Module]] = {
    "vqvae": VQVAE,
    "pixelcnn": GatedPixelCNN,
    "unet": UNet,
    "monai_unet": MonaiUNet,
    "classifier": DigitClassifier,
    "simclr": FeatureEncoder,
}
#: kinds that files written before a rename still carry -> the kind today
_OLD_KINDS = {"encoder": "simclr"}


#: ``diffusion.network`` -> the factory kind of the latent U-Net
UNET_KINDS = {"own": "unet", "monai": "monai_unet"}


def build_model(kind: str, args: Mapping[str, Any]) -> nn.Module:
    """Build a model of ``kind`` (a key of :data:`MODEL_KINDS`) from keyword ``args``; the kind
    ``encoder`` of files written before the label-free judge was named ``simclr`` still reads.

    Raises:
        ValueError: unknown kind, or arguments the constructor does not take (named).
    """
    kind = _OLD_KINDS.get(kind, kind)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    try:
        return MODEL_KINDS[kind](**dict(args))
    except TypeError as exc:
        raise ValueError(f"cannot build {kind!r} from arguments {sorted(args)}: {exc}") from None


def model_args(
    kind: str,
    section: Mapping[str, Any],
    *,
    in_channels: int = 1,
    num_classes: int = 0,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    spatial_dims: int = 2,
) -> dict:
    """The constructor kwargs of ``kind`` from its config section: what a training stage stores
    as the checkpoint's ``args`` (and what :mod:`pipeline.flops` builds to count FLOPs).

    Args:
        kind: "vqvae", "pixelcnn", "unet", "monai_unet" (the same arguments), "classifier" or "simclr".
        section: the stage's config section (``vqvae``, ``pixelcnn``, ``diffusion``,
            ``pixel_diffusion``, ``classifier``).
        in_channels: image channels (vqvae, pixel-space unet) or latent channels D (latent unet);
            for "pixelcnn", the codebook size K.
        num_classes: > 0 for the class-conditional priors and the classifier.
        image_shape: (C, H, W) of the images (classifier, feature encoder).
        spatial_dims: 2 for images, 3 for volumes (vqvae, pixelcnn, unet); stored only when 3.

    Raises:
        ValueError: unknown kind.
    """
    s = section
    if kind == "vqvae":
        keys = ("num_embeddings", "embedding_dim", "hidden_channels", "res_channels", "num_res_blocks")
        keys += ("commitment_cost", "ema_decay", "dead_code_threshold")
        args = {"in_channels": in_channels, **{k: s[k] for k in keys}}
        if int(s.get("downsample", 4)) != 4:  # checkpoints of f = 4 keep their old args
            args["downsample"] = int(s["downsample"])
        if spatial_dims != 2:
            args["spatial_dims"] = int(spatial_dims)
        return args
    if kind == "pixelcnn":
        args = {"num_embeddings": in_channels, **{k: s[k] for k in ("hidden_channels", "num_layers", "kernel_size")}}
        if s.get("dropout"):
            args["dropout"] = float(s["dropout"])
        if spatial_dims != 2:
            args["spatial_dims"] = int(spatial_dims)
    elif kind in ("unet", "monai_unet"):
        args = {
            "in_channels": in_channels,
            "base_channels": s["base_channels"],
            "channel_mult": list(s["channel_mult"]),
            "num_res_blocks": s["num_res_blocks"],
            "attention": s["attention"],
            "dropout": s["dropout"],
        }
        if spatial_dims != 2:
            args["spatial_dims"] = int(spatial_dims)
    elif kind == "classifier":
        args = {"num_classes": num_classes, **{k: s[k] for k in ("channels", "feature_dim", "dropout")}}
        if tuple(image_shape) != (1, 28, 28):
            args["image_shape"] = list(image_shape)
        return args
    elif kind == "simclr":
        return {"image_shape": list(image_shape), **{k: s[k] for k in ("channels", "feature_dim", "projection_dim")}}
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}")
    if num_classes:
        args["num_classes"] = num_classes
    return args
