"""Turning a RunConfig into the registered components it names, before any work starts."""

from __future__ import annotations

from typing import Any

import attrs

from .config import RunConfig, build_attrs, to_dict
from .errors import ConfigError, UnknownNameError
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

    def to_dict(self) -> dict:
        """The fully resolved configuration (plugin options with their defaults filled in)."""
        tree = to_dict(self.config)
        tree["backbone"] = self.backbone_name
        tree["method_options"] = to_dict(self.method_config)
        tree["backbone_options"] = to_dict(self.backbone_config)
        tree["dataset_options"] = to_dict(self.dataset_config)
        return tree


def lookup(registry, option: str, name: str):
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        allowed = ", ".join(registry.names()) or "none installed"
        raise ConfigError(option, name, f"unknown {exc.kind}; available: {allowed}") from None


def resolve(config: RunConfig, registries: Registries) -> Resolved:
    method_cls = lookup(registries.methods, "method", config.method)
    dataset_cls = lookup(registries.datasets, "dataset", config.dataset)
    backbone_name = dataset_cls.default_backbone if config.backbone == "auto" else config.backbone
    backbone_cls = lookup(registries.backbones, "backbone", backbone_name)
    integrator = lookup(registries.integrators, "integrator", config.integrator)
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
    grids_during_training = config.train.sample_nfe if config.train.sample_every else ()
    for option, nfes in (("sample.nfe", config.sample.nfe), ("train.sample_nfe", grids_during_training)):
        for nfe in nfes:
            if nfe % sample_integrator.stages:
                raise ConfigError(
                    option, nfe,
                    f"{config.sample.integrator} spends {sample_integrator.stages} evaluations per step; "
                    f"choose multiples of {sample_integrator.stages}",
                )
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
    )
