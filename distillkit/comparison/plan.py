"""What a comparison will do, resolved and checked before anything is trained: the variants (method
x training integrator), each child's config tree and resolved config, and the identities by which
finished children and their parent are found again."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import attrs

from ..config import flatten, nested_set, parse_literal, run_config_from_dict
from ..errors import ConfigError

#: Options that do not change what a child trains (evaluation settings, where and how it runs).
_NOT_TRAINING = {
    "runs_dir", "tracking_uri", "device", "experiment", "data_root",
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
    "train.sample_every", "train.sample_nfe",
}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def child_identity(resolved_tree: dict) -> str:
    """A hash of what a child trains: the resolved config without the evaluation section and
    without where / how verbosely it runs. Two children with the same identity train the same
    network from the same seed."""
    flat = flatten({k: v for k, v in resolved_tree.items() if k != "sample"})
    return _hash({k: v for k, v in flat.items() if k not in _NOT_TRAINING})


@attrs.frozen
class Override:
    """One ``--set``: for every child, or (``METHOD:KEY=VALUE``) for one method or variant."""

    key: str
    value: Any
    target: str = ""  # "" = every child; else a method name or a variant label (cud-rk3)

    @classmethod
    def parse(cls, item: str) -> "Override":
        key, sep, value = item.partition("=")
        target, colon, dotted = key.partition(":")
        if not colon:
            target, dotted = "", key
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ConfigError("--set", item, "KEY=VALUE, or METHOD:KEY=VALUE for one method (e.g. cud:method_options.tn=8)")
        return cls(dotted, parse_literal(value.strip()), target.strip())


@attrs.frozen
class Variant:
    """One child of a comparison: a method, and its training integrator when it uses one."""

    method: str
    integrator: Optional[str]  # None: the method ignores --integrator

    @property
    def label(self) -> str:
        return f"{self.method}-{self.integrator}" if self.integrator else self.method


def variants(methods: list[str], integrators: list[str], uses_integrator: dict[str, bool]) -> list[Variant]:
    """methods x integrators for the methods that use one; each other method once."""
    out: list[Variant] = []
    for method in methods:
        if uses_integrator[method] and integrators:
            out.extend(Variant(method, integrator) for integrator in integrators)
        else:
            out.append(Variant(method, None))
    return out


def steps_for_budget(budget_images: int, batch_size: int) -> int:
    """Optimizer steps that see at least ``budget_images`` training images."""
    return max(1, math.ceil(budget_images / batch_size))


def child_tree(base: dict, variant: Variant, overrides: list[Override], *, teacher: str, requires_teacher: bool,
               budget_images: int) -> dict:
    """The config tree of one child: shared options, then its method / integrator / teacher, then
    the ``--set`` overrides that apply to it, then ``train.max_steps`` from the budget."""
    tree = json.loads(json.dumps(base))
    tree["method"] = variant.method
    if variant.integrator:
        tree["integrator"] = variant.integrator
    if requires_teacher and teacher:
        tree["teacher"] = teacher
    for override in overrides:
        if override.target in ("", variant.method, variant.label):
            if override.key == "train.max_steps":
                raise ConfigError("--set", f"train.max_steps={override.value}",
                                  "not settable in an equal-budget comparison: --budget-images sets it (ceil(budget / batch size))")
            nested_set(tree, override.key, override.value)
    batch = run_config_from_dict(tree).train.batch_size
    nested_set(tree, "train.max_steps", steps_for_budget(budget_images, batch))
    return tree


def parent_identity(dataset: str, budget_images: int, base: dict, overrides: list[Override]) -> str:
    """What makes two comparisons the same comparison (so children are reused): the dataset, the
    budget, the shared training options. Not the method list: adding a method to a comparison
    trains only the new one."""
    shared = {k: v for k, v in flatten(base).items() if k not in _NOT_TRAINING and not k.startswith("sample.")}
    return _hash({
        "dataset": dataset, "budget_images": budget_images, "shared": shared,
        "overrides": sorted((o.target, o.key, repr(o.value)) for o in overrides if not o.key.startswith("sample.")),
    })


# --------------------------------------------------------------------------------------------
# the plan of one comparison


@attrs.frozen
class ComparisonRequest:
    """What a comparison is asked for, its values parsed (``distillkit compare``'s flags); the names
    in it are looked up by ``plan_comparison``. Empty / None values: the config's defaults."""

    methods: tuple[str, ...]
    dataset: str
    budget_images: int
    nfes: tuple[int, ...]
    integrators: tuple[str, ...] = ()  # training integrators of the methods that use one
    metrics: tuple[str, ...] = ()  # () = the defaults for the data (evaluation.default_metrics)
    sampler: str = ""  # every child evaluated with it; "" = each method's own
    num_samples: Optional[int] = None  # samples per NFE
    batch_size: Optional[int] = None  # training batch size of every child
    seed: Any = ""  # training seed of every child, as given ("" = the config's)
    teacher: str = ""  # for the methods that distil one
    overrides: tuple[Override, ...] = ()
    runs_dir: str = "distillkit-runs"
    tracking_uri: str = ""
    experiment: str = "distillkit-compare"
    data_root: str = ""
    device: str = "cpu"
    inception_weights: str = ""
    retrain: bool = False  # train new children even where finished ones exist
    progress: bool = True  # progress bars while children train


@attrs.frozen
class Child:
    """One child run to train (or reuse): its variant, its resolved config and its identity."""

    variant: Variant
    resolved: Any  # distillkit.resolve.Resolved
    identity: str


@attrs.frozen
class Plan:
    """Everything a comparison will do, resolved and checked before anything is trained."""

    request: ComparisonRequest
    base: dict  # the options every child shares (before its own method, integrator, overrides)
    children: tuple[Child, ...]
    runs_dir: Path
    parent_identity: str

    @property
    def budget(self) -> int:
        return self.request.budget_images

    @property
    def nfes(self) -> list[int]:
        return list(self.request.nfes)

    @property
    def experiment(self) -> str:
        return self.request.experiment


def _shared_options(request: ComparisonRequest) -> dict:
    base: dict = {"dataset": request.dataset, "device": request.device, "runs_dir": request.runs_dir,
                  "tracking_uri": request.tracking_uri, "experiment": request.experiment,
                  "data_root": request.data_root, "sample": {"nfe": list(request.nfes)}}
    if request.sampler:
        base["sample"]["sampler"] = request.sampler
    if request.seed != "":
        base["seed"] = request.seed
    if request.batch_size:
        base["train"] = {"batch_size": request.batch_size}
    if request.num_samples:
        base["sample"]["num_samples"] = request.num_samples
    return base


def plan_comparison(request: ComparisonRequest, registries=None) -> Plan:
    """Every name looked up, every child's config resolved: any problem is a ConfigError here."""
    from ..config import default_runs_dir
    from ..plugin_manager import get_registries
    from ..resolve import lookup, resolve

    registries = registries or get_registries()
    for integrator in request.integrators:
        lookup(registries.integrators, "--integrators", integrator)
    classes = {m: lookup(registries.methods, "--methods", m) for m in request.methods}
    lookup(registries.datasets, "--dataset", request.dataset)
    planned = variants(list(request.methods), list(request.integrators),
                       {m: c.uses_integrator for m, c in classes.items()})
    known = {v.method for v in planned} | {v.label for v in planned}
    for override in request.overrides:
        if override.target and override.target not in known:
            raise ConfigError("--set", f"{override.target}:{override.key}",
                              f"METHOD:KEY=VALUE with METHOD one of {', '.join(sorted(known))}")
    base = _shared_options(request)
    needs_teacher = [m for m, c in classes.items() if c.requires_teacher]
    if needs_teacher and not request.teacher:
        raise ConfigError("--teacher", "", f"a teacher (run id, checkpoint or teacher name) for "
                          f"{', '.join(needs_teacher)}, which distil one")
    overrides = list(request.overrides)
    children = []
    for variant in planned:
        tree = child_tree(base, variant, overrides, teacher=request.teacher,
                          requires_teacher=classes[variant.method].requires_teacher,
                          budget_images=request.budget_images)
        resolved = resolve(run_config_from_dict(tree), registries)
        children.append(Child(variant, resolved, child_identity(resolved.to_dict())))
    return Plan(request=request, base=base, children=tuple(children),
                runs_dir=default_runs_dir(children[0].resolved.config),
                parent_identity=parent_identity(request.dataset, request.budget_images, base, overrides))
