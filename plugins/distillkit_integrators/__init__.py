"""Built-in integrators: the classic explicit Runge-Kutta methods of orders 1 to 4.

Registered through the ``distillkit`` entry-point group like any third-party plugin, and using
only the public ``distillkit`` API.
"""

import distillkit
from distillkit import ButcherTableau

EULER = ButcherTableau(
    name="euler",
    a=[[0]],
    b=[1],
    c=[0],
    order=1,
    description="Forward Euler: one velocity evaluation per step, first order.",
)

HEUN = ButcherTableau(
    name="heun",
    a=[[0, 0], [1, 0]],
    b=[1 / 2, 1 / 2],
    c=[0, 1],
    order=2,
    description="Heun's method (explicit trapezoid): Euler predictor, averaged slopes, second order.",
)

MIDPOINT = ButcherTableau(
    name="midpoint",
    a=[[0, 0], [1 / 2, 0]],
    b=[0, 1],
    c=[0, 1 / 2],
    order=2,
    description="Explicit midpoint: slope taken at a half Euler step, second order.",
)

RK3 = ButcherTableau(
    name="rk3",
    a=[[0, 0, 0], [1 / 2, 0, 0], [-1, 2, 0]],
    b=[1 / 6, 2 / 3, 1 / 6],
    c=[0, 1 / 2, 1],
    order=3,
    description="Kutta's third-order method (Simpson-like weights 1/6, 2/3, 1/6).",
)

RALSTON3 = ButcherTableau(
    name="ralston3",
    a=[[0, 0, 0], [1 / 2, 0, 0], [0, 3 / 4, 0]],
    b=[2 / 9, 1 / 3, 4 / 9],
    c=[0, 1 / 2, 3 / 4],
    order=3,
    description="Ralston's third-order method (minimal error bound among 3-stage order-3 methods).",
)

RK4 = ButcherTableau(
    name="rk4",
    a=[[0, 0, 0, 0], [1 / 2, 0, 0, 0], [0, 1 / 2, 0, 0], [0, 0, 1, 0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    c=[0, 1 / 2, 1 / 2, 1],
    order=4,
    description="The classic fourth-order Runge-Kutta method.",
)


@distillkit.hookimpl
def distillkit_register_integrators(register):
    register(EULER)
    register(HEUN, aliases=("rk2",))
    register(MIDPOINT)
    register(RK3)
    register(RALSTON3)
    register(RK4)
