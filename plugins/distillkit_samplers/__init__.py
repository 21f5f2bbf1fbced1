"""The built-in samplers, registered through the same entry-point group a third party uses.

* ``ode``: integrates the probability-flow ODE dx/dt = v(x, t) with the run's sampling
  integrator (``sample.integrator``, any registered Butcher tableau), one tableau step per grid
  step. Every stage evaluation gets the step's end ``t_next``, so a step-size aware model (a
  shortcut model's d = t - t_next, MeanFlow's r = t_next) is sampled with no tricks; for an
  instantaneous velocity this is exactly ``distillkit.integrate``.
* ``consistency``: multistep consistency sampling (Song et al. 2023, Algorithm 1) in the
  project's convention. It evaluates the model's ``denoise`` at every grid point but the last
  (the data end) and re-noises the estimate onto the straight path at the next point:

      x <- denoise(noise, t_0)
      for k, tau in enumerate(t_1, ..., t_{N-1}):
          x <- denoise(a(tau) x + b(tau) z_k, tau),   z_k = fresh_noise(k)

  with a(tau) = (1 - tau) / (1 - t_min), b(tau) = sqrt(tau^2 - (a(tau) t_min)^2): a sample at
  t_min, x = (1 - t_min) x0 + t_min eps, becomes (1 - tau) x0 + (noise of variance tau^2), the
  law of x_tau (the analogue of the paper's x + sqrt(tau^2 - sigma_min^2) z). N grid steps cost
  N evaluations.
"""

from __future__ import annotations

import math

import torch

from distillkit import Sampler, hookimpl
from distillkit.integrators import rk_step, validate_time_grid


def _at(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


class OdeSampler(Sampler):
    name = "ode"
    needs = frozenset({"velocity"})

    @property
    def tableau(self):
        return self.context.integrator

    def steps_for_nfe(self, nfe: int) -> int:
        stages = self.tableau.stages
        if nfe % stages:
            raise ValueError(f"{self.tableau.name} spends {stages} evaluations per step; "
                             f"choose multiples of {stages}")
        return nfe // stages

    def sample(self, model, noise, time_grid, fresh_noise):
        times = validate_time_grid(time_grid).tolist()
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            end = _at(t_next, x)

            def velocity(y: torch.Tensor, s: torch.Tensor, _end: torch.Tensor = end) -> torch.Tensor:
                return model.velocity(y, s, _end)

            x = rk_step(velocity, x, t, t_next - t, self.tableau)
        return x

    def describe(self) -> str:
        return f"ode/{self.tableau.name}"


def renoise_coefficients(tau: float, t_min: float) -> tuple[float, float]:
    """(a, b) with a x_{t_min} + b z distributed as x_tau on the straight path."""
    a = (1.0 - tau) / (1.0 - t_min)
    return a, math.sqrt(max(tau * tau - (a * t_min) ** 2, 0.0))


class ConsistencySampler(Sampler):
    name = "consistency"
    needs = frozenset({"denoise"})

    def steps_for_nfe(self, nfe: int) -> int:
        return nfe

    def sample(self, model, noise, time_grid, fresh_noise):
        times = validate_time_grid(time_grid).tolist()
        if times[0] < times[-1]:
            raise ValueError("the consistency sampler runs from noise to data: the time grid must decrease")
        x = model.denoise(noise, _at(times[0], noise))
        for k, tau in enumerate(times[1:-1]):
            # A grid point at or below the model's data end (karras-sigma's last interior point,
            # 0.001996, under cd's t_min = 0.002) re-noises by nothing: a = 1, b = 0. The
            # evaluation is still spent, so the NFE a table reports is the NFE spent.
            tau = max(tau, model.t_min)
            a, b = renoise_coefficients(tau, model.t_min)
            x = model.denoise(a * x + b * fresh_noise(k).to(x.dtype), _at(tau, x))
        return x


@hookimpl
def distillkit_register_samplers(register):
    register(OdeSampler)
    register(ConsistencySampler)
