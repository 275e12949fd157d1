"""Data augmentation of image batches (a leaf module: torch only).

Used by the classifier's training (``pipeline.train``) and by ``extract_latents``, which writes the
codes of augmented copies of the train images so that the priors see more than the plain grids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine", "gaussian_blur"]


def random_affine(
    x: torch.Tensor,
    max_degrees: float,
    max_shift: float,
    generator: torch.Generator | None = None,
    max_scale: float = 0.0,
) -> torch.Tensor:
    """Random rotation, scaling and translation of a batch.

    Args:
        x: float (B, C, H, W) images, background 0; or (B, C, D, H, W) volumes, rotated in the
            (H, W) planes about the D axis, shifted along all three axes, zoomed isotropically.
        max_degrees: rotation drawn uniformly in [-max_degrees, max_degrees] degrees.
        max_shift: translation per axis drawn uniformly in [-max_shift, max_shift] pixels.
        generator: RNG of the draws (CPU); None = the global torch RNG.
        max_scale: isotropic zoom factor drawn uniformly in [1 - max_scale, 1 + max_scale]
            (0: none; the draw is skipped, so the RNG stream equals the rotation/shift-only one).

    Returns:
        float, the shape of x, (tri)linear resampling (``F.grid_sample``) with zero padding;
        labels are unchanged by construction (one affine map per image, same shape).
    """
    if x.dim() == 5:
        return _random_affine_3d(x, max_degrees, max_shift, generator, max_scale)
    b, _, h, w = x.shape
    u = torch.rand(b, 3, generator=generator).to(x.device) * 2 - 1
    ang = u[:, 0] * math.radians(max_degrees)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if max_scale:
        zoom = 1.0 + (torch.rand(b, generator=generator).to(x.device) * 2 - 1) * max_scale
        cos, sin = cos / zoom, sin / zoom  # the grid maps output to input: divide to zoom in
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[:, 1] * 2 * max_shift / w], 1),
            torch.stack([sin, cos, u[:, 2] * 2 * max_shift / h], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_affine_3d(x, max_degrees, max_shift, generator, max_scale):
    b, _, d, h, w = x.shape
    u = torch.rand(b, 4, generator=generator).to(x.device) * 2 - 1
    ang = u[:, 0] * math.radians(max_degrees)
    cos, sin = torch.cos(ang), torch.sin(ang)
    zoom = torch.ones(b, device=x.device)
    if max_scale:
        zoom = 1.0 + (torch.rand(b, generator=generator).to(x.device) * 2 - 1) * max_scale
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    # affine_grid's output coordinates are (x, y, z) = (W, H, D): rotate x-y, keep z
    theta = torch.stack(
        [
            torch.stack([cos / zoom, -sin / zoom, zero, u[:, 1] * 2 * max_shift / w], 1),
            torch.stack([sin / zoom, cos / zoom, zero, u[:, 2] * 2 * max_shift / h], 1),
            torch.stack([zero, zero, one / zoom, u[:, 3] * 2 * max_shift / d], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float (N, C, H, W) images (or (N, C, D, H, W) volumes), std
    ``sigma`` pixels, radius ceil(3 sigma), reflect padding; the blurred-real reference row."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    if x.dim() == 5:
        y = F.pad(x.float(), (r,) * 6, mode="reflect")
        for shape in ((1, 1, 1, 1, -1), (1, 1, 1, -1, 1), (1, 1, -1, 1, 1)):
            y = F.conv3d(y, k.view(shape).repeat(c, 1, 1, 1, 1), groups=c)
        return y.clamp(0, 1)
    y = F.pad(x.float(), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(0, 1)
