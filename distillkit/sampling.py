"""Samplers: prior noise + time grid + integrator, with per-sample seeds.

Sample i always starts from the noise drawn with seed ``seed + i``, so an image does not change
with the batch size or the number of samples asked for.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .contracts import VelocityFn
from .integrators.grids import edm_grid, uniform_grid
from .integrators.stepper import integrate
from .integrators.tableau import ButcherTableau


def prior_noise(
    n: int, shape: tuple[int, ...], seed: int, *, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """``n`` standard normal samples of ``shape``; sample i drawn from its own generator seeded ``seed + i``."""
    generator = torch.Generator()
    rows = []
    for i in range(n):
        generator.manual_seed(seed + i)
        rows.append(torch.randn(shape, generator=generator, dtype=dtype))
    return torch.stack(rows).to(device)


def steps_for_nfe(tableau: ButcherTableau, nfe: int) -> int:
    """Steps of ``tableau`` that spend exactly ``nfe`` network evaluations."""
    if nfe % tableau.stages:
        raise ValueError(f"{tableau.name} spends {tableau.stages} evaluations per step; {nfe} is not a multiple")
    return nfe // tableau.stages


def sampling_grid(kind: str, steps: int) -> torch.Tensor:
    """A grid from noise (t = 1) to data (t = 0)."""
    return edm_grid(steps) if kind == "edm" else uniform_grid(steps)


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    time_grid: torch.Tensor,
    integrator: str | ButcherTableau = "euler",
    *,
    batch_size: Optional[int] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``noise`` along ``time_grid``, in batches."""
    if batch_size is None or batch_size >= len(noise):
        return integrate(velocity_fn, noise, time_grid, integrator, callback=callback)
    parts = [
        integrate(velocity_fn, chunk, time_grid, integrator, callback=callback)
        for chunk in noise.split(batch_size)
    ]
    return torch.cat(parts)
