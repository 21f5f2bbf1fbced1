"""Comparing methods at an equal training budget: the plan, the MLflow parent / child runs, and
what is logged to the parent (a markdown table, a CSV, a quality-vs-NFE plot, a JSON summary).

``distillkit compare`` (``cli/compare.py``) drives it: one child run per method (x integrator
for methods whose training uses one) under one parent run, each trained for
``ceil(budget_images / batch_size)`` steps, evaluated with the same protocol, reused on a later
call when a finished child of identical configuration already exists under the same parent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import attrs

from .config import flatten, nested_set, parse_literal, run_config_from_dict
from .errors import ConfigError

PARENT_TAG = "distillkit.compare.identity"
CHILD_TAG = "distillkit.config_identity"
#: Options that do not change what a child trains (evaluation settings, where and how it runs).
_NOT_TRAINING = {
    "runs_dir", "tracking_uri", "device", "experiment", "data_root",
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
    "train.sample_every", "train.sample_nfe",
}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def child_identity(resolved_tree: dict) -> str:
    """A hash of what a child trains: the resolved config without the evaluation section and
    without where / how verbosely it runs. Two children with the same identity train the same
    network from the same seed."""
    flat = flatten({k: v for k, v in resolved_tree.items() if k != "sample"})
    return _hash({k: v for k, v in flat.items() if k not in _NOT_TRAINING})


@attrs.frozen
class Override:
    """One ``--set``: for every child, or (``METHOD:KEY=VALUE``) for one method or variant."""

    key: str
    value: Any
    target: str = ""  # "" = every child; else a method name or a variant label (cud-rk3)

    @classmethod
    def parse(cls, item: str) -> "Override":
        key, sep, value = item.partition("=")
        target, colon, dotted = key.partition(":")
        if not colon:
            target, dotted = "", key
        dotted = dotted.strip()
        if not sep or not dotted:
            raise ConfigError("--set", item, "KEY=VALUE, or METHOD:KEY=VALUE for one method (e.g. cud:method_options.tn=8)")
        return cls(dotted, parse_literal(value.strip()), target.strip())


@attrs.frozen
class Variant:
    """One child of a comparison: a method, and its training integrator when it uses one."""

    method: str
    integrator: Optional[str]  # None: the method ignores --integrator

    @property
    def label(self) -> str:
        return f"{self.method}-{self.integrator}" if self.integrator else self.method


def variants(methods: list[str], integrators: list[str], uses_integrator: dict[str, bool]) -> list[Variant]:
    """methods x integrators for the methods that use one; each other method once."""
    out: list[Variant] = []
    for method in methods:
        if uses_integrator[method] and integrators:
            out.extend(Variant(method, integrator) for integrator in integrators)
        else:
            out.append(Variant(method, None))
    return out


def steps_for_budget(budget_images: int, batch_size: int) -> int:
    """Optimizer steps that see at least ``budget_images`` training images."""
    return max(1, math.ceil(budget_images / batch_size))


def child_tree(base: dict, variant: Variant, overrides: list[Override], *, teacher: str, requires_teacher: bool,
               budget_images: int) -> dict:
    """The config tree of one child: shared options, then its method / integrator / teacher, then
    the ``--set`` overrides that apply to it, then ``train.max_steps`` from the budget."""
    tree = json.loads(json.dumps(base))
    tree["method"] = variant.method
    if variant.integrator:
        tree["integrator"] = variant.integrator
    if requires_teacher and teacher:
        tree["teacher"] = teacher
    for override in overrides:
        if override.target in ("", variant.method, variant.label):
            if override.key == "train.max_steps":
                raise ConfigError("--set", f"train.max_steps={override.value}",
                                  "not settable in an equal-budget comparison: --budget-images sets it (ceil(budget / batch size))")
            nested_set(tree, override.key, override.value)
    batch = run_config_from_dict(tree).train.batch_size
    nested_set(tree, "train.max_steps", steps_for_budget(budget_images, batch))
    return tree


def parent_identity(dataset: str, budget_images: int, base: dict, overrides: list[Override]) -> str:
    """What makes two comparisons the same comparison (so children are reused): the dataset, the
    budget, the shared training options. Not the method list: adding a method to a comparison
    trains only the new one."""
    shared = {k: v for k, v in flatten(base).items() if k not in _NOT_TRAINING and not k.startswith("sample.")}
    return _hash({
        "dataset": dataset, "budget_images": budget_images, "shared": shared,
        "overrides": sorted((o.target, o.key, repr(o.value)) for o in overrides if not o.key.startswith("sample.")),
    })


def plugin_distribution(method: str) -> tuple[str, str]:
    """(plugin entry-point name, "distribution==version") of the plugin that provides ``method``."""
    from .plugin_manager import get_registries, plugin_state

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
# evaluating the children


def prepare_metrics(first, dataset, metrics: tuple[str, ...], nfes, *, device, runs_dir, data_root: str = "",
                    inception_weights: str = "", log=None) -> dict:
    """Every metric checked for the data and its reference prepared (classifier, FID statistics),
    before anything is trained: the prepared metrics, by name, every child is measured with.
    ``first``: the first child's resolved config."""
    from .evaluation import EvalSettings, Evaluator, of_config

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

    from .evaluation import EvalSettings, Evaluator, log_evaluation, measured_nfes, of_trained, open_run

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


# --------------------------------------------------------------------------------------------
# results and what the parent gets


@attrs.frozen
class Row:
    label: str
    method: str
    integrator: str
    run_id: str
    reused: bool
    steps: int
    batch_size: int
    evals_with_grad: float
    evals_no_grad: float
    train_seconds: float
    wall_seconds: float
    images_per_second: float
    values: dict  # metric -> {nfe: value}
    sampler: str = ""  # what it was evaluated with: ``<sampler describe>/<grid>`` (``ode/euler/uniform``)

    @property
    def images(self) -> int:
        return self.steps * self.batch_size


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(rows: list[Row], metrics: list[str], nfes: list[int], header: dict) -> str:
    """The comparison as markdown: the protocol, a cost table, and one quality table per metric
    (rows = variants, columns = NFE; the best value of each column in bold)."""
    lines = [
        f"# Comparison on {header['dataset']}: {header['budget_images']:,} training images per method",
        "",
        f"Parent run `{header['parent_run_id']}` in experiment `{header['experiment']}`. Quality: "
        f"{header['n']} samples per NFE from per-sample seeds {header['seed']}..{header['seed'] + header['n'] - 1}, "
        f"each variant sampled with the sampler/grid of its sampler column ({header['sampler']}), EMA weights, "
        f"checkpoint at the end of training. "
        f"Lower is better in every quality table; **bold** is the best of its column.",
        "",
        "## Cost",
        "",
        "| variant | sampler | run | steps × batch | training images | network evals / step (grad + no-grad) | train s | wall s | images/s |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        reused = " (reused)" if r.reused else ""
        lines.append(
            f"| {r.label} | {r.sampler or '–'} | `{r.run_id[:8]}`{reused} | {r.steps} × {r.batch_size} | {r.images:,} | "
            f"{r.evals_with_grad:g} + {r.evals_no_grad:g} | {r.train_seconds:.1f} | {r.wall_seconds:.1f} | "
            f"{r.images_per_second:,.0f} |"
        )
    for metric in metrics:
        lines += ["", f"## {metric}", "", "| variant | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|" + "---:|" * len(nfes)]
        best = {}
        for k in nfes:
            column = [r.values.get(metric, {}).get(k) for r in rows]
            present = [v for v in column if v is not None and not math.isnan(v)]
            best[k] = min(present) if present else None
        for r in rows:
            cells = []
            for k in nfes:
                value = r.values.get(metric, {}).get(k)
                text = _fmt(value)
                cells.append(f"**{text}**" if value is not None and value == best[k] and len(rows) > 1 else text)
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    if header.get("descriptions"):
        lines += ["", "## Metrics", ""]
        lines += [f"- **{name}**: {text}" for name, text in header["descriptions"].items() if name in metrics]
    return "\n".join(lines) + "\n"


#: MLflow keeps tag values up to 8,000 characters; the run description is a tag.
_NOTE_LIMIT = 7_900


def note(markdown: str) -> str:
    """The parent run's description (``mlflow.note.content``): the table, shortened if too long."""
    if len(markdown) <= _NOTE_LIMIT:
        return markdown
    tail = "\n\n… (shortened: the whole table is the artifact comparison/comparison.md)\n"
    return markdown[: _NOTE_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail


def csv_rows(rows: list[Row], metrics: list[str], nfes: list[int]) -> tuple[list[str], list[list]]:
    columns = ["variant", "method", "integrator", "sampler", "run_id", "reused", "steps", "batch_size", "training_images",
               "network_evals_with_grad", "network_evals_no_grad", "train_seconds", "wall_seconds",
               "images_per_second"] + [f"{m}@nfe{k}" for m in metrics for k in nfes]
    body = []
    for r in rows:
        body.append([r.label, r.method, r.integrator, r.sampler, r.run_id, r.reused, r.steps, r.batch_size, r.images,
                     r.evals_with_grad, r.evals_no_grad, round(r.train_seconds, 3), round(r.wall_seconds, 3),
                     round(r.images_per_second, 1)]
                    + [r.values.get(m, {}).get(k, "") for m in metrics for k in nfes])
    return columns, body


def write_csv(rows: list[Row], metrics: list[str], nfes: list[int], path: Path) -> Path:
    columns, body = csv_rows(rows, metrics, nfes)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(body)
    return path


def write_plot(rows: list[Row], metrics: list[str], nfes: list[int], path: Path, title: str) -> Path:
    """One panel per metric: quality (log scale where all values are positive) against NFE (log 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 0.6, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        positive = True
        for r in rows:
            points = [(k, r.values.get(metric, {}).get(k)) for k in nfes]
            points = [(k, v) for k, v in points if v is not None and not math.isnan(v)]
            if not points:
                continue
            positive &= all(v > 0 for _, v in points)
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=r.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(k) for k in nfes])
        ax.minorticks_off()
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_title(f"{metric} (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_json(rows: list[Row], metrics: list[str], nfes: list[int], header: dict) -> dict:
    return {
        **header,
        "metrics": metrics,
        "nfe": nfes,
        "rows": [{**attrs.asdict(r), "training_images": r.images,
                  "values": {m: {str(k): v for k, v in by.items()} for m, by in r.values.items()}} for r in rows],
    }
