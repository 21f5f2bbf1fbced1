"""One comparison from request to report: plan and check everything, open (or find) the parent
run, train or reuse each child, measure each, log the report to the parent."""

from __future__ import annotations

import sys
from typing import Callable

import attrs

from .children import (PARENT_TAG, evaluate_child, find_child, find_parent, load_teachers, prepare_metrics,
                       train_child)
from .plan import ComparisonRequest, Plan, plan_comparison
from .report import Row, child_row, log_report, markdown_table


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@attrs.frozen
class ComparisonResult:
    """A finished comparison: its markdown table (also the parent's ``comparison/comparison.md``),
    the parent run and the tracking store it is in, one row per child."""

    markdown: str
    parent_run_id: str
    tracking_uri: str
    rows: tuple[Row, ...]


def _open_parent(plan: Plan, tracking_uri: str, log: Callable[[str], None]):
    """(MLflow client, the parent's tracker): the parent of an identical earlier comparison, so
    that its finished children are reused, else a new one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..arguments import first_line
    from ..config import flatten
    from ..errors import UsageError
    from ..tracking import MlflowTracker, store_lock

    request = plan.request
    try:
        with store_lock(tracking_uri):  # the first use of a new store migrates it: one process at a time
            client = MlflowClient(tracking_uri=tracking_uri)
            experiment = client.get_experiment_by_name(plan.experiment)
        parent_id = find_parent(client, experiment.experiment_id, plan.parent_identity) if experiment else None
    except MlflowException as exc:
        raise UsageError(f"cannot use MLflow tracking store {tracking_uri}: {first_line(exc)}") from None
    if parent_id is not None:
        parent = MlflowTracker(tracking_uri, plan.experiment, plan.runs_dir / "artifacts", run_id=parent_id)
        log(f"distillkit: comparison parent run {parent_id} (existing: finished children are reused)")
        return client, parent
    tags = {PARENT_TAG: plan.parent_identity, "distillkit.compare": "parent", "distillkit.dataset": request.dataset}
    parent = MlflowTracker(tracking_uri, plan.experiment, plan.runs_dir / "artifacts",
                           run_name=f"compare-{request.dataset}-{plan.budget}img", tags=tags)
    parent.log_params({"dataset": request.dataset, "budget_images": plan.budget,
                       **{f"shared.{k}": v for k, v in flatten(plan.base).items()
                          if not k.startswith("sample.") and k not in ("runs_dir", "tracking_uri", "experiment")}})
    log(f"distillkit: comparison parent run {parent.run_id} (new)")
    return client, parent


def run_comparison(request: ComparisonRequest, *, log: Callable[[str], None] = _stderr) -> ComparisonResult:
    """Plan ``request`` and check every input (names, data, metrics and their references,
    teachers, the runs directory) before anything is trained; then train or reuse each child under
    one parent run, measure each with one protocol and log the report to the parent.
    ``log``: progress lines (default: stderr)."""
    from ..arguments import check_device, check_writable
    from ..evaluation import default_metrics
    from ..tracking import check_reachable, resolve_tracking_uri
    from ..training.build import build_dataset
    from ..training.launch import finished_on_failure

    plan = plan_comparison(request)
    check_reachable(resolve_tracking_uri(request.tracking_uri, plan.runs_dir))  # a bad store: one line, at once
    first = plan.children[0].resolved
    device = check_device(first.config.device)
    dataset = build_dataset(first)  # also checks the data files before anything is trained
    metrics = request.metrics or default_metrics(dataset.spec, dataset)
    prepared = prepare_metrics(first, dataset, metrics, plan.nfes, device=device, runs_dir=plan.runs_dir,
                               data_root=request.data_root, inception_weights=request.inception_weights, log=log)
    tracking_uri = resolve_tracking_uri(request.tracking_uri, plan.runs_dir)
    teachers = load_teachers(plan, dataset.spec, device, tracking_uri)
    check_writable(plan.runs_dir)

    client, parent = _open_parent(plan, tracking_uri, log)
    rows = []
    with finished_on_failure(parent):
        for index, child in enumerate(plan.children, 1):
            child_id = None if request.retrain else find_child(client, parent.experiment_id, parent.run_id,
                                                               child.identity)
            reused = child_id is not None
            train = child.resolved.config.train
            if reused:
                log(f"[{index}/{len(plan.children)}] {child.variant.label}: reusing finished run {child_id}")
            else:
                log(f"[{index}/{len(plan.children)}] {child.variant.label}: training {train.max_steps} steps x "
                    f"{train.batch_size} = {train.max_steps * train.batch_size:,} images")
                child_id = train_child(plan, child, parent_id=parent.run_id, tracking_uri=tracking_uri,
                                       teachers=teachers)
            values, sampler = evaluate_child(child_id, prepared, plan.nfes, runs_dir=plan.runs_dir,
                                             tracking_uri=tracking_uri, device=request.device,
                                             sampler=request.sampler, data_root=request.data_root, log=log)
            rows.append(child_row(child, child_id, reused=reused, values=values, sampler=sampler,
                                  logged=client.get_run(child_id).data.metrics))

    sample = first.config.sample
    names = list(metrics)
    header = {"dataset": request.dataset, "budget_images": plan.budget, "parent_run_id": parent.run_id,
              "experiment": plan.experiment, "n": sample.num_samples, "seed": sample.seed,
              "sampler": ", ".join(dict.fromkeys(r.sampler for r in rows)), "grid": sample.grid,
              "descriptions": {m: prepared[m].description for m in metrics}}
    markdown = markdown_table(rows, names, plan.nfes, header)
    log_report(parent, rows, names, plan.nfes, header, markdown=markdown,
               title=f"{request.dataset}: quality vs NFE at {plan.budget:,} training images per method")
    parent.finish("FINISHED")
    return ComparisonResult(markdown=markdown, parent_run_id=parent.run_id, tracking_uri=tracking_uri, rows=tuple(rows))
