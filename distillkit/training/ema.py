"""Exponential moving average of the student's weights, on PyTorch's own ``AveragedModel``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used for update number ``updates`` (0-based): ramped up as (1 + n) / (10 + n).

    Without the ramp a 0.999 average of a short run would be mostly the random initial weights.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


def make_ema(student: nn.Module, decay: float) -> AveragedModel:
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # integer buffers (counters) follow the student
            torch._foreach_copy_(averaged, current)
            return
        weight = 1.0 - ema_decay_at(decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, weight)

    return AveragedModel(student, multi_avg_fn=update, use_buffers=True)
