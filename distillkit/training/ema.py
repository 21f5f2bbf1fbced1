"""Exponential moving averages of the student's weights, on PyTorch's own ``AveragedModel``.

Each average has a name that says what it is (``ema_0.999``, ``ema_hl500000``) and that name is
used for it in checkpoints, in MLflow and on the command line (``--weights``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay for update number ``updates`` (0-based) of a fixed-decay EMA, ramped up as
    (1 + n) / (10 + n): without the ramp a 0.999 average of a short run is mostly initial weights."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def halflife_decay_at(halflife_images: float, rampup_ratio: float, batch_images: int, updates: int) -> float:
    """EDM's EMA: the weights' half-life is ``halflife_images`` training images, ramped up to at
    most ``rampup_ratio`` times the images seen so far (Karras et al. 2022, training loop)."""
    images_seen = (updates + 1) * batch_images
    halflife = halflife_images if rampup_ratio <= 0 else min(halflife_images, images_seen * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


def ema_name(decay: float) -> str:
    return f"ema_{decay:g}"


def halflife_name(halflife_images: float) -> str:
    return f"ema_hl{halflife_images:g}"


def make_ema(student: nn.Module, decay_at: Callable[[int], float]) -> AveragedModel:
    """An ``AveragedModel`` whose update ``n`` uses decay ``decay_at(n)``."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (counters) follow the student
            torch._foreach_copy_(averaged, current)
            return
        torch._foreach_lerp_(averaged, current, 1.0 - decay_at(int(num_averaged)))

    return AveragedModel(student, multi_avg_fn=update, use_buffers=True)


def make_emas(
    student: nn.Module, decays: tuple[float, ...], halflife_images: float, rampup_ratio: float, batch_images: int
) -> dict[str, AveragedModel]:
    """Every average the config asks for, by name, the first being the one evaluated by default."""
    emas = {ema_name(d): make_ema(student, lambda n, d=d: ema_decay_at(d, n)) for d in decays}
    if halflife_images > 0:
        emas[halflife_name(halflife_images)] = make_ema(
            student, lambda n: halflife_decay_at(halflife_images, rampup_ratio, batch_images, n)
        )
    return emas
