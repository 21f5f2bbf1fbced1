"""The multistep consistency sampler (Song et al. 2023, Algorithm 1) in the project's convention.

    x <- f(noise, tau_0)
    for tau in tau_1 > tau_2 > ...:
        z ~ N(0, I)
        x <- f(a(tau) x + b(tau) z, tau)

with a(tau) = (1 - tau) / (1 - t_min), b(tau) = sqrt(tau^2 - (a(tau) t_min)^2): the sample at t_min
is put back on the straight path at time tau with fresh noise (the analogue of the paper's
x + sqrt(tau^2 - sigma_min^2) z). With t_min = 0 this is x_tau = (1 - tau) x + tau z.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .parameterization import renoise_coefficients

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_times(times: Sequence[float], t_min: float) -> list[float]:
    values = [float(t) for t in (times.tolist() if isinstance(times, torch.Tensor) else times)]
    if not values:
        raise ValueError("times must hold at least one time")
    if any(not (t_min < t <= 1.0) for t in values):
        raise ValueError(f"times must lie in (t_min, 1] = ({t_min}, 1]; got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"times must be strictly decreasing (from the noise end); got {values}")
    return values


@torch.no_grad()
def consistency_multistep_sample(
    f: ConsistencyFn,
    noise: torch.Tensor,
    times: Sequence[float],
    generator: torch.Generator,
    *,
    t_min: float = 0.0,
) -> torch.Tensor:
    """Sample with a consistency function ``f(x, t)`` (``t`` a tensor ``[batch]``).

    ``noise`` is the state at ``times[0]`` (pure noise when ``times[0] = 1``); one evaluation of
    ``f`` per time; fresh noise for each later time is drawn from ``generator`` with ``noise``'s
    shape, dtype and device.
    """
    values = _check_times(times, t_min)

    def at(t: float) -> torch.Tensor:
        return torch.full((noise.shape[0],), t, dtype=noise.dtype, device=noise.device)

    x = f(noise, at(values[0]))
    for tau in values[1:]:
        z = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
        a, b = renoise_coefficients(tau, t_min)
        x = f(a * x + b * z, at(tau))
    return x
