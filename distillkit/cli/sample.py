"""``distillkit sample``: draw samples from a trained run at several NFEs into a PNG grid and/or an
``.npz`` file.

Sample i starts from the noise of seed ``seed + i`` (and, for class-conditional models, the label
drawn from its own generator seeded from ``seed + i``), so image i is the same image whatever the
batch size or the number of samples asked for (up to float rounding of batched kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..arguments import add_model_options, parse_nfe, parse_options, parse_positive, parse_seed
from ..errors import ConfigError, UsageError
from ..evaluation.figures import PNG_MAX_IMAGES

DEFAULT_N = 64


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="draw samples from a trained run into a PNG grid and/or an .npz file",
        description="Sample a trained run at several NFEs from per-sample seeds (sample i uses seed S + i). "
                    "--out FILE.png writes a grid (one block per NFE), FILE.npz the arrays, a folder both.",
    )
    add_model_options(parser, n_default=str(DEFAULT_N))
    parser.add_argument("--nfe", default="1,2,4", metavar="LIST", help="network evaluations per sample (default: 1,2,4)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="FILE.png (image grid), FILE.npz (arrays), or a folder (samples.png and samples.npz)")


def output_paths(out: str) -> tuple[Optional[Path], Optional[Path]]:
    """(png, npz) paths for ``--out``; checked writable before any sampling."""
    path = Path(out).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".png":
        paths: tuple[Optional[Path], Optional[Path]] = (path, None)
    elif suffix == ".npz":
        paths = (None, path)
    elif path.is_dir() or (suffix == "" and not path.exists()):
        paths = (path / "samples.png", path / "samples.npz")
    else:
        raise ConfigError("--out", out, "a .png file, a .npz file, or a folder (for both)")
    for target in paths:
        if target is None:
            continue
        if target.is_dir():
            raise ConfigError("--out", out, f"a file path; {target} is a folder")
        ancestor = target.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            raise UsageError(f"--out={out}: {ancestor} is not a writable folder")
    return paths


def command(args: argparse.Namespace) -> int:
    from ..evaluation import choose_sampling, draw, of_trained, open_run, save_npz, save_png
    from ..plugin_manager import get_registries

    nfes = parse_nfe(args.nfe)
    n = parse_positive(args.n, "--n") if args.n else DEFAULT_N
    batch_size = parse_positive(args.batch_size, "--batch-size")
    options = parse_options(args.overrides, ("sample.sampler_options", "sample.grid_options"))
    png, npz = output_paths(args.out)
    opened = open_run(args.run, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, weights=args.weights,
                      device=args.device)
    trained = opened.trained
    config = trained.resolved.config
    seed = parse_seed(args.seed, "--seed") if args.seed != "" else config.sample.seed
    choice = choose_sampling(trained.resolved, get_registries(), sampler=args.sampler,
                             sampler_options=options.get("sample.sampler_options"), integrator=args.integrator,
                             grid=args.grid, grid_options=options.get("sample.grid_options"), nfes=nfes)
    spec = trained.spec
    samples, labels = draw(of_trained(trained), choice, nfes, n, seed, batch_size=batch_size, device=opened.device)
    record = choice.record()
    meta = {"run_id": opened.run_id, "checkpoint": str(trained.checkpoint), "checkpoint_sha256": trained.sha256,
            "step": trained.step, "method": config.method, "dataset": config.dataset, "weights": args.weights,
            "sampler": record["describe"], "sampler_options": record["options"], "integrator": record["integrator"],
            "grid": record["grid"], "grid_options": record["grid_options"], "nfe": list(nfes), "n": n, "seed": seed,
            "seed_rule": "sample i starts from prior_noise with seed seed + i", "range": "[-1, 1]",
            "labels": "uniform, per-sample seeded" if labels is not None else None}
    written = []
    if npz is not None:
        save_npz(samples, npz, seeds=torch.arange(seed, seed + n, dtype=torch.int64), labels=labels, meta=meta)
        written.append(npz)
    if png is not None:
        save_png(samples, spec, png)
        written.append(png)
    shown = f" (the PNG shows the first {PNG_MAX_IMAGES} per NFE)" if png is not None and n > PNG_MAX_IMAGES and spec.is_image else ""
    print(f"{n} samples per NFE at NFE {','.join(map(str, nfes))} ({record['describe']} sampler, {record['grid']} grid, "
          f"{args.weights} weights, seeds {seed}..{seed + n - 1}){shown}:", file=sys.stderr)
    for path in written:
        print(path.resolve())
    return 0
