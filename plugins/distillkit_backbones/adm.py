"""``adm``: the class-conditional ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat
GANs on Image Synthesis"), the network that consistency models and CUD train on ImageNet-64.

The layout follows openai/guided-diffusion's ``UNetModel`` (MIT licence, Copyright (c) 2021
OpenAI), which this module ports closely: residual blocks with scale-shift norm, residual
up/down-sampling blocks, multi-head self-attention with a fixed number of channels per head,
a sinusoidal timestep embedding and a label embedding added to the time embedding. Module
names differ from guided-diffusion's. Deviations, all deliberate:

- the layers guided-diffusion initialises to exactly zero (the last conv of every residual
  branch, every attention output projection, the output conv) start at 1e-5 x their default
  initialisation instead, so the first optimizer step already sends gradient to every layer;
- image sides that 2^(levels-1) does not divide are zero-padded and cropped back, as in the
  other built-in U-Nets;
- optional CUD "Prior ShakeDrop" scaling of the decoder's concatenations;
- optional extra scalar inputs (``conditioning=("d",)``), each embedded like the timestep (the
  same sinusoid, its own MLP of the same shape) and added to the time embedding.

Time goes in raw (t in [0, 1], no x1000), as in CUD's ImageNet-64 code.
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
    ScalarEmbedding,
    _is_int,
    checked_inputs,
    positive_int,
    require_data_kind,
    scale_last_layer_,
)
from .layers import (
    boolean,
    concat_skip,
    multi_head_attention,
    optional_dropout,
    optional_positive_int_tuple,
    optional_resolution_tuple,
    pad_to_multiple,
    phi_value,
    shakedrop_scale,
    to_optional_float,
    to_optional_tuple,
)

ADM_PRESETS: dict[str, dict] = {
    # CM / EDM / CUD ImageNet-64: 192 channels, mult (1, 2, 3, 4), 3 blocks, attention at 32, 16
    # and 8, 64 channels per head, scale-shift norm, residual up/down blocks. CUD trains it with
    # dropout 0.1 (METHODS.md section 5); CM's distilled students use 0.
    "imagenet64": {
        "channels": 192,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 3,
        "attention_resolutions": (32, 16, 8),
        "num_head_channels": 64,
        "dropout": 0.1,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
    },
}
PRESET_FIELDS = tuple(ADM_PRESETS["imagenet64"])


def _preset_name(instance, attribute, value) -> None:
    if value not in ADM_PRESETS:
        raise distillkit.ConfigError(attribute.name, value, f"one of {', '.join(ADM_PRESETS)}")


def _optional_positive_int(instance, attribute, value) -> None:
    if value is not None and not (_is_int(value) and value > 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive integer")


def _optional_bool(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise distillkit.ConfigError(attribute.name, value, "true or false")


def _positive_number(instance, attribute, value) -> None:
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive number")


@attrs.frozen
class ADMConfig:
    """Options of the ``adm`` backbone; ``preset`` fills every architecture field left unset."""

    preset: str = attrs.field(default="imagenet64", validator=_preset_name)
    #: base width (guided-diffusion ``num_channels``); the timestep sinusoid has this width too
    channels: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    channel_mult: Optional[tuple[int, ...]] = attrs.field(
        default=None, converter=to_optional_tuple, validator=optional_positive_int_tuple
    )
    #: residual blocks per level in the encoder (the decoder has one more)
    num_res_blocks: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    #: feature-map sides that get self-attention (image-side units, e.g. 32, 16, 8 at 64x64)
    attention_resolutions: Optional[tuple[int, ...]] = attrs.field(
        default=None, converter=to_optional_tuple, validator=optional_resolution_tuple
    )
    num_head_channels: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    dropout: Optional[float] = attrs.field(default=None, converter=to_optional_float, validator=optional_dropout)
    #: FiLM-like conditioning: GroupNorm(h) * (1 + scale) + shift, instead of h + emb
    use_scale_shift_norm: Optional[bool] = attrs.field(default=None, validator=_optional_bool)
    #: resample inside residual blocks (BigGAN style) instead of with a conv
    resblock_updown: Optional[bool] = attrs.field(default=None, validator=_optional_bool)
    num_groups: int = attrs.field(default=32, validator=positive_int)
    #: max_period of the timestep sinusoid: frequencies 1 .. ~1/max_period
    max_period: float = attrs.field(default=10000.0, converter=to_optional_float, validator=_positive_number)
    shakedrop: bool = attrs.field(default=False, validator=boolean)
    phi: float = attrs.field(default=0.75, converter=to_optional_float, validator=phi_value)

    def __attrs_post_init__(self) -> None:
        values = ADM_PRESETS[self.preset]
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, values[name])
        if self.channels % 2:
            raise distillkit.ConfigError("channels", self.channels, "an even integer (the timestep sinusoid pairs cos and sin)")
        if self.channels % self.num_groups:
            raise distillkit.ConfigError("num_groups", self.num_groups, f"a divisor of channels ({self.channels})")

    @property
    def embedding_dim(self) -> int:
        return 4 * self.channels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """guided-diffusion's sinusoid: ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
    )
    phases = t.to(dtype)[:, None] * frequencies[None]
    return torch.cat([phases.cos(), phases.sin()], dim=1).to(t.dtype)


class TimestepSinusoid(nn.Module):
    """``timestep_embedding`` as a module without parameters (the features of a ``ScalarEmbedding``)."""

    def __init__(self, dim: int, max_period: float):
        super().__init__()
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.max_period)


def time_embedding_mlp(channels: int, embedding_dim: int) -> nn.Sequential:
    """ADM's time-embedding MLP, Linear -> SiLU -> Linear (every block applies SiLU to its input)."""
    return nn.Sequential(nn.Linear(channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))


def adm_scalar_embedding(config: "ADMConfig") -> ScalarEmbedding:
    """An extra input embedded as ADM embeds ``t``: the same sinusoid and the same MLP."""
    return ScalarEmbedding(
        TimestepSinusoid(config.channels, config.max_period), time_embedding_mlp(config.channels, config.embedding_dim)
    )


def _near_zero(layer: nn.Module) -> nn.Module:
    scale_last_layer_(layer)
    return layer


class ADMResBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        embedding_dim: int,
        dropout: float,
        out_channels: int,
        *,
        num_groups: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.in_channels = channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.in_norm = nn.GroupNorm(num_groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _near_zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.embedding(F.silu(embedding))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class ADMAttention(nn.Module):
    """Multi-head self-attention over pixels with ``head_channels`` channels per head; the
    q/k/v channels are laid out per head as in guided-diffusion's legacy order."""

    def __init__(self, channels: int, head_channels: int, num_groups: int):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _near_zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, height * width)
        qkv = self.qkv(self.norm(flat))  # [B, heads * 3 * head_dim, N], grouped by head
        head_dim = channels // self.heads
        q, k, v = qkv.reshape(batch, self.heads, 3, head_dim, -1).unbind(2)
        a = multi_head_attention(
            q.reshape(batch, channels, -1), k.reshape(batch, channels, -1), v.reshape(batch, channels, -1), self.heads
        )
        return (flat + self.proj(a)).reshape(batch, channels, height, width)


class ADMStage(nn.Module):
    """A residual block, optionally followed by attention and / or a resampling layer (an
    up-sampling residual block or conv, called with the embedding too)."""

    def __init__(self, resblock: nn.Module, attention: Optional[nn.Module] = None, resample: Optional[nn.Module] = None):
        super().__init__()
        self.resblock = resblock
        self.attention = attention
        self.resample = resample

    @property
    def in_channels(self) -> int:
        return self.resblock.in_channels

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.resblock(h, embedding)
        if self.attention is not None:
            h = self.attention(h)
        if self.resample is not None:
            h = self.resample(h, embedding)
        return h


class ConvDownsample(nn.Module):
    """A stride-2 3x3 conv (used when ``resblock_updown = false``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(x)


class ConvUpsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (used when ``resblock_updown = false``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ADMOutputBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3 to the image's channels (last layer near zero)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, in_channels)
        self.conv = _near_zero(nn.Conv2d(in_channels, out_channels, 3, padding=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(features)))


class ADM(EdmLayout, Backbone):
    edm_class = "DhariwalUNet"
    name = "adm"
    data_kinds = frozenset({"images"})
    config_class = ADMConfig
    accepts_conditioning = True
    capabilities = frozenset({OUTPUT_HEADS})

    def __init__(self, config: ADMConfig, data: DataSpec, conditioning: tuple[str, ...] = ()):
        super().__init__()
        require_data_kind(self.name, data, images=True)
        self.config = config
        self.data = data
        in_channels, height, _ = data.shape
        levels = len(config.channel_mult)
        self.resolution_factor = 2 ** (levels - 1)
        padded = height + (-height % self.resolution_factor)
        attention_sides = set(config.attention_resolutions)
        groups = config.num_groups
        embedding_dim = config.embedding_dim

        def resblock(channels: int, out: int, **kwargs) -> ADMResBlock:
            return ADMResBlock(
                channels, embedding_dim, config.dropout, out,
                num_groups=groups, use_scale_shift_norm=config.use_scale_shift_norm, **kwargs,
            )

        def attention(channels: int, side: int) -> Optional[ADMAttention]:
            if side not in attention_sides:
                return None
            if channels % config.num_head_channels:
                raise distillkit.ConfigError(
                    "num_head_channels", config.num_head_channels,
                    f"a divisor of the width of every level with attention ({channels} at side {side})",
                )
            return ADMAttention(channels, config.num_head_channels, groups)

        self.time_embedding = time_embedding_mlp(config.channels, embedding_dim)
        self.label_embedding = None if data.num_classes is None else nn.Embedding(data.num_classes, embedding_dim)

        self.input_conv = nn.Conv2d(in_channels, config.channels * config.channel_mult[0], 3, padding=1)
        width = config.channels * config.channel_mult[0]
        skips = [width]
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(config.channel_mult):
            side = padded >> level
            for _ in range(config.num_res_blocks):
                out = config.channels * mult
                self.encoder.append(ADMStage(resblock(width, out), attention(out, side)))
                width = out
                skips.append(width)
            if level != levels - 1:
                # called as module(h, embedding) like the stages
                self.encoder.append(resblock(width, width, down=True) if config.resblock_updown else ConvDownsample(width))
                skips.append(width)

        if width % config.num_head_channels:
            raise distillkit.ConfigError(
                "num_head_channels", config.num_head_channels, f"a divisor of the middle block's width ({width})"
            )
        self.middle = nn.ModuleList(
            [resblock(width, width), ADMAttention(width, config.num_head_channels, groups), resblock(width, width)]
        )

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            side = padded >> level
            for index in range(config.num_res_blocks + 1):
                out = config.channels * mult
                block = resblock(width + skips.pop(), out)
                width = out
                resample = None
                if level and index == config.num_res_blocks:
                    resample = resblock(width, width, up=True) if config.resblock_updown else ConvUpsample(width)
                self.decoder.append(ADMStage(block, attention(width, side), resample))
        self.output_block = ADMOutputBlock(width, in_channels, groups)
        # Last, so that every weight above is drawn exactly as without conditioning.
        self.extra_embedding = ExtraEmbedding(conditioning, lambda: adm_scalar_embedding(config))

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
        embedding = self.time_embedding(timestep_embedding(t, self.config.channels, self.config.max_period))
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(cond)
        embedding = self.extra_embedding(embedding, extra)
        factors = shakedrop_scale(t, self.config.phi) if self.config.shakedrop else None

        h = self.input_conv(pad_to_multiple(x, self.resolution_factor))
        skips = [h]
        for stage in self.encoder:
            h = stage(h, embedding)
            skips.append(h)
        h = self.middle[0](h, embedding)
        h = self.middle[1](h)
        h = self.middle[2](h, embedding)
        for stage in self.decoder:
            h = stage(concat_skip(h, skips.pop(), factors), embedding)

        features = h[:, :, :height, :width]
        out = self.output_block(features)
        return (out, features) if return_features else out

    def make_output_head(self) -> nn.Module:
        head = ADMOutputBlock(self.output_block.conv.in_channels, self.data.shape[0], self.config.num_groups)
        reference = self.output_block.conv.weight
        return head.to(device=reference.device, dtype=reference.dtype)
