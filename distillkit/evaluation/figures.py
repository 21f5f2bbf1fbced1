"""Pictures and files of samples: the end-of-run figure, ``distillkit sample``'s PNG grid and .npz."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..contracts import DataSpec
from ..files import write_atomic

#: ``distillkit sample``'s PNG shows at most this many images per NFE (the .npz holds all of them).
PNG_MAX_IMAGES = 256
_PER_ROW = 16


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 0..255, rounded as an 8-bit PNG of them stores them."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def save_sample_figure(samples: dict[int, torch.Tensor], spec: DataSpec, path: Path, per_row: int = 16) -> Path:
    """One row of images per NFE (images), or one scatter plot per NFE (2-D data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.is_image:
        from torchvision.utils import save_image

        rows = [samples[nfe][:per_row] for nfe in sorted(samples)]
        images = torch.cat(rows).clamp(-1, 1).add(1).div(2)
        scale = max(1, 64 // spec.shape[-1])  # tiny images are enlarged so they can be seen
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        save_image(images, path, nrow=per_row, padding=2, pad_value=1.0)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = sorted(samples)
    fig, axes = plt.subplots(1, len(nfes), figsize=(3 * len(nfes), 3), squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        points = samples[nfe].flatten(1)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.set_title(f"NFE {nfe}")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def save_png(samples: dict[int, torch.Tensor], spec: DataSpec, path: Path) -> None:
    """An image grid (images) or a scatter plot per NFE (2-D data), written atomically."""
    if spec.is_image:
        write_atomic(path, lambda tmp: image_grid(samples).save(tmp, format="PNG"))
    else:
        write_atomic(path, lambda tmp: save_sample_figure(samples, spec, tmp))


def save_npz(samples: dict[int, torch.Tensor], path: Path, *, seeds: torch.Tensor, labels: Optional[torch.Tensor],
             meta: dict) -> None:
    """``nfe<k>`` arrays, the per-sample seeds, the labels (conditional data) and ``meta`` as JSON."""
    import numpy as np

    arrays = {f"nfe{nfe}": samples[nfe].numpy().astype(np.float32) for nfe in sorted(samples)}
    arrays["seeds"] = seeds.numpy()
    if labels is not None:
        arrays["labels"] = labels.numpy()
    arrays["meta"] = np.array(json.dumps(meta, default=str))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **arrays)

    write_atomic(path, write)
