"""The contract every Butcher tableau must satisfy, as a reusable pytest test base.

A plugin that registers an integrator checks it with::

    from distillkit.testing.integrators import TableauContract

    class TestMyTableau(TableauContract):
        tableau = MY_TABLEAU

or, to check several tableaus, with a fixture named ``tableau`` in the test module::

    @pytest.fixture(scope="module", params=[FIRST, SECOND], ids=lambda t: t.name)
    def tableau(request):
        return request.param

    class TestMyTableaus(TableauContract):
        pass

(Hypothesis refuses function-scoped fixtures in ``@given`` tests, hence the scope. Inside the
class, a fixture needs ``@pytest.fixture(scope="class", ...)`` above ``@classmethod``.)

The measured order of convergence is calibrated for ordinary methods of orders 1 to 5. A method
with an unusually small leading error constant, such as Dormand-Prince 5, leaves the asymptotic
regime only where float64 rounding dominates; its tests may skip that one measurement (the
order-condition test still pins its order exactly)::

    class TestDopri5(TableauContract):
        tableau = DOPRI5

        @pytest.mark.skip(reason="error constant too small to measure in float64")
        def test_measured_order_of_convergence(self):
            pass

Every expected value is computed here from the mathematics, independently of the stepper:
order conditions on rooted trees, antiderivatives of polynomials, the stability polynomial of the
linear test equation, and the closed-form solution of ``dx/dt = x^2``. The only thing taken from
distillkit is the code under test: ``integrate``, ``rk_step`` and the grids.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..integrators import ButcherTableau, integrate, uniform_grid

# Modest example counts keep a whole tableau's contract to a few seconds on two CPU cores. The same
# inherited test runs on instances of several subclasses, which Hypothesis would otherwise report.
CONTRACT_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.differing_executors],
)

# Coefficients are decimal approximations of fractions; sums of a few of them are this close.
COEFFICIENT_TOLERANCE = 1e-12

# How far the measured order of convergence may be from the declared order.
ORDER_TOLERANCE = 0.15


# --------------------------------------------------------------------------------------------
# Closed forms, in plain Python so that they share nothing with the stepper.
# --------------------------------------------------------------------------------------------


def _mat_vec(matrix: tuple[tuple[float, ...], ...], vector: list[float]) -> list[float]:
    return [sum(a * v for a, v in zip(row, vector)) for row in matrix]


def _dot(u: list[float] | tuple[float, ...], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def stability_coefficients(tableau: ButcherTableau) -> list[float]:
    """``[1, b^T 1, b^T A 1, ..., b^T A^(s-1) 1]``: one step of ``x' = lambda x`` multiplies x by
    ``R(z) = sum_k coefficients[k] * z^k`` with ``z = lambda * h`` (A is nilpotent, so R has degree s)."""
    coefficients = [1.0]
    powers = [1.0] * tableau.stages  # A^(k-1) 1
    for _ in range(tableau.stages):
        coefficients.append(_dot(tableau.b, powers))
        powers = _mat_vec(tableau.a, powers)
    return coefficients


# A rooted tree is the tuple of its subtrees, sorted, so that equal trees compare equal; () is a leaf.
RootedTree = tuple


@functools.lru_cache(maxsize=None)
def rooted_trees(order: int) -> tuple[RootedTree, ...]:
    """All rooted trees with ``order`` vertices (1, 1, 2, 4, 9, 20, ... of them)."""
    if order == 1:
        return ((),)
    return tuple(sorted(set(_forests(order - 1))))


def _forests(vertices: int) -> Iterator[RootedTree]:
    """Every multiset of trees with ``vertices`` vertices in total, as a sorted tuple."""
    if vertices == 0:
        yield ()
        return
    for first_size in range(1, vertices + 1):
        for first in rooted_trees(first_size):
            for rest in _forests(vertices - first_size):
                yield tuple(sorted((first, *rest)))


def _tree_size(tree: RootedTree) -> int:
    return 1 + sum(_tree_size(child) for child in tree)


def _tree_density(tree: RootedTree) -> int:
    """Butcher's gamma: the exact solution's Taylor coefficient for this tree is 1 / gamma."""
    return _tree_size(tree) * math.prod(_tree_density(child) for child in tree)


def _stage_weights(tableau: ButcherTableau, tree: RootedTree) -> list[float]:
    """Phi_i(tree): the product over the root's children of (A Phi(child))_i."""
    weights = [1.0] * tableau.stages
    for child in tree:
        child_weights = _mat_vec(tableau.a, _stage_weights(tableau, child))
        weights = [w * cw for w, cw in zip(weights, child_weights)]
    return weights


def order_condition_residuals(tableau: ButcherTableau, order: int) -> list[tuple[RootedTree, float]]:
    """``b^T Phi(tree) - 1/gamma(tree)`` for every rooted tree up to ``order`` vertices.

    A Runge-Kutta method has order p exactly when all residuals up to p vertices vanish.
    """
    return [
        (tree, _dot(tableau.b, _stage_weights(tableau, tree)) - 1.0 / _tree_density(tree))
        for size in range(1, order + 1)
        for tree in rooted_trees(size)
    ]


def convergence_steps(order: int) -> int:
    """Step count N at which err(N) / err(2N) of the ``x^2`` problem below is asymptotic.

    Calibrated on the built-in methods (orders 1-4): coarser would leave the asymptotic regime,
    finer would let rounding dominate the error of the high-order methods.
    """
    return max(4, 2 ** (9 - order))


def squared_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * x


def squared_solution(x0: float, t0: float, t1: float) -> float:
    """``dx/dt = x^2`` from ``x(t0) = x0``: ``x(t1) = x0 / (1 - x0 (t1 - t0))``."""
    return x0 / (1.0 - x0 * (t1 - t0))


def measured_order(
    tableau: ButcherTableau, x0: float, t0: float, t1: float
) -> tuple[float, float, float]:
    """``(log2(err(N) / err(2N)), err(N), err(2N))`` for ``dx/dt = x^2`` on uniform grids.

    ``x^2`` is chosen because it is scale invariant: the leading local error of any method is a
    fixed constant times ``x^(p+2) h^(p+1)``, so in the asymptotic regime the global error keeps
    its sign and cannot cancel out for unlucky initial values or intervals, as it can on, say, the
    logistic equation. A method whose leading error constant is unusually small (Dormand-Prince 5)
    reaches that regime only where float64 rounding already dominates; see the module docstring.
    """
    steps = convergence_steps(tableau.order)
    exact = squared_solution(x0, t0, t1)
    errors = []
    for n in (steps, 2 * steps):
        x = torch.tensor([x0], dtype=torch.float64)
        result = integrate(squared_velocity, x, uniform_grid(n, t0, t1), tableau)
        errors.append(abs(result.item() - exact))
    coarse, fine = errors
    order = math.log2(coarse / fine) if coarse > 0 and fine > 0 else math.inf
    return order, coarse, fine


# --------------------------------------------------------------------------------------------
# Strategies and small helpers.
# --------------------------------------------------------------------------------------------


@st.composite
def time_grids(draw, min_points: int = 2, max_points: int = 6, dyadic: bool = False) -> list[float]:
    """Strictly monotone grids in [0, 1], increasing or decreasing.

    ``dyadic=True`` draws multiples of 1/1024 only, for which ``1 - t`` is exact.
    """
    if dyadic:
        points_strategy = st.integers(0, 1024).map(lambda k: k / 1024)
    else:
        points_strategy = st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False)
    points = sorted(draw(st.lists(points_strategy, min_size=min_points, max_size=max_points, unique=True)))
    return points[::-1] if draw(st.booleans()) else points


def checked_velocity(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Wrap a velocity so that every call checks the time argument the stepper passes."""

    def wrapped(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],), f"t has shape {tuple(t.shape)}, expected ({x.shape[0]},)"
        assert t.dtype == x.dtype and t.device == x.device, "t must have x's dtype and device"
        return velocity(x, t)

    return wrapped


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[batch]`` tensor against ``like`` of shape ``[batch, ...]``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _nonlinear_velocity(rates: torch.Tensor):
    """A per-sample, time-dependent, nonlinear velocity with per-sample ``rates``."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(3.0 * x) * _per_sample(rates, x) - _per_sample(t, x) * x

    return velocity


def _spread_rates(batch: int, dtype=torch.float64) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, batch, dtype=dtype)


def _random_state(seed: int, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


_seeds = st.integers(min_value=0, max_value=2**31 - 1)


# --------------------------------------------------------------------------------------------
# The contract.
# --------------------------------------------------------------------------------------------


class TableauContract:
    """Subclass as ``class TestX(TableauContract)`` and provide ``tableau`` (see module docstring)."""

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        # A plain class attribute becomes the value of the `tableau` argument; a subclass that
        # defines a `tableau` fixture instead is left to pytest.
        declared = getattr(type(self), "tableau", None)
        if isinstance(declared, ButcherTableau) and "tableau" in metafunc.fixturenames:
            metafunc.parametrize("tableau", [declared], ids=[declared.name], scope="class")

    def test_consistent_explicit_tableau(self, tableau: ButcherTableau) -> None:
        s = tableau.stages
        assert isinstance(tableau.order, int) and tableau.order >= 1
        assert len(tableau.c) == s and len(tableau.a) == s and all(len(row) == s for row in tableau.a)
        upper_part = [tableau.a[i][j] for i in range(s) for j in range(i, s)]
        assert all(v == 0.0 for v in upper_part), "a must be strictly lower triangular (explicit)"
        assert math.isclose(sum(tableau.b), 1.0, abs_tol=COEFFICIENT_TOLERANCE)
        for row, c in zip(tableau.a, tableau.c):
            assert math.isclose(sum(row), c, abs_tol=COEFFICIENT_TOLERANCE)
        # An explicit s-stage method has order at most s.
        assert tableau.order <= s

    def test_order_conditions_give_exactly_the_declared_order(self, tableau: ButcherTableau) -> None:
        residuals = order_condition_residuals(tableau, tableau.order + 1)
        up_to_order = len(residuals) - len(rooted_trees(tableau.order + 1))
        failing = [(tree, r) for tree, r in residuals[:up_to_order] if abs(r) > COEFFICIENT_TOLERANCE]
        assert not failing, f"{tableau.name}: order conditions violated (tree, residual): {failing}"
        beyond = [r for _, r in residuals[up_to_order:]]
        assert max(abs(r) for r in beyond) > COEFFICIENT_TOLERANCE, (
            f"{tableau.name}: every order-{tableau.order + 1} condition holds; declare order {tableau.order + 1}"
        )

    @CONTRACT_SETTINGS
    @given(data=st.data(), grid=time_grids())
    def test_polynomials_below_order_integrated_exactly(self, tableau: ButcherTableau, data, grid) -> None:
        # dx/dt = p(t) with deg p < order is pure quadrature, which the weights make exact.
        coefficients = data.draw(
            st.lists(st.floats(-2.0, 2.0), min_size=1, max_size=tableau.order), label="coefficients"
        )
        x0 = data.draw(st.floats(-2.0, 2.0), label="x0")

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            p = sum(coefficient * t**k for k, coefficient in enumerate(coefficients))
            return torch.ones_like(x) * _per_sample(p, x)

        def antiderivative(t: float) -> float:
            return sum(coefficient * t ** (k + 1) / (k + 1) for k, coefficient in enumerate(coefficients))

        x = torch.full((2, 3), x0, dtype=torch.float64)
        result = integrate(checked_velocity(velocity), x, grid, tableau)
        expected = x0 + antiderivative(grid[-1]) - antiderivative(grid[0])
        tolerance = COEFFICIENT_TOLERANCE * (1.0 + sum(abs(c) for c in coefficients) + abs(x0)) * len(grid)
        assert torch.allclose(result, torch.full_like(x, expected), rtol=0.0, atol=tolerance)

    @CONTRACT_SETTINGS
    @given(
        grid=time_grids(2, 2),
        rates=st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3),
        starts=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
    )
    def test_one_step_of_linear_equation_is_stability_polynomial(
        self, tableau: ButcherTableau, grid, rates, starts
    ) -> None:
        coefficients = stability_coefficients(tableau)
        for k in range(1, tableau.order + 1):
            assert math.isclose(coefficients[k], 1.0 / math.factorial(k), abs_tol=COEFFICIENT_TOLERANCE), (
                f"b^T A^{k - 1} 1 = {coefficients[k]!r}, but order {tableau.order} needs 1/{k}!"
            )
        h = grid[1] - grid[0]
        lam = torch.tensor(rates, dtype=torch.float64)
        x = torch.tensor(starts, dtype=torch.float64)
        result = integrate(checked_velocity(lambda y, t: lam * y), x, grid, tableau)

        def growth(z: float) -> float:
            taylor = sum(z**k / math.factorial(k) for k in range(tableau.order + 1))
            return taylor + sum(coefficients[k] * z**k for k in range(tableau.order + 1, tableau.stages + 1))

        expected = torch.tensor([growth(r * h) * x0 for r, x0 in zip(rates, starts)], dtype=torch.float64)
        assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)

    @CONTRACT_SETTINGS
    @given(
        reach=st.floats(0.3, 0.6),
        sign=st.sampled_from([-1.0, 1.0]),
        t_low=st.floats(0.0, 0.5),
        length=st.floats(0.5, 1.0),
        decreasing=st.booleans(),
    )
    def test_measured_order_of_convergence(
        self, tableau: ButcherTableau, reach, sign, t_low, length, decreasing
    ) -> None:
        # |x0 (t1 - t0)| = reach in [0.3, 0.6] keeps the solution of x' = x^2 far from its blow-up
        # at x0 (t1 - t0) = 1, while making the error large enough to stand above rounding.
        t_high = min(t_low + length, 1.0)
        t0, t1 = (t_high, t_low) if decreasing else (t_low, t_high)
        x0 = sign * reach / abs(t1 - t0)
        order, coarse, fine = measured_order(tableau, x0, t0, t1)
        assert abs(order - tableau.order) <= ORDER_TOLERANCE, (
            f"{tableau.name}: measured order {order:.3f}, declared {tableau.order} "
            f"(errors {coarse:.3e} with N={convergence_steps(tableau.order)}, {fine:.3e} with 2N)"
        )

    @CONTRACT_SETTINGS
    @given(grid=time_grids(3, 6), split=st.integers(1, 4), seed=_seeds)
    def test_integrating_in_pieces_equals_integrating_at_once(
        self, tableau: ButcherTableau, grid, split, seed
    ) -> None:
        split = min(split, len(grid) - 2)
        velocity = checked_velocity(_nonlinear_velocity(_spread_rates(4)))
        x = _random_state(seed, (4, 3))
        at_once = integrate(velocity, x, grid, tableau)
        first_piece = integrate(velocity, x, grid[: split + 1], tableau)
        in_pieces = integrate(velocity, first_piece, grid[split:], tableau)
        # The same floating-point operations in the same order: equal to the last bit.
        assert torch.equal(at_once, in_pieces)

    @CONTRACT_SETTINGS
    @given(grid=time_grids(2, 5), seed=_seeds)
    def test_samples_of_a_batch_are_integrated_independently(
        self, tableau: ButcherTableau, grid, seed
    ) -> None:
        x = _random_state(seed, (4, 3))
        rates = _random_state(seed + 1, (4,))
        batched = integrate(checked_velocity(_nonlinear_velocity(rates)), x, grid, tableau)
        for row in range(x.shape[0]):
            row_velocity = checked_velocity(_nonlinear_velocity(rates[row : row + 1]))
            alone = integrate(row_velocity, x[row : row + 1], grid, tableau)
            # Vectorised and scalar sin() may differ in the last bit, hence a tolerance.
            torch.testing.assert_close(alone[0], batched[row], rtol=1e-12, atol=1e-12)

    @CONTRACT_SETTINGS
    @given(grid=time_grids(2, 6, dyadic=True), seed=_seeds)
    def test_decreasing_grid_mirrors_increasing_grid(self, tableau: ButcherTableau, grid, seed) -> None:
        # Substituting s = 1 - t turns dx/dt = v(x, t) into dx/ds = -v(x, 1 - s): integrating one
        # over a grid must equal integrating the other over the mirrored grid.
        velocity = _nonlinear_velocity(_spread_rates(4))

        def mirrored(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return -velocity(x, 1.0 - s)

        x = _random_state(seed, (4, 3))
        forward = integrate(checked_velocity(velocity), x, grid, tableau)
        backward = integrate(checked_velocity(mirrored), x, [1.0 - t for t in grid], tableau)
        torch.testing.assert_close(forward, backward, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("shape", [(3,), (2, 5), (2, 3, 4, 4)])
    def test_dtype_and_shape_preserved(self, tableau: ButcherTableau, dtype, shape) -> None:
        grid = [1.0, 0.7, 0.3, 0.0]
        x = _random_state(0, shape, dtype)
        velocity = checked_velocity(_nonlinear_velocity(_spread_rates(shape[0], dtype)))
        result = integrate(velocity, x, grid, tableau)
        assert result.dtype == dtype and result.shape == x.shape and result.device == x.device

        reference_velocity = checked_velocity(_nonlinear_velocity(_spread_rates(shape[0])))
        reference = integrate(reference_velocity, x.to(torch.float64), grid, tableau)
        # Rounding of a few steps, each of a few stages, in the given precision.
        tolerance = 100 * torch.finfo(dtype).eps
        torch.testing.assert_close(result.to(torch.float64), reference, rtol=tolerance, atol=tolerance)
