"""The built-in time-grid families (``sample.grid``; options in ``sample.grid_options``).

* ``uniform``: equal steps from t = 1 to t = 0.
* ``edm``: Karras et al.'s rho-schedule applied directly in t: uniform in t^(1/rho), steps
  concentrate near the data (option ``rho``, default 7).
* ``karras-sigma``: the same schedule in EDM's noise level sigma in [sigma_min, sigma_max]
  (defaults 0.002 and 80, rho = 7), mapped into this project's time by t = sigma / (1 + sigma)
  (x_t / (1 - t) = x + sigma eps, so sigma = t / (1 - t)), then t = 0 appended, as k-diffusion
  appends sigma = 0. Sampling starts from pure noise, so by default (``start_at_noise``) the
  first point is t = 1 (sigma = infinity) instead of sigma_max's t = 80/81; the other points are
  Karras'. This is the grid consistency models train and sample on.
* ``explicit``: the points given in ``sample.grid_options.points`` (a comma-separated list that
  decreases, from 1 down to 0); it has len(points) - 1 steps, and an NFE needing another step
  count is refused.
"""

from __future__ import annotations

import attrs
import torch

from distillkit import TimeGrid, hookimpl, validators
from distillkit.errors import TimeGridError
from distillkit.integrators import edm_grid, uniform_grid, validate_time_grid
from distillkit.integrators.grids import check_steps


class UniformGrid(TimeGrid):
    name = "uniform"

    def make(self, steps: int) -> torch.Tensor:
        return uniform_grid(steps)


@attrs.frozen
class RhoOptions:
    rho: float = attrs.field(default=7.0, validator=validators.positive_number)


class EdmGrid(TimeGrid):
    name = "edm"
    config_class = RhoOptions

    def make(self, steps: int) -> torch.Tensor:
        return edm_grid(steps, rho=self.config.rho)


def _sigma_max_above_min(instance, attribute, value):
    validators.require(validators.is_number(value) and value > instance.sigma_min, attribute, value,
                       f"a number above sigma_min = {instance.sigma_min}")


@attrs.frozen
class KarrasSigmaOptions:
    sigma_min: float = attrs.field(default=0.002, validator=validators.positive_number)
    sigma_max: float = attrs.field(default=80.0, validator=_sigma_max_above_min)
    rho: float = attrs.field(default=7.0, validator=validators.positive_number)
    start_at_noise: bool = attrs.field(default=True, validator=validators.boolean)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, uniform in sigma^(1/rho) (n = 1: sigma_max)."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    first, last = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (first + ramp * (last - first)) ** rho


class KarrasSigmaGrid(TimeGrid):
    name = "karras-sigma"
    config_class = KarrasSigmaOptions

    def make(self, steps: int) -> torch.Tensor:
        steps = check_steps(steps)
        c = self.config
        sigmas = karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho)
        times = torch.cat([sigmas / (1.0 + sigmas), torch.zeros(1, dtype=torch.float64)])
        if c.start_at_noise:
            times[0] = 1.0
        return validate_time_grid(times)


def _valid_points(instance, attribute, value):
    shown = ",".join(map(str, value))
    try:
        points = validate_time_grid(list(value)).tolist()
    except TimeGridError as exc:
        validators.require(False, attribute, shown, str(exc).split(";")[0])
    validators.require(points[0] > points[-1], attribute, shown,
                       "points that decrease from noise to data (sampling runs from t = 1 towards t = 0)")


@attrs.frozen
class ExplicitOptions:
    points: tuple = attrs.field(default=(1.0, 0.0), converter=validators.float_tuple, validator=_valid_points)


class ExplicitGrid(TimeGrid):
    name = "explicit"
    config_class = ExplicitOptions

    def make(self, steps: int) -> torch.Tensor:
        steps = check_steps(steps)
        points = self.config.points
        if len(points) - 1 != steps:
            raise TimeGridError(f"the explicit grid {','.join(map(str, points))} has {len(points) - 1} steps; "
                                f"this sampler needs {steps} for the NFE asked (give {steps + 1} points)")
        return validate_time_grid(list(points))


@hookimpl
def distillkit_register_grids(register):
    for grid in (UniformGrid, EdmGrid, KarrasSigmaGrid, ExplicitGrid):
        register(grid)
