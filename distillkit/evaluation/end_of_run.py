"""What the trainer asks of the evaluator: the end-of-run table and the training-time sample grids.

At the end of a run the EMA sampling network is sampled at every ``sample.nfe`` with the run's own
sampler and grid (``sample.sampler``, else the method's ``default_sampler``) from per-sample seeds,
and measured with the distribution metric (``fd_pixels`` for images, ``energy`` otherwise) and
``ode_error`` against the model's own accurate solve: the same protocol as ``distillkit eval``
with its defaults, so the numbers agree.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
import torch

from ..contracts import Dataset, DataSpec, SamplingModel
from ..sampling import DEFAULT_BATCH, fresh_noise_source
from .choice import SamplingChoice
from .evaluator import Evaluator
from .settings import EvalSettings, distribution_metric
from .subject import Subject, of_network


@attrs.frozen
class NfeResult:
    nfe: int
    steps: int
    metric_name: str
    metric: float
    ode_error: float
    seconds: float
    sampler: str = ""  # ``ode/euler/uniform``: the sampler and grid the row was sampled with


@attrs.frozen
class Evaluation:
    rows: list[NfeResult]
    samples: dict[int, torch.Tensor]  # nfe -> generated samples (CPU)
    sampler: str = ""
    #: metric -> signature (``distillkit.evaluation.results``), for the run's ``distillkit.eval.*`` tags
    signatures: dict = attrs.field(factory=dict)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.rows:
            out[f"eval/{row.metric_name}/nfe{row.nfe}"] = row.metric
            out[f"eval/ode_error/nfe{row.nfe}"] = row.ode_error
        return out

    def table(self) -> str:
        name = self.rows[0].metric_name if self.rows else "metric"
        lines = [f"{'NFE':>5} {'steps':>6} {name:>12} {'ode_error':>10} {'seconds':>8}  sampler"]
        for r in self.rows:
            lines.append(f"{r.nfe:>5} {r.steps:>6} {r.metric:>12.4f} {r.ode_error:>10.4f} {r.seconds:>8.2f}  {r.sampler}")
        return "\n".join(lines)


def _end_of_run_settings(sample, spec: DataSpec, metric_options: Optional[dict] = None) -> EvalSettings:
    return EvalSettings(metrics=(distribution_metric(spec), "ode_error"), nfes=tuple(sample.nfe),
                        n=sample.num_samples, seed=sample.seed, batch_size=DEFAULT_BATCH,
                        metric_options=metric_options or {})


def _as_evaluation(evaluator: Evaluator) -> Evaluation:
    result = evaluator.run(keep_samples=True)
    name = distribution_metric(evaluator.subject.spec)
    rows = [NfeResult(nfe, steps, name, result.values[name][nfe], result.values["ode_error"][nfe],
                      result.seconds[nfe], result.sampler) for nfe, steps in result.steps.items()]
    return Evaluation(rows=rows, samples=result.samples, sampler=result.sampler, signatures=result.signatures)


def end_of_run(method, network: torch.nn.Module, dataset: Dataset, resolved, device: torch.device | str,
               log: Optional[Callable[[str], None]] = None) -> Evaluation:
    """The quality of ``network`` (the EMA sampling network, in eval mode) at every ``sample.nfe``
    with the run's own sampler and grid; the table names the sampler. ``log``: progress lines
    (what is evaluated, then one per NFE as it is done); None: silent."""
    sample = resolved.config.sample
    if log is not None:  # the reference data and statistics come first, and may take a while
        log(f"distillkit: training done; end-of-run evaluation at NFE {','.join(map(str, sample.nfe))} "
            f"with {sample.num_samples} samples (preparing the reference first)")
    subject = of_network(method, network, resolved, dataset=dataset, spec=dataset.spec)
    evaluator = Evaluator(subject, _end_of_run_settings(sample, dataset.spec), device=device,
                          sampling=SamplingChoice(resolved.sampler, resolved.grid), log=log)
    return _as_evaluation(evaluator)


@torch.no_grad()
def sample_grid(method, network: torch.nn.Module, resolved, noise: torch.Tensor, labels: Optional[torch.Tensor],
                nfes) -> dict[int, torch.Tensor]:
    """Samples (CPU) from fixed ``noise`` (sample i: prior-noise seed ``sample.seed + i``) at each
    NFE with the run's own sampler: the training-time sample grids."""
    model = method.sampling_model(network, labels)
    seed = resolved.config.sample.seed
    out = {}
    for nfe in nfes:
        fresh = fresh_noise_source(seed, len(noise), tuple(noise.shape[1:]), device=noise.device, dtype=noise.dtype)
        out[nfe] = resolved.sampler.sample(model, noise, resolved.time_grid(nfe), fresh).cpu()
    return out


def evaluate(velocity_fn, dataset: Dataset, spec: DataSpec, config, integrator, reference_integrator,
             device: torch.device | str, *, velocity_for=None) -> Evaluation:
    """A bare velocity field at every ``config.nfe`` (``config``: a ``SampleConfig``) with the ode
    sampler and ``integrator`` on ``config.grid``; ``ode_error`` against ``reference_integrator``.
    ``velocity_for(cond)``, when given, is used instead of ``velocity_fn`` (class-conditional
    models then get the labels ``distillkit eval`` gives them). Prefer ``end_of_run``, which
    samples with the run's own sampler."""
    from ..plugin_manager import get_registries
    from ..resolve import build_grid, build_sampler

    registries = get_registries()
    velocity_for = velocity_for or (lambda cond: velocity_fn)
    subject = Subject(resolved=None, spec=spec, dataset=lambda: dataset, dataset_name=getattr(dataset, "name", ""),
                      sample=config, model_for=lambda cond: SamplingModel.from_velocity(velocity_for(cond)),
                      velocity_for=velocity_for)
    sampling = SamplingChoice(build_sampler(registries, "ode", {}, integrator),
                              build_grid(registries, config.grid, config.grid_options))
    settings = _end_of_run_settings(config, spec, {"ode_error": {"integrator": reference_integrator.name}})
    return _as_evaluation(Evaluator(subject, settings, device=device, sampling=sampling, log=None))
