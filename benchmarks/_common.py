"""What every benchmark shares: the machine it ran on, side-by-side timing, and writing results.

Benchmarks are scripts (``python benchmarks/<name>.py``), not tests: each prints a markdown table
and writes it (with the raw numbers as JSON beside it) to ``--out``. Every figure that matters is a
*ratio* of two things measured in the same process, interleaved round by round, because the
machines are shared and their absolute speed drifts by tens of percent.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Where and when a benchmark ran: the card (or CPU), versions, date, commit."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["card"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
    else:
        info["card"] = f"CPU: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    return info


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def header(title: str, info: dict, command: str, notes: str = "") -> str:
    lines = [
        f"# {title}", "",
        f"- **card**: {info['card']}",
        f"- **date**: {info['date']}",
        f"- **command**: `{command}`",
        f"- **versions**: torch {info['torch']}" + (f" (CUDA {info['cuda']})" if info.get("cuda") else "")
        + f", Python {info['python']}, distillkit commit {info['commit']}",
    ]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def busy_neighbour(busy: bool = True) -> Iterator[Optional[subprocess.Popen]]:
    """One other busy process beside what runs inside (a pure-Python loop that keeps one core busy,
    as a second job on a shared machine would), killed after; nothing when ``busy`` is false."""
    if not busy:
        yield None
        return
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning before the measurement does
        yield neighbour
    finally:
        neighbour.kill()
        neighbour.wait()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each measure once per round, in turn (order rotated every round so no one is always
    first after a pause); each returns a rate. Returns every rate per name."""
    names = list(measures)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rates[name].append(measures[name]())
    return rates


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """'median (min–max)' of a list of rates."""
    return f"{median(values):,.1f} ({min(values):,.1f}–{max(values):,.1f})"


def write_result(path: Optional[str], markdown: str, data: dict) -> None:
    """Print the markdown; write it to ``path`` and the data to ``path`` with ``.json`` (atomically)."""
    print(markdown)
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for destination, text in ((target, markdown), (target.with_suffix(".json"), json.dumps(data, indent=2, default=str))):
        with tempfile.NamedTemporaryFile("w", dir=destination.parent, prefix=f".{destination.name}.", delete=False) as f:
            f.write(text)
        os.chmod(f.name, 0o644)  # a temporary file is private (0600); results are for everyone
        os.replace(f.name, destination)
    print(f"written: {target} and {target.with_suffix('.json')}", file=sys.stderr)


def log(line: str) -> None:
    """Progress of a long benchmark, on stderr (stdout is the result)."""
    print(line, file=sys.stderr, flush=True)


def one_line_errors(parser, script: str) -> None:
    """argparse's bad-input errors as one line and exit code 2 (its usage block is noise here)."""

    def error(message: str):
        print(f"{script}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error


def exit_code(script: str, run: Callable[[], int]) -> int:
    """``run()``, with distillkit's errors as one line: bad input (UsageError, ConfigError
    among them) exits 2 with nothing written, a failed run (e.g. a non-finite loss) exits 1."""
    from distillkit.errors import DistillkitError, exit_status

    try:
        return run()
    except DistillkitError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return exit_status(exc)


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2, nothing written."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def split_variant(label: str, registries) -> Optional[tuple[str, Optional[str]]]:
    """A variant label -> (method, integrator or None), or None if it names no variant: a
    registered method (names may contain '-': rf-distill), or METHOD-INTEGRATOR for a method that
    trains with an integrator (cud-rk3)."""
    methods, integrators = registries.methods, registries.integrators
    if label in methods:
        return label, None
    method, _, integrator = label.rpartition("-")
    if method in methods and integrator in integrators and methods.get(method).uses_integrator:
        return method, integrator
    return None


def variants_allowed(registries) -> str:
    methods, integrators = registries.methods, registries.integrators
    with_integrator = [m for m in methods.names() if methods.get(m).uses_integrator]
    return (f"METHOD or METHOD-INTEGRATOR; METHOD one of {', '.join(methods.names())}; INTEGRATOR "
            f"({', '.join(integrators.names())}) only for {', '.join(with_integrator)}")


def add_run_options(parser, device: str = "cpu") -> None:
    """The options every benchmark takes: where it runs, how many threads, its time budget, --out."""
    parser.add_argument("--device", default=device, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds; parts that no longer fit are skipped")
    parser.add_argument("--out", default="", help="markdown file to write; the numbers go to the same name .json")


def start(args) -> tuple[torch.device, "Deadline"]:
    """Apply the run options: (device, deadline)."""
    from distillkit.arguments import check_device
    from distillkit.errors import ConfigError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = check_device(args.device)  # distillkit's own --device check: one vocabulary everywhere
    except ConfigError as exc:
        fail(str(exc))
    return device, Deadline(args.time_limit)


class Deadline:
    """A time budget for a whole script (the GPU call has a hard limit): sections ask whether
    they still fit and are skipped, with a note, when they do not."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds if seconds > 0 else float("inf")

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds
