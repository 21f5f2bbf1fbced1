"""Loading plugins and filling the registries.

Plugins are found through the entry-point group ``distillkit`` only: the built-in plugins of this
repository are declared in its ``pyproject.toml`` exactly as a third-party package declares its
own, so the core never imports them. Each entry point is loaded on its own; one that fails to
import, fails pluggy's validation, implements an unknown hook, raises inside a hook (any exception,
``SystemExit`` included: only ``KeyboardInterrupt`` goes through), or registers something a
registry refuses is recorded as a load error and the others carry on. Built-in plugins register
first, so a third-party plugin cannot take a built-in's name (``euler``, ``fm``, ...): its
registration is refused and reported.

Environment variables (for reproducible runs):

``DISTILLKIT_LOAD_PLUGINS``
    comma-separated allow-list of plugin names; when set (even empty) only these load.
``DISTILLKIT_DISABLE_PLUGINS``
    comma-separated block-list of plugin names.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import traceback
from typing import Any, Iterable, Optional

import attrs
import pluggy

from . import hookspecs
from .contracts import Backbone, Dataset, Method, Metric, Sampler, Teacher, TimeGrid
from .errors import RegistrationError
from .integrators.tableau import ButcherTableau
from .registry import Registry

ENTRY_POINT_GROUP = "distillkit"

#: hook name -> the registries attribute it fills
HOOK_TO_KIND = {
    "distillkit_register_methods": "methods",
    "distillkit_register_integrators": "integrators",
    "distillkit_register_backbones": "backbones",
    "distillkit_register_datasets": "datasets",
    "distillkit_register_teachers": "teachers",
    "distillkit_register_samplers": "samplers",
    "distillkit_register_grids": "grids",
    "distillkit_register_metrics": "metrics",
}


def _component_problem(base: type, obj: Any) -> Optional[str]:
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        return f"{obj!r} is not a subclass of distillkit.{base.__name__}"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        return f"{obj.__name__} does not implement {missing}"
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return f"{obj.__name__}.name must be a non-empty string"
    if not attrs.has(getattr(obj, "config_class", None)):
        return f"{obj.__name__}.config_class must be an attrs class"
    return None


def _integrator_problem(obj: Any) -> Optional[str]:
    if not isinstance(obj, ButcherTableau):
        return f"{obj!r} is not a distillkit.ButcherTableau"
    return obj.problem()


def _method_problem(obj: Any) -> Optional[str]:
    problem = _component_problem(Method, obj)
    if problem is None and obj.loss is Method.loss and obj.update_loss is Method.update_loss:
        problem = f"{obj.__name__} implements neither loss (one network) nor update_loss (several)"
    if problem is None and not isinstance(obj.default_sampler, str):
        problem = f"{obj.__name__}.default_sampler must name a sampler"
    return problem


def _sampler_problem(obj: Any) -> Optional[str]:
    problem = _component_problem(Sampler, obj)
    if problem is None and not (isinstance(obj.needs, frozenset) and obj.needs <= {"velocity", "denoise"}):
        problem = f"{obj.__name__}.needs must be a frozenset of 'velocity' and/or 'denoise'"
    return problem


def _metric_problem(obj: Any) -> Optional[str]:
    problem = _component_problem(Metric, obj)
    if problem is None and obj.applies_to not in ("any", "images"):
        problem = f"{obj.__name__}.applies_to must be 'any' or 'images'"
    return problem


def _dataset_problem(obj: Any) -> Optional[str]:
    problem = _component_problem(Dataset, obj)
    if problem is None and not isinstance(getattr(obj, "default_backbone", None), str):
        problem = f"{obj.__name__}.default_backbone must name a backbone"
    return problem


@attrs.define
class Registries:
    methods: Registry = attrs.field(factory=lambda: Registry("method", _method_problem))
    integrators: Registry = attrs.field(factory=lambda: Registry("integrator", _integrator_problem))
    backbones: Registry = attrs.field(factory=lambda: Registry("backbone", lambda o: _component_problem(Backbone, o)))
    datasets: Registry = attrs.field(factory=lambda: Registry("dataset", _dataset_problem))
    teachers: Registry = attrs.field(factory=lambda: Registry("teacher", lambda o: _component_problem(Teacher, o)))
    samplers: Registry = attrs.field(factory=lambda: Registry("sampler", _sampler_problem))
    grids: Registry = attrs.field(factory=lambda: Registry("grid", lambda o: _component_problem(TimeGrid, o)))
    metrics: Registry = attrs.field(factory=lambda: Registry("metric", _metric_problem))

    def of_kind(self, kind: str) -> Registry:
        return getattr(self, kind)


@attrs.define
class PluginInfo:
    """What ``distillkit plugins`` shows about one plugin."""

    name: str
    distribution: Optional[str] = None
    version: Optional[str] = None
    hooks: list[str] = attrs.field(factory=list)
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    errors: list[str] = attrs.field(factory=list)

    def to_json(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class PluginState:
    manager: pluggy.PluginManager
    registries: Registries
    plugins: dict[str, PluginInfo]

    @property
    def errors(self) -> dict[str, list[str]]:
        return {name: info.errors for name, info in self.plugins.items() if info.errors}

    def catalogue(self) -> dict[str, list[dict[str, Any]]]:
        """Every registered thing by kind (``methods``, ..., ``samplers``, ``grids``, ``metrics``):
        name, aliases and the plugin that provides it, sorted by name."""
        return {kind: [{"name": entry.name, "aliases": list(entry.aliases), "provider": entry.provider}
                       for entry in self.registries.of_kind(kind)]
                for kind in HOOK_TO_KIND.values()}


def _names_from_env(variable: str) -> Optional[set[str]]:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _is_builtin(ep: Optional[importlib.metadata.EntryPoint]) -> bool:
    """A plugin shipped with distillkit itself (its own distribution's entry points)."""
    return ep is not None and ep.dist is not None and ep.dist.name == "distillkit"


def _fatal(exc: BaseException) -> bool:
    """What a broken plugin may still stop: only the user's Ctrl-C. ``SystemExit`` (a plugin calling
    ``sys.exit`` at import) and every other ``BaseException`` are that plugin's error, not the tool's."""
    return isinstance(exc, KeyboardInterrupt)


def _one_line(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)
    place = f" ({where[-1].filename}:{where[-1].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{place}"


def load_plugins(
    extra_plugins: Iterable[tuple[str, Any]] = (),
    *,
    entry_points: bool = True,
) -> PluginState:
    """Build a fresh plugin manager and registries.

    ``extra_plugins`` are ``(name, plugin_object)`` pairs registered after the entry points
    (tests use this to add throw-away plugins); ``entry_points=False`` skips installed plugins.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    infos, builtin = _register_plugins(pm, _candidates(extra_plugins, entry_points))
    return PluginState(manager=pm, registries=_fill_registries(pm, infos, builtin), plugins=infos)


_Candidate = tuple[str, Any, Optional[importlib.metadata.EntryPoint]]


def _candidates(extra_plugins: Iterable[tuple[str, Any]], entry_points: bool) -> list[_Candidate]:
    """(name, object or None, entry point or None) of every plugin to load, built-ins first: a
    third-party plugin reusing a built-in plugin's name is the one ignored. The environment's
    ``DISTILLKIT_LOAD_PLUGINS`` / ``DISTILLKIT_DISABLE_PLUGINS`` filter them."""
    allowed = _names_from_env("DISTILLKIT_LOAD_PLUGINS")
    blocked = _names_from_env("DISTILLKIT_DISABLE_PLUGINS") or set()
    candidates: list[_Candidate] = []
    if entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                         key=lambda e: (not _is_builtin(e), e.name)):
            candidates.append((ep.name, None, ep))
    candidates.extend((name, obj, None) for name, obj in extra_plugins)
    return [c for c in candidates if c[0] not in blocked and (allowed is None or c[0] in allowed)]


def _register_plugins(pm: pluggy.PluginManager, candidates: list[_Candidate]
                      ) -> tuple[dict[str, PluginInfo], dict[str, bool]]:
    """Load and register each candidate with pluggy; a broken one is reported in its
    ``PluginInfo.errors``, never fatal. Returns the infos by name and which are built-in."""
    infos: dict[str, PluginInfo] = {}
    builtin: dict[str, bool] = {}
    for name, obj, ep in candidates:
        info = PluginInfo(name=name)
        if ep is not None and ep.dist is not None:
            info.distribution, info.version = ep.dist.name, ep.dist.version
        if name in infos:
            infos[name].errors.append(
                f"a second plugin named {name!r}"
                + (f" from {info.distribution}" if info.distribution else "")
                + " was ignored"
            )
            continue
        infos[name] = info
        builtin[name] = _is_builtin(ep)
        try:
            plugin = ep.load() if ep is not None else obj
            pm.register(plugin, name=name)
        except BaseException as exc:  # a broken plugin is reported, never fatal
            if _fatal(exc):
                raise
            info.errors.append(f"could not load: {_one_line(exc)}")
            continue
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            info.errors.append(f"not loaded: {exc}")
            continue
        info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
    return infos, builtin


def _fill_registries(pm: pluggy.PluginManager, infos: dict[str, PluginInfo], builtin: dict[str, bool]) -> Registries:
    """Call every register hook. Each implementation is called on its own so that what it
    registers is attributed to it and its failure touches nobody else. Built-ins first, so that
    they keep their names (a third-party plugin registering ``euler`` gets a load error, shown by
    every command); then by plugin name: pluggy's LIFO order would make the winner of a duplicate
    name depend on installation order."""
    registries = Registries()
    for hook_name, kind in HOOK_TO_KIND.items():
        registry = registries.of_kind(kind)
        impls = sorted(getattr(pm.hook, hook_name).get_hookimpls(),
                       key=lambda i: (not builtin.get(i.plugin_name, False), i.plugin_name))
        for impl in impls:
            info = infos[impl.plugin_name]

            def register(obj, *, aliases=(), _registry=registry, _info=info, _kind=kind):
                try:
                    _registry.register(obj, provider=_info.name, aliases=tuple(aliases))
                except RegistrationError as exc:
                    _info.errors.append(str(exc))
                    return
                _info.registered.setdefault(_kind, []).append(obj.name)
                _info.registered[_kind].extend(aliases)

            try:
                impl.function(register=register)
            except BaseException as exc:
                if _fatal(exc):
                    raise
                info.errors.append(f"hook {hook_name} raised {_one_line(exc)}")
    return registries


_STATE: Optional[PluginState] = None


def plugin_state() -> PluginState:
    """The process-wide plugin state, loaded on first use."""
    global _STATE
    if _STATE is None:
        _STATE = load_plugins()
    return _STATE


def get_registries() -> Registries:
    return plugin_state().registries


def reset_plugins() -> None:
    """Forget the loaded plugins (tests; after installing a plugin in the same process)."""
    global _STATE
    _STATE = None
