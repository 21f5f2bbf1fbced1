"""Plain flow matching (1-rectified flow): the ODE objective, the control for every distillation
method, and the kind of model later methods use as a teacher.

In the project's convention (t = 0 data, t = 1 noise): x_t = (1 - t) x + t eps and the network
regresses the straight-line velocity v* = eps - x, with t ~ U(t_min, 1).
"""

from __future__ import annotations

import attrs
import torch

from distillkit import Batch, LossOutput, Method, hookimpl, straight_path, uniform_time, validators


@attrs.frozen
class FlowMatchingConfig:
    t_min: float = attrs.field(default=1e-5, validator=validators.unit_interval)


def interpolate(batch: Batch, generator: torch.Generator, t_min: float):
    """(t, eps, x_t, v*) for a batch: t ~ U(t_min, 1) per sample, eps ~ N(0, I)."""
    x0 = batch.x
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = uniform_time(x0.shape[0], generator, t_min, device=x0.device, dtype=x0.dtype)
    return (t, eps, *straight_path(x0, eps, t))


class FlowMatching(Method):
    name = "fm"
    config_class = FlowMatchingConfig

    def loss(self, student, batch, generator, step):
        t, _, x_t, target = interpolate(batch, generator, self.config.t_min)
        loss = torch.nn.functional.mse_loss(student(x_t, t, batch.cond), target)
        return LossOutput(loss)


@hookimpl
def distillkit_register_methods(register):
    register(FlowMatching)
