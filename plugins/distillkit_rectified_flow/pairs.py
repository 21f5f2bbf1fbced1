"""Noise-sample pairs generated once from a teacher's probability-flow ODE (reflow couplings).

A pair is (eps, Z) with eps ~ N(0, I) and Z = ODE_teacher(eps): the teacher's velocity integrated
from t = 1 (noise) down to t = 0 (data) with a chosen integrator, grid and number of network
evaluations. For class-conditional data each pair also gets a label drawn uniformly, with which
the teacher is asked. Pairs are saved as a ``.pt`` file of tensors (readable with
``weights_only=True``), logged as a run artifact and reused by later phases and runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

import distillkit

FORMAT = "distillkit-pairs"
VERSION = 1
#: the pairs' noise comes from its own stream, apart from the run's loader (seed) and loss (seed + 1)
SEED_OFFSET = 7919
_GENERATION_BATCH = 500


def pair_grid(kind: str, steps: int) -> torch.Tensor:
    return distillkit.edm_grid(steps) if kind == "edm" else distillkit.uniform_grid(steps)


@torch.no_grad()
def generate_pairs(
    teacher: Any,
    shape: tuple[int, ...],
    num_classes: Optional[int],
    num_pairs: int,
    tableau: distillkit.ButcherTableau,
    steps: int,
    grid: str,
    seed: int,
    device: Any = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Draw ``num_pairs`` noises (and labels) from a CPU generator seeded ``seed`` and integrate the
    teacher from each along ``pair_grid(grid, steps)`` with ``tableau``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_pairs, *shape), generator=generator)
    cond = torch.randint(0, num_classes, (num_pairs,), generator=generator) if num_classes else None
    times = pair_grid(grid, steps)
    started = time.perf_counter()
    samples = []
    chunks = range(0, num_pairs, _GENERATION_BATCH)
    for start in tqdm(chunks, disable=not progress, desc="pairs", unit="batch", leave=False):
        stop = min(start + _GENERATION_BATCH, num_pairs)
        labels = None if cond is None else cond[start:stop].to(device)
        velocity = lambda x, t, labels=labels: teacher.velocity(x, t, labels)  # noqa: E731
        samples.append(distillkit.integrate(velocity, noise[start:stop].to(device), times, tableau).cpu())
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "noise": noise,
        "x": torch.cat(samples),
        "teacher": teacher.identity,
        "integrator": tableau.name,
        "nfe": steps * tableau.stages,
        "grid": grid,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    if cond is not None:
        payload["cond"] = cond
    return payload


def load_pairs(path: str | Path, shape: tuple[int, ...], option: str) -> dict[str, Any]:
    """A pairs file, checked: its tensors must hold samples of ``shape``."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, or not a torch file
        raise distillkit.ConfigError(option, str(path), f"a readable pairs file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise distillkit.ConfigError(option, str(path), "a distillkit pairs file (written by rf-reflow or rf-distill)")
    noise, x = payload["noise"], payload["x"]
    if tuple(noise.shape[1:]) != tuple(shape) or noise.shape != x.shape:
        raise distillkit.ConfigError(
            option, str(path), f"pairs of samples shaped {tuple(shape)}; this file holds {tuple(x.shape[1:])}"
        )
    return payload


class PairDataset(torch.utils.data.Dataset):
    """Items ``{"x": sample, "noise": eps}`` (+ ``"cond"``), the form ``distillkit.Batch`` reads."""

    def __init__(self, payload: dict[str, Any]):
        self.x, self.noise, self.cond = payload["x"], payload["noise"], payload.get("cond")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"x": self.x[index], "noise": self.noise[index]}
        if self.cond is not None:
            item["cond"] = self.cond[index]
        return item
