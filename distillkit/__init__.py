"""distillkit: distil diffusion / flow-matching models into few-step samplers.

The public API that plugins and users import. The core never imports a plugin; the built-in
methods, integrators, backbones and datasets arrive through the ``distillkit`` entry-point group.
"""

from .contracts import (
    OUTPUT_HEADS,
    STUDENT,
    Backbone,
    Batch,
    DataSpec,
    Dataset,
    DenoiseFn,
    LossOutput,
    Method,
    MethodContext,
    Metric,
    MetricContext,
    NoiseSource,
    NoOptions,
    PrepareContext,
    Sampler,
    SamplerContext,
    SamplingModel,
    StepVelocityFn,
    Teacher,
    TeacherContext,
    TimeGrid,
    Update,
    VelocityFn,
)
from . import validators
from .errors import ConfigError, DistillkitError, TimeGridError, UnknownNameError, UsageError
from .hookspecs import hookimpl
from .files import generate_once, identity_mismatch, load_payload, read_cached, save_atomic, write_atomic
from .numerics import (
    FD_STEP,
    JVP_MODES,
    TargetNetwork,
    broadcast_time,
    combine_slopes,
    ema_update_,
    forward_mode_safe,
    generator_x0,
    rk_slopes,
    rk_step_per_sample,
    same_dropout,
    straight_path,
    uniform_time,
    unwrap_module,
)
from .integrators.tableau import ButcherTableau
from .plugin_manager import get_registries
from .integrators import edm_grid, explicit_grid, integrate, uniform_grid, validate_time_grid
from .teachers import load_teacher
from .trained import TrainedModel, copy_teacher_weights, find_checkpoint, load_trained_model, teacher_network
from .export import load_generator
from .training.api import train
from .training.checkpoint import load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "OUTPUT_HEADS",
    "STUDENT",
    "DenoiseFn",
    "Metric",
    "MetricContext",
    "NoiseSource",
    "Sampler",
    "SamplerContext",
    "SamplingModel",
    "StepVelocityFn",
    "TimeGrid",
    "Update",
    "Backbone",
    "Batch",
    "ButcherTableau",
    "ConfigError",
    "DataSpec",
    "Dataset",
    "DistillkitError",
    "LossOutput",
    "Method",
    "MethodContext",
    "NoOptions",
    "PrepareContext",
    "Teacher",
    "TeacherContext",
    "TrainedModel",
    "copy_teacher_weights",
    "teacher_network",
    "find_checkpoint",
    "load_trained_model",
    "load_teacher",
    "load_generator",
    "load_checkpoint",
    "train",
    "TimeGridError",
    "UnknownNameError",
    "UsageError",
    "VelocityFn",
    "get_registries",
    "hookimpl",
    "integrate",
    "uniform_grid",
    "edm_grid",
    "explicit_grid",
    "validate_time_grid",
    "validators",
    "TargetNetwork",
    "broadcast_time",
    "combine_slopes",
    "ema_update_",
    "generate_once",
    "identity_mismatch",
    "load_payload",
    "read_cached",
    "rk_slopes",
    "rk_step_per_sample",
    "save_atomic",
    "straight_path",
    "uniform_time",
    "generator_x0",
    "unwrap_module",
    "write_atomic",
    "JVP_MODES",
    "FD_STEP",
    "same_dropout",
    "forward_mode_safe",
]
