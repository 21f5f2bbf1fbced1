"""One network's optimizer and learning-rate schedule, from its ``OptimizerConfig``.

Schedules are ``torch.optim.lr_scheduler.LambdaLR`` with the factors below, a function of the
scheduler's step count ``n`` (0-based: the factor for optimizer step ``n``) and, for ``cosine``,
of ``train.max_steps`` ``T``; ``W`` is ``warmup_steps``:

- ``constant``: 1;
- ``warmup``: min(1, (n + 1) / W) (1 when W = 0), the linear warm-up distillkit has always used;
- ``cosine``: the warm-up while n < W, then 0.5 (1 + cos(pi (n - W) / (T - W))), which reaches 0
  at n = T;
- ``inverse-sqrt``: the warm-up while n + 1 < W, then sqrt(max(W, 1) / (n + 1)); both are 1 at
  n + 1 = W.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..config import OptimizerConfig

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
#: the optimizers whose fused implementation takes a found-inf flag (``optimizer.found_inf``, as
#: ``torch.amp.GradScaler`` sets it): a flagged step changes no weight, moment or step count.
FOUND_INF = ("adam", "adamw")
#: what an optimizer's implementation is chosen by: not restored from a checkpoint (see ``load_optimizer``)
_IMPLEMENTATION = ("fused", "foreach")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: OptimizerConfig,
                    fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: the fused implementation (only for ``FOUND_INF``), which obeys a found-inf flag."""
    cls = _OPTIMIZERS[config.optimizer]
    extra = {"fused": True} if fused else {}
    return cls(list(parameters), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
               weight_decay=config.weight_decay, **extra)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)`` keeping this run's implementation: torch restores a
    group's ``fused`` / ``foreach`` from the file, and places the step counters by it, so a
    checkpoint of a host-checked run would otherwise turn a fused optimizer back into a plain one."""
    groups = [{**old, **{key: new[key] for key in _IMPLEMENTATION if key in new}}
              for old, new in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    if warmup_steps == 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def lr_factor(config: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of ``config.lr_schedule`` (see the module docstring)."""
    warm, w = _warmup(config.warmup_steps), config.warmup_steps
    if config.lr_schedule == "constant":
        return lambda step: 1.0
    if config.lr_schedule == "warmup":
        return warm
    if config.lr_schedule == "cosine":
        span = max(total_steps - w, 1)

        def cosine(step: int) -> float:
            if step < w:
                return warm(step)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))

        return cosine
    if config.lr_schedule == "inverse-sqrt":
        return lambda step: warm(step) if step + 1 < w else math.sqrt(max(w, 1) / (step + 1))
    raise ValueError(f"unknown learning-rate schedule {config.lr_schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total_steps))
