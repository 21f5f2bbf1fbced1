"""Consistency distillation / training (plugins/distillkit_consistency) against closed forms written
out independently here: the EDM coefficients in their variance-exploding form, the boundary
condition, the grids (CM's sigma grid, the default, and the grid in t), the start from noise above
the sigma grid's t_max, old configs keeping the t grid, the CT schedules, the losses, the target
network, the sampler and the cd / ct recipes."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext, NoOptions, PrepareContext, SamplerContext
from distillkit.config import build_attrs, to_dict
from distillkit_consistency import (
    ConsistencyFunction,
    distance,
    edm_coefficients,
    num_points,
    rk_step_per_sample,
    sigma_grid,
    target_rate,
    time_grid,
)

T_MIN, SIGMA_D = 0.002, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def cm_grid(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
    """Consistency models' sigma_i (Song et al. 2023, from EDM) mapped by t = sigma / (1 + sigma),
    written out here in plain floats."""
    sigmas = [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
              for i in range(n)]
    return [s / (1 + s) for s in sigmas]


def t_grid(n, t_min=T_MIN, t_max=1.0, rho=7.0):
    """distillkit's grid before the sigma grid: the same schedule directly in t."""
    return [(t_max ** (1 / rho) + i / (n - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho for i in range(n)]


GRIDS = {"sigma": cm_grid, "t": t_grid}


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


@pytest.mark.parametrize("grid", ["sigma", "t"])
@pytest.mark.parametrize("parameterization", ["edm", "velocity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_holds_bit_for_bit(grid, parameterization, dtype):
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher(), grid=grid, parameterization=parameterization)
    f = cd.build_student(mlp()).to(dtype)
    x = torch.randn(64, 2, dtype=dtype) * 3
    last = cd.grid[-1].to(dtype)  # the grid's last point, as the loss sees it
    assert f.t_min == {"sigma": SIGMA_MIN / (1 + SIGMA_MIN), "t": T_MIN}[grid]
    assert torch.equal(f(x, last.expand(64)), x)
    assert torch.equal(f(x, torch.full((64,), f.t_min, dtype=dtype)), x)
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
    assert method("cd", LinearTeacher(), grid="t").grid.tolist() == grid.tolist()


def test_the_default_grid_is_consistency_models_sigma_grid():
    grid = method("cd", LinearTeacher()).grid  # default: grid = sigma, N = 18
    assert grid.tolist() == pytest.approx(cm_grid(18), rel=1e-12)
    # The ends exactly: sigma_max = 80 is t = 80/81, sigma_min = 0.002 is t = 0.002/1.002.
    assert grid[0].item() == 80 / 81 and grid[-1].item() == 0.002 / 1.002
    # The values issue 17 quotes, t_0 = 80/81 the top: t_1 = 0.9829, t_10 = 0.5211.
    assert grid[1].item() == pytest.approx(0.9829, abs=5e-5) and grid[10].item() == pytest.approx(0.5211, abs=5e-5)
    # 11 of the 17 intervals [t_{i+1}, t_i] reach above t = 0.5 (the t grid: 3), so cd trains
    # mostly at high noise, as consistency models do.
    upper_above_half = lambda points: sum(t > 0.5 for t in points[:-1])  # noqa: E731
    assert upper_above_half(grid.tolist()) == 11 and upper_above_half(t_grid(18)) == 3


@pytest.mark.parametrize("points", [2, 3, 18, 151])
def test_the_sigma_grid_keeps_its_ends_for_every_number_of_points(points):
    # ct's curriculum changes N(k) during training; the grid must stay CM's at every N.
    grid = sigma_grid(points, 7.0, SIGMA_MIN, SIGMA_MAX)
    assert grid.tolist() == pytest.approx(cm_grid(points), rel=1e-12)
    assert grid[0].item() == 80 / 81 and grid[-1].item() == 0.002 / 1.002
    assert bool((grid[1:] < grid[:-1]).all())
    assert sigma_grid(3, 1.0, 1.0, 3.0).tolist() == pytest.approx([3 / 4, 2 / 3, 1 / 2])  # rho = 1: uniform in sigma
    with pytest.raises(ValueError, match="at least 2"):
        sigma_grid(1, 7.0, SIGMA_MIN, SIGMA_MAX)


# ------------------------------------------------------------------------------------------------
# the grid option


def test_grid_options_resolve_to_the_grids_ends():
    cls = distillkit.get_registries().methods.get("cd").config_class
    sigma = cls()
    assert (sigma.grid, sigma.sigma_min, sigma.sigma_max) == ("sigma", SIGMA_MIN, SIGMA_MAX)
    assert (sigma.t_min, sigma.t_max) == (SIGMA_MIN / (1 + SIGMA_MIN), SIGMA_MAX / (1 + SIGMA_MAX))
    assert cls(sigma_min=0.01, sigma_max=20.0).t_max == 20 / 21
    old = cls(grid="t")
    assert (old.t_min, old.t_max, old.sigma_min, old.sigma_max) == (T_MIN, 1.0, None, None)
    # A resolved config names every option: re-reading it gives the same config (checkpoints).
    for config in (sigma, old, cls(sigma_max=40.0), cls(grid="t", t_max=0.9)):
        tree = {k: v for k, v in to_dict(config).items() if v is not None}
        assert build_attrs(cls, tree, "method_options.") == config


@pytest.mark.parametrize("name", ["cd", "ct"])
def test_a_config_from_before_the_grid_option_keeps_the_t_grid(name):
    # Before the sigma grid, every resolved config named t_min and t_max and no grid.
    cls = distillkit.get_registries().methods.get(name).config_class
    tree = {k: v for k, v in to_dict(cls(grid="t")).items() if k not in ("grid", "sigma_min", "sigma_max")}
    assert set(tree) >= {"t_min", "t_max", "rho"}
    assert build_attrs(cls, tree, "method_options.") == cls(grid="t")
    assert cls(t_min=0.01).grid == "t" and cls(t_max=0.9).grid == "t" and cls(sigma_max=40.0).grid == "sigma"


@pytest.mark.parametrize("options,key,allowed", [
    ({"grid": "karras"}, "grid", "one of sigma, t"),
    ({"sigma_min": 0.0}, "sigma_min", "(0, 1)"),
    ({"sigma_min": 1.5}, "sigma_min", "(0, 1)"),
    ({"sigma_max": 0.5}, "sigma_max", ">= 1"),
    ({"sigma_max": math.inf}, "sigma_max", "finite"),
    ({"grid": "sigma", "t_max": 0.9}, "t_max", "unset under grid = sigma"),
    ({"grid": "sigma", "t_min": 0.002}, "t_min", "set sigma_min, or grid = t"),
    ({"t_min": 0.002, "sigma_max": 80.0}, "sigma_max", "unset under grid = t"),
    ({"grid": "t", "sigma_min": 0.002}, "sigma_min", "unset under grid = t"),
])
def test_bad_grid_options_are_one_line_config_errors(options, key, allowed):
    cls = distillkit.get_registries().methods.get("cd").config_class
    with pytest.raises(distillkit.ConfigError) as raised:
        build_attrs(cls, options, "method_options.")
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"method_options.{key}=") and allowed in message


# ------------------------------------------------------------------------------------------------
# the start: pure noise at t = 1, above the sigma grid's t_max = 80/81


@pytest.mark.parametrize("parameterization", ["edm", "velocity"])
def test_above_t_max_f_starts_from_the_noise_scaled_onto_t_max(parameterization):
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher(), parameterization=parameterization)
    f = cd.build_student(mlp()).double()
    t_max = SIGMA_MAX / (1 + SIGMA_MAX)
    noise = torch.randn(16, 2, dtype=torch.float64)
    c_skip, c_out = f.coefficients(torch.full((16,), t_max, dtype=torch.float64))
    # CM's x_T = sigma_max z is t_max z here (x_t / (1 - t) = x + sigma eps): f at t = 1 is f there.
    start = t_max * noise
    expected = c_skip[:, None] * start + c_out[:, None] * f.backbone(start, torch.full((16,), t_max, dtype=torch.float64))
    torch.testing.assert_close(f(noise, torch.ones(16, dtype=torch.float64)), expected, rtol=1e-12, atol=1e-12)
    # Between t_max and 1: (t_max / t) x at t_max; at and below t_max f is the formula itself, bit for bit.
    t = torch.tensor([0.999] * 8 + [t_max] * 4 + [0.5] * 4, dtype=torch.float64)
    scale = torch.where(t > t_max, t_max / t, torch.ones_like(t))[:, None]
    inner = torch.minimum(t, torch.tensor(t_max, dtype=torch.float64))
    c_skip, c_out = f.coefficients(inner)
    expected = c_skip[:, None] * scale * noise + c_out[:, None] * f.backbone(scale * noise, inner)
    torch.testing.assert_close(f(noise, t), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(f(noise, t)[8:], (c_skip[:, None] * noise + c_out[:, None] * f.backbone(noise, inner))[8:])


def test_one_step_and_multistep_sampling_start_at_t_max():
    torch.manual_seed(0)
    cd = method("cd", LinearTeacher())
    f = cd.build_student(mlp()).eval()
    t_max = SIGMA_MAX / (1 + SIGMA_MAX)
    noise = torch.randn(32, 2)
    at = lambda t: torch.full((32,), t)  # noqa: E731
    registries = distillkit.get_registries()
    sampler = registries.samplers.get("consistency")(NoOptions(), SamplerContext(integrator=registries.integrators.get("euler")))
    with torch.no_grad():
        one_step = f(t_max * noise, at(t_max))
        model = cd.sampling_model(f)
        # The consistency sampler (NFE 1 and 2, uniform grid) and Euler on the implied velocity.
        torch.testing.assert_close(sampler.sample(model, noise, distillkit.uniform_grid(1), None), one_step)
        z = torch.randn(32, 2)
        a, b = (1 - 0.5) / (1 - f.t_min), math.sqrt(0.25 - ((1 - 0.5) / (1 - f.t_min) * f.t_min) ** 2)
        two_steps = sampler.sample(model, noise, distillkit.uniform_grid(2), lambda k: z)
        torch.testing.assert_close(two_steps, f(a * one_step + b * z, at(0.5)))
        euler = distillkit.integrate(cd.velocity_fn(f), noise, distillkit.uniform_grid(1), "euler")
        torch.testing.assert_close(euler, one_step, rtol=0, atol=1e-6)


def test_the_t_grid_samples_as_before_the_sigma_grid():
    # grid = t (every older run): no start rule, f at t = 1 is the formula at t = 1 (c_skip = 0).
    torch.manual_seed(0)
    f = method("cd", LinearTeacher(), grid="t").build_student(mlp()).double()
    assert f.t_max == 1.0
    noise = torch.randn(8, 2, dtype=torch.float64)
    ones = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(f(noise, ones), SIGMA_D * f.backbone(noise, ones), rtol=1e-12, atol=1e-12)
    # ... and so does a t grid with t_max < 1 (the rule would change its old samples).
    f = method("cd", LinearTeacher(), grid="t", t_max=0.9).build_student(mlp())
    assert f.t_max == 1.0


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


@pytest.mark.parametrize("grid_name", ["sigma", "t"])
def test_cd_loss_is_one_heun_step_of_the_teacher_then_the_consistency_distance(grid_name):
    teacher = LinearTeacher()
    cd = method("cd", teacher, num_points=6, grid=grid_name)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    f = Recording()
    out = cd.loss(f, Batch(x0), torch.Generator().manual_seed(3), 0)
    assert teacher.calls == 2  # heun: two stages
    eps, index = draws(3, 16, 6)
    grid = GRIDS[grid_name](6)
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


@pytest.mark.parametrize("grid_name", ["sigma", "t"])
@pytest.mark.parametrize("step", [0, 50])
def test_ct_loss_uses_the_same_noise_at_both_times(grid_name, step):
    ct = method("ct", total_steps=100, distance="l1", grid=grid_name)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    f = Recording()
    ct.prepare(f, None)
    points = num_points(step, 100, 2, 150)  # N(k): 2, then 107 (the curriculum)
    out = ct.loss(f, Batch(x0), torch.Generator().manual_seed(5), step)
    assert out.metrics["num_points"] == points
    eps, index = draws(5, 16, points)
    grid = torch.tensor(GRIDS[grid_name](points), dtype=torch.float64)
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


@pytest.mark.parametrize("name", ["cd", "ct"])
def test_a_checkpoint_from_before_the_grid_option_loads_with_the_t_grid(name, tmp_path):
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.trained import CONVENTION
    from distillkit.training.build import build_model
    from distillkit.training.checkpoint import FORMAT, VERSION, save_atomic

    tree = {"method": name, "dataset": "toy2d", "backbone_options": {"hidden": 16}, "runs_dir": str(tmp_path),
            "teacher": "toy2d-exact" if name == "cd" else "",
            "method_options": {"grid": "t"}}
    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    _, network = build_model(resolved, DataSpec((2,)), torch.device("cpu"), seed=0)
    config = resolved.to_dict()
    for key in ("grid", "sigma_min", "sigma_max"):  # what a run from before the option recorded
        del config["method_options"][key]
    state = network.state_dict()
    path = save_atomic({"format": FORMAT, "version": VERSION, "convention": CONVENTION, "config": config,
                        "data_spec": {"shape": [2], "num_classes": None}, "run_id": None, "step": 1,
                        "student": state, "ema": state, "emas": {}}, tmp_path / "old" / "checkpoint.pt")
    trained = distillkit.load_trained_model(path)
    assert trained.method.config == resolved.method_config and trained.method.config.grid == "t"
    assert (trained.model.t_min, trained.model.t_max) == (T_MIN, 1.0)
    # Its one-step sample is f at t = 1 itself (edm: c_skip = 0, c_out = sigma_d), as it was.
    noise = torch.randn(8, 2)
    with torch.no_grad():
        expected = SIGMA_D * trained.model.backbone(noise, torch.ones(8))
        torch.testing.assert_close(trained.sampling_model().denoise(noise, torch.ones(8)), expected)


# ------------------------------------------------------------------------------------------------
# recipes


from test_cud_recipes import resolves_with_every_value  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("c[dt]-*.toml"))


def test_there_are_cd_and_ct_recipes_for_mnist_and_cifar10():
    assert {f.stem for f in RECIPES} == {"cd-cifar10", "cd-mnist", "ct-cifar10", "ct-mnist"}


@pytest.mark.parametrize("path", RECIPES, ids=[f.stem for f in RECIPES])
def test_recipe_resolves_with_the_values_it_sets_on_cms_sigma_grid(capsys, path, tmp_path):
    out = resolves_with_every_value(capsys, path, tmp_path)
    options = out["method_options"]
    assert (options["grid"], options["sigma_min"], options["sigma_max"], options["rho"]) == ("sigma", 0.002, 80.0, 7.0)
    assert options["t_max"] == 80 / 81
