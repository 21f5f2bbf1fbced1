"""``distillkit eval``: a trained run's quality per NFE, logged back to the run with its protocol.

Parsing and printing only; the evaluation is ``distillkit.evaluation`` (metric keys, prefixes and
signatures are described there).
"""

from __future__ import annotations

import argparse
import json

from ..arguments import (add_model_options, parse_metrics, parse_nfe, parse_options,
                         parse_positive, parse_seed)

_OPTION_SECTIONS = ("sample.sampler_options", "sample.grid_options", "metric_options")


def settings_from_args(args: argparse.Namespace, trained, metrics: tuple[str, ...], nfes: tuple[int, ...], *,
                       n_default: int):
    """The ``EvalSettings`` the flags describe (empty flags: the run's own values)."""
    from ..evaluation import EvalSettings

    sample = trained.resolved.config.sample
    options = parse_options(args.overrides, _OPTION_SECTIONS)
    metric_options = {key[len("metric_options."):]: value for key, value in options.items()
                      if key.startswith("metric_options.")}
    if getattr(args, "inception_weights", ""):
        metric_options.setdefault("fid", {})["inception_weights"] = args.inception_weights
    return EvalSettings(
        metrics=metrics, nfes=nfes,
        n=parse_positive(args.n, "--n") if args.n else n_default,
        seed=parse_seed(args.seed, "--seed") if args.seed != "" else sample.seed,
        integrator=args.integrator, grid=args.grid, sampler=args.sampler,
        sampler_options=options.get("sample.sampler_options", {}),
        grid_options=options.get("sample.grid_options", {}),
        metric_options=metric_options,
        weights=args.weights,
        batch_size=parse_positive(args.batch_size, "--batch-size"),
        teacher=getattr(args, "teacher", "") or "",
        data_root=getattr(args, "data_root", "") or "",
    )


def add_parser(subparsers) -> None:
    from ..plugin_manager import get_registries

    metrics = ", ".join(get_registries().metrics.names())
    parser = subparsers.add_parser(
        "eval", help="measure a trained run's quality per NFE and log it to the run",
        description="Sample a trained run at several NFEs from per-sample seeds, measure quality, and log "
                    "eval/<metric>/nfe<k> with the protocol (a JSON artifact and tags) to the same MLflow run.",
    )
    add_model_options(parser, n_default="the run's sample.num_samples")
    parser.add_argument("--nfe", default="1,2,4,8,16", metavar="LIST", help="network evaluations per sample (default: 1,2,4,8,16)")
    parser.add_argument("--metric", "--metrics", dest="metric", default="", metavar="LIST",
                        help=f"comma-separated registered metrics: {metrics} (default: fd_pixels or energy, "
                             "classifier_fd where the dataset has a classifier, ode_error)")
    parser.add_argument("--teacher", default="", metavar="TEACHER",
                        help="ode_error against this teacher's solve (run id, checkpoint, teacher name) instead of "
                             "the model's own; logged as ode_error_teacher")
    parser.add_argument("--inception-weights", default="", metavar="FILE",
                        help="FID: the TorchScript Inception file (default: $DISTILLKIT_INCEPTION_WEIGHTS, else "
                             "clean-fid's download)")
    parser.add_argument("--data-root", default="", metavar="DIR", help="dataset files (default: the run's data_root)")
    parser.add_argument("--json", action="store_true", help="print the results and protocol as JSON")
    parser.add_argument("--no-log", action="store_true", help="do not log to the MLflow run")


def command(args: argparse.Namespace) -> int:
    from ..evaluation import Evaluator, check_run_in_store, default_metrics, log_evaluation, of_trained, open_run

    nfes = parse_nfe(args.nfe)
    requested = parse_metrics(args.metric) if args.metric else None
    opened = open_run(args.run, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, weights=args.weights,
                      device=args.device)
    trained = opened.trained
    if not args.no_log:
        check_run_in_store(opened.run_id, opened.tracking_uri, args.run)
    sample = trained.resolved.config.sample
    subject = of_trained(trained, data_root=args.data_root)
    metrics = requested or default_metrics(trained.spec, subject.dataset() if trained.spec.is_image else None)
    settings = settings_from_args(args, trained, metrics, nfes, n_default=sample.num_samples)
    evaluator = Evaluator(subject, settings, device=opened.device, runs_dir=opened.runs_dir,
                          tracking_uri=opened.tracking_uri, run_id=opened.run_id).check()
    result = evaluator.run()
    logged = False
    if not args.no_log and opened.run_id:
        log_evaluation(result, opened.run_id, opened.tracking_uri, trained.step)
        logged = True
    if args.json:
        print(json.dumps({"run_id": opened.run_id, "logged": logged, "sampler": result.sampler,
                          "metrics": result.metrics(), "protocol": result.protocol}, indent=2, default=str))
        return 0
    sampler = result.protocol["sampler"]
    print(f"quality per NFE ({sampler['describe']} sampler, {sampler['grid']} grid, {settings.n} samples from seeds "
          f"{settings.seed}..{settings.seed + settings.n - 1}, {settings.weights} weights, step {trained.step}):")
    print(result.table())
    if logged:
        print(f"logged to MLflow run {opened.run_id} as {result.prefix}/<metric>/nfe<k>, protocols in "
              f"{', '.join(result.protocol_artifacts().values())}")
    return 0
