"""Consistency distillation (``cd``) and consistency training (``ct``), METHODS.md §8.3-8.4,
written from Song, Dhariwal, Chen and Sutskever, "Consistency Models" (ICML 2023) and mapped into
the project's convention (t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps).

Per sample, with the decreasing grid t_0 = t_max > ... > t_{N-1} = t_min (``grid = sigma``, the
default: consistency models' Karras grid in sigma in [0.002, 80] mapped by t = sigma / (1 + sigma),
``sigma_grid``; ``grid = t``: the same schedule directly in t in [0.002, 1], ``time_grid``):

    i ~ U{0, ..., N - 2},  x_a = (1 - t_i) x + t_i eps
    cd: x_b = one step of the teacher's probability-flow ODE from t_i to t_{i+1} (any integrator)
    ct: x_b = (1 - t_{i+1}) x + t_{i+1} eps          (same eps: no teacher)
    L   = d(f_theta(x_a, t_i), sg f_target(x_b, t_{i+1}))      uniform weighting

The target network theta- <- mu theta- + (1 - mu) theta after every optimizer step is held by the
method (saved in its state dict), separate from the trainer's evaluation EMA. mu = 0 (CD's
default, the official CIFAR-10 setting, pitfall P10) makes the target the online network itself
under stop-gradient; no copy is kept. Both evaluations see the same dropout randomness.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs
import torch
from torch import nn

import distillkit
from distillkit import validators
from distillkit import (Batch, LossOutput, Method, SamplingModel, TargetNetwork, rk_step_per_sample, same_dropout,
                        straight_path)

from .parameterization import (
    GRIDS,
    PARAMETERIZATIONS,
    ConsistencyFunction,
    implied_velocity,
    sigma_grid,
    sigma_to_t,
    time_grid,
)
from .schedules import num_points, target_rate
from distillkit import copy_teacher_weights

DISTANCES = ("l2", "l1", "pseudo-huber")


# ------------------------------------------------------------------------------------------------
# options


def _int_at_least(minimum: int):
    def check(instance, attribute, value):
        validators.require(validators.is_int(value) and value >= minimum, attribute, value, f"an integer >= {minimum}")

    return check


def _t_min(instance, attribute, value):
    validators.require(validators.is_number(value) and 0.0 < value < 0.5, attribute, value, "a number in (0, 0.5)")


def _t_max(instance, attribute, value):
    validators.require(validators.is_number(value) and 0.5 <= value <= 1.0, attribute, value, "a number in [0.5, 1]")


# The sigma grid's ends keep its times where the t grid's are: t_min < 0.5 <= t_max < 1.
def _sigma_min(instance, attribute, value):
    validators.require(validators.is_number(value) and 0.0 < value < 1.0, attribute, value,
                       "a number in (0, 1) (t_min = sigma_min / (1 + sigma_min) < 0.5)")


def _sigma_max(instance, attribute, value):
    validators.require(validators.is_number(value) and value >= 1.0, attribute, value,
                       "a finite number >= 1 (t_max = sigma_max / (1 + sigma_max) >= 0.5)")


def _optional(check):
    return attrs.validators.optional(check)


#: Defaults of each grid's ends.
SIGMA_ENDS = {"sigma_min": 0.002, "sigma_max": 80.0}
T_ENDS = {"t_min": 0.002, "t_max": 1.0}


@attrs.frozen
class _ConsistencyOptions:
    """The grid and the consistency function's options.

    ``grid`` left unset is ``t`` when the options name t_min or t_max and ``sigma`` otherwise: the
    resolved config of every run from before the sigma grid names both and no grid (a checkpoint
    carries its resolved config), so such a run keeps the t grid it was trained on. After
    construction every option of the chosen grid is set: under ``sigma``, t_min and t_max are its
    ends' times (given ones must be those), under ``t`` sigma_min and sigma_max stay unset.
    """

    #: sigma: consistency models' Karras grid in sigma, mapped by t = sigma / (1 + sigma); t: in t
    grid: Optional[str] = attrs.field(default=None, validator=_optional(validators.one_of(*GRIDS)))
    #: Karras-grid exponent (in sigma or in t; rho = 1: uniform)
    rho: float = attrs.field(default=7.0, validator=validators.positive_number)
    #: the data end of the grid: f(x, t_min) = x exactly (grid = sigma: sigma_min / (1 + sigma_min))
    t_min: Optional[float] = attrs.field(default=None, validator=_optional(_t_min))
    #: the noise end of the grid (grid = sigma: sigma_max / (1 + sigma_max), and f starts there from t = 1)
    t_max: Optional[float] = attrs.field(default=None, validator=_optional(_t_max))
    #: EDM noise level at the data end of the sigma grid
    sigma_min: Optional[float] = attrs.field(default=None, validator=_optional(_sigma_min))
    #: EDM noise level at the noise end of the sigma grid
    sigma_max: Optional[float] = attrs.field(default=None, validator=_optional(_sigma_max))
    #: data standard deviation in the edm parameterisation
    sigma_data: float = attrs.field(default=0.5, validator=validators.positive_number)
    parameterization: str = attrs.field(default="edm", validator=validators.one_of(*PARAMETERIZATIONS))
    distance: str = attrs.field(default="l2", validator=validators.one_of(*DISTANCES))
    #: pseudo-Huber c; 0 = 0.00054 sqrt(d) as in improved consistency training (d: sample size)
    huber_c: float = attrs.field(default=0.0, validator=validators.non_negative_number)

    def __attrs_post_init__(self):
        t_given = self.t_min is not None or self.t_max is not None
        grid = self.grid if self.grid is not None else ("t" if t_given else "sigma")
        ends = self._sigma_ends() if grid == "sigma" else self._t_ends()
        for name, value in {"grid": grid, **ends}.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def _sigma_ends(self) -> dict:
        # sigma_min < 1 <= sigma_max (validators), so the ends are ordered.
        sigmas = {name: default if getattr(self, name) is None else getattr(self, name) for name, default in SIGMA_ENDS.items()}
        times = {"t_min": sigma_to_t(sigmas["sigma_min"]), "t_max": sigma_to_t(sigmas["sigma_max"])}
        for name, time in times.items():
            given, sigma = getattr(self, name), name.replace("t_", "sigma_")
            if given is not None and given != time:
                raise distillkit.ConfigError(name, given, f"unset under grid = sigma (its {name} is {sigma}/(1 + {sigma}) = "
                                             f"{time!r}): set {sigma}, or grid = t")
        return {**sigmas, **times}

    def _t_ends(self) -> dict:
        for name in SIGMA_ENDS:
            if getattr(self, name) is not None:
                raise distillkit.ConfigError(name, getattr(self, name), "unset under grid = t, whose ends are t_min and "
                                             "t_max; or grid = sigma")
        return {name: default if getattr(self, name) is None else getattr(self, name) for name, default in T_ENDS.items()}

    def time_grid(self, num_points: int) -> torch.Tensor:
        """The decreasing grid t_0 = t_max > ... > t_{N-1} = t_min of ``num_points`` points (float64)."""
        if self.grid == "sigma":
            return sigma_grid(num_points, self.rho, self.sigma_min, self.sigma_max)
        return time_grid(num_points, self.rho, self.t_min, self.t_max)


@attrs.frozen
class CDConfig(_ConsistencyOptions):
    #: N: points of the discretisation (18 on CIFAR-10, 40 on ImageNet-64)
    num_points: int = attrs.field(default=18, validator=_int_at_least(2))
    #: integrator of the teacher's one step between adjacent grid points
    teacher_integrator: str = attrs.field(default="heun", validator=validators.registered_integrator)
    #: mu: target-network rate (0: the online network, P10)
    target_rate: float = attrs.field(default=0.0, validator=validators.unit_interval)
    #: start the student's F from the teacher's network when the shapes match
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)


@attrs.frozen
class CTConfig(_ConsistencyOptions):
    #: N(0): grid points at the start of training
    s0: int = attrs.field(default=2, validator=_int_at_least(2))
    #: N(K) = s1 + 1 points at the end (150 on CIFAR-10, 200 on ImageNet-64)
    s1: int = attrs.field(default=150, validator=_int_at_least(1))
    #: mu0 of the target-rate schedule (0.9 on CIFAR-10, 0.95 on ImageNet-64)
    mu0: float = attrs.field(default=0.9, validator=validators.unit_interval)

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        if self.s1 + 1 < self.s0:
            raise distillkit.ConfigError("s1", self.s1, f"an integer >= s0 - 1 = {self.s0 - 1} (N grows from s0 to s1 + 1)")


# ------------------------------------------------------------------------------------------------
# pieces of the loss


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float = 0.0) -> torch.Tensor:
    """Per-sample distance: mean squared / mean absolute difference, or the pseudo-Huber
    sqrt(||a - b||^2 + c^2) - c of improved consistency training (Song and Dhariwal 2023)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo-huber":
        c = huber_c if huber_c > 0 else 0.00054 * math.sqrt(diff.shape[1])
        return (diff.square().sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown distance {kind!r}")


# ------------------------------------------------------------------------------------------------
# the methods


class _ConsistencyMethod(Method):
    default_sampler = "consistency"

    def __init__(self, config: Any, context):
        super().__init__(config, context)
        # theta-: buffers follow the online network (copied, not averaged)
        self._target = TargetNetwork(average_buffers=False)

    # the student, sampling ------------------------------------------------------------------------
    def build_student(self, backbone):
        cfg = self.config
        # Sampling starts at t = 1, above the sigma grid's t_max = 80/81: f's start rule moves the
        # noise onto t_max there (parameterization.start_above_t_max). The t grid keeps what its runs
        # did before the rule: f evaluated at the t given (t_max = 1 by default: nothing lies above).
        start = cfg.t_max if cfg.grid == "sigma" else 1.0
        return ConsistencyFunction(backbone, cfg.parameterization, cfg.t_min, cfg.sigma_data, start)

    def velocity_fn(self, student, cond=None):
        """The implied velocity (x - f(x, t)) / t: one Euler step from t to 0 is f(x, t), so Euler
        with NFE 1 is the one-step consistency sample and more Euler steps re-inject the noise
        component the model itself predicts (deterministically)."""

        def velocity(x, t):
            return implied_velocity(student, x, t, cond, self.config.t_min)

        return velocity

    def sampling_model(self, student, cond=None):
        """The consistency function as ``denoise`` (the registered ``consistency`` sampler, the
        default: multistep with fresh noise) and the implied velocity for the ``ode`` sampler."""
        implied = self.velocity_fn(student, cond)
        return SamplingModel(velocity=lambda x, t, t_next: implied(x, t),
                             denoise=lambda x, t: student(x, t, cond), t_min=self.config.t_min)

    # the target network ---------------------------------------------------------------------------
    def _keeps_target_copy(self) -> bool:
        raise NotImplementedError

    def _rate_at(self, step: int) -> float:
        raise NotImplementedError

    @property
    def target(self) -> Optional[nn.Module]:
        """The target network's copy (None while there is none: mu = 0, or before prepare)."""
        return self._target.module

    def prepare(self, student, context):
        if self._keeps_target_copy():
            self._target.start(student)

    def _target_model(self, student):
        if not self._keeps_target_copy():
            return student  # mu = 0: the online parameters, under stop-gradient
        target = self._target.ensure(student)  # prepare was not called: start the target here
        target.train(student.training)
        return target

    def after_step(self, student, step):
        if self._target.started:
            self._target.update(student, self._rate_at(step))

    def state_dict(self):
        target = self._target.state_dict()
        return {} if target is None else {"target": target}

    def load_state_dict(self, state):
        target = state.get("target")
        if target is not None:
            self._target.load_state_dict(target)  # before prepare: applied when it builds the target

    # the loss -------------------------------------------------------------------------------------
    def _consistency_loss(self, student, x_a, t_a, x_b, t_b, cond, metrics):
        target_model = self._target_model(student)
        with torch.no_grad(), same_dropout(x_a.device):
            target = target_model(x_b, t_b, cond)
        online = student(x_a, t_a, cond)
        per_sample = distance(online, target, self.config.distance, self.config.huber_c)
        loss = per_sample.mean()
        metrics["t_mean"] = float(t_a.mean())
        return LossOutput(loss, metrics)

    def tags(self):
        return {
            f"distillkit.{self.name}.parameterization": self.config.parameterization,
            f"distillkit.{self.name}.distance": self.config.distance,
            f"distillkit.{self.name}.grid": self.config.grid,
        }


class ConsistencyDistillation(_ConsistencyMethod):
    name = "cd"
    config_class = CDConfig
    requires_teacher = True

    def __init__(self, config: CDConfig, context):
        super().__init__(config, context)
        integrators = context.integrators if context.integrators is not None else distillkit.get_registries().integrators
        self.tableau = integrators.get(config.teacher_integrator)
        self.grid = config.time_grid(config.num_points)
        self.init_source = "random"

    def _keeps_target_copy(self) -> bool:
        return self.config.target_rate > 0.0

    def _rate_at(self, step: int) -> float:
        return self.config.target_rate

    def prepare(self, student, context):
        if self.config.init_from_teacher and self.context.teacher is not None:
            self.init_source = copy_teacher_weights(student.backbone, self.context.teacher)
        super().prepare(student, context)

    def _teacher(self):
        if self.context.teacher is None:
            raise distillkit.UsageError("cd distils a teacher: pass --teacher (a run id, a checkpoint file or a teacher name)")
        return self.context.teacher

    def network_evals_per_step(self):
        # The online pass with gradient; the teacher's stages and the target pass without.
        return {"with_grad": 1, "no_grad": self.tableau.stages + 1}

    def tags(self):
        tags = super().tags()
        tags.update({
            "distillkit.cd.teacher_integrator": self.tableau.name,
            "distillkit.cd.num_points": str(self.config.num_points),
            "distillkit.cd.target_rate": str(self.config.target_rate),
            "distillkit.cd.init": self.init_source,
        })
        return tags

    def loss(self, student, batch: Batch, generator, step):
        teacher = self._teacher()
        x0, cond = batch.x, batch.cond
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        index = torch.randint(0, self.config.num_points - 1, (n,), generator=generator, device=x0.device)
        grid = self.grid.to(device=x0.device, dtype=x0.dtype)
        t_a, t_b = grid[index], grid[index + 1]
        x_a, _ = straight_path(x0, eps, t_a)
        with torch.no_grad():
            x_b = rk_step_per_sample(lambda x, t: teacher.velocity(x, t, cond), x_a, t_a, t_b - t_a, self.tableau)
        return self._consistency_loss(student, x_a, t_a, x_b, t_b, cond, {})


class ConsistencyTraining(_ConsistencyMethod):
    name = "ct"
    config_class = CTConfig

    def _keeps_target_copy(self) -> bool:
        return True

    def schedule(self, step: int) -> tuple[int, float]:
        """(N(k), mu(k)) at optimizer step ``step`` of ``context.total_steps``."""
        cfg, total = self.config, self.context.total_steps
        return num_points(step, total, cfg.s0, cfg.s1), target_rate(step, total, cfg.s0, cfg.s1, cfg.mu0)

    def _rate_at(self, step: int) -> float:
        return self.schedule(step)[1]

    def network_evals_per_step(self):
        return {"with_grad": 1, "no_grad": 1}

    def tags(self):
        tags = super().tags()
        tags.update({"distillkit.ct.s0": str(self.config.s0), "distillkit.ct.s1": str(self.config.s1)})
        return tags

    def loss(self, student, batch: Batch, generator, step):
        cfg = self.config
        points, rate = self.schedule(step)
        x0, cond = batch.x, batch.cond
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        index = torch.randint(0, points - 1, (n,), generator=generator, device=x0.device)
        grid = cfg.time_grid(points).to(device=x0.device, dtype=x0.dtype)  # N(k) points of the chosen grid
        t_a, t_b = grid[index], grid[index + 1]
        x_a, _ = straight_path(x0, eps, t_a)
        x_b, _ = straight_path(x0, eps, t_b)  # the same eps: no teacher
        return self._consistency_loss(student, x_a, t_a, x_b, t_b, cond, {"num_points": points, "target_rate": rate})
