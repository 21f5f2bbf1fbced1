"""CUD stage 2, "additional training" for one-step generation (METHODS.md §3).

1. Trajectories, generated **once** in ``prepare`` from the teacher (a stage-1 run's EMA weights,
   sampling with its own sampling velocity: the last head of an RK2 / RK3 model): noise
   eps ~ N(0, I), the N-step Euler sampler on t_i = (N - i)/N (trajectory index i = 0 .. N-1), and at
   every index the one-step data prediction x̂0⁽ⁱ⁾ = x_{t_i} - t_i v(x_{t_i}, t_i). Only the indices
   the curriculum uses are kept, in float32 (or 8-bit, like the paper's PNG files, with
   ``quantize``). They are written to ``<run>/trajectories.pt``, logged as the run's artifact
   ``trajectories/``, and reused by every phase, by a resumed run and by later runs
   (``trajectory_file``).
   Each item of the training set is (x̂0 at the current phase's index, its eps); the phase is set by
   the method after every optimizer step.
2. The student is the teacher's main network (no look-ahead heads), initialised from the
   teacher's EMA weights; with ``student_shakedrop = "off"`` its Prior ShakeDrop is switched off
   (the paper's stage-2 code builds its student so, from a φ = 0.75 teacher).
3. Loss: x̂ = eps - v_θ(eps, 1);  L = MSE(x̂, x̂0⁽ᵏ⁾) + λ MSE(v_θ(eps, 1), sg v_θ̄(eps, 1)), where θ̄ is
   an EMA of the student (decay 0.9999, starting from the stage-1 weights) held by the method and
   evaluated in eval mode (no dropout: a deterministic target, as the paper's code).
4. Curriculum: phase p uses trajectory index k = ``phase_indices[p]`` (8, 11, 14 of 16: t = 8/16,
   5/16, 2/16) for ``steps_per_phase`` steps each; the optimizer is not reset between phases.
5. Sampling: x = eps - v(eps, 1), which the core's evaluation gets as Euler with NFE 1.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional

import attrs
import torch
from torch.nn.functional import mse_loss

import distillkit
from distillkit import validators
from distillkit import LossOutput, Method, TargetNetwork, generate_once, read_cached, unwrap_module

from .method import _to_float, check_prior_shakedrop, prior_shakedrop, without_prior_shakedrop

TRAJECTORY_FORMAT = "distillkit-cud-trajectories"
TRAJECTORY_FILE = "trajectories.pt"
#: what the student does with Prior ShakeDrop: keep the teacher's φ, or switch it off
STUDENT_SHAKEDROP = ("teacher", "off")


def _indices(instance, attribute, value):
    validators.require(
        isinstance(value, tuple) and len(value) > 0 and all(validators.is_int(v) and v >= 0 for v in value),
        attribute, value, "one or more trajectory indices >= 0",
    )


def _to_int_tuple(value):
    if isinstance(value, str):
        return tuple(int(p) for p in value.split(",") if p.strip())
    return tuple(value) if isinstance(value, (list, tuple)) else value


@attrs.frozen
class CUDStage2Config:
    """Stage-2 options; defaults are the paper's (METHODS.md §3)."""

    #: Euler steps of the teacher's trajectories (N); index i is at t = (N - i)/N
    trajectory_steps: int = attrs.field(default=16, validator=validators.positive_int)
    #: the curriculum: one phase per index, in order (the paper's 8, 11, 14 of 16)
    phase_indices: tuple[int, ...] = attrs.field(default=(8, 11, 14), converter=_to_int_tuple, validator=_indices)
    #: optimizer steps per phase; 0 splits train.max_steps evenly (the last phase takes the rest)
    steps_per_phase: int = attrs.field(default=0, validator=validators.non_negative_int)
    #: trajectories generated (the paper generates 50 000)
    num_trajectories: int = attrs.field(default=50000, validator=validators.positive_int)
    #: keep the targets as 8-bit images, as the paper's PNG files (image data only)
    quantize: bool = attrs.field(default=False, validator=validators.boolean)
    #: trajectories integrated at once during generation
    generation_batch: int = attrs.field(default=500, validator=validators.positive_int)
    #: λ of the self-EMA regulariser (0 switches it off)
    regulariser_weight: float = attrs.field(default=0.1, converter=_to_float, validator=validators.non_negative_number)
    #: decay of the student's EMA θ̄ that the regulariser pulls towards
    regulariser_decay: float = attrs.field(default=0.9999, converter=_to_float, validator=validators.unit_interval)
    #: start from the teacher's (EMA) weights, main head only
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)
    #: a trajectories.pt of an earlier run to reuse instead of generating ("" = generate)
    trajectory_file: str = attrs.field(default="")
    #: the student's Prior ShakeDrop: "teacher" keeps the backbone's (= the teacher's) φ; "off"
    #: switches it off, as the paper's stage-2 code builds its student (P2)
    student_shakedrop: str = attrs.field(default="teacher", validator=validators.one_of(*STUDENT_SHAKEDROP))

    def __attrs_post_init__(self) -> None:
        too_far = [i for i in self.phase_indices if i >= self.trajectory_steps]
        if too_far:
            raise distillkit.ConfigError(
                "phase_indices", ",".join(map(str, self.phase_indices)),
                f"indices below trajectory_steps = {self.trajectory_steps} (index i is at t = (N - i)/N)",
            )
        if not isinstance(self.trajectory_file, str):
            raise distillkit.ConfigError("trajectory_file", self.trajectory_file, "a file path or empty")


# ------------------------------------------------------------------------------------------------
# 8-bit targets (the paper saves x̂0 as PNG)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 {0 .. 255}, rounding to the nearest level (values outside are clipped)."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------
# trajectory generation


@torch.no_grad()
def generate_trajectories(
    velocity,
    shape: tuple[int, ...],
    num: int,
    steps: int,
    indices: tuple[int, ...],
    *,
    seed: int,
    batch: int,
    device: Any = "cpu",
    num_classes: Optional[int] = None,
    quantized: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Euler trajectories of ``velocity(x, t, cond)`` from seeded noise, keeping x̂0 at ``indices``.

    Returns ``noise`` [M, *shape], ``targets`` [M, len(indices), *shape] (float32 or uint8),
    ``cond`` [M] (class-conditional data: labels drawn uniformly) and the teacher evaluations spent.
    The Euler loop stops after the largest index: later steps produce nothing that is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=generator)
    cond = torch.randint(num_classes, (num,), generator=generator) if num_classes else None
    targets = torch.empty((num, len(indices), *shape), dtype=torch.uint8 if quantized else torch.float32)
    last = max(indices)
    evals = 0
    starts = range(0, num, batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="trajectories", unit="batch", leave=False)
    for start in starts:
        x = noise[start:start + batch].to(device)
        c = None if cond is None else cond[start:start + batch].to(device)
        for i in range(last + 1):
            t = (steps - i) / steps
            v = velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), c)
            evals += x.shape[0]
            for slot, index in enumerate(indices):
                if index == i:
                    prediction = (x - t * v).cpu()
                    targets[start:start + x.shape[0], slot] = quantize(prediction) if quantized else prediction
            x = x - v / steps
    out = {"noise": noise, "targets": targets, "teacher_evals": evals}
    if cond is not None:
        out["cond"] = cond
    return out


class PhaseTargets(torch.utils.data.Dataset):
    """Items ``{"x": x̂0 at the current phase's trajectory index, "noise": eps [, "cond": label]}``,
    shaped like the data (8-bit targets are dequantised here).

    ``phase`` is set by the method after every optimizer step (``after_step``) for the next one, so
    the item the trainer's in-process loader fetches at the start of step s carries phase(s)'s
    target. A loader with worker processes would fetch ahead of a phase switch; the method's loss
    refuses a batch whose phase is not its step's (see ``CUDStage2.loss``).
    """

    def __init__(self, noise: torch.Tensor, targets: torch.Tensor, cond: Optional[torch.Tensor] = None):
        self.noise, self.targets, self.cond = noise, targets, cond
        self.phase = 0
        self.served_phase = 0

    def __len__(self) -> int:
        return len(self.noise)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.served_phase = self.phase
        target = self.targets[index, self.phase]
        item = {"x": dequantize(target) if target.dtype == torch.uint8 else target, "noise": self.noise[index]}
        if self.cond is not None:
            item["cond"] = self.cond[index]
        return item


def _weights_hash(identity: str) -> str:
    """The sha256 in a checkpoint teacher's identity (the same weights reached by run id or by
    file), else the whole identity (analytic teachers)."""
    found = re.search(r"sha256:([0-9a-f]{64})", identity)
    return found.group(1) if found else identity


class CUDStage2(Method):
    """One-step distillation of a CUD stage-1 run (any trained run works as the teacher)."""

    name = "cud-stage2"
    config_class = CUDStage2Config
    requires_teacher = True
    data_changes_after_step = True  # after_step switches the phase whose targets the loader yields

    def __init__(self, config: CUDStage2Config, context):
        super().__init__(config, context)
        if config.quantize and not context.data.is_image:
            raise distillkit.ConfigError(
                "method_options.quantize", True, f"false: 8-bit targets are for images in [-1, 1], not data of shape {context.data.shape}"
            )
        # θ̄ ← μ θ̄ + (1 - μ) θ on parameters and floating buffers (distillkit.TargetNetwork)
        self._regulariser = TargetNetwork()
        self.trajectories: Optional[dict[str, Any]] = None
        self.trajectory_path: Optional[Path] = None
        self.generation_seconds = 0.0
        self.data: Optional[PhaseTargets] = None
        self.next_step = 0  # the optimizer step the next batch is for

    @property
    def regulariser(self) -> Optional[torch.nn.Module]:
        """θ̄, the student's EMA the regulariser pulls towards (None before prepare, or λ = 0)."""
        return self._regulariser.module

    # -- curriculum --------------------------------------------------------------------------

    @property
    def steps_per_phase(self) -> int:
        phases = len(self.config.phase_indices)
        return self.config.steps_per_phase or max(1, self.context.total_steps // phases)

    def phase(self, step: int) -> int:
        """The phase (0-based) of optimizer step ``step``; the last phase runs to the end."""
        return min(step // self.steps_per_phase, len(self.config.phase_indices) - 1)

    # -- the student --------------------------------------------------------------------------

    def build_student(self, backbone):
        if self.config.student_shakedrop == "off":
            return without_prior_shakedrop(backbone)
        return backbone

    def _expected_student_shakedrop(self, source) -> dict[str, Any]:
        """What the student must do with Prior ShakeDrop, given the teacher's rebuilt network."""
        return prior_shakedrop(source) if self.config.student_shakedrop == "teacher" else {"enabled": False, "phi": None}

    # -- prepare: weights from the teacher, the self-EMA, the trajectories --------------------

    def prepare(self, student, context):
        teacher = self.context.teacher
        if teacher is None:
            raise distillkit.UsageError("cud-stage2 distils a teacher: pass --teacher RUN_ID or a checkpoint file")
        if self.config.init_from_teacher:
            self._init_from_teacher(student, teacher)
        if self.config.regulariser_weight > 0:
            self._regulariser_network(student)  # then any state restored before prepare
        self._load_or_generate(context, teacher)

    def _regulariser_network(self, student) -> torch.nn.Module:
        """θ̄ (made from the student first if there is none yet), in eval mode: its pass gives the
        regulariser's target, which dropout would make noisy; the paper's code calls .eval() on
        its EMA copy. The copy is not a submodule of the student, so the student's train() or
        eval() never reaches it, and setting it here leaves the student's mode alone."""
        return self._regulariser.ensure(unwrap_module(student)).eval()

    def _init_from_teacher(self, student, teacher) -> None:
        trained = getattr(teacher, "trained", None)
        if trained is None:
            raise distillkit.ConfigError(
                "method_options.init_from_teacher", True,
                f"false: teacher {teacher.identity} has no network weights to start from",
            )
        source = getattr(trained.model, "backbone", trained.model)
        # P2: the teacher's checkpoint records the φ it was trained with; its rebuilt network must
        # use it, and this student too unless student_shakedrop = "off" switched it off.
        payload = distillkit.load_checkpoint(trained.checkpoint)  # either checkpoint format
        recorded = (payload.get("method") or {}).get("prior_shakedrop")
        check_prior_shakedrop(recorded, prior_shakedrop(source), f"teacher {trained.checkpoint}")
        check_prior_shakedrop(self._expected_student_shakedrop(source), prior_shakedrop(student), "cud-stage2 student")
        del payload
        source_config = getattr(source, "config", None)
        if self.config.student_shakedrop == "off" and prior_shakedrop(source)["enabled"]:
            source_config = attrs.evolve(source_config, shakedrop=False)  # the student's, by build_student
        if type(source) is not type(student) or source_config != getattr(student, "config", None):
            options = trained.resolved.to_dict()["backbone_options"]
            raise distillkit.ConfigError(
                "backbone", getattr(type(student), "name", type(student).__name__),
                f"the teacher's network to start from its weights: --backbone {trained.resolved.backbone_name} "
                f"with backbone_options {options}",
            )
        with torch.no_grad():
            student.load_state_dict(source.state_dict())

    def _expected(self, teacher) -> dict[str, Any]:
        """What a trajectories file fit for this run records (its indices aside)."""
        return {
            "format": TRAJECTORY_FORMAT,
            "steps": self.config.trajectory_steps,
            "num": self.config.num_trajectories,
            "quantized": self.config.quantize,
            "shape": list(self.context.data.shape),
            "teacher": _weights_hash(teacher.identity),
        }

    def _read(self, path: Path, teacher) -> tuple[Optional[dict], str]:
        """(the trajectories in ``path`` in curriculum order, "") or (None, why they do not fit)."""
        data, why = read_cached(path, self._expected(teacher))
        if data is None:
            return None, why
        stored = list(data["indices"])
        missing = [i for i in self.config.phase_indices if i not in stored]
        if missing:
            return None, f"lacks trajectory indices {missing} (it holds {stored})"
        slots = [stored.index(i) for i in self.config.phase_indices]
        data["targets"] = data["targets"][:, slots]
        return data, ""

    def _load_or_generate(self, context, teacher) -> None:
        if self.config.trajectory_file:
            path = Path(self.config.trajectory_file).expanduser()
            data, why = self._read(path, teacher)
            if data is None:
                raise distillkit.ConfigError("method_options.trajectory_file", str(path), f"a trajectories file that fits this run; it {why}")
            self.trajectories, self.trajectory_path = data, path
            return
        # A resumed run finds its own file, generated before, with the indices in curriculum order.
        own = Path(context.output_dir) / TRAJECTORY_FILE
        identity = {**self._expected(teacher), "indices": list(self.config.phase_indices)}
        self.trajectories = generate_once(
            own, identity, lambda: self._generate(context, teacher),
            log_artifact=lambda path: context.log_artifact(path, "trajectories"),
        )
        self.trajectory_path = own

    def _generate(self, context, teacher) -> dict[str, Any]:
        spec = self.context.data
        started = time.perf_counter()
        generated = generate_trajectories(
            teacher.velocity, spec.shape, self.config.num_trajectories, self.config.trajectory_steps,
            self.config.phase_indices, seed=context.seed, batch=self.config.generation_batch,
            device=context.device, num_classes=spec.num_classes, quantized=self.config.quantize,
            progress=context.progress,
        )
        self.generation_seconds = time.perf_counter() - started
        return {"teacher_identity": teacher.identity, "seed": context.seed, "seconds": self.generation_seconds,
                **generated}

    # -- the trainer's hooks ------------------------------------------------------------------

    def train_set(self, dataset):
        if self.trajectories is None:
            raise distillkit.UsageError("cud-stage2: prepare() must run before train_set()")
        data = self.trajectories
        self.data = PhaseTargets(data["noise"], data["targets"], data.get("cond"))
        self.data.phase = self.phase(self.next_step)
        return self.data

    def loss(self, student, batch, generator, step):
        phase = self.phase(step)
        if self.data is not None and self.data.served_phase != phase:
            raise distillkit.UsageError(
                f"cud-stage2: the batch for step {step} (phase {phase}) holds phase {self.data.served_phase}'s "
                "targets: the loader fetched it before the phase switch (after_step sets the phase of the next step)"
            )
        target = batch.x
        eps = batch.noise.to(target.dtype)
        ones = torch.ones(eps.shape[0], dtype=eps.dtype, device=eps.device)
        v = student(eps, ones, batch.cond)
        distill = mse_loss(eps - v, target)
        loss = distill
        metrics = {
            "loss_distill": float(distill.detach()),
            "phase": float(phase),
            "trajectory_index": float(self.config.phase_indices[phase]),
        }
        if self.config.regulariser_weight > 0:
            average = self._regulariser_network(student)  # prepare was not called: start it here
            with torch.no_grad():
                v_bar = average(eps, ones, batch.cond)
            regulariser = mse_loss(v, v_bar)
            loss = loss + self.config.regulariser_weight * regulariser
            metrics["loss_regulariser"] = float(regulariser.detach())
        return LossOutput(loss, metrics)

    def after_step(self, student, step):
        if self._regulariser.started:
            self._regulariser.update(unwrap_module(student), self.config.regulariser_decay)
        self._set_next_step(step + 1)

    def _set_next_step(self, step: int) -> None:
        self.next_step = step
        if self.data is not None:
            self.data.phase = self.phase(step)

    def state_dict(self):
        state: dict[str, Any] = {"next_step": self.next_step}
        regulariser = self._regulariser.state_dict()
        if regulariser is not None:
            state["regulariser"] = regulariser
        return state

    def load_state_dict(self, state):
        self._set_next_step(int(state.get("next_step", 0)))
        if "regulariser" in state:
            self._regulariser.load_state_dict(state["regulariser"])  # before prepare: restored when it starts

    def network_evals_per_step(self):
        return {"with_grad": 1, "no_grad": 1 if self.config.regulariser_weight > 0 else 0}

    def network_evals_once(self) -> int:
        return self.config.num_trajectories * self.config.trajectory_steps  # one Euler pass per step

    def tags(self):
        tags = {
            "distillkit.cud_stage2.phase_indices": ",".join(map(str, self.config.phase_indices)),
            "distillkit.cud_stage2.steps_per_phase": str(self.steps_per_phase),
            "distillkit.cud_stage2.quantized": str(self.config.quantize).lower(),
            "distillkit.cud_stage2.student_shakedrop": self.config.student_shakedrop,
        }
        if self.trajectories is not None:
            tags["distillkit.cud_stage2.trajectories"] = (
                f"{self.config.num_trajectories} x {self.config.trajectory_steps}-step euler"
            )
            tags["distillkit.cud_stage2.trajectory_teacher_evals"] = str(self.trajectories.get("teacher_evals", ""))
            tags["distillkit.cud_stage2.trajectory_file"] = str(self.trajectory_path)
        return tags
