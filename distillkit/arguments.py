"""Argument helpers that the commands (``distillkit sample``, ``eval``, ``compare``, ``fid-stats``,
``run``) and the benchmark scripts share: turning flag text into checked values, and the checks
that must pass before any work (device present, folder writable).

Every bad value is a one-line ``ConfigError`` / ``UsageError`` naming the flag.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
import torch

from .errors import ConfigError, UsageError, did_you_mean

#: Samples per network batch when a command samples a trained run (results do not depend on it).
DEFAULT_BATCH = 500


def parse_nfe(text: str, option: str = "--nfe") -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise ConfigError(option, text, "one or more positive integers, comma-separated (e.g. 1,2,4,8)")
    return tuple(dict.fromkeys(values))


def parse_metrics(text: str, option: str = "--metric", registries=None) -> tuple[str, ...]:
    """Comma-separated names of registered metrics (``distillkit plugins`` lists them)."""
    if registries is None:
        from .plugin_manager import get_registries

        registries = get_registries()
    known = [entry.name for entry in registries.metrics]
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    unknown = [name for name in names if name not in registries.metrics]
    if not names or unknown:
        hint = did_you_mean(unknown[0], known) if unknown else ""
        raise ConfigError(option, unknown[0] if unknown else text,
                          "one or more of " + (", ".join(known) or "none installed") + hint)
    return names


def parse_positive(text: str, option: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ConfigError(option, text, "a positive integer")
    return value


def parse_non_negative(text: str, option: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise ConfigError(option, text, "an integer >= 0")
    return value


def parse_seed(text: str, option: str = "--seed") -> int:
    """A seed: an integer from 0 to 2**63 - 1 (torch seeds are 64-bit; seeds + i must fit)."""
    from .validators import MAX_SEED

    value = parse_non_negative(text, option)
    if value > MAX_SEED:
        raise ConfigError(option, text, f"an integer from 0 to {MAX_SEED} (2**63 - 1)")
    return value


def parse_options(items: list[str], sections: tuple[str, ...], option: str = "--set") -> dict[str, dict]:
    """``--set SECTION.KEY=VALUE`` items into ``{section: {key: value}}`` for the given sections
    (``sample.sampler_options``, ``sample.grid_options``, ``metric_options.<metric>``); anything
    else is a one-line error naming the sections allowed."""
    from .config import parse_literal

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        section = next((s for s in sections if key.startswith(s + ".") and len(key) > len(s) + 1), None)
        if section is None and key.startswith("metric_options.") and "metric_options" in sections:
            metric, _, leaf = key[len("metric_options."):].partition(".")
            if metric and leaf:
                out.setdefault(f"metric_options.{metric}", {})[leaf] = parse_literal(value.strip())
                continue
        if not sep or section is None:
            allowed = ", ".join(f"{s}.KEY=VALUE" if s != "metric_options" else "metric_options.METRIC.KEY=VALUE"
                                for s in sections)
            raise ConfigError(option, item, allowed)
        out.setdefault(section, {})[key[len(section) + 1:]] = parse_literal(value.strip())
    return out


def add_model_options(parser: argparse.ArgumentParser, *, n_default: str) -> None:
    """The options of every command that samples a trained run (``sample``, ``eval``)."""
    parser.add_argument("--run", required=True, metavar="RUN",
                        help="an MLflow run id, a run folder name under RUNS_DIR/runs, or a checkpoint file")
    parser.add_argument("--weights", default="ema", metavar="WEIGHTS",
                        help="ema (the run's default EMA), online, or the name of one of its EMAs (default: ema)")
    add_sampler_options(parser)
    parser.add_argument("--n", default="", metavar="N", help=f"samples per NFE (default: {n_default})")
    parser.add_argument("--seed", default="", metavar="S",
                        help="first per-sample seed: sample i uses seed S + i (default: the run's sample.seed)")
    parser.add_argument("--batch-size", default=str(DEFAULT_BATCH), metavar="B",
                        help=f"samples per network batch; results do not depend on it (default: {DEFAULT_BATCH})")
    parser.add_argument("--runs-dir", default="distillkit-runs", metavar="DIR",
                        help="the runs directory the run was trained in (default: distillkit-runs)")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")


def add_sampler_options(parser: argparse.ArgumentParser, *, with_integrator: bool = True) -> None:
    """``--sampler``, ``--integrator``, ``--grid`` and ``--set sample.{sampler,grid}_options.KEY=VALUE``."""
    parser.add_argument("--sampler", default="", metavar="NAME",
                        help="a registered sampler (distillkit plugins lists them; default: the run's own, "
                             "i.e. its sample.sampler or its method's default sampler)")
    if with_integrator:
        parser.add_argument("--integrator", default="", metavar="NAME",
                            help="integrator of the ode sampler (default: the run's sample.integrator)")
    parser.add_argument("--grid", default="", metavar="GRID",
                        help="a registered time grid: uniform, edm, karras-sigma, explicit, ... "
                             "(default: the run's sample.grid)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="sample.sampler_options.KEY=VALUE, sample.grid_options.KEY=VALUE or "
                             "metric_options.METRIC.KEY=VALUE")


def check_device_available(name: str) -> torch.device:
    """The torch device ``name`` (already a valid --device value) names, if this machine has it;
    else a one-line ConfigError naming what it has."""
    from .training.build import pick_device

    device = pick_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "cpu or auto: no CUDA device is visible on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", name, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "cpu or auto: MPS is not available on this machine")
    return device


def check_device(name: str, option: str = "--device") -> torch.device:
    """A ``--device`` value checked against the RunConfig vocabulary and this machine."""
    import types

    from .config import _device  # the RunConfig validator: one vocabulary for --device everywhere

    _device(None, types.SimpleNamespace(name=option), name)
    return check_device_available(name)


def check_writable(directory: Path) -> None:
    """Fail before any work when the runs directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"runs directory {directory} is not writable ({exc.strerror or exc})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
