"""``distillkit sample``: draw samples from a trained run at several NFEs into a PNG grid and/or an
``.npz`` file.

Sample i starts from the noise of seed ``seed + i`` (and, for class-conditional models, the label
drawn from its own generator seeded from ``seed + i``), so image i is the same image whatever the
batch size or the number of samples asked for (up to float rounding of batched kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError, UsageError
from .evaluate import _non_negative, add_model_options, open_run, parse_grid, parse_nfe, parse_positive

DEFAULT_N = 64
#: The PNG shows at most this many images per NFE (the .npz always holds all of them).
PNG_MAX_IMAGES = 256
_PER_ROW = 16


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


def image_grid(samples: dict[int, torch.Tensor], *, max_images: int = PNG_MAX_IMAGES, per_row: int = _PER_ROW):
    """A PIL image: one block of images per NFE, top to bottom, each labelled ``NFE k`` on the left.
    Class labels (conditional models) are in the .npz, not drawn."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    blocks = []
    for nfe in sorted(samples):
        images = samples[nfe][:max_images].clamp(-1, 1).add(1).div(2)
        scale = max(1, 32 // images.shape[-1])  # tiny images are enlarged so they can be seen
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        grid = make_grid(images, nrow=min(per_row, len(images)), padding=2, pad_value=1.0)
        array = grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        blocks.append((nfe, Image.fromarray(array)))
    margin, gap = 64, 8
    width = margin + max(block.width for _, block in blocks)
    height = sum(block.height for _, block in blocks) + gap * (len(blocks) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for nfe, block in blocks:
        canvas.paste(block, (margin, y))
        draw.text((6, y + 4), f"NFE {nfe}", fill="black")
        y += block.height + gap
    return canvas


def save_png(samples: dict[int, torch.Tensor], spec, path: Path) -> None:
    from ..evaluation import save_sample_figure, write_atomic

    if spec.is_image:
        write_atomic(path, lambda tmp: image_grid(samples).save(tmp, format="PNG"))
    else:
        write_atomic(path, lambda tmp: save_sample_figure(samples, spec, tmp))


def save_npz(samples: dict[int, torch.Tensor], path: Path, *, seeds: torch.Tensor, labels: Optional[torch.Tensor],
             meta: dict) -> None:
    import numpy as np

    from ..evaluation import write_atomic

    arrays = {f"nfe{nfe}": samples[nfe].numpy().astype(np.float32) for nfe in sorted(samples)}
    arrays["seeds"] = seeds.numpy()
    if labels is not None:
        arrays["labels"] = labels.numpy()
    arrays["meta"] = np.array(json.dumps(meta, default=str))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    write_atomic(path, write)


def command(args: argparse.Namespace) -> int:
    from ..evaluation import class_labels, sample_seeded
    from ..plugin_manager import get_registries
    from ..resolve import lookup
    from ..sampling import sampling_grid, steps_for_nfe

    nfes = parse_nfe(args.nfe)
    n = parse_positive(args.n, "--n") if args.n else DEFAULT_N
    batch_size = parse_positive(args.batch_size, "--batch-size")
    png, npz = output_paths(args.out)
    opened = open_run(args.run, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, weights=args.weights,
                      device=args.device)
    trained = opened.trained
    config = trained.resolved.config
    seed = _non_negative(args.seed, "--seed") if args.seed != "" else config.sample.seed
    grid = parse_grid(args.grid, config.sample.grid)
    tableau = lookup(get_registries().integrators, "--integrator", args.integrator or config.sample.integrator)
    for nfe in nfes:
        try:
            steps_for_nfe(tableau, nfe)
        except ValueError:
            raise ConfigError("--nfe", nfe, f"{tableau.name} spends {tableau.stages} network evaluations per step; "
                              f"choose multiples of {tableau.stages}") from None
    spec = trained.spec
    labels = class_labels(n, spec.num_classes, seed) if spec.num_classes else None
    samples = {}
    for nfe in nfes:
        time_grid = sampling_grid(grid, steps_for_nfe(tableau, nfe))
        samples[nfe] = sample_seeded(trained.velocity_fn, spec, n, seed, time_grid, tableau, batch_size=batch_size,
                                     device=opened.device, labels=labels)
    meta = {"run_id": opened.run_id, "checkpoint": str(trained.checkpoint), "checkpoint_sha256": trained.sha256,
            "step": trained.step, "method": config.method, "dataset": config.dataset, "weights": args.weights,
            "integrator": tableau.name, "grid": grid, "nfe": list(nfes), "n": n, "seed": seed,
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
    print(f"{n} samples per NFE at NFE {','.join(map(str, nfes))} ({tableau.name} sampler, {grid} grid, {args.weights} "
          f"weights, seeds {seed}..{seed + n - 1}){shown}:", file=sys.stderr)
    for path in written:
        print(path.resolve())
    return 0
