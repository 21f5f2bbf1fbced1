"""Finding the teacher a user named with ``--teacher`` (or passed to ``distillkit.load_teacher``)."""

from __future__ import annotations

from typing import Any, Optional

from .contracts import DataSpec, Teacher, TeacherContext
from .errors import ConfigError, did_you_mean
from .plugin_manager import Registries, get_registries


def load_teacher(
    spec: str,
    registries: Optional[Registries] = None,
    context: Optional[TeacherContext] = None,
    *,
    data: Optional[DataSpec] = None,
    device: Any = "cpu",
    dataset: str = "",
    dataset_config: Any = None,
    runs_dir: str = "distillkit-runs",
    tracking_uri: str = "",
) -> Teacher:
    """The teacher ``spec`` names, with ``.velocity(x, t, cond)`` in distillkit's convention
    (t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, v = eps - x).

    ``spec`` is what ``--teacher`` takes: a registered teacher name, a checkpoint file, an MLflow
    run id, ``diffusers:PATH`` or ``edm:FILE[,precond=...]``. From Python, pass the student's
    ``data`` (a ``DataSpec``: the teacher must produce velocities of that shape) and ``device``;
    the CLI passes a full ``context`` instead. The teacher registered under ``spec`` is tried
    first, then every registered teacher (by name) whose ``from_spec`` accepts it.
    """
    registries = registries if registries is not None else get_registries()
    if context is None:
        if not isinstance(data, DataSpec):
            raise ConfigError("data", data, "a distillkit.DataSpec (the shape and classes of the student's data)")
        context = TeacherContext(data=data, dataset_name=dataset, dataset_config=dataset_config, device=device,
                                 runs_dir=runs_dir, tracking_uri=tracking_uri)
    if spec in registries.teachers:
        teacher = registries.teachers.get(spec).from_spec(spec, context)
        if teacher is not None:
            return teacher
    for entry in registries.teachers:
        teacher = entry.obj.from_spec(spec, context)
        if teacher is not None:
            return teacher
    names = ", ".join(registries.teachers.names()) or "none installed"
    raise ConfigError(
        "teacher", spec, f"an MLflow run id, a checkpoint file, diffusers:PATH, edm:FILE or a teacher name ({names})"
        f"{did_you_mean(spec, registries.teachers.names())}"
    )
