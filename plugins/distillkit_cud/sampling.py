"""The samplers of the CUD paper's code (METHODS.md §4), as pure functions of a velocity field.

``velocity_fn(x, t)`` is what ``Method.velocity_fn`` returns: for a CUD RK2 / RK3 model that is
its last look-ahead head, as the paper samples those models (``--generator 2/3``, pitfall P6).

* ``euler_sample``: t_i = i/N, i = N .. 1, x <- x - (1/N) v(x, t_i); N network evaluations. The
  core's evaluation (``--sample-integrator euler`` on the uniform grid) is the same sampler.
* ``heun_sample``: N odd, N' = (N + 1)/2 steps of size h = 1/N' on t_i = i/N'; every step but
  the last averages v(x, t_i) and v(x - h v(x, t_i), t_{i-1}); the last step is an Euler step
  (it would otherwise evaluate at t = 0). NFE = 2N' - 1 = N. No registered tableau expresses the
  Euler last step, so this sampler lives here.
* ``one_step_sample``: x = eps - v(eps, 1), stage 2's one-step generator (§3.6); the same as
  ``euler_sample`` with N = 1.

``CUDHeunSampler`` registers the Heun sampler as ``--sampler cud-heun``: the same rule on any
registered grid (on the uniform grid it is ``heun_sample``), so eval and compare can use it.
"""

from __future__ import annotations

import torch

from distillkit import Sampler, VelocityFn
from distillkit.integrators import validate_time_grid


def _times(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps}")
    x = noise
    for i in range(steps, 0, -1):
        x = x - velocity_fn(x, _times(i / steps, x)) / steps
    return x


@torch.no_grad()
def heun_sample(velocity_fn: VelocityFn, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    if nfe < 1 or nfe % 2 == 0:
        raise ValueError(f"the paper's Heun sampler needs an odd number of network evaluations; got {nfe}")
    steps = (nfe + 1) // 2
    h = 1.0 / steps
    x = noise
    for i in range(steps, 0, -1):
        d1 = velocity_fn(x, _times(i * h, x))
        if i == 1:
            x = x - h * d1
        else:
            d2 = velocity_fn(x - h * d1, _times((i - 1) * h, x))
            x = x - h * (d1 + d2) / 2
    return x


@torch.no_grad()
def one_step_sample(velocity_fn: VelocityFn, noise: torch.Tensor) -> torch.Tensor:
    return noise - velocity_fn(noise, _times(1.0, noise))


class CUDHeunSampler(Sampler):
    """Heun steps with an Euler last step (no evaluation at t = 0): an odd NFE N buys
    (N + 1) / 2 grid steps."""

    name = "cud-heun"
    needs = frozenset({"velocity"})

    def steps_for_nfe(self, nfe: int) -> int:
        if nfe % 2 == 0:
            raise ValueError("the CUD paper's Heun sampler spends an odd number of network evaluations "
                             "(2 per step, 1 in the last); choose 1, 3, 5, ...")
        return (nfe + 1) // 2

    @torch.no_grad()
    def sample(self, model, noise, time_grid, fresh_noise):
        times = validate_time_grid(time_grid).tolist()
        x = noise
        last = len(times) - 2
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            end = _times(t_next, x)
            h = t - t_next
            d1 = model.velocity(x, _times(t, x), end)
            if i == last:
                x = x - h * d1
            else:
                d2 = model.velocity(x - h * d1, end, end)
                x = x - h * (d1 + d2) / 2
        return x
