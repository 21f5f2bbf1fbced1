"""What an evaluation measures and how it samples: one ``EvalSettings`` for the end of a run,
``distillkit eval``, ``distillkit compare`` and the benchmarks."""

from __future__ import annotations

from typing import Any

import attrs

from ..arguments import DEFAULT_BATCH


def _frozen_dict(value: Any) -> dict:
    return dict(value or {})


@attrs.frozen
class EvalSettings:
    """Empty strings mean "the run's own": ``sampler`` its ``sample.sampler`` (or its method's
    default sampler), ``integrator`` its ``sample.integrator``, ``grid`` its ``sample.grid``.

    ``sampler_options`` / ``grid_options`` are added to the run's own options when the sampler /
    grid is the run's, and replace them otherwise. ``metric_options`` maps a metric name to its
    options (its ``config_class`` fields). ``teacher`` is the reference velocity of ``ode_error``
    (a run id, a checkpoint, a teacher name), logged as ``ode_error_teacher``.
    """

    metrics: tuple[str, ...]
    nfes: tuple[int, ...]
    n: int
    seed: int
    integrator: str = ""
    grid: str = ""
    weights: str = "ema"
    batch_size: int = DEFAULT_BATCH
    teacher: str = ""
    data_root: str = ""
    sampler: str = ""
    sampler_options: dict = attrs.field(factory=dict, converter=_frozen_dict)
    grid_options: dict = attrs.field(factory=dict, converter=_frozen_dict)
    metric_options: dict = attrs.field(factory=dict, converter=_frozen_dict)


def distribution_metric(spec) -> str:
    """The distribution distance the end-of-run table reports: pixels' Fréchet distance for images,
    the energy distance otherwise."""
    return "fd_pixels" if spec.is_image else "energy"


def default_metrics(spec, dataset: Any = None) -> tuple[str, ...]:
    """What ``eval`` and ``compare`` measure unless ``--metric`` says otherwise: the end-of-run
    metric, the classifier distance where the dataset has a classifier recipe, the ODE error.
    ``dataset``: a ``Dataset`` instance (None: no classifier distance)."""
    extra: tuple[str, ...] = ()
    if spec.is_image and dataset is not None and dataset.classifier_recipe() is not None:
        extra = ("classifier_fd",)
    return (distribution_metric(spec), *extra, "ode_error")
