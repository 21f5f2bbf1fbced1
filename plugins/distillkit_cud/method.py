"""The CUD method: options, the student with look-ahead heads, the catch-up loss, sampling."""

from __future__ import annotations

import attrs
import distillkit
from distillkit import ButcherTableau, Method

from .heads import MultiHeadStudent

#: The catch-up slope of CUD's RK3 variant (METHODS.md §2.8): stages at t, t - Δ and t - 2Δ with
#: weights 5/12, 2/3, -1/12. It is *not* Kutta's RK3; as a one-step method it is second order.
PAPER_RK3 = ButcherTableau(
    name="cud-rk3",
    a=((0, 0, 0), (1, 0, 0), (7 / 4, 1 / 4, 0)),
    b=(5 / 12, 2 / 3, -1 / 12),
    c=(0, 1, 2),
    order=2,
    description="CUD's RK3 catch-up slope (paper §2.8): k3 at t - 2h, weights 5/12, 2/3, -1/12",
)


def _check(condition: bool, attribute, value, allowed: str) -> None:
    if not condition:
        raise distillkit.ConfigError(attribute.name, value, allowed)


def _positive_int(instance, attribute, value):
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, attribute, value, "a positive integer")


def _small_time(instance, attribute, value):
    _check(0.0 <= value < 0.5, attribute, value, "a number in [0, 0.5)")


def _non_negative(instance, attribute, value):
    _check(value >= 0.0, attribute, value, "a number >= 0")


def _head_index(instance, attribute, value):
    _check(isinstance(value, int) and value >= -1, attribute, value, "-1 (the last head) or a head index >= 0")


@attrs.frozen
class CUDConfig:
    """Stage-1 options; defaults are the paper's published recipe."""

    tn: int = attrs.field(default=16, validator=_positive_int)  # catch-up step Δ ~ U(0, 1/tn)
    t_min: float = attrs.field(default=1e-5, validator=_small_time)  # δ: t ~ U(δ, 1)
    catch_up_weight: float = attrs.field(default=1.0, validator=_non_negative)
    ground_truth_weight: float = attrs.field(default=1.0, validator=_non_negative)
    # "--integrator rk3" means the paper's own RK3 slope; false uses the registered tableau "rk3".
    paper_rk3: bool = attrs.field(default=True)
    # Head that samples (the paper samples RK2/RK3 models with the last extra head); -1 = last.
    sample_head: int = attrs.field(default=-1, validator=_head_index)


class CatchUpDistillation(Method):
    """The network catches up with its own velocity a step Δ further along its own trajectory.

    With an alignment tableau of s stages the student gets s output heads; head j regresses the
    velocity j catch-up steps ahead (paper §2.6-2.8): Euler -> 1 head, RK2 -> 2, RK3 -> 3.
    """

    name = "cud"
    config_class = CUDConfig
    uses_integrator = True

    def __init__(self, config: CUDConfig, context):
        super().__init__(config, context)
        use_paper = context.integrator_name == "rk3" and config.paper_rk3
        self.tableau: ButcherTableau = PAPER_RK3 if use_paper else context.integrator
        self.heads = self.tableau.stages
        if config.sample_head >= self.heads:
            raise distillkit.ConfigError(
                "method_options.sample_head", config.sample_head,
                f"-1 or a head index below {self.heads} ({self.tableau.name} trains {self.heads} heads)",
            )

    def build_student(self, backbone):
        return MultiHeadStudent(backbone, extra_heads=self.heads - 1)

    def network_evals_per_step(self):
        # One pass of the shared trunk with gradient; stages + heads passes without.
        return {"with_grad": 1, "no_grad": self.tableau.stages + self.heads}

    def tags(self):
        return {"distillkit.cud.alignment": self.tableau.name, "distillkit.cud.heads": str(self.heads)}

    def loss(self, student, batch, generator, step):
        from .loss import catch_up_loss

        return catch_up_loss(student, batch, generator, self.tableau, self.heads, self.config)

    def velocity_fn(self, student, cond=None):
        head = self.heads - 1 if self.config.sample_head == -1 else self.config.sample_head

        def velocity(x, t):
            return student(x, t, cond, head=head)

        return velocity
