"""Building blocks shared by the paper-scale U-Nets (``songunet``, ``adm``).

Written from the papers (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", appendix H: DDPM++; Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", appendix F.2; Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs on Image Synthesis"). No code from the EDM or CUD repositories is used.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import distillkit

from .embeddings import _is_int

# ---------------------------------------------------------------------------------------------
# Config helpers shared by the songunet and adm configs
# ---------------------------------------------------------------------------------------------


def optional_positive_int_tuple(instance, attribute, value) -> None:
    if value is not None and not (
        isinstance(value, tuple) and value and all(_is_int(v) and v > 0 for v in value)
    ):
        raise distillkit.ConfigError(attribute.name, value, "a non-empty list of positive integers")


def optional_resolution_tuple(instance, attribute, value) -> None:
    """Attention resolutions: a list of positive integers, possibly empty (no attention)."""
    if value is not None and not (isinstance(value, tuple) and all(_is_int(v) and v > 0 for v in value)):
        raise distillkit.ConfigError(attribute.name, value, "a list of positive integers (may be empty)")


def optional_dropout(instance, attribute, value) -> None:
    if value is not None and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    ):
        raise distillkit.ConfigError(attribute.name, value, "a number in [0, 1)")


boolean = distillkit.validators.boolean


def phi_value(instance, attribute, value) -> None:
    if not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise distillkit.ConfigError(attribute.name, value, "a number in [0, 1]")


def resample_filter_value(instance, attribute, value) -> None:
    if not (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
        and sum(value) > 0
        and len(value) % 2 == 0
    ):
        raise distillkit.ConfigError(
            attribute.name, value, "an even-length list of non-negative numbers with a positive sum, e.g. [1, 1] or [1, 3, 3, 1]"
        )


def to_optional_float(value):
    return float(value) if _is_int(value) else value


def to_optional_tuple(value):
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def init_layer_(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """DDPM++'s ``default_init``: variance scaling with fan_avg and a uniform distribution (that
    is Glorot / Xavier uniform), multiplied by ``scale``; biases start at zero. ``scale = 1e-5``
    is the near-zero init of the last convolution of every residual branch and output block."""
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv2d(in_channels: int, out_channels: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    return init_layer_(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), scale)


def linear(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    return init_layer_(nn.Linear(in_features, out_features), scale)


def group_norm(channels: int, max_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-6) -> nn.GroupNorm:
    """EDM's group count, ``min(32, channels // 4)``, lowered to the nearest divisor of
    ``channels`` when it does not divide them (EDM would fail there; for every width a power
    of two times 16 or more this is the same as EDM's choice)."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


# ---------------------------------------------------------------------------------------------
# Resampling with a separable low-pass filter
# ---------------------------------------------------------------------------------------------


class Resample(nn.Module):
    """2x down- or up-sampling with a fixed separable filter, applied to each channel alone.

    ``[1, 1]`` (DDPM++) is a 2x2 box: average pooling down, nearest-neighbour up. ``[1, 3, 3, 1]``
    is the FIR filter of NCSN++ / StyleGAN2. The filter is normalised to sum 1 (down) or 4 (up,
    since a transposed convolution with stride 2 spreads each input over 4 outputs), so a constant
    image stays constant. No parameters.
    """

    def __init__(self, mode: str, taps: Sequence[float] = (1, 1)):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode must be 'down' or 'up'; got {mode!r}")
        self.mode = mode
        kernel_1d = torch.as_tensor(taps, dtype=torch.float32)
        kernel = torch.outer(kernel_1d, kernel_1d)
        kernel = kernel / kernel.sum() * (4.0 if mode == "up" else 1.0)
        self.register_buffer("kernel", kernel[None, None], persistent=False)
        self.padding = (len(taps) - 1) // 2
        # [1, 1] is exactly average pooling / nearest upsampling, which have faster kernels
        # than a depthwise convolution.
        self.box = len(taps) == 2 and taps[0] == taps[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.box:
            return F.avg_pool2d(x, 2) if self.mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        channels = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(channels, 1, -1, -1)
        if self.mode == "down":
            return F.conv2d(x, weight, stride=2, padding=self.padding, groups=channels)
        return F.conv_transpose2d(x, weight, stride=2, padding=self.padding, groups=channels)


# ---------------------------------------------------------------------------------------------
# Attention and Prior ShakeDrop
# ---------------------------------------------------------------------------------------------


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention over the pixels. ``q, k, v``: ``[B, C, N]`` with channels grouped by head
    (head ``i`` owns channels ``i*C/heads .. (i+1)*C/heads``). Scale ``1 / sqrt(C / heads)``.
    Returns ``[B, C, N]``."""
    batch, channels, tokens = q.shape
    head_dim = channels // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, C, N] -> [B, heads, N, head_dim]
        return t.reshape(batch, heads, head_dim, tokens).transpose(2, 3)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(2, 3).reshape(batch, channels, tokens)


def shakedrop_scale(t: torch.Tensor, phi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CUD's "Prior ShakeDrop" factors ``(2 a(t), 2 (1 - a(t)))`` with ``a(t) = phi + (1 - 2 phi) t``,
    shaped ``[B, 1, 1, 1]`` to multiply the decoder's ``h`` and its skip before concatenation.
    With ``phi = 0.75``: at t = 0 (data) ``h`` x 1.5 and skip x 0.5; at t = 1 (noise) the reverse."""
    a = (phi + (1.0 - 2.0 * phi) * t).reshape(-1, 1, 1, 1)
    return 2.0 * a, 2.0 * (1.0 - a)


def concat_skip(h: torch.Tensor, skip: torch.Tensor, factors: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    if factors is None:
        return torch.cat([h, skip], dim=1)
    h_scale, skip_scale = factors
    return torch.cat([h * h_scale.to(h.dtype), skip * skip_scale.to(skip.dtype)], dim=1)


# ---------------------------------------------------------------------------------------------
# Image size handling
# ---------------------------------------------------------------------------------------------


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Zero-pad the bottom/right so that H and W are multiples of ``factor``."""
    pad_h = -x.shape[2] % factor
    pad_w = -x.shape[3] % factor
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
