"""The contracts between the core and the plugins.

Every plugin type is a small base class here. The core calls only what these classes declare; it
never asks which method, backbone or dataset it is talking to.

Time convention everywhere: t = 0 is data, t = 1 is noise, x_t = (1 - t) * x + t * eps, and the
ground-truth velocity of that straight path is v* = eps - x. Sampling integrates dx/dt = v(x, t)
from t = 1 down to t = 0.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping, Optional

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


#: Optional backbone capabilities a method may require (checked when the run is resolved).
#: ``output_heads``: ``forward(..., return_features=True)`` and ``make_output_head()`` (CUD's
#: extra heads read the features of the network's own output block).
OUTPUT_HEADS = "output_heads"


class Backbone(nn.Module, _Named):
    """A network that maps ``(x, t, cond)`` to an output shaped like ``x``.

    It knows nothing about methods. Two things are optional and declared by class attributes, so
    that a method needing them is refused when the run is resolved, before any work:

    - ``accepts_conditioning``: the backbone takes extra scalar conditioning inputs by name (a
      step size ``d``, a second time ``r``), given as ``build(..., conditioning=("d",))`` and
      passed as ``forward(x, t, cond, extra={"d": d})`` with one value per sample. They enter the
      network's time embedding throughout, like ``t`` itself.
    - ``capabilities``: e.g. ``{"output_heads"}`` (``OUTPUT_HEADS``): decoder features
      (``return_features=True``) and fresh heads that read them (``make_output_head``).
    """

    #: True when ``build`` accepts ``conditioning`` names and ``forward`` an ``extra`` mapping.
    accepts_conditioning: ClassVar[bool] = False
    #: optional capabilities this backbone implements (``OUTPUT_HEADS``).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: the kinds of data it takes (``images``, ``vectors``), checked against the dataset's ``data_kind``
    #: when a run is resolved, before any work; None: not declared (only ``build`` checks).
    data_kinds: ClassVar[Optional[frozenset[str]]] = None

    @classmethod
    def build(cls, config: Any, data: DataSpec, conditioning: tuple[str, ...] = ()) -> "Backbone":
        """Construct the backbone for data of this shape; ``config`` is an instance of
        ``config_class``; ``conditioning`` names the extra scalar inputs ``forward`` will get."""
        if conditioning:
            return cls(config, data, conditioning=tuple(conditioning))  # type: ignore[call-arg]
        return cls(config, data)  # type: ignore[call-arg]

    @abc.abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Optional[torch.Tensor] = None,
        *,
        extra: Optional[Mapping[str, torch.Tensor]] = None,
        return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Network output shaped like ``x``. ``extra``: the conditioning inputs named at build
        time, each a tensor ``[batch]``. With ``return_features`` (``OUTPUT_HEADS`` backbones)
        also the features the output block reads (the input of the network's own output head)."""

    def make_output_head(self) -> nn.Module:
        """(``OUTPUT_HEADS``) A new head with the same structure as the network's own output
        block: it maps the features returned with ``return_features=True`` to an output shaped
        like ``x``. Its last layer is initialised near zero so that a new head starts as a small
        perturbation."""
        raise NotImplementedError(f"backbone {self.name} does not provide {OUTPUT_HEADS}")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Dataset(_Named):
    """A source of training data scaled to [-1, 1], plus reference samples for quality metrics."""

    #: registered name of the backbone used when the user leaves ``--backbone auto``.
    default_backbone: ClassVar[str]
    #: ``images`` ([C, H, W]) or ``vectors`` ([D]), so that a backbone that cannot take it is
    #: refused when the run is resolved (``Backbone.data_kinds``); None: not declared.
    data_kind: ClassVar[Optional[str]] = None

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

    def classifier_recipe(self) -> Optional[dict[str, Any]]:
        """(Optional capability) The training settings of the small classifier whose features
        ``classifier_fd`` measures in (``epochs``, ``batch_size``, ``lr``, ``holdout``), for
        labelled image data; None when the dataset has none (the default)."""
        return None

    def labelled_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(With ``classifier_recipe``) Every labelled training image in [-1, 1] and its label,
        in a fixed order: what the classifier trains on."""
        raise NotImplementedError(f"dataset {self.name} has no labelled images")



# ------------------------------------------------------------------------------------------------
# sampling: what a method exposes, samplers, time grids


#: ``step_velocity(x, t, t_next)``: the velocity a sampler steps with at ``(x, t)`` during the
#: step that ends at ``t_next`` (both tensors ``[batch]``). A model that knows its step size
#: (shortcut models, MeanFlow) uses ``t_next``; an instantaneous velocity ignores it.
StepVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``denoise(x, t)``: the model's estimate of the clean sample behind ``x`` at time ``t``.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``fresh_noise(k)``: the ``k``-th fresh standard-normal draw (k = 0, 1, ...) for the batch being
#: sampled, shaped like its prior noise; sample i's draws depend only on its own seed and k, so
#: samples do not change with the batch size.
NoiseSource = Callable[[int], torch.Tensor]


def _straight_path_x0(x: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v on the straight path x_t = (1 - t) x0 + t eps, v = eps - x0."""
    return x - t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * velocity


@attrs.frozen
class SamplingModel:
    """What a method exposes for sampling, for one batch (its labels bound in).

    A sampler uses what it ``needs`` (``Sampler.needs``): ``velocity`` (ODE samplers) and/or
    ``denoise`` (consistency-style samplers). ``t_min`` is the data end a ``denoise`` output
    lives at (consistency models: f(x, t_min) = x).
    """

    velocity: Optional[StepVelocityFn] = None
    denoise: Optional[DenoiseFn] = None
    t_min: float = 0.0

    @classmethod
    def from_velocity(cls, velocity_fn: VelocityFn) -> "SamplingModel":
        """An instantaneous velocity field: the step end is ignored; ``denoise`` is the
        straight-path estimate x0 = x - t v."""

        def step_velocity(x, t, t_next):
            return velocity_fn(x, t)

        def denoise(x, t):
            return _straight_path_x0(x, t, velocity_fn(x, t))

        return cls(velocity=step_velocity, denoise=denoise)

    @classmethod
    def from_denoiser(cls, denoise_fn: DenoiseFn, t_floor: float = 1e-3) -> "SamplingModel":
        """A denoiser (a one-step generator, x0 = denoise(x, t)): ``velocity`` is the one it implies,
        (x - x0) / t, so that one Euler step from t to 0 lands on its sample; t is floored at
        ``t_floor`` where the quotient would blow up."""

        def step_velocity(x, t, t_next):
            return (x - denoise_fn(x, t)) / t.clamp_min(t_floor).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)

        return cls(velocity=step_velocity, denoise=denoise_fn)

    def provides(self) -> frozenset[str]:
        return frozenset(name for name in ("velocity", "denoise") if getattr(self, name) is not None)


@attrs.frozen
class SamplerContext:
    """What the core hands a sampler when it is built: the sampling integrator the run or the
    command chose (``sample.integrator`` / ``--integrator``), for samplers that integrate an ODE,
    and the integrator registry for samplers that look up further tableaus."""

    integrator: Any  # a ButcherTableau
    integrators: Any = None


class Sampler(_Named):
    """Turns prior noise into samples along an explicit time grid (t = 1 -> 0).

    The core builds it as ``cls(config, context)``, asks ``steps_for_nfe`` how many grid steps an
    NFE buys, makes the grid (a registered ``TimeGrid``) and calls ``sample``. Each step hands the
    model the whole step ``(t, t_next)`` (``SamplingModel.velocity(x, t, t_next)``), so step-size
    aware models need no tricks.
    """

    #: what this sampler calls on the ``SamplingModel``: any of "velocity", "denoise".
    needs: ClassVar[frozenset[str]] = frozenset({"velocity"})

    def __init__(self, config: Any, context: SamplerContext):
        self.config = config
        self.context = context

    @abc.abstractmethod
    def steps_for_nfe(self, nfe: int) -> int:
        """Grid steps that spend exactly ``nfe`` network evaluations; ``ValueError`` with a
        sentence saying which NFEs this sampler can spend when ``nfe`` is not one of them."""

    @abc.abstractmethod
    def sample(
        self, model: SamplingModel, noise: torch.Tensor, time_grid: torch.Tensor, fresh_noise: NoiseSource
    ) -> torch.Tensor:
        """Samples from ``noise`` (the state at ``time_grid[0]``) along the validated float64
        ``time_grid``; ``fresh_noise`` for samplers that re-noise. No gradients are needed."""

    def describe(self) -> str:
        """How tables, MLflow params and metric signatures name this sampler with its options
        (``ode/rk3``, ``consistency``). Default: the registered name."""
        return self.name


class TimeGrid(_Named):
    """A family of time grids from noise (t = 1) to data (t = 0): ``make(steps)`` returns a grid
    of ``steps + 1`` points that ``distillkit.validate_time_grid`` accepts. Built as ``cls(config)``;
    options come from ``sample.grid_options``."""

    def __init__(self, config: Any = None):
        self.config = self.config_class() if config is None else config

    @abc.abstractmethod
    def make(self, steps: int) -> torch.Tensor:
        """The grid with ``steps`` steps; ``TimeGridError`` with one sentence if impossible."""


# ------------------------------------------------------------------------------------------------
# metrics


@attrs.frozen
class MetricContext:
    """What a metric may use to prepare its reference and to measure, for one evaluation.

    ``model_for(cond)`` is the evaluated model's ``SamplingModel`` for a batch of labels and
    ``velocity_for(cond)`` its instantaneous velocity (``Method.velocity_fn``); ``solve(velocity_for,
    time_grid, integrator)`` integrates a velocity field from exactly the noise (and labels) the
    evaluated samples start from, ``n`` samples on the CPU. ``reference_samples()`` gives (and
    caches) ``n`` real samples drawn with ``torch.Generator().manual_seed(seed)``.

    ``model_for`` and ``velocity_for`` are None when nothing is sampled: for a check-only subject
    (a comparison checks and prepares its metrics before any child is trained), so ``problem`` and
    ``prepare`` must not call them; ``measure`` is only ever given a context where both are set.
    They stay required fields (no default): passing None is explicit, and the field order, which
    positional callers would rely on, is unchanged.
    """

    spec: DataSpec
    dataset_name: str
    dataset: Optional[Callable[[], "Dataset"]]  # built lazily: only metrics that need real data call it
    n: int
    seed: int
    labels: Optional[torch.Tensor]
    device: Any
    batch_size: int
    model_for: Optional[Callable[[Optional[torch.Tensor]], SamplingModel]]
    velocity_for: Optional[Callable[[Optional[torch.Tensor]], VelocityFn]]
    solve: Callable[..., torch.Tensor]
    reference_samples: Callable[[], torch.Tensor]
    teacher: Optional["Teacher"] = None
    sample_config: Any = None  # the run's SampleConfig (reference integrator and steps)
    runs_dir: str = "distillkit-runs"
    data_root: str = ""
    log: Callable[[str], None] = print


class Metric(_Named):
    """A quality measure of generated samples, built as ``cls(config)``.

    The evaluator calls ``problem`` (a sentence, or None when the metric applies to this data),
    then ``prepare`` once (references, feature networks; everything that can fail fails here,
    before the first sample is drawn), then ``measure`` per NFE. ``signature`` names the reference
    a number was measured against; the evaluator records it with every number (together with the
    sample count, seeds, sampler and weights), so two numbers are comparable exactly when their
    signatures are equal.
    """

    #: one line for ``distillkit plugins`` and ``--help``.
    description: ClassVar[str] = ""
    #: "images" (3-D samples only) or "any".
    applies_to: ClassVar[str] = "any"

    def __init__(self, config: Any = None):
        self.config = self.config_class() if config is None else config

    @property
    def result_name(self) -> str:
        """The name the numbers are logged under (``ode_error`` against a teacher is
        ``ode_error_teacher``). Valid after ``prepare``."""
        return self.name

    def problem(self, context: MetricContext) -> Optional[str]:
        """Why this metric cannot measure this data (one sentence), or None."""
        if self.applies_to == "images" and not context.spec.is_image:
            return f"{self.name} measures images; {context.dataset_name} samples have shape {context.spec.shape}"
        return None

    def prepare(self, context: MetricContext) -> None:
        """Compute or load the reference. Default: nothing."""

    @abc.abstractmethod
    def measure(self, generated: torch.Tensor, context: MetricContext) -> float:
        """The metric of ``n`` generated samples (CPU tensor, sample i from seed ``seed + i``)."""

    def signature(self) -> str:
        """What identifies the reference measured against (file names, sizes). Default: empty."""
        return ""

    def details(self) -> dict[str, Any]:
        """What the protocol artifact records about the reference. Default: nothing."""
        return {}


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
    #: optional: the network behind the teacher, which ``init_from_teacher`` copies into a student
    #: of the same shapes (foreign teachers: EDM, diffusers; checkpoint teachers use ``trained``).
    network: Optional[nn.Module] = None
    #: optional: ``(backbone name, backbone options)`` that build a student of ``network``'s
    #: architecture (said to the user when the student's network does not fit).
    student_backbone: Optional[tuple[str, dict]] = None

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


@attrs.frozen
class Update:
    """One optimizer update of a training step: ``Method.update_loss(..., update)`` is
    back-propagated into ``networks`` (only theirs require gradients during it) and each of their
    optimizers steps. ``loss`` names the objective, for the method and for the logged metrics."""

    loss: str
    networks: tuple[str, ...]


#: The name of a single-network method's one trainable network.
STUDENT = "student"


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

    # -- sampling ---------------------------------------------------------------------------------
    #: the registered sampler ``run``, ``sample``, ``eval`` and ``compare`` use unless told otherwise.
    default_sampler: ClassVar[str] = "ode"
    #: the samplers this method accepts by name; None: every registered sampler whose ``needs``
    #: are in ``provides``.
    samplers: ClassVar[Optional[tuple[str, ...]]] = None
    #: what ``sampling_model`` provides: "velocity", "denoise".
    provides: ClassVar[frozenset[str]] = frozenset({"velocity", "denoise"})

    # -- what the method needs from its backbone (checked when the run is resolved) ---------------
    #: extra scalar conditioning inputs the method feeds the backbone (``d``, ``r``); the backbone
    #: must have ``accepts_conditioning``.
    conditioning: ClassVar[tuple[str, ...]] = ()
    #: optional backbone capabilities the method uses (``distillkit.contracts.OUTPUT_HEADS``).
    backbone_capabilities: ClassVar[frozenset[str]] = frozenset()

    # -- networks and updates ---------------------------------------------------------------------
    #: the network that is sampled, evaluated and averaged by the run's EMAs.
    sampling_network: ClassVar[str] = STUDENT

    def __init__(self, config: Any, context: MethodContext):
        self.config = config
        self.context = context

    def build_student(self, backbone: Backbone) -> nn.Module:
        """The module that is trained, averaged (EMA) and checkpointed. Default: the backbone."""
        return backbone

    def build_networks(self, make_backbone: Callable[..., Backbone]) -> dict[str, nn.Module]:
        """The method's trainable networks by name. ``make_backbone(conditioning=())`` builds a
        fresh backbone of the run's kind (``--backbone``, ``backbone_options``) each call.
        Default: one network, ``{"student": build_student(make_backbone(conditioning=self.conditioning))}``.
        The trainer gives each network its own optimizer, schedule, clipping and checkpoint; the
        ``sampling_network`` is sampled, and the networks in ``ema_networks`` are averaged."""
        return {STUDENT: self.build_student(make_backbone(conditioning=self.conditioning))}

    def optimizer_config(self, network: str, default: Any) -> Any:
        """The ``distillkit.config.OptimizerConfig`` of ``network``; ``default`` is the run's
        ``train`` settings (``train.optimizer``, ``train.lr``, ``train.lr_schedule``, ...).
        Default: ``default`` for every network. A two-network method returns, e.g.,
        ``attrs.evolve(default, lr=self.config.fake_score_lr)`` for its second network."""
        return default

    def ema_networks(self) -> tuple[str, ...]:
        """The networks the run's EMAs (``train.ema_decay``, ...) average. Default: the sampling one."""
        return (self.sampling_network,)

    def update_plan(self, step: int) -> tuple[Update, ...]:
        """The updates of optimizer step ``step`` (0-based), in order: which loss updates which
        networks (e.g. five fake-score updates per generator update). Must depend only on ``step``
        and the config, so that a resumed run follows the same plan. Default: one update of the
        one network with ``loss``."""
        return (Update("loss", (self.sampling_network,)),)

    def update_loss(
        self, networks: Mapping[str, nn.Module], update: Update, batch: Batch, generator: torch.Generator, step: int
    ) -> LossOutput:
        """The loss of one ``update`` of the plan. ``networks`` holds every network by name: the
        ones being updated as the trainer wraps them (DDP, compile), the others plain and frozen.
        Default: ``loss(networks[sampling_network], batch, generator, step)``; a multi-network
        method overrides this instead of ``loss``."""
        return self.loss(networks[self.sampling_network], batch, generator, step)

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

    def loss(self, student: nn.Module, batch: Batch, generator: torch.Generator, step: int) -> LossOutput:
        """The loss for one batch at optimizer step ``step`` (0-based). A single-network method
        implements this; a multi-network one implements ``update_loss`` instead. Random numbers
        come from ``generator`` (dropout from the global RNG, which the trainer checkpoints)."""
        raise NotImplementedError(f"method {self.name} implements neither loss nor update_loss")

    def velocity_fn(self, student: nn.Module, cond: Optional[torch.Tensor] = None) -> VelocityFn:
        """The velocity field that samplers integrate. Default: the student's output."""

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return student(x, t, cond)

        return velocity

    def sampling_model(self, network: nn.Module, cond: Optional[torch.Tensor] = None) -> SamplingModel:
        """What samplers use, for a batch with labels ``cond``. Default: ``velocity_fn`` as an
        instantaneous velocity, and the straight-path x0 estimate as ``denoise``. A step-size
        aware method returns a ``SamplingModel`` whose velocity reads the step end ``t_next``;
        a consistency method returns its consistency function as ``denoise``."""
        return SamplingModel.from_velocity(self.velocity_fn(network, cond))

    def network_evals_per_step(self) -> dict[str, int]:
        """Network evaluations spent per training step: ``with_grad`` and ``no_grad`` passes, and,
        for a method that differentiates the network along a tangent (MeanFlow, sCT / sCD), ``jvp``:
        the Jacobian-vector products, each a forward pass carrying a tangent (about 2-3 plain
        forwards of time and memory), counted apart so that they are not hidden among plain
        evaluations. ``jvp`` may be left out when it is 0."""
        return {"with_grad": 1, "no_grad": 0}

    def network_evals_once(self) -> int:
        """Network evaluations behind the data this method trains on, spent once before the first
        step (a teacher's generated pairs or trajectories), whether generated in this run or
        loaded from an earlier one: a per-step count alone would hide them."""
        return 0

    def tags(self) -> dict[str, str]:
        """Extra MLflow tags describing this method's variant."""
        return {}
