"""The contracts between the core and the plugins.

Every plugin type is a small base class here. The core calls only what these classes declare; it
never asks which method, backbone or dataset it is talking to.

Time convention everywhere: t = 0 is data, t = 1 is noise, x_t = (1 - t) * x + t * eps, and the
ground-truth velocity of that straight path is v* = eps - x. Sampling integrates dx/dt = v(x, t)
from t = 1 down to t = 0.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Optional

import attrs
import torch
from torch import nn

#: ``velocity_fn(x, t)``: ``t`` is a tensor of shape ``[batch]``; returns a tensor shaped like ``x``.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@attrs.frozen
class NoOptions:
    """Config class for a component that takes no options."""


@attrs.frozen
class DataSpec:
    """What a backbone needs to know about the data: one sample's shape and the label count."""

    shape: tuple[int, ...]
    num_classes: Optional[int] = None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@attrs.frozen
class Batch:
    """One training batch: data in [-1, 1], integer labels for class-conditional data, and, for
    methods that train on fixed couplings (reflow pairs), the noise paired with each sample."""

    x: torch.Tensor
    cond: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(value):
            return None if value is None else value.to(device, non_blocking=non_blocking)

        return Batch(self.x.to(device, non_blocking=non_blocking), move(self.cond), move(self.noise))

    @classmethod
    def from_item(cls, item: Any) -> "Batch":
        """A collated loader item: a tensor, ``(x, label)``, or a dict with ``x`` (+ ``cond``, ``noise``)."""
        if isinstance(item, dict):
            return cls(item["x"], item.get("cond"), item.get("noise"))
        if isinstance(item, (list, tuple)):
            return cls(item[0], item[1] if len(item) > 1 else None)
        return cls(item)


@attrs.frozen
class LossOutput:
    """A method's loss for one batch, and the scalars worth logging next to it."""

    loss: torch.Tensor
    #: Python numbers, or 0-dim tensors, which the trainer reads back together with the loss in
    #: the step's one wait for the device (a ``float(tensor)`` here would stall the GPU mid-step).
    metrics: dict[str, float | torch.Tensor] = attrs.field(factory=dict)


class _Named:
    """Something a registry holds: a unique ``name`` and an attrs ``config_class`` for its options."""

    name: ClassVar[str]
    config_class: ClassVar[type] = NoOptions


class Backbone(nn.Module, _Named):
    """A network that maps ``(x, t, cond)`` to an output shaped like ``x``.

    It knows nothing about methods. A method that needs extra output heads (CUD) asks the backbone
    for its decoder features (``return_features=True``) and for fresh heads that read them
    (``make_output_head``).
    """

    @classmethod
    def build(cls, config: Any, data: DataSpec) -> "Backbone":
        """Construct the backbone for data of this shape; ``config`` is an instance of ``config_class``."""
        return cls(config, data)  # type: ignore[call-arg]

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor] = None,
        *,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Network output shaped like ``x``; with ``return_features`` also the features the output
        block reads (the input of the network's own output head)."""

    @abc.abstractmethod
    def make_output_head(self) -> nn.Module:
        """A new head with the same structure as the network's own output block: it maps the
        features returned with ``return_features=True`` to an output shaped like ``x``. Its last
        layer is initialised near zero so that a new head starts as a small perturbation."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Dataset(_Named):
    """A source of training data scaled to [-1, 1], plus reference samples for quality metrics."""

    #: registered name of the backbone used when the user leaves ``--backbone auto``.
    default_backbone: ClassVar[str]

    def __init__(self, config: Any, data_root: Optional[str] = None):
        self.config = config
        self.data_root = data_root

    @property
    @abc.abstractmethod
    def spec(self) -> DataSpec:
        """Shape of one sample and number of classes (None for unconditional data)."""

    @abc.abstractmethod
    def train_set(self) -> torch.utils.data.Dataset:
        """Items are tensors shaped like ``spec.shape`` or ``(tensor, label)`` pairs."""

    @abc.abstractmethod
    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` real samples (as many as exist, if fewer) to compare generated samples against."""


@attrs.frozen
class TeacherContext:
    """What a teacher may need to load itself for a given student run."""

    data: DataSpec  # the student's data: a teacher must produce velocities of this shape
    dataset_name: str
    dataset_config: Any
    device: Any = "cpu"
    runs_dir: str = "distillkit-runs"
    tracking_uri: str = ""


class Teacher(_Named):
    """A reference velocity field: a frozen checkpoint, an EMA copy, or an analytic field."""

    #: what identifies this teacher in a student's run (run id, file hash, analytic spec).
    identity: str

    @classmethod
    def from_spec(cls, spec: str, context: TeacherContext) -> Optional["Teacher"]:
        """The teacher ``spec`` (what the user passed to ``--teacher``) names, or None if this
        class does not handle it.

        Default: a teacher answers to its own registered name and is built from the run's dataset
        options when they are of its ``config_class`` (an analytic field of that data), else from
        its ``config_class`` defaults.
        """
        if spec != cls.name:
            return None
        config = context.dataset_config if isinstance(context.dataset_config, cls.config_class) else cls.config_class()
        return cls(config)  # type: ignore[call-arg]

    @abc.abstractmethod
    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The teacher's velocity at ``(x, t)`` in the project's convention (v* = eps - x)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t)


@attrs.frozen
class PrepareContext:
    """What a method may use before training starts (``Method.prepare``).

    ``output_dir`` is the run's own folder; files a method generates once (reflow pairs,
    trajectories) go there and are logged with ``log_artifact(path, artifact_folder)`` so later
    phases and later runs reuse them instead of generating them again.
    """

    device: Any
    dataset: "Dataset"
    output_dir: Any
    log_artifact: Callable[[Any, Optional[str]], None]
    seed: int = 0
    progress: bool = True


@attrs.frozen
class MethodContext:
    """What the core hands a method when it is built.

    ``integrator`` is the tableau the user chose with ``--integrator`` (methods that take one
    step of an ODE solver in their loss use it; others ignore it) and ``integrator_name`` the name
    the user typed, since a method may give a name its own meaning (CUD's paper RK3).
    """

    data: DataSpec
    integrator: Any
    integrator_name: str
    total_steps: int
    integrators: Any = None  # the integrator Registry, for methods that look up further tableaus
    teacher: Optional["Teacher"] = None  # set for methods with ``requires_teacher``


class Method(_Named):
    """A training objective plus everything it owns: extra heads, target or EMA copies, options.

    The trainer only calls these methods. ``loss`` must be deterministic given the batch, the
    generator and the global torch RNG (dropout).
    """

    #: True when ``--integrator`` changes what this method trains.
    uses_integrator: ClassVar[bool] = False
    #: True when the method distils a teacher (``--teacher`` is then required).
    requires_teacher: ClassVar[bool] = False
    #: True when ``after_step`` changes what the training set yields (CUD stage 2 switches its
    #: trajectory phase there). Otherwise the trainer collates the next batch while the device is
    #: still busy with the current step, before ``after_step`` runs.
    data_changes_after_step: ClassVar[bool] = False

    def __init__(self, config: Any, context: MethodContext):
        self.config = config
        self.context = context

    def build_student(self, backbone: Backbone) -> nn.Module:
        """The module that is trained, averaged (EMA) and checkpointed. Default: the backbone."""
        return backbone

    def prepare(self, student: nn.Module, context: PrepareContext) -> None:
        """Called once before the first step (and again on resume): generate data from the
        teacher, initialise the student from the teacher, build target networks. Default: nothing."""

    def train_set(self, dataset: "Dataset") -> torch.utils.data.Dataset:
        """What the trainer's loader iterates. Default: the dataset's training set. A method that
        trains on generated couplings returns items ``{"x": ..., "noise": ...}`` here."""
        return dataset.train_set()

    def after_step(self, student: nn.Module, step: int) -> None:
        """Called after every optimizer step (target-network updates). Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """The method's own state beyond the student (target networks, schedules), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    @abc.abstractmethod
    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator, step: int) -> LossOutput:
        """The loss for one batch at optimizer step ``step`` (0-based)."""

    def velocity_fn(self, student: nn.Module, cond: Optional[torch.Tensor] = None) -> VelocityFn:
        """The velocity field that samplers integrate. Default: the student's output."""

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return student(x, t, cond)

        return velocity

    def network_evals_per_step(self) -> dict[str, int]:
        """Network evaluations spent per training step: ``with_grad`` and ``no_grad`` passes."""
        return {"with_grad": 1, "no_grad": 0}

    def network_evals_once(self) -> int:
        """Network evaluations behind the data this method trains on, spent once before the first
        step (a teacher's generated pairs or trajectories), whether generated in this run or
        loaded from an earlier one: a per-step count alone would hide them."""
        return 0

    def tags(self) -> dict[str, str]:
        """Extra MLflow tags describing this method's variant."""
        return {}
