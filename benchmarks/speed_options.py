"""The training engine's speed options against plain fp32, through distillkit's own trainer.

Options: ``train.precision`` (fp32, tf32, bf16 autocast), ``train.channels_last``,
``train.compile`` and ``train.compile_mode`` (``+ graphs``: ``reduce-overhead``, which replays each
step's kernels as CUDA graphs: the lever for a network whose steps are bound by kernel launches).
Each setting trains the same network on the same synthetic data; settings are measured
alternately, round by round, and compared with strict fp32 measured in the same rounds. Compiled
settings are measured once each, last (every build compiles again), and their compile time is
reported as start-up.

    python benchmarks/speed_options.py --device cuda --preset cifar10 --out docs/results/speed-options-h200.md
    python benchmarks/speed_options.py --device cuda --preset mnist --settings tf32,bf16 --compile "tf32 + graphs"
"""

from __future__ import annotations

import argparse
import sys

from _common import add_run_options, command_line, fail, header, interleaved, machine, median, spread, start, write_result
from _training import PRESETS, SyntheticImages, config_tree, describe_preset, time_training

SETTINGS = {
    "fp32": {"precision": "fp32"},
    "tf32": {"precision": "tf32"},
    "bf16": {"precision": "bf16"},
    "tf32 + channels_last": {"precision": "tf32", "channels_last": True},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
}
COMPILED = {"tf32 + compile": {"precision": "tf32", "compile": True},
            "bf16 + compile": {"precision": "bf16", "compile": True},
            "tf32 + graphs": {"precision": "tf32", "compile": True, "compile_mode": "reduce-overhead"},
            "bf16 + graphs": {"precision": "bf16", "compile": True, "compile_mode": "reduce-overhead"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    parser.add_argument("--method", default="fm", help="a variant label: fm, cud-rk3, ...")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="uncompiled settings, comma-separated (fp32 always)")
    parser.add_argument("--compile", default="tf32 + compile", help=f"compiled settings to try, comma-separated "
                        f"({', '.join(COMPILED)}), or none")
    parser.add_argument("--compile-budget", type=float, default=150, help="seconds a compiled setting needs left to start")
    add_run_options(parser, device="cuda")
    args = parser.parse_args()
    device, deadline = start(args)
    preset = PRESETS[args.preset]
    dataset = SyntheticImages(preset["shape"], count=4 * preset["batch"])
    info = machine(device)

    def measure(options):
        tree = config_tree(args.method, args.preset, device=device, steps=1, **options)
        return lambda: time_training(tree, dataset, device, warmup=args.warmup, timed=args.steps)

    chosen = ["fp32", *(n.strip() for n in args.settings.split(",") if n.strip() and n.strip() != "fp32")]
    if unknown := [n for n in chosen if n not in SETTINGS]:
        fail(f"--settings {unknown[0]!r}: not one of {', '.join(SETTINGS)}")
    if unknown := [n.strip() for n in args.compile.split(",") if n.strip() not in (*COMPILED, "none", "")]:
        fail(f"--compile {unknown[0]!r}: not one of {', '.join(COMPILED)} or none")
    runs = interleaved({name: measure(SETTINGS[name]) for name in chosen}, args.rounds)
    results = {name: {"images_per_second": [r["images_per_second"] for r in rs],
                      "startup_seconds": median([r["startup_seconds"] for r in rs]),
                      "peak_memory_mb": max(r["peak_memory_mb"] for r in rs)} for name, rs in runs.items()}
    skipped: list[str] = []
    compiled = [c.strip() for c in args.compile.split(",") if c.strip() and c.strip() != "none"]
    # Written before each compilation too: if one outlasts the caller's hard limit, what was
    # measured is kept (with the settings not yet measured named).
    write_report(args, info, results, skipped, pending=compiled)
    for index, name in enumerate(compiled):
        if not deadline.allows(args.compile_budget):
            skipped.append(name)
            continue
        try:
            skips = graph_skips()
            r = measure(COMPILED[name])()
            results[name] = {"images_per_second": [r["images_per_second"]], "startup_seconds": r["startup_seconds"],
                             "peak_memory_mb": r["peak_memory_mb"], "graph_skips": graph_skips() - skips}
        except Exception as exc:  # a compiler failure is a result to report, not a crash of the benchmark
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(f"{name}: {results[name]['error']}", file=sys.stderr)
        write_report(args, info, results, skipped, pending=compiled[index + 1:])


def graph_skips() -> int:
    """How often inductor has so far declined to capture a CUDA graph (it falls back to the compiled
    kernels without one, logging why): a ``+ graphs`` speed-up means little if it never captured.
    A private counter of torch's: 0 where it is missing."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def write_report(args, info: dict, results: dict, skipped: list[str], pending: list[str]) -> None:
    base = median(results["fp32"]["images_per_second"])
    lines = [header(f"Speed options of the training engine ({args.method}, {args.preset})", info, command_line()),
             f"{describe_preset(args.preset)}, method `{args.method}`, through distillkit's trainer. {args.warmup} untimed + "
             f"{args.steps} timed steps per measurement; {args.rounds} rounds alternating over the uncompiled settings; "
             "compiled settings once, last. fp32 is strict float32 (TF32 off); `+ compile` is `train.compile`, `+ graphs` "
             "adds `train.compile_mode=reduce-overhead` (CUDA graphs). Start-up = build + first step (includes "
             "compilation).", "",
             "| setting | images/s | vs fp32 | peak memory MiB | start-up s |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        rate = median(r["images_per_second"])
        lines.append(f"| {name} | {spread(r['images_per_second'])} | **{rate / base:.2f}×** | "
                     f"{r['peak_memory_mb']:,.0f} | {r['startup_seconds']:.1f} |")
    declined = {name: r["graph_skips"] for name, r in results.items() if r.get("graph_skips")}
    if declined:
        lines.append("\nCUDA graph capture declined by inductor (times; the reasons are in the log): "
                     + ", ".join(f"{name} {count}" for name, count in declined.items()) + ".")
    if skipped:
        lines.append(f"\nNot measured for lack of time: {', '.join(skipped)}.")
    if pending:
        lines.append(f"\nNot measured yet (still to run when this was written): {', '.join(pending)}.")
    write_result(args.out, "\n".join(lines) + "\n", {"machine": info, "args": vars(args), "results": results,
                                                     "skipped": skipped, "pending": pending})

if __name__ == "__main__":
    main()
