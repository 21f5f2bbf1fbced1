"""sCT / sCD (plugins/distillkit_scm): closed forms written here, independently of the plugin.

The closed form used throughout: data x ~ N(mu, s^2 I) in 2-D. On the straight path
x_t = (1 - t) x + t eps the marginal is N((1 - t) mu, S(t) I), S(t) = (1 - t)^2 s^2 + t^2, the
teacher's velocity is v = E[eps | x_t] - E[x | x_t] with

    E[eps | x_t] = t (x_t - (1 - t) mu) / S,   E[x | x_t] = mu + (1 - t) s^2 (x_t - (1 - t) mu) / S,

and the probability-flow ODE keeps xi = (x_t - (1 - t) mu) / sqrt(S(t)) constant, so its flow map
to t = 0 (the exact consistency function) is f*(x_t, t) = mu + s (x_t - (1 - t) mu) / sqrt(S(t)).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext, NoOptions, SamplerContext, Teacher
from distillkit.config import build_attrs
from distillkit.testing.methods import MethodConformance
from one_step_toys import CountingNetwork
from test_cud_recipes import resolves_with_every_value

from distillkit_scm import (
    ContinuousConsistencyDistillation,
    ContinuousConsistencyTraining,
    SCDConfig,
    SCMConfig,
    angle_from_time,
    consistency_output,
    linear_from_trigflow,
    time_from_angle,
    trigflow_from_linear,
    trigflow_velocity,
)

REGISTRIES = distillkit.get_registries()
MU = torch.tensor([0.7, -0.3], dtype=torch.float64)
SD = 0.6


def marginal_variance(t, s=SD):
    return (1 - t) ** 2 * s**2 + t**2


def gaussian_velocity(x, t):
    tt = t[:, None]
    S = marginal_variance(tt)
    d = x - (1 - tt) * MU
    return tt * d / S - (MU + (1 - tt) * SD**2 * d / S)


class GaussianTeacher(Teacher):
    name = "gaussian-test-teacher"
    identity = "gaussian-test-teacher"

    def velocity(self, x, t, cond=None):
        return gaussian_velocity(x, t)


class GaussianConsistency(torch.nn.Module):
    """f(x, t) = mu' + s' (x - (1 - t) mu') / sqrt((1 - t)^2 s'^2 + t^2), returned as the
    velocity (x - f) / t the plugin reads from a network; exact at (mu', s') = (mu, s)."""

    def __init__(self, s=SD, mu=MU):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(float(s), dtype=torch.float64))
        self.mu = torch.nn.Parameter(mu.clone())

    def consistency(self, x, t):
        tt = t[:, None]
        return self.mu + self.s * (x - (1 - tt) * self.mu) / marginal_variance(tt, self.s).sqrt()

    def forward(self, x, t, cond=None):
        return (x - self.consistency(x, t)) / t[:, None]


def method(cls=ContinuousConsistencyDistillation, teacher=None, **options):
    config_cls = SCDConfig if cls is ContinuousConsistencyDistillation else SCMConfig
    context = MethodContext(data=DataSpec((2,)), integrator=REGISTRIES.integrators.get("euler"),
                            integrator_name="euler", total_steps=100, teacher=teacher)
    return cls(build_attrs(config_cls, options, "method_options."), context)


def gaussian_data(n, seed=0):
    return MU + SD * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- the TrigFlow <-> straight-path mapping -------------------------------------------------------


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 1.7])
def test_mapping_sends_trigflow_points_to_straight_path_points(sigma_data):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    eps = torch.randn(64, 3, dtype=torch.float64, generator=gen)
    s = torch.rand(64, dtype=torch.float64, generator=gen) * math.pi / 2
    x_s = s.cos()[:, None] * x + s.sin()[:, None] * sigma_data * eps  # TrigFlow, z = sigma_d eps
    t = time_from_angle(s, sigma_data)
    torch.testing.assert_close(t, sigma_data * s.sin() / (s.cos() + sigma_data * s.sin()))
    torch.testing.assert_close(t / (1 - t), sigma_data * s.tan())  # EDM's sigma = sigma_d tan s
    x_t = (1 - t)[:, None] * x + t[:, None] * eps
    torch.testing.assert_close(linear_from_trigflow(x_s, s, sigma_data), x_t)
    torch.testing.assert_close(trigflow_from_linear(x_t, t, sigma_data), x_s)
    torch.testing.assert_close(angle_from_time(t, sigma_data), s)
    if sigma_data == 1.0:  # the brief's form: t = sin/(sin + cos), x scaled by 1/(sin + cos)
        torch.testing.assert_close(x_s / (s.sin() + s.cos())[:, None], x_t)


def test_mapping_is_exact_at_the_ends():
    ends = torch.tensor([0.0, math.pi / 2], dtype=torch.float64)
    torch.testing.assert_close(time_from_angle(ends, 0.5), torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(angle_from_time(torch.tensor([0.0, 1.0], dtype=torch.float64), 0.5), ends)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_trigflow_velocity_is_the_chain_rule_and_its_consistency_output_is_the_euler_step_to_zero(sigma_data):
    # Along the Gaussian's exact ODE, d x_s / ds computed by the chain rule from
    # x_s = sigma_d x_t / N(t), s = atan2(t, sigma_d (1 - t)) must equal sigma_d F(v).
    gen = torch.Generator().manual_seed(1)
    t = 0.05 + 0.9 * torch.rand(32, dtype=torch.float64, generator=gen)
    x_t = (1 - t)[:, None] * MU + marginal_variance(t).sqrt()[:, None] * torch.randn(32, 2, dtype=torch.float64, generator=gen)
    v = gaussian_velocity(x_t, t)
    N = (sigma_data**2 * (1 - t) ** 2 + t**2).sqrt()
    dN_dt = (-(sigma_data**2) * (1 - t) + t) / N
    dxs_dt = sigma_data * v / N[:, None] - sigma_data * x_t * (dN_dt / N**2)[:, None]
    ds_dt = sigma_data / N**2
    s = torch.atan2(t, sigma_data * (1 - t))
    F = trigflow_velocity(v, x_t, t, s, sigma_data)
    torch.testing.assert_close(sigma_data * F, dxs_dt / ds_dt[:, None])
    x_s = sigma_data * x_t / N[:, None]
    torch.testing.assert_close(consistency_output(x_s, s, F, sigma_data), x_t - t[:, None] * v)


# -- the time distribution ------------------------------------------------------------------------


def test_time_proposal_is_log_normal_on_sigma_d_tan_s():
    scm = method(ContinuousConsistencyTraining, p_mean=-1.0, p_std=1.4, sigma_min=1e-30, sigma_max=1e30)
    s, log_sigma = scm.draw_angles(200_000, torch.Generator().manual_seed(0), "cpu", torch.float64)
    log_tan = (0.5 * s.tan()).log()  # sigma_d = 0.5 by default
    torch.testing.assert_close(log_tan, log_sigma)
    assert abs(float(log_tan.mean()) + 1.0) < 0.02 and abs(float(log_tan.std()) - 1.4) < 0.02
    assert float(s.min()) > 0 and float(s.max()) < math.pi / 2


def test_time_proposal_is_clamped():
    scm = method(ContinuousConsistencyTraining, p_mean=0.0, p_std=5.0, sigma_min=0.01, sigma_max=10.0)
    s, _ = scm.draw_angles(10_000, torch.Generator().manual_seed(0), "cpu", torch.float64)
    sigma = 0.5 * s.tan()
    assert float(sigma.min()) == pytest.approx(0.01) and float(sigma.max()) == pytest.approx(10.0)


# -- the tangent ----------------------------------------------------------------------------------


def test_tangent_warmup_is_linear_then_one():
    scm = method(ContinuousConsistencyTraining, tangent_warmup_steps=100)
    assert [scm.tangent_warmup(k) for k in (0, 50, 100, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert method(ContinuousConsistencyTraining, tangent_warmup_steps=0).tangent_warmup(0) == 1.0


def _points(n=48, seed=3, sigma_data=0.5):
    gen = torch.Generator().manual_seed(seed)
    s = 0.05 + (math.pi / 2 - 0.1) * torch.rand(n, dtype=torch.float64, generator=gen)
    t = sigma_data * s.sin() / (s.cos() + sigma_data * s.sin())
    x_t = (1 - t)[:, None] * MU + marginal_variance(t).sqrt()[:, None] * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    N = (sigma_data**2 * (1 - t) ** 2 + t**2).sqrt()
    return s, t, x_t, sigma_data * x_t / N[:, None]


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_exact_consistency_function_makes_the_scd_tangent_vanish(sigma_data):
    scd = method(teacher=GaussianTeacher(), sigma_data=sigma_data)
    s, t, x_t, x_s = _points(sigma_data=sigma_data)
    dxds = scd.ode_tangent(None, None, x_s, s, None)
    _, g = scd.tangent(GaussianConsistency(), x_s, s, dxds, None, r=1.0)
    assert float(g.abs().max()) < 1e-10
    # a wrong scale s' != s is not consistent along the teacher's ODE: the tangent is not zero
    _, g_wrong = scd.tangent(GaussianConsistency(s=0.4), x_s, s, dxds, None, r=1.0)
    assert float(g_wrong.abs().max()) > 1e-2


def test_tangent_is_cos_s_times_the_derivative_of_f_along_the_teachers_ode():
    """For an inexact f (s' = 0.4), g = cos s df/ds along the exact ODE, with df/dt from autograd
    along the closed-form trajectory x_t = (1 - t) mu + sqrt(S(t)) xi and ds/dt = sigma_d / N^2."""
    sigma_data = 0.5
    student = GaussianConsistency(s=0.4)
    scd = method(teacher=GaussianTeacher(), sigma_data=sigma_data)
    s, t, x_t, x_s = _points(sigma_data=sigma_data)
    _, g = scd.tangent(student, x_s, s, scd.ode_tangent(None, None, x_s, s, None), None, r=1.0)

    xi = (x_t - (1 - t)[:, None] * MU) / marginal_variance(t).sqrt()[:, None]
    time = t.clone().requires_grad_(True)
    trajectory = (1 - time)[:, None] * MU + marginal_variance(time).sqrt()[:, None] * xi
    f = student.consistency(trajectory, time)
    df_dt = torch.stack([torch.autograd.grad(f[:, k].sum(), time, retain_graph=True)[0] for k in range(2)], dim=1)
    N2 = sigma_data**2 * (1 - t) ** 2 + t**2
    expected = s.cos()[:, None] * df_dt / (sigma_data / N2)[:, None]
    torch.testing.assert_close(g, expected.detach(), rtol=1e-9, atol=1e-11)


def test_jvp_tangent_matches_a_finite_difference_with_a_network_and_the_warmup():
    """A small MLP backbone, r = 0.3: g = -cos^2 s (sigma_d F - dxds) - r (cos s sin s x_s +
    sigma_d cos s sin s dF/ds), with dF/ds by a central difference along (dxds, 1) and F written
    here from f = x_t - t v as (cos s x_s - f) / (sin s sigma_d)."""
    sigma_data = 0.5
    cls = REGISTRIES.backbones.get("mlp")
    torch.manual_seed(0)
    net = cls.build(build_attrs(cls.config_class, {"hidden": 32, "layers": 2}, "b."), DataSpec((2,))).double().eval()
    scd = method(teacher=GaussianTeacher(), sigma_data=sigma_data)
    s, _, _, x_s = _points(sigma_data=sigma_data)
    dxds = scd.ode_tangent(None, None, x_s, s, None)

    def F(xs, ss):
        tt = sigma_data * ss.sin() / (ss.cos() + sigma_data * ss.sin())
        xt = xs / (ss.cos() + sigma_data * ss.sin())[:, None]
        f = xt - tt[:, None] * net(xt, tt)
        return (ss.cos()[:, None] * xs - f) / (ss.sin()[:, None] * sigma_data)

    h = 1e-5
    with torch.no_grad():
        dF = (F(x_s + h * dxds, s + h) - F(x_s - h * dxds, s - h)) / (2 * h)
        cos, sin, r = s.cos()[:, None], s.sin()[:, None], 0.3
        expected = -cos**2 * (sigma_data * F(x_s, s) - dxds) - r * (cos * sin * x_s + sigma_data * cos * sin * dF)
        F_minus, g = scd.tangent(net, x_s, s, dxds, None, r=r)
    torch.testing.assert_close(F_minus, F(x_s, s))
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-8)


def test_sct_direction_is_the_conditional_velocity_of_the_trigflow_path():
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(8, 2, dtype=torch.float64, generator=gen), torch.randn(8, 2, dtype=torch.float64, generator=gen)
    s = torch.rand(8, dtype=torch.float64, generator=gen)
    h = 1e-6
    fd = ((s + h).cos()[:, None] * x + (s + h).sin()[:, None] * z - (s - h).cos()[:, None] * x - (s - h).sin()[:, None] * z) / (2 * h)
    torch.testing.assert_close(method(ContinuousConsistencyTraining).ode_tangent(x, z, None, s, None), fd)


@pytest.mark.parametrize("kind", ["rms", "l2", "clip", "none"])
def test_tangent_normalisations(kind):
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.5, 0.0, -2.0]], dtype=torch.float64)
    out = method(ContinuousConsistencyTraining, tangent_normalization=kind, tangent_norm_c=0.1).normalize(g)
    norms = torch.tensor([5.0, math.sqrt(4.25)], dtype=torch.float64)[:, None]
    expected = {"rms": g / (norms / 2 + 0.1), "l2": g / (norms + 0.1), "clip": g.clamp(-1, 1), "none": g}[kind]
    torch.testing.assert_close(out, expected)


# -- the loss and its gradient -----------------------------------------------------------------------


@pytest.mark.parametrize("normalization,sigma_data", [("none", 1.0), ("rms", 1.0), ("rms", 0.5)])
def test_scd_gradient_vanishes_at_the_exact_consistency_function_and_points_to_it_elsewhere(normalization, sigma_data):
    scd = method(teacher=GaussianTeacher(), sigma_data=sigma_data, adaptive_weighting=False, tangent_warmup_steps=0,
                 tangent_normalization=normalization)
    batch = Batch(gaussian_data(512))
    gradients = {}
    for scale in (SD, 0.4, 0.9):
        student = GaussianConsistency(s=scale)
        output = scd.loss(student, batch, torch.Generator().manual_seed(1), step=5)
        output.loss.backward()
        gradients[scale] = (float(student.s.grad), student.mu.grad.abs().max().item(), float(output.loss.detach()))
    assert gradients[SD][0] == pytest.approx(0, abs=1e-12) and gradients[SD][1] < 1e-12 and gradients[SD][2] < 1e-20
    assert gradients[0.4][0] < -1e-2  # descent raises s' = 0.4 toward s = 0.6
    assert gradients[0.9][0] > 1e-2  # and lowers s' = 0.9


def test_loss_is_the_adaptively_weighted_distance_to_the_shifted_target():
    """At F_theta = F^- the loss is mean[e^w lambda ||g_n||^2 / D - w] with lambda = 1 / sigma."""
    scd = method(teacher=GaussianTeacher(), tangent_warmup_steps=0, tangent_normalization="l2", logvar_features=8)
    cls = REGISTRIES.backbones.get("mlp")
    torch.manual_seed(0)
    student = scd.build_student(cls.build(build_attrs(cls.config_class, {"hidden": 16, "layers": 1}, "b."), DataSpec((2,))))
    student = student.double().eval()
    with torch.no_grad():
        student.logvar.linear.bias.fill_(0.3)
    x = gaussian_data(16)
    output = scd.loss(student, Batch(x), torch.Generator().manual_seed(2), step=0)
    # redraw what the loss drew: ln sigma first, then z
    gen = torch.Generator().manual_seed(2)
    s, log_sigma = scd.draw_angles(16, gen, "cpu", torch.float64)
    z = 0.5 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x_s = s.cos()[:, None] * x + s.sin()[:, None] * z
    _, g = scd.tangent(student, x_s, s, scd.ode_tangent(x, z, x_s, s, None), None, r=1.0)
    shifted = g / (g.norm(dim=1, keepdim=True) + 0.1)
    expected = (math.exp(0.3) * shifted.square().mean(1) / log_sigma.exp() - 0.3).mean()
    torch.testing.assert_close(output.loss.detach(), expected)


# -- sampling -------------------------------------------------------------------------------------


def test_exact_consistency_student_samples_the_gaussian_in_one_and_two_steps():
    scd = method(teacher=GaussianTeacher())
    model = scd.sampling_model(GaussianConsistency())
    sampler = REGISTRIES.samplers.get("consistency")(NoOptions(), SamplerContext(integrator=REGISTRIES.integrators.get("euler")))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 2, dtype=torch.float64, generator=gen)

    def fresh(k):
        return torch.randn(noise.shape, dtype=torch.float64, generator=gen)

    with torch.no_grad():
        one = sampler.sample(model, noise, torch.tensor([1.0, 0.0], dtype=torch.float64), fresh)
        torch.testing.assert_close(one, MU + SD * noise)  # f*(eps, 1) = mu + s eps
        two = sampler.sample(model, noise, torch.tensor([1.0, 0.4955, 0.0], dtype=torch.float64), fresh)
    assert (two.mean(0) - MU).abs().max() < 0.02 and (two.std(0) - SD).abs().max() < 0.02
    assert model.t_min == 0.0 and "consistency" == scd.default_sampler


def test_costs_count_the_jvp():
    assert method(ContinuousConsistencyTraining).network_evals_per_step() == {"with_grad": 1, "no_grad": 0, "jvp": 1}
    assert method(teacher=GaussianTeacher()).network_evals_per_step() == {"with_grad": 1, "no_grad": 1, "jvp": 1}


def test_bad_options_are_config_errors():
    with pytest.raises(distillkit.ConfigError, match="sigma_max"):
        build_attrs(SCMConfig, {"sigma_min": 1.0, "sigma_max": 0.5}, "method_options.")
    with pytest.raises(distillkit.ConfigError, match="tangent_normalization"):
        build_attrs(SCMConfig, {"tangent_normalization": "max"}, "method_options.")


# -- backbones under torch.func.jvp -----------------------------------------------------------------


BACKBONES = [
    ("mlp", DataSpec((2,)), {"hidden": 16, "layers": 2, "dropout": 0.2}),
    ("unet", DataSpec((1, 8, 8), 10), {"channels": 8, "channel_mult": [1, 2], "num_groups": 4, "dropout": 0.2}),
    ("songunet", DataSpec((1, 8, 8)), {"channels": 8, "channel_mult": [1, 1], "num_blocks": 1,
                                       "attn_resolutions": [4], "dropout": 0.2}),
]


@pytest.mark.parametrize("name,spec,options", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbones_work_under_jvp_with_dropout_groupnorm_and_attention(name, spec, options):
    cls = REGISTRIES.backbones.get(name)
    torch.manual_seed(0)
    net = cls.build(build_attrs(cls.config_class, options, "b."), spec).double().train()
    with torch.no_grad():  # the near-zero output layers would make the check trivially small
        for p in net.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *spec.shape, dtype=torch.float64, generator=gen)
    t = 0.2 + 0.6 * torch.rand(3, dtype=torch.float64, generator=gen)
    cond = None if spec.num_classes is None else torch.arange(3)
    dx = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    h = 1e-6

    def run(a, b):
        with torch.random.fork_rng():  # the same dropout masks in every pass
            torch.manual_seed(7)
            return net(a, b, cond)

    with torch.no_grad():
        out, tangent = torch.func.jvp(run, (x, t), (dx, torch.ones_like(t)))
        fd = (run(x + h * dx, t + h) - run(x - h * dx, t - h)) / (2 * h)
        torch.testing.assert_close(out, run(x, t))
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


# -- the finite-difference fallback (jvp = "finite-difference") -------------------------------------


def _net(name, spec, options, dtype):
    cls = REGISTRIES.backbones.get(name)
    torch.manual_seed(0)
    net = cls.build(build_attrs(cls.config_class, options, "b."), spec).to(dtype)
    with torch.no_grad():  # the near-zero output layers would make the check trivially small
        for p in net.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.1)
    return net


def _trigflow_points(spec, dtype, sigma_data=0.5):
    """x_s, dx_s/ds (sCT's) at sigma from sigma_min = 0.002 to sigma_max = 800 (s just below pi/2,
    where the difference's plus pass crosses pi/2)."""
    gen = torch.Generator().manual_seed(0)
    s = torch.atan(torch.tensor([0.002, 0.05, 1.0, 800.0], dtype=dtype) / sigma_data)
    x = torch.randn(len(s), *spec.shape, dtype=dtype, generator=gen)
    z = sigma_data * torch.randn(x.shape, dtype=dtype, generator=gen)
    cos, sin = (a.view(-1, *[1] * len(spec.shape)) for a in (s.cos(), s.sin()))
    return x, z, s, cos * x + sin * z, cos * z - sin * x


@pytest.mark.parametrize("name,spec,options", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_the_finite_difference_tangent_agrees_with_the_jvp_in_float64(name, spec, options):
    """Dropout on (each pass draws the JVP's masks), s from sigma_min to sigma_max."""
    net = _net(name, spec, options, torch.float64).train()
    cond = None if spec.num_classes is None else torch.arange(4)
    _, _, s, x_s, dxds = _trigflow_points(spec, torch.float64)
    results = {}
    for jvp in ("autograd", "finite-difference"):
        scm = method(ContinuousConsistencyTraining, jvp=jvp, fd_step=1e-5)
        torch.manual_seed(5)
        _, J = scm.derivative(net, x_s, s, dxds, cond)
        torch.manual_seed(5)
        results[jvp] = (J, *scm.tangent(net, x_s, s, dxds, cond, r=0.3))
    (J, F_minus, g), (J_fd, F_minus_fd, g_fd) = results["autograd"], results["finite-difference"]
    assert float(J.flatten(1).abs().max(1).values.min()) > 1e-4  # no row is trivially small
    scale = J.flatten(1).abs().max(1).values.view(-1, *[1] * len(spec.shape))
    assert float(((J_fd - J).abs() / scale).max()) < 1e-6
    torch.testing.assert_close(F_minus_fd, F_minus, rtol=1e-12, atol=1e-12)  # the third, plain pass
    torch.testing.assert_close(g_fd, g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))


def _losses_both_ways(scm_cls, options, net, x, cond=None, teacher=None, **extra):
    outputs = {}
    for jvp in ("autograd", "finite-difference"):
        scm = method(scm_cls, teacher=teacher, jvp=jvp, **options, **extra)
        student = scm.build_student(net)
        student.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks both times
        loss = scm.loss(student, Batch(x, cond), torch.Generator().manual_seed(4), step=50).loss
        loss.backward()
        outputs[jvp] = (loss.detach(), [p.grad.clone() for p in student.backbone.parameters()])
    return outputs


@pytest.mark.parametrize("scm_cls", [ContinuousConsistencyTraining, ContinuousConsistencyDistillation])
def test_the_finite_difference_loss_is_close_to_the_autograd_loss_in_float32(scm_cls):
    """float32, the default step 1e-3, dropout on, r = 0.5, no normalisation of g (so that a
    difference in g reaches the loss whole). In float32 the finite-difference g differs from the
    exact one by 1e-4 to 2e-4 of its size per sample here (rounding: about eps |F| / step; the
    JVP's own float32 error is below 1e-6; docs/baselines.md). Measured: the loss moves by 1.4e-5
    (sct) and 2.2e-5 (scd) relative, the gradients by 1.4e-4 and 5.8e-4 of each tensor's largest
    entry (a sum over samples with both signs loses some of the relative precision). The
    tolerances, 2e-4 and 3e-3, leave a margin of about 5 to 10; a wrong factor in J (its scale,
    its sign, r) moves them by order one."""
    spec = DataSpec((1, 8, 8))
    options = {"channels": 8, "channel_mult": [1, 2], "num_groups": 4, "dropout": 0.2}
    net = _net("unet", spec, options, torch.float32).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, *spec.shape, generator=gen)

    class ImageTeacher(Teacher):
        name = identity = "image-test-teacher"

        def velocity(self, x, t, cond=None):
            return x * t.view(-1, 1, 1, 1) - 0.5 * x

    teacher = ImageTeacher() if scm_cls is ContinuousConsistencyDistillation else None
    config = {"tangent_warmup_steps": 100, "tangent_normalization": "none"}
    if teacher is not None:
        config["init_from_teacher"] = False
    outputs = _losses_both_ways(scm_cls, config, net, x, teacher=teacher)
    (loss, grads), (loss_fd, grads_fd) = outputs["autograd"], outputs["finite-difference"]
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_fd, grads))
    print(f"loss {float(loss):.6g} vs {float(loss_fd):.6g} ({float((loss_fd - loss) / loss):.1e}); gradients {worst:.1e}")
    torch.testing.assert_close(loss_fd, loss, rtol=2e-4, atol=0)
    for got, want in zip(grads_fd, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=3e-3 * float(want.abs().max()))


def test_the_finite_difference_works_where_forward_mode_ad_does_not(monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with _scaled_dot_product_flash_attention")

    monkeypatch.setattr(torch.func, "jvp", refuse)
    batch = Batch(gaussian_data(16))
    for jvp in ("autograd", "finite-difference"):
        scd = method(teacher=GaussianTeacher(), jvp=jvp)
        student = scd.build_student(GaussianConsistency(s=0.4)).double()
        if jvp == "autograd":
            with pytest.raises(NotImplementedError):
                scd.loss(student, batch, torch.Generator().manual_seed(1), step=5)
        else:
            assert torch.isfinite(scd.loss(student, batch, torch.Generator().manual_seed(1), step=5).loss)


def test_finite_difference_evaluations_are_counted_honestly():
    """The loss calls the backbone as ``network_evals_per_step`` says: the difference's two
    passes without gradient and the one with (F^- is its output, detached); no JVP."""
    batch = Batch(gaussian_data(8))
    for cls, teacher in ((ContinuousConsistencyTraining, None), (ContinuousConsistencyDistillation, GaussianTeacher())):
        scm = method(cls, teacher=teacher, jvp="finite-difference")
        backbone = CountingNetwork(GaussianConsistency(s=0.4))
        scm.loss(scm.build_student(backbone).double(), batch, torch.Generator().manual_seed(1), step=5)
        assert backbone.calls == [False, False, True], cls.name
        expected = {"with_grad": 1, "no_grad": 2 + (teacher is not None)}
        assert scm.network_evals_per_step() == expected
        assert scm.tags()[f"distillkit.{cls.name}.jvp"] == "finite-difference"
    backbone = CountingNetwork(GaussianConsistency(s=0.4))
    scm = method(ContinuousConsistencyTraining)
    scm.loss(scm.build_student(backbone).double(), batch, torch.Generator().manual_seed(1), step=5)
    assert backbone.calls == [False, True]  # the JVP (one call, its primal and tangent together), the pass


@pytest.mark.parametrize("key,value,allowed", [
    ("jvp", "fd", "one of autograd, finite-difference"),
    ("jvp", "", "one of autograd, finite-difference"),
    ("fd_step", 0, "a number in (0, 0.1]"),
    ("fd_step", 0.2, "a number in (0, 0.1]"),
    ("fd_step", float("nan"), "a number in (0, 0.1]"),
])
@pytest.mark.parametrize("config_cls", [SCMConfig, SCDConfig])
def test_bad_derivative_options_are_one_line_config_errors(config_cls, key, value, allowed):
    with pytest.raises(distillkit.ConfigError) as info:
        build_attrs(config_cls, {key: value}, "method_options.")
    message = str(info.value)
    assert message.startswith(f"method_options.{key}=") and message.endswith(allowed) and "\n" not in message


# -- the conformance base ------------------------------------------------------------------------


class TestSCT(MethodConformance):
    method_name = "sct"


class TestSCD(MethodConformance):
    method_name = "scd"


class TestSCTWithFiniteDifferences(MethodConformance):
    method_name = "sct"

    def options(self, name):
        return {"jvp": "finite-difference"}


class TestSCDOnLabelledImages(MethodConformance):
    method_name = "scd"
    dataset = "digits"
    dataset_options = {"class_conditional": True}
    backbone = "unet"
    backbone_options = {"channels": 8, "channel_mult": [1], "num_groups": 4, "time_embedding_dim": 16, "dropout": 0.1}
    batch_size = 8

    def make_teacher(self, dataset):
        class LabelledTeacher(Teacher):
            name = identity = "labelled"

            def velocity(self, x, t, cond=None):
                assert cond is not None and cond.shape == (x.shape[0],)
                return x * t.view(-1, 1, 1, 1) - 0.5 * x * (1 + cond.view(-1, 1, 1, 1) / 10)

        return LabelledTeacher()


class TestSCDOnLabelledImagesWithFiniteDifferences(TestSCDOnLabelledImages):
    def options(self, name):
        return {"jvp": "finite-difference"}


# -- a short toy2d demonstration -----------------------------------------------------------------


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely), V-statistics."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def test_scd_on_toy2d_beats_the_untrained_network_in_one_step(tmp_path):
    """300 sCD steps against the exact toy2d teacher: the one-step energy distance to the data
    falls below a quarter of the untrained network's (measured 0.308 -> 0.022)."""

    class Toy(MethodConformance):
        method_name = "scd"
        dataset_options = {"train_size": 4096}
        backbone_options = {"hidden": 64, "layers": 2, "time_embedding_dim": 16}
        batch_size = 128

        def options(self, name):
            return {"sigma_data": 1.0, "tangent_warmup_steps": 100}

    toy = Toy()
    setup = toy.build("scd", tmp_path)
    data = setup.method.train_set(setup.dataset)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    reference = setup.dataset.reference_samples(2000, torch.Generator().manual_seed(1))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))

    def one_step_distance():
        setup.student.eval()
        with torch.no_grad():
            model = setup.method.sampling_model(setup.student)
            samples = model.denoise(noise, torch.ones(len(noise)))
        setup.student.train()
        return energy_distance(samples, reference)

    before = one_step_distance()
    optimizer = torch.optim.Adam(setup.student.parameters(), lr=2e-3)
    step = 0
    while step < 300:
        for item in loader:
            output = setup.method.loss(setup.student, Batch.from_item(item), torch.Generator().manual_seed(step), step)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            optimizer.step()
            step += 1
            if step == 300:
                break
    after = one_step_distance()
    print(f"one-step energy distance: untrained {before:.4f}, after 300 sCD steps {after:.4f}")
    assert after < 0.25 * before, (before, after)


# -- recipes --------------------------------------------------------------------------------------


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("sc[td]-*.toml"))


def test_there_are_sct_and_scd_recipes_for_mnist_and_cifar10():
    assert {f.stem for f in RECIPES} >= {"sct-cifar10", "scd-cifar10", "sct-mnist", "scd-mnist"}


@pytest.mark.parametrize("path", RECIPES, ids=[f.stem for f in RECIPES])
def test_recipe_resolves_with_the_values_it_sets(capsys, path, tmp_path):
    tree = tomllib.loads(path.read_text())
    resolves_with_every_value(capsys, path, tmp_path)
    # the paper's method settings [P][B]
    options = tree["method_options"]
    assert (options["sigma_data"], options["p_mean"], options["p_std"]) == (0.5, -1.0, 1.4)
    assert (options["tangent_warmup_steps"], options["tangent_norm_c"]) == (10000, 0.1)
    assert tree["train"]["optimizer"] == "radam" and tree["train"]["betas"] == [0.9, 0.99]
