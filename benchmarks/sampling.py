"""Sampling throughput: distillkit's samplers against the raw forward passes of the same network.

For each NFE (Euler steps on the uniform grid) three ways to draw ``--count`` samples in batches of
``--batch`` are timed alternately:

- **raw forward**: ``NFE`` chained calls of the network per batch (each on the previous output)
  starting from noise already on the device (no integrator, no noise generation): the floor any
  sampler pays;
- **sample_ode**: ``distillkit.sampling.sample_ode`` on noise already on the device (the
  integrator's own overhead);
- **sample_seeded**: what ``distillkit sample`` / ``eval`` run: per-sample seeded noise drawn on the
  CPU batch by batch, integrated, results back on the CPU.

Ratios are images/s over the raw forward's (target >= 0.97). Right after the first NFE (the most
important: one-step sampling) comes the time to draw 50,000 CIFAR-shaped samples end to end with
``sample_seeded`` at NFE 1 (``--full-count``: the FID workload); then the other NFEs.

    python benchmarks/sampling.py --device cpu --preset cifar10-small --out docs/results/sampling-cpu.md
    python benchmarks/sampling.py --device cuda --preset cifar10 --precision tf32 --out docs/results/sampling-h200.md
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from _common import add_run_options, command_line, header, interleaved, machine, median, spread, start, synchronize, write_result
from _training import PRESETS, config_tree
from distillkit import DataSpec, get_registries
from distillkit.config import run_config_from_dict
from distillkit.resolve import resolve
from distillkit.sampling import prior_noise, sample_ode, sample_seeded, uniform_grid
from distillkit.training.build import build_model


def build_sampler_network(preset: str, device: torch.device):
    tree = config_tree("fm", preset, device=device, steps=1)
    resolved = resolve(run_config_from_dict(tree), get_registries())
    spec = DataSpec(PRESETS[preset]["shape"])
    method, net = build_model(resolved, spec, device, seed=0)
    net.eval().requires_grad_(False)
    return method.velocity_fn(net), net, spec


def measure_nfe(nfe: int, net, velocity, spec, noise, euler, device, rate, args) -> dict[str, list[float]]:
    """images/s of the raw forward, sample_ode and sample_seeded at ``nfe``, rounds alternating."""
    grid = uniform_grid(nfe)

    @torch.no_grad()
    def raw():
        for chunk in noise.split(args.batch):
            t = torch.ones(len(chunk), device=device)
            x = chunk
            for _ in range(nfe):
                x = net(x, t)  # each pass reads the previous one's output, as in a sampler
        return x

    measures = {
        "raw forward": lambda: rate(raw),
        "sample_ode": lambda: rate(lambda: sample_ode(velocity, noise, grid, euler, batch_size=args.batch)),
        "sample_seeded": lambda: rate(lambda: sample_seeded(lambda cond: velocity, spec, args.count, 0, grid, euler,
                                                            batch_size=args.batch, device=device)),
    }
    return interleaved(measures, args.rounds)


def time_full(velocity, spec, euler, seeded_rate: float, device, deadline, args) -> Optional[dict]:
    """Seconds for ``--full-count`` samples with sample_seeded at NFE 1, results on the CPU; None
    if not asked for or if it would not fit the time left."""
    if not args.full_count or not deadline.allows(1.5 * args.full_count / seeded_rate + 5):
        return None
    synchronize(device)
    started = time.perf_counter()
    samples = sample_seeded(lambda cond: velocity, spec, args.full_count, 0, uniform_grid(1), euler,
                            batch_size=args.batch, device=device)
    seconds = time.perf_counter() - started
    print(f"{len(samples):,} samples at NFE 1: {seconds:.1f} s", flush=True)
    return {"count": len(samples), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10-small", choices=sorted(PRESETS))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32"))
    parser.add_argument("--nfe", default="1,2,4")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--count", type=int, default=2000, help="samples per timed measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full-count", type=int, default=50_000, help="samples of the end-to-end timing (0: skip)")
    add_run_options(parser)
    args = parser.parse_args()
    device, deadline = start(args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    velocity, net, spec = build_sampler_network(args.preset, device)
    info = machine(device)
    nfes = [int(k) for k in args.nfe.split(",")]
    noise = prior_noise(args.count, spec.shape, 0).to(device)
    euler = get_registries().integrators.get("euler")

    def rate(run) -> float:
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        return args.count / (time.perf_counter() - started)

    with torch.no_grad():  # warm-up: kernels chosen, memory pools filled
        net(noise[: args.batch], torch.ones(min(args.batch, args.count), device=device))
    results, skipped = {}, []
    full = None
    seconds_per_nfe = 0.0  # measured: seconds one NFE of every way costs over all rounds
    for nfe in nfes:
        if not deadline.allows(1.5 * seconds_per_nfe * nfe + 5):
            skipped.append(nfe)
            continue
        begun = time.monotonic()
        rates = measure_nfe(nfe, net, velocity, spec, noise, euler, device, rate, args)
        results[nfe] = {name: values for name, values in rates.items()}
        seconds_per_nfe = max(seconds_per_nfe, (time.monotonic() - begun) / nfe)
        print(f"NFE {nfe}: " + ", ".join(f"{k} {spread(v)} img/s" for k, v in rates.items()), flush=True)
        if len(results) == 1:  # the end-to-end timing before the other NFEs: it matters more
            full = time_full(velocity, spec, euler, median(rates["sample_seeded"]) * nfe, device, deadline, args)

    preset = PRESETS[args.preset]
    lines = [header(f"Sampling throughput ({args.preset}, {args.precision})", info, command_line()),
             f"Network: `{preset['backbone']}` {preset['backbone_options'] or ''} at {preset['shape']}, eval mode, "
             f"batches of {args.batch}; {args.count} samples per measurement, {args.rounds} rounds alternating. "
             "images/s as median (min–max); ratio = median images/s / the raw forward's (target >= 0.97).", "",
             "| NFE | raw forward images/s | sample_ode images/s | ratio | sample_seeded images/s | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    for nfe, r in results.items():
        base = median(r["raw forward"])
        lines.append(f"| {nfe} | {spread(r['raw forward'])} | {spread(r['sample_ode'])} | "
                     f"**{median(r['sample_ode']) / base:.3f}** | {spread(r['sample_seeded'])} | "
                     f"**{median(r['sample_seeded']) / base:.3f}** |")
    if full:
        lines.append(f"\n**{full['count']:,} samples** at NFE 1 with `sample_seeded` (per-sample seeds, results on the "
                     f"CPU), batch {args.batch}: **{full['seconds']:.1f} s** ({full['count'] / full['seconds']:,.0f} images/s).")
    if skipped:
        lines.append(f"\nSkipped for lack of time: NFE {', '.join(map(str, skipped))}.")
    if args.full_count and not full:
        lines.append(f"\nThe {args.full_count:,}-sample timing was skipped for lack of time.")
    write_result(args.out, "\n".join(lines) + "\n", {"machine": info, "args": vars(args),
                                                     "results": {str(k): v for k, v in results.items()}, "full": full})


if __name__ == "__main__":
    main()
