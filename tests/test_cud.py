"""CUD stage 1 against the paper's formulas (METHODS.md §2.6-2.8), written out independently here."""

import math

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext
from distillkit_cud.loss import catch_up_targets  # the plugin's own module, tested directly
from distillkit_cud.method import PAPER_RK3

T_MIN = 1e-5


def field(x, t):
    """A smooth nonlinear velocity field standing in for the network's main head."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return torch.sin(x) * (1 + t) + t**2 - 0.3 * x


def make_context(registries, integrator_name):
    return MethodContext(
        data=DataSpec((2,)),
        integrator=registries.integrators.get(integrator_name),
        integrator_name=integrator_name,
        total_steps=10,
        integrators=registries.integrators,
    )


@pytest.fixture
def point():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    t = torch.rand(6, generator=generator, dtype=torch.float64) * 0.4 + 0.5  # far from the clamp
    delta = torch.rand(6, generator=generator, dtype=torch.float64) / 16
    return x, t, delta


def test_euler_target_is_one_euler_step_ahead(point):
    x, t, d = point
    tableau = distillkit.get_registries().integrators.get("euler")
    (y,) = catch_up_targets(field, x, t, d, tableau, 1, T_MIN)
    dd = d.view(-1, 1)
    expected = field(x - dd * field(x, t), t - d)
    torch.testing.assert_close(y, expected)


def test_rk2_targets_use_heun_slope_one_and_two_steps_ahead(point):
    x, t, d = point
    tableau = distillkit.get_registries().integrators.get("rk2")
    y1, y2 = catch_up_targets(field, x, t, d, tableau, 2, T_MIN)
    dd = d.view(-1, 1)
    k1 = field(x, t)
    k2 = field(x - dd * k1, t - d)
    slope = (k1 + k2) / 2
    torch.testing.assert_close(y1, field(x - dd * slope, t - d))
    torch.testing.assert_close(y2, field(x - 2 * dd * slope, t - 2 * d))


def test_rk3_targets_use_the_papers_slope_not_kutta(point):
    x, t, d = point
    y = catch_up_targets(field, x, t, d, PAPER_RK3, 3, T_MIN)
    dd = d.view(-1, 1)
    k1 = field(x, t)
    k2 = field(x - dd * k1, t - d)
    k3 = field(x - dd * (7 / 4 * k1 + 1 / 4 * k2), t - 2 * d)
    slope = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
    for j, y_j in enumerate(y, start=1):
        torch.testing.assert_close(y_j, field(x - j * dd * slope, t - j * d))


def test_times_are_clamped_at_t_min():
    x = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([0.01], dtype=torch.float64)
    d = torch.tensor([0.0625], dtype=torch.float64)
    seen = []

    def recording(x, s):
        seen.append(float(s[0]))
        return torch.zeros_like(x)

    catch_up_targets(recording, x, t, d, PAPER_RK3, 3, T_MIN)
    assert min(seen) == pytest.approx(T_MIN)


def written_out_targets(velocity, x, t, d, integrator, heads):
    """CUD's targets y_j = v(x_t - j Δ slope, t - j Δ), j = 1..heads, with the catch-up slope of
    each integrator written out (times clamped at T_MIN), independently of the plugin's tableaus:
    euler k1; rk2 (Heun) (k1 + k2) / 2; rk3 the paper's 5/12 k1 + 2/3 k2 - 1/12 k3 with k3 at
    x_t - Δ (7/4 k1 + 1/4 k2), t - 2Δ."""
    dd = d.view(-1, 1)
    at = lambda s: s.clamp_min(T_MIN)  # noqa: E731
    k1 = velocity(x, at(t))
    if integrator == "euler":
        slope = k1
    else:
        k2 = velocity(x - dd * k1, at(t - d))
        if integrator == "rk2":
            slope = (k1 + k2) / 2
        else:
            k3 = velocity(x - dd * (7 / 4 * k1 + 1 / 4 * k2), at(t - 2 * d))
            slope = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
    return [velocity(x - j * dd * slope, at(t - j * d)) for j in range(1, heads + 1)]


class FieldStudent(nn.Module):
    """A multi-head 'network': head j = field * (1 + scale_j), counting passes with and without grad."""

    def __init__(self, heads):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.0, 0.2, heads, dtype=torch.float64))
        self.with_grad = 0
        self.no_grad = 0

    def _count(self):
        if torch.is_grad_enabled():
            self.with_grad += 1
        else:
            self.no_grad += 1

    def forward(self, x, t, cond=None, head=0):
        if head == "all":  # every head from one pass, as MultiHeadStudent
            return self.all_heads(x, t, cond)
        self._count()
        return field(x, t) * (1 + self.scale[head])

    def all_heads(self, x, t, cond=None):
        self._count()
        return [field(x, t) * (1 + s) for s in self.scale]


@pytest.mark.parametrize("integrator,heads,no_grad", [("euler", 1, 2), ("rk2", 2, 4), ("rk3", 3, 6)])
def test_loss_matches_formula_and_counts_network_evaluations(registries, integrator, heads, no_grad):
    method_cls = registries.methods.get("cud")
    method = method_cls(method_cls.config_class(), make_context(registries, integrator))
    assert method.heads == heads
    assert method.network_evals_per_step() == {"with_grad": 1, "no_grad": no_grad}
    student = FieldStudent(heads)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = method.loss(student, Batch(x0), torch.Generator().manual_seed(7), step=0)
    assert (student.with_grad, student.no_grad) == (1, no_grad)

    # The same draws, in the order the loss documents: eps, then t, then Δ.
    generator = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.rand(64, generator=generator, dtype=torch.float64) * (1 - T_MIN) + T_MIN
    delta = torch.rand(64, generator=generator, dtype=torch.float64) / 16
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_star = eps - x0
    main = lambda x, s: field(x, s) * (1 + student.scale[0].detach())
    targets = written_out_targets(main, x_t, t, delta, integrator, heads)
    near = (t < T_MIN + heads * delta)[:, None]
    expected = 0.0
    for j in range(heads):
        p = field(x_t, t) * (1 + student.scale[j].detach())
        y = torch.where(near, v_star, targets[j])
        expected += ((p - y) ** 2).mean() + ((p - v_star) ** 2).mean()
    assert float(output.loss.detach()) == pytest.approx(float(expected), rel=1e-10)
    assert output.loss.requires_grad
    assert 0.0 < output.metrics["boundary_fraction"] < 1.0


def test_rk3_can_mean_kutta_when_asked(registries):
    method_cls = registries.methods.get("cud")
    config = method_cls.config_class(paper_rk3=False)
    method = method_cls(config, make_context(registries, "rk3"))
    assert method.tableau is registries.integrators.get("rk3")
    paper = method_cls(method_cls.config_class(), make_context(registries, "rk3"))
    assert paper.tableau.b == pytest.approx((5 / 12, 2 / 3, -1 / 12))


def test_student_heads_share_the_trunk_and_sample_from_the_last_head(registries):
    backbone_cls = registries.backbones.get("mlp")
    backbone = backbone_cls.build(backbone_cls.config_class(), DataSpec((2,)))
    method_cls = registries.methods.get("cud")
    method = method_cls(method_cls.config_class(), make_context(registries, "rk3"))
    student = method.build_student(backbone)
    assert student.num_heads == 3
    x, t = torch.randn(5, 2), torch.rand(5)
    heads = student.all_heads(x, t)
    torch.testing.assert_close(heads[0], backbone(x, t))
    torch.testing.assert_close(method.velocity_fn(student)(x, t), heads[2])
    # A new head starts close to zero (weights initialised at scale 1e-5).
    assert heads[2].abs().max() < 1e-2


def test_sample_head_out_of_range_is_a_config_error(registries):
    method_cls = registries.methods.get("cud")
    with pytest.raises(distillkit.ConfigError, match="sample_head"):
        method_cls(method_cls.config_class(sample_head=2), make_context(registries, "rk2"))


def test_paper_rk3_is_second_order_as_a_one_step_method():
    # Order conditions written out: sum b c = 1/2 holds, sum b a c = 1/6 does not.
    b, c, a = PAPER_RK3.b, PAPER_RK3.c, PAPER_RK3.a
    assert sum(bi * ci for bi, ci in zip(b, c)) == pytest.approx(0.5)
    third = sum(b[i] * a[i][j] * c[j] for i in range(3) for j in range(3))
    assert not math.isclose(third, 1 / 6)
    assert PAPER_RK3.order == 2
