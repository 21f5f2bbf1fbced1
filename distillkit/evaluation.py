"""End-of-run evaluation: sample at several NFEs from fixed noise, measure, draw a grid."""

from __future__ import annotations

import time
from pathlib import Path

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
) -> Evaluation:
    noise = prior_noise(config.num_samples, spec.shape, config.seed, device=device)
    reference = sample_ode(
        velocity_fn, noise, uniform_grid(config.reference_steps), reference_integrator, batch_size=_EVAL_BATCH
    ).cpu()
    real = dataset.reference_samples(config.num_samples, torch.Generator().manual_seed(config.seed))
    rows, samples = [], {}
    for nfe in config.nfe:
        steps = steps_for_nfe(integrator, nfe)
        started = time.perf_counter()
        generated = sample_ode(
            velocity_fn, noise, sampling_grid(config.grid, steps), integrator, batch_size=_EVAL_BATCH
        ).cpu()
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
