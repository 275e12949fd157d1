"""bf16 mixed precision: where it is on, and the regions that stay in float32.

``bf16: true`` runs each training step and each sampler's network calls under
``torch.autocast(device.type, dtype=torch.bfloat16)`` (:func:`bf16_autocast`), on CUDA and on
the CPU alike, so the bf16 path is the one the tests run. Autocast rounds the inputs of
matrix products and convolutions to bfloat16: 8 bits of mantissa, a relative error of up to
2**-8 = 0.39 % per element (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning
Training"; PyTorch's autocast op lists). Most of a network tolerates that. The parts whose
results are *decisions* or *statistics* do not, and run inside :func:`float32` regions:

* the VQ-VAE's nearest-code search and its codebook EMA statistics
  (:class:`pipeline.models.vqvae.VectorQuantizerEMA`): the distance expansion
  ``|x|^2 - 2 x.e + |e|^2`` loses the small differences between codes in bf16's mantissa
  (measured: docs/cluster.md, "bf16 and what stays float32");
* the layer that writes the VQ-VAE encoder's z_e (the vectors the quantizer compares), the
  PixelCNN's output layer (the logits of the categorical sampling layer) and the U-Nets' output
  layer (the prediction the sampler integrates);
* the diffusion schedule arithmetic and the samplers' state (float32 buffers and tensors that
  never pass through an autocast op), the losses (computed on ``.float()`` outputs) and the
  evaluate stage (never under autocast: features and the Frechet distance in float32/float64).

This is a leaf module (torch only): models and diffusion import it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["bf16_autocast", "float32", "full", "run_float32"]


def bf16_autocast(device: torch.device | str, enabled: bool):
    """``torch.autocast(device_type, dtype=torch.bfloat16)`` when ``enabled``, else a no-op
    context. ``device`` is a ``torch.device`` or its type name ("cuda", "cpu").

    Raises:
        ValueError: an enabled autocast on a device type autocast does not know (e.g. "meta").
    """
    if not enabled:
        return contextlib.nullcontext()
    kind = device if isinstance(device, str) else device.type
    if kind not in ("cuda", "cpu", "xpu", "mps"):
        raise ValueError(f"bf16 autocast needs a cuda or cpu device, got {kind!r}")
    return torch.autocast(kind, dtype=torch.bfloat16)


def float32(tensor: torch.Tensor):
    """A context in which autocast is off for ``tensor``'s device type: the ops inside run in
    the dtype of their inputs (cast them with ``.float()``). A no-op outside autocast; meta
    tensors (the FLOP counter) need no region."""
    kind = tensor.device.type
    if kind not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def full(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a 16-bit float (bfloat16, float16); any other tensor (float32,
    float64, integers) as it is."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def run_float32(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(full(x))`` with autocast off: float32 output (float64 for a float64 module and
    input) whatever the surrounding autocast. Outside autocast it is ``module(x)`` (bit-identical)."""
    with float32(x):
        return module(full(x))
