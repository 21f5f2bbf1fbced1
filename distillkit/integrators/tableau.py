"""An explicit Runge-Kutta method is data: a Butcher tableau."""

from __future__ import annotations

import math

import attrs

# Coefficients are checked to this tolerance: tableaus are written as decimal or exact fractions.
_TOLERANCE = 1e-12


def _as_float_tuple(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _as_matrix(rows) -> tuple[tuple[float, ...], ...]:
    return tuple(_as_float_tuple(row) for row in rows)


@attrs.frozen
class ButcherTableau:
    """Coefficients of an explicit Runge-Kutta method with ``s`` stages.

    One step of size ``h`` from ``(x, t)``::

        k_i = f(x + h * sum_j a[i][j] * k_j,  t + c[i] * h)     for i = 0 .. s-1
        x'  = x + h * sum_i b[i] * k_i

    ``a`` is an ``s x s`` matrix whose entries on and above the diagonal are zero (explicit);
    ``order`` is the declared order of accuracy, which the property tests measure.
    Construction refuses an inconsistent tableau (sum of ``b`` not 1, row sums of ``a`` not ``c``).
    """

    name: str
    a: tuple[tuple[float, ...], ...] = attrs.field(converter=_as_matrix)
    b: tuple[float, ...] = attrs.field(converter=_as_float_tuple)
    c: tuple[float, ...] = attrs.field(converter=_as_float_tuple)
    order: int
    description: str = ""

    def __attrs_post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(f"Butcher tableau {self.name!r}: {problem}")

    @property
    def stages(self) -> int:
        return len(self.b)

    def problem(self) -> str | None:
        """None for a well-formed explicit, consistent tableau; otherwise what is wrong."""
        s = len(self.b)
        if not isinstance(self.name, str) or not self.name:
            return "name must be a non-empty string"
        if s == 0:
            return "b must have at least one weight"
        if len(self.c) != s or len(self.a) != s or any(len(row) != s for row in self.a):
            return f"a must be {s}x{s} and c must have {s} entries to match b"
        values = [*self.b, *self.c, *(v for row in self.a for v in row)]
        if not all(math.isfinite(v) for v in values):
            return "coefficients must be finite"
        if any(self.a[i][j] != 0.0 for i in range(s) for j in range(i, s)):
            return "a must be strictly lower triangular (explicit method)"
        if not isinstance(self.order, int) or self.order < 1:
            return "order must be a positive integer"
        if abs(sum(self.b) - 1.0) > _TOLERANCE:
            return f"weights b must sum to 1 (they sum to {sum(self.b)!r})"
        for i in range(s):
            if abs(sum(self.a[i]) - self.c[i]) > _TOLERANCE:
                return f"row {i} of a sums to {sum(self.a[i])!r} but c[{i}] = {self.c[i]!r}"
        return None
