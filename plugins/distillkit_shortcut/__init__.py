"""Shortcut models (Frans et al. 2025) as a distillkit plugin: the method ``shortcut`` (trained
from scratch, no teacher) and its sampler ``shortcut`` (each step taken with d = its own size).

It uses only the public ``distillkit`` API, exactly as a third-party package would.
"""

from __future__ import annotations

from distillkit import hookimpl

from .method import STEP, Shortcut, ShortcutConfig, ShortcutSampler, step_level

__all__ = ["STEP", "Shortcut", "ShortcutConfig", "ShortcutSampler", "step_level"]


@hookimpl
def distillkit_register_methods(register):
    register(Shortcut)


@hookimpl
def distillkit_register_samplers(register):
    register(ShortcutSampler)
