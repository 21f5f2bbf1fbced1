"""Explicit Runge-Kutta integrators (Butcher tableaus), time grids and the integration loop."""

from .tableau import ButcherTableau
from .grids import (
    edm_grid,
    explicit_grid,
    grid_from_spec,
    parse_grid,
    uniform_grid,
    validate_time_grid,
)
from .stepper import integrate, nfe, resolve_integrator, rk_step

__all__ = [
    "ButcherTableau",
    "edm_grid",
    "explicit_grid",
    "grid_from_spec",
    "integrate",
    "nfe",
    "parse_grid",
    "resolve_integrator",
    "rk_step",
    "uniform_grid",
    "validate_time_grid",
]
