"""Every registered sampler passes the Sampler conformance base (distillkit.testing.samplers),
and the built-ins' own closed forms: ``ode`` with an instantaneous velocity is
``distillkit.integrate`` bit for bit; ``consistency`` with the exact denoiser of a point mass
returns the point."""

from __future__ import annotations

import torch

import distillkit
from distillkit import SamplingModel
from distillkit.resolve import build_sampler
from distillkit.testing.samplers import SamplerConformance, seeded_fresh_noise


class TestOdeEuler(SamplerConformance):
    sampler_name = "ode"


class TestOdeRk4(SamplerConformance):
    sampler_name = "ode"
    integrator = "rk4"


class TestOdeHeunOnTheEdmGrid(SamplerConformance):
    sampler_name = "ode"
    integrator = "heun"

    def time_grid(self, steps):
        return distillkit.edm_grid(steps)


class TestConsistency(SamplerConformance):
    sampler_name = "consistency"


class TestCudHeun(SamplerConformance):
    sampler_name = "cud-heun"


class TestMeanFlow(SamplerConformance):
    sampler_name = "meanflow"


class TestShortcut(SamplerConformance):
    sampler_name = "shortcut"


def test_every_built_in_sampler_has_a_conformance_class_here():
    from distillkit.testing.registered import built_in_names

    names = built_in_names("samplers")
    assert names and names <= {cls.sampler_name for cls in SamplerConformance.__subclasses__()}


def test_ode_with_an_instantaneous_velocity_is_integrate_bitwise():
    def field(x, t):
        return torch.sin(3 * x) * t.view(-1, 1) - 0.5 * x

    noise = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    for name in ("euler", "heun", "rk3", "rk4"):
        sampler = build_sampler(distillkit.get_registries(), "ode", {}, name)
        for grid in (distillkit.uniform_grid(5), distillkit.edm_grid(3)):
            out = sampler.sample(SamplingModel.from_velocity(field), noise, grid, seeded_fresh_noise(noise.shape))
            assert torch.equal(out, distillkit.integrate(field, noise, grid, name)), name


def test_consistency_with_the_exact_denoiser_of_a_point_mass_returns_the_point():
    point = torch.tensor([0.25, -1.5, 2.0], dtype=torch.float64)
    # Data = the point: x_t = (1 - t) point + t eps, so the exact x0 estimate is the point itself.
    model = SamplingModel(denoise=lambda x, t: point.expand_as(x).clone(), t_min=0.002)
    sampler = build_sampler(distillkit.get_registries(), "consistency", {}, "euler")
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 2, 5):
        out = sampler.sample(model, noise, distillkit.uniform_grid(steps), seeded_fresh_noise(noise.shape))
        assert torch.equal(out, point.expand_as(out))
