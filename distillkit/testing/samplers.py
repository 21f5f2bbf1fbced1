"""The contract every registered ``Sampler`` must satisfy, as a reusable pytest test base.

A plugin that registers a sampler checks it with::

    from distillkit.testing.samplers import SamplerConformance

    class TestMySampler(SamplerConformance):
        sampler_name = "my-sampler"        # its registered name
        options = {}                       # its sample.sampler_options, if any

The model sampled is a fixed affine field on 3-D points, given both as a step velocity (which
records every ``(t, t_next)`` it is asked at) and as the straight-path ``denoise``, so any sampler
finds what it ``needs``. The base checks: ``steps_for_nfe`` for NFE 1..8 returns a positive step
count or refuses with a ``ValueError`` sentence; samples are shaped like the noise, finite, and
deterministic given the fresh noise; the model is evaluated exactly NFE times; ``generate``
gives the same samples whatever the batch size; and every velocity evaluation of a step is handed
that step's end ``t_next`` at a time inside the step.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from ..contracts import DataSpec, SamplingModel
from ..integrators import uniform_grid

SPEC = DataSpec((3,), None)


class RecordingModel:
    """``v(x, t) = a x + b t`` (elementwise, so batching cannot change a sample), counting calls."""

    def __init__(self, t_min: float = 0.0):
        self.calls = 0
        self.steps: list[tuple[float, float]] = []  # (t, t_next) of sample 0, per velocity call
        self.t_min = t_min

    def field(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return -0.7 * x + 0.3 * t + 0.1

    def velocity(self, x, t, t_next):
        self.calls += 1
        self.steps.append((float(t[0]), float(t_next[0])))
        return self.field(x, t)

    def denoise(self, x, t):
        self.calls += 1
        return x - t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * self.field(x, t)

    def sampling_model(self) -> SamplingModel:
        return SamplingModel(velocity=self.velocity, denoise=self.denoise, t_min=self.t_min)


def seeded_fresh_noise(shape, seed: int = 7):
    """``fresh_noise(k)`` that depends only on ``k`` (and the seed)."""
    def draw(k: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + k), dtype=torch.float64)

    return draw


class SamplerConformance:
    """Subclass with ``sampler_name`` (and ``options``) set; see the module docstring."""

    sampler_name: str = ""
    options: Optional[dict] = None
    integrator: str = "euler"
    nfes = range(1, 9)

    def make_sampler(self):
        from ..plugin_manager import get_registries
        from ..resolve import build_sampler

        return build_sampler(get_registries(), self.sampler_name, dict(self.options or {}), self.integrator)

    def time_grid(self, steps: int) -> torch.Tensor:
        """The grid an NFE's steps are taken on. Default: uniform."""
        return uniform_grid(steps)

    def spendable(self) -> list[int]:
        sampler, out = self.make_sampler(), []
        for nfe in self.nfes:
            try:
                sampler.steps_for_nfe(nfe)
            except ValueError:
                continue
            out.append(nfe)
        return out

    def run(self, nfe: int, n: int = 5, seed: int = 0, model: Optional[RecordingModel] = None):
        sampler = self.make_sampler()
        model = model or RecordingModel()
        noise = torch.randn(n, *SPEC.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grid = self.time_grid(sampler.steps_for_nfe(nfe))
        return sampler.sample(model.sampling_model(), noise, grid, seeded_fresh_noise(noise.shape)), noise, model, grid

    # -- the contract -----------------------------------------------------------------------------

    def test_steps_for_nfe_is_a_step_count_or_a_sentence(self):
        sampler = self.make_sampler()
        for nfe in self.nfes:
            try:
                steps = sampler.steps_for_nfe(nfe)
            except ValueError as exc:
                message = str(exc)
                assert " " in message.strip() and "\n" not in message, f"NFE {nfe}: {message!r}"
                continue
            assert isinstance(steps, int) and 1 <= steps <= nfe, (nfe, steps)
        assert self.spendable(), f"{self.sampler_name} can spend none of the NFEs {list(self.nfes)}"

    def test_describe_names_the_sampler(self):
        described = self.make_sampler().describe()
        assert isinstance(described, str) and described.startswith(self.sampler_name)

    def test_samples_are_shaped_like_the_noise_and_finite(self):
        for nfe in self.spendable():
            out, noise, _, _ = self.run(nfe)
            assert out.shape == noise.shape and out.dtype == noise.dtype
            assert torch.isfinite(out).all(), nfe

    def test_deterministic_given_the_fresh_noise(self):
        for nfe in self.spendable():
            first, _, _, _ = self.run(nfe)
            second, _, _, _ = self.run(nfe)
            assert torch.equal(first, second), nfe

    def test_the_model_is_evaluated_exactly_nfe_times(self):
        for nfe in self.spendable():
            _, _, model, _ = self.run(nfe)
            assert model.calls == nfe, f"NFE {nfe}: {model.calls} model evaluations"

    def test_samples_do_not_depend_on_the_batch_size(self):
        from ..sampling import generate

        sampler = self.make_sampler()
        model = RecordingModel()
        for nfe in self.spendable()[:3]:
            grid = self.time_grid(sampler.steps_for_nfe(nfe))

            def draw(batch_size: int) -> torch.Tensor:
                return generate(lambda cond: model.sampling_model(), sampler, SPEC, 10, 3, grid, batch_size=batch_size)

            assert torch.equal(draw(3), draw(7)), nfe

    def test_each_velocity_evaluation_gets_its_steps_end(self):
        if "velocity" not in type(self.make_sampler()).needs:
            pytest.skip(f"{self.sampler_name} does not call the velocity")
        for nfe in self.spendable():
            _, _, model, grid = self.run(nfe)
            points = grid.tolist()
            pairs = list(zip(points[:-1], points[1:]))
            ends = {t_next for _, t_next in model.steps}
            assert ends == {t_next for _, t_next in pairs}, (nfe, sorted(ends))
            for t, t_next in model.steps:
                t_step = next(start for start, end in pairs if end == t_next)
                assert min(t_step, t_next) - 1e-12 <= t <= max(t_step, t_next) + 1e-12, (nfe, t, t_next)
