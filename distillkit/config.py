"""Configuration: attrs classes are the single source of every option.

The CLI flags, TOML config files (``--config``), ``--set key=value`` overrides, ``--dry-run`` output
and the MLflow params are all derived from the classes below and from the ``config_class`` of the
chosen method, backbone and dataset plugins. Every bad value is reported as a ``ConfigError`` that
names the option, the value and what is allowed.
"""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any, Optional

import attrs

from .errors import ConfigError, did_you_mean
from .validators import float_tuple, int_tuple, non_negative_int, non_negative_number, one_of, seed_int, positive_int, positive_number

# --------------------------------------------------------------------------------------------
# validators that produce one-line ConfigErrors


def _positive_ints(instance, attribute, value) -> None:
    if not value or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise ConfigError(attribute.name, ",".join(map(str, value)), "one or more positive integers, comma-separated")


def _decays(instance, attribute, value) -> None:
    if not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 for v in value):
        raise ConfigError(attribute.name, ",".join(map(str, value)), "one or more numbers in [0, 1), comma-separated")


def _non_empty_str(instance, attribute, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(attribute.name, value, "a non-empty string")


def _device(instance, attribute, value) -> None:
    if not isinstance(value, str):
        raise ConfigError(attribute.name, value, "cpu, cuda, cuda:N, mps or auto")
    head, _, index = value.partition(":")
    if head not in ("cpu", "cuda", "mps", "auto") or (index and not (head == "cuda" and index.isdigit())):
        raise ConfigError(attribute.name, value, "cpu, cuda, cuda:N, mps or auto")


def option(default: Any, *validators, cli: Optional[str] = None, help: str = "", converter=None, **kw):
    """An attrs field with its CLI flag (if any) and help text in the metadata."""
    return attrs.field(
        default=default,
        validator=list(validators) or None,
        converter=converter,
        metadata={"cli": cli, "help": help},
        **kw,
    )


# --------------------------------------------------------------------------------------------
# the run configuration


def _betas(instance, attribute, value) -> None:
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 for v in value):
        raise ConfigError(attribute.name, ",".join(map(str, value)), "two numbers in [0, 1), comma-separated")


OPTIMIZERS = ("adam", "adamw", "radam")
#: warmup: linear warm-up over warmup_steps, then constant; cosine: warm-up, then cosine decay to 0
#: at train.max_steps; inverse-sqrt: warm-up, then lr * sqrt(warmup_steps / step); constant: lr.
LR_SCHEDULES = ("warmup", "constant", "cosine", "inverse-sqrt")


@attrs.frozen
class OptimizerConfig:
    """How one network is optimized: the optimizer, its learning-rate schedule and clipping.

    ``TrainConfig.optimizer_config()`` gives the run's default; a multi-network method changes it
    per network in ``Method.optimizer_config`` and the user per network with
    ``--set train.networks.NAME.KEY=VALUE``.
    """

    optimizer: str = option("adam", one_of(*OPTIMIZERS), help="adam, adamw or radam")
    lr: float = option(2e-3, positive_number, help="learning rate (after warm-up)")
    betas: tuple = option((0.9, 0.999), _betas, converter=float_tuple, help="the optimizer's two moment decays")
    eps: float = option(1e-8, positive_number, help="the optimizer's denominator epsilon")
    weight_decay: float = option(0.0, non_negative_number, help="weight decay (decoupled for adamw)")
    lr_schedule: str = option("warmup", one_of(*LR_SCHEDULES), help="warmup, constant, cosine or inverse-sqrt")
    warmup_steps: int = option(100, non_negative_int, help="linear learning-rate warm-up steps")
    grad_clip: float = option(1.0, non_negative_number, help="max gradient norm (0 = no clipping)")


def _network_overrides(instance, attribute, value) -> None:
    """``train.networks``: {network: {optimizer option: value}}; every value is checked here, the
    network names against the method's networks when the run is built."""
    if not isinstance(value, dict):
        raise ConfigError(attribute.name, value, "a table of networks, each a table of optimizer options")
    for name in value:
        instance.optimizer_config(name)


#: torch.compile's modes (``train.compile_mode``); "reduce-overhead" and "max-autotune" capture
#: CUDA graphs on a GPU (on a CPU they compile without them).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _needs_compile(instance, attribute, value) -> None:
    """A compile mode without ``train.compile`` would silently do nothing."""
    if value != "default" and not instance.compile:
        raise ConfigError(attribute.name, value, "a mode of torch.compile, which needs train.compile=true")


@attrs.frozen
class TrainConfig:
    max_steps: int = option(1000, positive_int, cli="--max-steps", help="optimizer steps to train")
    batch_size: int = option(64, positive_int, cli="--batch-size", help="samples per optimizer step")
    optimizer: str = option("adam", one_of(*OPTIMIZERS), help="optimizer: adam, adamw or radam")
    lr: float = option(2e-3, positive_number, cli="--lr", help="learning rate")
    betas: tuple = option((0.9, 0.999), _betas, converter=float_tuple, help="the optimizer's moment decays (beta1, beta2)")
    eps: float = option(1e-8, positive_number, help="the optimizer's epsilon")
    weight_decay: float = option(0.0, non_negative_number, help="weight decay (decoupled for adamw)")
    lr_schedule: str = option(
        "warmup", one_of(*LR_SCHEDULES),
        help="warmup (linear warm-up, then constant), constant, cosine (warm-up, then decay to 0 at max_steps) "
             "or inverse-sqrt (warm-up, then lr * sqrt(warmup_steps / step))",
    )
    warmup_steps: int = option(100, non_negative_int, help="linear learning-rate warm-up steps")
    ema_decay: tuple = option(
        (0.999,), _decays, converter=float_tuple,
        help="EMA decay(s) per step, comma-separated; the first is evaluated by default",
    )
    ema_halflife_images: float = option(
        0.0, non_negative_number, help="add an EDM-style EMA with this half-life in training images (0 = none)"
    )
    ema_rampup_ratio: float = option(0.05, non_negative_number, help="EDM EMA ramp-up: half-life <= ratio x images seen")
    grad_clip: float = option(1.0, non_negative_number, help="max gradient norm (0 = no clipping)")
    grad_accumulation: int = option(1, positive_int, help="micro-batches per optimizer step (batch_size is split)")
    nonfinite: str = option("stop", one_of("stop", "skip"),
                            help="a NaN/inf loss or gradient: stop the run (keeping the last good checkpoint) or skip the "
                                 "step; non-finite weights after an update always stop it")
    nonfinite_check: str = option(
        "auto", one_of("auto", "device", "host"),
        help="where train.nonfinite is decided: device (a found-inf flag that fused Adam obeys, read back one step "
             "late: the step never waits for the device; a NaN stop comes one step later), host (read back before "
             "the optimizer step: one wait per step) or auto (device on CUDA when the run allows it, else host)")
    precision: str = option("fp32", one_of("fp32", "tf32", "bf16", "fp16"), cli="--precision",
                            help="fp32, tf32 (CUDA matmuls), bf16 autocast or fp16 autocast with loss scaling")
    channels_last: bool = option(False, help="channels-last memory format for image models")
    compile: bool = option(False, help="torch.compile each trained network")
    compile_mode: str = option(
        "default", one_of(*COMPILE_MODES), _needs_compile,
        help="torch.compile's mode with train.compile: default, reduce-overhead (CUDA graphs on a GPU: for networks "
             "whose steps are bound by kernel launches), max-autotune or max-autotune-no-cudagraphs")
    log_every: int = option(25, positive_int, help="steps between logged training metrics")
    checkpoint_every: int = option(0, non_negative_int, cli="--checkpoint-every",
                                   help="steps between checkpoints (0 = none by step count)")
    checkpoint_minutes: float = option(
        10.0, non_negative_number, cli="--checkpoint-minutes",
        help="minutes of training between checkpoints, besides checkpoint_every (0 = none by time); "
             "a run also writes one on SIGINT/SIGTERM and at the end")
    keep_last: int = option(2, positive_int, help="periodic checkpoints kept on disk (the newest)")
    checkpoint_format: str = option("torch", one_of("torch", "safetensors"),
                                    help="checkpoint files as torch.save (weights_only) or safetensors (docs/training.md)")
    keep_every: int = option(0, non_negative_int, help="also keep (and log to MLflow) every checkpoint at a multiple of this step")
    sample_every: int = option(0, non_negative_int, help="steps between sample grids from fixed noise (0 = none)")
    sample_nfe: tuple = option((1, 4), _positive_ints, converter=int_tuple, help="NFEs of the grids drawn during training")
    networks: dict = option(
        {}, _network_overrides, converter=lambda value: dict(value) if isinstance(value, dict) else value,
        help="per-network optimizer options of multi-network methods (train.networks.NAME.KEY=VALUE)",
    )

    def optimizer_config(self, network: Optional[str] = None, base: Optional[OptimizerConfig] = None) -> OptimizerConfig:
        """The run's default ``OptimizerConfig`` (these fields); with ``network``, ``base`` (default:
        the run's default) with the user's ``train.networks.<network>`` options on top."""
        if base is None:
            base = OptimizerConfig(**{field.name: getattr(self, field.name) for field in attrs.fields(OptimizerConfig)})
        overrides = self.networks.get(network, {}) if network is not None else {}
        if not overrides:
            return base
        prefix = f"networks.{network}."
        if not isinstance(overrides, dict):
            raise ConfigError(prefix.rstrip("."), overrides, "a table of optimizer options: "
                              + ", ".join(attrs.fields_dict(OptimizerConfig)))
        return build_attrs(OptimizerConfig, {**attrs.asdict(base), **overrides}, prefix)


@attrs.frozen
class SampleConfig:
    nfe: tuple = option(
        (1, 2, 4, 8), _positive_ints, cli="--nfe", converter=int_tuple,
        help="network evaluations per sample at the end-of-run evaluation",
    )
    sampler: str = option("", cli="--sampler",
                          help="sampler (distillkit plugins lists them; default: the method's own, e.g. ode or consistency)")
    sampler_options: dict = option({}, help="options of the chosen sampler (sample.sampler_options.KEY=VALUE)",
                                   converter=dict)
    integrator: str = option("euler", _non_empty_str, cli="--sample-integrator", help="integrator of the ode sampler")
    grid: str = option("uniform", _non_empty_str, help="time grid for sampling: uniform, edm, karras-sigma or explicit")
    grid_options: dict = option({}, help="options of the chosen time grid (sample.grid_options.KEY=VALUE)",
                                converter=dict)
    num_samples: int = option(1000, positive_int, help="samples drawn per NFE for the quality metric")
    reference_integrator: str = option(
        "rk4", _non_empty_str, help="integrator of the model's own high-accuracy solve (for ode_error)"
    )
    reference_steps: int = option(
        16, positive_int,
        help="steps of the high-accuracy solve that few-step samples are compared with (on ode_error's grid, "
             "uniform in t^(1/2) unless metric_options.ode_error.rho says otherwise)"
    )
    seed: int = option(1234, seed_int, help="first per-sample noise seed (sample i uses seed + i)")


@attrs.frozen
class RunConfig:
    method: str = option("cud", _non_empty_str, cli="--method", help="training method (distillkit plugins lists them)")
    integrator: str = option(
        "euler", _non_empty_str, cli="--integrator",
        help="integrator a method uses in its loss (CUD: catch-up alignment euler, rk2 or rk3)",
    )
    dataset: str = option("digits", _non_empty_str, cli="--dataset", help="dataset")
    backbone: str = option("auto", _non_empty_str, cli="--backbone", help="network (auto: the dataset's default)")
    seed: int = option(0, seed_int, cli="--seed", help="seed of every random number the run draws")
    device: str = option("cpu", _device, cli="--device", help="cpu, cuda, cuda:N, mps or auto")
    runs_dir: str = option("distillkit-runs", _non_empty_str, cli="--runs-dir", help="where runs, MLflow database and artifacts go")
    tracking_uri: str = option(
        "", cli="--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)",
    )
    experiment: str = option("distillkit", _non_empty_str, cli="--experiment", help="MLflow experiment name")
    data_root: str = option("", cli="--data-root", help="directory holding dataset files (offline data)")
    teacher: str = option(
        "", cli="--teacher",
        help="for methods that distil a teacher: an MLflow run id, a checkpoint file, a teacher name, "
             "diffusers:PATH or edm:FILE[,precond=edm|vp|ve] (docs/teachers.md)",
    )
    train: TrainConfig = attrs.field(factory=TrainConfig)
    sample: SampleConfig = attrs.field(factory=SampleConfig)
    method_options: dict = attrs.field(factory=dict, metadata={"help": "options of the chosen method"})
    backbone_options: dict = attrs.field(factory=dict, metadata={"help": "options of the chosen backbone"})
    dataset_options: dict = attrs.field(factory=dict, metadata={"help": "options of the chosen dataset"})


SECTIONS = {"train": TrainConfig, "sample": SampleConfig}
OPTION_SECTIONS = ("method_options", "backbone_options", "dataset_options")


# --------------------------------------------------------------------------------------------
# building configs from untyped values (TOML, --set, CLI flags)


def parse_literal(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``"x"``) or else the raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in args) + " (or empty)"
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        inner = _describe(args[0]) if args else "value"
        return f"a comma-separated list of {inner}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(option_name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (typed TOML value or raw string) to type ``tp`` or raise ConfigError."""
    if isinstance(value, str) and tp is not str:
        value = parse_literal(value)
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "" or (isinstance(value, str) and value.lower() == "none"):
            return None
        return coerce(option_name, value, args[0])
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = value if isinstance(value, (list, tuple)) else [parse_literal(p.strip()) for p in str(value).split(",") if p.strip()]
        if inner is Any:
            return tuple(items)
        try:
            return tuple(coerce(option_name, item, inner) for item in items)
        except ConfigError:
            raise ConfigError(option_name, value, _describe(tp)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(option_name, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(option_name, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(option_name, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(option_name, value, "a string")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_attrs(cls: type, values: dict, prefix: str) -> Any:
    """Instantiate attrs ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip("."), values, "a table of options")
    fields = attrs.fields_dict(cls)
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            allowed = ", ".join(f"{prefix}{k}" for k in fields) or "no options"
            raise ConfigError(name, value, f"unknown option{did_you_mean(key, fields, prefix=prefix)}; allowed: {allowed}")
        kwargs[key] = coerce(name, value, types[key])
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc.option}", exc.value, exc.allowed) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(prefix.rstrip(".") or cls.__name__, values, str(exc)) from None


def nested_set(tree: dict, dotted: str, value: Any) -> None:
    """``nested_set(tree, "train.lr", 1e-3)``: put a value at a dotted key in a nested dict."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError("--set", dotted, "a dotted key such as train.lr or method_options.tn")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", dotted, f"{part} is not a section")
    node[parts[-1]] = value


def run_config_from_dict(values: dict) -> RunConfig:
    """The RunConfig for a nested dict (TOML file, plus overrides). Plugin options stay raw dicts
    here: they are checked against the plugin's own config class by ``resolve``."""
    values = dict(values)
    top_fields = attrs.fields_dict(RunConfig)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top_fields:
            allowed = ", ".join(top_fields)
            raise ConfigError(key, value, f"unknown option{did_you_mean(key, top_fields)}; allowed top-level keys: {allowed}")
        if key in SECTIONS:
            kwargs[key] = build_attrs(SECTIONS[key], value, f"{key}.")
        elif key in OPTION_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, value, "a table of options")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = coerce(key, value, _field_types(RunConfig)[key])
    try:
        return RunConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError("config", values, str(exc)) from None


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("--config", path, "an existing TOML file") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise ConfigError("--config", path, f"a TOML file in UTF-8 (byte {exc.start} is not UTF-8)") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("--config", path, f"a readable TOML file ({exc})") from None


def cli_fields() -> list[tuple[str, str, Any]]:
    """(flag, dotted key, attrs field) for every option that has a command-line flag."""
    out = []
    for section, cls in [("", RunConfig), *((f"{k}.", v) for k, v in SECTIONS.items())]:
        for field in attrs.fields(cls):
            flag = field.metadata.get("cli")
            if flag:
                out.append((flag, f"{section}{field.name}", field))
    return out


def to_dict(config: Any) -> dict:
    """A nested plain dict (tuples as lists) for TOML, JSON and MLflow."""

    def plain(value):
        if attrs.has(type(value)):
            return {k: plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for MLflow params: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def default_runs_dir(config: RunConfig) -> Path:
    return Path(config.runs_dir).expanduser().resolve()
