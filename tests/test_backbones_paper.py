"""The paper-scale backbones ``songunet`` (DDPM++) and ``adm``: the backbone contract on small
configs, preset sizes (on the meta device: no memory, no time), presets and overrides, Prior
ShakeDrop, resampling, attention and the time embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import distillkit
from distillkit import DataSpec
from distillkit.cli.main import main
from distillkit_backbones import ADM, ADMConfig, SongUNet, SongUNetConfig
from distillkit_backbones.adm import timestep_embedding
from distillkit_backbones.layers import Resample, multi_head_attention, shakedrop_scale

# Small configs (~0.1-0.2 M parameters) that still exercise every part: attention, resampling,
# the padding of 28 -> 14 -> 7 -> 4, non-default filters and norms.
SMALL_SONG = {"channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
SMALL_ADM = {
    "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
    "num_head_channels": 8, "dropout": 0.0, "num_groups": 8,
}
CASES = [
    (SongUNet, (1, 8, 8), SMALL_SONG),
    (SongUNet, (3, 8, 8), {**SMALL_SONG, "resample_filter": [1, 3, 3, 1], "num_heads": 2, "shakedrop": True}),
    (SongUNet, (1, 28, 28), {**SMALL_SONG, "channel_mult": [1, 1, 1, 1], "attn_resolutions": [7]}),
    (ADM, (3, 8, 8), SMALL_ADM),
    (ADM, (1, 28, 28), {**SMALL_ADM, "channel_mult": [1, 1, 1, 1], "attention_resolutions": [7, 4]}),
    (ADM, (3, 8, 8), {**SMALL_ADM, "use_scale_shift_norm": False, "resblock_updown": False, "shakedrop": True}),
]
CASE_IDS = [f"{cls.name}-{'x'.join(map(str, shape))}-{i}" for i, (cls, shape, _) in enumerate(CASES)]


def build(cls, shape, num_classes=None, **options):
    torch.manual_seed(0)
    return cls.build(cls.config_class(**options), DataSpec(shape, num_classes)).eval()


def inputs(shape, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator), torch.rand(batch, generator=generator)


def enlarge_output_(model) -> None:
    """The last layer of every residual branch and the output conv start near zero (1e-5 x
    their default init), so at init the time and the label barely reach the output. Give those
    layers ordinary weights so that comparisons are not comparisons of numbers around 1e-5."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and parameter.abs().max() < 1e-3:
                parameter.normal_(0, 0.05)


@pytest.mark.parametrize("cls, shape, options", CASES, ids=CASE_IDS)
def test_contract_shapes_features_heads_and_gradients(cls, shape, options):
    model = build(cls, shape, num_classes=5, **options)
    assert 30_000 < model.num_parameters() < 400_000  # test-sized
    x, t = inputs(shape, batch=4)
    labels = torch.tensor([0, 1, 4, 2])
    out, features = model(x, t, labels, return_features=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert features.shape[0] == 4 and features.shape[2:] == x.shape[2:]
    torch.testing.assert_close(model.output_block(features), out, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, labels), out, rtol=0, atol=0)

    # The network's own output layer and a new head both start near zero but not at zero.
    assert 0 < out.abs().max() < 1e-2
    head = model.make_output_head()
    assert type(head) is type(model.output_block) and head is not model.output_block
    assert [p.shape for p in head.parameters()] == [p.shape for p in model.output_block.parameters()]
    head_out = head(features)
    assert head_out.shape == x.shape and 0 < head_out.abs().max() < 1e-2

    # One backward pass reaches every parameter of the network and of the head.
    model.train()
    out, features = model(x, t, labels, return_features=True)
    ((out - x).square().mean() + head(features).square().mean()).backward()
    for name, parameter in [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls, options", [(SongUNet, SMALL_SONG), (ADM, SMALL_ADM)])
def test_labels_condition_the_output_and_time_broadcasts(cls, options):
    model = build(cls, (3, 8, 8), num_classes=10, **options)
    enlarge_output_(model)
    x, t = inputs((3, 8, 8), batch=4)
    zeros, sevens = torch.zeros(4, dtype=torch.long), torch.full((4,), 7, dtype=torch.long)
    assert not torch.allclose(model(x, t, zeros), model(x, t, sevens), atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional.*cond"):
        model(x, t)
    unconditional = build(cls, (3, 8, 8), **options)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, zeros)

    # one time for the batch == the same time per sample; and t matters
    enlarge_output_(unconditional)
    per_sample = unconditional(x, torch.full((4,), 0.3))
    torch.testing.assert_close(unconditional(x, 0.3), per_sample)
    assert not torch.allclose(unconditional(x, 0.7), per_sample, atol=1e-4)
    # samples do not see each other (GroupNorm is per sample; attention is within an image)
    torch.testing.assert_close(unconditional(x[:1], t[:1]), unconditional(x, t)[:1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        unconditional(torch.zeros(2, 3, 9, 9), 0.5)


@pytest.mark.parametrize("cls, options", [(SongUNet, {**SMALL_SONG, "dropout": 0.5}), (ADM, {**SMALL_ADM, "dropout": 0.5})])
def test_dropout_is_active_in_training_only(cls, options):
    model = build(cls, (1, 8, 8), **options)
    enlarge_output_(model)
    x, t = inputs((1, 8, 8))
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


# ----------------------------------------------------------------------------- preset sizes


def on_meta(cls, shape, num_classes=None, **options):
    with torch.device("meta"):
        return cls.build(cls.config_class(**options), DataSpec(shape, num_classes))


@pytest.mark.parametrize(
    "cls, shape, num_classes, options, exact, paper",
    [
        # METHODS.md section 5: CUD's MNIST network 2.16 M, EDM's DDPM++ CIFAR-10 network 55.7 M,
        # ADM ImageNet-64 (EDM reports 296 M for it).
        (SongUNet, (1, 28, 28), None, {"preset": "mnist"}, 2_155_201, 2.16e6),
        (SongUNet, (3, 32, 32), None, {"preset": "cifar10"}, 55_732_739, 55.7e6),
        (ADM, (3, 64, 64), 1000, {"preset": "imagenet64"}, 295_899_267, 296e6),
    ],
    ids=["songunet-mnist", "songunet-cifar10", "adm-imagenet64"],
)
def test_presets_have_the_papers_parameter_counts_and_run(cls, shape, num_classes, options, exact, paper):
    model = on_meta(cls, shape, num_classes, **options)
    assert model.num_parameters() == exact
    assert abs(exact / paper - 1) < 0.005
    # One forward on the meta device: shapes only, no memory and no arithmetic.
    x = torch.empty(2, *shape, device="meta")
    labels = None if num_classes is None else torch.zeros(2, dtype=torch.long, device="meta")
    out, features = model(x, torch.empty(2, device="meta"), labels, return_features=True)
    assert out.shape == x.shape and features.shape[2:] == x.shape[2:]


def test_presets_layout_matches_the_papers():
    cifar = on_meta(SongUNet, (3, 32, 32), preset="cifar10")
    # attention at 16x16: 4 encoder blocks and the last decoder block, plus the deepest level's first block
    assert sum(block.num_heads > 0 for block in [*cifar.encoder[1:], *cifar.decoder]) == 6
    assert len(cifar.encoder) == 1 + 4 + 2 * (1 + 4)  # conv, then (down +) 4 blocks per level
    assert len(cifar.decoder) == 2 + 5 + 2 * (1 + 5)
    assert cifar.config.embedding_dim == 512 and cifar.positional.frequencies.numel() == 64
    # MNIST: attention at 16 is never hit at 28 / 14 / 7
    mnist = on_meta(SongUNet, (1, 28, 28), preset="mnist")
    assert sum(block.num_heads > 0 for block in [*mnist.encoder[1:], *mnist.decoder]) == 1  # the deepest level's
    adm = on_meta(ADM, (3, 64, 64), 1000)
    attention = [m for m in adm.modules() if type(m).__name__ == "ADMAttention"]
    # encoder 3 + 3 + 3 at 32, 16, 8; middle 1; decoder 4 + 4 + 4
    assert len(attention) == 22 and {a.heads for a in attention} == {384 // 64, 576 // 64, 768 // 64}
    assert adm.label_embedding.weight.shape == (1000, 768)


def test_auto_preset_follows_the_data_and_fields_override_presets():
    assert on_meta(SongUNet, (1, 28, 28)).config.preset == "mnist"
    assert on_meta(SongUNet, (3, 32, 32)).config == SongUNetConfig(preset="cifar10")
    assert SongUNetConfig().channels is None  # auto: nothing is filled until the data are known
    config = SongUNetConfig(preset="cifar10", dropout=0.0, channel_mult=[1, 2, 2, 2])
    assert (config.channels, config.channel_mult, config.num_blocks, config.dropout) == (128, (1, 2, 2, 2), 4, 0.0)
    assert config.attn_resolutions == (16,)
    assert SongUNetConfig(preset="mnist", attn_resolutions=[]).attn_resolutions == ()
    assert ADMConfig().channels == 192 and ADMConfig(channels=64, num_groups=16).channels == 64
    assert ADMConfig().attention_resolutions == (32, 16, 8) and ADMConfig().dropout == 0.1


def test_configs_refuse_bad_values_naming_the_option():
    bad = [
        (SongUNetConfig, {"preset": "imagenet"}),
        (SongUNetConfig, {"channels": 0}),
        (SongUNetConfig, {"channels": 15}),  # odd: the sinusoid pairs cos and sin
        (SongUNetConfig, {"channel_mult": []}),
        (SongUNetConfig, {"num_blocks": 0}),
        (SongUNetConfig, {"attn_resolutions": [0]}),
        (SongUNetConfig, {"dropout": 1.0}),
        (SongUNetConfig, {"resample_filter": [1, 2, 1]}),  # odd length would shift the image
        (SongUNetConfig, {"phi": 1.5}),
        (SongUNetConfig, {"shakedrop": "yes"}),
        (SongUNetConfig, {"preset": "cifar10", "num_heads": 3}),  # does not divide 256
        (ADMConfig, {"preset": "cifar10"}),
        (ADMConfig, {"channels": 100, "num_groups": 32}),  # 32 groups do not divide 100
        (ADMConfig, {"num_head_channels": 0}),
        (ADMConfig, {"use_scale_shift_norm": 1}),
        (ADMConfig, {"max_period": -1.0}),
    ]
    for config_class, options in bad:
        with pytest.raises(distillkit.ConfigError) as caught:
            config_class(**options)
        assert caught.value.option in options, (config_class, options)
    with pytest.raises(distillkit.ConfigError, match="num_head_channels"):
        ADM.build(ADMConfig(**{**SMALL_ADM, "num_head_channels": 12}), DataSpec((3, 8, 8)))


def test_preset_and_overrides_resolve_from_the_command_line(capsys):
    code = main(["run", "--dataset", "digits", "--backbone", "songunet", "--dry-run",
                 "--set", "backbone_options.preset=cifar10", "--set", "backbone_options.dropout=0",
                 "--set", "backbone_options.shakedrop=true"])
    assert code == 0
    out = capsys.readouterr().out
    for line in ['preset = "cifar10"', "channels = 128", "channel_mult = [", "num_blocks = 4", "dropout = 0.0", "shakedrop = true"]:
        assert line in out
    assert main(["run", "--dataset", "digits", "--backbone", "adm", "--dry-run",
                 "--set", "backbone_options.num_head_channels=0"]) == 2
    assert "backbone_options.num_head_channels=0" in capsys.readouterr().err


# ------------------------------------------------------------------------- Prior ShakeDrop


def test_shakedrop_factors_follow_the_recipe():
    h_scale, skip_scale = shakedrop_scale(torch.tensor([0.0, 1.0, 0.5]), 0.75)
    torch.testing.assert_close(h_scale.flatten(), torch.tensor([1.5, 0.5, 1.0]))
    torch.testing.assert_close(skip_scale.flatten(), torch.tensor([0.5, 1.5, 1.0]))
    assert h_scale.shape == (3, 1, 1, 1)


def first_concat_input(model, x, t):
    """The input of the first decoder block that reads concat(h, skip) (a block whose input is
    wider than its output), and the width of h in it."""
    blocks = [getattr(stage, "resblock", stage) for stage in model.decoder]
    block = next(b for b in blocks if b.in_channels != b.out_channels)
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    model(x, t)
    handle.remove()
    return seen["x"], block.out_channels


@pytest.mark.parametrize("cls, options", [(SongUNet, SMALL_SONG), (ADM, SMALL_ADM)])
def test_shakedrop_scales_the_decoder_concatenation(cls, options):
    plain = build(cls, (1, 8, 8), **options)
    shaken = build(cls, (1, 8, 8), **options, shakedrop=True, phi=0.75)
    shaken.load_state_dict(plain.state_dict())
    x, _ = inputs((1, 8, 8), batch=3)
    t = torch.tensor([0.0, 0.4, 1.0])
    a = (0.75 - 0.5 * t)[:, None, None, None]
    (got, h_width), (want, _) = first_concat_input(shaken, x, t), first_concat_input(plain, x, t)
    assert 0 < h_width < got.shape[1]
    torch.testing.assert_close(got[:, :h_width], 2 * a * want[:, :h_width])
    torch.testing.assert_close(got[:, h_width:], 2 * (1 - a) * want[:, h_width:])

    # phi = 1/2 makes a(t) = 1/2: both factors are 1 and the network is the plain one.
    enlarge_output_(plain)
    neutral = build(cls, (1, 8, 8), **options, shakedrop=True, phi=0.5)
    neutral.load_state_dict(plain.state_dict())
    torch.testing.assert_close(neutral(x, t), plain(x, t))


# -------------------------------------------------------------------- layers and embeddings


def test_resampling_filters():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(Resample("down", (1, 1))(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Resample("up", (1, 1))(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    # the fast path for [1, 1] equals the general depthwise-filter path
    for mode in ("down", "up"):
        box, general = Resample(mode, (1, 1)), Resample(mode, (1, 1))
        general.box = False
        torch.testing.assert_close(box(x), general(x))
    constant = torch.full((1, 2, 8, 8), 0.7)
    down, up = Resample("down", (1, 3, 3, 1)), Resample("up", (1, 3, 3, 1))
    assert down(x).shape == (2, 3, 4, 4) and up(x).shape == (2, 3, 16, 16)
    # FIR keeps a constant image constant away from the zero-padded border
    torch.testing.assert_close(down(constant)[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 0.7))
    torch.testing.assert_close(up(constant)[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 0.7))
    assert not list(down.parameters())


def test_attention_matches_the_textbook_formula():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 5, generator=generator) for _ in range(3))
    out = multi_head_attention(q, k, v, heads=2)
    for head in range(2):
        rows = slice(4 * head, 4 * head + 4)
        weights = torch.softmax(q[:, rows].transpose(1, 2) @ k[:, rows] / math.sqrt(4), dim=-1)  # [B, Nq, Nk]
        torch.testing.assert_close(out[:, rows], (weights @ v[:, rows].transpose(1, 2)).transpose(1, 2))


def test_time_embeddings():
    t = torch.tensor([0.0, 0.25, 1.0])
    # ADM: [cos(t f), sin(t f)] with f_i = 10000^(-i / half)
    embedding = timestep_embedding(t, 8, 10000.0)
    frequencies = 10000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(embedding, torch.cat([(t[:, None] * frequencies).cos(), (t[:, None] * frequencies).sin()], 1))
    # SongUNet: EDM's endpoint sinusoid (f_i = 10000^(-i / (half - 1)), from 1 down to 1e-4), sin first
    model = build(SongUNet, (1, 8, 8), **SMALL_SONG)
    frequencies = 10000.0 ** (-torch.arange(8) / 7)
    phases = t[:, None] * frequencies
    seen = {}
    handle = model.map0.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    model(torch.zeros(3, 1, 8, 8), t)
    handle.remove()
    torch.testing.assert_close(seen["x"], torch.cat([phases.sin(), phases.cos()], 1))


def test_both_backbones_are_registered_by_the_backbones_plugin():
    registry = distillkit.get_registries().backbones
    for name, cls in [("songunet", SongUNet), ("adm", ADM)]:
        entry = registry.entry(name)
        assert entry.obj is cls and entry.provider == "backbones"
        assert isinstance(build(cls, (3, 8, 8), **(SMALL_SONG if cls is SongUNet else SMALL_ADM)), distillkit.Backbone)


# ------------------------------------------------------------------- extra conditioning inputs


def build_conditioned(cls, shape, names, num_classes=None, **options):
    torch.manual_seed(0)
    return cls.build(cls.config_class(**options), DataSpec(shape, num_classes), conditioning=names).eval()


def embedding_blocks(model):
    """Every module that reads the time embedding: the residual blocks at every level."""
    return [m for m in model.modules() if type(m).__name__ in ("SongBlock", "ADMResBlock")]


def calls_with_embedding(model, x, t, **kwargs):
    seen = []
    handles = [b.register_forward_pre_hook(lambda module, args: seen.append(args[1])) for b in embedding_blocks(model)]
    model(x, t, **kwargs)
    for handle in handles:
        handle.remove()
    return seen


def t_embedding_parameters(model) -> list:
    """The learned layers ``t`` goes through after its sinusoid (the label embedding excluded)."""
    if isinstance(model, SongUNet):
        return [*model.map0.parameters(), *model.map1.parameters()]
    return list(model.time_embedding.parameters())


@pytest.mark.parametrize("cls, options", [(SongUNet, SMALL_SONG), (ADM, SMALL_ADM)])
def test_conditioning_adds_an_embedding_of_d_like_t_to_every_block(cls, options):
    plain = build(cls, (3, 8, 8), num_classes=5, **options)
    conditioned = build_conditioned(cls, (3, 8, 8), ("d",), num_classes=5, **options)
    for key, value in plain.state_dict().items():  # the plain weights are drawn as before
        assert torch.equal(conditioned.state_dict()[key], value), key
    d_embedding = conditioned.extra_embedding.inputs["d"]
    assert [p.shape for p in d_embedding.parameters()] == [p.shape for p in t_embedding_parameters(plain)]
    assert conditioned.num_parameters() == plain.num_parameters() + sum(p.numel() for p in t_embedding_parameters(plain))

    x, t = inputs((3, 8, 8), batch=3)
    labels = torch.tensor([0, 3, 4])
    d = torch.tensor([0.0, 0.3, 1.0])
    # d's sinusoid is t's: EDM's endpoint sinusoid with sin first (DDPM++), guided-diffusion's (ADM)
    half = plain.config.channels // 2
    if cls is SongUNet:
        frequencies = 10000.0 ** (-torch.arange(half) / (half - 1))
        expected_features = torch.cat([(d[:, None] * frequencies).sin(), (d[:, None] * frequencies).cos()], 1)
    else:
        frequencies = 10000.0 ** (-torch.arange(half) / half)
        expected_features = torch.cat([(d[:, None] * frequencies).cos(), (d[:, None] * frequencies).sin()], 1)
    torch.testing.assert_close(d_embedding.features(d), expected_features)

    with torch.no_grad():
        t_only = calls_with_embedding(plain, x, t, cond=labels)
        with_d = calls_with_embedding(conditioned, x, t, cond=labels, extra={"d": d})
        assert len(with_d) == len(t_only) == len(embedding_blocks(plain)) > 4
        for a, b in zip(with_d, t_only):  # every block, at every level, reads t's embedding + d's
            torch.testing.assert_close(a, b + d_embedding(d))
        # with d's last layer silenced the network is the plain one
        last = d_embedding.mlp[2]
        last.weight.zero_(), last.bias.zero_()
        assert torch.equal(conditioned(x, t, labels, extra={"d": d}), plain(x, t, labels))


@pytest.mark.parametrize("cls, options", [(SongUNet, SMALL_SONG), (ADM, SMALL_ADM)])
def test_conditioning_reaches_the_deepest_level(cls, options):
    model = build_conditioned(cls, (1, 8, 8), ("d", "r"), **options)
    enlarge_output_(model)
    x, t = inputs((1, 8, 8), batch=3)
    d, r = torch.tensor([0.1, 0.5, 0.9], requires_grad=True), torch.tensor([0.2, 0.2, 0.2])
    middle = model.middle[0] if cls is ADM else model.decoder[0]  # the first block at the deepest level, 4x4
    seen = {}
    handle = middle.register_forward_hook(lambda module, args, out: seen.__setitem__("h", out))
    model(x, t, extra={"d": d, "r": r})
    handle.remove()
    assert seen["h"].shape[2:] == (4, 4)
    (grad,) = torch.autograd.grad(seen["h"].sum(), d)
    assert (grad != 0).all()
