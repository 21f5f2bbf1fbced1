"""Rectified flow's reflow and k-step distillation (Liu, Gong and Liu, ICLR 2023; METHODS.md §8.2),
in the project's convention (t = 0 data, t = 1 noise). RF's own convention runs the other way
(t' = 1 - t, v' = -v); the map is exact and the recipes are otherwise unchanged.

Both methods train on fixed pairs (eps, Z), Z = ODE_teacher(eps), generated once in ``prepare``:

``rf-reflow``  t ~ U(t_min, 1), x_t = (1 - t) Z + t eps, L = ||v(x_t, t) - (eps - Z)||^2
``rf-distill`` the same loss with t restricted to the k start times of the k-step Euler sampler
               (grid t_0 = 1 > t_1 > ... > t_{k-1}); k = 1 trains only at t = 1, where x_1 = eps and
               the loss is ||eps - v(eps, 1) - Z||^2, the one-step sample against Z.

The student starts from the teacher's weights when the shapes match (RF fine-tunes k-RF into
(k+1)-RF, and distils the model whose pairs it uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs
import torch
from torch.nn.functional import mse_loss

import distillkit
from distillkit import validators
from distillkit import Batch, LossOutput, Method, generate_once, straight_path, uniform_time

from .pairs import SEED_OFFSET, PairDataset, generate_pairs, load_pairs, pair_grid
from distillkit import copy_teacher_weights

GRIDS = ("uniform", "edm")


def _grid(instance, attribute, value):
    validators.require(value in GRIDS, attribute, value, "one of " + ", ".join(GRIDS))


def _existing_file(instance, attribute, value):
    validators.require(isinstance(value, str) and (value == "" or Path(value).expanduser().is_file()), attribute, value,
           "empty (generate pairs) or an existing pairs file")


@attrs.frozen
class PairOptions:
    #: pairs generated from the teacher (RF suggests >= 1M for CIFAR-10)
    num_pairs: int = attrs.field(default=10000, validator=validators.positive_int)
    #: integrator of the teacher's ODE solve
    pair_integrator: str = attrs.field(default="rk4", validator=validators.registered_integrator)
    #: network evaluations per pair (a multiple of the integrator's stages)
    pair_nfe: int = attrs.field(default=32, validator=validators.positive_int)
    pair_grid: str = attrs.field(default="uniform", validator=_grid)
    #: reuse the pairs of an earlier run (its artifact ``pairs/reflow_pairs.pt``) instead
    pairs_file: str = attrs.field(default="", validator=_existing_file)
    #: start the student from the teacher's weights when the shapes match
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)

    def __attrs_post_init__(self):
        stages = distillkit.get_registries().integrators.get(self.pair_integrator).stages
        if self.pair_nfe % stages:
            raise distillkit.ConfigError(
                "pair_nfe", self.pair_nfe,
                f"a multiple of {stages} ({self.pair_integrator} spends {stages} evaluations per step)",
            )


@attrs.frozen
class ReflowConfig(PairOptions):
    #: t ~ U(t_min, 1)
    t_min: float = attrs.field(default=1e-5, validator=validators.unit_interval)


@attrs.frozen
class DistillConfig(PairOptions):
    #: steps of the Euler sampler the student is distilled for
    k: int = attrs.field(default=1, validator=validators.positive_int)
    #: the sampler's grid (set sample.grid to the same when evaluating)
    grid: str = attrs.field(default="uniform", validator=_grid)


class _PairMethod(Method):
    """Shared by reflow and distillation: pairs from the teacher, generated once; teacher init."""

    requires_teacher = True
    PAIRS_NAME = "reflow_pairs.pt"

    def __init__(self, config: Any, context):
        super().__init__(config, context)
        integrators = context.integrators if context.integrators is not None else distillkit.get_registries().integrators
        self.pair_tableau = integrators.get(config.pair_integrator)
        self.pairs: Optional[dict[str, Any]] = None
        self.pairs_path: Optional[Path] = None
        self.init_source = "random"

    def _wanted(self, seed: int) -> dict[str, Any]:
        """What a pairs file made for this run records (``num_pairs``: how many it holds)."""
        teacher = self.context.teacher
        return {
            "teacher": None if teacher is None else teacher.identity,
            "integrator": self.pair_tableau.name,
            "nfe": self.config.pair_nfe,
            "grid": self.config.pair_grid,
            "seed": seed + SEED_OFFSET,
            "num_pairs": self.config.num_pairs,
        }

    def network_evals_once(self) -> int:
        return self.config.num_pairs * self.config.pair_nfe  # the teacher's solves that made the pairs

    def prepare(self, student, context):
        if self.config.init_from_teacher and self.context.teacher is not None:
            self.init_source = copy_teacher_weights(student, self.context.teacher)
        shape, classes = tuple(self.context.data.shape), self.context.data.num_classes
        if self.config.pairs_file:
            self.pairs = load_pairs(self.config.pairs_file, shape, "method_options.pairs_file")
            self.pairs_path = Path(self.config.pairs_file).expanduser().resolve()
            return
        if self.context.teacher is None:
            raise distillkit.UsageError(f"{self.name} generates its pairs from a teacher: pass --teacher")
        path = Path(context.output_dir) / self.PAIRS_NAME
        wanted = self._wanted(context.seed)

        def generate() -> dict[str, Any]:
            return generate_pairs(
                self.context.teacher, shape, classes, self.config.num_pairs, self.pair_tableau,
                self.config.pair_nfe // self.pair_tableau.stages, self.config.pair_grid, wanted["seed"],
                device=context.device, progress=context.progress,
            )

        def read(found: Path) -> dict[str, Any]:
            payload = load_pairs(found, shape, "pairs")
            return {**payload, "num_pairs": len(payload["x"])}  # what it holds, whatever it says

        # A resumed run finds the pairs it generated before; other pairs are generated again.
        self.pairs = generate_once(path, wanted, generate, read=read, log_artifact=lambda p: context.log_artifact(p, "pairs"))
        self.pairs_path = path

    def train_set(self, dataset):
        if self.pairs is None:
            raise distillkit.UsageError(f"{self.name}: prepare() generates the pairs; call it before train_set()")
        return PairDataset(self.pairs)

    def _pairs_of(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.noise is None:
            raise ValueError(f"{self.name} trains on noise-sample pairs: the batch has no noise (use train_set)")
        return batch.x, batch.noise

    def tags(self):
        tags = {f"distillkit.{self.name}.init": self.init_source}
        if self.pairs is not None:
            tags[f"distillkit.{self.name}.pairs"] = (
                f"{len(self.pairs['x'])} pairs, {self.pairs.get('integrator')} NFE {self.pairs.get('nfe')} "
                f"({self.pairs.get('grid')} grid) from {self.pairs.get('teacher')}"
            )
            tags[f"distillkit.{self.name}.pairs_file"] = str(self.pairs_path)
        return tags


class Reflow(_PairMethod):
    name = "rf-reflow"
    config_class = ReflowConfig

    def loss(self, student, batch, generator, step):
        x0, eps = self._pairs_of(batch)
        t = uniform_time(x0.shape[0], generator, self.config.t_min, device=x0.device, dtype=x0.dtype)
        x_t, target = straight_path(x0, eps, t)
        return LossOutput(mse_loss(student(x_t, t, batch.cond), target))


class RectifiedDistillation(_PairMethod):
    name = "rf-distill"
    config_class = DistillConfig

    def __init__(self, config: DistillConfig, context):
        super().__init__(config, context)
        #: the k start times of the k-step sampler, from t = 1 toward the data end
        self.times = pair_grid(config.grid, config.k)[:-1]

    def tags(self):
        tags = super().tags()
        tags["distillkit.rf-distill.k"] = str(self.config.k)
        return tags

    def loss(self, student, batch, generator, step):
        x0, eps = self._pairs_of(batch)
        index = torch.randint(0, self.config.k, (x0.shape[0],), generator=generator, device=x0.device)
        t = self.times.to(device=x0.device, dtype=x0.dtype)[index]
        x_t, target = straight_path(x0, eps, t)
        return LossOutput(mse_loss(student(x_t, t, batch.cond), target))
