"""Progressive distillation (velocity space) and OT-CFM against closed forms written out here: the
two-Euler-step target of a linear teacher, and the optimal pairing found by brute force."""

import itertools

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext
from distillkit_otcfm import ot_permutation
from distillkit_progressive import two_step_target


def build(name, teacher=None, **options):
    registries = distillkit.get_registries()
    cls = registries.methods.get(name)
    context = MethodContext(data=DataSpec((2,)), integrator=registries.integrators.get("euler"), integrator_name="euler",
                            total_steps=10, integrators=registries.integrators, teacher=teacher)
    return cls(cls.config_class(**options), context)


class LinearTeacher:
    identity = "linear"
    a, b = -0.8, 0.3

    def __init__(self):
        self.calls = 0

    def velocity(self, x, t, cond=None):
        self.calls += 1
        return self.a * x + self.b * t.view(-1, 1)


def linear_pd_target(x, t, h, a=LinearTeacher.a, b=LinearTeacher.b):
    """Two Euler steps of v = a x + b t from (x, t), solved by hand:
    (x - x'') / 2h = x (a - a^2 h / 2) + b t (1 - a h / 2) - b h / 2."""
    return x * (a - a * a * h / 2) + b * t * (1 - a * h / 2) - b * h / 2


def test_two_step_target_of_a_linear_teacher():
    x = torch.randn(10, 2, dtype=torch.float64)
    t = torch.rand(10, dtype=torch.float64) * 0.8 + 0.2
    target = two_step_target(LinearTeacher().velocity, x, t, 0.0625)
    torch.testing.assert_close(target, linear_pd_target(x, t[:, None], 0.0625))


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        self.seen_t = None

    def forward(self, x, t, cond=None):
        self.seen_t = t.detach().clone()
        return self.w * x


@pytest.mark.parametrize("grid_only", [False, True])
def test_pd_loss_regresses_the_two_step_target_on_the_teachers_grid(grid_only):
    teacher = LinearTeacher()
    pd = build("pd", teacher, teacher_steps=8, student_grid_only=grid_only)
    x0 = torch.randn(400, 2, dtype=torch.float64)
    field = Field()
    out = pd.loss(field, Batch(x0), torch.Generator().manual_seed(4), 0)
    assert teacher.calls == 2 and pd.network_evals_per_step() == {"with_grad": 1, "no_grad": 2}
    generator = torch.Generator().manual_seed(4)
    eps = torch.randn(400, 2, generator=generator, dtype=torch.float64)
    t = field.seen_t
    steps = (t * 8).round()
    assert torch.allclose(t * 8, steps)
    allowed = {2, 4, 6, 8} if grid_only else set(range(2, 9))
    assert set(steps.long().tolist()) == allowed
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    expected = ((0.2 * x_t - linear_pd_target(x_t, t[:, None], 1 / 8)) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert pd.tags()["distillkit.pd.student_steps"] == "4"


def test_pd_teacher_steps_must_be_even():
    with pytest.raises(distillkit.ConfigError, match="teacher_steps"):
        distillkit.get_registries().methods.get("pd").config_class(teacher_steps=5)


@pytest.mark.parametrize("seed", range(5))
def test_ot_pairing_is_the_brute_force_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    cost = lambda perm: sum(float(((x[i] - eps[j]) ** 2).sum()) for i, j in enumerate(perm))  # noqa: E731
    best = min(itertools.permutations(range(6)), key=cost)
    found = ot_permutation(x, eps).tolist()
    assert sorted(found) == list(range(6))
    assert cost(found) == pytest.approx(cost(best), rel=1e-9)


def test_otcfm_loss_is_fm_on_the_ot_pairs():
    otcfm = build("otcfm")
    x0 = torch.randn(12, 2, dtype=torch.float64)
    field = Field()
    out = otcfm.loss(field, Batch(x0), torch.Generator().manual_seed(9), 0)
    generator = torch.Generator().manual_seed(9)
    eps = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    t = torch.rand(12, generator=generator, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    cost = lambda perm: sum(float(((x0[i] - eps[j]) ** 2).sum()) for i, j in enumerate(perm))  # noqa: E731
    # brute force over 12! is too many; the assignment is checked above, here we check its use
    perm = ot_permutation(x0, eps)
    paired = eps[perm]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * paired
    expected = ((0.2 * x_t - (paired - x0)) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert out.metrics["transport_cost"] == pytest.approx(cost(perm.tolist()) / 12)
    assert out.metrics["transport_cost"] <= out.metrics["transport_cost_independent"]
