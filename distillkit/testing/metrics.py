"""The contract every registered ``Metric`` must satisfy, as a reusable pytest test base.

A plugin that registers a metric checks it with::

    from distillkit.testing.metrics import MetricConformance

    class TestMyMetric(MetricConformance):
        metric_name = "my_metric"          # its registered name

The base builds small, seeded data of ``spec`` (an 8x8 grey image by default for metrics that
apply to images, 2-D points otherwise) from ``ConformanceData``, a tiny labelled dataset with a
classifier recipe, and a ``MetricContext`` around it (``metric_context``) in which every "accurate
solve" returns the reference samples themselves. It then checks that ``prepare`` + ``measure``
give a finite float, that samples identical to the reference measure ~0, that noisier samples
measure more, that measuring is deterministic, that ``problem`` refuses data the metric does not
apply to (an image metric on 2-D points), and that the signature is a string that two prepares
agree on. A metric that needs more (feature weights, statistics) overrides ``make_metric`` and
``prepare_reference``. ``DISTILLKIT_CACHE`` points at a temporary folder during each test.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch

from ..contracts import DataSpec, Dataset, MetricContext, SamplingModel

IMAGE_SPEC = DataSpec((1, 8, 8), None)
POINT_SPEC = DataSpec((2,), None)
#: the classifier recipe of ``ConformanceData``: one quick epoch
TINY_RECIPE = {"epochs": 1, "batch_size": 32, "lr": 2e-3}


class ConformanceData(Dataset):
    """Ten classes of 8x8 grey images (a bright 2x2 block at a class-specific place on a noisy
    background), or 2-D points around ten class centres; labelled, with a one-epoch recipe."""

    name = "conformance-data"
    default_backbone = "mlp"
    size = 400

    def __init__(self, spec: DataSpec = IMAGE_SPEC, recipe: Optional[dict] = TINY_RECIPE):
        super().__init__(config=None)
        self._spec = spec
        self._recipe = recipe  # None: a dataset without a classifier
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(self.size) % 10
        if spec.is_image:
            images = -0.8 + 0.1 * torch.randn(self.size, *spec.shape, generator=generator)
            for i, label in enumerate(self.labels.tolist()):
                row, col = 2 * (label // 4), 2 * (label % 4)
                images[i, :, row:row + 2, col:col + 2] = 0.9
            self.data = images.clamp(-1, 1)
        else:
            angle = self.labels.double() * (2 * math.pi / 10)
            centres = torch.stack([angle.cos(), angle.sin()], 1).float()
            self.data = centres + 0.1 * torch.randn(self.size, *spec.shape, generator=generator)

    @property
    def spec(self) -> DataSpec:
        return self._spec

    def train_set(self):
        return torch.utils.data.TensorDataset(self.data, self.labels)

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(self.size, generator=generator)
        return self.data[order[:n]].clone()

    def classifier_recipe(self) -> Optional[dict[str, Any]]:
        return None if self._recipe is None else dict(self._recipe)

    def labelled_images(self):
        return self.data.clone(), self.labels.clone()


def metric_context(dataset: Dataset, n: int, seed: int = 0, *, reference: Optional[torch.Tensor] = None,
                   batch_size: int = 64, **extra) -> MetricContext:
    """A ``MetricContext`` for ``n`` samples of ``dataset``. Its ``solve`` returns ``reference``
    (default: the real samples) whatever velocity it is given: an exact "accurate solve"."""
    real: list = []

    def reference_samples():
        if not real:
            real.append(dataset.reference_samples(n, torch.Generator().manual_seed(seed)))
        return real[0]

    def velocity_for(cond):
        return lambda x, t: torch.zeros_like(x)

    def solve(velocity_for, time_grid, integrator):
        return (reference if reference is not None else reference_samples()).clone()

    return MetricContext(
        spec=dataset.spec, dataset_name=dataset.name, dataset=lambda: dataset, n=n, seed=seed, labels=None,
        device=torch.device("cpu"), batch_size=batch_size,
        model_for=lambda cond: SamplingModel.from_velocity(velocity_for(cond)), velocity_for=velocity_for,
        solve=solve, reference_samples=reference_samples, log=lambda line: None, **extra,
    )


class MetricConformance:
    """Subclass with ``metric_name`` set; see the module docstring."""

    metric_name: str = ""
    #: samples per measurement: enough for stable distances, few enough to stay fast
    n: int = 96
    #: what "identical to the reference" must measure at most
    zero_tolerance: float = 1e-6

    @pytest.fixture(autouse=True)
    def _private_cache(self, tmp_path, monkeypatch):
        monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))

    # -- hooks ------------------------------------------------------------------------------------

    def make_metric(self):
        from ..plugin_manager import get_registries

        return get_registries().metrics.get(self.metric_name)()

    def spec(self) -> DataSpec:
        return IMAGE_SPEC if type(self.make_metric()).applies_to == "images" else POINT_SPEC

    def make_dataset(self) -> Dataset:
        return ConformanceData(self.spec())

    def prepare_reference(self, metric, context: MetricContext) -> None:
        """Make what ``prepare`` reads and cannot make itself (FID statistics). Default: nothing."""

    # -- helpers ----------------------------------------------------------------------------------

    def prepared(self, seed: int = 0):
        dataset = self.make_dataset()
        context = metric_context(dataset, self.n, seed)
        metric = self.make_metric()
        assert metric.problem(context) is None, metric.problem(context)
        self.prepare_reference(metric, context)
        metric.prepare(context)
        return metric, context

    def perturbed(self, context: MetricContext, scale: float, seed: int = 1) -> torch.Tensor:
        real = context.reference_samples()
        noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed))
        return (real + scale * noise).clamp(-1, 1) if context.spec.is_image else real + scale * noise

    # -- the contract -----------------------------------------------------------------------------

    def test_is_registered_with_a_description(self):
        metric = self.make_metric()
        assert metric.name == self.metric_name
        assert isinstance(type(metric).description, str) and type(metric).description.strip()
        assert type(metric).applies_to in ("any", "images")

    def test_measures_a_finite_float(self):
        metric, context = self.prepared()
        value = metric.measure(self.perturbed(context, 0.3), context)
        assert isinstance(value, float) and math.isfinite(value)

    def test_samples_identical_to_the_reference_measure_zero(self):
        metric, context = self.prepared()
        assert abs(metric.measure(context.reference_samples().clone(), context)) <= self.zero_tolerance

    def test_worse_samples_measure_more(self):
        metric, context = self.prepared()
        close, far = (metric.measure(self.perturbed(context, scale), context) for scale in (0.05, 0.8))
        assert far > close >= 0.0, (close, far)

    def test_measuring_is_deterministic(self):
        metric, context = self.prepared()
        samples = self.perturbed(context, 0.3)
        assert metric.measure(samples, context) == metric.measure(samples.clone(), context)

    def test_refuses_data_it_does_not_apply_to(self):
        metric = self.make_metric()
        if type(metric).applies_to != "images":
            pytest.skip(f"{self.metric_name} applies to any data")
        context = metric_context(ConformanceData(POINT_SPEC), 8)
        problem = metric.problem(context)
        assert isinstance(problem, str) and problem.strip() and "\n" not in problem

    def test_signature_is_a_string_two_prepares_agree_on(self):
        first, _ = self.prepared()
        second, _ = self.prepared()
        assert isinstance(first.signature(), str) and "\n" not in first.signature()
        assert first.signature() == second.signature()
        assert isinstance(first.details(), dict)
