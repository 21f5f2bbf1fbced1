"""``songunet``: the DDPM++ U-Net (Song et al. 2021) in the form EDM calls "SongUNet".

Written from the papers: Song et al. 2021 ("Score-Based Generative Modeling through SDEs",
appendix H, DDPM++) and Karras et al. 2022 ("Elucidating the Design Space...", appendix F.2 and
table 7, which re-states DDPM++ as a configurable U-Net). No EDM or CUD code was used; the layer
layout below follows the papers' description so that the presets have the papers' sizes.

Layout (``L = len(channel_mult)`` levels, ``res`` the feature-map side at a level)::

    embedding:  t -> sinusoid(noise_channels) [+ label embedding] -> Linear -> SiLU -> Linear -> SiLU
                [+ for each extra input d: d -> sinusoid -> its own Linear -> SiLU -> Linear -> SiLU]
    encoder:    level 0: conv 3x3 (C -> channels)
                level l > 0: residual block that halves the resolution
                then num_blocks residual blocks to channels * channel_mult[l]
                (self-attention after each one when res is in attn_resolutions)
                every output above is kept as a skip
    decoder:    deepest level: residual block with attention, residual block
                level l < L-1: residual block that doubles the resolution
                then num_blocks + 1 residual blocks, each reading concat(h, skip)
                (attention after the last one when res is in attn_resolutions)
    output:     GroupNorm -> SiLU -> conv 3x3 (-> C), initialised near zero

A residual block (DDPM++, non-adaptive)::

    h = conv3x3(SiLU(GroupNorm(x)))          (resampled before the conv in down/up blocks)
    h = SiLU(GroupNorm(h + Linear(emb)))
    h = conv3x3(Dropout(h))                  (near-zero init)
    x = (skip(x) + h) / sqrt(2)              (skip: identity, or 1x1 conv [+ resample])
    attention: x = (x + proj(attn(qkv(GroupNorm(x))))) / sqrt(2)

"Prior ShakeDrop" (CUD; ``shakedrop = true``): every decoder concatenation ``[h, skip]`` becomes
``[2 a(t) h, 2 (1 - a(t)) skip]`` with ``a(t) = phi + (1 - 2 phi) t``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import distillkit
from distillkit import OUTPUT_HEADS, Backbone, DataSpec

from .edm_layout import EdmLayout
from .embeddings import (
    ExtraEmbedding,
    PositionalEmbedding,
    ScalarEmbedding,
    _is_int,
    checked_inputs,
    positive_int,
    require_data_kind,
    scale_last_layer_,
)
from .layers import (
    Resample,
    boolean,
    concat_skip,
    conv2d,
    group_norm,
    linear,
    multi_head_attention,
    optional_dropout,
    optional_positive_int_tuple,
    optional_resolution_tuple,
    pad_to_multiple,
    phi_value,
    resample_filter_value,
    shakedrop_scale,
    to_optional_float,
    to_optional_tuple,
)

#: The architecture fields a preset fills in (fields the user sets explicitly win).
SONGUNET_PRESETS: dict[str, dict] = {
    # CUD's MNIST network (fast-ode's encoder-sized SongUNet): attention at 16 is never hit at
    # 28 / 14 / 7. METHODS.md section 5: 2.16 M parameters at 1x28x28.
    "mnist": {"channels": 32, "channel_mult": (2, 2, 2), "num_blocks": 2, "attn_resolutions": (16,), "dropout": 0.13},
    # EDM's DDPM++ CIFAR-10 network, also CUD's: 55.7 M parameters at 3x32x32.
    "cifar10": {"channels": 128, "channel_mult": (2, 2, 2), "num_blocks": 4, "attn_resolutions": (16,), "dropout": 0.13},
}
PRESET_FIELDS = ("channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")


def _preset_name(instance, attribute, value) -> None:
    allowed = ("auto", *SONGUNET_PRESETS)
    if value not in allowed:
        raise distillkit.ConfigError(attribute.name, value, f"one of {', '.join(allowed)}")


def _optional_positive_even_int(instance, attribute, value) -> None:
    if value is not None and not (_is_int(value) and value > 0 and value % 2 == 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive even integer")


def _positive_number(instance, attribute, value) -> None:
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive number")


def auto_preset(data: DataSpec) -> str:
    """``preset = "auto"``: the paper's network for the data: ``mnist`` for one-channel images,
    ``cifar10`` for everything else."""
    return "mnist" if data.shape[0] == 1 else "cifar10"


@attrs.frozen
class SongUNetConfig:
    """Options of the ``songunet`` backbone.

    ``preset`` fills every architecture field left unset (``None``); a field set explicitly
    overrides the preset. ``auto`` picks the preset from the data when the network is built.
    """

    preset: str = attrs.field(default="auto", validator=_preset_name)
    #: base width (EDM ``model_channels``); also the width of the sinusoidal embedding of t
    channels: Optional[int] = attrs.field(default=None, validator=_optional_positive_even_int)
    channel_mult: Optional[tuple[int, ...]] = attrs.field(
        default=None, converter=to_optional_tuple, validator=optional_positive_int_tuple
    )
    #: residual blocks per resolution in the encoder (the decoder has one more)
    num_blocks: Optional[int] = attrs.field(default=None, validator=attrs.validators.optional(positive_int))
    #: feature-map sides at which blocks get self-attention
    attn_resolutions: Optional[tuple[int, ...]] = attrs.field(
        default=None, converter=to_optional_tuple, validator=optional_resolution_tuple
    )
    dropout: Optional[float] = attrs.field(default=None, converter=to_optional_float, validator=optional_dropout)
    #: width of the time embedding = channels * channel_mult_emb
    channel_mult_emb: int = attrs.field(default=4, validator=positive_int)
    #: max_positions of the sinusoidal embedding (EDM, endpoint=True): frequencies 1 .. 1/max_positions
    max_positions: float = attrs.field(default=10000.0, converter=to_optional_float, validator=_positive_number)
    #: taps of the separable resampling filter: [1, 1] (DDPM++) or [1, 3, 3, 1] (FIR)
    resample_filter: tuple[float, ...] = attrs.field(
        default=(1, 1), converter=to_optional_tuple, validator=resample_filter_value
    )
    #: attention heads (DDPM++: 1)
    num_heads: int = attrs.field(default=1, validator=positive_int)
    #: CUD's Prior ShakeDrop: time-dependent scaling of the decoder's concatenation
    shakedrop: bool = attrs.field(default=False, validator=boolean)
    #: a(t) = phi + (1 - 2 phi) t; 0.75 is CUD's CIFAR-10 / ImageNet-64 value
    phi: float = attrs.field(default=0.75, converter=to_optional_float, validator=phi_value)

    def __attrs_post_init__(self) -> None:
        if self.preset != "auto":
            values = SONGUNET_PRESETS[self.preset]
            for name in PRESET_FIELDS:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, values[name])
            self._check_heads()

    def _check_heads(self) -> None:
        for mult in self.channel_mult:
            if (self.channels * mult) % self.num_heads:
                raise distillkit.ConfigError(
                    "num_heads", self.num_heads, f"a divisor of every level width ({[self.channels * m for m in self.channel_mult]})"
                )

    def for_data(self, data: DataSpec) -> "SongUNetConfig":
        """This config with ``auto`` replaced by the preset the data call for."""
        if self.preset != "auto":
            return self
        return attrs.evolve(self, preset=auto_preset(data))

    @property
    def embedding_dim(self) -> int:
        return self.channels * self.channel_mult_emb


class SongPositionalEmbedding(PositionalEmbedding):
    """EDM's positional embedding as DDPM++ uses it: the halves swapped, ``[sin, cos]``."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        cos, sin = super().forward(t).chunk(2, dim=1)
        return torch.cat([sin, cos], dim=1)


def song_scalar_embedding(config: "SongUNetConfig") -> ScalarEmbedding:
    """An extra input embedded as ``SongUNet.embed`` embeds ``t``: the swapped sinusoid, then
    Linear -> SiLU -> Linear -> SiLU with DDPM++'s initialisation."""
    mlp = nn.Sequential(
        linear(config.channels, config.embedding_dim),
        nn.SiLU(),
        linear(config.embedding_dim, config.embedding_dim),
        nn.SiLU(),
    )
    return ScalarEmbedding(SongPositionalEmbedding(config.channels, config.max_positions), mlp)


class SongBlock(nn.Module):
    """A DDPM++ residual block (optionally resampling, optionally followed by self-attention)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        *,
        dropout: float,
        resample: Optional[str] = None,
        resample_filter=(1, 1),
        attention: bool = False,
        num_heads: int = 1,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm0 = group_norm(in_channels)
        self.resample = None if resample is None else Resample(resample, resample_filter)
        self.conv0 = conv2d(in_channels, out_channels, 3)
        self.affine = linear(embedding_dim, out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_channels, out_channels, 3, scale=1e-5)
        # The skip: a 1x1 projection when the width changes or the block resamples (DDPM++
        # projects resampled skips, EDM's resample_proj=True); the identity otherwise.
        self.skip = conv2d(in_channels, out_channels, 1) if (in_channels != out_channels or resample) else None
        self.num_heads = num_heads if attention else 0
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = conv2d(out_channels, out_channels * 3, 1, scale=math.sqrt(0.2))
            self.proj = conv2d(out_channels, out_channels, 1, scale=1e-5)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        skip = x
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h = self.resample(h)
            skip = self.resample(skip)
        h = self.conv0(h)
        h = F.silu(self.norm1(h + self.affine(embedding)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        if self.skip is not None:
            skip = self.skip(skip)
        x = (skip + h) * (1.0 / math.sqrt(2.0))
        if self.num_heads:
            batch, channels, height, width = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(batch, 3, channels, height * width).unbind(1)
            a = multi_head_attention(q, k, v, self.num_heads).reshape(batch, channels, height, width)
            x = (x + self.proj(a)) * (1.0 / math.sqrt(2.0))
        return x


class SongOutputBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3 to the image's channels."""

    def __init__(self, in_channels: int, out_channels: int, scale: float = 1e-5):
        super().__init__()
        self.norm = group_norm(in_channels)
        self.conv = conv2d(in_channels, out_channels, 3, scale=scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(features)))


class SongUNet(EdmLayout, Backbone):
    edm_class = "SongUNet"
    name = "songunet"
    data_kinds = frozenset({"images"})
    config_class = SongUNetConfig
    accepts_conditioning = True
    capabilities = frozenset({OUTPUT_HEADS})

    def __init__(self, config: SongUNetConfig, data: DataSpec, conditioning: tuple[str, ...] = ()):
        super().__init__()
        require_data_kind(self.name, data, images=True)
        config = config.for_data(data)
        self.config = config
        self.data = data
        in_channels, height, _ = data.shape
        levels = len(config.channel_mult)
        self.resolution_factor = 2 ** (levels - 1)
        padded = height + (-height % self.resolution_factor)
        attn = set(config.attn_resolutions)
        block = dict(
            embedding_dim=config.embedding_dim,
            dropout=config.dropout,
            resample_filter=config.resample_filter,
            num_heads=config.num_heads,
        )

        # t (and the label) -> embedding
        noise_channels = config.channels
        self.positional = SongPositionalEmbedding(noise_channels, config.max_positions)
        self.label_embedding = None if data.num_classes is None else nn.Embedding(data.num_classes, noise_channels)
        self.map0 = linear(noise_channels, config.embedding_dim)
        self.map1 = linear(config.embedding_dim, config.embedding_dim)

        # encoder; the module list is walked in order and every output is kept as a skip
        self.encoder = nn.ModuleList()
        width = config.channels
        for level, mult in enumerate(config.channel_mult):
            res = padded >> level
            if level == 0:
                self.encoder.append(conv2d(in_channels, width, 3))
            else:
                self.encoder.append(SongBlock(width, width, resample="down", **block))
            for _ in range(config.num_blocks):
                self.encoder.append(SongBlock(width, config.channels * mult, attention=res in attn, **block))
                width = config.channels * mult
        skips = [m.out_channels for m in self.encoder]

        # decoder; a block whose input is wider than h reads concat(h, skip)
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            res = padded >> level
            if level == levels - 1:
                self.decoder.append(SongBlock(width, width, attention=True, **block))
                self.decoder.append(SongBlock(width, width, **block))
            else:
                self.decoder.append(SongBlock(width, width, resample="up", **block))
            for index in range(config.num_blocks + 1):
                out = config.channels * mult
                self.decoder.append(
                    SongBlock(width + skips.pop(), out, attention=index == config.num_blocks and res in attn, **block)
                )
                width = out
        self.output_block = SongOutputBlock(width, in_channels)
        # Last, so that every weight above is drawn exactly as without conditioning.
        self.extra_embedding = ExtraEmbedding(conditioning, lambda: song_scalar_embedding(config))

    def embed(self, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        embedding = self.positional(t)
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(cond)
        return F.silu(self.map1(F.silu(self.map0(embedding))))

    def forward(
        self,
        x: torch.Tensor,
        t,
        cond: Optional[torch.Tensor] = None,
        *,
        extra: Optional[Mapping[str, torch.Tensor]] = None,
        return_features: bool = False,
    ):
        t, extra = checked_inputs(x, t, cond, self.data, extra, self.extra_embedding.names)
        batch, _, height, width = x.shape
        embedding = self.extra_embedding(self.embed(t, cond), extra)
        factors = shakedrop_scale(t, self.config.phi) if self.config.shakedrop else None

        h = pad_to_multiple(x, self.resolution_factor)
        skips = []
        for index, module in enumerate(self.encoder):
            h = module(h) if index == 0 else module(h, embedding)
            skips.append(h)
        for module in self.decoder:
            if h.shape[1] != module.in_channels:
                h = concat_skip(h, skips.pop(), factors)
            h = module(h, embedding)

        features = h[:, :, :height, :width]
        out = self.output_block(features)
        return (out, features) if return_features else out

    def make_output_head(self) -> nn.Module:
        head = SongOutputBlock(self.output_block.conv.in_channels, self.data.shape[0], scale=1.0)
        scale_last_layer_(head.conv)
        reference = self.output_block.conv.weight
        return head.to(device=reference.device, dtype=reference.dtype)
