"""The children of a comparison: their teachers, training one under the parent run, finding a
finished one again, and measuring each with the comparison's protocol."""

from __future__ import annotations

import time
from typing import Optional

from .plan import Child, Plan

PARENT_TAG = "distillkit.compare.identity"
CHILD_TAG = "distillkit.config_identity"


def plugin_distribution(method: str) -> tuple[str, str]:
    """(plugin entry-point name, "distribution==version") of the plugin that provides ``method``."""
    from ..plugin_manager import get_registries, plugin_state

    provider = get_registries().methods.entry(method).provider
    info = plugin_state().plugins.get(provider)
    if info is None or not info.distribution:
        return provider, f"{provider} (not from a distribution)"
    return provider, f"{info.distribution}=={info.version}"


# --------------------------------------------------------------------------------------------
# MLflow lookups


def _quote(value: str) -> str:
    return value.replace("'", "")


def find_parent(client, experiment_id: str, identity: str) -> Optional[str]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{_quote(identity)}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def find_child(client, experiment_id: str, parent_id: str, identity: str) -> Optional[str]:
    """The newest FINISHED child of ``parent_id`` that trained exactly this config."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`mlflow.parentRunId` = '{_quote(parent_id)}' and tags.`{CHILD_TAG}` = '{_quote(identity)}' "
                       f"and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------------------------
# training the children


def load_teachers(plan: Plan, spec, device, tracking_uri: str) -> dict:
    """The teachers the children distil, by name, loaded (and so checked) before anything is trained."""
    from ..training.launch import load_run_teacher

    teachers: dict = {}
    for child in plan.children:
        name = child.resolved.config.teacher
        if name and name not in teachers:
            teachers[name] = load_run_teacher(child.resolved, spec, device, runs_dir=plan.runs_dir,
                                              tracking_uri=tracking_uri)
    return teachers


class _StepClock:
    """The first and the latest step's end: the training rate without start-up and evaluation."""

    def __init__(self):
        self.marks: list[tuple[int, float]] = []

    def __call__(self, step: int) -> None:
        mark = (step, time.perf_counter())
        if len(self.marks) < 2:
            self.marks.append(mark)
        else:
            self.marks[1] = mark


def train_child(plan: Plan, child: Child, *, parent_id: str, tracking_uri: str, teachers: dict) -> str:
    """Train one child under the parent, as ``distillkit run`` trains a run; returns its run id."""
    from ..arguments import check_device
    from ..tracking import MlflowTracker
    from ..training.build import build_dataset
    from ..training.launch import finished_on_failure
    from ..training.trainer import train

    variant, resolved, config = child.variant, child.resolved, child.resolved.config
    device = check_device(config.device)
    dataset = build_dataset(resolved)
    teacher = teachers.get(config.teacher) if config.teacher else None
    plugin, dist = plugin_distribution(config.method)
    tags = {"mlflow.parentRunId": parent_id, "distillkit.compare.parent": parent_id, CHILD_TAG: child.identity,
            "distillkit.compare.variant": variant.label, "distillkit.compare.budget_images": str(plan.budget),
            "distillkit.plugin": plugin, "distillkit.plugin_dist": dist}
    tracker = MlflowTracker(tracking_uri, config.experiment, plan.runs_dir / "artifacts",
                            run_name=f"{variant.label}-{config.dataset}", tags=tags)
    output_dir = plan.runs_dir / "runs" / tracker.run_id
    clock = _StepClock()
    started = time.perf_counter()
    with finished_on_failure(tracker):
        result = train(resolved, tracker, output_dir, dataset=dataset, teacher=teacher, device=device,
                       progress=plan.request.progress, on_step=clock)
    wall = time.perf_counter() - started
    batch = config.train.batch_size
    if len(clock.marks) == 2 and clock.marks[1][1] > clock.marks[0][1]:
        (s0, t0), (s1, t1) = clock.marks
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


# --------------------------------------------------------------------------------------------
# evaluating the children


def prepare_metrics(first, dataset, metrics: tuple[str, ...], nfes, *, device, runs_dir, data_root: str = "",
                    inception_weights: str = "", log=None) -> dict:
    """Every metric checked for the data and its reference prepared (classifier, FID statistics),
    before anything is trained: the prepared metrics, by name, every child is measured with.
    ``first``: the first child's resolved config."""
    from ..evaluation import EvalSettings, Evaluator, of_config

    sample = first.config.sample
    options = {"fid": {"inception_weights": inception_weights}} if inception_weights else {}
    settings = EvalSettings(metrics=metrics, nfes=tuple(nfes), n=sample.num_samples, seed=sample.seed,
                            data_root=data_root, metric_options=options)
    evaluator = Evaluator(of_config(first, dataset), settings, device=device, runs_dir=runs_dir, log=log).check()
    return {metric.name: metric for metric in evaluator.metrics}


def evaluate_child(run_id: str, metrics: dict, nfes, *, runs_dir, tracking_uri: str, device: str, sampler: str = "",
                   data_root: str = "", log=None) -> tuple[dict, str]:
    """Measure what child ``run_id`` lacks under the comparison's protocol (its own sampler, or
    ``sampler``), log it to the child; return (metric -> {nfe: value}, the sampler/grid used).
    What was measured under the same signature before (tags) is not measured again."""
    import attrs
    from mlflow.tracking import MlflowClient

    from ..evaluation import EvalSettings, Evaluator, log_evaluation, measured_nfes, of_trained, open_run

    client = MlflowClient(tracking_uri=tracking_uri)
    opened = open_run(run_id, runs_dir=str(runs_dir), tracking_uri=tracking_uri, weights="ema", device=device)
    trained = opened.trained
    sample = trained.resolved.config.sample
    settings = EvalSettings(metrics=tuple(metrics), nfes=tuple(nfes), n=sample.num_samples, seed=sample.seed,
                            sampler=sampler, data_root=data_root)
    subject = of_trained(trained, data_root=data_root)

    def evaluator(settings):
        return Evaluator(subject, settings, metrics=metrics, device=opened.device, runs_dir=runs_dir,
                         tracking_uri=tracking_uri, run_id=run_id, log=log).check()

    planned = evaluator(settings)
    expected, prefix = planned.signatures(), planned.prefix
    names = {metric.name: metric.result_name for metric in planned.metrics}
    tags = client.get_run(run_id).data.tags
    todo = {m: set(nfes) - measured_nfes(tags.get(f"distillkit.{prefix}.{names[m]}"), expected[names[m]])
            for m in metrics}
    missing = tuple(m for m in metrics if todo[m])
    if missing:
        wanted = tuple(sorted(set().union(*todo.values())))
        if log is not None:
            log(f"  evaluating {', '.join(missing)} at NFE {','.join(map(str, wanted))}")
        result = evaluator(attrs.evolve(settings, metrics=missing, nfes=wanted)).run()
        log_evaluation(result, run_id, tracking_uri, trained.step)
    latest = client.get_run(run_id).data.metrics
    values = {m: {k: latest.get(f"{prefix}/{names[m]}/nfe{k}", float("nan")) for k in nfes} for m in metrics}
    return values, planned.sampling.describe()
