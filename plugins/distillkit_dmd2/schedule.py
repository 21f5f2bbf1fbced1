"""Noise levels of DMD2 (EDM's Karras grid) in distillkit's time, and the EDM loss weight.

DMD2 works in EDM's variance-exploding frame, y = x + sigma * eps. The same marginal path in
distillkit's frame is x_t = (1 - t) y with t = sigma / (1 + sigma) (x0 estimates are the same
in both frames), so every sigma the paper draws is drawn here and mapped by that formula.
"""

from __future__ import annotations

import torch


def karras_sigmas(count: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's ``count`` noise levels, index 0 the smallest (float64):
    sigma_i = (sigma_min^(1/rho) + i / (count - 1) * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho."""
    ramp = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + ramp * (high - low)) ** rho


def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """EDM's sigma as distillkit's time: x_t = (1 - t) (x + sigma eps) has t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def edm_velocity_weight(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's denoising weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on |D - x|^2, moved onto
    the velocity error: D - x = -t (v - v*) and t = sigma / (1 + sigma) give the weight
    (t^2 + sigma_d^2 (1 - t)^2) / sigma_d^2 on |v - v*|^2 (1 at t = 0, 1 / sigma_d^2 at t = 1)."""
    return (t.square() + sigma_data**2 * (1 - t).square()) / sigma_data**2
