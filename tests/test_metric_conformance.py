"""Every registered metric passes the Metric conformance base (distillkit.testing.metrics), and
the built-ins' own promises: classifier_fd refuses data without a classifier recipe, ode_error
names its reference (own velocity or teacher) in its result name and signature."""

from __future__ import annotations

import attrs
import pytest
import torch

import distillkit
from distillkit.testing.metrics import ConformanceData, MetricConformance, metric_context


class TestFdPixels(MetricConformance):
    metric_name = "fd_pixels"


class TestEnergy(MetricConformance):
    metric_name = "energy"


class TestClassifierFd(MetricConformance):
    metric_name = "classifier_fd"
    zero_tolerance = 1e-5


class TestFid(MetricConformance):
    metric_name = "fid"
    zero_tolerance = 1e-4

    def make_metric(self):
        from distillkit import fid
        from distillkit_metrics import Fid

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten())
        extractor = fid.FeatureExtractor(name="conformance-net", fn=lambda x: net(x / 128.0 - 1.0), input_size=None)
        return Fid(extractor=extractor)

    def prepare_reference(self, metric, context):
        from distillkit import fid

        fid.reference_stats(context.dataset(), context.dataset_name, metric.extractor, n=context.n, seed=context.seed)


class TestOdeError(MetricConformance):
    metric_name = "ode_error"


def test_every_built_in_metric_has_a_conformance_class_here():
    from distillkit.testing.registered import built_in_names

    names = built_in_names("metrics")
    assert names and names <= {cls.metric_name for cls in MetricConformance.__subclasses__()}


def test_classifier_fd_applies_exactly_to_datasets_with_a_recipe():
    metric = distillkit.get_registries().metrics.get("classifier_fd")()
    assert metric.problem(metric_context(ConformanceData(), 8)) is None
    problem = metric.problem(metric_context(ConformanceData(recipe=None), 8))
    assert "has no classifier recipe" in problem


def test_fid_without_statistics_is_one_line_before_measuring(tmp_path, monkeypatch):
    from distillkit.errors import UsageError

    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))
    metric = TestFid().make_metric()
    with pytest.raises(UsageError, match=r"no FID reference statistics for dataset conformance-data .*fid-stats"):
        metric.prepare(metric_context(ConformanceData(), 16))


def test_ode_error_measures_against_the_teacher_when_given_one(tmp_path, monkeypatch):
    from distillkit.config import SampleConfig

    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))  # the solve below is a stand-in: never cache it for others

    class Teacher:
        identity = "analytic:test"

        def velocity(self, x, t, cond=None):
            return -x

    reference = torch.full((6, 2), 0.5)
    calls = []

    def solve(velocity_for, grid, integrator):
        field = velocity_for(None)
        calls.append((field(torch.ones(1, 2), torch.ones(1)), len(grid) - 1, integrator.name))
        return reference

    context = metric_context(ConformanceData(distillkit.DataSpec((2,))), 6, teacher=Teacher(),
                             sample_config=SampleConfig(reference_integrator="heun", reference_steps=5))
    context = attrs.evolve(context, solve=solve)
    metric = distillkit.get_registries().metrics.get("ode_error")()
    metric.prepare(context)
    assert metric.result_name == "ode_error_teacher"
    assert metric.signature() == "ref=analytic:test:heunx5rho2"
    assert metric.measure(torch.zeros(6, 2), context) == pytest.approx(0.5)
    # The teacher's velocity was integrated (not the model's zero field), once for two measures.
    metric.measure(torch.zeros(6, 2), context)
    assert len(calls) == 1 and torch.equal(calls[0][0], -torch.ones(1, 2)) and calls[0][1:] == (5, "heun")
    own = distillkit.get_registries().metrics.get("ode_error")()
    own.prepare(metric_context(ConformanceData(distillkit.DataSpec((2,))), 6))
    assert own.result_name == "ode_error" and own.signature() == "ref=own:rk4x16rho2"
