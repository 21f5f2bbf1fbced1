"""The consistency function in the project's time convention, and its time grids (in sigma or in t).

Convention (METHODS.md §1): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps. A consistency
function f(x_t, t) maps any point of a probability-flow trajectory to the trajectory's point at
t_min (the data end); the boundary condition is f(x, t_min) = x.

Two parameterisations, both f(x, t) = c_skip(t) x + c_out(t) F(x, t) with F the backbone fed the
raw (x_t, t) like every other method in the project:

``edm`` (default). EDM's preconditioning (Karras et al. 2022, Appendix B.6) derived for the
straight path and with the time origin moved to t_min. With u = (t - t_min) / (1 - t_min) and
data of standard deviation sigma_d, the linear estimate of x from x_u has coefficient
c_skip = Cov(x, x_u) / Var(x_u) and the residual standard deviation c_out:

    c_skip(t) = (1 - u) sigma_d^2 / ((1 - u)^2 sigma_d^2 + u^2)
    c_out(t)  = sigma_d u / sqrt((1 - u)^2 sigma_d^2 + u^2)

so F's regression target has unit variance at every t. In the variance-exploding variable
y = x_u / (1 - u), sigma = u / (1 - u) this is exactly EDM's c_skip = sigma_d^2/(sigma^2+sigma_d^2)
and c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2). At t = t_min, u = 0 exactly, so
c_skip = sigma_d^2 / sigma_d^2 = 1 and c_out = 0 in floating point: f(x, t_min) = x bit for bit.
At t = 1 (pure noise) c_skip = 0 and c_out = sigma_d, finite (the consistency-models paper instead
shifts sigma - sigma_min inside EDM's formulas; that form has no finite value at t = 1 in this
convention, where sigma = t / (1 - t)).

``velocity``. c_skip = 1, c_out = -(t - t_min): f(x, t) = x - (t - t_min) F(x, t), F a velocity.
One Euler step from t to t_min, so a student whose F starts as a flow teacher's velocity starts as
the teacher's one-step Euler sampler.

Input scaling: EDM's c_in = 1 / sqrt(Var x_t) is left out. In this convention Var x_t =
(1 - t)^2 sigma_d^2 + t^2 stays between sigma_d^2 and 1, and the backbone sees the same raw input
as it does for every other method (which is also what lets a student start from a teacher's weights).

The start from noise, both parameterisations. Above the sigma grid's noise end t_max = 80/81 f was
never trained, and sampling starts from pure noise at t = 1. As consistency models do (they start
from x_T = sigma_max z, data ignored), f(x, t) for t > t_max is f((t_max / t) x, t_max): at t = 1
the noise eps becomes t_max eps, which is x_{t_max} = (1 - t_max) x + t_max eps less its data part
(1/81 of the data), CM's start in this convention (x_t / (1 - t) = x + sigma eps, so sigma_max z
is (1 - t_max) sigma_max z = t_max z). The one-step sample is f(t_max eps, t_max). On the t grid
the method gives f t_max = 1, so the rule never applies there (as before the sigma grid).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import distillkit
from distillkit import broadcast_time

PARAMETERIZATIONS = ("edm", "velocity")
#: where the Karras rho-schedule is spaced: in EDM's noise level sigma (consistency models' grid)
#: or directly in t (distillkit's grid before the sigma grid)
GRIDS = ("sigma", "t")


def edm_coefficients(t: torch.Tensor, t_min: float, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the ``edm`` parameterisation at times ``t`` (clamped below at t_min)."""
    u = (t.clamp_min(t_min) - t_min) / (1.0 - t_min)
    s2 = sigma_data * sigma_data
    denominator = (1.0 - u) ** 2 * s2 + u * u
    return (1.0 - u) * s2 / denominator, sigma_data * u / denominator.sqrt()


def velocity_coefficients(t: torch.Tensor, t_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the ``velocity`` parameterisation: (1, -(t - t_min))."""
    return torch.ones_like(t), -(t.clamp_min(t_min) - t_min)


def coefficients(parameterization: str, t: torch.Tensor, t_min: float, sigma_data: float):
    if parameterization == "edm":
        return edm_coefficients(t, t_min, sigma_data)
    if parameterization == "velocity":
        return velocity_coefficients(t, t_min)
    raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")


class ConsistencyFunction(nn.Module):
    """f(x, t) = c_skip(t) x + c_out(t) F(x, t); times below t_min count as t_min (f = x there).

    Its state dict is the backbone's under ``backbone.``; the options are plain attributes.
    """

    def __init__(self, backbone: nn.Module, parameterization: str, t_min: float, sigma_data: float,
                 t_max: float = 1.0):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}")
        if not t_min < t_max <= 1.0:
            raise ValueError(f"t_max must lie in (t_min, 1]; got {t_max}")
        self.backbone = backbone
        self.parameterization = parameterization
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.sigma_data = float(sigma_data)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return coefficients(self.parameterization, t, self.t_min, self.sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.reshape(1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(x.shape[0])
        t = t.clamp_min(self.t_min)
        x, t = start_above_t_max(x, t, self.t_max)
        c_skip, c_out = self.coefficients(t)
        return broadcast_time(c_skip, x) * x + broadcast_time(c_out, x) * self.backbone(x, t, cond)


def start_above_t_max(x: torch.Tensor, t: torch.Tensor, t_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) moved onto the grid's noise end where t > t_max: ((t_max / t) x, t_max), so that pure
    noise at t = 1 enters as t_max eps, consistency models' x_T = sigma_max z in this convention
    (module docstring). Within [0, t_max] x and t are returned bit for bit (the scale is exactly 1)."""
    if t_max >= 1.0:
        return x, t  # the t grid's default: every t in [0, 1] was trained
    above = t > t_max
    scale = torch.where(above, t_max / t, torch.ones_like(t))
    return broadcast_time(scale, x) * x, torch.where(above, torch.full_like(t, t_max), t)


def implied_velocity(f, x: torch.Tensor, t: torch.Tensor, cond=None, t_min: Optional[float] = None) -> torch.Tensor:
    """v = (x - f(x, t)) / t, so that one Euler step from t to 0, x - t v, lands on f(x, t).

    Below t_min (default: ``f.t_min``), f is the identity and the velocity is 0 (never 0 / 0).
    ``f`` may be a wrapped module (an EMA copy, DDP, torch.compile) when ``t_min`` is given.
    """
    t_min = f.t_min if t_min is None else t_min
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.reshape(1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(x.shape[0])
    t = t.clamp_min(t_min)
    return (x - f(x, t, cond)) / broadcast_time(t, x)


def sigma_to_t(sigma: float) -> float:
    """EDM's noise level sigma as this project's time: x_t / (1 - t) = x + sigma eps, t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def sigma_grid(num_points: int, rho: float, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Consistency models' discretisation (Song et al. 2023, from EDM), in this project's time:

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        t_i = sigma_i / (1 + sigma_i),   i = 0 .. N - 1    (float64),

    decreasing from t_0 = sigma_max / (1 + sigma_max) to t_{N-1} = sigma_min / (1 + sigma_min).
    The end sigmas are set exactly (the power of a root can miss by an ulp) so that the last point
    is bit for bit the consistency function's boundary time ``sigma_to_t(sigma_min)``.
    """
    if num_points < 2:
        raise ValueError(f"a consistency grid needs at least 2 points; got {num_points}")
    ramp = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    first, last = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (first + ramp * (last - first)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas / (1.0 + sigmas)


def time_grid(num_points: int, rho: float, t_min: float, t_max: float) -> torch.Tensor:
    """The Karras-style discretisation with ``num_points`` times, done directly in t (float64):

        t_i = (t_max^(1/rho) + i / (N - 1) (t_min^(1/rho) - t_max^(1/rho)))^rho,  i = 0 .. N - 1,

    decreasing from t_max (noise end) to t_min (data end), end points exact. This is the
    project's ``edm_grid``; rho = 1 gives a uniform grid.
    """
    if num_points < 2:
        raise ValueError(f"a consistency grid needs at least 2 points; got {num_points}")
    return distillkit.edm_grid(num_points - 1, rho=rho, t_start=t_max, t_end=t_min)
