"""What a method needs from its backbone is checked when the run is resolved, before any work."""

import types

import pytest
import torch

import distillkit
from distillkit import Backbone, hookimpl
from distillkit.config import RunConfig
from distillkit.errors import ConfigError
from distillkit.plugin_manager import load_plugins
from distillkit.resolve import resolve


class PlainBackbone(Backbone):
    """A backbone with neither extra conditioning nor output heads."""

    name = "plain-test"

    def __init__(self, config, data):
        super().__init__()
        self.layer = torch.nn.Linear(data.shape[0] + 1, data.shape[0])

    def forward(self, x, t, cond=None, *, extra=None, return_features=False):
        return self.layer(torch.cat([x, t[:, None]], dim=1))


class NeedsStepSize(distillkit.Method):
    name = "needs-d-test"
    conditioning = ("d",)

    def loss(self, student, batch, generator, step):
        return distillkit.LossOutput(student(batch.x, torch.zeros(len(batch.x)), extra={"d": torch.zeros(len(batch.x))}).sum())


@pytest.fixture(scope="module")
def registries():
    plugin = types.SimpleNamespace(
        distillkit_register_backbones=hookimpl(lambda register: register(PlainBackbone)),
        distillkit_register_methods=hookimpl(lambda register: register(NeedsStepSize)),
    )
    state = load_plugins([("requirements-test", plugin)])
    assert state.plugins["requirements-test"].errors == []
    return state.registries


def test_cud_refuses_a_backbone_without_output_heads(registries):
    with pytest.raises(ConfigError, match="a backbone with output_heads, which method cud uses"):
        resolve(RunConfig(method="cud", dataset="toy2d", backbone="plain-test"), registries)
    resolve(RunConfig(method="fm", dataset="toy2d", backbone="plain-test"), registries)  # fm needs neither


def test_a_method_with_extra_conditioning_refuses_a_backbone_that_takes_none(registries):
    with pytest.raises(ConfigError, match=r"accepts extra conditioning inputs \(d\)"):
        resolve(RunConfig(method="needs-d-test", dataset="toy2d", backbone="plain-test"), registries)
    resolved = resolve(RunConfig(method="needs-d-test", dataset="toy2d", backbone="mlp"), registries)
    assert resolved.backbone_cls.accepts_conditioning
