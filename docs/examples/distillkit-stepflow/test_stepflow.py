"""The plugin's own tests: distillkit's conformance bases for methods and samplers, reused as they are."""

from distillkit.testing.methods import MethodConformance
from distillkit.testing.samplers import SamplerConformance
from distillkit_stepflow import StepFlow, StepFlowSampler


class TestStepFlow(MethodConformance):
    method_class = StepFlow


class TestStepFlowSampler(SamplerConformance):
    sampler_class = StepFlowSampler
    nfes = (1, 2, 4, 8)
