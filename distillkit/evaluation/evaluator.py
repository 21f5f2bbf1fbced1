"""The one evaluator: sample a model at several NFEs with a registered sampler from per-sample
seeds, and measure registered metrics. The end of every run, ``distillkit eval``, ``distillkit
compare`` and the benchmarks all use it.

``check()`` does everything that can fail before the first sample is drawn: the sampler suits the
method and can spend every NFE on the grid, each metric applies to the data (``Metric.problem``),
the teacher loads, each metric prepares its reference (FID weights and statistics, the classifier
and its data). ``run()`` then samples per NFE with ``distillkit.sampling.generate`` and measures.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import attrs
import torch

from ..config import build_attrs
from ..contracts import Metric, MetricContext
from ..errors import ConfigError
from ..sampling import generate, sample_seeded
from .choice import SamplingChoice, choose_sampling, prefix_parts
from .labels import labels_for
from .results import EvalResult, base_signature, signed
from .settings import EvalSettings
from .subject import Subject


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    pass


def build_metric(registries, name: str, options: Optional[dict] = None, option: str = "--metric") -> Metric:
    """The registered metric ``name`` with its options (``metric_options.<name>.KEY``)."""
    from ..resolve import lookup

    metric_cls = lookup(registries.metrics, option, name)
    return metric_cls(build_attrs(metric_cls.config_class, options or {}, f"metric_options.{name}."))


class Evaluator:
    """Evaluate ``subject`` as ``settings`` say.

    ``metrics``: metric instances to use instead of new ones, by name (a comparison prepares them
    once for every child; tests inject a feature network this way). ``sampling``: a sampler and
    grid to use instead of the ones ``settings`` name (the trainer passes the run's own).
    """

    def __init__(self, subject: Subject, settings: EvalSettings, *, device: torch.device | str = "cpu",
                 runs_dir: str | Path = ".", tracking_uri: str = "", run_id: Optional[str] = None,
                 metrics: Optional[Mapping[str, Metric]] = None, sampling: Optional[SamplingChoice] = None,
                 log: Optional[Callable[[str], None]] = _stderr, registries=None):
        from ..plugin_manager import get_registries

        self.subject = subject
        self.settings = settings
        self.device = torch.device(device)
        self.runs_dir = Path(runs_dir)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.given_metrics = dict(metrics or {})
        self.sampling = sampling
        self.log = log or _quiet
        self.registries = registries or get_registries()
        self.metrics: list[Metric] = []
        self.context: Optional[MetricContext] = None
        self.labels = labels_for(subject.spec, settings.n, settings.seed)

    # -- before any sample --------------------------------------------------------------------

    def check(self) -> "Evaluator":
        """Everything that can fail, before the first sample is drawn (one-line errors)."""
        settings = self.settings
        if self.sampling is None:
            self.sampling = choose_sampling(
                self.subject.resolved, self.registries, sampler=settings.sampler,
                sampler_options=settings.sampler_options, integrator=settings.integrator, grid=settings.grid,
                grid_options=settings.grid_options)
        for nfe in settings.nfes:
            self.sampling.time_grid(nfe)
        unknown = sorted(set(settings.metric_options) - set(self.registries.metrics.names()))
        if unknown:
            raise ConfigError(f"metric_options.{unknown[0]}", settings.metric_options[unknown[0]],
                              "options of a registered metric: " + ", ".join(self.registries.metrics.names()))
        self.metrics = [self.given_metrics.get(name) or build_metric(self.registries, name,
                                                                     settings.metric_options.get(name))
                        for name in settings.metrics]
        context = self._context()
        for metric in self.metrics:
            problem = metric.problem(context)
            if problem:
                raise ConfigError("--metric", metric.name, f"a metric for this data ({problem})")
        self.context = attrs.evolve(context, teacher=self._teacher())
        for metric in self.metrics:
            metric.prepare(self.context)
        return self

    def _teacher(self):
        if not self.settings.teacher:
            return None
        from ..contracts import TeacherContext
        from ..teachers import load_teacher

        resolved = self.subject.resolved
        context = TeacherContext(data=self.subject.spec, dataset_name=self.subject.dataset_name,
                                 dataset_config=resolved.dataset_config if resolved is not None else None,
                                 device=self.device, runs_dir=str(self.runs_dir), tracking_uri=self.tracking_uri)
        return load_teacher(self.settings.teacher, self.registries, context)

    def _context(self) -> MetricContext:
        subject, settings = self.subject, self.settings
        real: list = []

        def reference_samples() -> torch.Tensor:
            if not real:
                generator = torch.Generator().manual_seed(settings.seed)
                real.append(subject.dataset().reference_samples(settings.n, generator))
            return real[0]

        def solve(velocity_for, time_grid, integrator) -> torch.Tensor:
            return sample_seeded(velocity_for, subject.spec, settings.n, settings.seed, time_grid, integrator,
                                 batch_size=settings.batch_size, device=self.device, labels=self.labels)

        return MetricContext(
            spec=subject.spec, dataset_name=subject.dataset_name, dataset=subject.dataset, n=settings.n,
            seed=settings.seed, labels=self.labels, device=self.device, batch_size=settings.batch_size,
            model_for=subject.model_for, velocity_for=subject.velocity_for, solve=solve,
            reference_samples=reference_samples, sample_config=subject.sample, runs_dir=str(self.runs_dir),
            data_root=settings.data_root, log=self.log,
        )

    # -- names ----------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """``eval`` for the run's own sampler, grid and default EMA; else the differences are named."""
        resolved = self.subject.resolved
        parts = ["eval", *(prefix_parts(self.sampling, resolved) if resolved is not None else [])]
        if self.settings.weights != "ema":
            parts.append(self.settings.weights)
        return "-".join(parts)

    def signatures(self) -> dict[str, str]:
        """metric result name -> what must be equal for two measurements of it to be the same
        measurement (sample count, seeds, sampler, weights, checkpoint step, the metric's reference).
        Valid after ``check``."""
        s = self.settings
        base = base_signature(n=s.n, seed=s.seed, sampling=self.sampling.describe(), weights=s.weights,
                              step=self.subject.step)
        return {metric.result_name: signed(base, metric.signature()) for metric in self.metrics}

    # -- sampling and measuring -----------------------------------------------------------------

    @torch.no_grad()
    def run(self, *, keep_samples: bool = False) -> EvalResult:
        if self.context is None:
            self.check()
        subject, settings, sampling = self.subject, self.settings, self.sampling
        names = [metric.result_name for metric in self.metrics]
        self.log(f"distillkit: evaluating {self._what()} (step {subject.step}, {settings.weights} weights, "
                 f"{sampling.sampler.describe()} sampler, {sampling.grid.name} grid) at NFE "
                 f"{','.join(map(str, settings.nfes))} with {settings.n} samples: {', '.join(names)}")
        values: dict[str, dict[int, float]] = {name: {} for name in names}
        steps: dict[int, int] = {}
        seconds: dict[int, float] = {}
        samples: dict[int, torch.Tensor] = {}
        for nfe in settings.nfes:
            time_grid = sampling.time_grid(nfe)
            started = time.perf_counter()
            generated = generate(subject.model_for, sampling.sampler, subject.spec, settings.n, settings.seed,
                                 time_grid, batch_size=settings.batch_size, device=self.device, labels=self.labels)
            seconds[nfe] = time.perf_counter() - started
            steps[nfe] = len(time_grid) - 1
            for metric in self.metrics:
                values[metric.result_name][nfe] = metric.measure(generated, self.context)
            if keep_samples:
                samples[nfe] = generated
            self.log(f"  NFE {nfe}: " + ", ".join(f"{name} {values[name][nfe]:.4f}" for name in names)
                     + f" ({seconds[nfe]:.1f}s sampling)")
        protocol = self._protocol(values, steps, seconds)
        return EvalResult(self.prefix, values, steps, seconds, protocol, self.signatures(),
                          sampler=sampling.describe(), samples=samples)

    def _what(self) -> str:
        resolved = self.subject.resolved
        method = resolved.config.method if resolved is not None else "a velocity field"
        return f"{method} on {self.subject.dataset_name}"

    def _protocol(self, values: dict, steps: dict, seconds: dict) -> dict:
        import distillkit

        subject, settings = self.subject, self.settings
        resolved = subject.resolved
        prefix = self.prefix
        spec = subject.spec
        return {
            "run_id": self.run_id,
            "checkpoint": subject.record.get("checkpoint"),
            "checkpoint_sha256": subject.record.get("checkpoint_sha256"),
            "step": subject.step,
            "method": resolved.config.method if resolved is not None else None,
            "training_integrator": resolved.config.integrator if resolved is not None else None,
            "dataset": subject.dataset_name,
            "weights": settings.weights,
            "sampler": self.sampling.record(),
            "nfe": list(settings.nfes),
            "steps": {str(k): v for k, v in steps.items()},
            "n": settings.n,
            "seeds": {"first": settings.seed, "last": settings.seed + settings.n - 1,
                      "rule": "sample i starts from distillkit.sampling.prior_noise with seed (first + i); a sampler "
                              "that re-noises draws its k-th fresh noise from distillkit.sampling.fresh_seed(first + i, k)"},
            "labels": (f"uniform over {spec.num_classes} classes; label i drawn from its own generator seeded from "
                       f"first + i (distillkit.evaluation.class_labels)") if self.labels is not None else None,
            "batch_size": settings.batch_size,
            "device": str(self.device),
            "metrics": {metric.result_name: {"description": metric.description, **metric.details()}
                        for metric in self.metrics},
            "signatures": self.signatures(),
            "metric_keys": f"{prefix}/<metric>/nfe<k>",
            "results": {f"{prefix}/{m}/nfe{k}": v for m, by in values.items() for k, v in by.items()},
            "sampling_seconds": {str(k): round(v, 3) for k, v in seconds.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "distillkit_version": distillkit.__version__,
            "torch_version": torch.__version__,
        }


def evaluate_model(trained, settings: EvalSettings, *, device: torch.device | str = "cpu", runs_dir: str | Path = ".",
                   tracking_uri: str = "", run_id: Optional[str] = None, metrics: Optional[Mapping[str, Metric]] = None,
                   log: Optional[Callable[[str], None]] = _stderr) -> EvalResult:
    """A ``distillkit.TrainedModel`` evaluated as ``settings`` say (checked, then sampled)."""
    from .subject import of_trained

    subject = of_trained(trained, data_root=settings.data_root)
    return Evaluator(subject, settings, device=device, runs_dir=runs_dir, tracking_uri=tracking_uri, run_id=run_id,
                     metrics=metrics, log=log).run()
