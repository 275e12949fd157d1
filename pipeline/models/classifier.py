"""A small CNN digit classifier: the judge of sample quality and the feature extractor of the
Fréchet distance.

FID (Heusel et al. 2017) measures the Fréchet distance between Gaussians fitted to Inception-v3
pool features; for 28x28 digits an ImageNet network is the wrong judge, so, as is common for
MNIST (e.g. the "FID with a LeNet" of many GAN papers), the features are the penultimate layer
of a classifier trained on the run's own train split. The architecture is the classic
conv-conv-pool x2 MNIST CNN with batch norm and dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitClassifier"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class DigitClassifier(nn.Module):
    """CNN: (B, C, H, W) images -> (B, num_classes) logits, with a ``features`` view.

    Args:
        num_classes: output classes (10 digits).
        channels: width c of the first block; the second block has 2c (H -> H/2 -> H/4 pixels:
            28 -> 14 -> 7).
        image_shape: (C, H, W) of the images, H and W multiples of 4 ((1, 28, 28) for MNIST).
        feature_dim: size of the penultimate layer (the Fréchet-distance feature space).
        dropout: dropout before the last linear layer.

    Inputs are float images in [0, 1] (any float dtype); they are centred internally
    (x - 0.5) / 0.5, so callers never normalise.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.3,
        image_shape: tuple[int, int, int] | list[int] = (1, 28, 28),
    ):
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        if h % 4 or w % 4:
            raise ValueError(f"image_shape {tuple(image_shape)}: H and W must be multiples of 4")
        self.num_classes, self.feature_dim, self.image_shape = num_classes, feature_dim, (c, h, w)
        self.body = nn.Sequential(_block(c, channels), _block(channels, 2 * channels), nn.Flatten())
        flat = 2 * channels * (h // 4) * (w // 4)
        self.fc = nn.Sequential(nn.Linear(flat, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations float (B, feature_dim) (post-ReLU, >= 0) of images (B, C, H, W) in [0, 1].

        Raises:
            ValueError: images of another shape than ``image_shape``."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        return self.fc(self.body((x.float() - 0.5) / 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits float (B, num_classes) of images (B, C, H, W) in [0, 1]."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (softmax probabilities (N, num_classes), features (N, feature_dim)), float32 on CPU."""
        was_training = self.training
        self.eval()
        probs, feats = [], []
        for s in range(0, len(x), batch_size):
            f = self.features(x[s : s + batch_size])
            feats.append(f.float().cpu())
            probs.append(F.softmax(self.head(f).float(), dim=1).cpu())
        self.train(was_training)
        return torch.cat(probs), torch.cat(feats)
