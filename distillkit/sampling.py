"""Sampling: prior noise, fresh noise and the seeded batch loop that runs a registered sampler.

Sample i always starts from the noise drawn with seed ``seed + i`` and, for samplers that
re-noise, draws its k-th fresh noise from a seed made of (seed + i, k); so a sample does not
change with the batch size or the number of samples asked for.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .contracts import DataSpec, NoiseSource, Sampler, SamplingModel, VelocityFn
from .integrators.grids import edm_grid, uniform_grid
from .integrators.stepper import integrate
from .integrators.tableau import ButcherTableau

#: Small models on CPU: batches this large keep memory modest and the passes efficient.
DEFAULT_BATCH = 500


def prior_noise(
    n: int, shape: tuple[int, ...], seed: int, *, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """``n`` standard normal samples of ``shape``; sample i drawn from its own generator seeded ``seed + i``."""
    generator = torch.Generator()
    rows = []
    for i in range(n):
        generator.manual_seed(seed + i)
        rows.append(torch.randn(shape, generator=generator, dtype=dtype))
    return torch.stack(rows).to(device)


def steps_for_nfe(tableau: ButcherTableau, nfe: int) -> int:
    """Steps of ``tableau`` that spend exactly ``nfe`` network evaluations."""
    if nfe % tableau.stages:
        raise ValueError(f"{tableau.name} spends {tableau.stages} evaluations per step; {nfe} is not a multiple")
    return nfe // tableau.stages


def sampling_grid(kind: str, steps: int, options: Optional[dict] = None) -> torch.Tensor:
    """A grid of the registered family ``kind`` from noise (t = 1) to data (t = 0)."""
    from .plugin_manager import get_registries
    from .resolve import build_grid

    return build_grid(get_registries(), kind, options or {}).make(steps)


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    time_grid: torch.Tensor,
    integrator: str | ButcherTableau = "euler",
    *,
    batch_size: Optional[int] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``noise`` along ``time_grid``, in batches."""
    if batch_size is None or batch_size >= len(noise):
        return integrate(velocity_fn, noise, time_grid, integrator, callback=callback)
    parts = [
        integrate(velocity_fn, chunk, time_grid, integrator, callback=callback)
        for chunk in noise.split(batch_size)
    ]
    return torch.cat(parts)


def fresh_seed(sample_seed: int, k: int) -> int:
    """The seed of sample ``sample_seed``'s k-th fresh noise: a fixed mix of the two, apart from
    every prior-noise seed ``seed + i`` for the sizes in use (a 63-bit odd-multiplier hash)."""
    return (sample_seed * 0x9E3779B97F4A7C15 + (k + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def fresh_noise_source(first_seed: int, count: int, shape: tuple[int, ...], *,
                       device: torch.device | str = "cpu", dtype=torch.float32) -> NoiseSource:
    """``fresh_noise(k)`` for samples ``first_seed .. first_seed + count - 1``: sample i's k-th
    draw comes from its own generator seeded ``fresh_seed(first_seed + i, k)``."""
    generator = torch.Generator()

    def draw(k: int) -> torch.Tensor:
        rows = []
        for i in range(count):
            generator.manual_seed(fresh_seed(first_seed + i, k))
            rows.append(torch.randn(shape, generator=generator, dtype=dtype))
        return torch.stack(rows).to(device)

    return draw


class _Gathered:
    """The batches' results in one preallocated CPU tensor. From a CUDA device each batch is copied
    without blocking into pinned memory, and that copy is waited for one batch later (or before
    the tensor is returned): with a blocking ``.cpu()`` the CPU waits for every batch and the GPU
    then idles until the next one is queued, and a final ``torch.cat`` copies every sample again."""

    def __init__(self, n: int, asynchronous: bool):
        self.n = n
        self.asynchronous = asynchronous  # pinned memory needs CUDA
        self.out: Optional[torch.Tensor] = None
        self.pending = None  # the CUDA event after the previous batch's copy

    def put(self, start: int, result: torch.Tensor) -> None:
        if self.out is None:  # the result's dtype and shape are known only now
            self.out = torch.empty((self.n, *result.shape[1:]), dtype=result.dtype, pin_memory=self.asynchronous)
        self.out[start : start + len(result)].copy_(result, non_blocking=self.asynchronous)
        if self.asynchronous and result.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(result.device))
            previous, self.pending = self.pending, event
            if previous is not None:  # the CPU stays at most one batch ahead of the GPU
                previous.synchronize()

    def result(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Every batch's samples, their copies complete."""
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None
        return self.out if self.out is not None else torch.empty(0, *shape)


def _seeded_batches(
    run_batch: Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor],
    spec: DataSpec, n: int, seed: int, *, batch_size: int, device: torch.device | str,
    labels: Optional[torch.Tensor],
) -> torch.Tensor:
    """``run_batch(noise, cond, first_seed)`` over batches of prior noise, results on the CPU."""
    device = torch.device(device)
    asynchronous = device.type == "cuda"

    def noise_at(start: int) -> torch.Tensor:
        noise = prior_noise(min(batch_size, n - start), spec.shape, seed + start)
        return noise.pin_memory().to(device, non_blocking=True) if asynchronous else noise.to(device)

    gathered = _Gathered(n, asynchronous)
    starts = list(range(0, n, batch_size))
    noise = noise_at(0) if starts else None
    for index, start in enumerate(starts):
        cond = None if labels is None else labels[start : start + len(noise)].to(device)
        result = run_batch(noise, cond, seed + start)  # queued on the GPU
        # The next batch's noise is drawn on the CPU while the GPU works on this one; only then
        # is this batch's copy back queued (a copy queued after the next batch would wait for
        # that batch too, and leave the GPU idle while the CPU draws).
        noise = noise_at(starts[index + 1]) if index + 1 < len(starts) else None
        gathered.put(start, result)
    return gathered.result(spec.shape)


@torch.no_grad()
def sample_seeded(
    velocity_for: Callable[[Optional[torch.Tensor]], VelocityFn],
    spec: DataSpec,
    n: int,
    seed: int,
    time_grid: torch.Tensor,
    integrator: ButcherTableau | str,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``n`` solves of a velocity field (on the CPU) with a Butcher tableau: sample i starts from
    ``prior_noise`` with seed ``seed + i`` and, for class-conditional models, label ``labels[i]``.
    ``velocity_for(cond)`` returns the velocity field for a batch's labels. The high-accuracy
    reference solves of ``ode_error`` use this; trained models are sampled with ``generate``."""

    def run(noise, cond, first_seed):
        return integrate(velocity_for(cond), noise, time_grid, integrator)

    return _seeded_batches(run, spec, n, seed, batch_size=batch_size, device=device, labels=labels)


@torch.no_grad()
def generate(
    model_for: Callable[[Optional[torch.Tensor]], SamplingModel],
    sampler: Sampler,
    spec: DataSpec,
    n: int,
    seed: int,
    time_grid: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``n`` samples (on the CPU) from a registered ``sampler``: sample i starts from the prior
    noise of seed ``seed + i``, draws fresh noise from its own seeds, and gets label ``labels[i]``.
    ``model_for(cond)`` is ``lambda cond: method.sampling_model(network, cond)``."""

    def run(noise, cond, first_seed):
        fresh = fresh_noise_source(first_seed, len(noise), spec.shape, device=noise.device, dtype=noise.dtype)
        return sampler.sample(model_for(cond), noise, time_grid, fresh)

    return _seeded_batches(run, spec, n, seed, batch_size=batch_size, device=device, labels=labels)
