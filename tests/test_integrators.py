"""Integrators: the registered tableaus, the integration loop and the time grids.

Expected values are closed forms written here, not taken from the code under test.
"""

import math

import pytest
import torch

import distillkit
from distillkit import ButcherTableau, TimeGridError, UnknownNameError
from distillkit.integrators import (
    edm_grid,
    explicit_grid,
    grid_from_spec,
    integrate,
    nfe,
    parse_grid,
    resolve_integrator,
    rk_step,
    uniform_grid,
    validate_time_grid,
)
from distillkit.testing.integrators import TableauContract

REGISTERED_NAMES = [entry.name for entry in distillkit.get_registries().integrators]


class TestRegisteredTableaus(TableauContract):
    """The whole contract, for every tableau any installed plugin registers."""

    @pytest.fixture(scope="class", params=REGISTERED_NAMES)
    @classmethod
    def tableau(cls, request):
        return distillkit.get_registries().integrators.get(request.param)


RALSTON2 = ButcherTableau(
    name="ralston2",
    a=[[0, 0], [2 / 3, 0]],
    b=[1 / 4, 3 / 4],
    c=[0, 2 / 3],
    order=2,
    description="Ralston's second-order method",
)


class TestContractWithClassAttribute(TableauContract):
    """How a third-party plugin uses the contract: a class attribute, nothing registered."""

    tableau = RALSTON2


# --- the contract itself catches wrong declarations -------------------------------------------

EULER_CLAIMING_ORDER_2 = ButcherTableau(name="euler-claims-2", a=[[0]], b=[1], c=[0], order=2)
HEUN_CLAIMING_ORDER_1 = ButcherTableau(name="heun-claims-1", a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1], order=1)


def test_contract_refuses_an_order_the_method_does_not_have():
    contract = TableauContract()
    with pytest.raises(AssertionError, match="order conditions violated"):
        contract.test_order_conditions_give_exactly_the_declared_order(EULER_CLAIMING_ORDER_2)
    with pytest.raises(AssertionError):
        contract.test_polynomials_below_order_integrated_exactly(tableau=EULER_CLAIMING_ORDER_2)
    with pytest.raises(AssertionError, match="measured order"):
        contract.test_measured_order_of_convergence(tableau=EULER_CLAIMING_ORDER_2)


def test_contract_refuses_an_order_below_the_true_one():
    contract = TableauContract()
    with pytest.raises(AssertionError, match="every order-2 condition holds; declare order 2"):
        contract.test_order_conditions_give_exactly_the_declared_order(HEUN_CLAIMING_ORDER_1)
    with pytest.raises(AssertionError, match=r"measured order 2\.\d+, declared 1"):
        contract.test_measured_order_of_convergence(tableau=HEUN_CLAIMING_ORDER_1)


# --- the built-in plugin ----------------------------------------------------------------------

BUILT_IN = {
    # name: (order, c, b), from the textbooks
    "euler": (1, [0], [1]),
    "heun": (2, [0, 1], [1 / 2, 1 / 2]),
    "midpoint": (2, [0, 1 / 2], [0, 1]),
    "rk3": (3, [0, 1 / 2, 1], [1 / 6, 2 / 3, 1 / 6]),
    "ralston3": (3, [0, 1 / 2, 3 / 4], [2 / 9, 1 / 3, 4 / 9]),
    "rk4": (4, [0, 1 / 2, 1 / 2, 1], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}


@pytest.mark.parametrize("name", [*BUILT_IN, "rk2"])
def test_built_in_names_come_from_the_integrators_plugin(registries, name):
    assert name in registries.integrators
    assert registries.integrators.entry(name).provider == "integrators"
    assert registries.integrators.providers()[name] == "integrators"


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_coefficients(registries, name):
    order, c, b = BUILT_IN[name]
    tableau = registries.integrators.get(name)
    assert tableau.name == name and tableau.order == order
    assert tableau.c == pytest.approx(c, abs=1e-15) and tableau.b == pytest.approx(b, abs=1e-15)


def test_kutta_and_ralston_stage_matrices(registries):
    # The contract accepts any order-3 method, so check these two against the textbook. Every
    # entry is a dyadic fraction, exact in floating point.
    assert registries.integrators.get("rk3").a == ((0, 0, 0), (0.5, 0, 0), (-1, 2, 0))
    assert registries.integrators.get("ralston3").a == ((0, 0, 0), (0.5, 0, 0), (0, 0.75, 0))


def test_rk2_is_an_alias_of_heun(registries):
    assert registries.integrators.get("rk2") is registries.integrators.get("heun")
    assert registries.integrators.entry("heun").aliases == ("rk2",)


@pytest.mark.parametrize("name", REGISTERED_NAMES)
def test_every_registered_tableau_has_a_one_line_description(registries, name):
    description = registries.integrators.get(name).description
    assert description.strip() and "\n" not in description


# --- integrate and rk_step --------------------------------------------------------------------


def test_public_api_exports():
    for name in ("integrate", "uniform_grid", "edm_grid", "explicit_grid", "validate_time_grid"):
        assert name in distillkit.__all__ and callable(getattr(distillkit, name))
    assert distillkit.integrate is integrate


def test_integrate_by_name_equals_integrate_by_tableau(registries):
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2)
    velocity = lambda y, t: torch.cos(y) * t[:, None]  # noqa: E731
    grid = edm_grid(5)
    for name in ("rk3", "rk2", "rk4"):
        by_name = distillkit.integrate(velocity, x, grid, integrator=name)
        by_object = distillkit.integrate(velocity, x, grid, integrator=registries.integrators.get(name))
        assert torch.equal(by_name, by_object)


def test_default_integrator_is_rk3():
    x = torch.ones(2, 1, dtype=torch.float64)
    velocity = lambda y, t: -y * t[:, None]  # noqa: E731
    assert torch.equal(integrate(velocity, x, [1.0, 0.5, 0.0]), integrate(velocity, x, [1.0, 0.5, 0.0], "rk3"))


def test_unknown_integrator_name_lists_the_available_ones():
    with pytest.raises(UnknownNameError, match=r"unknown integrator 'rk9' \(did you mean 'rk4' or 'rk3'\?\); available: .*rk4 \(integrators\)"):
        distillkit.integrate(lambda y, t: y, torch.zeros(1, 1), [1.0, 0.0], integrator="rk9")


def test_integrator_of_wrong_type_is_refused():
    with pytest.raises(TypeError, match="registered name or a ButcherTableau"):
        resolve_integrator(4)


def test_linear_ode_against_closed_form():
    # dx/dt = -2 t x  =>  x(t) = x(1) exp(1 - t^2); rk4 on 50 steps is accurate to ~1e-9.
    x = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    result = distillkit.integrate(lambda y, t: -2.0 * t[:, None] * y, x, uniform_grid(50), integrator="rk4")
    torch.testing.assert_close(result, x * math.exp(1.0), rtol=1e-8, atol=0)


def test_velocity_receives_time_of_shape_batch_at_the_stage_times():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.zeros(5, 3, 2, dtype=torch.float32)
    rk_step(velocity, x, 1.0, -0.5, resolve_integrator("rk4"))
    for t in seen:
        assert t.shape == (5,) and t.dtype == torch.float32 and t.device == x.device
        assert torch.all(t == t[0])
    # rk4 samples t, t + h/2 (twice) and t + h.
    assert [t[0].item() for t in seen] == [1.0, 0.75, 0.75, 0.5]


def test_euler_step_is_x_plus_h_times_velocity():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    result = rk_step(lambda y, t: y * y + t[:, None], x, 0.75, -0.25, resolve_integrator("euler"))
    torch.testing.assert_close(result, x - 0.25 * (x * x + 0.75), rtol=0, atol=0)


def test_zero_weights_are_skipped_not_multiplied():
    # The first stage is evaluated but has weight zero everywhere. Multiplying its (non-finite)
    # slope by zero would give NaN; skipping the term keeps the step finite.
    unused_first_stage = ButcherTableau(name="unused-first", a=[[0, 0], [0, 0]], b=[0, 1], c=[0, 0], order=1)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return torch.full_like(x, math.inf) if len(calls) == 1 else torch.ones_like(x)

    result = rk_step(velocity, torch.zeros(2, 2), 1.0, -0.5, unused_first_stage)
    assert len(calls) == 2
    torch.testing.assert_close(result, torch.full((2, 2), -0.5))


@pytest.mark.parametrize("name", BUILT_IN)
def test_velocity_is_called_nfe_times(name):
    calls = []

    def velocity(x, t):
        calls.append(1)
        return -x

    integrate(velocity, torch.ones(3, 2), uniform_grid(7), name)
    stages = len(BUILT_IN[name][2])
    assert len(calls) == nfe(name, 7) == stages * 7


def test_callback_is_called_once_per_step():
    events = []
    grid = [1.0, 0.8, 0.3, 0.0]
    result = integrate(lambda y, t: -y, torch.ones(2, 2), grid, "heun", callback=events.append)
    assert [event["i"] for event in events] == [0, 1, 2]
    assert [(event["t"], event["t_next"]) for event in events] == [(1.0, 0.8), (0.8, 0.3), (0.3, 0.0)]
    assert events[-1]["x"] is result
    assert all(event["x"].shape == (2, 2) for event in events)


def test_integrate_on_increasing_grid():
    # dx/dt = t from t = 0.25 to t = 0.75 adds (0.75^2 - 0.25^2) / 2 = 0.25; Heun (the trapezoid
    # rule here) is exact for a linear integrand.
    x = torch.zeros(3, 1, dtype=torch.float64)
    result = integrate(lambda y, t: t[:, None].expand_as(y), x, [0.25, 0.5, 0.75], "heun")
    torch.testing.assert_close(result, torch.full((3, 1), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)


def test_integrate_keeps_the_autograd_graph():
    x = torch.ones(2, 3, requires_grad=True)
    integrate(lambda y, t: -y, x, [1.0, 0.0], "euler").sum().backward()
    # One Euler step of dx/dt = -x over h = -1 doubles x, so d(sum)/dx = 2.
    torch.testing.assert_close(x.grad, torch.full((2, 3), 2.0))


def test_velocity_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"velocity_fn returned shape \(2,\) for x of shape \(2, 3\)"):
        integrate(lambda y, t: t, torch.zeros(2, 3), [1.0, 0.0], "euler")


def test_velocity_in_another_precision_does_not_change_the_state_dtype():
    result = integrate(lambda y, t: -y.double(), torch.ones(2, 3), [1.0, 0.0], "heun")
    assert result.dtype == torch.float32


def test_scalar_state_is_refused():
    with pytest.raises(ValueError, match="batch dimension"):
        integrate(lambda y, t: y, torch.tensor(1.0), [1.0, 0.0], "euler")


def test_integrate_validates_the_grid():
    with pytest.raises(TimeGridError, match="strictly monotone"):
        integrate(lambda y, t: y, torch.zeros(1, 1), [1.0, 0.5, 0.5, 0.0], "euler")


def test_nfe_is_stages_times_steps(registries):
    assert nfe("euler", 10) == 10
    assert nfe("heun", 4) == 8
    assert nfe(registries.integrators.get("rk4"), 3) == 12
    with pytest.raises(TimeGridError, match="positive integer"):
        nfe("rk4", 0)


# --- grids ------------------------------------------------------------------------------------


def test_uniform_grid():
    grid = uniform_grid(4)
    assert grid.dtype == torch.float64 and grid.device.type == "cpu"
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert uniform_grid(2, t_start=0.0, t_end=1.0).tolist() == [0.0, 0.5, 1.0]
    assert uniform_grid(1, 0.3, 0.1).tolist() == [0.3, 0.1]


@pytest.mark.parametrize("steps", [1, 2, 5, 18, 100])
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_edm_grid_matches_its_formula(steps, rho):
    grid = edm_grid(steps, rho=rho)
    expected = [(1 - i / steps) ** rho for i in range(steps + 1)]
    assert len(grid) == steps + 1 and grid.dtype == torch.float64
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert grid.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert torch.all(grid[1:] < grid[:-1])


def test_edm_grid_concentrates_steps_near_the_data():
    steps = edm_grid(10).diff().abs()
    assert torch.all(steps[1:] < steps[:-1])  # step sizes shrink towards t = 0


def test_edm_grid_with_rho_one_is_uniform():
    torch.testing.assert_close(edm_grid(8, rho=1.0), uniform_grid(8), rtol=0, atol=1e-15)


def test_edm_grid_end_points_are_exact_in_either_direction():
    decreasing = edm_grid(6, t_start=0.9, t_end=0.1)
    assert decreasing[0].item() == 0.9 and decreasing[-1].item() == 0.1
    assert torch.all(decreasing.diff() < 0)
    increasing = edm_grid(6, t_start=0.0, t_end=0.8)
    assert increasing[0].item() == 0.0 and increasing[-1].item() == 0.8
    assert torch.all(increasing.diff() > 0)
    expected = [0.8 * (i / 6) ** 7 for i in range(7)]
    assert increasing.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_explicit_grid():
    grid = explicit_grid([1, 0.6, 0.2, 0])
    assert grid.dtype == torch.float64 and grid.tolist() == [1.0, 0.6, 0.2, 0.0]


def test_validate_time_grid_keeps_the_given_values():
    # Plain Python floats must not pass through float32 on the way.
    values = [0.0, 0.123456789012345, 0.8860469069256067]
    assert validate_time_grid(values).tolist() == values
    from_float32 = validate_time_grid(torch.tensor([1.0, 0.5], dtype=torch.float32))
    assert from_float32.dtype == torch.float64 and from_float32.tolist() == [1.0, 0.5]


BAD_GRIDS = [
    ([1.0], "at least 2 points"),
    ([], "at least 2 points"),
    ([1.0, float("nan"), 0.0], "must be finite"),
    ([1.0, float("inf")], "must be finite"),
    ([1.5, 0.5, 0.0], r"must lie in \[0, 1\]"),
    ([0.5, -0.1], r"must lie in \[0, 1\]"),
    ([1.0, 0.5, 0.5, 0.0], "strictly monotone.*got 1.0, 0.5, 0.5, 0.0"),
    ([0.0, 0.5, 0.3, 1.0], "strictly monotone"),
    ([0.3, 0.3], "strictly monotone"),
    ([[1.0, 0.0]], "must be 1-D"),
    ("abc", "sequence of real numbers"),
    (torch.tensor([1.0 + 0j, 0.0]), "real numbers"),
]


@pytest.mark.parametrize("grid, message", BAD_GRIDS)
def test_bad_grids_are_refused_with_a_one_line_message(grid, message):
    with pytest.raises(TimeGridError, match=message) as caught:
        validate_time_grid(grid)
    assert "\n" not in str(caught.value)


def test_long_bad_grid_message_stays_short():
    with pytest.raises(TimeGridError) as caught:
        validate_time_grid([0.5] * 1000)
    assert len(str(caught.value)) < 300 and "1000 points" in str(caught.value)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4", None])
def test_steps_must_be_a_positive_integer(steps):
    for make in (uniform_grid, edm_grid):
        with pytest.raises(TimeGridError, match=f"steps must be a positive integer; got {steps!r}"):
            make(steps)


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf"), "7"])
def test_edm_rho_must_be_positive_and_finite(rho):
    with pytest.raises(TimeGridError, match="rho must be a positive finite number"):
        edm_grid(4, rho=rho)


@pytest.mark.parametrize("make", [uniform_grid, edm_grid])
def test_bad_end_points_are_refused(make):
    with pytest.raises(TimeGridError, match=r"\[0, 1\]"):
        make(4, t_start=-0.5, t_end=0.0)
    with pytest.raises(TimeGridError, match="strictly monotone"):
        make(4, t_start=0.5, t_end=0.5)


def test_grid_from_spec():
    assert torch.equal(grid_from_spec("uniform", 4), uniform_grid(4))
    assert torch.equal(grid_from_spec("edm", 6, rho=3.0, t_end=0.1), edm_grid(6, rho=3.0, t_end=0.1))
    with pytest.raises(TimeGridError, match="unknown time grid kind 'cosine'; allowed: edm, uniform"):
        grid_from_spec("cosine", 4)
    with pytest.raises(TimeGridError, match="uniform time grid has no option rho; allowed: t_start, t_end"):
        grid_from_spec("uniform", 4, rho=7.0)


def test_parse_grid():
    assert parse_grid("1,0.5,0").tolist() == [1.0, 0.5, 0.0]
    assert parse_grid(" 0 , 0.25,1 ").tolist() == [0.0, 0.25, 1.0]
    assert parse_grid("1e-1,5e-2").tolist() == [0.1, 0.05]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "comma-separated numbers"),
        ("1,,0", "comma-separated numbers"),
        ("1;0.5;0", "comma-separated numbers"),
        ("one,zero", "comma-separated numbers"),
        ("1", "at least 2 points"),
        ("1,nan", "finite"),
        ("2,1,0", r"\[0, 1\]"),
        ("1,0.5,0.7", "strictly monotone"),
        (None, "must be a string"),
    ],
)
def test_parse_grid_refuses_malformed_text(text, message):
    with pytest.raises(TimeGridError, match=message):
        parse_grid(text)


# --- ButcherTableau refuses bad coefficients --------------------------------------------------

BAD_TABLEAUS = [
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.6], c=[0, 1]), "weights b must sum to 1"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 0.5]), r"row 1 of a sums to 1.0 but c\[1\] = 0.5"),
    (dict(a=[[0.5, 0], [0, 0.5]], b=[0.5, 0.5], c=[0.5, 0.5]), "strictly lower triangular"),
    (dict(a=[[0, 1], [0, 0]], b=[0.5, 0.5], c=[1, 0]), "strictly lower triangular"),
    (dict(a=[[0, 0, 0], [1, 0, 0]], b=[0.5, 0.5], c=[0, 1]), "must be 2x2"),
    (dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1, 2]), "must be 2x2"),
    (dict(a=[], b=[], c=[]), "at least one weight"),
    (dict(a=[[0, 0], [math.nan, 0]], b=[0.5, 0.5], c=[0, 1]), "finite"),
]


@pytest.mark.parametrize("coefficients, message", BAD_TABLEAUS)
def test_butcher_tableau_refuses_bad_coefficients(coefficients, message):
    with pytest.raises(ValueError, match=message):
        ButcherTableau(name="bad", order=1, **coefficients)


def test_butcher_tableau_refuses_a_non_positive_order():
    with pytest.raises(ValueError, match="order must be a positive integer"):
        ButcherTableau(name="bad", a=[[0]], b=[1], c=[0], order=0)
