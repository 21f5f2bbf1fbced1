"""CPU threads under contention: the main job's training step (cud-rk3 on the digits network,
batch 128) with 1 and 2 torch threads, OpenMP's default and passive wait policy, on an idle
machine and beside one busy process (a pure-Python loop that keeps one core busy, as a second
job would).

    .venv/bin/python benchmarks/threads.py --out docs/results/threads-cpu.md

PyTorch's OpenMP threads spin while they wait for each other: with as many threads as cores, a
second busy process leaves one thread waiting for a core while the others spin. Each condition
runs in a fresh process (the thread count and OMP_WAIT_POLICY are read once, at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = ("import sys, json, torch; sys.path.insert(0, {here!r}); import _training as t; "
         "torch.set_num_threads({threads}); d = torch.device('cpu'); "
         "data = t.SyntheticImages(t.PRESETS['digits']['shape'], count=2048); "
         "tree = t.config_tree({label!r}, 'digits', device=d, steps=1); "
         "print(json.dumps(t.time_training(tree, data, d, warmup={warmup}, timed={timed})))")


def measure(label: str, threads: int, policy: str, busy: bool, warmup: int, timed: int) -> dict:
    import _common

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy.startswith("spin="):  # libgomp's spin count before a waiting thread sleeps
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    code = CHILD.format(here=str(HERE), threads=threads, label=label, warmup=warmup, timed=timed)
    with _common.busy_neighbour(busy):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"threads: a measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import _common
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="cud-rk3")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    parser.add_argument("--policies", default="default,PASSIVE",
                        help="OMP_WAIT_POLICY values (default: unset), or spin=N for GOMP_SPINCOUNT=N")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timed", type=int, default=80)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rows = []
    for busy in (False, True):
        for threads in [int(p) for p in args.threads.split(",")]:
            for policy in args.policies.split(","):
                r = measure(args.variant, threads, policy, busy, args.warmup, args.timed)
                rows.append({"neighbour": "one busy process" if busy else "idle", "threads": threads, "policy": policy, **r})
                print(f"{rows[-1]['neighbour']:>16} threads {threads} {policy:>8}: {r['seconds_per_step']:.4f} s/step",
                      file=sys.stderr, flush=True)
    info = _common.machine(torch.device("cpu"))
    idle_best = min(r["seconds_per_step"] for r in rows if r["neighbour"] == "idle")
    lines = [_common.header(f"CPU threads under contention: {args.variant} training step, digits network, batch 128",
                            info, _common.command_line()),
             f"Steps {args.warmup + 1}..{args.warmup + args.timed} timed, one fresh process per row; the busy "
             "neighbour is `python -c 'while True: pass'` (one core). Slower-than-best: the row's s/step over "
             "the fastest idle row.", "",
             "| neighbour | torch threads | OMP_WAIT_POLICY | s/step | images/s | vs the fastest idle row |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['neighbour']} | {r['threads']} | {r['policy']} | {r['seconds_per_step']:.4f} | "
                     f"{r['images_per_second']:,.0f} | {r['seconds_per_step'] / idle_best:.2f}× |")
    _common.write_result(args.out, "\n".join(lines) + "\n", {"machine": info, "command": _common.command_line(),
                                                                "variant": args.variant, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
