"""Few-step quality against the **total** training budget: a teacher's training images, the
network evaluations behind a distillation method's generated data, and the distillation images,
all on one x-axis. One command and one plot for claims such as "CUD reaches a given one-step
quality with fewer images than CD".

    python benchmarks/budget_curve.py --dataset digits --total-images 256000 --teacher-images 128000 \
        --chains fm,cud-rk3,fm>cd,fm>rf-distill,cud-rk3>cud-stage2,meanflow,shortcut,sct,ct,fm>scd,fm>dmd2,fm>sid \
        --separate-runs ct,cud-stage2 --nfe 1,2,4 --metrics classifier_fd,fd_pixels --n 1000 \
        --threads 1 --work ~/budget-work --out docs/results/budget-digits.md

A **chain** is a variant trained from scratch (``fm``, ``cud-rk3``, ``meanflow``), or a student
distilled from one (``fm>cd``: cd distils the fm run's checkpoint at ``--teacher-images``).

Accounting (the x-axis), per point:

    total = teacher images + eval-rate x evaluations spent once on generated data + student images

- A chain from scratch: ``--points`` checkpoints of one run of ``--total-images``, evenly spaced.
- A student: its teacher is the root run's checkpoint at ``--teacher-images`` (the root run is the
  same run as the root's own chain: trained once). Its generated data (``network_evals_once``:
  rf-distill's pairs, cud-stage2's trajectories) costs ``--eval-rate`` training images per network
  evaluation (default 1: one no-grad evaluation of one sample counts as one training image, which
  charges generation more than its compute: a training image costs a forward and a backward
  pass). The student trains on what is left of ``--total-images`` (rounded down to a multiple of
  ``--points`` steps), checkpointed at ``--points`` even steps.
- Per-step teacher evaluations (cd, scd, dmd2, sid call the teacher at every step) are not
  images; they are in the cost table (network evaluations per step, seconds per step).
- ``--separate-runs``: methods whose schedule depends on the run's length (ct's discretisation
  curriculum, cud-stage2's phases split the run) get one run per point instead of checkpoints of
  one run, since a checkpoint a quarter of the way through is not a quarter-length run.

Quality: the EMA weights at each point, each method's own sampler, per-sample seeds (the protocol
of ``equal_budget.py``). Every run and every point's values are kept in ``--work`` under the run's
resolved-config hash: a rerun (or a second process on other chains with the same ``--work``)
reuses them, a changed config or code default trains again. ``--only`` trains a subset of the
chains (``--report-only`` none); the markdown / JSON / plot hold every chain whose points are in
``--work``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

import _common
import equal_budget
from distillkit.errors import ConfigError, DistillkitError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", required=True)
    add("--chains", required=True, help="VARIANT or TEACHER>STUDENT, comma-separated (fm,cud-rk3,fm>cd)")
    add("--total-images", required=True, help="the budget of every chain's last point")
    add("--teacher-images", default="", help="the teacher's share of a student's budget (default: half)")
    add("--points", default="4", help="budget points per chain")
    add("--separate-runs", default="", help="methods trained as one run per point (comma-separated)")
    add("--eval-rate", default="1", help="training images one network evaluation of generated data counts as")
    add("--nfe", default="1,2,4")
    add("--metrics", default="classifier_fd")
    add("--n", default="1000", help="samples per NFE")
    add("--batch-size", default="128")
    add("--seed", default="0")
    add("--data-root", default="")
    add("--set", dest="overrides", action="append", default=[], metavar="[TARGET:]KEY=VALUE",
        help="a config option for every run, or for one method / variant (rf-distill:method_options.num_pairs=2000)")
    add("--only", default="", help="train only these chains (comma-separated); the report holds all found in --work")
    add("--report-only", action="store_true", help="train nothing: the report of what --work holds")
    add("--work", required=True, help="folder of runs and per-point results (kept: reruns reuse them)")
    add("--out", required=True, help="markdown file; .json and .png are written beside it")
    add("--device", default="cpu")
    add("--threads", type=int, default=0)

    _common.one_line_errors(parser, "budget_curve")
    return parser.parse_args(argv)


class Plan:
    """The chains, their budgets and the evaluation settings, checked before anything trains."""

    def __init__(self, args: argparse.Namespace):
        from distillkit.arguments import check_device, parse_metrics, parse_nfe, parse_positive
        from distillkit.comparison import Override
        from distillkit.evaluation import EvalSettings, Evaluator, of_config
        from distillkit.plugin_manager import get_registries
        from distillkit.resolve import lookup, resolve
        from distillkit.config import run_config_from_dict
        from distillkit.training.build import build_dataset

        self.registries = registries = get_registries()
        lookup(registries.datasets, "--dataset", args.dataset)
        self.total = parse_positive(args.total_images, "--total-images")
        self.teacher_images = parse_positive(args.teacher_images, "--teacher-images") if args.teacher_images else self.total // 2
        self.points = parse_positive(args.points, "--points")
        self.batch = parse_positive(args.batch_size, "--batch-size")
        self.eval_rate = float(args.eval_rate)
        if not (self.eval_rate >= 0):
            raise ConfigError("--eval-rate", args.eval_rate, "a number >= 0")
        if self.teacher_images >= self.total:
            raise ConfigError("--teacher-images", self.teacher_images, f"fewer than --total-images ({self.total})")
        self.chains = [self._chain(label.strip()) for label in dict.fromkeys(args.chains.split(",")) if label.strip()]
        if not self.chains:
            raise ConfigError("--chains", args.chains, "VARIANT or TEACHER>STUDENT, comma-separated")
        labels = [c["label"] for c in self.chains]
        self.only = [p.strip() for p in args.only.split(",") if p.strip()] or labels
        for label in self.only:
            if label not in labels:
                raise ConfigError("--only", label, "one of the --chains: " + ", ".join(labels))
        self.separate = {p.strip() for p in args.separate_runs.split(",") if p.strip()}
        self.nfes = list(parse_nfe(args.nfe))
        self.metrics = list(parse_metrics(args.metrics, "--metrics"))
        self.n = parse_positive(args.n, "--n")
        self.device = check_device(args.device)
        self.overrides = [Override.parse(item) for item in args.overrides]
        self.base = {"dataset": args.dataset, "device": str(self.device), "data_root": args.data_root, "seed": args.seed,
                     "train": {"batch_size": self.batch}, "sample": {"num_samples": 64, "nfe": self.nfes}}
        first = resolve(run_config_from_dict(self.tree(self.chains[0]["stages"][0], self.total)), registries)
        dataset = build_dataset(first)
        self.spec = dataset.spec
        settings = EvalSettings(metrics=tuple(self.metrics), nfes=tuple(self.nfes), n=self.n,
                                seed=first.config.sample.seed, data_root=args.data_root)
        checked = Evaluator(of_config(first, dataset), settings, device=self.device, log=_common.log).check()
        self.prepared = {metric.name: metric for metric in checked.metrics}

    def _chain(self, label: str) -> dict:
        from distillkit.comparison import Variant
        from distillkit.resolve import lookup

        names = label.split(">")
        stages = []
        for name in names:
            parts = _common.split_variant(name.strip(), self.registries)
            if parts is None or len(names) > 2:
                raise ConfigError("--chains", label, "VARIANT or TEACHER>STUDENT; VARIANT: "
                                  + _common.variants_allowed(self.registries))
            stages.append(Variant(*parts))
        needs = lookup(self.registries.methods, "method", stages[-1].method).requires_teacher
        if needs != (len(stages) == 2):
            raise ConfigError("--chains", label, f"TEACHER>{stages[-1].label} (it distils a teacher)" if needs
                              else f"{stages[-1].label} alone (it trains from scratch)")
        return {"label": label, "stages": stages}

    def tree(self, variant, images: int, teacher: str = "", steps_every: int = 0) -> dict:
        """One run's config tree: shared options, the --set overrides that apply, the budget, and
        checkpoints kept every ``steps_every`` steps (the budget points)."""
        from distillkit.comparison import child_tree
        from distillkit.config import nested_set

        tree = child_tree(self.base, variant, self.overrides, teacher=teacher, requires_teacher=bool(teacher),
                          budget_images=images)
        if steps_every:
            for key, value in (("train.checkpoint_every", steps_every), ("train.keep_every", steps_every),
                               ("train.keep_last", 1), ("train.checkpoint_minutes", 0)):
                nested_set(tree, key, value)
        return tree


# ------------------------------------------------------------------------------------------------
# runs, cached in --work by their resolved config


def identity(tree: dict, registries) -> str:
    from distillkit.comparison import child_identity
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve

    return child_identity(resolve(run_config_from_dict(tree), registries).to_dict())[:12]


class NotTrained(Exception):
    """A run --work does not hold, asked for by a chain outside --only."""


def trained_run(plan: Plan, tree: dict, work: Path, name: str, teacher: str = "", *, train: bool = True) -> Path:
    """The folder of a finished run of ``tree``: trained now unless ``work`` holds it (or, with
    ``train`` false, NotTrained)."""
    folder = work / f"{name.replace('>', '_')}-{identity({**tree, 'teacher': teacher} if teacher else tree, plan.registries)}"
    done = folder / "finished.json"
    if done.exists():
        return folder
    earlier = compatible_run(plan, tree, work, name, teacher)
    if earlier is not None:
        return earlier
    if not train:
        raise NotTrained(name)
    steps = tree["train"]["max_steps"]
    _common.log(f"{name}: training {steps} steps x {plan.batch} = {steps * plan.batch:,} images -> {folder.name}")
    result = equal_budget.train_run(tree, folder / "run", plan.device, teacher)
    done.write_text(json.dumps({"seconds_per_step": result["seconds_per_step"], "wall_seconds": result["wall_seconds"],
                                "final_loss": result["final_loss"], "steps": steps}))
    return folder


_RUN_HASH = re.compile(r"-[0-9a-f]{12}(?=/)")


def _comparable(resolved_tree: dict) -> dict:
    """What a run trains, flattened; a teacher checkpoint named by its run's name, not its hash."""
    from distillkit.comparison.plan import _NOT_TRAINING
    from distillkit.config import flatten

    flat = flatten({k: v for k, v in resolved_tree.items() if k != "sample"})
    if flat.get("teacher"):
        flat["teacher"] = _RUN_HASH.sub("", str(flat["teacher"]))
    return {k: v for k, v in flat.items() if k not in _NOT_TRAINING}


@functools.lru_cache(maxsize=None)
def _recorded(checkpoint: Path) -> dict:
    """A finished run's recorded config, comparable; read once per run (a report asks for a
    teacher's run once per student point)."""
    from distillkit import load_checkpoint

    return _comparable(load_checkpoint(checkpoint)["config"])


def compatible_run(plan: Plan, tree: dict, work: Path, name: str, teacher: str):
    """A finished run of ``name`` made by an earlier version of the code, whose config hash differs
    only because options were added since: its recorded config agrees with this one on every
    option both have (an added option at its default is assumed to keep the old behaviour, which
    is what a new option's default must do). A rerun of the same training reproduces it bit for
    bit, so reusing it changes no number; the log names what was added."""
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve

    wanted = _comparable(resolve(run_config_from_dict({**tree, "teacher": teacher} if teacher else tree),
                                 plan.registries).to_dict())
    slug = name.replace(">", "_")
    for folder in sorted(work.glob(f"{slug}-*")):
        if not re.fullmatch(r"-[0-9a-f]{12}", folder.name[len(slug):]) or not (folder / "finished.json").exists():
            continue
        stored = _recorded(folder / "run" / "checkpoint.pt")
        if set(stored) <= set(wanted) and all(stored[k] == wanted[k] for k in stored):
            added = sorted(set(wanted) - set(stored))
            _common.log(f"{name}: reusing {folder.name}, trained before {', '.join(added) or 'nothing'} existed")
            return folder
    return None


def checkpoint_at(folder: Path, step: int) -> Path:
    from distillkit.training.state import step_file

    path = step_file(folder / "run" / "checkpoints", step)
    if not path.exists():
        raise DistillkitError(f"{path} is missing: the run kept no checkpoint at step {step}")
    return path


def evaluated(plan: Plan, args, checkpoint: Path) -> dict:
    """Quality per NFE of one checkpoint, cached beside it."""
    cache = checkpoint.with_suffix(".values.json")
    key = {"metrics": plan.metrics, "nfe": plan.nfes, "n": plan.n}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return {m: {int(k): v for k, v in by.items()} for m, by in stored["values"].items()}
    values, trained, sampler = equal_budget.evaluate(checkpoint, plan, args, checkpoint.parent)
    evals = trained.method.network_evals_per_step()
    cache.write_text(json.dumps({"key": key, "values": values, "sampler": sampler, "evals": evals}))
    return values


def root_points(plan: Plan, args, chain: dict, work: Path, train: bool) -> list[dict]:
    """A chain from scratch: checkpoints of one run at --points even steps (or one run per point)."""
    variant = chain["stages"][0]
    out = []
    for j in range(1, plan.points + 1):
        images = plan.total * j // plan.points
        if variant.method in plan.separate:
            folder = trained_run(plan, plan.tree(variant, images), work, f"{chain['label']}-point{j}", train=train)
            steps = json.loads((folder / "finished.json").read_text())["steps"]
            checkpoint = folder / "run" / "checkpoint.pt"
        else:
            folder = root_folder(plan, variant, work, train)
            total_steps = json.loads((folder / "finished.json").read_text())["steps"]
            steps = total_steps * j // plan.points
            checkpoint = checkpoint_at(folder, steps)
        out.append(point(plan, args, checkpoint, folder, teacher=0, generated=0, student=steps * plan.batch))
    return out


def root_folder(plan: Plan, variant, work: Path, train: bool) -> Path:
    """The one run of a root variant, with checkpoints at every budget point and at the teacher's share."""
    total_steps = math.ceil(plan.total / plan.batch)
    teacher_steps = math.ceil(plan.teacher_images / plan.batch)
    every = math.gcd(teacher_steps, *[total_steps * j // plan.points for j in range(1, plan.points + 1)])
    return trained_run(plan, plan.tree(variant, plan.total, steps_every=every), work, variant.label, train=train)


def student_points(plan: Plan, args, chain: dict, work: Path, train: bool) -> list[dict]:
    """TEACHER>STUDENT: the student trains on the budget left after the teacher and its generated data."""
    teacher_variant, student = chain["stages"]
    teacher_steps = math.ceil(plan.teacher_images / plan.batch)
    teacher = str(checkpoint_at(root_folder(plan, teacher_variant, work, train), teacher_steps))
    generated = evals_once(plan, plan.tree(student, plan.batch, teacher=teacher), teacher, work)
    left = plan.total - teacher_steps * plan.batch - plan.eval_rate * generated
    steps = plan.points * math.floor(left / (plan.batch * plan.points))
    if steps <= 0:
        raise ConfigError("--total-images", plan.total, f"more than the teacher's {plan.teacher_images:,} images and "
                          f"{chain['label']}'s generated data ({generated:,} evaluations x {plan.eval_rate:g})")
    out = []
    for j in range(1, plan.points + 1):
        done = steps * j // plan.points
        if student.method in plan.separate:
            tree = plan.tree(student, done * plan.batch, teacher=teacher)
            folder = trained_run(plan, tree, work, f"{chain['label']}-point{j}", teacher, train=train)
            checkpoint = folder / "run" / "checkpoint.pt"
        else:
            tree = plan.tree(student, steps * plan.batch, teacher=teacher, steps_every=steps // plan.points)
            folder = trained_run(plan, tree, work, chain["label"], teacher, train=train)
            checkpoint = checkpoint_at(folder, done)
        out.append(point(plan, args, checkpoint, folder, teacher=teacher_steps * plan.batch, generated=generated,
                         student=done * plan.batch))
    return out


def evals_once(plan: Plan, tree: dict, teacher: str, work: Path) -> int:
    """The student's network_evals_once at its config (a method built, not trained)."""
    from distillkit.config import run_config_from_dict
    from distillkit.contracts import TeacherContext
    from distillkit.resolve import resolve
    from distillkit.teachers import load_teacher
    from distillkit.training.build import build_method

    resolved = resolve(run_config_from_dict({**tree, "teacher": teacher}), plan.registries)
    context = TeacherContext(data=plan.spec, dataset_name=resolved.config.dataset, dataset_config=resolved.dataset_config,
                             device=plan.device, runs_dir=str(work))
    loaded = load_teacher(teacher, plan.registries, context)
    return int(build_method(resolved, plan.spec, teacher=loaded).network_evals_once())


def point(plan: Plan, args, checkpoint: Path, folder: Path, *, teacher: int, generated: int, student: int) -> dict:
    run = json.loads((folder / "finished.json").read_text())
    total = teacher + plan.eval_rate * generated + student
    return {"total_images": total, "teacher_images": teacher, "generated_evals": generated, "student_images": student,
            "checkpoint": str(checkpoint), "seconds_per_step": run["seconds_per_step"],
            "values": evaluated(plan, args, checkpoint)}


# ------------------------------------------------------------------------------------------------
# report


def collect(plan: Plan, args, work: Path) -> list[dict]:
    """Every chain's points: trained (if in --only) or found in --work; chains neither are left out."""
    rows = []
    for chain in plan.chains:
        points_of = student_points if len(chain["stages"]) == 2 else root_points
        try:
            points = points_of(plan, args, chain, work, chain["label"] in plan.only and not args.report_only)
        except NotTrained as missing:
            _common.log(f"{chain['label']}: not in --work yet ({missing}), left out of the report")
            continue
        rows.append({"label": chain["label"], "points": points, "evals": cost_of(points[-1])})
    return rows


def cost_of(last: dict) -> dict:
    cache = Path(last["checkpoint"]).with_suffix(".values.json")
    return json.loads(cache.read_text()).get("evals", {}) if cache.exists() else {}


def markdown(plan: Plan, args, info: dict, rows: list[dict]) -> str:
    text = [_common.header(f"Few-step quality against total training budget on {args.dataset}", info,
                           _common.command_line()), "## Accounting", "",
            f"x = teacher images + {plan.eval_rate:g} × network evaluations of generated data + student images. "
            f"Students (TEACHER>STUDENT) distil the teacher run's checkpoint at {plan.teacher_images:,} images and "
            f"train on what is left of {plan.total:,}. Chains from scratch: checkpoints of one run at "
            f"{plan.points} even budget points"
            + (f"; {', '.join(sorted(plan.separate))}: one run per point (their schedule depends on the run's length)"
               if plan.separate else "")
            + f". Batch {plan.batch}, training seed {args.seed}; quality: {plan.n} samples per NFE, EMA weights, "
            "each method's own sampler, per-sample seeds; lower is better. Per-step teacher evaluations are not "
            "images: see the cost table.", ""]
    for metric in plan.metrics:
        text += [f"## {metric} at the full budget", "",
                 "| chain | total images | " + " | ".join(f"NFE {k}" for k in plan.nfes) + " |",
                 "|---|---:|" + "---:|" * len(plan.nfes)]
        best = {k: min((r["points"][-1]["values"][metric].get(k, math.inf) for r in rows), default=math.inf)
                for k in plan.nfes}
        for r in rows:
            last = r["points"][-1]
            cells = [_cell(last["values"][metric].get(k), best[k]) for k in plan.nfes]
            text.append(f"| {r['label']} | {last['total_images']:,.0f} | " + " | ".join(cells) + " |")
        text.append("")
    text += ["## Every point", "", "| chain | teacher | generated (evals) | student | total | "
             + " | ".join(f"{m} NFE {k}" for m in plan.metrics for k in plan.nfes) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(plan.metrics) * len(plan.nfes))]
    for r in rows:
        for p in r["points"]:
            cells = [_cell(p["values"][m].get(k), None) for m in plan.metrics for k in plan.nfes]
            text.append(f"| {r['label']} | {p['teacher_images']:,} | {p['generated_evals']:,} | {p['student_images']:,} | "
                        f"{p['total_images']:,.0f} | " + " | ".join(cells) + " |")
    text += ["", "## Cost", "", "| chain | network evals / step (grad + no-grad + JVP) | s/step |", "|---|---|---:|"]
    for r in rows:
        e = r["evals"]
        text.append(f"| {r['label']} | {e.get('with_grad', '?')} + {e.get('no_grad', '?')} + {e.get('jvp', 0)} | "
                    f"{r['points'][-1]['seconds_per_step']:.4f} |")
    text += ["", "## Metrics", ""] + [f"- **{m}**: {plan.prepared[m].description}" for m in plan.metrics]
    return "\n".join(text) + "\n"


def _cell(value, best) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    cell = f"{value:.2f}"
    return f"**{cell}**" if best is not None and value == best else cell


def write_plot(plan: Plan, args, rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        _common.log(f"plot skipped: {exc}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = plan.metrics[0]
    fig, axes = plt.subplots(1, len(plan.nfes), figsize=(5.0 * len(plan.nfes), 4.6), squeeze=False)
    for ax, nfe in zip(axes[0], plan.nfes):
        for index, r in enumerate(rows):
            xs = [p["total_images"] for p in r["points"]]
            ys = [p["values"][metric].get(nfe, math.nan) for p in r["points"]]
            style = "-" if len(r["label"].split(">")) == 1 else "--"
            ax.plot(xs, ys, style, marker="os^Dv<>p*hX"[index % 11], markersize=4, label=r["label"],
                    color=plt.cm.tab20(index % 20))
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_xlabel("total training images (teacher + generated + student)")
        ax.set_title(f"{metric}, NFE {nfe} (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"{args.dataset}: few-step quality against total budget (dashed: distilled from a teacher)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = Plan(args)
    info = _common.machine(plan.device)
    work = Path(args.work).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = collect(plan, args, work)
    _common.log(f"done in {time.perf_counter() - started:.0f} s")
    data = {"machine": info, "command": _common.command_line(), "dataset": args.dataset, "total_images": plan.total,
            "teacher_images": plan.teacher_images, "eval_rate": plan.eval_rate, "batch_size": plan.batch,
            "seed": int(args.seed), "nfe": plan.nfes, "metrics": plan.metrics, "n": plan.n,
            "separate_runs": sorted(plan.separate),
            "chains": [{**r, "points": [{**p, "values": {m: {str(k): v for k, v in by.items()} for m, by in p["values"].items()}}
                                        for p in r["points"]]} for r in rows]}
    _common.write_result(args.out, markdown(plan, args, info, rows), data)
    if rows:
        write_plot(plan, args, rows, Path(args.out).with_suffix(".png"))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return _common.exit_code("budget_curve", lambda: run(args))

if __name__ == "__main__":
    sys.exit(main())
