"""DMD2's networks beyond plain backbones: the one-step (or k-step) generator's input mapping and
the fake-score network with its optional GAN classifier head."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from distillkit import DataSpec, broadcast_time


def generator_x0(network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                 generator_time: float) -> torch.Tensor:
    """The generator's sample from the state ``x`` at time ``t``: the x0 estimate
    x_in - tau * net(x_in, tau) of a velocity network (so a generator copied from the teacher
    starts as the teacher's denoiser).

    At t = 1 the state is pure noise eps; the generator's first step reads it as the state at
    ``generator_time`` t_g with nothing of the data in it: x_in = t_g eps, tau = t_g (DMD2: EDM's
    sigma_max = 80, t_g = 80/81; SiD: sigma_init = 2.5, t_g = 2.5/3.5). Below t = 1 (a k-step
    generator's later steps) the state is read as it is, at its own time."""
    top = t >= 1
    tau = torch.where(top, torch.full_like(t, generator_time), t)
    x_in = x * broadcast_time(torch.where(top, tau, torch.ones_like(t)), x)
    return x_in - broadcast_time(tau, x) * network(x_in, tau, cond)


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
