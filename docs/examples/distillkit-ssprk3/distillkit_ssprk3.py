"""Shu and Osher's strong-stability-preserving third-order Runge-Kutta method, as a plugin."""

from distillkit import ButcherTableau, hookimpl

SSPRK3 = ButcherTableau(
    name="ssprk3",
    a=((0, 0, 0), (1, 0, 0), (1 / 4, 1 / 4, 0)),
    b=(1 / 6, 1 / 6, 2 / 3),
    c=(0, 1, 1 / 2),
    order=3,
    description="strong-stability-preserving RK3 (Shu-Osher)",
)


@hookimpl
def distillkit_register_integrators(register):
    register(SSPRK3)
