"""The plugin's own tests: distillkit's conformance bases for methods and samplers, reused as they are."""

from distillkit.testing.methods import MethodConformance
from distillkit.testing.samplers import SamplerConformance


class TestStepFlow(MethodConformance):
    method_name = "stepflow"


class TestStepFlowSampler(SamplerConformance):
    sampler_name = "stepflow"
