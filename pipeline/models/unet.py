"""A small DDPM U-Net for (B, D, 7, 7) VQ-VAE latents (Ho et al. 2020, appendix B).

The architecture follows DDPM's: a sinusoidal time embedding (Vaswani et al. 2017 sec. 3.5, as
in DDPM) through an MLP, residual blocks with GroupNorm and the time embedding added between
their two convolutions, self-attention at the lowest resolution, skip connections between the
down and up paths, and a zero-initialised output convolution. Odd latent sizes (7x7) are padded
with zeros to the next multiple of 2**(levels-1) (8x8) and the output is cropped back, so the
network maps (B, D, H, W) to (B, D, H, W) for any H, W.

Class conditioning (``num_classes`` > 0): a learned label embedding is added to the time
embedding, with label ``num_classes`` as the null label, so that one network trained with label
dropout gives both eps(x_t, t, y) and eps(x_t, t) for classifier-free guidance (Ho & Salimans
2022, sec. 3.2; ``pipeline.diffusion.classifier_free_guidance``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.vqvae import checkpointed, conv_nd

__all__ = ["timestep_embedding", "UNet", "MonaiUNet"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer or real timesteps.

    Args:
        t: (B,) timesteps (any numeric dtype), typically in [0, T).
        dim: embedding size (even or odd; an odd size gets one zero column).
        max_period: the largest wavelength (10000 as in Vaswani et al. 2017).

    Returns:
        float32 (B, dim): [cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i / (dim/2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _check_rank(x: torch.Tensor, spatial_dims: int) -> None:
    """Raise ValueError unless x is (B, C, *S) with ``spatial_dims`` sides."""
    if x.dim() != 2 + spatial_dims:
        raise ValueError(f"expected x of rank {2 + spatial_dims} (spatial_dims {spatial_dims}), got {tuple(x.shape)}")


def _pad_sides(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Size]:
    """(x zero-padded at the end of every side up to a multiple of ``multiple``, the original sides)."""
    sides = x.shape[2:]
    pads = [(-s) % multiple for s in sides]
    if any(pads):
        x = F.pad(x, [v for p in reversed(pads) for v in (0, p)])
    return x, sides


def _crop_sides(h: torch.Tensor, sides) -> torch.Tensor:
    """``h`` cut back to ``sides`` (undoes :func:`_pad_sides`)."""
    return h[(slice(None), slice(None), *(slice(0, s) for s in sides))]


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2 or g == 1:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + Linear(time embedding), GroupNorm-SiLU-Dropout-Conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0, spatial_dims: int = 2):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.skip = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb)).view(*temb.shape[:1], -1, *([1] * (x.dim() - 2)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W (or D*H*W) positions, residual (DDPM appendix B)."""

    def __init__(self, channels: int, num_heads: int = 4, spatial_dims: int = 2):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.num_heads = num_heads if channels % num_heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = conv(channels, 3 * channels, 1)
        self.proj = conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *sides = x.shape
        n = 1
        for s in sides:
            n *= s
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, n).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, *sides)
        return x + self.proj(out)


class UNet(nn.Module):
    """epsilon-prediction network eps_theta(x_t, t) for latents.

    Args:
        in_channels: D, channels of the latents (also the output channels).
        base_channels: width of the first level.
        channel_mult: width multipliers per level; level i works at resolution
            (padded size) / 2**i. Length 1 to 3.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention: add self-attention at the lowest resolution (down, middle and up).
        dropout: dropout inside residual blocks.
        num_classes: 0 (unconditional) or n > 0: labels in [0, n], n = the null label.
        spatial_dims: 2 (latent grids of images) or 3 (of volumes): the same network with 3D
            convolutions and attention over all d*h*w positions.

    ``forward(x, t, labels=None)``: x float (B, D, H, W) (or (B, D, d, h, w)), t int or float
    (B,) in [0, T), labels int (B,) or None (the null label) -> float, the shape of x.
    """

    def __init__(
        self,
        in_channels: int = 16,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        dropout: float = 0.0,
        num_classes: int = 0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.levels = len(channel_mult)
        temb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.temb = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = conv(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            out = base_channels * mult
            lowest = i == self.levels - 1
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList(
                        [
                            ResBlock(ch, out, temb_dim, dropout, spatial_dims),
                            AttentionBlock(out, spatial_dims=spatial_dims) if (attention and lowest) else nn.Identity(),
                        ]
                    )
                )
                ch = out
                skip_chs.append(ch)
            if not lowest:
                self.down.append(nn.ModuleList([conv(ch, ch, 3, stride=2, padding=1)]))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, temb_dim, dropout, spatial_dims)
        self.mid_attn = AttentionBlock(ch, spatial_dims=spatial_dims) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, temb_dim, dropout, spatial_dims)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            out = base_channels * mult
            lowest = i == self.levels - 1
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    nn.ModuleList(
                        [
                            ResBlock(ch + skip_chs.pop(), out, temb_dim, dropout, spatial_dims),
                            AttentionBlock(out, spatial_dims=spatial_dims) if (attention and lowest) else nn.Identity(),
                        ]
                    )
                )
                ch = out
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), conv(ch, ch, 3, padding=1)]))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = conv(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every residual and attention block (:func:`pipeline.models.vqvae.checkpointed`):
        training keeps each block's inputs only and recomputes its activations in backward. A
        training setting (``diffusion.gradient_checkpointing``), not a model arg."""
        self.gradient_checkpointing = bool(enabled)

    def checkpoint_regions(self) -> list[tuple[nn.Module, nn.Module]]:
        """(first, last) module of every checkpointed region: each ResBlock and AttentionBlock."""
        blocks = [m for m in self.modules() if isinstance(m, ResBlock | AttentionBlock)]
        return [(m, m) for m in blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise float, the shape of x: (B, D, H, W) or (B, D, d, h, w); each side is
        zero-padded up to a multiple of 2**(levels - 1) and the output cut back.

        Raises:
            ValueError: labels for an unconditional network, or labels out of [0, num_classes];
                x of another rank than 2 + spatial_dims.
        """
        _check_rank(x, self.spatial_dims)
        x, sides = _pad_sides(x, 2 ** (self.levels - 1))
        temb = self.temb(timestep_embedding(t, self.base_channels))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            if labels.shape != (x.shape[0],) or (
                not labels.is_meta and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes)
            ):
                raise ValueError(
                    f"labels must be int ({x.shape[0]},) in [0, {self.num_classes}] ({self.num_classes} = null), got "
                    f"shape {tuple(labels.shape)}"
                )
            temb = temb + self.label_emb(labels.long())
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes=0)")
        ck = self.gradient_checkpointing

        def res(block, h):
            return checkpointed(block, h, temb, enabled=ck)

        def attn(block, h):
            return checkpointed(block, h, enabled=ck and isinstance(block, AttentionBlock))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if len(block) == 2:
                h = attn(block[1], res(block[0], h))
            else:
                h = block[0](h)
            skips.append(h)
        h = res(self.mid2, attn(self.mid_attn, res(self.mid1, h)))
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = attn(block[1], res(block[0], torch.cat([h, skips.pop()], dim=1)))
            else:
                h = block[1](block[0](h))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return _crop_sides(h, sides)


class MonaiUNet(nn.Module):
    """MONAI's ``DiffusionModelUNet`` (MONAI Generative Models, Pinaya et al. 2023) behind this
    project's U-Net interface, so the diffusion stages can train and sample it unchanged
    (``diffusion.network: monai``): the same constructor arguments as :class:`UNet` (levels of
    ``base_channels * channel_mult``, ``num_res_blocks`` per level, attention at the lowest level
    when ``attention``), the same ``forward(x, t, labels=None)`` with each side zero-padded to a
    multiple of 2**(levels - 1) and the output cut back, labels in [0, num_classes] with
    ``num_classes`` the null label (MONAI's ``num_class_embeds = num_classes + 1``).

    Raises:
        ValueError: ``dropout`` > 0 (MONAI's U-Net has no residual-block dropout), or what
            MONAI raises for the widths (each must be a multiple of the group count).
    """

    def __init__(
        self,
        in_channels: int = 16,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        dropout: float = 0.0,
        num_classes: int = 0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        if dropout:
            raise ValueError(f"diffusion.network monai has no residual-block dropout; got dropout {dropout}")
        widths = tuple(int(base_channels) * int(m) for m in channel_mult)
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.levels = len(widths)
        self.net = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            num_res_blocks=int(num_res_blocks),
            channels=widths,
            attention_levels=tuple(bool(attention) and i == len(widths) - 1 for i in range(len(widths))),
            norm_num_groups=min(_groups(w) for w in widths),
            num_head_channels=widths[-1] // 4,
            num_class_embeds=num_classes + 1 if num_classes else None,
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Not offered for MONAI's network here.

        Raises:
            ValueError: ``enabled`` (use the project's U-Net, ``diffusion.network: own``)."""
        if enabled:
            raise ValueError("diffusion.gradient_checkpointing needs diffusion.network: own")

    def checkpoint_regions(self) -> list[tuple[nn.Module, nn.Module]]:
        """None: :meth:`enable_gradient_checkpointing` is not offered."""
        return []

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`UNet.forward`: x float (B, D, *S), t (B,) in [0, T) -> the shape of x.

        Raises:
            ValueError: labels for an unconditional network, or x of another rank.
        """
        _check_rank(x, self.spatial_dims)
        if labels is not None and not self.num_classes:
            raise ValueError("labels given to an unconditional MonaiUNet (num_classes=0)")
        if self.num_classes and labels is None:
            labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        x, sides = _pad_sides(x, 2 ** (self.levels - 1))
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self.net(x, t.long() if not t.is_floating_point() else t, class_labels=labels)
        return _crop_sides(out, sides)
