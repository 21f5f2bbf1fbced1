"""The registered samplers and time grids, against closed forms written here."""

from __future__ import annotations

import math

import pytest
import torch

import distillkit
from distillkit import SamplingModel
from distillkit.config import RunConfig
from distillkit.errors import ConfigError, TimeGridError
from distillkit.resolve import build_grid, build_sampler, resolve
from distillkit.integrators.stepper import integrate
from distillkit.sampling import fresh_noise_source, generate, prior_noise, sample_seeded


def registries():
    return distillkit.get_registries()


def sampler(name: str, integrator: str = "euler", **options):
    return build_sampler(registries(), name, options, integrator)


def grid(name: str, **options):
    return build_grid(registries(), name, options)


def generator_noise(seed: int, shape):
    g = torch.Generator().manual_seed(seed)
    return lambda k: torch.randn(shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# consistency


def test_consistency_sampler_reinjects_fresh_noise():
    f = lambda x, t: 0.5 * x + t.view(-1, 1)  # noqa: E731
    noise = torch.randn(6, 2, dtype=torch.float64)
    times, t_min = [1.0, 0.6, 0.25, 0.0], 0.002
    draws = [torch.randn(6, 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(2)]
    out = sampler("consistency").sample(SamplingModel(denoise=f, t_min=t_min), noise, torch.tensor(times),
                                        lambda k: draws[k])
    x = 0.5 * noise + 1.0
    for k, tau in enumerate(times[1:-1]):
        a = (1 - tau) / (1 - t_min)
        x = 0.5 * (a * x + math.sqrt(tau**2 - (a * t_min) ** 2) * draws[k]) + tau
    torch.testing.assert_close(out, x)


def test_consistency_sampler_lands_on_the_marginal_for_an_exact_consistency_function():
    """Data ~ N(m, s^2): the straight-path flow map is affine, so f is exact and every step's
    re-noised state has exactly the marginal of x_tau; the samples must have mean m, std s."""
    m, s = 1.5, 0.3

    def f(x, t):  # flow map to t = 0 of x_t = (1 - t) x0 + t eps, x0 ~ N(m, s^2)
        t = t.view(-1, 1)
        std_t = ((1 - t) ** 2 * s**2 + t**2).sqrt()
        return m + s * (x - (1 - t) * m) / std_t

    noise = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler("consistency").sample(SamplingModel(denoise=f), noise, torch.tensor([1.0, 0.7, 0.3, 0.0]),
                                        generator_noise(1, (200_000, 1)))
    assert float(out.mean()) == pytest.approx(m, abs=0.01)
    assert float(out.std()) == pytest.approx(s, abs=0.01)


def test_consistency_sampler_spends_one_evaluation_per_step():
    calls = []

    def f(x, t):
        calls.append(float(t[0]))
        return x * 0

    chosen = sampler("consistency")
    for nfe in (1, 2, 5):
        calls.clear()
        steps = chosen.steps_for_nfe(nfe)
        chosen.sample(SamplingModel(denoise=f), torch.zeros(3, 2), grid("uniform").make(steps),
                      generator_noise(0, (3, 2)))
        assert len(calls) == nfe
        assert calls == pytest.approx([1 - i / nfe for i in range(nfe)])


def test_consistency_sampler_refuses_an_increasing_grid():
    with pytest.raises(ValueError, match="decrease"):
        sampler("consistency").sample(SamplingModel(denoise=lambda x, t: x), torch.zeros(1, 2),
                                      torch.tensor([0.0, 1.0]), generator_noise(0, (1, 2)))


# ------------------------------------------------------------------------------------------------
# ode


def test_ode_sampler_hands_every_stage_the_step_end():
    seen = []

    def velocity(x, t, t_next):
        seen.append((float(t[0]), float(t_next[0])))
        return torch.zeros_like(x)

    time_grid = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64)
    sampler("ode", "heun").sample(SamplingModel(velocity=velocity), torch.zeros(2, 2), time_grid, None)
    # heun: stages at t and t + h, both told the step's end
    flat = [value for pair in seen for value in pair]
    assert flat == pytest.approx([1.0, 0.6, 0.6, 0.6, 0.6, 0.0, 0.0, 0.0])


def test_ode_sampler_with_a_step_aware_euler_model_takes_exact_average_velocity_steps():
    """A model whose velocity over [t_next, t] is the exact average of dx/dt = -x lands on the
    exact solution x(0) = x(1) * e at every step count: only possible when t_next reaches it."""

    def average_velocity(x, t, t_next):
        h = (t - t_next).view(-1, 1)
        return x * (1 - torch.exp(h)) / h  # x(t_next) = x(t) e^{h} = x - h u

    noise = torch.randn(5, 2, dtype=torch.float64)
    for steps in (1, 3):
        out = sampler("ode").sample(SamplingModel(velocity=average_velocity), noise, grid("uniform").make(steps), None)
        torch.testing.assert_close(out, noise * math.e)


def test_ode_sampler_equals_integrate_for_an_instantaneous_velocity():
    velocity = lambda x, t: -x * t.view(-1, 1) + 0.1  # noqa: E731
    noise = torch.randn(4, 3, dtype=torch.float64)
    time_grid = grid("edm").make(5)
    expected = distillkit.integrate(velocity, noise, time_grid, "rk3")
    out = sampler("ode", "rk3").sample(SamplingModel.from_velocity(velocity), noise, time_grid, None)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ode_sampler_nfe_must_be_a_multiple_of_the_stages():
    assert sampler("ode", "rk3").steps_for_nfe(6) == 2
    with pytest.raises(ValueError, match="rk3 spends 3 evaluations per step"):
        sampler("ode", "rk3").steps_for_nfe(4)


def test_generate_does_not_depend_on_the_batch_size():
    spec = distillkit.DataSpec((2,))
    model = SamplingModel(denoise=lambda x, t: 0.3 * x)
    chosen = sampler("consistency")
    time_grid = grid("uniform").make(3)
    a = generate(lambda cond: model, chosen, spec, 10, 7, time_grid, batch_size=3)
    b = generate(lambda cond: model, chosen, spec, 10, 7, time_grid, batch_size=7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = generate(lambda cond: model, chosen, spec, 10, 8, time_grid, batch_size=7)
    assert not torch.equal(a[:-1], c[:-1])  # sample i is seed + i: seed 8's sample 0 is seed 7's sample 1
    torch.testing.assert_close(a[1:], c[:-1], rtol=0, atol=0)


def test_fresh_noise_is_per_sample_and_per_draw():
    first = fresh_noise_source(100, 4, (3,))
    shifted = fresh_noise_source(101, 3, (3,))
    torch.testing.assert_close(first(0)[1:], shifted(0), rtol=0, atol=0)
    assert not torch.equal(first(0), first(1))


# ------------------------------------------------------------------------------------------------
# the seeded batch loop


def _conditional_velocity(device):
    """A small conv velocity field whose output depends on the batch's labels (a real network's
    kernels, so the CUDA path copies what a sampler computes)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).to(device)
    embed = torch.nn.Embedding(3, 2).to(device)

    def velocity_for(cond):
        return lambda x, t: conv(x) * t.view(-1, 1, 1, 1) + embed(cond).view(-1, 2, 1, 1)

    return velocity_for


def _batch_by_batch(velocity_for, spec, n, seed, time_grid, batch_size, device, labels):
    """sample_seeded as the plain loop it stands for: each batch's prior noise integrated, copied
    back with a blocking ``.cpu()``, the batches concatenated."""
    parts = []
    for start in range(0, n, batch_size):
        noise = prior_noise(min(batch_size, n - start), spec.shape, seed + start).to(device)
        cond = labels[start : start + len(noise)].to(device)
        parts.append(integrate(velocity_for(cond), noise, time_grid, "heun").cpu())
    return torch.cat(parts)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_sample_seeded_is_the_batches_of_integrate_on_prior_noise(device):
    """Bitwise the blocking loop, on the CPU and (non-blocking copies into pinned memory) on CUDA."""
    spec = distillkit.DataSpec((2, 5, 5), num_classes=3)
    velocity_for = _conditional_velocity(device)
    labels = torch.arange(23) % 3
    time_grid = grid("uniform").make(3)
    for n, batch_size in ((23, 5), (23, 23), (4, 10)):
        got = sample_seeded(velocity_for, spec, n, 11, time_grid, "heun", batch_size=batch_size, device=device,
                            labels=labels[:n])
        expected = _batch_by_batch(velocity_for, spec, n, 11, time_grid, batch_size, device, labels)
        assert got.device.type == "cpu" and got.shape == (n, 2, 5, 5)
        assert got.is_pinned() == (device == "cuda")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert sample_seeded(velocity_for, spec, 0, 11, time_grid, "heun", device=device).shape == (0, 2, 5, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_is_generate_on_the_cpu_for_a_device_independent_model():
    spec = distillkit.DataSpec((3,))
    model = SamplingModel(denoise=lambda x, t: 0.5 * x + t.view(-1, 1))
    time_grid = grid("uniform").make(3)
    on_cpu = generate(lambda cond: model, sampler("consistency"), spec, 9, 7, time_grid, batch_size=4)
    on_cuda = generate(lambda cond: model, sampler("consistency"), spec, 9, 7, time_grid, batch_size=4, device="cuda")
    assert on_cuda.device.type == "cpu"
    torch.testing.assert_close(on_cuda, on_cpu)


# ------------------------------------------------------------------------------------------------
# grids


def test_karras_sigma_grid_maps_sigma_to_t_and_starts_at_noise():
    sigma_min, sigma_max, rho, steps = 0.002, 80.0, 7.0, 4
    sigmas = [(sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
              for i in range(steps)]
    expected = [s / (1 + s) for s in sigmas] + [0.0]
    made = grid("karras-sigma", start_at_noise=False).make(steps)
    assert made.tolist() == pytest.approx(expected, rel=1e-12)
    assert grid("karras-sigma").make(steps).tolist() == pytest.approx([1.0, *expected[1:]], rel=1e-12)
    # consistency models' N = 18 points: 11 of the 17 intervals start above t = 0.5 (sigma > 1);
    # the same rho-schedule in t puts only a few there
    karras = grid("karras-sigma", start_at_noise=False).make(18)[:-1]
    assert int((karras[:-1] > 0.5).sum()) == 11
    assert int((distillkit.edm_grid(17, t_end=0.002)[:-1] > 0.5).sum()) <= 3


def test_edm_and_uniform_grids_are_the_core_functions():
    assert torch.equal(grid("uniform").make(3), distillkit.uniform_grid(3))
    assert torch.equal(grid("edm", rho=3.0).make(4), distillkit.edm_grid(4, rho=3.0))


def test_explicit_grid_takes_the_users_points_and_refuses_other_step_counts():
    made = grid("explicit", points="1,0.5,0.2,0").make(3)
    assert made.tolist() == [1.0, 0.5, 0.2, 0.0]
    with pytest.raises(TimeGridError, match="has 3 steps"):
        grid("explicit", points="1,0.5,0.2,0").make(2)
    with pytest.raises(ConfigError, match="sample.grid_options.points"):
        grid("explicit", points="1,0.5,0.7")


# ------------------------------------------------------------------------------------------------
# resolution


def test_a_run_defaults_to_its_methods_sampler_and_refuses_one_it_cannot_use():
    cd = resolve(RunConfig(method="cd", dataset="toy2d", teacher="toy2d-exact"), registries())
    assert cd.sampler.name == "consistency"
    assert cd.to_dict()["sample"]["sampler"] == "consistency"
    fm = resolve(RunConfig(method="fm", dataset="toy2d"), registries())
    assert fm.sampler.describe() == "ode/euler"

    class VelocityOnly(distillkit.Method):
        name = "velocity-only-test"
        provides = frozenset({"velocity"})

        def loss(self, student, batch, generator, step):
            raise AssertionError

    # every sampler that only needs a velocity is listed (the step-size samplers of meanflow and
    # shortcut read a plain velocity as an Euler step), never one that needs a denoiser
    with pytest.raises(ConfigError, match="a sampler method velocity-only-test can use: cud-heun, .*ode"):
        build_sampler(registries(), "consistency", {}, "euler", method_cls=VelocityOnly)


def test_unknown_sampler_and_grid_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="sample.sampler_options.nope"):
        sampler("consistency", nope=1)
    with pytest.raises(ConfigError, match="sample.grid_options.rho"):
        grid("edm", rho=-1.0)
    with pytest.raises(ConfigError, match="unknown sampler"):
        sampler("no-such-sampler")


def test_cud_heun_sampler_is_the_papers_heun_sampler_on_the_uniform_grid():
    from distillkit_cud import heun_sample

    velocity = lambda x, t: torch.sin(3 * x) * t.view(-1, 1) - x  # noqa: E731
    noise = torch.randn(6, 2, dtype=torch.float64)
    chosen = sampler("cud-heun")
    for nfe in (1, 3, 7):
        steps = chosen.steps_for_nfe(nfe)
        out = chosen.sample(SamplingModel.from_velocity(velocity), noise, grid("uniform").make(steps), None)
        torch.testing.assert_close(out, heun_sample(velocity, noise, nfe), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="odd number"):
        chosen.steps_for_nfe(4)


def test_explicit_grid_must_run_from_noise_to_data():
    with pytest.raises(ConfigError, match="decrease from noise to data"):
        grid("explicit", points="0,0.5,1")


def test_consistency_sampler_spends_every_evaluation_even_below_the_models_data_end():
    calls = []

    def f(x, t):
        calls.append(float(t[0]))
        return 0.5 * x

    noise = torch.ones(2, 1, dtype=torch.float64)
    # karras-sigma's last interior point (0.001996) lies under t_min = 0.002
    time_grid = grid("karras-sigma").make(3)
    assert float(time_grid[-2]) < 0.002
    out = sampler("consistency").sample(SamplingModel(denoise=f, t_min=0.002), noise, time_grid, generator_noise(0, (2, 1)))
    assert len(calls) == 3 and calls[-1] == pytest.approx(0.002)
    assert torch.isfinite(out).all()
