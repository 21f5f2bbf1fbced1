"""The built-in quality metrics, registered through the same entry-point group a third party uses.

The math lives in the core library (``distillkit.metrics``, ``distillkit.fid``,
``distillkit.classifier``); each class here only says what the metric applies to, what reference
it prepares, and how it names that reference (its signature).

* ``fd_pixels``: Fréchet distance of Gaussians fitted to generated and real pixels (images).
* ``energy``: energy distance to real samples, no features (any data; the toy2d default).
* ``classifier_fd``: Fréchet distance in the features of a small classifier distillkit trains once
  from the dataset's own ``classifier_recipe()`` (datasets without a recipe are refused).
* ``fid``: clean-fid's Inception features against statistics made by ``distillkit fid-stats``.
* ``ode_error``: RMS distance between the evaluated samples and an accurate solve of a reference
  velocity from exactly the same noise (and labels). The reference is the teacher the evaluation
  was given (``--teacher``; logged as ``ode_error_teacher``) or, by default, the model's own
  *instantaneous* velocity (``Method.velocity_fn``), integrated with ``sample.reference_integrator``
  over ``sample.reference_steps`` steps uniform in t^(1/rho) (options ``integrator`` / ``steps`` /
  ``rho`` override them; rho = 2 by default, rho = 1 is the uniform grid).
  The instantaneous velocity is defined for step-size aware models too (their velocity at d = 0),
  so "the model's own accurate solve" means the same thing for every method.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs
import torch

from distillkit import Metric, MetricContext, edm_grid, get_registries, hookimpl, uniform_grid, validators
from distillkit.config import SampleConfig
from distillkit.errors import ConfigError, UnknownNameError


def _reference_rule(context: MetricContext, real: torch.Tensor) -> str:
    return (f"{len(real)} distinct training images of {context.dataset_name}: "
            f"dataset.reference_samples(n, torch.Generator().manual_seed({context.seed}))")


class _AgainstRealSamples(Metric):
    """A distance between the generated samples and ``n`` real ones."""

    def prepare(self, context: MetricContext) -> None:
        self.real = context.reference_samples()
        self._details = {"reference": _reference_rule(context, self.real), "n_reference": len(self.real)}

    def details(self) -> dict[str, Any]:
        return dict(self._details)


class FdPixels(_AgainstRealSamples):
    name = "fd_pixels"
    description = "Fréchet distance of Gaussians fitted to generated and real pixels (images)"
    applies_to = "images"

    def measure(self, generated, context):
        from distillkit.metrics import frechet_distance

        return frechet_distance(generated, self.real)


class Energy(_AgainstRealSamples):
    name = "energy"
    description = "energy distance to real samples, no features (any data; the toy2d default)"

    def measure(self, generated, context):
        from distillkit.metrics import energy_distance

        return energy_distance(generated, self.real)


class ClassifierFd(Metric):
    name = "classifier_fd"
    description = ("Fréchet distance in the features of a small classifier distillkit trains on the dataset's "
                   "labels (datasets with a classifier recipe: digits, mnist, fashion-mnist)")
    applies_to = "images"

    def __init__(self, config=None):
        super().__init__(config)
        self._classifiers: dict = {}  # (dataset, options, root) -> Classifier: prepared once per data

    def problem(self, context):
        problem = super().problem(context)
        if problem is None and context.dataset().classifier_recipe() is None:
            problem = (f"dataset {context.dataset_name} has no classifier recipe "
                       f"(Dataset.classifier_recipe); use fid or fd_pixels")
        return problem

    def prepare(self, context):
        from distillkit import classifier

        dataset = context.dataset()
        key = (context.dataset_name, repr(dataset.config), dataset.data_root)
        if key not in self._classifiers:
            self._classifiers[key] = classifier.classifier_for(dataset, context.dataset_name, log=context.log)
        self.classifier = self._classifiers[key]
        real = context.reference_samples()
        self.reference_features = self.classifier.features(real)
        self._details = {"reference": _reference_rule(context, real), "n_reference": len(real),
                         "classifier": self.classifier.path.name,
                         "classifier_holdout_accuracy": self.classifier.holdout_accuracy,
                         "features": f"{classifier.FEATURE_DIM}-d penultimate layer"}

    def measure(self, generated, context):
        from distillkit import classifier

        return classifier.classifier_fd(generated, self.reference_features, self.classifier)

    def signature(self):
        return f"classifier={self.classifier.path.name}"

    def details(self):
        return dict(self._details)


@attrs.frozen
class FidOptions:
    #: the TorchScript Inception file (empty: $DISTILLKIT_INCEPTION_WEIGHTS, else clean-fid's download)
    inception_weights: str = attrs.field(default="", validator=attrs.validators.instance_of(str))


class Fid(Metric):
    name = "fid"
    description = "FID: clean-fid's Inception features against statistics made by distillkit fid-stats"
    applies_to = "images"
    config_class = FidOptions

    def __init__(self, config=None, *, extractor=None):
        """``extractor``: a ``distillkit.fid.FeatureExtractor`` to use instead of Inception (tests)."""
        super().__init__(config)
        self.extractor = extractor

    def prepare(self, context):
        from distillkit import fid

        if self.extractor is None:
            self.extractor = fid.inception_extractor(self.config.inception_weights, context.device)
        self.stats = fid.require_reference_stats(context.dataset_name, self.extractor)

    def measure(self, generated, context):
        from distillkit import fid

        return fid.fid(generated, self.stats, self.extractor, batch_size=min(context.batch_size, 64))

    def signature(self):
        return f"stats={self.stats.path.name}:{self.stats.n}"

    def details(self):
        return {"feature_extractor": self.extractor.name, "weights_file": self.extractor.weights_file,
                "statistics": str(self.stats.path), "reference": self.stats.meta}


@attrs.frozen
class OdeErrorOptions:
    #: the reference solve's integrator (empty: the run's sample.reference_integrator)
    integrator: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    #: its steps (0: the run's sample.reference_steps)
    steps: int = attrs.field(default=0, validator=validators.non_negative_int)
    #: its grid: steps uniform in t^(1/rho), t_i = (1 - i/steps)^rho (1: uniform steps). A trained
    #: field bends most near the data (t = 0): there rho = 2 takes steps of ~1/steps^2, and 16 steps
    #: solve more accurately than 32 uniform ones (docs/results/eval-cost-cpu.md)
    rho: float = attrs.field(default=2.0, validator=validators.positive_number)
    #: keep the reference solve in $DISTILLKIT_CACHE/ode_error (reference_cache.py): a later
    #: evaluation of the same field from the same noise reads it instead of solving again
    cache: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


class OdeError(Metric):
    name = "ode_error"
    description = ("RMS distance to a high-accuracy solve from the same noise (the model's own instantaneous "
                   "velocity, or --teacher's)")
    config_class = OdeErrorOptions

    @property
    def result_name(self) -> str:
        return "ode_error_teacher" if getattr(self, "teacher", None) is not None else "ode_error"

    def prepare(self, context):
        sample = context.sample_config
        name = self.config.integrator or (sample.reference_integrator if sample is not None else "rk4")
        try:
            self.integrator = get_registries().integrators.get(name)
        except UnknownNameError:
            allowed = ", ".join(get_registries().integrators.names())
            raise ConfigError("metric_options.ode_error.integrator", name, f"a registered integrator: {allowed}") from None
        self.steps = self.config.steps or (sample if sample is not None else SampleConfig()).reference_steps
        self.rho = float(self.config.rho)
        self.teacher = context.teacher
        self._reference: Optional[tuple[MetricContext, torch.Tensor]] = None
        self._seconds = 0.0
        self._cache = ""
        self._labels = context.labels is not None

    def _reference_velocity(self, context):
        if self.teacher is None:
            return context.velocity_for
        teacher = self.teacher

        def velocity_for(cond):
            return lambda x, t: teacher.velocity(x, t, cond)

        return velocity_for

    def reference(self, context: MetricContext) -> torch.Tensor:
        """The accurate solve from the evaluated samples' noise, made once per evaluation (and
        read from the cache when this field was solved from this noise before)."""
        if self._reference is None or self._reference[0] is not context:
            started = time.perf_counter()
            self._reference = (context, self._cached_solve(context))
            self._seconds = time.perf_counter() - started
        return self._reference[1]

    def _cached_solve(self, context: MetricContext) -> torch.Tensor:
        from . import reference_cache

        velocity_for = self._reference_velocity(context)
        if not self.config.cache:
            self._cache = "off"
            return context.solve(velocity_for, self.grid(), self.integrator)
        who = self.teacher.identity if self.teacher is not None else "own"
        digest = reference_cache.key(velocity_for, context, who=who, integrator=self.integrator.name, grid=self.grid())
        path = reference_cache.path_for(context, digest)
        cached = reference_cache.load(path, digest, context)
        if cached is not None:
            self._cache = f"read from {path}"
            return cached
        solved = context.solve(velocity_for, self.grid(), self.integrator)
        self._cache = f"saved as {path}" if reference_cache.save(path, digest, solved, context) else "not cached"
        return solved

    def grid(self) -> torch.Tensor:
        """The reference solve's time grid (rho = 1: exactly the uniform grid)."""
        return uniform_grid(self.steps) if self.rho == 1 else edm_grid(self.steps, rho=self.rho)

    def measure(self, generated, context):
        from distillkit.metrics import ode_error

        return ode_error(generated, self.reference(context))

    def signature(self):
        who = self.teacher.identity if self.teacher is not None else "own"
        return f"ref={who}:{self.integrator.name}x{self.steps}" + (f"rho{self.rho:g}" if self.rho != 1 else "")

    def _grid_rule(self) -> str:
        return "uniform in t" if self.rho == 1 else f"uniform in t^(1/{self.rho:g}): t_i = (1 - i/{self.steps})^{self.rho:g}"

    def details(self):
        what = f"teacher {self.teacher.identity}" if self.teacher is not None else "the model's own velocity"
        return {
            "reference": f"{what} integrated with {self.integrator.name}, {self.steps} steps {self._grid_rule()}, "
                         f"from the same noise" + (" and labels" if self._labels else ""),
            "distance": "RMS over samples of the per-sample Euclidean distance / sqrt(dimension)",
            "seconds": round(self._seconds, 3),
            "cache": self._cache,
        }


METRICS = (FdPixels, Energy, ClassifierFd, Fid, OdeError)


@hookimpl
def distillkit_register_metrics(register):
    for metric in METRICS:
        register(metric)
