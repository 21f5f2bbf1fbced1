"""MeanFlow (plugins/distillkit_meanflow) against closed forms written out here.

Data x ~ N(0, s^2 I). On the straight path x_t = (1 - t) x + t eps, x_t ~ N(0, S(t) I) with
S(t) = (1 - t)^2 s^2 + t^2, and the marginal flow is linear in x:

    v(x, t)          = x S'(t) / (2 S(t)),                   S'(t) = 2 t - 2 (1 - t) s^2
    Phi_{t->r}(x)    = x sqrt(S(r) / S(t))                   (the flow from t to r)
    u(x, r, t)       = (x - Phi_{t->r}(x)) / (t - r) = x a(r, t),  a = (1 - sqrt(S(r)/S(t))) / (t - r)

so the exact average velocity, its total derivative along the flow and the MeanFlow identity are
all known. The method's conformance (distillkit.testing.methods) runs in
tests/test_method_conformance.py over every registered method; its sampler's here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext
from distillkit.cli.main import main
from distillkit.config import build_attrs
from distillkit.resolve import build_sampler
from distillkit.testing.methods import MethodConformance
from one_step_toys import CountingNetwork
from distillkit.testing.samplers import seeded_fresh_noise
from distillkit_meanflow import MeanFlow, MeanFlowConfig, average_velocity_and_derivative, sample_times
from distillkit_meanflow.method import finite_difference_derivative

S = 0.5  # data standard deviation


def var(t):
    return (1 - t) ** 2 * S**2 + t**2


def dvar(t):
    return 2 * t - 2 * (1 - t) * S**2


def marginal_velocity(x, t):
    return x * (dvar(t) / (2 * var(t))).view(-1, *([1] * (x.dim() - 1)))


def coefficient(r, t):
    """a(r, t), with its limit v's coefficient S'(t) / (2 S(t)) at r = t."""
    gap = t - r
    safe = torch.where(gap.abs() > 0, gap, torch.ones_like(gap))
    return torch.where(gap.abs() > 0, (1 - (var(r) / var(t)).sqrt()) / safe, dvar(t) / (2 * var(t)))


def exact_average_velocity(x, r, t):
    return x * coefficient(r, t).view(-1, *([1] * (x.dim() - 1)))


class ExactAverageVelocity(nn.Module):
    """The exact u of the Gaussian data, called as a backbone is: (x, t, cond, extra={"h": t - r})."""

    def forward(self, x, t, cond=None, *, extra=None):
        return exact_average_velocity(x, t - extra["h"], t)


@pytest.fixture
def points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    r = t * torch.rand(64, generator=g, dtype=torch.float64)
    return x, r, t


def test_the_jvp_is_the_total_derivative_of_the_exact_average_velocity(points):
    x, r, t = points
    v = marginal_velocity(x, t)
    u, dudt = average_velocity_and_derivative(ExactAverageVelocity(), x, r, t, v, None)
    torch.testing.assert_close(u, exact_average_velocity(x, r, t))
    # d/dt [x_t a(r, t)] along the flow = v a + x da/dt, da/dt by a central difference of a alone.
    step = 1e-6
    da = (coefficient(r, t + step) - coefficient(r, t - step)) / (2 * step)
    expected = v * coefficient(r, t)[:, None] + x * da[:, None]
    torch.testing.assert_close(dudt, expected, rtol=1e-6, atol=1e-8)


def test_the_exact_average_velocity_satisfies_the_meanflow_identity(points):
    x, r, t = points
    v = marginal_velocity(x, t)
    u, dudt = average_velocity_and_derivative(ExactAverageVelocity(), x, r, t, v, None)
    torch.testing.assert_close(v - (t - r)[:, None] * dudt, u, rtol=1e-9, atol=1e-12)
    # and z_r = z_t - (t - r) u is the flow's own map from t to r
    torch.testing.assert_close(x - (t - r)[:, None] * u, x * (var(r) / var(t)).sqrt()[:, None])


class LinearAverageVelocity(nn.Module):
    """A hand-made network u(z, r, t) = z (alpha + beta t + gamma h) + delta t, h = t - r, with
    its total derivative along (v, 0, 1) written out: v (alpha + beta t + gamma h) + z (beta + gamma) + delta."""

    def __init__(self):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.delta = (nn.Parameter(torch.tensor(value, dtype=torch.float64))
                                                         for value in (0.3, -0.7, 1.1, 0.4))

    def forward(self, x, t, cond=None, *, extra=None):
        h = extra["h"][:, None]
        return x * (self.alpha + self.beta * t[:, None] + self.gamma * h) + self.delta * t[:, None]

    def total_derivative(self, z, t, r, v):
        h = (t - r)[:, None]
        return v * (self.alpha + self.beta * t[:, None] + self.gamma * h) + z * (self.beta + self.gamma) + self.delta


def _method(**options):
    registries = distillkit.get_registries()
    context = MethodContext(data=DataSpec((3,)), integrator=registries.integrators.get("euler"),
                            integrator_name="euler", total_steps=10, integrators=registries.integrators)
    return MeanFlow(build_attrs(MeanFlowConfig, options, "method_options."), context)


@pytest.mark.parametrize("p", [0.0, 0.75, 1.0])
def test_the_loss_regresses_the_stop_gradient_target_with_the_adaptive_weight(p):
    c = 1e-3
    method = _method(norm_p=p, norm_c=c, interval_fraction=0.5)
    network = LinearAverageVelocity()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    output = method.loss(network, Batch(x), torch.Generator().manual_seed(7), 0)

    # The same draws, in the loss's order: eps, then (t, r).
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t, r = sample_times(16, method.config, g, dtype=torch.float64)
    z = (1 - t[:, None]) * x + t[:, None] * eps
    v = eps - x
    with torch.no_grad():
        target = v - (t - r)[:, None] * network.total_derivative(z, t, r, v)
    delta = (network(z, t, extra={"h": t - r}) - target).square().sum(1)
    weight = 1 / (delta.detach() + c) ** p
    expected = (weight * delta).mean()
    torch.testing.assert_close(output.loss, expected)
    # The gradient is that of sg(w) * Delta: the weight and the target carry none.
    grads = torch.autograd.grad(output.loss, list(network.parameters()))
    expected_grads = torch.autograd.grad(expected, list(network.parameters()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_times_are_logit_normal_sorted_with_the_stated_share_of_r_equal_t():
    config = MeanFlowConfig(time_mean=-0.4, time_std=1.0, interval_fraction=0.25)
    n = 40000
    t, r = sample_times(n, config, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (r <= t).all() and (t > 0).all() and (t < 1).all()
    assert int((r < t).sum()) == n // 4  # exactly the fraction, the rest r = t
    # t = max of two independent logit-normals: P(t <= 1/2) = Phi((0 - mean) / std)^2.
    phi = 0.5 * (1 + math.erf(0.4 / math.sqrt(2)))
    assert float((t <= 0.5).double().mean()) == pytest.approx(phi**2, abs=0.01)
    # r (where r < t) = min: P(r <= 1/2) = 1 - (1 - Phi)^2.
    assert float((r[r < t] <= 0.5).double().mean()) == pytest.approx(1 - (1 - phi) ** 2, abs=0.02)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_sampler_with_the_exact_average_velocity_lands_on_the_flows_end(steps):
    """u composes exactly, so any grid takes eps at t = 1 to Phi_{1->0}(eps) = s eps."""
    model = ExactAverageVelocity()
    sampling = _method().sampling_model(model)
    sampler = build_sampler(distillkit.get_registries(), "meanflow", {}, "euler")
    noise = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for grid in (distillkit.uniform_grid(steps), distillkit.edm_grid(steps)):
        out = sampler.sample(sampling, noise, grid.to(torch.float64), seeded_fresh_noise(noise.shape))
        torch.testing.assert_close(out, S * noise)
    # the one-step denoiser x - t u(x, 0, t) is the same map
    torch.testing.assert_close(sampling.denoise(noise, torch.ones(10, dtype=torch.float64)), S * noise)


# -- the backbones under torch.func.jvp ------------------------------------------------------------

BACKBONES = {
    "mlp": (DataSpec((2,)), {"hidden": 16, "layers": 1, "time_embedding_dim": 8, "dropout": 0.2}),
    "unet": (DataSpec((1, 8, 8), 10), {"channels": 8, "channel_mult": [1], "num_groups": 4,
                                       "time_embedding_dim": 16, "dropout": 0.2}),
    "songunet": (DataSpec((1, 8, 8)), {"channels": 8, "channel_mult": [1, 1], "num_blocks": 1,
                                       "attn_resolutions": [8], "dropout": 0.2}),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones_give_the_finite_difference_derivative_and_share_dropout(name):
    spec, options = BACKBONES[name]
    cls = distillkit.get_registries().backbones.get(name)
    torch.manual_seed(0)
    network = cls.build(build_attrs(cls.config_class, options, "backbone_options."), spec, ("h",)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *spec.shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    r = t * torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    cond = torch.tensor([1, 4, 9]) if spec.num_classes else None

    def u(x_, r_, t_):
        return network(x_, t_, cond, extra={"h": t_ - r_})

    network.eval()
    out, dudt = average_velocity_and_derivative(network, x, r, t, v, cond)
    step = 1e-6
    with torch.no_grad():
        fd = (u(x + step * v, r, t + step) - u(x - step * v, r, t - step)) / (2 * step)
    torch.testing.assert_close(dudt, fd, rtol=1e-5, atol=1e-7 * float(fd.abs().max()))
    assert float(dudt.abs().max()) > 0
    network.train()  # dropout on: the JVP's primal is the plain forward under the same RNG state
    torch.manual_seed(5)
    out, _ = average_velocity_and_derivative(network, x, r, t, v, cond)
    torch.manual_seed(5)
    torch.testing.assert_close(out, u(x, r, t), rtol=0, atol=0)


# -- the finite-difference fallback (jvp = "finite-difference") ------------------------------------


def _backbone(name, dtype):
    spec, options = BACKBONES[name]
    cls = distillkit.get_registries().backbones.get(name)
    torch.manual_seed(0)
    network = cls.build(build_attrs(cls.config_class, options, "backbone_options."), spec, ("h",)).to(dtype)
    with torch.no_grad():  # the near-zero output layers would make every check trivially small
        for p in network.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.1)
    return network, spec


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_the_finite_difference_agrees_with_the_jvp_in_float64(name):
    """Dropout on: each difference pass draws the masks the JVP draws, so both differentiate the
    same function; r = t, r = t / 2 and r = 0 rows (the r = t row's minus pass sees h < 0)."""
    network, spec = _backbone(name, torch.float64)
    network.train()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, *spec.shape, generator=g, dtype=torch.float64)
    v = torch.randn(z.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2, 0.03], dtype=torch.float64)
    r = t * torch.tensor([0.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    cond = torch.tensor([1, 4, 9, 2]) if spec.num_classes else None
    torch.manual_seed(5)
    u, dudt = average_velocity_and_derivative(network, z, r, t, v, cond)
    torch.manual_seed(5)
    u_fd, dudt_fd = average_velocity_and_derivative(network, z, r, t, v, cond, jvp="finite-difference", fd_step=1e-5)
    assert float(dudt.abs().max()) > 1e-2
    torch.testing.assert_close(dudt_fd, dudt, rtol=1e-6, atol=1e-6 * float(dudt.abs().max()))
    torch.testing.assert_close(u_fd, u, rtol=1e-12, atol=1e-12)  # the third, plain pass: the JVP's primal
    # and it is not the derivative of another function: without the shared masks it would differ
    torch.manual_seed(6)
    other = finite_difference_derivative(network, z, r, t, v, cond, 1e-5)
    assert float((other - dudt).abs().max()) > 1e-3 * float(dudt.abs().max())


def _same_loss_both_ways(network, x, cond=None, **options):
    outputs = {}
    for jvp in ("autograd", "finite-difference"):
        method = _method(jvp=jvp, **options)
        network.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks both times
        loss = method.loss(network, Batch(x, cond), torch.Generator().manual_seed(7), 0).loss
        loss.backward()
        outputs[jvp] = (loss.detach(), [p.grad.clone() for p in network.parameters()])
    return outputs


def test_the_finite_difference_loss_is_close_to_the_autograd_loss_in_float32():
    """float32, the default step 1e-3, dropout on, the plain L2 loss (norm_p = 0, so that the
    adaptive weight cannot hide a difference). The finite-difference target differs from the
    JVP's by at most 4e-5 of its size on this U-Net (measured per sample; 2.6e-4 on a SongUNet
    with attention, docs/baselines.md). Measured here: the loss moves by 1.5e-6 relative, the
    gradients by 2e-5 of each tensor's largest entry. The tolerances, 1e-4 and 2e-4, leave a
    margin of 10 or more and still catch a step of 0.1 (gradients off by 3.4e-3)."""
    network, spec = _backbone("unet", torch.float32)
    network.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, *spec.shape, generator=g)
    cond = torch.randint(0, 10, (16,), generator=g)
    outputs = _same_loss_both_ways(network, x, cond, norm_p=0.0, interval_fraction=0.75)
    (loss, grads), (loss_fd, grads_fd) = outputs["autograd"], outputs["finite-difference"]
    assert float(loss) > 0
    torch.testing.assert_close(loss_fd, loss, rtol=1e-4, atol=0)
    for got, want in zip(grads_fd, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4 * float(want.abs().max()))


def test_the_finite_difference_works_where_forward_mode_ad_does_not(monkeypatch):
    """A device path without forward-mode AD through the network (here every torch.func.jvp
    refuses, as the fused attention kernels do): ``finite-difference`` never calls it."""

    def refuse(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with _scaled_dot_product_flash_attention")

    monkeypatch.setattr(torch.func, "jvp", refuse)
    network = LinearAverageVelocity()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        _method().loss(network, Batch(x), torch.Generator().manual_seed(7), 0)
    output = _method(jvp="finite-difference").loss(network, Batch(x), torch.Generator().manual_seed(7), 0)
    assert torch.isfinite(output.loss)


def test_evaluations_are_counted_honestly():
    """``network_evals_per_step`` says what the loss does: the finite difference's two passes
    without gradient and the one with, no JVP; the JVP's own pass is not a plain call."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for jvp, calls in (("finite-difference", [False, False, True]), ("autograd", [False, True])):
        method, network = _method(jvp=jvp), CountingNetwork(LinearAverageVelocity())
        method.loss(network, Batch(x), torch.Generator().manual_seed(7), 0)
        assert network.calls == calls, jvp
    assert _method(jvp="finite-difference").network_evals_per_step() == {"with_grad": 1, "no_grad": 2}
    assert _method().network_evals_per_step() == {"with_grad": 1, "no_grad": 0, "jvp": 1}
    assert _method(jvp="finite-difference").tags()["distillkit.meanflow.jvp"] == "finite-difference"


@pytest.mark.parametrize("key,value,allowed", [
    ("jvp", "fd", "one of autograd, finite-difference"),
    ("jvp", "forward", "one of autograd, finite-difference"),
    ("fd_step", 0, "a number in (0, 0.1]"),
    ("fd_step", 0.5, "a number in (0, 0.1]"),
    ("fd_step", -1e-3, "a number in (0, 0.1]"),
])
def test_bad_derivative_options_are_one_line_config_errors(key, value, allowed):
    with pytest.raises(distillkit.ConfigError) as info:
        build_attrs(MeanFlowConfig, {key: value}, "method_options.")
    message = str(info.value)
    assert message.startswith(f"method_options.{key}=") and message.endswith(allowed) and "\n" not in message


def test_a_bad_jvp_option_exits_2_with_one_line(capsys):
    assert main(["run", "--method", "meanflow", "--dataset", "toy2d", "--dry-run",
                 "--set", "method_options.jvp=fd"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method_options.jvp='fd'" in err and "autograd, finite-difference" in err


class TestMeanFlowWithFiniteDifferences(MethodConformance):
    method_name = "meanflow"

    def options(self, name):
        return {"jvp": "finite-difference"}


# -- a short toy2d demonstration -------------------------------------------------------------------

def _one_step_energy(tmp_path, capsys, steps):
    argv = ["run", "--method", "meanflow", "--dataset", "toy2d", "--max-steps", str(steps), "--no-track",
            "--quiet", "--runs-dir", str(tmp_path), "--nfe", "1", "--lr", "3e-3", "--batch-size", "256",
            "--set", "sample.num_samples=1000", "--set", "sample.reference_steps=4",
            "--set", "train.ema_decay=0.99", "--set", "method_options.time_mean=-0.4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    return float(re.search(r"^\s+1\s+1\s+([\d.]+)", out, re.M).group(1))


def test_a_few_hundred_steps_give_a_one_step_sampler_on_toy2d(tmp_path, capsys):
    untrained, trained = _one_step_energy(tmp_path, capsys, 1), _one_step_energy(tmp_path, capsys, 300)
    # measured (docs/baselines.md): about 0.17 untrained, 0.02 after 300 steps; the margin is a factor of 4
    assert trained < untrained / 4, (untrained, trained)


# -- recipes ---------------------------------------------------------------------------------------

from test_cud_recipes import RECIPES  # noqa: E402
from test_cud_recipes import resolves_with_every_value  # noqa: E402


@pytest.mark.parametrize("name", ["meanflow-mnist", "meanflow-cifar10"])
def test_recipes_resolve_with_every_value_they_set(capsys, tmp_path, name):
    resolves_with_every_value(capsys, RECIPES / f"{name}.toml", tmp_path)
