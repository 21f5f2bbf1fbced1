"""Explicit Runge-Kutta integration of ``dx/dt = v(x, t)`` over an explicit time grid.

Pure functions in the style of k-diffusion: the caller passes the velocity, the state and the
grid; nothing is stored. Grids may run either way (sampling goes from t = 1 down to t = 0).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch

from .. import plugin_manager
from ..contracts import VelocityFn
from .grids import GridLike, check_steps, validate_time_grid
from .tableau import ButcherTableau

IntegratorLike = Union[str, ButcherTableau]
StepCallback = Callable[[dict[str, Any]], None]


def resolve_integrator(integrator: IntegratorLike) -> ButcherTableau:
    """A tableau as given, or the one registered under a name (``UnknownNameError`` if none)."""
    if isinstance(integrator, ButcherTableau):
        return integrator
    if isinstance(integrator, str):
        # Looked up at call time so that plugins loaded (or reset) later are seen.
        return plugin_manager.get_registries().integrators.get(integrator)
    raise TypeError(f"integrator must be a registered name or a ButcherTableau; got {integrator!r}")


def nfe(integrator: IntegratorLike, steps: int) -> int:
    """Velocity evaluations for ``steps`` steps: ``rk_step`` evaluates every stage once per step."""
    return resolve_integrator(integrator).stages * check_steps(steps)


def _time_tensor(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _add_scaled(x: torch.Tensor, h: float, weights: Sequence[float], slopes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x + h * sum_j weights[j] * slopes[j]``, one fused multiply-add per non-zero weight."""
    out = x
    for weight, slope in zip(weights, slopes):
        if weight != 0.0:
            out = torch.add(out, slope, alpha=h * weight)
    return out


def _evaluate(velocity_fn: VelocityFn, x: torch.Tensor, t: float) -> torch.Tensor:
    velocity = velocity_fn(x, _time_tensor(t, x))
    if velocity.shape != x.shape:
        raise ValueError(
            f"velocity_fn returned shape {tuple(velocity.shape)} for x of shape {tuple(x.shape)}; "
            "it must return a tensor shaped like x"
        )
    # A velocity computed in another precision must not change the precision of the state.
    return velocity.to(x.dtype)


def rk_step(velocity_fn: VelocityFn, x: torch.Tensor, t: float, h: float, tableau: ButcherTableau) -> torch.Tensor:
    """One explicit Runge-Kutta step of size ``h`` (negative when time decreases) from ``(x, t)``.

    ``k_i = v(x + h * sum_j a[i][j] * k_j, t + c[i] * h)`` and ``x' = x + h * sum_i b[i] * k_i``.
    ``velocity_fn`` receives the time as a tensor of shape ``[batch]`` with ``x``'s dtype and device.
    """
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (shape [batch, ...]); got a scalar")
    t, h = float(t), float(h)
    slopes: list[torch.Tensor] = []
    for row, c in zip(tableau.a, tableau.c):
        # Explicit: stage i reads only the slopes of stages 0 .. i-1, all already in `slopes`.
        stage_x = _add_scaled(x, h, row, slopes)
        slopes.append(_evaluate(velocity_fn, stage_x, t + c * h))
    return _add_scaled(x, h, tableau.b, slopes)


def integrate(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    time_grid: GridLike,
    integrator: IntegratorLike = "rk3",
    *,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``time_grid[0]`` to ``time_grid[-1]``.

    ``time_grid`` is validated (strictly monotone, in [0, 1], either direction); one ``rk_step``
    is taken between each pair of consecutive points. ``integrator`` is a registered name or a
    ``ButcherTableau``. ``callback``, if given, receives ``{"i", "t", "t_next", "x"}`` after each
    step. Autograd is left alone: gradients flow through when the caller wants them.
    """
    tableau = resolve_integrator(integrator)
    times = validate_time_grid(time_grid).tolist()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        x = rk_step(velocity_fn, x, t, t_next - t, tableau)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x})
    return x
