"""``distillkit compare``: train (or reuse) one child run per method at an equal number of training
images under one MLflow parent run, evaluate each with one protocol, and log the comparison (table,
CSV, quality-vs-NFE plot, costs) to the parent."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ..arguments import check_device, check_writable, first_line, parse_metrics, parse_nfe, parse_positive
from ..errors import ConfigError, UsageError


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


class _Plan:
    """Everything a comparison will do, resolved and checked before anything is trained."""

    def __init__(self, args: argparse.Namespace):
        from ..comparison import Override, child_identity, child_tree, parent_identity, variants
        from ..config import default_runs_dir, run_config_from_dict
        from ..plugin_manager import get_registries
        from ..resolve import lookup, resolve

        self.args = args
        registries = get_registries()
        self.methods = _names(args.methods, "--methods")
        self.integrators = _names(args.integrators, "--integrators") if args.integrators else []
        for integrator in self.integrators:
            lookup(registries.integrators, "--integrators", integrator)
        classes = {m: lookup(registries.methods, "--methods", m) for m in self.methods}
        lookup(registries.datasets, "--dataset", args.dataset)
        self.budget = parse_positive(args.budget_images, "--budget-images")
        self.nfes = list(parse_nfe(args.nfe))
        self.overrides = [Override.parse(item) for item in args.overrides]
        self.variants = variants(self.methods, self.integrators, {m: c.uses_integrator for m, c in classes.items()})
        known = {v.method for v in self.variants} | {v.label for v in self.variants}
        for override in self.overrides:
            if override.target and override.target not in known:
                raise ConfigError("--set", f"{override.target}:{override.key}",
                                  f"METHOD:KEY=VALUE with METHOD one of {', '.join(sorted(known))}")
        base: dict = {"dataset": args.dataset, "device": args.device, "runs_dir": args.runs_dir,
                      "tracking_uri": args.tracking_uri, "experiment": args.experiment, "data_root": args.data_root,
                      "sample": {"nfe": self.nfes}}
        if args.sampler:
            base["sample"]["sampler"] = args.sampler
        if args.seed != "":
            base["seed"] = args.seed
        if args.batch_size:
            base["train"] = {"batch_size": parse_positive(args.batch_size, "--batch-size")}
        if args.n:
            base["sample"]["num_samples"] = parse_positive(args.n, "--n")
        self.base = base
        needs_teacher = [m for m, c in classes.items() if c.requires_teacher]
        if needs_teacher and not args.teacher:
            raise ConfigError("--teacher", "", f"a teacher (run id, checkpoint or teacher name) for "
                              f"{', '.join(needs_teacher)}, which distil one")
        self.children = []
        for variant in self.variants:
            tree = child_tree(base, variant, self.overrides, teacher=args.teacher,
                              requires_teacher=classes[variant.method].requires_teacher, budget_images=self.budget)
            resolved = resolve(run_config_from_dict(tree), registries)
            self.children.append((variant, resolved, child_identity(resolved.to_dict())))
        first = self.children[0][1].config
        self.runs_dir = default_runs_dir(first)
        self.parent_identity = parent_identity(args.dataset, self.budget, base, self.overrides)
        self.experiment = args.experiment


def _load_teachers(plan: _Plan, spec, device, tracking_uri: str) -> dict:
    """The teachers the children distil, loaded (and so checked) before anything is trained."""
    from ..contracts import TeacherContext
    from ..plugin_manager import get_registries
    from ..teachers import load_teacher

    teachers: dict = {}
    for _, resolved, _ in plan.children:
        config = resolved.config
        if config.teacher and config.teacher not in teachers:
            context = TeacherContext(data=spec, dataset_name=config.dataset, dataset_config=resolved.dataset_config,
                                     device=device, runs_dir=str(plan.runs_dir), tracking_uri=tracking_uri)
            teachers[config.teacher] = load_teacher(config.teacher, get_registries(), context)
    return teachers


def _train_child(variant, resolved, identity: str, *, parent_id: str, tracking_uri: str, runs_dir: Path,
                 budget: int, quiet: bool, teachers: dict) -> str:
    """Train one child under the parent, as ``distillkit run`` trains a run; returns its run id."""
    from ..comparison import CHILD_TAG, plugin_distribution
    from ..plugin_manager import get_registries
    from ..tracking import MlflowTracker
    from ..training.build import build_dataset
    from ..training.trainer import train

    config = resolved.config
    device = check_device(config.device)
    dataset = build_dataset(resolved)
    teacher = teachers.get(config.teacher) if config.teacher else None
    plugin, dist = plugin_distribution(config.method)
    tags = {"mlflow.parentRunId": parent_id, "distillkit.compare.parent": parent_id, CHILD_TAG: identity,
            "distillkit.compare.variant": variant.label, "distillkit.compare.budget_images": str(budget),
            "distillkit.plugin": plugin, "distillkit.plugin_dist": dist}
    tracker = MlflowTracker(tracking_uri, config.experiment, runs_dir / "artifacts",
                            run_name=f"{variant.label}-{config.dataset}", tags=tags)
    output_dir = runs_dir / "runs" / tracker.run_id
    marks: list = []

    def on_step(step: int) -> None:
        now = time.perf_counter()
        if not marks:
            marks.append((step, now))
        elif len(marks) == 1:
            marks.append((step, now))
        else:
            marks[1] = (step, now)

    started = time.perf_counter()
    try:
        result = train(resolved, tracker, output_dir, dataset=dataset, teacher=teacher, device=device,
                       progress=not quiet, on_step=on_step)
    except BaseException:
        tracker.finish("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    wall = time.perf_counter() - started
    batch = config.train.batch_size
    if len(marks) == 2 and marks[1][1] > marks[0][1]:
        (s0, t0), (s1, t1) = marks
        rate = (s1 - s0) * batch / (t1 - t0)
        train_seconds = (t1 - t0) * config.train.max_steps / (s1 - s0)
    else:
        rate, train_seconds = result.images_per_second, wall
    # Step 0, like the trainer's cost/network_evals_*: one number per run (the MLflow UI draws bars).
    tracker.log_metrics({"cost/wall_seconds": wall, "cost/train_seconds": train_seconds,
                         "cost/images_per_second": rate, "cost/training_images": config.train.max_steps * batch},
                        step=0)
    # The end-of-run evaluation measured the distribution metric and ode_error with the protocol
    # compare uses: record its signatures so that those measurements are not repeated.
    signatures = getattr(result.evaluation, "signatures", None)
    if signatures:
        from ..evaluation import signature_tags

        tracker.set_tags(signature_tags("eval", signatures, config.sample.nfe))
    tracker.finish("FINISHED")
    return tracker.run_id


def _row(run_id: str, variant, resolved, reused: bool, values: dict, sampler: str, client):
    from ..comparison import Row

    metrics = client.get_run(run_id).data.metrics
    config = resolved.config
    return Row(
        label=variant.label, method=variant.method, integrator=variant.integrator or "none", run_id=run_id,
        reused=reused, steps=config.train.max_steps, batch_size=config.train.batch_size,
        evals_with_grad=metrics.get("cost/network_evals_with_grad", float("nan")),
        evals_no_grad=metrics.get("cost/network_evals_no_grad", float("nan")),
        train_seconds=metrics.get("cost/train_seconds", float("nan")),
        wall_seconds=metrics.get("cost/wall_seconds", float("nan")),
        images_per_second=metrics.get("cost/images_per_second", float("nan")),
        values=values, sampler=sampler,
    )


def command(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .. import comparison
    from ..config import flatten
    from ..training.build import build_dataset
    from ..evaluation import default_metrics
    from ..tracking import MlflowTracker, resolve_tracking_uri, ui_command

    requested = parse_metrics(args.metric) if args.metric else None
    plan = _Plan(args)
    first = plan.children[0][1]
    device = check_device(first.config.device)
    dataset = build_dataset(first)  # also checks the data files before anything is trained
    spec = dataset.spec
    metrics = requested or default_metrics(spec, dataset)
    prepared = comparison.prepare_metrics(first, dataset, metrics, plan.nfes, device=device, runs_dir=plan.runs_dir,
                                          data_root=args.data_root, inception_weights=args.inception_weights, log=_log)
    tracking_uri = resolve_tracking_uri(args.tracking_uri, plan.runs_dir)
    teachers = _load_teachers(plan, spec, device, tracking_uri)
    check_writable(plan.runs_dir)

    parent_tags = {comparison.PARENT_TAG: plan.parent_identity, "distillkit.compare": "parent",
                   "distillkit.dataset": args.dataset}
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(plan.experiment)
        parent_id = comparison.find_parent(client, experiment.experiment_id, plan.parent_identity) if experiment else None
    except MlflowException as exc:
        raise UsageError(f"cannot use MLflow tracking store {tracking_uri}: {first_line(exc)}") from None
    if parent_id is None:
        parent = MlflowTracker(tracking_uri, plan.experiment, plan.runs_dir / "artifacts",
                               run_name=f"compare-{args.dataset}-{plan.budget}img", tags=parent_tags)
        parent.log_params({"dataset": args.dataset, "budget_images": plan.budget,
                           **{f"shared.{k}": v for k, v in flatten(plan.base).items()
                              if not k.startswith("sample.") and k not in ("runs_dir", "tracking_uri", "experiment")}})
        _log(f"distillkit: comparison parent run {parent.run_id} (new)")
    else:
        parent = MlflowTracker(tracking_uri, plan.experiment, plan.runs_dir / "artifacts", run_id=parent_id)
        _log(f"distillkit: comparison parent run {parent_id} (existing: finished children are reused)")
    experiment_id = parent.experiment_id

    rows = []
    try:
        for index, (variant, resolved, identity) in enumerate(plan.children, 1):
            config = resolved.config
            child_id = None if args.retrain else comparison.find_child(client, experiment_id, parent.run_id, identity)
            reused = child_id is not None
            if reused:
                _log(f"[{index}/{len(plan.children)}] {variant.label}: reusing finished run {child_id}")
            else:
                _log(f"[{index}/{len(plan.children)}] {variant.label}: training {config.train.max_steps} steps x "
                     f"{config.train.batch_size} = {config.train.max_steps * config.train.batch_size:,} images")
                child_id = _train_child(variant, resolved, identity, parent_id=parent.run_id, tracking_uri=tracking_uri,
                                        runs_dir=plan.runs_dir, budget=plan.budget, quiet=args.quiet, teachers=teachers)
            values, sampler = comparison.evaluate_child(child_id, prepared, plan.nfes, runs_dir=plan.runs_dir,
                                                        tracking_uri=tracking_uri, device=args.device,
                                                        sampler=args.sampler, data_root=args.data_root, log=_log)
            rows.append(_row(child_id, variant, resolved, reused, values, sampler, client))
    except BaseException:
        parent.finish("KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise

    sample = first.config.sample
    header = {"dataset": args.dataset, "budget_images": plan.budget, "parent_run_id": parent.run_id,
              "experiment": plan.experiment, "n": sample.num_samples, "seed": sample.seed,
              "sampler": ", ".join(dict.fromkeys(r.sampler for r in rows)), "grid": sample.grid,
              "descriptions": {m: prepared[m].description for m in metrics}}
    names = list(metrics)
    markdown = comparison.markdown_table(rows, names, plan.nfes, header)
    with tempfile.TemporaryDirectory(prefix="distillkit-compare-") as scratch:
        folder = Path(scratch)
        (folder / "comparison.md").write_text(markdown)
        comparison.write_csv(rows, names, plan.nfes, folder / "comparison.csv")
        comparison.write_plot(rows, names, plan.nfes, folder / "quality_vs_nfe.png",
                              f"{args.dataset}: quality vs NFE at {plan.budget:,} training images per method")
        (folder / "comparison.json").write_text(json.dumps(comparison.summary_json(rows, names, plan.nfes, header),
                                                           indent=2, default=str) + "\n")
        for name in ("comparison.md", "comparison.csv", "quality_vs_nfe.png", "comparison.json"):
            parent.log_artifact(folder / name, "comparison")
    parent.set_tags({"distillkit.compare.variants": ",".join(r.label for r in rows),
                     "distillkit.compare.children": ",".join(r.run_id for r in rows),
                     "distillkit.compare.nfe": ",".join(map(str, plan.nfes)),
                     "distillkit.compare.metrics": ",".join(names),
                     "mlflow.note.content": comparison.note(markdown)})
    parent.finish("FINISHED")

    print(markdown)
    print(f"parent run: {parent.run_id} (artifacts: comparison/comparison.md, comparison.csv, quality_vs_nfe.png)")
    print(f"view it:    {ui_command(tracking_uri)}")
    return 0
