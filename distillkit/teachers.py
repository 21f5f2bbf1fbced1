"""Finding the teacher a user named with ``--teacher``."""

from __future__ import annotations

from .contracts import Teacher, TeacherContext
from .errors import ConfigError, did_you_mean
from .plugin_manager import Registries


def load_teacher(spec: str, registries: Registries, context: TeacherContext) -> Teacher:
    """The teacher registered under ``spec``, else the first registered teacher (by name) whose
    ``from_spec`` accepts it (a checkpoint file, an MLflow run id, ...)."""
    if spec in registries.teachers:
        teacher = registries.teachers.get(spec).from_spec(spec, context)
        if teacher is not None:
            return teacher
    for entry in registries.teachers:
        teacher = entry.obj.from_spec(spec, context)
        if teacher is not None:
            return teacher
    names = ", ".join(registries.teachers.names()) or "none installed"
    raise ConfigError("teacher", spec, f"an MLflow run id, a checkpoint file, or a teacher name ({names})"
                      f"{did_you_mean(spec, registries.teachers.names())}")
