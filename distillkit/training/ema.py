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


class ExponentialAverage(AveragedModel):
    """PyTorch's ``AveragedModel`` (same state dict, same module) with an update that never waits
    for the GPU: ``AveragedModel.update_parameters`` reads its device-side counter back on every
    update, so each EMA would add pipeline stalls to every training step. Here the count is also
    kept as a Python int (restored from the counter on load), and the arithmetic is the same:
    update 0 copies the weights, update n >= 1 lerps with weight 1 - ``decay_at(n)``; integer
    buffers (counters) follow the student."""

    def __init__(self, student: nn.Module, decay_at: Callable[[int], float]):
        super().__init__(student, use_buffers=True)
        self.decay_at = decay_at
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            if floating:
                torch._foreach_lerp_([averaged[i] for i in floating], [current[i] for i in floating],
                                     1.0 - self.decay_at(self.updates))
            others = [i for i in range(len(averaged)) if not averaged[i].is_floating_point()]
            if others:
                torch._foreach_copy_([averaged[i] for i in others], [current[i] for i in others])
        self.n_averaged += 1
        self.updates += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)
        return result


def make_ema(student: nn.Module, decay_at: Callable[[int], float]) -> AveragedModel:
    """An ``AveragedModel`` whose update ``n`` uses decay ``decay_at(n)``."""
    return ExponentialAverage(student, decay_at)


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
