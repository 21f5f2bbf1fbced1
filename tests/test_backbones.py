"""The built-in backbones: shapes, features and heads, conditioning, time broadcasting, sizes."""

from __future__ import annotations

import pytest
import torch

import distillkit
from distillkit import DataSpec
from distillkit_backbones import MLP, UNet
from distillkit_backbones.mlp import MLPConfig
from distillkit_backbones.unet import UNetConfig

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def build(cls, shape, num_classes=None, **options):
    torch.manual_seed(0)
    config = cls.config_class(**options)
    return cls.build(config, DataSpec(shape, num_classes)).eval()


def inputs(shape, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator), torch.rand(batch, generator=generator)


# Every shape a test runs on: the three image sizes, an odd size that needs padding with three
# levels (28 -> 14 -> 7 -> 4 padded), and vectors.
CASES = [
    *[(UNet, shape, {}) for shape in IMAGE_SHAPES],
    (UNet, (1, 28, 28), {"channel_mult": [1, 2, 2, 2], "channels": 16}),
    (UNet, (2, 7, 5), {"channel_mult": (1, 2, 2)}),
    (MLP, (2,), {}),
    (MLP, (5,), {"hidden": 32, "layers": 1}),
]
CASE_IDS = [f"{cls.name}-{'x'.join(map(str, shape))}-{i}" for i, (cls, shape, _) in enumerate(CASES)]


@pytest.mark.parametrize("cls, shape, options", CASES, ids=CASE_IDS)
def test_output_and_features_shapes_and_output_block_reads_features(cls, shape, options):
    model = build(cls, shape, **options)
    x, t = inputs(shape)
    out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()

    out_again, features = model(x, t, return_features=True)
    assert torch.equal(out_again, out)
    assert features.shape[0] == x.shape[0]
    if cls is UNet:
        # features are at the image's own resolution, even when the input was padded
        assert features.shape[2:] == x.shape[2:]
    # The network's output is exactly its output block applied to the features it returns.
    torch.testing.assert_close(model.output_block(features), out, rtol=0, atol=0)


@pytest.mark.parametrize("cls, shape, options", CASES, ids=CASE_IDS)
def test_new_output_head_has_same_structure_and_starts_near_zero(cls, shape, options):
    model = build(cls, shape, **options)
    x, t = inputs(shape)
    out, features = model(x, t, return_features=True)
    head = model.make_output_head()
    assert head is not model.output_block
    assert type(head) is type(model.output_block)
    assert [p.shape for p in head.parameters()] == [p.shape for p in model.output_block.parameters()]

    head_out = head(features)
    assert head_out.shape == x.shape
    assert head_out.abs().max() < 1e-3 * max(out.abs().max().item(), 1.0)
    assert head_out.abs().max() > 0  # near zero, not dead: gradients still flow through it

    # The head is trainable on its own and reaches x's shape after an update too.
    head_out.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("cls, shape", [(UNet, (1, 8, 8)), (MLP, (2,))])
def test_class_labels_change_the_output_and_are_required(cls, shape):
    model = build(cls, shape, num_classes=10)
    x, t = inputs(shape, batch=4)
    zeros = torch.zeros(4, dtype=torch.long)
    sevens = torch.full((4,), 7, dtype=torch.long)
    assert not torch.allclose(model(x, t, zeros), model(x, t, sevens))
    # Same label, same output: the label is the only thing that changed above.
    torch.testing.assert_close(model(x, t, sevens), model(x, t, sevens.clone()))

    with pytest.raises(ValueError, match="class-conditional.*cond"):
        model(x, t)
    with pytest.raises(ValueError, match="shape"):
        model(x, t, torch.zeros(3, dtype=torch.long))

    unconditional = build(cls, shape)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, zeros)


@pytest.mark.parametrize("cls, shape", [(UNet, (1, 8, 8)), (MLP, (2,))])
def test_scalar_time_broadcasts_like_a_per_sample_time(cls, shape):
    model = build(cls, shape)
    x, _ = inputs(shape, batch=5)
    per_sample = model(x, torch.full((5,), 0.3))
    torch.testing.assert_close(model(x, 0.3), per_sample)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), per_sample)
    torch.testing.assert_close(model(x, torch.full((5, 1), 0.3)), per_sample)
    # and the time matters
    assert not torch.allclose(model(x, 0.7), per_sample)
    with pytest.raises(ValueError, match="one time per sample"):
        model(x, torch.rand(4))


def test_samples_in_a_batch_are_independent():
    # GroupNorm normalises per sample, so a sample's output must not depend on its batch-mates.
    model = build(UNet, (1, 8, 8))
    x, t = inputs((1, 8, 8), batch=4)
    torch.testing.assert_close(model(x[:1], t[:1]), model(x, t)[:1], rtol=1e-5, atol=1e-6)


def test_parameter_counts_at_defaults_are_in_the_expected_band():
    unet = build(UNet, (1, 8, 8))
    assert 100_000 <= unet.num_parameters() <= 200_000
    assert unet.num_parameters() == sum(p.numel() for p in unet.parameters())
    # only the input and output convolutions depend on the image; the size does not matter
    assert build(UNet, (1, 28, 28)).num_parameters() == unet.num_parameters()
    assert build(UNet, (3, 32, 32)).num_parameters() > unet.num_parameters()
    assert 50_000 <= build(MLP, (2,)).num_parameters() <= 200_000


@pytest.mark.parametrize("cls, shape", [(UNet, (1, 8, 8)), (UNet, (1, 28, 28)), (MLP, (2,))])
def test_gradient_reaches_every_parameter(cls, shape):
    model = build(cls, shape, num_classes=3).train()
    x, t = inputs(shape, batch=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x, t, labels)
    (out - x).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_dropout_is_active_in_training_only():
    model = build(UNet, (1, 8, 8), dropout=0.5)
    x, t = inputs((1, 8, 8))
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_configs_check_their_values():
    assert UNetConfig(channel_mult=[1, 2, 2]).channel_mult == (1, 2, 2)  # lists become tuples
    assert UNetConfig().embedding_dim == 128
    assert UNetConfig(time_embedding_dim=64).embedding_dim == 64
    assert MLPConfig(dropout=0).dropout == 0.0
    bad = [
        (UNetConfig, {"channels": 0}),
        (UNetConfig, {"channels": 31, "num_groups": 1}),  # odd: the sinusoidal embedding needs pairs
        (UNetConfig, {"channel_mult": ()}),
        (UNetConfig, {"channel_mult": (1, 0)}),
        (UNetConfig, {"blocks_per_level": 0}),
        (UNetConfig, {"dropout": 1.0}),
        (UNetConfig, {"time_embedding_dim": -4}),
        (UNetConfig, {"num_groups": 5}),  # does not divide 32
        (MLPConfig, {"hidden": 0}),
        (MLPConfig, {"layers": True}),
        (MLPConfig, {"time_embedding_dim": 63}),
        (MLPConfig, {"dropout": -0.1}),
    ]
    for config_class, options in bad:
        with pytest.raises(distillkit.ConfigError) as caught:
            config_class(**options)
        assert caught.value.option in options


def test_backbones_refuse_data_of_the_wrong_kind():
    with pytest.raises(ValueError, match="image"):
        UNet.build(UNetConfig(), DataSpec((2,)))
    with pytest.raises(ValueError, match="vector"):
        MLP.build(MLPConfig(), DataSpec((1, 8, 8)))
    model = build(UNet, (1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 1, 9, 9), torch.zeros(2))


def test_both_backbones_are_registered_by_the_backbones_plugin():
    registry = distillkit.get_registries().backbones
    for name, cls in [("unet", UNet), ("mlp", MLP)]:
        entry = registry.entry(name)
        assert entry.obj is cls
        assert entry.provider == "backbones"
        model = entry.obj.build(entry.obj.config_class(), DataSpec((1, 8, 8) if name == "unet" else (2,)))
        assert isinstance(model, distillkit.Backbone)


# ------------------------------------------------------------------- extra conditioning inputs


def conditioned_pair(cls, shape, **options):
    """The same network built without and with a conditioning input ``d``, from the same seed."""
    return build(cls, shape, **options), build_conditioned(cls, shape, ("d",), **options)


def build_conditioned(cls, shape, names, num_classes=None, **options):
    torch.manual_seed(0)
    return cls.build(cls.config_class(**options), DataSpec(shape, num_classes), conditioning=names).eval()


def block_embeddings(model, blocks, x, t, **kwargs):
    """The time embedding each block in ``blocks`` is called with, in call order."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda module, args: seen.append(args[1])) for b in blocks]
    model(x, t, **kwargs)
    for handle in handles:
        handle.remove()
    return seen


def sinusoid(values, channels):
    """EDM's positional embedding written out: [cos(v f_i), sin(v f_i)], f_i = 10000^(-i / (half - 1))."""
    half = channels // 2
    frequencies = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / (half - 1))
    phases = values.double()[:, None] * frequencies
    return torch.cat([phases.cos(), phases.sin()], dim=1).float()


@pytest.mark.parametrize("cls, shape", [(UNet, (1, 8, 8)), (MLP, (2,))])
def test_a_conditioned_network_is_the_plain_one_plus_an_embedding_of_d_added_to_t(cls, shape):
    plain, conditioned = conditioned_pair(cls, shape)
    # Every weight of the plain network is drawn exactly as before (the new ones come last) ...
    plain_state, state = plain.state_dict(), conditioned.state_dict()
    for key, value in plain_state.items():
        assert torch.equal(state[key], value), key
    new = [key for key in state if key not in plain_state]
    assert new and all(key.startswith("extra_embedding.inputs.d.") for key in new)
    # ... and d gets an MLP of exactly the shape t goes through.
    t_mlp, d_mlp = plain.condition_embedding.mlp, conditioned.extra_embedding.inputs["d"].mlp
    assert [p.shape for p in d_mlp.parameters()] == [p.shape for p in t_mlp.parameters()]
    assert conditioned.num_parameters() == plain.num_parameters() + sum(p.numel() for p in t_mlp.parameters())

    x, t = inputs(shape, batch=4)
    d = torch.tensor([0.0, 0.125, 0.5, 1.0])
    blocks = list(plain.blocks) if cls is MLP else [m for m in plain.modules() if type(m).__name__ == "ResidualBlock"]
    conditioned_blocks = [dict(conditioned.named_modules())[n] for n, m in plain.named_modules() if m in blocks]
    with torch.no_grad():
        t_embedding = block_embeddings(plain, blocks, x, t)[0]
        expected = t_embedding + d_mlp(sinusoid(d, d_mlp[0].in_features))
        for seen in block_embeddings(conditioned, conditioned_blocks, x, t, extra={"d": d}):
            torch.testing.assert_close(seen, expected)
        # With d's MLP silenced the network is the plain one, bit for bit.
        d_mlp[2].weight.zero_(), d_mlp[2].bias.zero_()
        assert torch.equal(conditioned(x, t, extra={"d": d}), plain(x, t))


def test_unet_conditioning_reaches_every_resolution_not_only_the_output():
    # Three resolutions, 8 -> 4 -> 2: d must reach the blocks at the bottleneck, not only the
    # layers next to the output.
    model = build_conditioned(UNet, (1, 8, 8), ("d",), channel_mult=[1, 2, 2])
    x, t = inputs((1, 8, 8), batch=3)
    d = torch.tensor([0.1, 0.4, 0.9], requires_grad=True)

    bottleneck = {}
    handle = model.bottleneck[-1].register_forward_hook(lambda module, args, out: bottleneck.__setitem__("h", out))
    out = model(x, t, extra={"d": d})
    handle.remove()
    assert bottleneck["h"].shape[2:] == (2, 2)
    (grad_out,) = torch.autograd.grad(out.sum(), d, retain_graph=True)
    (grad_bottleneck,) = torch.autograd.grad(bottleneck["h"].sum(), d)
    assert (grad_out != 0).all() and (grad_bottleneck != 0).all()

    # Changing d changes the embedding of every block at every level and the bottleneck features.
    blocks = [m for m in model.modules() if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 5  # two encoder levels, the bottleneck, two decoder levels
    with torch.no_grad():
        first = block_embeddings(model, blocks, x, t, extra={"d": d.detach()})
        second = block_embeddings(model, blocks, x, t, extra={"d": 1.0 - d.detach()})
        for a, b in zip(first, second):
            assert not torch.allclose(a, b)
        features = []
        handle = model.bottleneck[-1].register_forward_hook(lambda module, args, out: features.append(out))
        model(x, t, extra={"d": d.detach()}), model(x, t, extra={"d": 1.0 - d.detach()})
        handle.remove()
    assert not torch.allclose(features[0], features[1], atol=1e-4)


def test_two_conditioning_inputs_are_embedded_separately_and_checked():
    model = build_conditioned(MLP, (2,), ("d", "r"), num_classes=3)
    x, t = inputs((2,), batch=3)
    labels = torch.tensor([0, 1, 2])
    d, r = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    with torch.no_grad():
        both = model(x, t, labels, extra={"d": d, "r": r})
        # d and r are not interchangeable: each has its own embedding
        assert not torch.allclose(both, model(x, t, labels, extra={"d": r, "r": d}))
    with pytest.raises(ValueError, match=r"missing conditioning input\(s\) \['r'\]"):
        model(x, t, labels, extra={"d": d})
    with pytest.raises(ValueError, match=r"unknown conditioning input\(s\) \['s'\]"):
        model(x, t, labels, extra={"d": d, "r": r, "s": r})
    with pytest.raises(ValueError, match=r"extra\['d'\] must be a tensor of shape \[3\]"):
        model(x, t, labels, extra={"d": 0.5, "r": r})
    with pytest.raises(ValueError, match="identifiers"):
        build_conditioned(MLP, (2,), ("d.x",))
    with pytest.raises(ValueError, match="distinct"):
        build_conditioned(MLP, (2,), ("d", "d"))


def test_wrong_kind_of_data_is_a_one_line_config_error():
    with pytest.raises(distillkit.ConfigError) as caught:
        UNet.build(UNetConfig(), DataSpec((2,)))
    assert caught.value.option == "backbone" and "\n" not in str(caught.value)
    assert "needs image data [C, H, W]; the data have shape (2,)" in str(caught.value)
