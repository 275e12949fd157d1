"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

An encoder maps a (B, C, H, W) image to continuous vectors z_e of shape (B, D, H/f, W/f) by
log2(f) stride-2 convolutions (f = ``downsample``: 4 gives MNIST's 28x28 -> 7x7 grid), or a
(B, C, D, H, W) volume to (B, D, D/f, H/f, W/f) with ``spatial_dims=3`` (the same layers in 3D,
as MONAI's networks take ``spatial_dims``); a
codebook of K vectors e_k in R^D replaces each vector by its nearest code (eq. 1-2 of the
paper); a decoder maps the quantized grid back to pixels. The codebook is learned with
exponential moving averages (paper appendix A.1; Razavi et al. 2019, VQ-VAE-2, eq. 4-7) and
codes unused for a while are restarted from encoder outputs (Dhariwal et al. 2020, Jukebox,
sec. 3.2; Zeghidour et al. 2021). Gradients pass the quantizer by the straight-through
estimator (paper sec. 3.2), and the commitment loss beta * ||z_e - sg[e]||^2 (paper eq. 3)
keeps the encoder close to its codes.

This module holds ``nn.Module`` s only; it imports neither config, training code nor h5py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.precision import float32, full

__all__ = [
    "VQOutput",
    "VectorQuantizerEMA",
    "ResidualBlock",
    "Encoder",
    "Decoder",
    "VQVAE",
    "conv_nd",
    "checkpointed",
    "sequential_segments",
]


def conv_nd(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    """``nn.Conv2d`` / ``nn.Conv3d`` (or their transposes) for ``spatial_dims`` 2 or 3.

    Raises:
        ValueError: another spatial_dims."""
    table = {2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}
    if spatial_dims not in table:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return table[spatial_dims][int(transposed)]


def checkpointed(fn, *args, enabled: bool = True):
    """``fn(*args)``, through gradient checkpointing when ``enabled`` and autograd is recording:
    only the inputs are kept for backward and the activations inside ``fn`` are recomputed
    there (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
    ``torch.utils.checkpoint`` non-reentrant, which restores the RNG state, so dropout draws the
    same mask and the gradients equal the plain ones). Costs one more forward of ``fn``."""
    if enabled and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sequential_segments(n: int) -> list[tuple[int, int]]:
    """[start, end) ranges cutting n layers into about sqrt(n) segments of about sqrt(n) layers:
    what checkpointing a plain stack keeps (segment inputs) and recomputes (one segment at a
    time) is then O(sqrt(n)) activations (Chen et al. 2016, sec. 4.1)."""
    size = max(1, math.ceil(math.sqrt(n)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _run_sequential(net: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    if not (checkpointing and torch.is_grad_enabled()):
        return net(x)
    for a, b in sequential_segments(len(net)):
        x = checkpointed(net[a:b], x)
    return x


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) -> (B, *S, D)."""
    return x.movedim(1, -1)


class VQOutput(NamedTuple):
    """What :meth:`VectorQuantizerEMA.forward` returns.

    Attributes:
        quantized: float (B, D, H, W) (or (B, D, d, h, w) for volumes), the straight-through
            quantized vectors: forward value e_{k*}, gradient passed unchanged to z_e.
        commitment_loss: float scalar, beta * mean((z_e - sg[e_{k*}])^2).
        codes: int64 (B, H, W) (or (B, d, h, w)), indices k* in [0, K).
        perplexity: float scalar, exp(entropy) of the batch's code histogram, in [1, K].
    """

    quantized: torch.Tensor
    commitment_loss: torch.Tensor
    codes: torch.Tensor
    perplexity: torch.Tensor


class VectorQuantizerEMA(nn.Module):
    """Nearest-neighbour quantizer with an EMA-updated codebook and dead-code restart.

    Args:
        num_embeddings: K, number of codebook vectors (>= 2).
        embedding_dim: D, dimension of each vector.
        commitment_cost: beta of the commitment loss (paper eq. 3; 0.25 in the paper).
        decay: gamma of the EMA updates (VQ-VAE-2 eq. 5-7; 0.99 in the paper).
        dead_code_threshold: after each training update, codes whose EMA cluster size is below
            this value are replaced by randomly chosen encoder outputs of the current batch.
        eps: Laplace smoothing of the cluster sizes (avoids division by zero).

    Buffers: ``embedding`` (K, D) float32, ``cluster_size`` (K,), ``embed_sum`` (K, D).
    The EMA update and restarts happen in ``forward`` when ``self.training`` is true and use
    the global torch RNG (so a resumed run that restores the RNG state repeats them).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        dead_code_threshold: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        if num_embeddings < 2 or embedding_dim < 1:
            raise ValueError(f"need num_embeddings >= 2 and embedding_dim >= 1, got {num_embeddings}, {embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        embed = torch.randn(num_embeddings, embedding_dim) * 0.1
        self.register_buffer("embedding", embed)
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index int64 (N,) of the nearest codebook vector (squared L2) for each row of ``flat``
        (N, D). Always computed in float32, autocast or not: in bf16 the expansion
        ``|x|^2 - 2 x.e + |e|^2`` loses the gaps between codes (:mod:`pipeline.precision`)."""
        with float32(flat):
            flat, emb = full(flat), self.embedding
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None, :]
            return dist.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of ``codes`` (B, *S) int -> float (B, D, *S), S = (H, W) or (d, h, w)."""
        return F.embedding(codes.long(), self.embedding).movedim(-1, 1).contiguous()

    def snap(self, latents: torch.Tensor) -> torch.Tensor:
        """Codes of the codebook vectors nearest to ``latents`` (B, D, *S) -> int64 (B, *S)."""
        d = latents.shape[1]
        flat = _channels_last(latents).reshape(-1, d).float()
        return self.nearest(flat).view(latents.shape[0], *latents.shape[2:])

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.num_embeddings).type(flat.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_embeddings * self.eps) * n
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
            new = flat[pick]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(new, src=0)
            self.embedding[dead] = new
            self.embed_sum[dead] = new
            self.cluster_size[dead] = 1.0
            self.restarts += n_dead

    def forward(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize ``z_e`` (B, D, H, W) or (B, D, d, h, w) float; see :class:`VQOutput`.

        The nearest-code search, the EMA statistics, the commitment loss and the perplexity run
        in float32 whatever the surrounding autocast (:mod:`pipeline.precision`); a bf16 ``z_e``
        is compared as it is (cast to float32), and ``quantized`` comes back in float32.

        Raises:
            ValueError: if the channel dimension is not D, or the rank is not 4 or 5.
        """
        if z_e.dim() not in (4, 5) or z_e.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected (B, {self.embedding_dim}, H, W) or (B, {self.embedding_dim}, d, h, w), got "
                f"{tuple(z_e.shape)}"
            )
        with float32(z_e):
            return self._quantize(full(z_e))

    def _quantize(self, z_e: torch.Tensor) -> VQOutput:
        b, d, *grid = z_e.shape
        flat = _channels_last(z_e).reshape(-1, d)
        codes = self.nearest(flat.detach())
        # Look up with the codebook the codes were chosen from, then update it (as Sonnet's
        # VectorQuantizerEMA): the EMA step and any restart take effect from the next batch.
        quantized = F.embedding(codes, self.embedding.clone()).view(b, *grid, d).movedim(-1, 1)
        if self.training and not flat.is_meta:  # meta tensors (pipeline.flops counts on them) have no values
            self._ema_update(flat.detach(), codes)
        commitment = self.commitment_cost * F.mse_loss(z_e, quantized.detach())
        quantized_st = z_e + (quantized - z_e).detach()  # straight-through estimator
        # code counts by scatter_add, not bincount: same integers, and it runs on meta tensors
        counts = flat.new_zeros(self.num_embeddings).scatter_add_(0, codes, flat.new_ones(codes.shape))
        probs = counts / codes.numel()
        perplexity = torch.exp(torch.special.entr(probs).sum())
        return VQOutput(quantized_st, commitment, codes.view(b, *grid), perplexity)


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))) (VQ-VAE paper sec. 4.1); keeps (B, C, *S)."""

    def __init__(self, channels: int, res_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.block = nn.Sequential(
            nn.ReLU(),
            conv(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            conv(res_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _widths(hidden: int, stages: int) -> list[int]:
    """Channel widths of the stride-2 stages, finest first: hidden / 2**(stages-1), ..., hidden."""
    return [hidden // 2 ** (stages - 1 - i) for i in range(stages)]


class Encoder(nn.Module):
    """(B, in_ch, *S) in [0, 1] -> (B, D, *S/f): log2(f) stride-2 kernel-4 convolutions (each
    halves every side), residual blocks, a 1x1 convolution to D. f = 2**stages; S = (H, W) or
    (D, H, W) for ``spatial_dims`` 2 or 3."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        res_channels: int,
        num_res_blocks: int,
        embedding_dim: int,
        stages: int = 2,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv = conv_nd(spatial_dims)
        layers: list[nn.Module] = []
        ch = in_channels
        for width in _widths(hidden, stages):
            layers += [conv(ch, width, 4, stride=2, padding=1), nn.ReLU()]  # H -> H/2
            ch = width
        self.net = nn.Sequential(
            *layers,
            conv(hidden, hidden, 3, padding=1),
            *[ResidualBlock(hidden, res_channels, spatial_dims) for _ in range(num_res_blocks)],
            nn.ReLU(),
            conv(hidden, embedding_dim, 1),
        )
        self.gradient_checkpointing = False  # set by the training stage (vqvae.gradient_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_sequential(self.net, x - 0.5, self.gradient_checkpointing)


class Decoder(nn.Module):
    """(B, D, *s) -> (B, out_ch, *s*f) logits; log2(f) stride-2 transposed convolutions."""

    def __init__(
        self,
        out_channels: int,
        hidden: int,
        res_channels: int,
        num_res_blocks: int,
        embedding_dim: int,
        stages: int = 2,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv, up = conv_nd(spatial_dims), conv_nd(spatial_dims, transposed=True)
        widths = _widths(hidden, stages)[::-1] + [out_channels]  # hidden, hidden/2, ..., out
        layers: list[nn.Module] = [conv(embedding_dim, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden, res_channels, spatial_dims) for _ in range(num_res_blocks)]
        for i in range(stages):
            layers += [nn.ReLU(), up(widths[i], widths[i + 1], 4, stride=2, padding=1)]  # h -> 2h
        self.net = nn.Sequential(*layers)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _run_sequential(self.net, z, self.gradient_checkpointing)


class VQVAE(nn.Module):
    """VQ-VAE for C x H x W images with an (H/f) x (W/f) grid of codes (28x28 -> 7x7 at f = 4),
    or for C x D x H x W volumes with a (D/f) x (H/f) x (W/f) grid (``spatial_dims=3``).

    Args:
        in_channels: image channels C (1 gray, 3 RGB, 4 RGBA).
        num_embeddings: K, codebook size.
        embedding_dim: D, code vector dimension.
        hidden_channels: width of encoder and decoder (a multiple of f / 2).
        res_channels: bottleneck width of the residual blocks.
        num_res_blocks: residual blocks in encoder and in decoder.
        commitment_cost, ema_decay, dead_code_threshold: see :class:`VectorQuantizerEMA`.
        downsample: f in {2, 4, 8}: H and W (and D) must be multiples of f.
        spatial_dims: 2 (images) or 3 (volumes): the same network with 3D convolutions.

    Images are float (B, C, H, W) in [0, 1]; reconstructions come back in [0, 1] (sigmoid).
    Below, h = H / f and w = W / f; for volumes read (B, C, D, H, W) and codes (B, d, h, w).
    API (as MONAI Generative Models' VQVAE): :meth:`encode`, :meth:`quantize`, :meth:`decode`,
    :meth:`index_quantize`, :meth:`decode_codes`, :meth:`forward`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_embeddings: int = 128,
        embedding_dim: int = 16,
        hidden_channels: int = 64,
        res_channels: int = 32,
        num_res_blocks: int = 2,
        commitment_cost: float = 0.25,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.1,
        downsample: int = 4,
        spatial_dims: int = 2,
    ):
        super().__init__()
        conv_nd(spatial_dims)  # raises for another value
        if downsample not in (2, 4, 8):
            raise ValueError(f"downsample must be 2, 4 or 8, got {downsample}")
        stages = downsample.bit_length() - 1
        if hidden_channels % max(2, downsample // 2):
            raise ValueError(f"hidden_channels must be a multiple of {max(2, downsample // 2)}, got {hidden_channels}")
        self.downsample, self.spatial_dims = downsample, spatial_dims
        self.encoder = Encoder(
            in_channels, hidden_channels, res_channels, num_res_blocks, embedding_dim, stages, spatial_dims
        )
        self.quantizer = VectorQuantizerEMA(
            num_embeddings, embedding_dim, commitment_cost, ema_decay, dead_code_threshold
        )
        self.decoder = Decoder(
            in_channels, hidden_channels, res_channels, num_res_blocks, embedding_dim, stages, spatial_dims
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint the encoder's and the decoder's layer stacks in about sqrt(n) segments
        (:func:`checkpointed`; as diffusers' ``enable_gradient_checkpointing``): training
        activations drop to the segment inputs plus one segment, for one more forward. A training
        setting, not stored in the checkpoint's model args."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(enabled)

    def checkpoint_regions(self) -> list[tuple[nn.Module, nn.Module]]:
        """(first, last) module of every region :meth:`enable_gradient_checkpointing` recomputes
        (what :func:`pipeline.flops.stage_memory` measures)."""
        stacks = (self.encoder.net, self.decoder.net)
        return [(net[a], net[b - 1]) for net in stacks for a, b in sequential_segments(len(net))]

    def check_size(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, C, H, W) (or (B, C, D, H, W) for volumes) with
        every side a multiple of ``downsample``."""
        if x.dim() != 2 + self.spatial_dims or any(s % self.downsample for s in x.shape[2:]):
            sides = "H and W" if self.spatial_dims == 2 else "D, H and W"
            shape = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"images must be {shape} with {sides} multiples of downsample {self.downsample}, got {tuple(x.shape)}"
            )

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.quantizer.embedding_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> continuous z_e (B, D, h, w).

        Raises:
            ValueError: H or W not a multiple of ``downsample``."""
        self.check_size(x)
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize z_e (B, D, h, w); updates the codebook when training."""
        return self.quantizer(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized (or any) latents (B, D, h, w) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.decoder(z_q))

    def index_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> codes int64 (B, h, w)."""
        return self.quantizer.snap(self.encode(x))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes int (B, h, w) in [0, K) -> images (B, C, H, W) in [0, 1]."""
        return self.decode(self.quantizer.lookup(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQOutput]:
        """Images (B, C, H, W) in [0, 1] -> (reconstruction in [0, 1], :class:`VQOutput`)."""
        vq = self.quantize(self.encode(x))
        return self.decode(vq.quantized), vq
