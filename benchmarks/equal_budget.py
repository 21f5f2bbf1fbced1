"""Methods compared at an equal training budget: every variant trains ceil(budget / batch) steps of
the same batch size from the same seed, then is measured with one protocol (quality per NFE,
EMA weights, per-sample seeds) and its cost per training step (seconds, network evaluations).

    python benchmarks/equal_budget.py --dataset digits --variants fm,cud-euler,cud-rk2,cud-rk3 \
        --budget-images 256000 --nfe 1,2,4,8,16 --metrics classifier_fd,fd_pixels --n 1000 \
        --device cpu --out docs/results/cud-digits.md

Writes ``--out`` (markdown), the same name with ``.json`` (raw numbers, machine, each variant's
resolved config) and ``.png`` (quality against NFE), after every variant, so a killed run leaves
what it finished. No MLflow: runs are trained in-process with a NullTracker (``distillkit compare``
is the MLflow version of this). Variants that distil a teacher (cd, rf-distill, pd) get an ``fm``
teacher trained here first, on ``--teacher-images`` images that do not count in the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common
from distillkit.errors import ConfigError

PLACEHOLDER_TEACHER = "teacher-trained-by-this-script"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", required=True)
    add("--variants", required=True, help="METHOD or METHOD-INTEGRATOR, comma-separated (fm,cud-euler,cud-rk3,cd)")
    add("--budget-images", required=True, help="training images per variant")
    add("--nfe", default="1,2,4,8,16")
    add("--metrics", default="fd_pixels")
    add("--n", default="1000", help="samples per NFE")
    add("--device", default="cpu")
    add("--out", required=True, help="markdown file; .json and .png are written beside it")
    add("--batch-size", default="128")
    add("--seed", default="0", help="training seed of every variant and of the teacher")
    add("--data-root", default="")
    add("--backbone", default="")
    add("--set", dest="overrides", action="append", default=[], metavar="[TARGET:]KEY=VALUE",
        help="a config option for every run, or for one method / variant / the teacher (cd:method_options.num_points=10)")
    add("--teacher-images", default="", help="training images of the fm teacher (default: the budget)")
    add("--work", default="", help="where run folders go (default: a temporary folder, deleted at the end)")
    add("--time-limit", type=float, default=0.0, help="seconds; variants that would not fit are skipped")
    add("--threads", type=int, default=0, help="torch threads (default: torch's own)")

    _common.one_line_errors(parser, "equal_budget")
    return parser.parse_args(argv)


def parse_variants(text: str, registries):
    """Labels -> comparison.Variant (``_common.split_variant`` says which labels name a variant)."""
    from distillkit.comparison import Variant

    out = []
    for label in dict.fromkeys(p.strip() for p in text.split(",") if p.strip()):
        parts = _common.split_variant(label, registries)
        if parts is None:
            raise ConfigError("--variants", label, _common.variants_allowed(registries))
        out.append(Variant(*parts))
    if not out:
        raise ConfigError("--variants", text, _common.variants_allowed(registries))
    return out


class Plan:
    """Every run's config, resolved and checked before anything is trained."""

    def __init__(self, args: argparse.Namespace):
        from distillkit.arguments import check_device, parse_metrics, parse_nfe, parse_positive
        from distillkit.comparison import Override, Variant, child_identity, child_tree
        from distillkit.config import run_config_from_dict
        from distillkit.evaluation import EvalSettings, Evaluator, of_config
        from distillkit.plugin_manager import get_registries
        from distillkit.resolve import build_sampler, lookup, resolve, steps_for
        from distillkit.training.build import build_dataset

        registries = get_registries()
        lookup(registries.datasets, "--dataset", args.dataset)
        self.variants = parse_variants(args.variants, registries)
        self.budget = parse_positive(args.budget_images, "--budget-images")
        self.teacher_images = parse_positive(args.teacher_images, "--teacher-images") if args.teacher_images else self.budget
        self.batch = parse_positive(args.batch_size, "--batch-size")
        self.nfes = list(parse_nfe(args.nfe))
        self.metrics = list(parse_metrics(args.metrics, "--metrics"))
        self.n = parse_positive(args.n, "--n")
        self.device = check_device(args.device)
        overrides = [Override.parse(item) for item in args.overrides]
        targets = {"teacher"} | {v.method for v in self.variants} | {v.label for v in self.variants}
        for o in overrides:
            if o.target and o.target not in targets:
                raise ConfigError("--set", f"{o.target}:{o.key}",
                                  f"TARGET:KEY=VALUE with TARGET one of {', '.join(sorted(targets))}")
        # The trainer's end-of-run evaluation is not what is reported (see evaluate()): few samples.
        base = {"dataset": args.dataset, "device": str(self.device), "data_root": args.data_root, "seed": args.seed,
                "train": {"batch_size": self.batch}, "sample": {"num_samples": 64, "nfe": self.nfes}}
        if args.backbone:
            base["backbone"] = args.backbone
        self.runs = []  # (variant, requires_teacher, tree, resolved)
        for variant in self.variants:
            needs = lookup(registries.methods, "method", variant.method).requires_teacher
            tree = child_tree(base, variant, [o for o in overrides if o.target != "teacher"],
                              teacher=PLACEHOLDER_TEACHER, requires_teacher=needs, budget_images=self.budget)
            # NFEs the sampler cannot do, named as --nfe (resolve would name sample.nfe).
            method_cls = lookup(registries.methods, "method", variant.method)
            sample = run_config_from_dict(tree).sample
            sampler = build_sampler(registries, sample.sampler or method_cls.default_sampler, sample.sampler_options,
                                    sample.integrator, method_cls=method_cls)
            for nfe in self.nfes:
                try:
                    steps_for(sampler, nfe, "--nfe")
                except ConfigError as exc:
                    raise ConfigError("--nfe", nfe, f"{exc.allowed} ({variant.label} samples with "
                                      f"{sampler.describe()})") from None
            self.runs.append((variant, needs, tree, resolve(run_config_from_dict(tree), registries)))
        teacher_overrides = [Override(o.key, o.value) for o in overrides if o.target in ("", "teacher")]
        self.teacher_tree = child_tree(base, Variant("fm", None), teacher_overrides, teacher="", requires_teacher=False,
                                       budget_images=self.teacher_images)
        teacher_resolved = resolve(run_config_from_dict(self.teacher_tree), registries)
        # An fm variant identical to the teacher (same overrides, budget) is the teacher: train it once.
        self.teacher_is = next((v.label for v, _, _, r in self.runs if child_identity(r.to_dict())
                                == child_identity(teacher_resolved.to_dict())), None)
        self.steps = {v.label: r.config.train.max_steps for v, _, _, r in self.runs}

        # What would otherwise fail after training: metrics for this data, data files, references
        # (the classifier is trained and cached on first use; FID needs its statistics).
        first = self.runs[0][3]
        dataset = build_dataset(first)
        self.spec = dataset.spec
        settings = EvalSettings(metrics=tuple(self.metrics), nfes=tuple(self.nfes), n=self.n, seed=first.config.sample.seed,
                                data_root=args.data_root)
        checked = Evaluator(of_config(first, dataset), settings, device=self.device, log=_common.log).check()
        self.prepared = {metric.name: metric for metric in checked.metrics}


def train_run(tree: dict, output_dir: Path, device: torch.device, teacher_checkpoint: str = "") -> dict:
    """Train one run in-process; time the steps between the end of step k0 and the end of the
    second-to-last step, which leaves out set-up (model, data, rf-distill's teacher pairs),
    warm-up, the final checkpoint and the trainer's end-of-run evaluation."""
    from distillkit.config import run_config_from_dict
    from distillkit.contracts import TeacherContext
    from distillkit.plugin_manager import get_registries
    from distillkit.resolve import resolve
    from distillkit.teachers import load_teacher
    from distillkit.tracking import NullTracker
    from distillkit.training.build import build_dataset
    from distillkit.training.trainer import train

    if teacher_checkpoint:
        tree = {**tree, "teacher": teacher_checkpoint}
    resolved = resolve(run_config_from_dict(tree), get_registries())
    steps = resolved.config.train.max_steps
    dataset = build_dataset(resolved)
    teacher = None
    if teacher_checkpoint:
        context = TeacherContext(data=dataset.spec, dataset_name=resolved.config.dataset,
                                 dataset_config=resolved.dataset_config, device=device, runs_dir=str(output_dir.parent))
        teacher = load_teacher(teacher_checkpoint, get_registries(), context)
    k0, k1 = max(1, min(10, steps // 10)), steps - 1
    marks: dict[int, float] = {}

    def on_step(done: int) -> None:
        if done in (k0, k1):
            _common.synchronize(device)  # the GPU's queued work belongs to the steps before the mark
            marks[done] = time.perf_counter()

    started = time.perf_counter()
    result = train(resolved, NullTracker(), output_dir, dataset=dataset, teacher=teacher, device=device,
                   progress=False, on_step=on_step, log=_common.log)
    wall = time.perf_counter() - started
    timed = k1 - k0 if k1 > k0 else 0
    per_step = (marks[k1] - marks[k0]) / timed if timed else wall / steps  # too few steps: the whole call
    return {"resolved": resolved, "checkpoint": result.checkpoint, "seconds_per_step": per_step, "timed_steps": timed,
            "wall_seconds": wall, "final_loss": result.final_loss}


def evaluate(checkpoint: Path, plan: Plan, args: argparse.Namespace, work: Path) -> tuple[dict, object, str]:
    """Quality per NFE of the EMA weights, with the run's own sampler and per-sample seeds."""
    from distillkit.evaluation import EvalSettings, evaluate_model
    from distillkit.trained import load_trained_model

    trained = load_trained_model(checkpoint, weights="ema", device=plan.device)
    sample = trained.resolved.config.sample
    settings = EvalSettings(metrics=tuple(plan.metrics), nfes=tuple(plan.nfes), n=plan.n, seed=sample.seed,
                            data_root=args.data_root)
    result = evaluate_model(trained, settings, device=plan.device, runs_dir=work, metrics=plan.prepared, log=_common.log)
    return {m: result.values[plan.prepared[m].result_name] for m in plan.metrics}, trained, result.sampler


def _best(rows: list[dict], metric: str, nfe: int):
    values = [r["values"][metric][nfe] for r in rows if math.isfinite(r["values"][metric].get(nfe, math.nan))]
    return min(values) if values and len(rows) > 1 else None


def markdown(plan: Plan, args, info: dict, rows: list[dict], skipped: list[str], teacher: dict) -> str:
    steps = sorted(set(plan.steps.values()))
    samplers = sorted({f"{r['sampler']} sampler/grid" for r in rows}) or ["–"]
    text = [_common.header(f"Equal training budget on {args.dataset}: {plan.budget:,} training images per variant",
                           info, _common.command_line()), "## Protocol", ""]
    para = (f"Every variant trains {'/'.join(map(str, steps))} optimizer steps of {plan.batch} images "
            f"(ceil({plan.budget:,} / {plan.batch})) from training seed {args.seed}, one after another in one process. "
            f"Quality: {plan.n} samples per NFE from per-sample seeds {rows[0]['eval_seed'] if rows else 1234}.."
            f"{(rows[0]['eval_seed'] if rows else 1234) + plan.n - 1}, {', '.join(samplers)}, EMA weights, checkpoint "
            f"at the end of training; lower is better; **bold** is the best of its column. Time per step: from the "
            f"end of step k0 = min(10, steps/10) to the end of the second-to-last step, so set-up, the final "
            f"checkpoint and evaluation are left out (wall s includes them).")
    if teacher:
        para += (f" Teacher of {', '.join(v.label for v, needs, _, _ in plan.runs if needs)}: `fm`, "
                 f"{teacher['steps']} steps × {plan.batch} = {teacher['steps'] * plan.batch:,} images, seed {args.seed}"
                 + (f" (the same run as the `{teacher['variant']}` variant)"
                    if teacher["variant"] in [r["label"] for r in rows] else f", {teacher['wall_seconds']:.0f} s")
                 + "; its training images are **not** counted in the budget, and students that start from the "
                 "teacher's weights (init_from_teacher, on by default) build on them.")
    text += [para, "", "## Cost", "",
             "| variant | steps × batch | network evals / step (grad + no-grad) | s/step | images/s | time/step vs fm | wall s |",
             "|---|---|---|---:|---:|---:|---:|"]
    fm = next((r["seconds_per_step"] for r in rows if r["label"] == "fm"), None)
    for r in rows:
        relative = f"{r['seconds_per_step'] / fm:.2f}×" if fm else "–"
        text.append(f"| {r['label']} | {r['steps']} × {r['batch_size']} | {r['evals_with_grad']:g} + {r['evals_no_grad']:g}"
                    f"{' + %g JVP' % r['evals_jvp'] if r.get('evals_jvp') else ''} "
                    f"| {r['seconds_per_step']:.4f} | {r['images_per_second']:,.0f} | {relative} | {r['wall_seconds']:.1f} |")
    for metric in plan.metrics:
        text += ["", f"## {metric}", "", "| variant | " + " | ".join(f"NFE {k}" for k in plan.nfes) + " |",
                 "|---|" + "---:|" * len(plan.nfes)]
        for r in rows:
            cells = []
            for k in plan.nfes:
                value = r["values"][metric].get(k, math.nan)
                cell = f"{value:.4f}" if math.isfinite(value) else "–"
                cells.append(f"**{cell}**" if value == _best(rows, metric, k) else cell)
            text.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    for r in rows:  # reflow-style methods pay for their teacher's pairs once, before the first step
        options = r["config"].get("method_options", {})
        if "num_pairs" in options and not options.get("pairs_file"):
            text.append(f"\n{r['label']}: its {options['num_pairs']:,} teacher pairs ({options['pair_nfe']} "
                        f"{options['pair_integrator']} evaluations each) are generated before the first step: in wall s, "
                        f"not in s/step or network evals / step.")
    if skipped:
        text += ["", f"**Skipped** (did not fit in --time-limit {args.time_limit:.0f} s): {', '.join(skipped)}."]
    text += ["", "## Metrics", ""] + [f"- **{m}**: {plan.prepared[m].description}" for m in plan.metrics]
    return "\n".join(text) + "\n"


def write_plot(plan: Plan, args, rows: list[dict], path: Path) -> None:
    from distillkit.comparison import Row

    try:
        from distillkit.comparison import write_plot as plot

        plot([Row(r["label"], r["method"], r["integrator"], "", False, r["steps"], r["batch_size"], r["evals_with_grad"],
                  r["evals_no_grad"], r["seconds_per_step"] * r["steps"], r["wall_seconds"], r["images_per_second"],
                  r["values"]) for r in rows],
             plan.metrics, plan.nfes, path, f"{args.dataset}: quality vs NFE at {plan.budget:,} training images")
    except ImportError as exc:  # no matplotlib: the tables are the result
        _common.log(f"plot skipped: {exc}")


def write_all(plan: Plan, args, info: dict, rows: list[dict], skipped: list[str], teacher: dict, final: bool) -> None:
    data = {"machine": info, "command": _common.command_line(), "dataset": args.dataset, "budget_images": plan.budget,
            "batch_size": plan.batch, "seed": int(args.seed), "nfe": plan.nfes, "metrics": plan.metrics, "n": plan.n,
            "teacher": teacher, "skipped": skipped,
            "variants": [{**r, "values": {m: {str(k): v for k, v in by.items()} for m, by in r["values"].items()}}
                         for r in rows]}
    text = markdown(plan, args, info, rows, skipped, teacher)
    # Partial writes (after each variant) go to the files only; the final one is printed too.
    with contextlib.redirect_stdout(sys.stdout if final else io.StringIO()):
        _common.write_result(args.out, text, data)
    if rows:
        write_plot(plan, args, rows, Path(args.out).with_suffix(".png"))


def run(args: argparse.Namespace) -> int:
    deadline = _common.Deadline(args.time_limit)  # from the start: the limit is the whole command's
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = Plan(args)
    info = _common.machine(plan.device)
    work = Path(args.work).expanduser().resolve() if args.work else Path(tempfile.mkdtemp(prefix="equal-budget-"))
    rows: list[dict] = []
    skipped: list[str] = []
    teacher: dict = {}  # what the markdown / JSON say about the teacher
    teacher_run: dict = {}  # train_run() of the teacher, or of the fm variant identical to it
    try:
        for index, (variant, needs_teacher, tree, resolved) in enumerate(plan.runs, 1):
            label = variant.label
            # The slowest variant so far (plus the teacher, when it is still to train) is the estimate.
            estimate = max((r["wall_seconds"] + r["eval_seconds"] for r in rows), default=0.0)
            if needs_teacher and not teacher_run:
                estimate *= 1 + plan.teacher_images / plan.budget
            if rows and not deadline.allows(estimate):
                _common.log(f"[{index}/{len(plan.runs)}] {label}: skipped ({deadline.left():.0f} s left, needs ~{estimate:.0f} s)")
                skipped.append(label)
                continue
            if needs_teacher and not teacher_run:
                _common.log(f"teacher fm: training {plan.teacher_tree['train']['max_steps']} steps x {plan.batch}")
                teacher_run = train_run(plan.teacher_tree, work / "teacher-fm", plan.device)
            if needs_teacher and not teacher:
                config = teacher_run["resolved"].config
                teacher = {"steps": config.train.max_steps, "checkpoint": str(teacher_run["checkpoint"]),
                           "wall_seconds": teacher_run["wall_seconds"], "variant": plan.teacher_is,
                           "config": teacher_run["resolved"].to_dict()}
            steps = plan.steps[label]
            if label == plan.teacher_is and teacher_run:
                _common.log(f"[{index}/{len(plan.runs)}] {label}: the teacher's run (same config), not trained again")
                done = teacher_run
            else:
                _common.log(f"[{index}/{len(plan.runs)}] {label}: training {steps} steps x {plan.batch} = {steps * plan.batch:,} images")
                done = train_run(tree, work / label, plan.device, teacher["checkpoint"] if needs_teacher else "")
                if label == plan.teacher_is:
                    teacher_run = done
            started = time.perf_counter()
            values, trained, sampler = evaluate(done["checkpoint"], plan, args, work)
            evals = trained.method.network_evals_per_step()
            resolved = done["resolved"]
            rows.append({
                "label": label, "method": variant.method, "integrator": resolved.integrator.name
                if resolved.method_cls.uses_integrator else "none",
                "steps": steps, "batch_size": plan.batch, "training_images": steps * plan.batch,
                "evals_with_grad": evals["with_grad"], "evals_no_grad": evals["no_grad"], "evals_jvp": evals.get("jvp", 0),
                "seconds_per_step": done["seconds_per_step"], "timed_steps": done["timed_steps"],
                "images_per_second": plan.batch / done["seconds_per_step"], "wall_seconds": done["wall_seconds"],
                "eval_seconds": time.perf_counter() - started, "final_loss": done["final_loss"],
                "parameters": sum(p.numel() for p in trained.model.parameters()),
                "sampler": sampler, "grid": resolved.config.sample.grid,
                "eval_seed": resolved.config.sample.seed, "values": values, "config": resolved.to_dict(),
            })
            del trained
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            write_all(plan, args, info, rows, skipped, teacher, final=False)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_all(plan, args, info, rows, skipped, teacher, final=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return _common.exit_code("equal_budget", lambda: run(args))

if __name__ == "__main__":
    sys.exit(main())
