"""A distilled model as one function: noise (and labels, and fresh noise) -> samples, with the
run's sampler, time grid and NFE fixed; and that function traced into a self-contained TorchScript
module.

Inputs of every exported form:

- ``noise``: ``[n, *shape]`` standard-normal prior noise (the state at t = 1);
- ``labels``: ``[n]`` int64 class labels, for class-conditional data (else not given);
- ``fresh``: ``[K, n, *shape]`` the fresh standard-normal draws of samplers that re-noise
  (``consistency``: K = NFE - 1; ``ode`` and ``cud-heun``: K = 0). ``fresh[k]`` is what the
  sampler's ``fresh_noise(k)`` returns. Left out, it is drawn with ``torch.randn`` (so a
  ``torch.manual_seed`` fixes it); ``seeded_inputs`` gives the per-sample seeded draws with which
  the output equals ``distillkit sample``'s.

The output is the sampler's result in the data's range ([-1, 1] for images), unclamped, exactly as
``distillkit sample`` writes it.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional

import torch
from torch import nn

from ..contracts import DataSpec, Method, Sampler
from ..errors import DistillkitError, UsageError
from ..sampling import DEFAULT_BATCH, fresh_noise_source, generate, prior_noise

#: Samples in the batch the sampling loop is traced with, and in the different batch the trace is
#: checked on (a trace that kept a batch size as a constant would differ there).
TRACE_BATCH = 2
CHECK_BATCH = 3
#: Largest difference between the traced module and the eager sampler on the check batch.
TRACE_TOLERANCE = 1e-5


class Generator:
    """The sampling function of a trained network: ``generator(noise, labels, fresh)`` runs the
    registered ``sampler`` along ``time_grid`` (``nfe`` network evaluations per sample).

    ``info`` is what an export records with it (config, sampler, grid, NFE, provenance)."""

    def __init__(self, method: Method, network: nn.Module, sampler: Sampler, time_grid: torch.Tensor,
                 spec: DataSpec, nfe: int, info: Optional[dict[str, Any]] = None):
        self.method, self.network, self.sampler = method, network, sampler
        self.time_grid, self.spec, self.nfe = time_grid, spec, nfe
        self.info = dict(info or {})
        self._fresh_draws: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _model(self, labels: Optional[torch.Tensor]):
        return self.method.sampling_model(self.network, labels if self.spec.num_classes else None)

    @property
    def fresh_draws(self) -> int:
        """K: how many fresh-noise draws one sample takes (counted on a one-sample run)."""
        if self._fresh_draws is None:
            asked: list[int] = []

            def counting(k: int) -> torch.Tensor:
                asked.append(k)
                return torch.zeros(1, *self.spec.shape, device=self.device)

            noise = torch.zeros(1, *self.spec.shape, device=self.device)
            labels = torch.zeros(1, dtype=torch.int64, device=self.device)
            with torch.no_grad():
                self.sampler.sample(self._model(labels), noise, self.time_grid, counting)
            self._fresh_draws = max(asked) + 1 if asked else 0
        return self._fresh_draws

    def _check(self, noise: torch.Tensor, labels: Optional[torch.Tensor], fresh: Optional[torch.Tensor]) -> None:
        n = noise.shape[0]
        if tuple(noise.shape[1:]) != tuple(self.spec.shape):
            raise UsageError(f"noise has shape {tuple(noise.shape)}; expected [n, {', '.join(map(str, self.spec.shape))}]")
        if self.spec.num_classes and (labels is None or tuple(labels.shape) != (n,)):
            raise UsageError(f"this model is class-conditional: pass labels of shape [{n}] "
                             f"(integers 0..{self.spec.num_classes - 1})")
        if fresh is not None and tuple(fresh.shape) != (self.fresh_draws, *noise.shape):
            raise UsageError(f"fresh has shape {tuple(fresh.shape)}; expected [{self.fresh_draws}, "
                             f"{', '.join(map(str, noise.shape))}]")

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 fresh: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check(noise, labels, fresh)
        if fresh is None:
            fresh = torch.randn(self.fresh_draws, *noise.shape, dtype=noise.dtype, device=noise.device)
        return self.sampler.sample(self._model(labels), noise, self.time_grid, lambda k: fresh[k].to(noise.dtype))

    def seeded_inputs(self, n: int, seed: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(noise, labels, fresh) of samples ``seed .. seed + n - 1`` exactly as ``distillkit
        sample`` draws them (sample i: prior noise of seed ``seed + i``, its own label and fresh
        draws), so ``self(*seeded_inputs(n, s))`` equals ``sample(n, seed=s)``."""
        from ..evaluation.labels import labels_for

        noise = prior_noise(n, self.spec.shape, seed)
        draw = fresh_noise_source(seed, n, self.spec.shape)
        fresh = torch.stack([draw(k) for k in range(self.fresh_draws)]) if self.fresh_draws \
            else torch.zeros(0, n, *self.spec.shape)
        return noise, labels_for(self.spec, n, seed), fresh

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, *, labels: Optional[torch.Tensor] = None,
               batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        """``n`` samples (on the CPU), the same as ``distillkit sample --nfe NFE --seed SEED``:
        sample i from seed ``seed + i``; labels drawn per sample unless given."""
        from ..evaluation.labels import labels_for

        classes = self.spec.num_classes or 0
        if labels is None:
            labels = labels_for(self.spec, n, seed)
        elif not classes:
            raise UsageError("this model is not class-conditional: it takes no labels")
        else:
            labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
            if len(labels) != n or int(labels.min()) < 0 or int(labels.max()) >= classes:
                raise UsageError(f"labels: {n} integers in 0..{classes - 1} are needed")
        return generate(self._model, self.sampler, self.spec, n, seed, self.time_grid, batch_size=batch_size,
                        device=self.device, labels=labels)

    def to_torchscript(self) -> torch.jit.ScriptModule:
        """The whole sampling loop traced (network, sampler, the time grid as constants) under a
        scripted front that fills in the optional inputs; checked against this generator on a
        batch of another size."""
        loop = _SamplingLoop(self)
        example = _example_inputs(self, TRACE_BATCH)
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python floats taken from the time grid: they are meant to be
            # constants (the grid is part of the export). TorchScript's deprecation notice is not
            # the user's business here (docs/export.md says what the format is).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(loop, example, check_trace=False)
            front = torch.jit.script(_Front(traced, list(self.spec.shape), self.spec.num_classes or 0,
                                            self.fresh_draws))
        check = _example_inputs(self, CHECK_BATCH)
        with torch.no_grad():
            expected = self(check[0], check[1] if self.spec.num_classes else None, check[2])
            got = front(check[0], check[1] if self.spec.num_classes else None, check[2])
        error = float((expected - got).abs().max()) if expected.numel() else 0.0
        if not error <= TRACE_TOLERANCE:
            raise DistillkitError(f"the {self.sampler.describe()} sampler cannot be traced faithfully: the traced "
                                  f"module differs from it by {error:.2e} on a batch of another size")
        return front


def _example_inputs(generator: Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.Generator().manual_seed(n)
    shape = generator.spec.shape
    device = generator.device
    noise = torch.randn(n, *shape, generator=rows).to(device)
    labels = torch.randint(max(generator.spec.num_classes or 1, 1), (n,), generator=rows).to(device)
    fresh = torch.randn(generator.fresh_draws, n, *shape, generator=rows).to(device)
    return noise, labels, fresh


class _SamplingLoop(nn.Module):
    """What is traced: (noise, labels, fresh) -> samples; every input always present."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.network = generator.network  # a submodule, so the trace keeps its weights as parameters
        self._generator = [generator]  # a list: not registered as a module, not traced into attributes

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        generator = self._generator[0]
        model = generator.method.sampling_model(self.network, labels if generator.spec.num_classes else None)
        return generator.sampler.sample(model, noise, generator.time_grid, lambda k: fresh[k])


class _Front(nn.Module):
    """The exported module's interface, scripted: optional labels and fresh noise, checked shapes."""

    def __init__(self, loop: torch.jit.ScriptModule, shape: List[int], num_classes: int, fresh_draws: int):
        super().__init__()
        self.loop = loop
        self.shape = shape
        self.num_classes = num_classes
        self.fresh_draws = fresh_draws

    def forward(self, noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
                fresh: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = noise.shape[0]
        if list(noise.shape[1:]) != self.shape:
            raise RuntimeError("noise must have shape [n] + " + str(self.shape))
        if labels is None:
            if self.num_classes > 0:
                raise RuntimeError("this model is class-conditional: pass labels, int64 of shape [n]")
            labels = torch.zeros([n], dtype=torch.int64, device=noise.device)
        if fresh is None:
            size = [self.fresh_draws, n] + self.shape
            fresh = torch.randn(size, dtype=noise.dtype, device=noise.device)
        return self.loop(noise, labels, fresh)
