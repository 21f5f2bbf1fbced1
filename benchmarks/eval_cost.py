"""Where the end-of-run evaluation's time goes, per dataset, on the CPU.

The evaluation is run through its real code path (``distillkit.evaluation.end_of_run``, and an
``Evaluator`` with ``classifier_fd`` for what ``distillkit eval`` adds), on the network a run of
``distillkit run --method cud --dataset <dataset>`` builds (freshly initialised: the cost of a
forward pass does not depend on the weights). The script only wraps functions from the outside
(``unittest.mock.patch.object``) to time them: the reference samples, the classifier (trained or
loaded), each metric's ``prepare`` and ``measure``, the ode_error reference solve
(``sample_seeded``) and the sampling at each NFE (``generate``). Times are exclusive: a part
nested in another (the reference samples inside a metric's ``prepare``) is counted once, so the
parts add up to the whole evaluation ("other": what no wrapper covers).

Each part is reported as wall seconds (``time.perf_counter``), CPU seconds of this process
(``time.process_time``: with one thread the better measure on a shared machine) and its fraction
of the whole. "cold": an empty ``$DISTILLKIT_CACHE``; "cached": the same evaluation again with the
cache the cold one filled.

    OMP_NUM_THREADS=1 python benchmarks/eval_cost.py --threads 1 --datasets digits,mnist,toy2d \\
        --data-root ../shared/data/mnist --out docs/results/eval-cost-cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

import torch

from _common import add_run_options, command_line, fail, header, machine, start, write_result

DATASETS = ("digits", "mnist", "toy2d")


class Clock:
    """Exclusive wall and CPU seconds per labelled part: time spent in a nested part is charged to
    it, not to the part around it."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open part: [wall, cpu] spent in its children

    @contextlib.contextmanager
    def part(self, label: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        self._stack.append([0.0, 0.0])
        try:
            yield
        finally:
            child_wall, child_cpu = self._stack.pop()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            self.wall[label] = self.wall.get(label, 0.0) + wall - child_wall
            self.cpu[label] = self.cpu.get(label, 0.0) + cpu - child_cpu
            if self._stack:
                self._stack[-1][0] += wall
                self._stack[-1][1] += cpu

    def timed(self, label: str | Callable[..., str], fn: Callable) -> Callable:
        """``fn`` timed as ``label`` (a string, or a function of fn's arguments giving one)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.part(label(*args, **kwargs) if callable(label) else label):
                return fn(*args, **kwargs)

        return wrapper


def _build(dataset_name: str, data_root: str, integrator: str, num_samples: int = 0):
    """The resolved config, dataset, method and sampling network of ``distillkit run --method cud
    --integrator INTEGRATOR --dataset DATASET`` (initial weights)."""
    from distillkit import get_registries
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.training.build import build_dataset, build_model

    tree = {"method": "cud", "integrator": integrator, "dataset": dataset_name, "data_root": data_root}
    if num_samples:
        tree["sample"] = {"num_samples": num_samples}
    resolved = resolve(run_config_from_dict(tree), get_registries())
    dataset = build_dataset(resolved)
    method, network = build_model(resolved, dataset.spec, torch.device("cpu"), seed=0)
    return resolved, dataset, method, network.eval()


@contextlib.contextmanager
def _instrumented(clock: Clock, dataset, nfes: tuple[int, ...]) -> Iterator[None]:
    """Every part of an evaluation timed, by wrapping (not changing) the functions it calls."""
    import distillkit_metrics as metrics

    from distillkit import classifier
    from distillkit.evaluation import evaluator

    calls = {"generate": 0}

    def sampling_label(*args, **kwargs) -> str:
        nfe = nfes[calls["generate"] % len(nfes)]
        calls["generate"] += 1
        return f"sampling NFE {nfe}"

    patches = [
        mock.patch.object(evaluator, "generate", clock.timed(sampling_label, evaluator.generate)),
        mock.patch.object(evaluator, "sample_seeded", clock.timed("ode_error reference solve", evaluator.sample_seeded)),
        mock.patch.object(classifier, "classifier_for", clock.timed("classifier (train or load)", classifier.classifier_for)),
        mock.patch.object(dataset, "reference_samples", clock.timed("reference samples", dataset.reference_samples)),
    ]
    for cls in metrics.METRICS:
        patches.append(mock.patch.object(cls, "prepare", clock.timed(f"prepare {cls.name}", cls.prepare)))
        patches.append(mock.patch.object(cls, "measure", clock.timed(f"measure {cls.name}", cls.measure)))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _split(clock: Clock, wall: float, cpu: float) -> dict:
    covered_wall, covered_cpu = sum(clock.wall.values()), sum(clock.cpu.values())
    parts = {label: {"wall_s": clock.wall[label], "cpu_s": clock.cpu[label]} for label in clock.wall}
    parts["other"] = {"wall_s": max(wall - covered_wall, 0.0), "cpu_s": max(cpu - covered_cpu, 0.0)}
    for entry in parts.values():
        entry["fraction_wall"] = entry["wall_s"] / wall if wall > 0 else 0.0
        entry["fraction_cpu"] = entry["cpu_s"] / cpu if cpu > 0 else 0.0
    return {"wall_s": wall, "cpu_s": cpu, "parts": parts}


def time_end_of_run(resolved, dataset, method, network) -> tuple[dict, dict]:
    """``end_of_run`` as the trainer calls it: its split and its table values."""
    from distillkit.evaluation import end_of_run

    clock = Clock()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with _instrumented(clock, dataset, tuple(resolved.config.sample.nfe)):
        evaluation = end_of_run(method, network, dataset, resolved, "cpu", log=None)
    split = _split(clock, time.perf_counter() - wall0, time.process_time() - cpu0)
    return split, evaluation.metrics()


def time_metric(resolved, dataset, method, network, metric: str) -> tuple[dict, dict]:
    """One more metric measured as ``distillkit eval --metric METRIC`` does, with the run's own
    sampler and NFEs (the sampling is part of its cost)."""
    from distillkit.evaluation import EvalSettings, Evaluator, of_network
    from distillkit.evaluation.choice import SamplingChoice

    sample = resolved.config.sample
    settings = EvalSettings(metrics=(metric,), nfes=tuple(sample.nfe), n=sample.num_samples, seed=sample.seed)
    subject = of_network(method, network, resolved, dataset=dataset, spec=dataset.spec)
    clock = Clock()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with _instrumented(clock, dataset, settings.nfes):
        result = Evaluator(subject, settings, sampling=SamplingChoice(resolved.sampler, resolved.grid), log=None).run()
    split = _split(clock, time.perf_counter() - wall0, time.process_time() - cpu0)
    return split, result.metrics()


def reference_accuracy(checkpoint: str, n: int, truth_steps: int) -> dict:
    """How far each candidate reference solve is from a ``truth_steps``-step uniform rk4 solve of a
    trained model's own velocity, next to the errors ode_error measures (Euler at NFE 1..16): the
    same noise and labels as the end-of-run evaluation (seed 1234)."""
    from distillkit import edm_grid, get_registries, uniform_grid
    from distillkit.evaluation import labels_for, of_trained
    from distillkit.metrics import ode_error
    from distillkit.sampling import sample_seeded
    from distillkit.trained import load_trained_model

    trained = load_trained_model(Path(checkpoint), weights="ema", device=torch.device("cpu"))
    subject = of_trained(trained)
    integrators = get_registries().integrators
    labels = labels_for(subject.spec, n, 1234)

    def solve(integrator: str, grid: torch.Tensor) -> torch.Tensor:
        return sample_seeded(subject.velocity_for, subject.spec, n, 1234, grid, integrators.get(integrator),
                             labels=labels)

    truth = solve("rk4", uniform_grid(truth_steps))
    candidates = {f"rk4x{k} uniform": uniform_grid(k) for k in (16, 32)}
    candidates.update({f"rk4x{k} rho2": edm_grid(k, rho=2.0) for k in (8, 12, 16)})
    errors = {name: ode_error(solve("rk4", grid), truth) for name, grid in candidates.items()}
    measured = {nfe: ode_error(solve("euler", uniform_grid(nfe)), truth) for nfe in (1, 2, 4, 8, 16)}
    resolved = trained.resolved.config
    return {"checkpoint": checkpoint, "method": resolved.method, "integrator": resolved.integrator,
            "dataset": resolved.dataset, "step": trained.step, "n": n, "truth": f"rk4x{truth_steps} uniform",
            "reference_error": errors, "euler_ode_error": measured}


def _accuracy_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    names = list(rows[0]["reference_error"])
    lines = ["## Accuracy of the reference solve", "",
             f"RMS distance (ode_error's formula) of each candidate reference to a {rows[0]['truth']} solve of "
             f"the model's own velocity, {rows[0]['n']} samples; right: the ode_error Euler sampling has at "
             f"NFE 8 and 16 against the same truth. The reference's own error bounds how much it can move a "
             f"measured ode_error (triangle inequality).", "",
             "| model | " + " | ".join(names) + " | Euler NFE 8 | Euler NFE 16 |",
             "|---|" + "---:|" * (len(names) + 2)]
    for r in rows:
        label = f"{r['method']}-{r['integrator']} {r['dataset']} step {r['step']}"
        cells = " | ".join(f"{r['reference_error'][name]:.2e}" for name in names)
        lines.append(f"| {label} | {cells} | {r['euler_ode_error'][8]:.4f} | {r['euler_ode_error'][16]:.4f} |")
    return "\n".join(lines) + "\n"


class _Stop(Exception):
    """Raised from ``on_step`` to end the timed training before its checkpoint and evaluation."""


def time_main_job_training(integrator: str, steps: int, warmup: int = 3) -> dict:
    """Seconds (wall and CPU) per step of the default main job (``distillkit run --method cud
    --integrator rk3``: digits, batch 128, the trainer's own loop), from ``steps`` timed steps after
    ``warmup``; multiplied by its ``train.max_steps`` for its whole training."""
    from distillkit import get_registries
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.tracking import NullTracker
    from distillkit.training.trainer import train

    tree = {"method": "cud", "integrator": integrator, "dataset": "digits",
            "train": {"max_steps": 2000, "checkpoint_every": 0, "sample_every": 0}}
    resolved = resolve(run_config_from_dict(tree), get_registries())
    marks: dict[int, tuple[float, float]] = {}

    def on_step(step: int) -> None:
        if step in (warmup, warmup + steps):
            marks[step] = (time.perf_counter(), time.process_time())
        if step == warmup + steps:
            raise _Stop

    with tempfile.TemporaryDirectory() as out:
        try:
            train(resolved, NullTracker(), Path(out), device=torch.device("cpu"), progress=False, on_step=on_step,
                  log=lambda line: None)
        except _Stop:
            pass
    (w0, c0), (w1, c1) = marks[warmup], marks[warmup + steps]
    max_steps = resolved.config.train.max_steps
    return {"timed_steps": steps, "max_steps": max_steps, "wall_s_per_step": (w1 - w0) / steps,
            "cpu_s_per_step": (c1 - c0) / steps, "training_wall_s": (w1 - w0) / steps * max_steps,
            "training_cpu_s": (c1 - c0) / steps * max_steps, "load_after": _load()}


def _main_job_table(main: dict, digits: Optional[dict]) -> str:
    if not main:
        return ""
    lines = ["## The default main job: evaluation against training", "",
             f"Training: {main['timed_steps']} steps of `distillkit run --method cud --integrator rk3` timed "
             f"(the trainer's loop, digits, batch 128): {main['wall_s_per_step']:.3f} s wall, "
             f"{main['cpu_s_per_step']:.3f} s CPU per step; × {main['max_steps']} steps = "
             f"{main['training_wall_s']:.0f} s wall, {main['training_cpu_s']:.0f} s CPU (load {main['load_after']})."]
    if digits is not None:
        run = digits["runs"]["end-of-run cold"]
        lines.append(f"End-of-run evaluation (digits, cold, above): {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s "
                     f"CPU: **{run['cpu_s'] / (run['cpu_s'] + main['training_cpu_s']):.1%} of the job's CPU time** "
                     f"({run['wall_s'] / (run['wall_s'] + main['training_wall_s']):.1%} of its wall time at this load).")
    return "\n".join(lines) + "\n\n"


def _summary(sources: list[tuple[str, dict]]) -> str:
    """One row per dataset, run kind and source: the whole and the two big parts as fractions."""
    lines = ["| source | dataset | n | evaluation | wall s | CPU s | reference solve (CPU) | sampling (CPU) | "
             "classifier (CPU) | rest (CPU) |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for label, data in sources:
        for result in data.get("results", []):
            for kind, run in result["runs"].items():
                parts = run["parts"]

                def share(match: Callable[[str], bool], parts=parts, run=run) -> float:
                    return sum(p["cpu_s"] for name, p in parts.items() if match(name)) / max(run["cpu_s"], 1e-12)

                reference = share(lambda name: name == "ode_error reference solve")
                sampling = share(lambda name: name.startswith("sampling"))
                classifier = share(lambda name: name == "classifier (train or load)")
                lines.append(f"| {label} | {result['dataset']} | {result['n']} | {kind} | {run['wall_s']:.1f} | "
                             f"{run['cpu_s']:.1f} | {reference:.0%} | {sampling:.0%} | {classifier:.0%} | "
                             f"{1 - reference - sampling - classifier:.0%} |")
    return "\n".join(lines) + "\n"


def combine(files: list[str], out: str, notes: str) -> None:
    """One results file from several runs of this script (each keeps its own command, date, commit
    and load): a summary table, then each run's tables."""
    sources = []
    for name in files:
        path = Path(name)
        if not path.is_file() or not path.with_suffix(".md").is_file():
            fail(f"--combine: {name} is not a JSON file written by this script (with its .md beside it)")
        sources.append((path.stem, json.loads(path.read_text())))
    info = machine(torch.device("cpu"))
    body = [header("Cost of the end-of-run evaluation on the CPU", info, command_line(), notes), "## Summary", "",
            "Fractions are of the evaluation's CPU time (one thread).", "", _summary(sources)]
    for (label, data), name in zip(sources, files):
        text = Path(name).with_suffix(".md").read_text().split("\n", 1)[1]  # without its title
        body += [f"## {label}", "", text.strip(), ""]
    write_result(out, "\n".join(body), {"machine": info, "command": command_line(),
                                        "sources": {label: data for label, data in sources}})


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def measure_dataset(name: str, data_root: str, integrator: str, cached_too: bool, num_samples: int = 0) -> dict:
    with _scratch_cache() as cache:
        started = time.perf_counter()
        resolved, dataset, method, network = _build(name, data_root, integrator, num_samples)
        out: dict = {"dataset": name, "build_seconds": time.perf_counter() - started, "cache": str(cache),
                     "n": resolved.config.sample.num_samples, "nfe": list(resolved.config.sample.nfe),
                     "load_before": _load(), "runs": {}}
        kinds = [("end-of-run cold", lambda: time_end_of_run(resolved, dataset, method, network))]
        if cached_too:
            kinds.append(("end-of-run cached", lambda: time_end_of_run(resolved, dataset, method, network)))
        if dataset.spec.is_image and dataset.classifier_recipe() is not None:
            kinds.append(("classifier_fd cold", lambda: time_metric(resolved, dataset, method, network, "classifier_fd")))
            kinds.append(("classifier_fd cached", lambda: time_metric(resolved, dataset, method, network, "classifier_fd")))
        for kind, measure in kinds:
            print(f"eval_cost: {name}: {kind} (load {_load()})", file=sys.stderr, flush=True)
            split, values = measure()
            out["runs"][kind] = {**split, "values": values, "load_after": _load()}
        return out


@contextlib.contextmanager
def _scratch_cache() -> Iterator[Path]:
    """An empty ``$DISTILLKIT_CACHE`` for one dataset's measurements (cold, then cached)."""
    before = os.environ.get("DISTILLKIT_CACHE")
    with tempfile.TemporaryDirectory(prefix="distillkit-eval-cost-") as scratch:
        os.environ["DISTILLKIT_CACHE"] = scratch
        try:
            yield Path(scratch)
        finally:
            if before is None:
                os.environ.pop("DISTILLKIT_CACHE", None)
            else:
                os.environ["DISTILLKIT_CACHE"] = before


def _table(result: dict) -> str:
    lines = []
    for kind, run in result["runs"].items():
        lines += [f"### {result['dataset']} (n = {result['n']}): {kind} — {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU "
                  f"(load {run['load_after']})", "",
                  "| part | wall s | CPU s | fraction (wall) | fraction (CPU) |", "|---|---:|---:|---:|---:|"]
        for label, part in sorted(run["parts"].items(), key=lambda kv: -kv[1]["cpu_s"]):
            lines.append(f"| {label} | {part['wall_s']:.2f} | {part['cpu_s']:.2f} | {part['fraction_wall']:.1%} | "
                         f"{part['fraction_cpu']:.1%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="comma-separated: digits, mnist, toy2d; '-' for none (with --accuracy)")
    parser.add_argument("--data-root", default="", help="where the MNIST IDX files are (--data-root of distillkit run)")
    parser.add_argument("--integrator", default="rk3", help="the run's training integrator (the main job: rk3)")
    parser.add_argument("--num-samples", type=int, default=0,
                        help="sample.num_samples (0: the run's default, 1000); the cost is linear in it")
    parser.add_argument("--main-job-steps", type=int, default=0,
                        help="also time this many training steps of the default main job (0: no)")
    parser.add_argument("--no-cached", action="store_true", help="skip the second (cached) end-of-run evaluation")
    parser.add_argument("--accuracy", default="", help="comma-separated trained checkpoints: measure the "
                        "reference solve's error on each (and skip the timing unless --datasets is given too)")
    parser.add_argument("--accuracy-n", type=int, default=1000, help="samples for --accuracy")
    parser.add_argument("--combine", default="", help="comma-separated JSON files of earlier runs of this script: "
                        "write one results file of them (nothing is measured)")
    parser.add_argument("--notes", default="", help="a line for the results file (e.g. before/after which change)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.combine:
        combine([f for f in args.combine.split(",") if f], args.out, args.notes)
        return
    checkpoints = [c for c in args.accuracy.split(",") if c]
    missing = [c for c in checkpoints if not Path(c).is_file()]
    if missing:
        fail(f"--accuracy: {missing[0]} is not a checkpoint file")
    names = [n for n in args.datasets.split(",") if n] if args.datasets != "-" else []
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not (names or checkpoints or args.main_job_steps):
        fail(f"--datasets={args.datasets!r}: a comma-separated list of {', '.join(DATASETS)}")
    device, _ = start(args)
    if device.type != "cpu":
        fail(f"--device={args.device}: this benchmark measures the CPU evaluation; use cpu")
    info = machine(device)
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "")
    info["load_at_start"] = _load()
    results = [measure_dataset(name, args.data_root, args.integrator, not args.no_cached, args.num_samples)
               for name in names]
    accuracy = [reference_accuracy(c, args.accuracy_n, truth_steps=128) for c in checkpoints]
    main_job = time_main_job_training(args.integrator, args.main_job_steps) if args.main_job_steps else {}
    digits = next((r for r in results if r["dataset"] == "digits"), None)
    notes = (f"Load average (1/5/15 min) at the start: {info['load_at_start']}; each table gives it at its end. "
             f"OMP_NUM_THREADS={info['omp_num_threads'] or 'unset'}. " + args.notes)
    markdown = header("Cost of the end-of-run evaluation on the CPU", info, command_line(), notes) + "\n" + \
        _main_job_table(main_job, digits) + "\n".join(_table(r) for r in results) + _accuracy_table(accuracy)
    write_result(args.out, markdown, {"machine": info, "command": command_line(), "results": results,
                                      "main_job_training": main_job,
                                      "reference_accuracy": accuracy})


if __name__ == "__main__":
    main()
