"""Building a run's components (data, backbone, method, student) from a resolved config."""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
import torch
from torch import nn

from ..contracts import Dataset, DataSpec, Method, MethodContext, Teacher
from ..plugin_manager import get_registries
from ..resolve import Resolved


@attrs.frozen
class Components:
    dataset: Dataset
    spec: DataSpec
    method: Method
    student: nn.Module  # the sampling network
    networks: dict = attrs.field(factory=dict)  # every trainable network by name (the student among them)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def build_method(resolved: Resolved, spec: DataSpec, *, teacher: Optional[Teacher] = None) -> Method:
    """The method for data of ``spec``, without its network (enough for its costs and tags)."""
    config = resolved.config
    context = MethodContext(
        data=spec,
        integrator=resolved.integrator,
        integrator_name=config.integrator,
        total_steps=config.train.max_steps,
        integrators=get_registries().integrators,
        teacher=teacher,
    )
    return resolved.method_cls(resolved.method_config, context)


def backbone_factory(resolved: Resolved, spec: DataSpec) -> Callable[..., nn.Module]:
    """``make_backbone(conditioning=())``: a fresh backbone of the run's kind on each call."""

    def make_backbone(conditioning: tuple[str, ...] = ()) -> nn.Module:
        if conditioning:
            return resolved.backbone_cls.build(resolved.backbone_config, spec, tuple(conditioning))
        return resolved.backbone_cls.build(resolved.backbone_config, spec)  # backbones of the first contract too

    return make_backbone


def build_networks(
    resolved: Resolved, spec: DataSpec, device: torch.device, *, seed: int, teacher: Optional[Teacher] = None
) -> tuple[Method, dict[str, nn.Module]]:
    """The method and all its trainable networks by name; initial weights depend only on ``seed``."""
    method = build_method(resolved, spec, teacher=teacher)
    torch.manual_seed(seed)
    networks = method.build_networks(backbone_factory(resolved, spec))
    if not isinstance(networks, dict) or method.sampling_network not in networks:
        raise TypeError(f"method {resolved.config.method}: build_networks must return a dict of networks "
                        f"that holds its sampling network {method.sampling_network!r}")
    return method, {name: network.to(device) for name, network in networks.items()}


def build_model(
    resolved: Resolved, spec: DataSpec, device: torch.device, *, seed: int, teacher: Optional[Teacher] = None
) -> tuple[Method, nn.Module]:
    """The method and its sampling network (the student) for data of ``spec``."""
    method, networks = build_networks(resolved, spec, device, seed=seed, teacher=teacher)
    return method, networks[method.sampling_network]


def build_dataset(resolved: Resolved) -> Dataset:
    return resolved.dataset_cls(resolved.dataset_config, resolved.config.data_root or None)


def build_components(
    resolved: Resolved, device: torch.device, *, seed: int, teacher: Optional[Teacher] = None
) -> Components:
    dataset = build_dataset(resolved)
    spec = dataset.spec
    method, student = build_model(resolved, spec, device, seed=seed, teacher=teacher)
    return Components(dataset=dataset, spec=spec, method=method, student=student)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(resolved: Resolved, components: Components) -> dict[str, Any]:
    """Tags that let the MLflow UI group and filter runs."""
    tags = {
        "distillkit.method": resolved.config.method,
        "distillkit.integrator": resolved.config.integrator if resolved.method_cls.uses_integrator else "none",
        "distillkit.dataset": resolved.config.dataset,
        "distillkit.backbone": resolved.backbone_name,
    }
    tags.update(components.method.tags())
    return tags
