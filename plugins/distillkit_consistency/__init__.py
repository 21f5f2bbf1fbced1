"""Consistency models as baselines: consistency distillation ``cd`` and consistency training
``ct`` (Song et al. 2023; METHODS.md §8.3-8.4), in the project's time convention.

Written from the papers' mathematics; no code of the consistency-models repositories is used.
"""

from distillkit import hookimpl

from .method import CDConfig, CTConfig, ConsistencyDistillation, ConsistencyTraining, distance, rk_step_per_sample
from .parameterization import (
    ConsistencyFunction,
    edm_coefficients,
    implied_velocity,
    sigma_grid,
    sigma_to_t,
    start_above_t_max,
    time_grid,
    velocity_coefficients,
)
from .schedules import num_points, target_rate

__all__ = [
    "CDConfig",
    "CTConfig",
    "ConsistencyDistillation",
    "ConsistencyFunction",
    "ConsistencyTraining",
    "distance",
    "edm_coefficients",
    "implied_velocity",
    "num_points",
    "rk_step_per_sample",
    "sigma_grid",
    "sigma_to_t",
    "start_above_t_max",
    "target_rate",
    "time_grid",
    "velocity_coefficients",
]


@hookimpl
def distillkit_register_methods(register):
    register(ConsistencyDistillation)
    register(ConsistencyTraining)
