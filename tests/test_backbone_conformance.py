"""Every registered backbone against distillkit's backbone contract (distillkit.testing.backbones),
on test-sized options (the paper presets are checked on the meta device in test_backbones_paper)."""

import pytest

import distillkit
from distillkit.testing.backbones import IMAGES, VECTORS, BackboneConformance

BACKBONES = sorted(distillkit.get_registries().backbones.names())

#: options that keep every check well under a second on one CPU thread
TINY = {
    "unet": {"channels": 8, "channel_mult": [1, 2], "num_groups": 4, "time_embedding_dim": 16},
    "mlp": {"hidden": 16, "layers": 2, "time_embedding_dim": 8},
    "songunet": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
    "adm": {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
            "num_head_channels": 8, "dropout": 0.0, "num_groups": 4},
}
#: what the built-in backbones promise to take (and so to refuse the rest)
KINDS = {"unet": {IMAGES}, "songunet": {IMAGES}, "adm": {IMAGES}, "mlp": {VECTORS}}


@pytest.fixture(params=BACKBONES)
def backbone_name(request):
    return request.param


class TestEveryRegisteredBackbone(BackboneConformance):
    def options(self, name):
        return TINY.get(name, {})

    def data_kinds(self, name):
        return frozenset(KINDS[name]) if name in KINDS else None


def test_every_built_in_backbone_accepts_conditioning_and_provides_output_heads():
    registry = distillkit.get_registries().backbones
    for name in KINDS:
        cls = registry.get(name)
        assert cls.accepts_conditioning is True, name
        assert cls.capabilities == frozenset({distillkit.OUTPUT_HEADS}), name
