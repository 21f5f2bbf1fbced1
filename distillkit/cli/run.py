"""``distillkit run``: validate everything, then train, evaluate and report."""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import tomli_w

from ..config import default_runs_dir, run_config_from_dict
from ..errors import UsageError
from ..plugin_manager import get_registries
from ..contracts import TeacherContext
from ..resolve import resolve
from ..teachers import load_teacher
from ..tracking import MlflowTracker, NullTracker, resolve_tracking_uri, ui_command


def _check_writable(directory: Path) -> None:
    """Fail before any work when the runs directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"runs directory {directory} is not writable ({exc.strerror or exc})") from None


def _check_device(name: str):
    import torch

    from ..errors import ConfigError
    from ..training.build import pick_device

    device = pick_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "cpu or auto: no CUDA device is visible on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", name, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", name, "cpu or auto: MPS is not available on this machine")
    return device


def _toml_ready(tree):
    """TOML has no null: drop None values (they mean 'unset')."""
    if isinstance(tree, dict):
        return {k: _toml_ready(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, list):
        return [_toml_ready(v) for v in tree]
    return tree


def run_command(args: argparse.Namespace, tree: dict) -> int:
    config = run_config_from_dict(tree)
    resolved = resolve(config, get_registries())
    if args.dry_run:
        print(tomli_w.dumps(_toml_ready(resolved.to_dict())), end="")
        return 0

    # Imported here: the trainer pulls in torchdata, tqdm and the evaluation code.
    from ..training.build import build_dataset
    from ..training.trainer import train

    device = _check_device(config.device)
    runs_dir = default_runs_dir(config)
    _check_writable(runs_dir)
    dataset = build_dataset(resolved)
    teacher = None
    if config.teacher:
        context = TeacherContext(
            data=dataset.spec, dataset_name=config.dataset, dataset_config=resolved.dataset_config,
            device=device, runs_dir=str(runs_dir), tracking_uri=config.tracking_uri,
        )
        teacher = load_teacher(config.teacher, get_registries(), context)
    tracking_uri = ""
    if args.no_track:
        tracker = NullTracker()
    else:
        tracking_uri = resolve_tracking_uri(config.tracking_uri, runs_dir)
        tracker = MlflowTracker(tracking_uri, config.experiment, runs_dir / "artifacts")
    name = tracker.run_id or datetime.datetime.now().strftime("untracked-%Y%m%d-%H%M%S-%f")
    output_dir = runs_dir / "runs" / name
    try:
        result = train(resolved, tracker, output_dir, dataset=dataset, teacher=teacher, progress=not args.quiet)
    except BaseException:
        tracker.finish("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    tracker.finish("FINISHED")

    print()
    print(f"{config.method} ({config.integrator}) on {config.dataset}: final training loss {result.final_loss:.4f}, "
          f"{result.images_per_second:.0f} images/s")
    print(f"quality per NFE ({resolved.sample_integrator.name} sampler, {config.sample.num_samples} samples, EMA weights; "
          f"ode_error: RMS distance to a {config.sample.reference_steps}-step "
          f"{config.sample.reference_integrator} solve):")
    print(result.evaluation.table())
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {result.sample_figure}")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
        print(f"view it:    {ui_command(tracking_uri)}")
    return 0
