"""``distillkit export``: a trained run's sampling function as a TorchScript module, a safetensors
file or an MLflow model (docs/export.md). Parsing and printing only; the work is
``distillkit.export``."""

from __future__ import annotations

import argparse
import sys

from ..arguments import parse_positive
from ..errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained run's generator: torchscript, safetensors or an MLflow model",
        description="Export a run's EMA network with its own sampler and the chosen NFE built in: a TorchScript "
                    "module (runs without distillkit), a safetensors file (distillkit.load_generator) or an "
                    "MLflow pyfunc model (mlflow models serve). See docs/export.md.",
    )
    parser.add_argument("--run", required=True, metavar="RUN",
                        help="an MLflow run id, a run folder name under RUNS_DIR/runs, or a checkpoint file")
    parser.add_argument("--nfe", required=True, metavar="K", help="network evaluations per sample, built in")
    parser.add_argument("--format", required=True, metavar="FORMAT", help="torchscript, safetensors or mlflow")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the file to write (torchscript, safetensors) or a new folder (mlflow)")
    parser.add_argument("--weights", default="ema", metavar="WEIGHTS",
                        help="ema (the run's default EMA), online, or the name of one of its EMAs (default: ema)")
    parser.add_argument("--runs-dir", default="distillkit-runs", metavar="DIR",
                        help="the runs directory the run was trained in (default: distillkit-runs)")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="device the exported module runs on (default: cpu)")
    parser.add_argument("--no-log", action="store_true",
                        help="mlflow: only save the model to --out, do not log it to the run")


def command(args: argparse.Namespace) -> int:
    from ..evaluation import open_run
    from ..export import check_out, generator_of, parse_formats, run_in_store, write

    formats = parse_formats(args.format)
    if len(formats) != 1:
        raise ConfigError("--format", args.format, "one of torchscript, safetensors, mlflow")
    fmt = formats[0]
    nfe = parse_positive(args.nfe, "--nfe")
    out = check_out(args.out, fmt)
    opened = open_run(args.run, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, weights=args.weights,
                      device=args.device)
    generator = generator_of(opened.trained, nfe, weights=args.weights, run_id=opened.run_id)
    log_to = opened.run_id if fmt == "mlflow" and not args.no_log else None
    if log_to and not run_in_store(log_to, opened.tracking_uri):
        log_to = None  # a checkpoint copied away from its store: the model is saved, not logged
    exported = write(generator, fmt, out, run_id=log_to, tracking_uri=opened.tracking_uri)
    where = f", logged to MLflow run {exported.logged_to}" if exported.logged_to else ""
    print(f"{fmt} generator: {generator.sampler.describe()} sampler, NFE {nfe}, {args.weights} weights, "
          f"step {opened.trained.step}{where}:", file=sys.stderr)
    print(exported.path.resolve())
    return 0
