"""The hooks a distillkit plugin may implement.

Every hook has the register-callback form: the core calls it once per plugin with a ``register``
callable, and the plugin calls ``register(obj)`` for each thing it provides (``obj.name`` is the
name users type; ``register(obj, aliases=("other",))`` adds further names). The registry behind
``register`` checks the contract and refuses a name another plugin already took.

A plugin is a module (or any object) with functions decorated by ``distillkit.hookimpl``::

    from distillkit import hookimpl

    @hookimpl
    def distillkit_register_integrators(register):
        register(MY_TABLEAU)
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "distillkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def distillkit_register_methods(register):
    """Register training methods: subclasses of ``distillkit.Method``."""


@hookspec
def distillkit_register_integrators(register):
    """Register explicit Runge-Kutta integrators: ``distillkit.ButcherTableau`` instances."""


@hookspec
def distillkit_register_backbones(register):
    """Register networks: subclasses of ``distillkit.Backbone``."""


@hookspec
def distillkit_register_datasets(register):
    """Register data sources: subclasses of ``distillkit.Dataset``."""


@hookspec
def distillkit_register_teachers(register):
    """Register reference velocity fields: subclasses of ``distillkit.Teacher``."""


@hookspec
def distillkit_register_samplers(register):
    """Register samplers: subclasses of ``distillkit.Sampler``."""


@hookspec
def distillkit_register_grids(register):
    """Register time-grid families: subclasses of ``distillkit.TimeGrid``."""


@hookspec
def distillkit_register_metrics(register):
    """Register quality metrics: subclasses of ``distillkit.Metric``."""
