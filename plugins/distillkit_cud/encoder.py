"""CUD's coupling encoder (METHODS.md §2.2, inherited from Lee et al. 2023, "Minimizing Trajectory
Curvature of ODE-based Generative Models").

The encoder maps a data sample to a diagonal Gaussian, (μ, log σ²) = E_φ(x), and the noise the
sample is paired with is ε = μ + exp(½ log σ²) ⊙ n, n ~ N(0, I). A penalty β·KL(q_φ(ε|x) ‖ N(0, I))
keeps the marginal of ε close to N(0, I), so that sampling can start from plain Gaussian noise: the
encoder is never used at sampling.

Three encoders, all returning ``(mu, logvar)`` shaped like ``x``:

* ``ConvEncoder`` (images) and ``MLPEncoder`` (vectors): small networks of this plugin, whose
  last layer starts near zero so that training starts from the independent coupling (μ ≈ 0,
  σ ≈ 1, KL ≈ 0);
* ``BackboneEncoder``: any registered backbone evaluated at t = 1 (the paper's E_φ(x, t = 1), a
  32-channel SongUNet on CIFAR-10 / MNIST): its output is μ and one extra head made by
  ``make_output_head`` reading the same features is log σ² (the paper's single 2C-channel
  output conv, split into two C-channel output blocks).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over a sample's dimensions, divided by their number (C·H·W),
    averaged over the batch (§2.2)."""
    per_element = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)
    per_sample = per_element.flatten(1).sum(dim=1) / per_element[0].numel()
    return per_sample.mean()


def _shrink_(layer: nn.Module, scale: float = 1e-5) -> None:
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()


class ConvEncoder(nn.Module):
    """Images [C, H, W] -> (μ, log σ²), each [C, H, W]: three 3x3 convolutions of ``width``
    channels with SiLU, then a 3x3 convolution to 2C channels (started near zero)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
        )
        self.out = nn.Conv2d(width, 2 * channels, 3, padding=1)
        _shrink_(self.out)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.out(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class MLPEncoder(nn.Module):
    """Vectors [D] -> (μ, log σ²), each [D]: two hidden layers of ``width`` with SiLU."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, 2 * dim)
        _shrink_(self.out)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.out(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class BackboneEncoder(nn.Module):
    """A registered backbone at t = 1: its output is μ, an extra output head is log σ²."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.logvar_head = backbone.make_output_head()

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        mu, features = self.backbone(x, t, cond, return_features=True)
        return mu, self.logvar_head(features)
