"""``distillkit run``: validate everything, then train (or resume), evaluate and report."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import tomli_w

from ..arguments import check_device_available, check_writable
from ..config import default_runs_dir, flatten, run_config_from_dict
from ..contracts import TeacherContext
from ..errors import ConfigError
from ..plugin_manager import get_registries
from ..resolve import Resolved, resolve
from ..teachers import load_teacher
from ..tracking import MlflowTracker, NullTracker, resolve_tracking_uri, ui_command

#: Options that may differ when a run is resumed: where and how it runs, not what it trains.
RESUMABLE = {
    "runs_dir", "tracking_uri", "device", "experiment", "data_root",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
    "train.sample_every",
}


def _toml_ready(tree):
    """TOML has no null: drop None values (they mean 'unset')."""
    if isinstance(tree, dict):
        return {k: _toml_ready(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, list):
        return [_toml_ready(v) for v in tree]
    return tree


def config_identity(resolved_tree: dict) -> str:
    """A hash of what a run trains (not where it runs): ``--resume auto`` matches runs by it."""
    what = {k: v for k, v in flatten(resolved_tree).items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _find_resume(reference: str, runs_dir: Path, identity: str) -> Optional[Path]:
    """The checkpoint to resume: a file, a run id / run folder name, or ``auto``."""
    if reference == "auto":
        from ..training.checkpoint import load_checkpoint

        candidates = sorted((runs_dir / "runs").glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:  # newest first: a finished run of this config is returned too
            if config_identity(load_checkpoint(path)["config"]) == identity:
                return path
        return None
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    local = runs_dir / "runs" / reference / "checkpoint.pt"
    if local.is_file():
        return local
    raise ConfigError("--resume", reference, f"a checkpoint file, a run id with a checkpoint under {runs_dir / 'runs'}, or auto")


def _resumed_config(payload: dict, tree: dict):
    """The checkpoint's config, with only the RESUMABLE options taken from the command line."""
    given = flatten(tree)
    changed = sorted(k for k in given if k not in RESUMABLE)
    if changed:
        raise ConfigError("--resume", changed[0], "only where and how long a run runs may change on resume: "
                          + ", ".join(sorted(RESUMABLE)))
    base = payload["config"]
    for key, value in given.items():
        section, _, leaf = key.rpartition(".")
        (base[section] if section else base)[leaf] = value
    return run_config_from_dict(base)


def run_command(args: argparse.Namespace, tree: dict) -> int:
    from ..training.trainer import FINISHED_MARKER

    resume_payload: Optional[dict[str, Any]] = None
    resume_path: Optional[Path] = None
    if args.resume and args.resume != "auto":
        runs_dir = default_runs_dir(run_config_from_dict({k: v for k, v in tree.items() if k == "runs_dir"}))
        resume_path = _find_resume(args.resume, runs_dir, "")
        from ..training.checkpoint import load_checkpoint

        resume_payload = load_checkpoint(resume_path)
        config = _resumed_config(resume_payload, tree)
    else:
        config = run_config_from_dict(tree)
    resolved = resolve(config, get_registries())
    if args.dry_run:
        print(tomli_w.dumps(_toml_ready(resolved.to_dict())), end="")
        return 0
    if args.resume == "auto":
        resume_path = _find_resume("auto", default_runs_dir(config), config_identity(resolved.to_dict()))
        if resume_path is not None and (resume_path.parent / FINISHED_MARKER).exists():
            # Restarting a command whose run already finished must not train it a second time.
            print(f"the newest run of this configuration has already finished: {resume_path.parent}")
            return 0
        if resume_path is not None:
            from ..training.checkpoint import load_checkpoint

            resume_payload = load_checkpoint(resume_path)
    return _train(args, resolved, resume_payload, resume_path)


def _train(args, resolved: Resolved, resume_payload, resume_path) -> int:
    # Imported here: the trainer pulls in torchdata, tqdm and the evaluation code.
    from ..training import distributed as dist_setup
    from ..training.build import build_dataset
    from ..training.trainer import train

    config = resolved.config
    check_device_available(config.device)
    if not args.no_track:  # an unreachable server is found before anything is written
        from ..tracking import check_reachable

        check_reachable(resolve_tracking_uri(config.tracking_uri, default_runs_dir(config)))
    distributed, device = dist_setup.setup(config.device)
    try:
        runs_dir = default_runs_dir(config)
        # Data and teacher first: a missing file must stop the run before anything is created.
        dataset = build_dataset(resolved)
        teacher = None
        if config.teacher:
            context = TeacherContext(
                data=dataset.spec, dataset_name=config.dataset, dataset_config=resolved.dataset_config,
                device=device, runs_dir=str(runs_dir), tracking_uri=config.tracking_uri,
            )
            teacher = load_teacher(config.teacher, get_registries(), context)
        if distributed.is_main:
            check_writable(runs_dir)

        tracking_uri = ""
        previous_run = resume_payload.get("run_id") if resume_payload else None
        if args.no_track or not distributed.is_main:
            tracker = NullTracker()
            tracker.run_id = previous_run
        else:
            tracking_uri = resolve_tracking_uri(config.tracking_uri, runs_dir)
            variant = f"-{config.integrator}" if resolved.method_cls.uses_integrator else ""
            tracker = MlflowTracker(tracking_uri, config.experiment, runs_dir / "artifacts",
                                    run_name=f"{config.method}{variant}-{config.dataset}", run_id=previous_run)
        if resume_path is not None:
            output_dir = resume_path.parent
        else:
            name = tracker.run_id or datetime.datetime.now().strftime("untracked-%Y%m%d-%H%M%S-%f")
            output_dir = runs_dir / "runs" / distributed.broadcast(name)
        try:
            result = train(resolved, tracker, output_dir, dataset=dataset, teacher=teacher, resume=resume_payload,
                           distributed=distributed, device=device, progress=not args.quiet)
        except BaseException:
            tracker.finish("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
            raise
        tracker.finish("FINISHED")
    finally:
        dist_setup.teardown(distributed)
    if not distributed.is_main:
        return 0

    print()
    if result.resumed_from_step:
        print(f"resumed at step {result.resumed_from_step} from {resume_path}")
    variant = f" ({config.integrator})" if resolved.method_cls.uses_integrator else ""
    print(f"{config.method}{variant} on {config.dataset}: final training loss {result.final_loss:.4f}, "
          f"{result.images_per_second:.0f} images/s")
    sampler = result.evaluation.sampler or f"{resolved.sampler.describe()}/{resolved.grid.name}"
    print(f"quality per NFE ({sampler} sampler/grid, {config.sample.num_samples} samples, EMA weights; "
          f"ode_error: RMS distance to a {config.sample.reference_steps}-step "
          f"{config.sample.reference_integrator} solve):")
    print(result.evaluation.table())
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {result.sample_figure}")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
        if tracking_uri:
            print(f"view it:    {ui_command(tracking_uri)}")
    return 0
