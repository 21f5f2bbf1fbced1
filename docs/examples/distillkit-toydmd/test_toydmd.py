"""The plugin's own tests: distillkit's conformance bases, reused as they are."""

import distillkit
from distillkit.testing.methods import MethodConformance
from distillkit.testing.metrics import MetricConformance
from distillkit.testing.samplers import SamplerConformance


class TestToyDMD(MethodConformance):
    method_name = "toy-dmd"


class TestOneStepSampler(SamplerConformance):
    sampler_name = "onestep"


class TestMissedModes(MetricConformance):
    metric_name = "missed_modes"
    n = 400

    def make_dataset(self):
        toy2d = distillkit.get_registries().datasets.get("toy2d")
        return toy2d(toy2d.config_class(train_size=2000))
