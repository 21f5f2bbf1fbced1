"""DMD2's networks beyond plain backbones: the one-step (or k-step) generator's input mapping and
the fake-score network with its optional GAN classifier head."""

from __future__ import annotations

import math

import torch
from torch import nn

from distillkit import DataSpec




class GANHead(nn.Module):
    """A classifier on the fake-score backbone's features (``return_features=True``): one logit
    per sample, "real" when positive. Image features [B, C, H, W]: a 3x3 convolution, GroupNorm,
    SiLU, global average pooling and a linear layer; vector features [B, H]: a two-layer MLP."""

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        channels = feature_shape[0]
        if len(feature_shape) == 3:
            self.layers = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(math.gcd(channels, 32), channels), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1),
            )
        else:
            self.layers = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).reshape(-1)


class FakeScore(nn.Module):
    """The fake-score velocity network v_fake(x_t, t), and (with a GAN head) the classifier that
    reads its features: ``forward(..., with_logit=True)`` returns (velocity, logit). The flag is a
    keyword of ``forward`` so that it passes through DDP and ``torch.compile`` wrappers."""

    def __init__(self, backbone: nn.Module, data: DataSpec, gan_head: bool):
        super().__init__()
        self.backbone = backbone
        self.head = GANHead(self._feature_shape(data)) if gan_head else None

    def _feature_shape(self, data: DataSpec) -> tuple[int, ...]:
        """The backbone's feature shape, probed with one evaluation (eval mode: no dropout draw)."""
        mode = self.backbone.training
        self.backbone.eval()
        cond = None if data.num_classes is None else torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            _, features = self.backbone(torch.zeros(1, *data.shape), torch.full((1,), 0.5), cond, return_features=True)
        self.backbone.train(mode)
        return tuple(features.shape[1:])

    def forward(self, x, t, cond=None, *, with_logit: bool = False):
        if not with_logit:
            return self.backbone(x, t, cond)
        if self.head is None:
            raise RuntimeError("this fake-score network has no GAN head (method_options.gan_generator_weight = 0)")
        velocity, features = self.backbone(x, t, cond, return_features=True)
        return velocity, self.head(features)
