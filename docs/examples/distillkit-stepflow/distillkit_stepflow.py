"""A step-size conditioned flow (a minimal shortcut model), as a third-party distillkit plugin.

The network s(x_t, t, d) is told the size d of the sampler step it is used for: ``d`` is an
extra conditioning input of the backbone, entering its time embedding. Training, per batch:

- flow matching at d = 0 on most samples: s(x_t, t, 0) ~ eps - x;
- self-consistency on the rest, d = 2^-j: one step of size 2d must do what two steps of size d
  do, s(x_t, t, 2d) ~ sg[(s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)) / 2], with t >= 2d.

Sampling (the ``stepflow`` sampler): Euler steps x <- x - d s(x, t, d) on the run's time grid,
an NFE that is a power of two.
"""

from __future__ import annotations

import attrs
import torch

from distillkit import LossOutput, Method, Sampler, SamplingModel, broadcast_time, hookimpl, straight_path, validators
from distillkit.integrators import validate_time_grid


@attrs.frozen
class StepFlowConfig:
    #: the share of each batch trained for self-consistency (the rest: flow matching at d = 0)
    consistency_fraction: float = attrs.field(default=0.25, validator=validators.unit_interval)
    #: the smallest step trained is 2^-finest_log2
    finest_log2: int = attrs.field(default=6, validator=validators.positive_int)


class StepFlow(Method):
    name = "stepflow"
    config_class = StepFlowConfig
    conditioning = ("d",)
    default_sampler = "stepflow"
    provides = frozenset({"velocity"})

    def loss(self, student, batch, generator, step):
        x, cond = batch.x, batch.cond
        n = x.shape[0]
        kw = dict(generator=generator, device=x.device)
        eps = torch.randn(x.shape, dtype=x.dtype, **kw)
        u = torch.rand(n, dtype=x.dtype, **kw)
        j = torch.randint(1, self.config.finest_log2 + 1, (n,), **kw)
        d = torch.pow(2.0, -j.to(x.dtype))  # in [2^-finest, 1/2]: the double step 2d is at most 1
        consistency = torch.arange(n, device=x.device) >= round(n * (1 - self.config.consistency_fraction))
        t = torch.where(consistency, 2 * d + (1 - 2 * d) * u, u)  # t - 2d >= 0 where a double step is taken
        x_t, target = straight_path(x, eps, t)
        if consistency.any():
            with torch.no_grad():
                xs, ts, ds = x_t[consistency], t[consistency], d[consistency]
                cs = None if cond is None else cond[consistency]
                first = student(xs, ts, cs, extra={"d": ds})
                second = student(xs - broadcast_time(ds, xs) * first, ts - ds, cs, extra={"d": ds})
                target = target.clone()
                target[consistency] = (first + second) / 2
        step_size = torch.where(consistency, 2 * d, torch.zeros_like(d))
        prediction = student(x_t, t, cond, extra={"d": step_size})
        loss = torch.nn.functional.mse_loss(prediction, target)
        return LossOutput(loss, {"consistency_share": float(consistency.float().mean())})

    def velocity_fn(self, student, cond=None):
        """The instantaneous velocity: d = 0."""
        return lambda x, t: student(x, t, cond, extra={"d": torch.zeros_like(t)})

    def sampling_model(self, network, cond=None):
        def step_velocity(x, t, t_next):
            return network(x, t, cond, extra={"d": (t - t_next).abs()})

        return SamplingModel(velocity=step_velocity)


class StepFlowSampler(Sampler):
    """Euler steps that tell the model each step's size; NFE = steps, a power of two."""

    name = "stepflow"
    needs = frozenset({"velocity"})

    def steps_for_nfe(self, nfe: int) -> int:
        if nfe & (nfe - 1):
            raise ValueError("the stepflow sampler takes a power of two of steps (1, 2, 4, 8, ...)")
        return nfe

    def sample(self, model, noise, time_grid, fresh_noise):
        times = validate_time_grid(time_grid).tolist()
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            now = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            end = torch.full_like(now, t_next)
            x = x + (t_next - t) * model.velocity(x, now, end)
        return x


@hookimpl
def distillkit_register_methods(register):
    register(StepFlow)


@hookimpl
def distillkit_register_samplers(register):
    register(StepFlowSampler)
