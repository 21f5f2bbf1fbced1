"""Turning a RunConfig into the registered components it names, before any work starts."""

from __future__ import annotations

from typing import Any, Optional

import torch

import attrs

from .config import RunConfig, build_attrs, to_dict
from .contracts import Sampler, SamplerContext, TimeGrid
from .errors import ConfigError, TimeGridError, UnknownNameError, did_you_mean
from .integrators.tableau import ButcherTableau
from .plugin_manager import Registries


@attrs.frozen
class Resolved:
    """A validated run: every name looked up, every plugin option typed and checked."""

    config: RunConfig
    method_cls: type
    method_config: Any
    backbone_name: str
    backbone_cls: type
    backbone_config: Any
    dataset_cls: type
    dataset_config: Any
    integrator: ButcherTableau
    sample_integrator: ButcherTableau
    sampler: Sampler  # the run's sampler, built (its name is ``sampler.name``)
    grid: TimeGrid  # the run's time-grid family, built

    def to_dict(self) -> dict:
        """The fully resolved configuration (plugin options with their defaults filled in)."""
        tree = to_dict(self.config)
        tree["backbone"] = self.backbone_name
        tree["method_options"] = to_dict(self.method_config)
        tree["backbone_options"] = to_dict(self.backbone_config)
        tree["dataset_options"] = to_dict(self.dataset_config)
        tree["sample"]["sampler"] = self.sampler.name
        tree["sample"]["sampler_options"] = to_dict(self.sampler.config)
        tree["sample"]["grid_options"] = to_dict(self.grid.config)
        return tree

    def time_grid(self, nfe: int, option: str = "sample.nfe") -> "torch.Tensor":
        """The grid the run's sampler steps through to spend ``nfe`` network evaluations."""
        return time_grid_for(self.sampler, self.grid, nfe, option)


def lookup(registry, option: str, name: str):
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        allowed = ", ".join(registry.names()) or "none installed"
        hint = did_you_mean(name, registry.names())
        raise ConfigError(option, name, f"unknown {exc.kind}{hint}; available: {allowed}") from None


def accepted_samplers(method_cls: type, registries: Registries) -> list[str]:
    """The registered samplers a method can be sampled with: the ones it names (or every one),
    whose needs its sampling model provides."""
    names = method_cls.samplers if method_cls.samplers is not None else [e.name for e in registries.samplers]
    return [name for name in names
            if name in registries.samplers and registries.samplers.get(name).needs <= method_cls.provides]


def build_sampler(
    registries: Registries, name: str, options: dict, integrator: str | ButcherTableau, *,
    method_cls: Optional[type] = None, option: str = "sample.sampler",
) -> Sampler:
    """The sampler ``name`` with ``options`` (a ``sample.sampler_options`` table) and the ODE
    integrator ``integrator``; for ``method_cls``, refused unless the method can use it."""
    sampler_cls = lookup(registries.samplers, option, name)
    if method_cls is not None and sampler_cls.name not in accepted_samplers(method_cls, registries):
        allowed = ", ".join(accepted_samplers(method_cls, registries)) or "none installed"
        raise ConfigError(option, name, f"a sampler method {method_cls.name} can use: {allowed}")
    config = build_attrs(sampler_cls.config_class, options, "sample.sampler_options.")
    tableau = integrator if isinstance(integrator, ButcherTableau) else lookup(
        registries.integrators, "sample.integrator", integrator)
    return sampler_cls(config, SamplerContext(integrator=tableau, integrators=registries.integrators))


def build_grid(registries: Registries, name: str, options: dict, *, option: str = "sample.grid") -> TimeGrid:
    grid_cls = lookup(registries.grids, option, name)
    return grid_cls(build_attrs(grid_cls.config_class, options, "sample.grid_options."))


def steps_for(sampler: Sampler, nfe: int, option: str = "sample.nfe") -> int:
    """Grid steps for ``nfe``, or a one-line ConfigError saying which NFEs the sampler can spend."""
    try:
        return sampler.steps_for_nfe(nfe)
    except ValueError as exc:
        raise ConfigError(option, nfe, str(exc)) from None


def time_grid_for(sampler: Sampler, grid: TimeGrid, nfe: int, option: str = "sample.nfe") -> "torch.Tensor":
    steps = steps_for(sampler, nfe, option)
    try:
        return grid.make(steps)
    except TimeGridError as exc:
        raise ConfigError(option, nfe, f"{grid.name} grid: {exc}") from None


def check_data_kind(dataset_cls: type, backbone_cls: type, backbone_name: str, registries: Registries) -> None:
    """An image backbone on vectors (or the reverse) is refused before any work, when both
    declare their kinds; the message names the backbones that fit."""
    kind, kinds = dataset_cls.data_kind, backbone_cls.data_kinds
    if kind is None or kinds is None or kind in kinds:
        return
    fitting = [e.name for e in registries.backbones if e.obj.data_kinds is None or kind in e.obj.data_kinds]
    raise ConfigError("backbone", backbone_name, f"a backbone that takes {kind}, the data of dataset "
                      f"{dataset_cls.name} ({backbone_name} takes {', '.join(sorted(kinds))}): "
                      f"{', '.join(fitting) or 'none installed'}, or auto")


def check_backbone(method_cls: type, backbone_cls: type, backbone_name: str) -> None:
    """A method's needs from its backbone (extra conditioning, optional capabilities), checked
    before any work starts."""
    if method_cls.conditioning and not backbone_cls.accepts_conditioning:
        raise ConfigError("backbone", backbone_name, f"a backbone that accepts extra conditioning inputs "
                          f"({', '.join(method_cls.conditioning)}), which method {method_cls.name} feeds it")
    missing = sorted(set(method_cls.backbone_capabilities) - set(backbone_cls.capabilities))
    if missing:
        raise ConfigError("backbone", backbone_name, f"a backbone with {', '.join(missing)}, which method "
                          f"{method_cls.name} uses")


def check_integrator_used(method_cls: type, config: RunConfig) -> None:
    """``--integrator`` is the ODE step a method takes in its loss (CUD's catch-up alignment); a
    method without one would silently ignore it, while the user most likely meant how samples
    are drawn: that is the ode sampler's tableau, ``--sample-integrator``."""
    default = attrs.fields(RunConfig).integrator.default
    if config.integrator != default and not method_cls.uses_integrator:
        raise ConfigError(
            "integrator", config.integrator,
            f"method {method_cls.name} takes no integrator in its loss; to sample with "
            f"{config.integrator}, use --sample-integrator {config.integrator} (the tableau of the ode "
            f"sampler, --sampler ode)")


def resolve(config: RunConfig, registries: Registries) -> Resolved:
    method_cls = lookup(registries.methods, "method", config.method)
    dataset_cls = lookup(registries.datasets, "dataset", config.dataset)
    backbone_name = dataset_cls.default_backbone if config.backbone == "auto" else config.backbone
    backbone_cls = lookup(registries.backbones, "backbone", backbone_name)
    integrator = lookup(registries.integrators, "integrator", config.integrator)
    check_integrator_used(method_cls, config)
    sample_integrator = lookup(registries.integrators, "sample.integrator", config.sample.integrator)
    if method_cls.requires_teacher and not config.teacher:
        names = ", ".join(registries.teachers.names()) or "none installed"
        raise ConfigError(
            "teacher", config.teacher,
            f"method {config.method} distils a teacher: an MLflow run id, a checkpoint file or a teacher name ({names})",
        )
    if config.teacher and not method_cls.requires_teacher:
        raise ConfigError("teacher", config.teacher, f"empty: method {config.method} does not use a teacher")
    lookup(registries.integrators, "sample.reference_integrator", config.sample.reference_integrator)
    check_data_kind(dataset_cls, backbone_cls, backbone_name, registries)
    check_backbone(method_cls, backbone_cls, backbone_name)
    sampler = build_sampler(registries, config.sample.sampler or method_cls.default_sampler,
                            config.sample.sampler_options, sample_integrator, method_cls=method_cls)
    grid = build_grid(registries, config.sample.grid, config.sample.grid_options)
    grids_during_training = config.train.sample_nfe if config.train.sample_every else ()
    for option, nfes in (("sample.nfe", config.sample.nfe), ("train.sample_nfe", grids_during_training)):
        for nfe in nfes:
            time_grid_for(sampler, grid, nfe, option)
    return Resolved(
        config=config,
        method_cls=method_cls,
        method_config=build_attrs(method_cls.config_class, config.method_options, "method_options."),
        backbone_name=backbone_name,
        backbone_cls=backbone_cls,
        backbone_config=build_attrs(backbone_cls.config_class, config.backbone_options, "backbone_options."),
        dataset_cls=dataset_cls,
        dataset_config=build_attrs(dataset_cls.config_class, config.dataset_options, "dataset_options."),
        integrator=integrator,
        sample_integrator=sample_integrator,
        sampler=sampler,
        grid=grid,
    )
