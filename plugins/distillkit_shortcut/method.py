"""Shortcut models (Frans, Hafner, Levine and Abbeel, "One Step Diffusion via Shortcut Models",
ICLR 2025), written from the paper's math (and METHODS-ONE-STEP.md §3), not from its code.

Convention. The paper runs tau = 0 (noise) -> 1 (data): x_tau = (1 - tau) x0 + tau x1 with x0
noise, x1 data, and steps x <- x + d s. In the project's convention t = 1 - tau, and a step of
size d moves t down to t - d, so the shortcut in our units is s_ours = -s_paper:

    x_{t - d} = x_t - d s(x_t, t, d),      s(x_t, t, d) -> v(x_t, t) = E[eps - x | x_t] as d -> 0.

The network is conditioned on the step size through the backbone's extra input ``d``, which
receives the step's *level* log2(1/d) (clamped to [0, max_log2]): the paper embeds the integer
log2(1/d), and our positional embedding of the raw value in [0, 1] would barely tell d = 1/64
from d = 1/128. The level max_log2 (d = 1/128 by default) also stands for d -> 0 (the paper's
flow-matching rows use it), and a step the sampler takes is embedded at its own, possibly
fractional, level.

Loss, per batch (the first ``consistency_fraction`` of the rows, the rest flow matching):

    flow matching:     t on the grid {1/M, ..., 1}, M = 2^max_log2;  s(x_t, t, 1/M) ~ eps - x
    self-consistency:  level k ~ U{0, ..., max_log2 - 1}, D = 2^-k, t on the grid {D, 2D, ..., 1};
                       s1 = s'(x_t, t, D/2),  x' = x_t - (D/2) s1,  s2 = s'(x', t - D/2, D/2)
                       s(x_t, t, D) ~ sg[(s1 + s2) / 2]

with s' the EMA of the network (the paper's code; ``target_ema = 0``: the network itself under
stop-gradient), and x' and the target clipped to [-clip, clip] as the paper's code does.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn

import distillkit
from distillkit import (LossOutput, Method, SamplingModel, TargetNetwork, broadcast_time, straight_path, unwrap_module,
                        validators)

#: The name of the backbone's extra conditioning input (it receives the level log2(1/d)).
STEP = "d"


def _levels(instance, attribute, value) -> None:
    validators.require(validators.is_int(value) and 1 <= value <= 16, attribute, value, "an integer in [1, 16]")



def _fraction(instance, attribute, value) -> None:
    validators.require(validators.is_number(value) and 0 <= value <= 1, attribute, value, "a number in [0, 1]")

@attrs.frozen
class ShortcutConfig:
    #: share of each batch trained for self-consistency (paper: 1/4; the official code uses 1/8)
    consistency_fraction: float = attrs.field(default=0.25, validator=_fraction)
    #: the smallest step is 2^-max_log2 (paper: 1/128); it also stands for d -> 0
    max_log2: int = attrs.field(default=7, validator=_levels)
    #: EMA rate of the network that makes the self-consistency targets (paper's code: 0.999;
    #: 0: the network itself under stop-gradient)
    target_ema: float = attrs.field(default=0.999, validator=validators.unit_interval)
    #: the intermediate point and the target are clipped to [-clip, clip] (paper's code: 4; 0: off)
    clip: float = attrs.field(default=4.0, validator=validators.non_negative_number)


def step_level(d: torch.Tensor, max_log2: int) -> torch.Tensor:
    """log2(1/d) clamped to [0, max_log2]: d >= 1 is level 0, d <= 2^-max_log2 (and d = 0, the
    instantaneous velocity) the finest level."""
    finest = 2.0 ** -max_log2
    return -torch.log2(d.clamp(min=finest, max=1.0))


class Shortcut(Method):
    name = "shortcut"
    config_class = ShortcutConfig
    conditioning = (STEP,)
    default_sampler = "shortcut"
    # ``shortcut`` takes each grid step with d = the step's size; ``consistency`` re-noises the
    # one-step estimate x - t s(x, t, t). Runge-Kutta stages (``ode``) would misread d.
    samplers = ("shortcut", "consistency")
    provides = frozenset({"velocity", "denoise"})

    def __init__(self, config: Any, context):
        super().__init__(config, context)
        self._target = TargetNetwork()

    # the target network ---------------------------------------------------------------------------
    def prepare(self, student, context):
        if self.config.target_ema > 0:
            self._target.start(unwrap_module(student)).eval()

    def _target_model(self, student: nn.Module) -> nn.Module:
        if self.config.target_ema == 0:
            return student  # the online network under stop-gradient
        # Made here when prepare was not called; evaluated without dropout (the code's train=False).
        return self._target.ensure(unwrap_module(student)).eval()

    def after_step(self, student, step):
        if self._target.started:
            self._target.update(unwrap_module(student), self.config.target_ema)

    def state_dict(self):
        target = self._target.state_dict()
        return {} if target is None else {"target": target}

    def load_state_dict(self, state):
        if state.get("target") is not None:
            self._target.load_state_dict(state["target"])

    # the loss -------------------------------------------------------------------------------------
    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.config.clip, self.config.clip) if self.config.clip > 0 else x

    def loss(self, student, batch, generator, step):
        cfg = self.config
        x, cond = batch.x, batch.cond
        n, finest = x.shape[0], cfg.max_log2
        kw = dict(generator=generator, device=x.device)
        eps = torch.randn(x.shape, dtype=x.dtype, **kw)
        # Flow-matching rows: t = 1 - i / M on the finest grid.
        fm_t = 1.0 - torch.randint(0, 2 ** finest, (n,), **kw).to(x.dtype) / 2 ** finest
        # Self-consistency rows: a level k (a double step D = 2^-k) and t = 1 - j D on its grid.
        level = torch.randint(0, finest, (n,), **kw).to(x.dtype)
        big = torch.pow(2.0, -level)
        sc_t = 1.0 - torch.floor(torch.rand(n, dtype=x.dtype, **kw) / big) * big
        consistency = torch.arange(n, device=x.device) < round(n * cfg.consistency_fraction)
        t = torch.where(consistency, sc_t, fm_t)
        x_t, target = straight_path(x, eps, t)
        levels = torch.where(consistency, level, torch.full_like(level, finest))
        if consistency.any():
            target = target.clone()
            target[consistency] = self._self_consistency_target(
                student, x_t[consistency], t[consistency], level[consistency],
                None if cond is None else cond[consistency])
        prediction = student(x_t, t, cond, extra={STEP: levels})
        loss = torch.nn.functional.mse_loss(prediction, target)
        return LossOutput(loss, {"consistency_share": float(consistency.float().mean())})

    def _self_consistency_target(self, student, x_t, t, level, cond):
        """sg[(s1 + s2) / 2]: two steps of half the size D/2 = 2^-(k+1), from the target network."""
        model = self._target_model(student)
        half_level = level + 1
        half = broadcast_time(torch.pow(2.0, -half_level), x_t)
        with torch.no_grad():
            first = model(x_t, t, cond, extra={STEP: half_level})
            middle = self._clip(x_t - half * first)
            second = model(middle, t - half.flatten(), cond, extra={STEP: half_level})
            return self._clip((first + second) / 2)

    # sampling -------------------------------------------------------------------------------------
    def _shortcut(self, network, cond, x, t, d):
        return network(x, t, cond, extra={STEP: step_level(d, self.config.max_log2)})

    def velocity_fn(self, student, cond=None):
        """The instantaneous velocity: the finest level (d -> 0)."""
        return lambda x, t: self._shortcut(student, cond, x, t, torch.zeros_like(t))

    def sampling_model(self, network, cond=None):
        """The shortcut with d = the step actually taken (t - t_next), and the one-step estimate
        of the data x0 = x - t s(x, t, t)."""

        def step_velocity(x, t, t_next):
            return self._shortcut(network, cond, x, t, t - t_next)

        def denoise(x, t):
            return x - broadcast_time(t, x) * self._shortcut(network, cond, x, t, t)

        return SamplingModel(velocity=step_velocity, denoise=denoise)

    def network_evals_per_step(self):
        # The whole batch with gradient; two no-grad passes over the consistency rows only
        # (2 x 1/4 of a batch by default), counted as whole batch passes, rounded up.
        return {"with_grad": 1, "no_grad": math.ceil(2 * self.config.consistency_fraction)}

    def tags(self):
        return {"distillkit.shortcut.consistency_fraction": str(self.config.consistency_fraction),
                "distillkit.shortcut.target": "ema" if self.config.target_ema > 0 else "online"}


class ShortcutSampler(distillkit.Sampler):
    """x_{t_next} = x_t - (t - t_next) s(x_t, t, d = t - t_next) on the run's time grid; NFE = steps,
    a power of two (the step sizes a shortcut model is trained for on the uniform grid)."""

    name = "shortcut"
    needs = frozenset({"velocity"})

    def steps_for_nfe(self, nfe: int) -> int:
        if nfe < 1 or nfe & (nfe - 1):
            raise ValueError("the shortcut sampler takes a power of two of steps (1, 2, 4, 8, ...): "
                             "a shortcut model is trained for steps d = 2^-k")
        return nfe

    def sample(self, model, noise, time_grid, fresh_noise):
        times = distillkit.validate_time_grid(time_grid).tolist()
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            now = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            end = torch.full_like(now, t_next)
            x = x - (t - t_next) * model.velocity(x, now, end)
        return x
