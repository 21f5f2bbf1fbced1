"""Consistency distillation / training (plugins/distillkit_consistency) against closed forms written
out independently here: the EDM coefficients in their variance-exploding form, the boundary
condition, the Karras grid, the CT schedules, the losses, the target network and the sampler."""

import math

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext, PrepareContext
from distillkit_consistency import (
    ConsistencyFunction,
    distance,
    edm_coefficients,
    num_points,
    rk_step_per_sample,
    target_rate,
    time_grid,
)

T_MIN, SIGMA_D = 0.002, 0.5


def edm_in_sigma(t, t_min=T_MIN, sigma_d=SIGMA_D):
    """Karras et al.'s c_skip, c_out at the VE noise level sigma = u / (1 - u) of the time u measured
    from t_min; c_skip acts on the VE variable y = x_u / (1 - u), hence the 1 / (1 - u) here."""
    u = (t - t_min) / (1 - t_min)
    sigma = u / (1 - u)
    c_skip_ve = sigma_d**2 / (sigma**2 + sigma_d**2)
    c_out_ve = sigma * sigma_d / math.sqrt(sigma**2 + sigma_d**2)
    return c_skip_ve / (1 - u), c_out_ve


def mlp(dim=2, dropout=0.0, hidden=16):
    cls = distillkit.get_registries().backbones.get("mlp")
    return cls.build(cls.config_class(hidden=hidden, layers=1, time_embedding_dim=8, dropout=dropout), DataSpec((dim,)))


def context(teacher=None, total_steps=100):
    registries = distillkit.get_registries()
    return MethodContext(data=DataSpec((2,)), integrator=registries.integrators.get("euler"), integrator_name="euler",
                         total_steps=total_steps, integrators=registries.integrators, teacher=teacher)


def method(name, teacher=None, total_steps=100, **options):
    cls = distillkit.get_registries().methods.get(name)
    return cls(cls.config_class(**options), context(teacher, total_steps))


class LinearTeacher:
    """v(x, t) = a x + b t: an analytic stand-in for a trained teacher."""

    identity = "linear"

    def __init__(self, a=-0.7, b=0.4):
        self.a, self.b = a, b
        self.calls = 0

    def velocity(self, x, t, cond=None):
        self.calls += 1
        return self.a * x + self.b * t.view(-1, *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# parameterisation


@pytest.mark.parametrize("t", [0.01, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_edm_coefficients_are_karras_preconditioning_with_origin_at_t_min(t):
    c_skip, c_out = edm_coefficients(torch.tensor([t], dtype=torch.float64), T_MIN, SIGMA_D)
    expected_skip, expected_out = edm_in_sigma(t)
    assert float(c_skip) == pytest.approx(expected_skip, rel=1e-12)
    assert float(c_out) == pytest.approx(expected_out, rel=1e-12)


def test_edm_coefficients_at_the_ends():
    c_skip, c_out = edm_coefficients(torch.tensor([T_MIN, 1.0]), T_MIN, SIGMA_D)
    assert c_skip.tolist() == [1.0, 0.0] and c_out.tolist() == [0.0, SIGMA_D]


@pytest.mark.parametrize("parameterization", ["edm", "velocity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_holds_bit_for_bit(parameterization, dtype):
    torch.manual_seed(0)
    f = ConsistencyFunction(mlp(), parameterization, T_MIN, SIGMA_D).to(dtype)
    x = torch.randn(64, 2, dtype=dtype) * 3
    grid = time_grid(18, 7.0, T_MIN, 1.0).to(dtype)  # the grid's last point, as the loss sees it
    assert torch.equal(f(x, grid[-1].expand(64)), x)
    assert torch.equal(f(x, torch.full((64,), T_MIN, dtype=dtype)), x)
    assert torch.equal(f(x, torch.zeros(64, dtype=dtype)), x)  # below t_min f is the identity too
    assert not torch.allclose(f(x, torch.full((64,), 0.5, dtype=dtype)), x)


def test_velocity_parameterization_is_one_euler_step_to_t_min():
    torch.manual_seed(0)
    backbone = mlp()
    f = ConsistencyFunction(backbone, "velocity", T_MIN, SIGMA_D)
    x, t = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    torch.testing.assert_close(f(x, t), x - (t - T_MIN)[:, None] * backbone(x, t))


def test_edm_parameterization_combines_skip_and_network():
    torch.manual_seed(0)
    backbone = mlp()
    f = ConsistencyFunction(backbone, "edm", T_MIN, SIGMA_D)
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    f.double()
    coefficients = [edm_in_sigma(float(s)) if s < 1 else (0.0, SIGMA_D) for s in t]
    skip = torch.tensor([c[0] for c in coefficients], dtype=torch.float64)[:, None]
    out = torch.tensor([c[1] for c in coefficients], dtype=torch.float64)[:, None]
    torch.testing.assert_close(f(x, t), skip * x + out * backbone(x, t))


def test_implied_velocity_makes_one_euler_step_the_consistency_sample():
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher())
    f = cd.build_student(mlp())
    noise = torch.randn(32, 2)
    velocity = cd.velocity_fn(f)
    one_step = distillkit.integrate(velocity, noise, distillkit.uniform_grid(1), "euler")
    torch.testing.assert_close(one_step, f(noise, torch.ones(32)), rtol=0, atol=1e-6)
    # Two Euler steps: x_s = (s/t) x_t + (1 - s/t) f(x_t, t), the model's own noise re-used.
    x_half = 0.5 * noise + 0.5 * f(noise, torch.ones(32))
    two_steps = distillkit.integrate(velocity, noise, distillkit.uniform_grid(2), "euler")
    torch.testing.assert_close(two_steps, f(x_half, torch.full((32,), 0.5)), rtol=0, atol=1e-5)
    # At and below t_min the velocity is 0, never 0/0.
    assert torch.equal(velocity(noise, torch.zeros(32)), torch.zeros_like(noise))


def test_karras_grid_in_t():
    grid = time_grid(18, 7.0, T_MIN, 1.0)
    expected = [(1 + i / 17 * (T_MIN ** (1 / 7) - 1)) ** 7 for i in range(18)]
    assert grid.tolist() == pytest.approx(expected, rel=1e-12)
    assert grid[0].item() == 1.0 and grid[-1].item() == T_MIN
    assert time_grid(5, 1.0, 0.2, 1.0).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


# ------------------------------------------------------------------------------------------------
# consistency training's curriculum


@pytest.mark.parametrize("k,points", [(0, 2), (1, 3), (200_000, 76), (400_000, 107), (800_000, 151), (900_000, 151)])
def test_ct_number_of_points(k, points):
    # CIFAR-10: s0 = 2, s1 = 150, K = 800k. By hand: k = K/2 gives sqrt(22797/2 + 4) = 106.78 -> 107.
    assert num_points(k, 800_000, 2, 150) == points
    expected = math.ceil(math.sqrt(min(k, 800_000) / 800_000 * (151**2 - 4) + 4) - 1) + 1
    assert points == max(expected, 2)


@pytest.mark.parametrize("k,mu", [(0, 0.81), (400_000, 0.9 ** (2 / 106)), (800_000, 0.9 ** (2 / 150))])
def test_ct_target_rate(k, mu):
    # mu(k) = exp(s0 ln mu0 / (N(k) - 1)) = mu0^(s0 / (N(k) - 1))
    assert target_rate(k, 800_000, 2, 150, 0.9) == pytest.approx(mu, rel=1e-12)


def test_ct_schedule_follows_the_runs_total_steps():
    ct = method("ct", total_steps=1000)
    assert ct.schedule(0) == (2, pytest.approx(0.81))
    assert ct.schedule(1000)[0] == 151
    assert [ct.schedule(k)[0] for k in (0, 250, 500, 999)] == sorted(ct.schedule(k)[0] for k in (0, 250, 500, 999))


# ------------------------------------------------------------------------------------------------
# the losses


@pytest.mark.parametrize("kind", ["l2", "l1", "pseudo-huber"])
def test_distances(kind):
    a, b = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    d = (a - b).reshape(4, 6)
    expected = {
        "l2": (d**2).mean(1),
        "l1": d.abs().mean(1),
        "pseudo-huber": ((d**2).sum(1) + (0.00054 * math.sqrt(6)) ** 2).sqrt() - 0.00054 * math.sqrt(6),
    }[kind]
    torch.testing.assert_close(distance(a, b, kind), expected)
    assert float(distance(a, b, "pseudo-huber", huber_c=0.3)[0]) == pytest.approx(
        math.sqrt(float((d[0] ** 2).sum()) + 0.09) - 0.3)


@pytest.mark.parametrize("name", ["euler", "heun", "midpoint", "rk3", "ralston3", "rk4"])
def test_per_sample_step_equals_the_cores_step(name):
    tableau = distillkit.get_registries().integrators.get(name)
    field = lambda x, t: torch.sin(x) * (1 + t.view(-1, 1)) - 0.3 * x  # noqa: E731
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    h = torch.tensor([-0.1, -0.05, -0.2], dtype=torch.float64)
    out = rk_step_per_sample(field, x, t, h, tableau)
    from distillkit.integrators import rk_step

    for n in range(3):
        one = rk_step(lambda y, s: field(y, s), x[n:n + 1], float(t[n]), float(h[n]), tableau)
        torch.testing.assert_close(out[n:n + 1], one)


class Recording(nn.Module):
    """f(x, t) = x * w + t: a 'consistency function' that records its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.8, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return x * self.w + t.view(-1, 1)


def draws(seed, n, points):
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    index = torch.randint(0, points - 1, (n,), generator=generator)
    return eps, index


def test_cd_loss_is_one_heun_step_of_the_teacher_then_the_consistency_distance():
    teacher = LinearTeacher()
    cd = method("cd", teacher, num_points=6)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    f = Recording()
    out = cd.loss(f, Batch(x0), torch.Generator().manual_seed(3), 0)
    assert teacher.calls == 2  # heun: two stages
    eps, index = draws(3, 16, 6)
    grid = [(1 + i / 5 * (T_MIN ** (1 / 7) - 1)) ** 7 for i in range(6)]
    t_a = torch.tensor([grid[i] for i in index], dtype=torch.float64)[:, None]
    t_b = torch.tensor([grid[i + 1] for i in index], dtype=torch.float64)[:, None]
    x_a = (1 - t_a) * x0 + t_a * eps
    h = t_b - t_a
    k1 = -0.7 * x_a + 0.4 * t_a
    k2 = -0.7 * (x_a + h * k1) + 0.4 * t_b
    x_b = x_a + h * (k1 + k2) / 2
    online = x_a * 0.8 + t_a
    target = x_b * 0.8 + t_b
    assert float(out.loss.detach()) == pytest.approx(float(((online - target) ** 2).mean()), rel=1e-12)
    (target_call, online_call) = f.calls  # the target under no_grad, the online pass with grad
    assert target_call[2] is False and online_call[2] is True
    torch.testing.assert_close(target_call[0], x_b)
    assert out.loss.requires_grad
    assert cd.network_evals_per_step() == {"with_grad": 1, "no_grad": 3}


def test_ct_loss_uses_the_same_noise_at_both_times():
    ct = method("ct", total_steps=100, distance="l1")
    x0 = torch.randn(16, 2, dtype=torch.float64)
    f = Recording()
    ct.prepare(f, None)
    step = 50
    points = num_points(step, 100, 2, 150)
    out = ct.loss(f, Batch(x0), torch.Generator().manual_seed(5), step)
    assert out.metrics["num_points"] == points
    eps, index = draws(5, 16, points)
    grid = time_grid(points, 7.0, T_MIN, 1.0)
    t_a, t_b = grid[index][:, None], grid[index + 1][:, None]
    online = ((1 - t_a) * x0 + t_a * eps) * 0.8 + t_a
    target = ((1 - t_b) * x0 + t_b * eps) * 0.8 + t_b
    assert float(out.loss.detach()) == pytest.approx(float((online - target).abs().mean()), rel=1e-12)


def test_target_network_moves_at_rate_mu_and_is_saved():
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher(), target_rate=0.9)
    f = cd.build_student(mlp())
    cd.prepare(f, PrepareContext(device="cpu", dataset=None, output_dir=".", log_artifact=lambda *a: None))
    before = {k: v.clone() for k, v in cd.target.state_dict().items()}
    with torch.no_grad():
        for p in f.parameters():
            p.add_(1.0)
    cd.after_step(f, 0)
    online = f.state_dict()
    for key, value in cd.target.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key])
    assert set(cd.state_dict()) == {"target"}
    assert not any(p.requires_grad for p in cd.target.parameters())
    # mu = 0 (the default, P10): no copy, the online network is the target.
    plain = method("cd", LinearTeacher())
    plain.prepare(f, None)
    assert plain.target is None and plain.state_dict() == {}


def test_ct_target_uses_the_scheduled_rate():
    torch.manual_seed(0)
    ct = method("ct", total_steps=10)
    f = ct.build_student(mlp())
    ct.prepare(f, None)
    before = {k: v.clone() for k, v in ct.target.state_dict().items()}
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(2.0)
    ct.after_step(f, 7)
    mu = target_rate(7, 10, 2, 150, 0.9)
    for key, value in ct.target.state_dict().items():
        torch.testing.assert_close(value, mu * before[key] + (1 - mu) * f.state_dict()[key])


def test_online_and_target_passes_see_the_same_dropout():
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher())
    f = cd.build_student(mlp(dropout=0.5, hidden=64)).train()
    outputs = []
    f.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    x = torch.randn(8, 2)
    # Same input at both times: index 0 -> grid points t_0 and t_1; call the loss's two passes directly.
    cd._consistency_loss(f, x, torch.full((8,), 0.5), x, torch.full((8,), 0.5), None, {})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# sampling (the multistep sampler itself is the registered ``consistency`` sampler: test_samplers.py)


def test_cd_and_ct_sample_with_the_consistency_sampler_by_default():
    methods = distillkit.get_registries().methods
    for name in ("cd", "ct"):
        assert methods.get(name).default_sampler == "consistency"


def test_sampling_model_denoises_with_the_consistency_function_at_the_students_t_min():
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher(), t_min=0.01)
    f = cd.build_student(mlp()).eval()
    noise = torch.randn(4, 2)
    model = cd.sampling_model(f)
    assert model.t_min == 0.01
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(noise, torch.ones(4)), f(noise, torch.ones(4)))
        # the ode sampler's velocity is the implied one: one Euler step to 0 is f(x, 1)
        v = model.velocity(noise, torch.ones(4), torch.zeros(4))
        torch.testing.assert_close(noise - v, f(noise, torch.ones(4)), rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line_config_errors():
    cls = distillkit.get_registries().methods.get("cd")
    for key, value in [("distance", "lpips"), ("teacher_integrator", "nope"), ("num_points", 1), ("t_min", 0.0),
                       ("target_rate", 1.0), ("parameterization", "x0")]:
        with pytest.raises(distillkit.ConfigError, match=key):
            cls.config_class(**{key: value})
    with pytest.raises(distillkit.ConfigError, match="s1"):
        distillkit.get_registries().methods.get("ct").config_class(s0=10, s1=5)
