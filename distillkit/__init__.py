"""distillkit: distil diffusion / flow-matching models into few-step samplers.

The public API that plugins and users import. The core never imports a plugin; the built-in
methods, integrators, backbones and datasets arrive through the ``distillkit`` entry-point group.
"""

from .contracts import (
    Backbone,
    Batch,
    DataSpec,
    Dataset,
    LossOutput,
    Method,
    MethodContext,
    NoOptions,
    PrepareContext,
    Teacher,
    TeacherContext,
    VelocityFn,
)
from . import validators
from .errors import ConfigError, DistillkitError, TimeGridError, UnknownNameError, UsageError
from .hookspecs import hookimpl
from .integrators.tableau import ButcherTableau
from .plugin_manager import get_registries
from .integrators import edm_grid, explicit_grid, integrate, uniform_grid, validate_time_grid
from .trained import TrainedModel, copy_teacher_weights, find_checkpoint, load_trained_model, teacher_network

__version__ = "0.1.0"

__all__ = [
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
]
