"""Shortcut models (plugins/distillkit_shortcut) against closed forms written out here.

Data x ~ N(0, s^2 I): on the straight path x_t ~ N(0, S(t) I), S(t) = (1 - t)^2 s^2 + t^2, and
the flow from t to t - d is linear, Phi_{t->t-d}(x) = x sqrt(S(t - d) / S(t)). The exact shortcut
of step d (our direction: t moves down) is therefore

    s(x, t, d) = (x - Phi_{t->t-d}(x)) / d,

and it is self-consistent: s(x, t, 2d) = [s(x, t, d) + s(x - d s(x, t, d), t - d, d)] / 2
exactly. A network that returns it (reading d back from the level log2(1/d) the method feeds the
backbone) makes the method's self-consistency target equal the exact double step. The method's
conformance runs in tests/test_method_conformance.py over every registered method.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext
from distillkit.cli.main import main
from distillkit.config import build_attrs
from distillkit.resolve import build_sampler
from distillkit.testing.samplers import seeded_fresh_noise
from distillkit_shortcut import Shortcut, ShortcutConfig

S = 0.5


def var(t):
    return (1 - t) ** 2 * S**2 + t**2


def exact_shortcut(x, t, d):
    """(x - Phi_{t->t-d}(x)) / d, and the instantaneous velocity x S'(t) / (2 S(t)) for d = 0."""
    safe = torch.where(d > 0, d, torch.ones_like(d))
    jump = (1 - (var(t - d) / var(t)).sqrt()) / safe
    instant = (2 * t - 2 * (1 - t) * S**2) / (2 * var(t))
    return x * torch.where(d > 0, jump, instant)[:, None]


class ExactShortcut(nn.Module):
    """The exact shortcut, called as a backbone: the extra input ``d`` holds the level log2(1/d)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond=None, *, extra=None):
        d = torch.pow(2.0, -extra["d"].to(x.dtype))
        self.calls.append(d)
        return exact_shortcut(x, t, d)


def _method(**options):
    registries = distillkit.get_registries()
    context = MethodContext(data=DataSpec((3,)), integrator=registries.integrators.get("euler"),
                            integrator_name="euler", total_steps=10, integrators=registries.integrators)
    return Shortcut(build_attrs(ShortcutConfig, options, "method_options."), context)


def test_the_exact_shortcut_is_self_consistent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    d = torch.pow(2.0, -torch.randint(1, 8, (32,), generator=g)).to(torch.float64)
    t = 2 * d + (1 - 2 * d) * torch.rand(32, generator=g, dtype=torch.float64)
    first = exact_shortcut(x, t, d)
    second = exact_shortcut(x - d[:, None] * first, t - d, d)
    torch.testing.assert_close(exact_shortcut(x, t, 2 * d), (first + second) / 2, rtol=1e-12, atol=0)


def test_the_self_consistency_target_is_the_exact_double_step():
    """With the exact shortcut as the (target) network, the loss's targets on the consistency rows
    are s(x_t, t, D) for the D each row is trained at: the loss on those rows is 0 when the
    prediction is exact too, and the flow-matching rows regress eps - x at the finest level."""
    method = _method(consistency_fraction=1.0, target_ema=0.0, clip=0.0)
    network = ExactShortcut()
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    output = method.loss(network, Batch(x), torch.Generator().manual_seed(2), 0)
    assert float(output.loss) < 1e-20
    # the two half steps and the double step: levels k + 1 and k, k in 0..6
    half, half_again, double = network.calls
    torch.testing.assert_close(half, half_again)
    torch.testing.assert_close(half * 2, double)
    assert set(double.tolist()) == {2.0**-k for k in range(7)}


def test_flow_matching_rows_regress_the_straight_path_velocity_at_the_finest_level():
    method = _method(consistency_fraction=0.0)
    seen = {}

    class Recorder(nn.Module):
        def forward(self, x, t, cond=None, *, extra=None):
            seen.update(t=t, level=extra["d"], x=x)
            return torch.zeros_like(x)

    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = method.loss(Recorder(), Batch(x), torch.Generator().manual_seed(4), 0)
    assert (seen["level"] == 7).all()
    grid = seen["t"] * 128  # t on {1/128, ..., 1}
    assert torch.equal(grid, grid.round()) and seen["t"].min() >= 1 / 128 and seen["t"].max() <= 1
    # the zero prediction's loss is the mean of (eps - x)^2, with eps recovered from x_t
    t = seen["t"][:, None]
    eps = (seen["x"] - (1 - t) * x) / t
    torch.testing.assert_close(output.loss, (eps - x).square().mean())


def test_consistency_times_lie_on_the_double_steps_grid():
    method = _method(consistency_fraction=1.0, target_ema=0.0)
    network = ExactShortcut()
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []
    original = network.forward

    def forward(x_, t, cond=None, *, extra=None):
        seen.append(t)
        return original(x_, t, cond, extra=extra)

    network.forward = forward
    method.loss(network, Batch(x), torch.Generator().manual_seed(6), 0)
    t_first, t_second, t_prediction = seen
    big = network.calls[2]
    assert torch.equal(t_first, t_prediction)
    torch.testing.assert_close(t_second, t_first - big / 2)  # the second half step starts at t - D/2
    j = (1 - t_prediction) / big
    assert torch.equal(j, j.round()) and (t_prediction - big >= 0).all()  # t in {D, 2D, ..., 1}


def test_the_target_and_midpoint_are_clipped():
    method = _method(consistency_fraction=1.0, target_ema=0.0, clip=0.5)

    class Big(nn.Module):
        def forward(self, x, t, cond=None, *, extra=None):
            return torch.full_like(x, 3.0)

    targets = method._self_consistency_target(Big(), torch.zeros(4, 2), torch.ones(4), torch.zeros(4), None)
    assert torch.equal(targets, torch.full((4, 2), 0.5))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_sampler_with_the_exact_shortcut_lands_on_the_flows_end(steps):
    """The sampler hands the model d = the step taken; exact shortcuts compose: eps -> s eps."""
    network = ExactShortcut()
    sampling = _method(max_log2=10).sampling_model(network)
    sampler = build_sampler(distillkit.get_registries(), "shortcut", {}, "euler")
    noise = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sampler.sample(sampling, noise, distillkit.uniform_grid(steps).to(torch.float64),
                         seeded_fresh_noise(noise.shape))
    torch.testing.assert_close(out, S * noise)
    assert all(torch.allclose(d, torch.full_like(d, 1 / steps)) for d in network.calls)


def test_the_sampler_refuses_other_than_powers_of_two():
    sampler = build_sampler(distillkit.get_registries(), "shortcut", {}, "euler")
    assert [sampler.steps_for_nfe(n) for n in (1, 2, 4, 128)] == [1, 2, 4, 128]
    with pytest.raises(ValueError, match="power of two"):
        sampler.steps_for_nfe(3)


def test_the_target_network_follows_the_student_by_its_ema_rate():
    method = _method(target_ema=0.5)
    student = nn.Linear(2, 2)
    method.prepare(student, None)
    before = method._target.module.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    method.after_step(student, 0)
    torch.testing.assert_close(method._target.module.weight, 0.5 * before + 0.5 * student.weight)
    assert not method._target.module.training  # targets without dropout, as the paper's code


def _one_step_energy(tmp_path, capsys, steps):
    argv = ["run", "--method", "shortcut", "--dataset", "toy2d", "--max-steps", str(steps), "--no-track",
            "--quiet", "--runs-dir", str(tmp_path), "--nfe", "1", "--batch-size", "256",
            "--set", "sample.num_samples=1000", "--set", "sample.reference_steps=4",
            # A 300-step run's EMA target (0.999: still 74 % the initial weights) teaches the big
            # steps from an untrained network; the online network under stop-gradient does not.
            "--set", "train.ema_decay=0.99", "--set", "method_options.target_ema=0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    return float(re.search(r"^\s+1\s+1\s+([\d.]+)", out, re.M).group(1))


def test_a_few_hundred_steps_give_a_one_step_sampler_on_toy2d(tmp_path, capsys):
    untrained, trained = _one_step_energy(tmp_path, capsys, 1), _one_step_energy(tmp_path, capsys, 300)
    # measured (docs/baselines.md): about 0.17 untrained, 0.02 after 300 steps; the margin is a factor of 4
    assert trained < untrained / 4, (untrained, trained)


# -- recipes ---------------------------------------------------------------------------------------

from test_cud_recipes import RECIPES  # noqa: E402
from test_cud_recipes import test_recipe_resolves_with_every_value_it_sets as _resolves_with_every_value  # noqa: E402


@pytest.mark.parametrize("name", ["shortcut-mnist", "shortcut-cifar10"])
def test_recipes_resolve_with_every_value_they_set(capsys, tmp_path, name):
    _resolves_with_every_value(capsys, RECIPES / f"{name}.toml", tmp_path)
