"""Framework overhead: a distillkit training step against a minimal hand-written PyTorch loop.

Both train the same network (built by the same backbone and method, from the same seed) on the
same synthetic data with Adam and one EMA; the hand-written loop writes each loss from the math
(METHODS.md §1, §2.6, §2.8) in a few lines and draws batches by indexing a tensor. distillkit
additionally does what a real run needs: the resumable data loader, the gradient norm (clipping
and the NaN check), the LR warm-up, logging. The figure is distillkit's images/s divided by the
hand-written loop's, measured alternately in the same process (target: >= 0.97).

    python benchmarks/overhead.py --device cpu --preset digits --out docs/results/overhead-cpu.md
    python benchmarks/overhead.py --device cuda --preset cifar10 --precision tf32 --out docs/results/overhead-h200.md
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import add_run_options, command_line, fail, header, interleaved, machine, median, spread, start, write_result
from _training import PRESETS, SyntheticImages, config_tree, describe_preset, time_training
from distillkit import DataSpec, get_registries
from distillkit.config import run_config_from_dict
from distillkit.resolve import resolve
from distillkit.training.build import build_model

VARIANTS = ("fm", "cud-euler", "cud-rk3")
#: CUD's RK3 catch-up slope (paper §2.8), written out again here on purpose: stages at t, t - Δ,
#: t - 2Δ; k3 at x - Δ(7/4 k1 + 1/4 k2); slope 5/12 k1 + 2/3 k2 - 1/12 k3.
_T_MIN, _TN = 1e-5, 16


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def fm_loss(net, x0, gen):
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.rand(x0.shape[0], generator=gen, device=x0.device) * (1 - _T_MIN) + _T_MIN
    tb = _bcast(t, x0)
    return torch.nn.functional.mse_loss(net(tb * eps + (1 - tb) * x0, t), eps - x0)


def cud_loss(net, x0, gen, rk3: bool):
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.rand(x0.shape[0], generator=gen, device=x0.device) * (1 - _T_MIN) + _T_MIN
    d = torch.rand(x0.shape[0], generator=gen, device=x0.device) / _TN
    tb, db = _bcast(t, x0), _bcast(d, x0)
    x_t, v_star = tb * eps + (1 - tb) * x0, eps - x0
    preds = net(x_t, t, head="all")
    with torch.no_grad():
        k1 = net(x_t, t)
        if rk3:
            k2 = net(x_t - db * k1, (t - d).clamp_min(_T_MIN))
            k3 = net(x_t - db * (1.75 * k1 + 0.25 * k2), (t - 2 * d).clamp_min(_T_MIN))
            slope = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
        else:
            slope = k1
        targets = [net(x_t - j * db * slope, (t - j * d).clamp_min(_T_MIN)) for j in range(1, len(preds) + 1)]
        near_data = _bcast(t < _T_MIN + len(preds) * d, x0)
        targets = [torch.where(near_data, v_star, y) for y in targets]
    mse = torch.nn.functional.mse_loss
    return sum(mse(p, y) for p, y in zip(preds, targets)) + sum(mse(p, v_star) for p in preds)


def hand_written(label: str, tree: dict, data: torch.Tensor, device: torch.device, warmup: int, timed: int) -> float:
    """images/s of the minimal loop: index a batch, loss, backward, Adam, EMA lerp."""
    resolved = resolve(run_config_from_dict(tree), get_registries())
    _, net = build_model(resolved, DataSpec(tuple(data.shape[1:])), device, seed=0)
    cfg = resolved.config.train
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step_fn = torch.compile(net) if cfg.compile else net
    data = data.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = cfg.batch_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    net.train()
    started = 0.0
    for step in range(warmup + timed):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        index = torch.randint(0, len(data), (batch,), generator=gen, device=device)
        x0 = data[index]
        if cfg.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = fm_loss(step_fn, x0, gen) if label == "fm" else cud_loss(step_fn, x0, gen, rk3=label == "cud-rk3")
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.999)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timed * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements of each loop")
    add_run_options(parser)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        fail(f"--variants {unknown[0]}: not one of {', '.join(VARIANTS)}")
    device, deadline = start(args)
    preset = PRESETS[args.preset]
    dataset = SyntheticImages(preset["shape"], count=max(4 * preset["batch"], 1024))
    info = machine(device)
    results, skipped = {}, []
    per_variant = None
    for label in variants:
        if per_variant is not None and not deadline.allows(per_variant * 1.2):
            skipped.append(label)
            continue
        begun = time.monotonic()
        tree = config_tree(label, args.preset, device=device, steps=1, precision=args.precision,
                           channels_last=args.channels_last, compile=args.compile)
        rates = interleaved({
            "distillkit": lambda: time_training(tree, dataset, device, warmup=args.warmup, timed=args.steps)["images_per_second"],
            "hand-written": lambda: hand_written(label, tree, dataset.data, device, args.warmup, args.steps),
        }, args.rounds)
        ratios = [a / b for a, b in zip(rates["distillkit"], rates["hand-written"])]
        results[label] = {"distillkit": rates["distillkit"], "hand_written": rates["hand-written"], "ratios": ratios,
                          "ratio_of_medians": median(rates["distillkit"]) / median(rates["hand-written"])}
        per_variant = time.monotonic() - begun
        print(f"{label}: distillkit {spread(rates['distillkit'])} img/s, hand-written "
              f"{spread(rates['hand-written'])} img/s, ratio {median(ratios):.3f}", flush=True)

    options = ", ".join(o for o in (args.precision, "channels_last" if args.channels_last else "",
                                    "compile" if args.compile else "") if o)
    lines = [header(f"Training-loop overhead: distillkit vs a hand-written loop ({args.preset}, {options})", info,
                    command_line()),
             f"{describe_preset(args.preset)}. Each measurement: {args.warmup} untimed + {args.steps} timed steps; "
             f"{args.rounds} rounds, the two loops alternating. images/s as median (min–max) over rounds; the ratio "
             "is the median of the per-round ratios (target >= 0.97).", "",
             "| variant | distillkit images/s | hand-written images/s | ratio | per-round ratios |",
             "|---|---:|---:|---:|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {spread(r['distillkit'])} | {spread(r['hand_written'])} | **{median(r['ratios']):.3f}** | "
                     + ", ".join(f"{x:.3f}" for x in r["ratios"]) + " |")
    if skipped:
        lines.append(f"\nSkipped for lack of time: {', '.join(skipped)}.")
    write_result(args.out, "\n".join(lines) + "\n", {"machine": info, "args": vars(args), "results": results,
                                                     "skipped": skipped})


if __name__ == "__main__":
    main()
