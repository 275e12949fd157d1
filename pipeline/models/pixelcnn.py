"""Gated PixelCNN prior over a grid of codebook indices.

van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders" (NeurIPS):
a vertical stack (sees every row above) and a horizontal stack (sees the pixels to the left in
the current row) remove the blind spot of the original PixelCNN (sec. 2.2, fig. 1); each layer
uses the gated activation tanh(W_f * x) . sigmoid(W_g * x) (eq. 2), the vertical stack feeds
the horizontal one through a 1x1 convolution, and the horizontal stack is residual.

Causality comes from masked convolutions: the first layer is of **type A** (it does not see the
current position: the vertical kernel's last row and the horizontal kernel's last column are
masked), the following layers are of **type B** (they may see the current position of the
previous layer's features, which themselves never saw it). The logits at (i, j) therefore
depend only on codes at positions before (i, j) in raster order, which ``tests/test_models.py``
checks with gradients.

Class conditioning (paper sec. 2.3, eq. 4): a label embedding h is projected in every gated layer
and added to the pre-activations of both stacks, tanh(W_f * x + V_f h) . sigmoid(W_g * x + V_g h).
Label ``num_classes`` is the *null* label: trained with label dropout, one model is both
p(c | y) and p(c), and classifier-free guidance can mix their logits (``pipeline.sample``).

**3D code grids** (``spatial_dims=3``, codes (B, d, h, w) of volumes) use the same layer with one
more stack, the natural extension of the paper's construction to raster order over planes,
rows and columns: a *depth* stack (kernel (k//2 + 1, k, k): every plane before the current one,
type A masks the current plane) feeds the vertical stack, which now sees the rows above in the
current plane (kernel (1, k//2 + 1, k)), which feeds the horizontal stack as in 2D (kernel
(1, 1, k//2 + 1)). The logits at (p, i, j) depend only on codes before (p, i, j) in raster
order (tested with gradients), and the 2D network is unchanged (same modules, same init).

The model is generative only through its categorical sampling layer (``pipeline.sample``):
drawing each code from softmax(logits / tau); argmax decoding collapses to one output.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.vqvae import checkpointed
from pipeline.precision import run_float32

__all__ = ["MaskedConv2d", "MaskedConv3d", "GatedMaskedLayer", "GatedPixelCNN"]


class _Masked:
    """Mixin for a convolution whose weight is multiplied by a fixed 0/1 mask buffer in every
    forward: ``mask`` is a float tensor broadcastable to the weight; 0 removes a tap."""

    def __init__(self, *args, mask: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", mask.to(self.weight.dtype).expand_as(self.weight).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class MaskedConv2d(_Masked, nn.Conv2d):
    """A ``Conv2d`` with a fixed 0/1 mask (out, in, kh, kw) on its weight; other arguments as
    ``nn.Conv2d``."""


class MaskedConv3d(_Masked, nn.Conv3d):
    """:class:`MaskedConv2d` in 3D: mask broadcastable to the weight (out, in, kd, kh, kw)."""


class GatedMaskedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (paper fig. 2).

    Args:
        mask_type: "A" (first layer: the current position is masked) or "B".
        channels: feature channels h of both stacks.
        kernel_size: odd k; the vertical kernel is (k//2 + 1, k), the horizontal (1, k//2 + 1).
        residual: add the input of the horizontal stack to its output (not for type A,
            whose input is the raw embedding of the current code).
        cond_dim: size of the conditioning vector (0: unconditional layer).
        dropout: dropout probability on the gated horizontal features before their 1x1
            output convolution (0: none). Dropout acts per position, so causality is kept.
        spatial_dims: 2, or 3 for code grids of volumes (adds the depth stack; module docstring).

    Shapes: ``forward(v, h, cond=None, d=None)`` takes and returns two float (B, channels, H, W)
    tensors; ``cond`` is float (B, cond_dim). In 3D all are (B, channels, D, H, W), and the depth
    stack's features ``d`` come in and go out too: ``forward`` then returns (v, h, d).
    """

    def __init__(
        self,
        mask_type: str,
        channels: int,
        kernel_size: int = 3,
        residual: bool = True,
        cond_dim: int = 0,
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.mask_type = mask_type
        self.residual = residual
        self.spatial_dims = spatial_dims
        k = kernel_size
        # Vertical stack: kernel rows i-k//2 .. i (after padding k//2 and cropping the top H rows).
        v_mask = torch.ones(1, 1, k // 2 + 1, k)
        h_mask = torch.ones(1, 1, 1, k // 2 + 1)
        if mask_type == "A":
            v_mask[..., -1, :] = 0  # not the current row
            h_mask[..., -1] = 0  # not the current column
        if spatial_dims == 2:
            conv, masked = nn.Conv2d, MaskedConv2d
            v_kernel, v_pad, h_kernel, h_pad = (k // 2 + 1, k), (k // 2, k // 2), (1, k // 2 + 1), (0, k // 2)
        else:  # the same stacks inside the current plane (a leading kernel depth of 1)
            conv, masked = nn.Conv3d, MaskedConv3d
            v_mask, h_mask = v_mask[:, :, None], h_mask[:, :, None]
            v_kernel, v_pad = (1, k // 2 + 1, k), (0, k // 2, k // 2)
            h_kernel, h_pad = (1, 1, k // 2 + 1), (0, 0, k // 2)
        self.v_conv = masked(channels, 2 * channels, v_kernel, padding=v_pad, mask=v_mask)
        self.v_to_h = conv(2 * channels, 2 * channels, 1)
        self.h_conv = masked(channels, 2 * channels, h_kernel, padding=h_pad, mask=h_mask)
        self.h_out = conv(channels, channels, 1)
        # V_f, V_g of eq. 4 for the vertical and the horizontal stack (bias-free: the convs have biases)
        self.cond = nn.Linear(cond_dim, 4 * channels, bias=False) if cond_dim else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        if spatial_dims == 3:
            # Depth stack: planes p-k//2 .. p (padding k//2, the first D planes kept); type A: not plane p
            d_mask = torch.ones(1, 1, k // 2 + 1, k, k)
            if mask_type == "A":
                d_mask[:, :, -1] = 0
            self.d_conv = MaskedConv3d(channels, 2 * channels, (k // 2 + 1, k, k), padding=k // 2, mask=d_mask)
            self.d_to_v = nn.Conv3d(2 * channels, 2 * channels, 1)
            self.d_cond = nn.Linear(cond_dim, 2 * channels, bias=False) if cond_dim else None

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        f, g = x.chunk(2, dim=1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None = None, d=None):
        height, width = v.shape[-2:]
        v_feat = self.v_conv(v)[..., :height, :]
        h_feat = self.h_conv(h)[..., :, :width]
        if self.spatial_dims == 3:
            d_feat = self.d_conv(d)[:, :, : d.shape[2], :height, :width]
            v_feat = v_feat + self.d_to_v(d_feat)  # planes before the current one reach the vertical stack
        v_pre, h_pre = v_feat, h_feat + self.v_to_h(v_feat)
        bcast = (slice(None), slice(None), *([None] * self.spatial_dims))
        if self.cond is not None:
            if cond is None:
                raise ValueError("this layer is class-conditional: pass cond (B, cond_dim)")
            cv, ch = self.cond(cond)[bcast].chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        v_out = self._gate(v_pre)
        h_gated = self._gate(h_pre)
        h_out = self.h_out(self.dropout(h_gated))
        if self.residual:
            h_out = h_out + h
        if self.spatial_dims == 2:
            return v_out, h_out
        d_pre = d_feat + self.d_cond(cond)[bcast] if self.d_cond is not None else d_feat
        return v_out, h_out, self._gate(d_pre)


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(c) = prod_i p(c_i | c_<i) over (B, H, W) code grids (or (B, D, H, W)
    grids of volumes with ``spatial_dims=3``, raster order over planes, rows, columns).

    Args:
        num_embeddings: K, number of code values (classes of the output softmax).
        hidden_channels: h, width of the stacks and of the code embedding.
        num_layers: gated layers (first type A, the rest type B); >= 1.
        kernel_size: odd kernel size k of the gated layers.
        num_classes: 0 for an unconditional prior; n > 0 for p(c | y) with labels y in [0, n]
            where y = n is the null label (the unconditional model, trained by label dropout).
        dropout: dropout in every gated layer (see :class:`GatedMaskedLayer`); 0 = none.
        spatial_dims: 2 (image code grids) or 3 (volume code grids).

    ``forward(codes, labels=None)`` takes int (B, H, W) codes in [0, K) (and int (B,) labels;
    None = the null label) and returns float logits (B, K, H, W); ``cross_entropy(logits,
    codes)`` is the training loss (nats per code). In 3D: codes (B, D, H, W), logits (B, K, D, H, W).
    """

    def __init__(
        self,
        num_embeddings: int = 128,
        hidden_channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 3,
        num_classes: int = 0,
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_embeddings = num_embeddings
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.embedding = nn.Embedding(num_embeddings, hidden_channels)
        self.label_embedding = nn.Embedding(num_classes + 1, hidden_channels) if num_classes else None
        cond_dim = hidden_channels if num_classes else 0
        kw = {"cond_dim": cond_dim, "dropout": dropout, "spatial_dims": spatial_dims}
        self.layers = nn.ModuleList(
            [GatedMaskedLayer("A", hidden_channels, kernel_size, residual=False, **kw)]
            + [GatedMaskedLayer("B", hidden_channels, kernel_size, **kw) for _ in range(num_layers - 1)]
        )
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = nn.Sequential(
            conv(hidden_channels, 4 * hidden_channels, 1),
            nn.ReLU(),
            conv(4 * hidden_channels, num_embeddings, 1),
        )
        self.gradient_checkpointing = False

    def _cond(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if self.label_embedding is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional PixelCNN (num_classes=0)")
            return None
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels.shape != (batch,) or (
            not labels.is_meta and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes)
        ):
            raise ValueError(
                f"labels must be int ({batch},) in [0, {self.num_classes}] ({self.num_classes} = null), got shape "
                f"{tuple(labels.shape)}"
            )
        return self.label_embedding(labels.long())

    def forward_embedded(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, *S) from already-embedded codes x (B, h, *S) (used by the causality test)."""
        cond = self._cond(labels, x.shape[0], x.device)
        ck = self.gradient_checkpointing
        if self.spatial_dims == 2:
            v, h = x, x
            for layer in self.layers:
                v, h = checkpointed(layer, v, h, cond, enabled=ck)
            return self.logits(h)
        v, h, d = x, x, x
        for layer in self.layers:
            v, h, d = checkpointed(layer, v, h, cond, d, enabled=ck)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head: features (B, hidden, *S) -> logits float32 (B, K, *S). Its last 1x1
        convolution runs in float32 under bf16 autocast (:func:`pipeline.precision.run_float32`):
        these are the logits of the categorical sampling layer, and a bf16 output layer moves
        their distribution measurably (docs/cluster.md, "bf16 and what stays float32")."""
        return run_float32(self.head[-1], self.head[:-1](h))

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every gated layer (:func:`pipeline.models.vqvae.checkpointed`): training keeps
        each layer's input stacks only. A training setting (``pixelcnn.gradient_checkpointing``)."""
        self.gradient_checkpointing = bool(enabled)

    def checkpoint_regions(self) -> list[tuple[nn.Module, nn.Module]]:
        """(first, last) module of every checkpointed region: each gated layer."""
        return [(m, m) for m in self.layers]

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Codes int (B, H, W) in [0, K), labels int (B,) in [0, num_classes] or None (null label)
        -> logits float (B, K, H, W).

        Raises:
            ValueError: labels for an unconditional model, or labels out of range.
        """
        if codes.dim() != 1 + self.spatial_dims:
            raise ValueError(
                f"codes must be int (B, {'H, W' if self.spatial_dims == 2 else 'D, H, W'}), got {tuple(codes.shape)}"
            )
        x = self.embedding(codes.long()).movedim(-1, 1)
        return self.forward_embedded(x, labels)
