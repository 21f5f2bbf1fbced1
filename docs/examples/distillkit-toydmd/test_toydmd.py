"""The plugin's own tests: distillkit's conformance bases, reused as they are."""

from distillkit.testing.methods import MethodConformance
from distillkit.testing.metrics import MetricConformance
from distillkit.testing.samplers import SamplerConformance
from distillkit_toydmd import MissedModes, OneStepSampler, ToyDMD


class TestToyDMD(MethodConformance):
    method_class = ToyDMD


class TestOneStepSampler(SamplerConformance):
    sampler_class = OneStepSampler
    nfes = (1,)


class TestMissedModes(MetricConformance):
    metric_class = MissedModes
