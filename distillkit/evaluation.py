"""End-of-run evaluation: sample at several NFEs from fixed noise, measure, draw a grid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import attrs
import torch

from .config import SampleConfig
from .contracts import Dataset, DataSpec, VelocityFn
from .integrators.grids import uniform_grid
from .integrators.tableau import ButcherTableau
from .metrics import distribution_metric, ode_error
from .sampling import prior_noise, sample_ode, sampling_grid, steps_for_nfe

# Small models on CPU: batches this large keep memory modest and the passes efficient.
_EVAL_BATCH = 500


@attrs.frozen
class NfeResult:
    nfe: int
    steps: int
    metric_name: str
    metric: float
    ode_error: float
    seconds: float


@attrs.frozen
class Evaluation:
    rows: list[NfeResult]
    samples: dict[int, torch.Tensor]  # nfe -> generated samples (CPU)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.rows:
            out[f"eval/{row.metric_name}/nfe{row.nfe}"] = row.metric
            out[f"eval/ode_error/nfe{row.nfe}"] = row.ode_error
        return out

    def table(self) -> str:
        name = self.rows[0].metric_name if self.rows else "metric"
        lines = [f"{'NFE':>5} {'steps':>6} {name:>12} {'ode_error':>10} {'seconds':>8}"]
        for r in self.rows:
            lines.append(f"{r.nfe:>5} {r.steps:>6} {r.metric:>12.4f} {r.ode_error:>10.4f} {r.seconds:>8.2f}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate(
    velocity_fn: VelocityFn,
    dataset: Dataset,
    spec: DataSpec,
    config: SampleConfig,
    integrator: ButcherTableau,
    reference_integrator: ButcherTableau,
    device: torch.device,
    *,
    velocity_for: Optional[Callable[[Optional[torch.Tensor]], VelocityFn]] = None,
) -> Evaluation:
    """``velocity_for(cond)`` (``lambda cond: method.velocity_fn(model, cond)``), when given, is
    used instead of ``velocity_fn``: class-conditional models (``spec.num_classes``) then get the
    per-sample labels of ``class_labels(n, num_classes, seed)``, as ``distillkit eval`` gives them."""
    if velocity_for is not None:
        labels = class_labels(config.num_samples, spec.num_classes, config.seed) if spec.num_classes else None

        def solve(time_grid: torch.Tensor, tableau: ButcherTableau) -> torch.Tensor:
            return sample_seeded(velocity_for, spec, config.num_samples, config.seed, time_grid, tableau,
                                 device=device, labels=labels)
    else:
        noise = prior_noise(config.num_samples, spec.shape, config.seed, device=device)

        def solve(time_grid: torch.Tensor, tableau: ButcherTableau) -> torch.Tensor:
            return sample_ode(velocity_fn, noise, time_grid, tableau, batch_size=_EVAL_BATCH).cpu()

    reference = solve(uniform_grid(config.reference_steps), reference_integrator)
    real = dataset.reference_samples(config.num_samples, torch.Generator().manual_seed(config.seed))
    rows, samples = [], {}
    for nfe in config.nfe:
        steps = steps_for_nfe(integrator, nfe)
        started = time.perf_counter()
        generated = solve(sampling_grid(config.grid, steps), integrator)
        seconds = time.perf_counter() - started
        name, value = distribution_metric(generated, real, is_image=spec.is_image)
        rows.append(NfeResult(nfe, steps, name, value, ode_error(generated, reference), seconds))
        samples[nfe] = generated
    return Evaluation(rows=rows, samples=samples)


def save_sample_figure(samples: dict[int, torch.Tensor], spec: DataSpec, path: Path, per_row: int = 16) -> Path:
    """One row of images per NFE (images), or one scatter plot per NFE (2-D data)."""
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


# --------------------------------------------------------------------------------------------
# helpers shared by ``distillkit sample``, ``distillkit eval`` and ``distillkit compare``

#: Added to a sample's seed for its class label, so the label stream is not the noise stream.
_LABEL_SEED_OFFSET = 0x5DEECE66D


def cache_dir() -> Path:
    """Where distillkit keeps what it computes once (FID statistics, classifiers):
    ``$DISTILLKIT_CACHE``, else ``~/.cache/distillkit``."""
    import os

    return Path(os.environ.get("DISTILLKIT_CACHE") or "~/.cache/distillkit").expanduser()


def class_labels(n: int, num_classes: int, seed: int, *, start: int = 0) -> torch.Tensor:
    """Labels of samples ``start .. start + n - 1``, uniform over ``num_classes``; label i drawn
    from its own generator seeded from ``seed + i``, so it does not depend on the batch size."""
    generator = torch.Generator()
    out = torch.empty(n, dtype=torch.int64)
    for j in range(n):
        generator.manual_seed((seed + start + j + _LABEL_SEED_OFFSET) % (2**63 - 1))
        out[j] = torch.randint(num_classes, (1,), generator=generator)
    return out


@torch.no_grad()
def sample_seeded(
    velocity_for: Callable[[Optional[torch.Tensor]], VelocityFn],
    spec: DataSpec,
    n: int,
    seed: int,
    time_grid: torch.Tensor,
    integrator: ButcherTableau | str,
    *,
    batch_size: int = _EVAL_BATCH,
    device: torch.device | str = "cpu",
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``n`` samples (on the CPU): sample i starts from ``prior_noise`` with seed ``seed + i``
    (drawn batch by batch, so memory stays at one batch of noise) and, for class-conditional
    models, is generated with label ``labels[i]``. ``velocity_for(cond)`` returns the velocity
    field for a batch's labels (``method.velocity_fn(model, cond)``)."""
    from .integrators.stepper import integrate

    device = torch.device(device)
    asynchronous = device.type == "cuda"

    def noise_at(start: int) -> torch.Tensor:
        noise = prior_noise(min(batch_size, n - start), spec.shape, seed + start)
        return noise.pin_memory().to(device, non_blocking=True) if asynchronous else noise.to(device)

    parts = []
    starts = list(range(0, n, batch_size))
    noise = noise_at(0) if starts else None
    for index, start in enumerate(starts):
        cond = None if labels is None else labels[start : start + len(noise)].to(device)
        result = integrate(velocity_for(cond), noise, time_grid, integrator)  # queued on the GPU
        # The next batch's noise is drawn on the CPU while the GPU integrates this one; only then
        # is this batch copied back (a copy issued after the next batch was queued would wait for
        # that batch too, and leave the GPU idle while the CPU draws).
        noise = noise_at(starts[index + 1]) if index + 1 < len(starts) else None
        parts.append(result.cpu())
    return torch.cat(parts) if parts else torch.empty(0, *spec.shape)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8 0..255, rounded as an 8-bit PNG of them stores them."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` through ``write(tmp)`` on a temporary file in the same folder, then rename:
    a crash or an error leaves no half-written file. The file gets the usual umask permissions."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
