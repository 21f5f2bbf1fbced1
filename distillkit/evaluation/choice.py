"""Which sampler and time grid an evaluation (or ``distillkit sample``) uses, checked up front,
and drawing the samples with it."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from ..config import to_dict
from ..contracts import Sampler, TimeGrid
from ..resolve import build_grid, build_sampler, lookup, time_grid_for
from ..sampling import DEFAULT_BATCH, generate
from .labels import labels_for


@attrs.frozen
class SamplingChoice:
    sampler: Sampler
    grid: TimeGrid

    def describe(self) -> str:
        """``<sampler>/<grid>``: how signatures name it (``ode/euler/uniform``)."""
        return f"{self.sampler.describe()}/{self.grid.name}"

    def time_grid(self, nfe: int, option: str = "--nfe") -> torch.Tensor:
        return time_grid_for(self.sampler, self.grid, nfe, option)

    def steps(self, nfe: int) -> int:
        return self.sampler.steps_for_nfe(nfe)

    def record(self) -> dict:
        """The sampler, its options and the grid, for protocols and .npz metadata."""
        tableau = self.sampler.context.integrator
        return {"name": self.sampler.name, "describe": self.sampler.describe(), "options": to_dict(self.sampler.config),
                "integrator": tableau.name, "stages": tableau.stages, "grid": self.grid.name,
                "grid_options": to_dict(self.grid.config)}


def choose_sampling(resolved, registries, *, sampler: str = "", sampler_options: Optional[dict] = None,
                    integrator: str = "", grid: str = "", grid_options: Optional[dict] = None,
                    nfes: tuple[int, ...] = ()) -> SamplingChoice:
    """The run's own sampler and grid unless named otherwise; a sampler the run's method cannot use,
    an unknown integrator or grid, or an NFE the sampler cannot spend is a one-line ConfigError."""
    sample = resolved.config.sample
    own_sampler = resolved.sampler.name
    name = sampler or own_sampler
    options = {**(sample.sampler_options if name == own_sampler else {}), **(sampler_options or {})}
    tableau = lookup(registries.integrators, "--integrator", integrator) if integrator else resolved.sample_integrator
    chosen = build_sampler(registries, name, options, tableau, method_cls=resolved.method_cls, option="--sampler")
    grid_name = grid or sample.grid
    grid_opts = {**(sample.grid_options if grid_name == sample.grid else {}), **(grid_options or {})}
    choice = SamplingChoice(chosen, build_grid(registries, grid_name, grid_opts, option="--grid"))
    for nfe in nfes:
        choice.time_grid(nfe)
    return choice


def is_own(choice: SamplingChoice, resolved) -> bool:
    return (choice.sampler.describe() == resolved.sampler.describe()
            and choice.grid.name == resolved.grid.name and choice.grid.config == resolved.grid.config)


def prefix_parts(choice: SamplingChoice, resolved) -> list[str]:
    """What names a sampler or grid other than the run's own in metric keys: another sampler by
    its description (``consistency``, ``ode-euler``), the same one with another integrator by
    that (``heun``), another grid by its name."""
    parts = []
    own = resolved.sampler
    sampler = choice.sampler
    if sampler.name != own.name:
        parts.append(sampler.describe().replace("/", "-"))
    elif sampler.describe() != own.describe():
        described = sampler.describe()
        parts.append(described[len(sampler.name) + 1:] if described.startswith(sampler.name + "/") else described)
    if choice.grid.name != resolved.grid.name or choice.grid.config != resolved.grid.config:
        parts.append(choice.grid.name)
    return parts


@torch.no_grad()
def draw(subject, choice: SamplingChoice, nfes, n: int, seed: int, *, batch_size: int = DEFAULT_BATCH,
         device: torch.device | str = "cpu") -> tuple[dict[int, torch.Tensor], Optional[torch.Tensor]]:
    """``n`` samples per NFE (CPU) from per-sample seeds ``seed + i`` (and labels, conditional data)."""
    labels = labels_for(subject.spec, n, seed)
    samples = {nfe: generate(subject.model_for, choice.sampler, subject.spec, n, seed, choice.time_grid(nfe),
                             batch_size=batch_size, device=device, labels=labels) for nfe in nfes}
    return samples, labels
