"""What one training step of each method costs, relative to flow matching (``fm``).

Every registered method (and CUD with each alignment integrator) trains the same network on the
same synthetic data through distillkit's own trainer; the table gives images/s, time per step
relative to fm (measured alternately with it, round by round), the network evaluations the method
says it spends per step (with and without gradient), peak memory, and the one-off start-up
(building, plus a method's ``prepare``: generating teacher pairs or trajectories, scaled down here
to a few batches; its per-step cost does not depend on how many were generated).

    python benchmarks/method_cost.py --device cpu --preset digits --out docs/results/method-cost-cpu.md
    python benchmarks/method_cost.py --device cuda --preset cifar10 --precision tf32 --out docs/results/method-cost-h200.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_run_options, command_line, header, machine, median, start, write_result
from _training import PRESETS, SyntheticImages, config_tree, describe_preset, make_teacher, time_training, variant_parts
from distillkit import get_registries

DEFAULT_VARIANTS = ("fm,cud-euler,cud-rk2,cud-rk3,otcfm,ct,cd,pd,rf-reflow,rf-distill,cud-stage2,"
                    "meanflow,shortcut,sct,scd,dmd2,sid")


def method_options(method: str, batch: int) -> dict:
    """Scale a method's one-off preparation down to a few batches: the step cost is unchanged."""
    if method in ("rf-reflow", "rf-distill"):
        return {"num_pairs": 4 * batch}
    if method == "cud-stage2":
        return {"num_trajectories": 4 * batch, "generation_batch": batch}
    return {}


def teacher_kind(method: str) -> str:
    return "cud-euler" if method == "cud-stage2" else "fm"


def peak_rss_mb(label: str, args) -> float:
    """How far training ``label`` for a few steps raises the resident memory of a separate process
    above what it held before (see ``training_peak_rss_mb``)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import method_cost as m; "
            f"m.one_process({label!r}, {args.preset!r}, {args.precision!r}, {args.threads})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{label}: memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def training_peak_rss_mb(work) -> float:
    """Peak resident memory while ``work()`` runs, above the resident memory before it, in MiB.

    The process's own peak (``ru_maxrss``) is dominated by what every method shares (torch and the
    libraries distillkit loads, ~0.8 GiB): it read 932.05 MiB for every method at digits scale. So
    the kernel's high-water mark is reset first (Linux: ``5`` into ``/proc/self/clear_refs``) and
    read back after."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    work()
    return (_status_kib("VmHWM") - before) / 1024


def one_process(label: str, preset: str, precision: str, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    method, _ = variant_parts(label)
    dataset = SyntheticImages(PRESETS[preset]["shape"], count=4 * PRESETS[preset]["batch"])
    with tempfile.TemporaryDirectory() as work:
        teacher = make_teacher(teacher_kind(method), preset, dataset, device, Path(work)) if _needs_teacher(method) else None
        tree = config_tree(label, preset, device=device, steps=1, precision=precision,
                           method_options=method_options(method, PRESETS[preset]["batch"]),
                           teacher="benchmark" if teacher else "")
        peak = training_peak_rss_mb(lambda: time_training(tree, dataset, device, warmup=1, timed=3, teacher=teacher,
                                                          work=Path(work)))
    print(json.dumps({"peak_rss_mb": peak}))


def rounds_note(rows: dict, asked: int) -> str:
    """Say which methods have fewer timed rounds than asked (``--time-limit`` drops later rounds first)."""
    short = [f"{label} {len(row['runs'])}" for label, row in rows.items() if row["runs"] and len(row["runs"]) < asked]
    if not short:
        return f"every method completed all {asked} rounds"
    return (f"{asked} rounds asked, fewer completed within `--time-limit` by: {', '.join(short)} "
            "(the `rounds` column; with one round there is no median and no spread)")


def _needs_teacher(method: str) -> bool:
    return get_registries().methods.get(method).requires_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the per-method peak-memory processes")
    add_run_options(parser)
    args = parser.parse_args()
    device, deadline = start(args)
    labels = [v for v in args.variants.split(",") if v]
    if "fm" not in labels:
        labels.insert(0, "fm")
    batch = PRESETS[args.preset]["batch"]
    dataset = SyntheticImages(PRESETS[args.preset]["shape"], count=4 * batch)
    info = machine(device)
    work = Path(tempfile.mkdtemp(prefix="distillkit-method-cost-"))
    setups = _setups(labels, args, dataset, device, work)

    def measure(label):
        tree, teacher = setups[label]
        return time_training(tree, dataset, device, warmup=args.warmup, timed=args.steps, teacher=teacher, work=work)

    rows, skipped = _measure_rounds(labels, measure, args.rounds, deadline)
    lines = _report(labels, rows, skipped, setups, dataset, device, args, info)
    write_result(args.out, "\n".join(lines) + "\n",
                 {"machine": info, "args": vars(args), "rows": rows, "skipped": skipped})


def _setups(labels: list[str], args, dataset, device, work: Path) -> dict[str, tuple[dict, object]]:
    """(config tree, teacher or None) per variant; one untrained teacher per kind, made once."""
    registries = get_registries()
    batch = PRESETS[args.preset]["batch"]
    methods = {label: variant_parts(label)[0] for label in labels}
    teachers, setups = {}, {}
    for label, method in methods.items():
        if registries.methods.get(method).requires_teacher and teacher_kind(method) not in teachers:
            teachers[teacher_kind(method)] = make_teacher(teacher_kind(method), args.preset, dataset, device, work)
    for label, method in methods.items():
        teacher = teachers.get(teacher_kind(method)) if registries.methods.get(method).requires_teacher else None
        setups[label] = (config_tree(label, args.preset, device=device, steps=1, precision=args.precision,
                                     method_options=method_options(method, batch),
                                     teacher="benchmark" if teacher else ""), teacher)
    return setups


def _measure_rounds(labels: list[str], measure, rounds: int, deadline) -> tuple[dict[str, dict], list[str]]:
    """Up to ``rounds`` measurements per variant, alternating the order every round; a variant
    that fails is a result ("error"), later rounds are dropped first when time runs short."""
    rows: dict[str, dict] = {label: {"runs": []} for label in labels}
    skipped: list[str] = []
    for r in range(rounds):
        for label in labels if r % 2 == 0 else list(reversed(labels)):
            if label in skipped:
                continue
            begun = time.monotonic()
            if rows[label]["runs"] and not deadline.allows(2 * (rows[label].get("seconds", 0))):
                continue
            if not rows[label]["runs"] and not deadline.allows(30):
                skipped.append(label)
                continue
            try:
                rows[label]["runs"].append(measure(label))
            except Exception as exc:  # e.g. a JVP a device path cannot take: a result to report, not a crash
                rows[label]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                print(f"{label}: {rows[label]['error']}", file=sys.stderr, flush=True)
                skipped.append(label)
                continue
            rows[label]["seconds"] = time.monotonic() - begun
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return rows, skipped


def _report(labels, rows, skipped, setups, dataset, device, args, info) -> list[str]:
    """The markdown lines; completes each row with its counts, rate, relative time and memory."""
    fm_rate = median([run["images_per_second"] for run in rows["fm"]["runs"]])
    lines = [header(f"Method cost per training step ({args.preset}, {args.precision})", info, command_line()),
             f"{describe_preset(args.preset)}, through distillkit's trainer. Per method: {args.warmup} untimed + {args.steps} timed steps, "
             f"up to {args.rounds} rounds alternating over all methods; images/s is the median over the rounds a method "
             f"completed ({rounds_note(rows, args.rounds)}). Network "
             "evaluations per step are the method's own count (`Method.network_evals_per_step`). Distillation "
             "methods use an untrained teacher of the same network (a teacher evaluation costs the same trained or not). "
             "Start-up: build + `prepare` (teacher pairs / trajectories, scaled to 4 batches here) + the first step.", "",
             "| method | network evals / step (grad + no-grad + JVP) | once, at the recipe's defaults | images/s | time per step vs fm | rounds | peak memory MiB | start-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        runs = rows[label]["runs"]
        if "error" in rows[label]:
            lines.append(f"| {label} | failed: {rows[label]['error']} | | | | | |")
            continue
        if not runs:
            continue
        evals, once = _evaluation_counts(*setups[label], dataset)
        rate = median([run["images_per_second"] for run in runs])
        if device.type == "cuda":
            memory = max(run["peak_memory_mb"] for run in runs)
        else:
            memory = float("nan") if args.no_memory else peak_rss_mb(label, args)
        rows[label].update(evals=evals, evals_once=once, images_per_second=rate, relative_time=fm_rate / rate, peak_memory_mb=memory,
                           startup_seconds=median([run["startup_seconds"] for run in runs]))
        lines.append(f"| {label} | {evals['with_grad']} + {evals['no_grad']} + {evals.get('jvp', 0)} | {once:,} | {rate:,.0f} | {fm_rate / rate:.2f}× | "
                     f"{len(runs)} | {memory:,.0f} | {rows[label]['startup_seconds']:.1f} |")
    lines.append(MEMORY_NOTE_CPU + (" Not measured (`--no-memory`): nan." if args.no_memory else "")
                 if device.type != "cuda" else "\nPeak memory: `torch.cuda.max_memory_allocated` during the method's timed runs.")
    if short := [label for label in skipped if "error" not in rows[label]]:
        lines.append(f"\nSkipped for lack of time: {', '.join(short)}.")
    return lines


def _evaluation_counts(tree: dict, teacher, dataset) -> tuple[dict, int]:
    """The method's network evaluations per step, and its one-off count at the method's default
    sizes (this benchmark scales them down)."""
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.training.build import build_method

    registries = get_registries()
    evals = build_method(resolve(run_config_from_dict(tree), registries), dataset.spec,
                         teacher=teacher).network_evals_per_step()
    once = build_method(resolve(run_config_from_dict({**tree, "method_options": {}}), registries), dataset.spec,
                        teacher=teacher).network_evals_once()
    return evals, once


MEMORY_NOTE_CPU = (
    "\nCPU peak memory: in a separate process per method, how far 1 + 3 training steps (build and "
    "`prepare` included) raise the resident set above what it held before them (the kernel's "
    "high-water mark, reset first); not the process's own peak, which is dominated by what every "
    "method shares (torch and the libraries distillkit loads). A method that builds a teacher "
    "builds it before the window, where it likely pays the libraries' first-use allocations: on a "
    "small network that first use may be most of the rise, so the column does not rank methods.")


if __name__ == "__main__":
    main()
