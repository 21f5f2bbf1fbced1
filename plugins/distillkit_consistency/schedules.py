"""Consistency training's curriculum (Song et al. 2023, Appendix C), as the official code computes it.

Over training step k of K, with s0 points at the start and s1 + 1 at the end:

    N(k)  = max(ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1), 1) + 1      grid points
    mu(k) = exp(s0 ln(mu0) / (N(k) - 1))                                     target-network rate

The paper writes mu(k) = exp(s0 ln mu0 / N(k)) with N counting intervals; the official code
divides by the interval count N(k) - 1 of the grid's N(k) points, which is what is used here
(so mu(0) = mu0^(s0 / (s0 - 1)), 0.81 for s0 = 2, mu0 = 0.9).
"""

from __future__ import annotations

import math


def num_points(k: int, total: int, s0: int, s1: int) -> int:
    fraction = min(max(k / max(total, 1), 0.0), 1.0)
    intervals = math.ceil(math.sqrt(fraction * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(intervals, 1) + 1


def target_rate(k: int, total: int, s0: int, s1: int, mu0: float) -> float:
    if mu0 == 0.0:
        return 0.0
    return math.exp(s0 * math.log(mu0) / (num_points(k, total, s0, s1) - 1))
