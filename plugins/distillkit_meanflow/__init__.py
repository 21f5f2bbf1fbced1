"""MeanFlow (Geng et al. 2025) as a distillkit plugin: the method ``meanflow`` (trained from
scratch, no teacher) and its sampler ``meanflow`` (x_r = x_t - (t - r) u over each step).

It uses only the public ``distillkit`` API, exactly as a third-party package would.
"""

from __future__ import annotations

from distillkit import hookimpl

from .method import INTERVAL, MeanFlow, MeanFlowConfig, MeanFlowSampler, average_velocity_and_derivative, sample_times

__all__ = ["INTERVAL", "MeanFlow", "MeanFlowConfig", "MeanFlowSampler", "average_velocity_and_derivative",
           "sample_times"]


@hookimpl
def distillkit_register_methods(register):
    register(MeanFlow)


@hookimpl
def distillkit_register_samplers(register):
    register(MeanFlowSampler)
