"""What a comparison reports: one row per child (its costs and quality per metric and NFE), and
what the parent run gets from the rows (a markdown table, a CSV, a quality-vs-NFE plot, a JSON
summary, the table as the run's description)."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path
from typing import Optional

import attrs

from .plan import Child


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
    evals_jvp: float = 0.0  # Jacobian-vector products per step (MeanFlow, sCT / sCD), counted apart

    @property
    def images(self) -> int:
        return self.steps * self.batch_size


def _evals(with_grad: float, no_grad: float, jvp: float) -> str:
    """``1 + 3`` (forward+backward + no-grad), with ``+ 2 JVP`` when the method takes any."""
    return f"{with_grad:g} + {no_grad:g}" + (f" + {jvp:g} JVP" if jvp else "")


def child_row(child: Child, run_id: str, *, reused: bool, values: dict, sampler: str, logged: dict) -> Row:
    """The row of one child; ``logged``: the metrics of its MLflow run (its costs)."""
    config = child.resolved.config
    return Row(
        label=child.variant.label, method=child.variant.method, integrator=child.variant.integrator or "none",
        run_id=run_id, reused=reused, steps=config.train.max_steps, batch_size=config.train.batch_size,
        evals_with_grad=logged.get("cost/network_evals_with_grad", float("nan")),
        evals_no_grad=logged.get("cost/network_evals_no_grad", float("nan")),
        evals_jvp=logged.get("cost/network_evals_jvp", 0.0),
        train_seconds=logged.get("cost/train_seconds", float("nan")),
        wall_seconds=logged.get("cost/wall_seconds", float("nan")),
        images_per_second=logged.get("cost/images_per_second", float("nan")),
        values=values, sampler=sampler,
    )


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
            f"{_evals(r.evals_with_grad, r.evals_no_grad, r.evals_jvp)} | {r.train_seconds:.1f} | {r.wall_seconds:.1f} | "
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
               "network_evals_with_grad", "network_evals_no_grad", "network_evals_jvp", "train_seconds", "wall_seconds",
               "images_per_second"] + [f"{m}@nfe{k}" for m in metrics for k in nfes]
    body = []
    for r in rows:
        body.append([r.label, r.method, r.integrator, r.sampler, r.run_id, r.reused, r.steps, r.batch_size, r.images,
                     r.evals_with_grad, r.evals_no_grad, r.evals_jvp, round(r.train_seconds, 3), round(r.wall_seconds, 3),
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


#: The parent's artifacts, under its ``comparison/`` folder.
ARTIFACTS = ("comparison.md", "comparison.csv", "quality_vs_nfe.png", "comparison.json")


def parent_metrics(rows: list[Row], metrics: list[str], nfes: list[int]) -> dict[str, float]:
    """Each child's final quality and costs as metrics of the parent, named by variant
    (``cud-rk2/energy/nfe4``, ``cud-rk2/cost/train_seconds``), so that the MLflow UI can sort,
    chart and compare them on the parent run alone. Missing (NaN) values are left out."""
    out: dict[str, float] = {}
    for row in rows:
        for metric in metrics:
            for nfe in nfes:
                value = row.values.get(metric, {}).get(nfe)
                if value is not None and math.isfinite(value):
                    out[f"{row.label}/{metric}/nfe{nfe}"] = float(value)
        for cost in ("train_seconds", "images_per_second"):
            value = getattr(row, cost)
            if math.isfinite(value):
                out[f"{row.label}/cost/{cost}"] = float(value)
    return out


def log_report(parent, rows: list[Row], metrics: list[str], nfes: list[int], header: dict, *, markdown: str,
               title: str) -> None:
    """The parent run's metrics (``parent_metrics``), artifacts (``ARTIFACTS``) and tags
    (variants, children, NFEs, metrics, the table as its description)."""
    parent.log_metrics(parent_metrics(rows, metrics, nfes), step=0)
    with tempfile.TemporaryDirectory(prefix="distillkit-compare-") as scratch:
        folder = Path(scratch)
        (folder / "comparison.md").write_text(markdown)
        write_csv(rows, metrics, nfes, folder / "comparison.csv")
        write_plot(rows, metrics, nfes, folder / "quality_vs_nfe.png", title)
        (folder / "comparison.json").write_text(json.dumps(summary_json(rows, metrics, nfes, header),
                                                           indent=2, default=str) + "\n")
        for name in ARTIFACTS:
            parent.log_artifact(folder / name, "comparison")
    parent.set_tags({"distillkit.compare.variants": ",".join(r.label for r in rows),
                     "distillkit.compare.children": ",".join(r.run_id for r in rows),
                     "distillkit.compare.nfe": ",".join(map(str, nfes)),
                     "distillkit.compare.metrics": ",".join(metrics),
                     "mlflow.note.content": note(markdown)})
