"""``distillkit compare``: train (or reuse) one child run per method at an equal number of training
images under one MLflow parent run, evaluate each with one protocol, and log the comparison (table,
CSV, quality-vs-NFE plot, costs) to the parent.

Parsing and printing only; the comparison is ``distillkit.comparison.run_comparison``.
"""

from __future__ import annotations

import argparse
import sys

from ..arguments import parse_metrics, parse_nfe, parse_positive
from ..errors import ConfigError


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="train and evaluate several methods at an equal training budget under one MLflow parent run",
        description="One child run per method (x integrator for methods that use one), each trained on the same "
                    "number of images (max_steps = ceil(budget / batch size)), evaluated per NFE with one protocol; "
                    "the parent run gets a markdown table, a CSV, a quality-vs-NFE plot and the costs. Finished "
                    "children of identical configuration under the same parent are reused.",
    )
    parser.add_argument("--methods", required=True, metavar="LIST", help="comma-separated methods, e.g. cud,fm")
    parser.add_argument("--integrators", default="", metavar="LIST",
                        help="training integrators for methods that use one (e.g. euler,rk3); default: the config's")
    parser.add_argument("--dataset", required=True, metavar="D", help="the dataset every method trains on")
    parser.add_argument("--budget-images", required=True, metavar="N", help="training images per method")
    parser.add_argument("--nfe", default="1,2,4,8,16", metavar="LIST", help="NFEs to evaluate (default: 1,2,4,8,16)")
    parser.add_argument("--metric", "--metrics", dest="metric", default="", metavar="LIST",
                        help="registered metrics (default: fd_pixels or energy, classifier_fd where the dataset has a "
                             "classifier, ode_error)")
    parser.add_argument("--sampler", default="", metavar="NAME",
                        help="evaluate every child with this sampler (every method must accept it; options: --set "
                             "sample.sampler_options.KEY=VALUE); default: each method's own sampler")
    parser.add_argument("--n", default="", metavar="N", help="samples per NFE (default: the config's sample.num_samples, 1000)")
    parser.add_argument("--batch-size", default="", metavar="B", help="training batch size of every method (default 128)")
    parser.add_argument("--teacher", default="", metavar="TEACHER",
                        help="for the methods that distil a teacher: a run id, a checkpoint file or a teacher name")
    parser.add_argument("--seed", default="", metavar="S", help="training seed of every child (default 0)")
    parser.add_argument("--runs-dir", default="distillkit-runs", metavar="DIR", help="runs directory (default: distillkit-runs)")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--experiment", default="distillkit-compare", metavar="NAME",
                        help="MLflow experiment (default: distillkit-compare)")
    parser.add_argument("--data-root", default="", metavar="DIR", help="directory holding dataset files")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    parser.add_argument("--inception-weights", default="", metavar="FILE", help="FID: the TorchScript Inception file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="an option for every child (train.lr=1e-3) or for one method or variant "
                             "(cud:method_options.tn=8, cud-rk3:train.lr=1e-3)")
    parser.add_argument("--retrain", action="store_true", help="train new children even where finished ones exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _names(text: str, option: str) -> list[str]:
    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise ConfigError(option, text, "one or more names, comma-separated")
    return names


def request_from_args(args: argparse.Namespace):
    """The ``ComparisonRequest`` the flags describe: values parsed here, names looked up by the
    comparison's plan."""
    from ..comparison import ComparisonRequest, Override

    return ComparisonRequest(
        metrics=parse_metrics(args.metric) if args.metric else (),
        methods=tuple(_names(args.methods, "--methods")),
        integrators=tuple(_names(args.integrators, "--integrators")) if args.integrators else (),
        dataset=args.dataset,
        budget_images=parse_positive(args.budget_images, "--budget-images"),
        nfes=tuple(parse_nfe(args.nfe)),
        overrides=tuple(Override.parse(item) for item in args.overrides),
        batch_size=parse_positive(args.batch_size, "--batch-size") if args.batch_size else None,
        num_samples=parse_positive(args.n, "--n") if args.n else None,
        sampler=args.sampler, seed=args.seed, teacher=args.teacher, runs_dir=args.runs_dir,
        tracking_uri=args.tracking_uri, experiment=args.experiment, data_root=args.data_root, device=args.device,
        inception_weights=args.inception_weights, retrain=args.retrain, progress=not args.quiet,
    )


def command(args: argparse.Namespace) -> int:
    from ..comparison import run_comparison
    from ..tracking import ui_command, ui_url

    result = run_comparison(request_from_args(args), log=_log)
    print(result.markdown)
    print(f"parent run: {result.parent_run_id} (artifacts: comparison/comparison.md, comparison.csv, quality_vs_nfe.png)")
    print(f"view it:    {ui_command(result.tracking_uri)}")
    url = ui_url(result.tracking_uri, result.parent_run_id)
    if url:
        print(f"            then open {url}")
    return 0
