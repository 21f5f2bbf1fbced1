"""Time grids: the points ``t_0, t_1, ..., t_N`` an integrator steps through.

A grid is a 1-D float64 CPU tensor of at least two points in [0, 1], strictly monotone in either
direction (sampling runs from t = 1, noise, down to t = 0, data). Every function here returns a
grid that ``validate_time_grid`` accepts and refuses bad input with a one-line ``TimeGridError``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Sequence, Union

import torch

from ..errors import TimeGridError

GridLike = Union[torch.Tensor, Sequence[float]]

# Long grids are shortened in error messages so that the message stays one readable line.
_MAX_VALUES_SHOWN = 12


def _format_values(values: list[float]) -> str:
    shown = ", ".join(repr(v) for v in values[:_MAX_VALUES_SHOWN])
    if len(values) > _MAX_VALUES_SHOWN:
        shown += f", ... ({len(values)} points)"
    return shown


def _as_float64_vector(grid: GridLike) -> torch.Tensor:
    if isinstance(grid, torch.Tensor):
        if grid.is_complex() or grid.dtype == torch.bool:
            raise TimeGridError(f"time grid must hold real numbers; got dtype {grid.dtype}")
        tensor = grid.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            # Straight to float64: torch's default float32 would round the points the user gave.
            tensor = torch.as_tensor(grid, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TimeGridError(f"time grid must be a 1-D sequence of real numbers; got {grid!r}") from None
    if tensor.dim() != 1:
        raise TimeGridError(f"time grid must be 1-D; got shape {tuple(tensor.shape)}")
    return tensor


def _grid_problem(values: list[float]) -> str | None:
    """What is wrong with a grid, or None."""
    if len(values) < 2:
        return "time grid needs at least 2 points (a start and an end)"
    if not all(math.isfinite(v) for v in values):
        return "time grid values must be finite"
    if not all(0.0 <= v <= 1.0 for v in values):
        return "time grid values must lie in [0, 1] (0 = data, 1 = noise)"
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if not (all(d > 0 for d in steps) or all(d < 0 for d in steps)):
        return "time grid must be strictly monotone (all increasing or all decreasing)"
    return None


def validate_time_grid(grid: GridLike) -> torch.Tensor:
    """Check a time grid and return it as a float64 CPU tensor.

    Refuses, with ``TimeGridError``, fewer than 2 points, non-finite values, values outside
    [0, 1], and grids that are not strictly monotone (increasing and decreasing are both allowed).
    """
    tensor = _as_float64_vector(grid)
    values = tensor.tolist()
    problem = _grid_problem(values)
    if problem is not None:
        raise TimeGridError(f"{problem}; got {_format_values(values) or 'no points'}")
    return tensor


def check_steps(steps: object) -> int:
    """``steps`` as an int, or ``TimeGridError`` unless it is a positive integer (bool excluded)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise TimeGridError(f"steps must be a positive integer; got {steps!r}")
    return int(steps)


def _check_end_points(t_start: float, t_end: float) -> None:
    # Checked before any arithmetic so the message is about the end points the user gave, not
    # about, say, the NaN that a negative base raised to 1/rho would produce.
    validate_time_grid([t_start, t_end])


def _with_exact_end_points(grid: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    grid[0] = t_start
    grid[-1] = t_end
    return validate_time_grid(grid)


def uniform_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """``steps + 1`` equally spaced points from ``t_start`` to ``t_end``."""
    steps = check_steps(steps)
    _check_end_points(t_start, t_end)
    grid = torch.linspace(float(t_start), float(t_end), steps + 1, dtype=torch.float64)
    return _with_exact_end_points(grid, t_start, t_end)


def edm_grid(steps: int, rho: float = 7.0, t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """EDM-style grid: uniform in ``t ** (1 / rho)``, so steps concentrate near t = 0 (data).

    ``t_i = (t_start^(1/rho) + i/steps * (t_end^(1/rho) - t_start^(1/rho)))^rho``; ``rho = 1``
    gives the uniform grid.
    """
    steps = check_steps(steps)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (math.isfinite(rho) and rho > 0):
        raise TimeGridError(f"rho must be a positive finite number; got {rho!r}")
    _check_end_points(t_start, t_end)
    first, last = float(t_start) ** (1.0 / rho), float(t_end) ** (1.0 / rho)
    fraction = torch.arange(steps + 1, dtype=torch.float64) / steps
    grid = (first + fraction * (last - first)) ** float(rho)
    return _with_exact_end_points(grid, t_start, t_end)


def explicit_grid(values: GridLike) -> torch.Tensor:
    """A grid given point by point, validated."""
    return validate_time_grid(values)


GRID_KINDS: dict[str, Callable[..., torch.Tensor]] = {"uniform": uniform_grid, "edm": edm_grid}


def grid_from_spec(kind: str, steps: int, **options: float) -> torch.Tensor:
    """Build an integration grid by kind name (``"uniform"`` or ``"edm"``) with any end points
    (``t_start``, ``t_end``), for ``distillkit.integrate``. Sampling grids, from noise to data, are
    the registered ``TimeGrid`` families instead (``sample.grid``: uniform, edm, karras-sigma,
    explicit, and any a plugin adds)."""
    try:
        make = GRID_KINDS[kind]
    except (KeyError, TypeError):
        raise TimeGridError(f"unknown time grid kind {kind!r}; allowed: {', '.join(sorted(GRID_KINDS))}") from None
    allowed = [name for name in inspect.signature(make).parameters if name != "steps"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TimeGridError(
            f"{kind} time grid has no option {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return make(steps, **options)


def parse_grid(text: str) -> torch.Tensor:
    """Parse an explicit grid written as comma-separated numbers, e.g. ``"1, 0.5, 0"``."""
    example = "comma-separated numbers such as '1,0.5,0'"
    if not isinstance(text, str):
        raise TimeGridError(f"time grid text must be a string of {example}; got {text!r}")
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise TimeGridError(f"time grid text must be {example}; got {text!r}") from None
    return validate_time_grid(values)
