"""Exponential moving averages of the student's weights, on PyTorch's own ``AveragedModel``.

Each average has a name that says what it is (``ema_0.999``, ``ema_hl500000``) and that name is
used for it in checkpoints, in MLflow and on the command line (``--weights``).
"""

from __future__ import annotations

from typing import Callable, Optional

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
        # (model, [(averaged, current) floating tensors], [(averaged, current) integer tensors]):
        # walking a large network's modules on every step costs more than the update itself.
        self._tensors: Optional[tuple[nn.Module, tuple[list, list], tuple[list, list]]] = None

    def _tensor_lists(self, model: nn.Module) -> tuple[tuple[list, list], tuple[list, list]]:
        if self._tensors is None or self._tensors[0] is not model:
            pairs = list(zip((t.detach() for t in (*self.module.parameters(), *self.module.buffers())),
                             (t.detach() for t in (*model.parameters(), *model.buffers()))))

            def split(floating: bool) -> tuple[list, list]:
                chosen = [(a, c) for a, c in pairs if a.is_floating_point() == floating]
                return [a for a, _ in chosen], [c for _, c in chosen]

            self._tensors = (model, split(True), split(False))
        return self._tensors[1], self._tensors[2]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        (float_avg, float_cur), (other_avg, other_cur) = self._tensor_lists(model)
        if float_avg:
            if self.updates == 0:
                torch._foreach_copy_(float_avg, float_cur)
            else:
                torch._foreach_lerp_(float_avg, float_cur, 1.0 - self.decay_at(self.updates))
        if other_avg:
            torch._foreach_copy_(other_avg, other_cur)
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
