"""The label-free judge's network: a small CNN trained contrastively (SimCLR; Chen et al. 2020,
"A Simple Framework for Contrastive Learning of Visual Representations") on the run's own train
split, without labels.

Its representation h (the output before the projection head, as SimCLR sec. 2.1 and 4.2
recommend) is the feature space of the label-free Fréchet distance and of precision/recall
(:mod:`pipeline.evaluate`); the projection head g only serves the NT-Xent loss
(:func:`nt_xent`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureEncoder", "nt_xent"]


def _block(c_in: int, c_out: int, spatial_dims: int = 2) -> nn.Sequential:
    conv, norm, pool = (
        (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
        if spatial_dims == 2
        else (
            nn.Conv3d,
            nn.BatchNorm3d,
            nn.MaxPool3d,
        )
    )
    return nn.Sequential(
        conv(c_in, c_out, 3, padding=1),
        norm(c_out),
        nn.ReLU(),
        conv(c_out, c_out, 3, padding=1),
        norm(c_out),
        nn.ReLU(),
        pool(2),
    )


class FeatureEncoder(nn.Module):
    """CNN encoder f: (B, C, H, W) in [0, 1] -> h (B, feature_dim), plus projection head g; for
    volumes, (B, C, D, H, W) with the same blocks in 3D.

    Args:
        image_shape: (C, H, W), H and W >= 8; or (C, D, H, W) for volumes (3D convolutions).
        channels: width c of the first block; blocks double it (c, 2c, 4c), each halving H, W,
            while the map is at least 8 pixels on its shorter side (at least two blocks); then
            adaptive average pooling to 4x4 (2x2x2 for volumes) and a linear layer to ``feature_dim``.
        feature_dim: size of h (the judge's feature space).
        projection_dim: output of g (SimCLR's MLP head: Linear-ReLU-Linear).

    Inputs are centred internally ((x - 0.5) / 0.5).
    """

    def __init__(self, image_shape=(1, 28, 28), channels: int = 32, feature_dim: int = 128, projection_dim: int = 64):
        super().__init__()
        c, *sides = (int(v) for v in image_shape)
        if len(sides) not in (2, 3) or min(sides) < 8:
            raise ValueError(f"image_shape {tuple(image_shape)}: expected (C, H, W) or (C, D, H, W), sides >= 8")
        dims = len(sides)
        self.image_shape, self.feature_dim = (c, *sides), feature_dim
        blocks, ch, side = [], c, min(sides)
        while len(blocks) < 2 or (side >= 16 and len(blocks) < 4):
            blocks.append(_block(ch, channels * 2 ** len(blocks), dims))
            ch, side = channels * 2 ** (len(blocks) - 1), side // 2
        pool, cells = (nn.AdaptiveAvgPool2d(4), 16) if dims == 2 else (nn.AdaptiveAvgPool3d(2), 8)
        self.body = nn.Sequential(*blocks, pool, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(ch * cells, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, projection_dim)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Representation h float (B, feature_dim) (post-ReLU, >= 0) of images (B, C, H, W) in [0, 1].

        Raises:
            ValueError: images of another shape than ``image_shape``."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return self.fc(self.body((x.float() - 0.5) / 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projection z = g(h) float (B, projection_dim) (what NT-Xent compares)."""
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Eval-mode features h float32 (N, feature_dim) on CPU of images (N, C, H, W) (or volumes)
        in [0, 1], in batches of at most ``batch_size`` and about 4M pixels."""
        batch_size = min(batch_size, max(1, 2**22 // max(1, x[0].numel()))) if len(x) else batch_size
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self.features(x[s : s + batch_size].to(dev)).float().cpu() for s in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR eq. 1) of two views.

    Args:
        z1, z2: float (B, P) projections of two augmentations of the same B images.
        temperature: tau > 0.

    Returns:
        float scalar: the mean over the 2B anchors of -log softmax(sim / tau) at the positive,
        where sim is the cosine similarity to the 2B - 1 other projections.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
