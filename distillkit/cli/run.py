"""``distillkit run``: validate everything, then train (or resume), evaluate and report.

Parsing and printing only; starting, resuming and finishing the run is
``distillkit.training.launch``.
"""

from __future__ import annotations

import argparse
import os
import sys

import tomli_w

from ..training.launch import config_identity  # noqa: F401  (re-exported: ``distillkit.cli.run.config_identity``)
from ..arguments import parse_positive
from ..export import parse_formats
from ..training.interruption import TrainingInterrupted
from ..training.launch import launch, resume_newest, start_run
from ..tracking import ui_command, ui_url


def _toml_ready(tree):
    """TOML has no null: drop None values (they mean 'unset')."""
    if isinstance(tree, dict):
        return {k: _toml_ready(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, list):
        return [_toml_ready(v) for v in tree]
    return tree


def run_command(args: argparse.Namespace, tree: dict) -> int:
    export = parse_formats(args.export, "--export") if args.export else ()
    export_nfe = parse_positive(args.export_nfe, "--export-nfe") if args.export_nfe else None
    resume = args.resume
    if resume and resume != "auto":  # a run id may be given as an unambiguous prefix
        from ..config import RunConfig
        from ..run_ids import expand_run_id

        runs_dir = tree.get("runs_dir", RunConfig().runs_dir)
        resume = expand_run_id(resume, runs_dir=runs_dir, tracking_uri=tree.get("tracking_uri", ""), option="--resume")
    start = start_run(tree, resume)
    if args.dry_run:
        print(tomli_w.dumps(_toml_ready(start.resolved.to_dict())), end="")
        return 0
    if args.resume == "auto":
        start = resume_newest(start)
        if start.finished:
            # Restarting a command whose run already finished must not train it a second time.
            print(f"the newest run of this configuration has already finished: {start.resume_path.parent}")
            return 0
    try:
        launched = launch(start, track=not args.no_track, progress=not args.quiet, export=export,
                          export_nfe=export_nfe)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one line is enough
            print(f"distillkit: {exc}", file=sys.stderr)
        return exc.exit_code
    if launched.training is not None:
        _report(start, launched)
    return 0


def _report(start, launched) -> None:
    resolved, result = start.resolved, launched.training
    config = resolved.config
    print()
    if result.resumed_from_step:
        print(f"resumed at step {result.resumed_from_step} from {start.resume_path}")
    variant = f" ({config.integrator})" if resolved.method_cls.uses_integrator else ""
    print(f"{config.method}{variant} on {config.dataset}: final training loss {result.final_loss:.4f}, "
          f"{result.images_per_second:.0f} images/s")
    sampler = result.evaluation.sampler or f"{resolved.sampler.describe()}/{resolved.grid.name}"
    print(f"quality per NFE ({sampler} sampler/grid, {config.sample.num_samples} samples, EMA weights; "
          f"ode_error: RMS distance to a {config.sample.reference_steps}-step "
          f"{config.sample.reference_integrator} solve):")
    print(result.evaluation.table())
    if result.skipped_steps:
        steps = result.skipped_steps
        shown = ", ".join(map(str, steps[:20])) + (f", ... ({len(steps) - 20} more)" if len(steps) > 20 else "")
        print(f"skipped {len(steps)} non-finite step{'s' if len(steps) > 1 else ''} (train.nonfinite=skip): "
              f"step{'s' if len(steps) > 1 else ''} {shown}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {result.sample_figure}")
    for exported in launched.exports:
        logged = " (logged to the MLflow run)" if exported.logged_to else ""
        print(f"{exported.format + ':':<11} {exported.path}{logged}")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
        if launched.tracking_uri:
            print(f"view it:    {ui_command(launched.tracking_uri)}")
            url = ui_url(launched.tracking_uri, result.run_id)
            if url:
                print(f"            then open {url}")
