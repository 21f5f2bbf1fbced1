"""The main job's wall time as a new user sees it: `distillkit run --method cud --integrator rk3`
(the command `make run` runs) in a fresh process, timed from start to exit, split at the lines it
prints into start-up, training, evaluation and exit, with its ETA line and its end table.

    .venv/bin/python benchmarks/main_job.py --repeats 2 --out docs/results/main-job-cpu.md
    .venv/bin/python benchmarks/main_job.py --steps 1000,2000 -- --batch-size 128
    .venv/bin/python benchmarks/main_job.py --threads default,1 --neighbour idle,busy --out FILE.md

Arguments after ``--`` go to every run. ``--threads`` sets OMP_NUM_THREADS for the runs
(``default``: as this process's environment has it; unset, torch takes one thread per core);
``--neighbour busy`` runs them beside one busy process (a pure-Python loop, one core), as on a
shared machine. Each run writes into a temporary runs directory (its own MLflow store and cache, as
a first run would have) that is deleted afterwards. The end table must keep showing what CUD does:
NFE 4 and 8 clearly better than NFE 1 (the "NFE 1 / NFE 4" column).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
MAIN_JOB = ["run", "--method", "cud", "--integrator", "rk3"]
# The lines that end each phase, as the CLI prints them.
PHASE_ENDS = (("start-up", re.compile(r"^distillkit: \S+ on \S+ with ")),
              ("training", re.compile(r"^distillkit: training done")),
              ("evaluation", re.compile(r"^quality per NFE")))
ETA_LINE = re.compile(r"^distillkit: ETA (\S+) for the rest of the run")
TABLE_ROW = re.compile(r"^\s+(\d+)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+\S+$")
RATE = re.compile(r"final training loss [\d.]+, ([\d,]+) images/s")
# The run's first line says what it trains: "..., 1000 steps of 64 ..." (steps of the batch size).
SHAPE = re.compile(r"\), (\d+) steps of (\d+)")
CPU_THREADS = re.compile(r" steps of \d+ on (\d+) CPU threads?,")


def seconds_of(duration: str) -> float:
    """The ETA's duration ('2m14s', '1h03m', '9s') in seconds."""
    hours = re.search(r"(\d+)h", duration)
    minutes = re.search(r"(\d+)m", duration)
    secs = re.search(r"(\d+)s", duration)
    return sum(int(m.group(1)) * scale for m, scale in ((hours, 3600), (minutes, 60), (secs, 1)) if m)


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def timed_run(distillkit: str, steps: int, extra: list[str], threads: str = "default", busy: bool = False) -> dict:
    """One run of the main job: its phases (seconds), ETA, end table and training rate."""
    import _common

    with tempfile.TemporaryDirectory(prefix="main-job-") as runs:
        command = [distillkit, *MAIN_JOB, *(["--max-steps", str(steps)] if steps else []), "--runs-dir", runs, *extra]
        load = load_average()
        # A cold cache, as a new user has: the cached ode_error reference of identical weights
        # (runs are deterministic) would otherwise make every run after the first look cheaper.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DISTILLKIT_CACHE": str(Path(runs) / "cache")}
        if threads != "default":
            env["OMP_NUM_THREADS"] = threads
        with _common.busy_neighbour(busy):
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
            process.wait()
            wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"main_job: the run exited {process.returncode}: {[text for _, text in lines[-3:]]}")
    return {**summarise(lines, wall, steps, load), "omp_num_threads": env.get("OMP_NUM_THREADS", "unset"),
            "neighbour": "one busy process" if busy else "idle"}


def first_match(lines: list[tuple[float, str]], pattern: re.Pattern) -> tuple[Optional[float], Optional[re.Match]]:
    """(when, match) of the first printed line ``pattern`` finds; (None, None) if none does."""
    return next(((when, m) for when, text in lines if (m := pattern.search(text))), (None, None))


def summarise(lines: list[tuple[float, str]], wall: float, steps: int, load: float) -> dict:
    phases, previous = {}, 0.0
    for name, pattern in PHASE_ENDS:
        at, _ = first_match(lines, pattern)
        if at is None:
            raise SystemExit(f"main_job: the run never printed the line that ends its {name}")
        phases[name], previous = at - previous, at
    phases["exit"] = wall - previous
    eta_at, eta = first_match(lines, ETA_LINE)
    table = {int(m.group(1)): {"fd_pixels": float(m.group(2)), "ode_error": float(m.group(3))}
             for _, text in lines if (m := TABLE_ROW.match(text))}
    rate, shape, threads = (first_match(lines, pattern)[1] for pattern in (RATE, SHAPE, CPU_THREADS))
    return {"steps": steps, "steps_trained": shape and int(shape.group(1)), "batch_size": shape and int(shape.group(2)),
            "cpu_threads": threads and int(threads.group(1)), "wall_s": wall, "phases_s": phases,
            "load_before": load, "eta_s": eta and seconds_of(eta.group(1)), "eta_printed_at_s": eta_at,
            "actual_rest_s": None if eta_at is None else wall - eta_at,
            "images_per_second": rate and int(rate.group(1).replace(",", "")), "quality": table}


def markdown(rows: list[dict], info: dict, command: str, extra: list[str]) -> str:
    import _common

    lines = [_common.header("The main job's wall time: `distillkit run --method cud --integrator rk3`", info, command),
             f"Each row is one fresh process{' with ' + ' '.join(extra) if extra else ''}, timed from start to exit "
             "and split at the lines it prints: start-up ends at the run's first line, training at \"training done\", "
             "evaluation at the end table; exit is the rest (the checkpoint figure, MLflow, interpreter shut-down). "
             "ETA: the line printed after the first steps, against the time the run then really took. "
             "Load: the 1-minute load average before the run. CPU threads: the count the run says it trains on "
             "(OMP_NUM_THREADS unset: distillkit's default, one core spare).", "",
             "| run | neighbour | OMP_NUM_THREADS | CPU threads | steps × batch | wall s | start-up s | training s | "
             "evaluation s | exit s | ETA s / actual s | images/s | load | fd_pixels NFE 1 / 2 / 4 / 8 | "
             "NFE 1 / NFE 4 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for i, row in enumerate(rows, start=1):
        p, q = row["phases_s"], row["quality"]
        fd = " / ".join(f"{q[n]['fd_pixels']:.4f}" for n in sorted(q))
        gain = f"{q[1]['fd_pixels'] / q[4]['fd_pixels']:.1f}×" if 1 in q and 4 in q else "—"
        eta = "—" if row["eta_s"] is None else f"{row['eta_s']:.0f} / {row['actual_rest_s']:.0f}"
        shape = (f"{row['steps_trained']} × {row['batch_size']}" if row.get("batch_size")
                 else str(row["steps"] or "default"))
        lines.append(f"| {i} | {row['neighbour']} | {row['omp_num_threads']} | {row['cpu_threads'] or '—'} | "
                     f"{shape} | {row['wall_s']:.1f} | "
                     f"{p['start-up']:.1f} | {p['training']:.1f} | {p['evaluation']:.1f} | {p['exit']:.1f} | {eta} | "
                     f"{row['images_per_second'] or '—'} | {row['load_before']:.2f} | {fd} | {gain} |")
    return "\n".join(lines) + "\n"


def boot_time() -> str:
    """When this machine (or VM) started: tells two machines apart in results from two sessions."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                import datetime

                return datetime.datetime.fromtimestamp(int(line.split()[1]), datetime.timezone.utc).isoformat()
    except OSError:
        pass
    return "unknown"


def main(argv=None) -> int:
    import _common
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="", help="comma-separated --max-steps values (default: the run's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per step count, one after another")
    parser.add_argument("--threads", default="default",
                        help="comma-separated OMP_NUM_THREADS values for the runs (default: the environment's)")
    parser.add_argument("--neighbour", default="idle", help="comma-separated: idle, busy (beside one busy process)")
    parser.add_argument("--out", default="", help="markdown file to write; the numbers go to the same name .json")
    _common.one_line_errors(parser, "main_job")
    args = parser.parse_args(own)
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else [0]
    except ValueError:
        parser.error(f"--steps must be comma-separated positive integers, got {args.steps!r}")
    if (args.steps and min(steps) <= 0) or args.repeats < 1:
        parser.error("--steps must be positive integers and --repeats at least 1")
    threads, neighbours = args.threads.split(","), args.neighbour.split(",")
    if not all(t == "default" or (t.isdigit() and int(t) > 0) for t in threads):
        parser.error(f"--threads must be comma-separated positive integers or 'default', got {args.threads!r}")
    if not set(neighbours) <= {"idle", "busy"}:
        parser.error(f"--neighbour must be comma-separated values of idle and busy, got {args.neighbour!r}")
    distillkit = str(Path(sys.executable).with_name("distillkit"))
    rows = []
    conditions = [(count, n, t) for n in neighbours for t in threads for count in steps]
    for _ in range(args.repeats):
        for count, neighbour, thread_count in conditions:
            rows.append(timed_run(distillkit, count, extra, thread_count, neighbour == "busy"))
            _common.log(f"main_job: {count or 'default'} steps, {neighbour}, threads {thread_count}: "
                        f"{rows[-1]['wall_s']:.1f} s wall")
    info = _common.machine(torch.device("cpu"))
    info["boot"] = boot_time()
    command = _common.command_line()
    _common.write_result(args.out, markdown(rows, info, command, extra),
                         {"machine": info, "command": command, "extra_arguments": extra, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
