"""Continuous-time consistency models as a distillkit plugin: ``sct`` (consistency training, no
teacher) and ``scd`` (consistency distillation of a ``--teacher``), after Lu & Song 2024,
"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv 2410.11081).

Written from the paper's mathematics (and the description of NVlabs FastGen's sCM in
/work/shared/design/METHODS-ONE-STEP.md section 4); no code was copied. Uses only the public
``distillkit`` API, as a third-party plugin would. Sampling uses the registered ``consistency``
sampler through ``sampling_model`` (``denoise``: the consistency function, t_min = 0).
"""

from distillkit import hookimpl

from .method import (
    ContinuousConsistencyDistillation,
    ContinuousConsistencyTraining,
    LogVarianceHead,
    SCDConfig,
    SCMConfig,
    SCMStudent,
)
from .trigflow import (
    angle_from_time,
    consistency_output,
    linear_from_trigflow,
    time_from_angle,
    trigflow_from_linear,
    trigflow_velocity,
)

__all__ = [
    "ContinuousConsistencyDistillation",
    "ContinuousConsistencyTraining",
    "LogVarianceHead",
    "SCDConfig",
    "SCMConfig",
    "SCMStudent",
    "angle_from_time",
    "consistency_output",
    "linear_from_trigflow",
    "time_from_angle",
    "trigflow_from_linear",
    "trigflow_velocity",
]


@hookimpl
def distillkit_register_methods(register):
    register(ContinuousConsistencyTraining)
    register(ContinuousConsistencyDistillation)
