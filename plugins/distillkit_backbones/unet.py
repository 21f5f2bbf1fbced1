"""A small DDPM++-style U-Net for images ``[C, H, W]``.

Layout (``L = len(channel_mult)`` resolutions, widths ``channels * channel_mult[l]``)::

    conv_in 3x3
    levels 0 .. L-2:  blocks_per_level residual blocks -> keep as skip -> 2x2 average pool
    level  L-1:       blocks_per_level residual blocks (the bottleneck)
    levels L-2 .. 0:  nearest 2x upsample -> concat skip -> blocks_per_level residual blocks
    output block:     GroupNorm -> SiLU -> conv 3x3 to C channels

It is leaner than DDPM++ (one skip per level, no attention, parameter-free resampling) so that
it trains on CPU in minutes; the structure (residual GroupNorm/SiLU blocks with the time
embedding added in every block, encoder-decoder skips, an EDM positional embedding) is the same.

Sizes that 2^(L-1) does not divide (28 with three levels: 28 -> 14 -> 7 -> ?) are zero-padded at
the bottom/right before the network and cropped before the output block, so the output block
and any head made by ``make_output_head`` see features exactly the size of the image.

Extra scalar inputs (``build(..., conditioning=("d",))``, ``forward(..., extra={"d": d})``) are
embedded exactly like t (positional embedding, then an MLP of the same shape) and added to t's
embedding, so every residual block at every resolution reads them.
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

from .embeddings import (
    ConditionEmbedding,
    ExtraEmbedding,
    checked_inputs,
    dropout_probability,
    optional_positive_int,
    positional_scalar_embedding,
    positive_even_int,
    positive_int,
    positive_int_tuple,
    require_data_kind,
    scale_last_layer_,
    to_float,
    to_tuple,
)


@attrs.frozen
class UNetConfig:
    """Options of the ``unet`` backbone."""

    #: width of the first level (and of the positional embedding of t)
    channels: int = attrs.field(default=32, validator=positive_even_int)
    #: width multiplier per resolution; its length is the number of resolutions
    channel_mult: tuple[int, ...] = attrs.field(default=(1, 2), converter=to_tuple, validator=positive_int_tuple)
    blocks_per_level: int = attrs.field(default=1, validator=positive_int)
    dropout: float = attrs.field(default=0.0, converter=to_float, validator=dropout_probability)
    #: width of the time embedding; None means 4 * channels
    time_embedding_dim: Optional[int] = attrs.field(default=None, validator=optional_positive_int)
    num_groups: int = attrs.field(default=8, validator=positive_int)

    def __attrs_post_init__(self) -> None:
        for mult in self.channel_mult:
            if (self.channels * mult) % self.num_groups:
                raise distillkit.ConfigError(
                    "num_groups",
                    self.num_groups,
                    f"a divisor of every level width (channels * channel_mult = "
                    f"{[self.channels * m for m in self.channel_mult]})",
                )

    @property
    def embedding_dim(self) -> int:
        return self.time_embedding_dim if self.time_embedding_dim is not None else 4 * self.channels


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, num_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_projection = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(h)))
        y = y + self.embedding_projection(embedding)[:, :, None, None]
        y = self.conv2(self.dropout(F.silu(self.norm2(y))))
        # DDPM++'s skip scale: keeps the activations' variance from growing block after block.
        return (self.skip(h) + y) * (1.0 / math.sqrt(2.0))


class ImageOutputBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv to the image's channels."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(features)))


class UNet(Backbone):
    name = "unet"
    data_kinds = frozenset({"images"})
    config_class = UNetConfig
    accepts_conditioning = True
    capabilities = frozenset({OUTPUT_HEADS})

    def __init__(self, config: UNetConfig, data: DataSpec, conditioning: tuple[str, ...] = ()):
        super().__init__()
        require_data_kind(self.name, data, images=True)
        self.config = config
        self.data = data
        in_channels = data.shape[0]
        widths = [config.channels * mult for mult in config.channel_mult]
        self.resolution_factor = 2 ** (len(widths) - 1)

        def stage(first_in: int, width: int) -> nn.ModuleList:
            ins = [first_in] + [width] * (config.blocks_per_level - 1)
            return nn.ModuleList(
                ResidualBlock(i, width, config.embedding_dim, config.num_groups, config.dropout) for i in ins
            )

        self.condition_embedding = ConditionEmbedding(config.channels, config.embedding_dim, data.num_classes)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList()
        previous = widths[0]
        for width in widths[:-1]:
            self.encoder.append(stage(previous, width))
            previous = width
        self.bottleneck = stage(previous, widths[-1])
        # decoder[i] runs at level L-2-i and reads the level below it plus that level's skip.
        self.decoder = nn.ModuleList(
            stage(widths[level + 1] + widths[level], widths[level]) for level in reversed(range(len(widths) - 1))
        )
        self.output_block = ImageOutputBlock(widths[0], in_channels, config.num_groups)
        # Last, so that every weight above is drawn exactly as without conditioning.
        self.extra_embedding = ExtraEmbedding(
            conditioning, lambda: positional_scalar_embedding(config.channels, config.embedding_dim)
        )

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
        embedding = self.extra_embedding(self.condition_embedding(t, cond), extra)

        pad_h = -height % self.resolution_factor
        pad_w = -width % self.resolution_factor
        h = self.conv_in(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)

        skips = []
        for blocks in self.encoder:
            for block in blocks:
                h = block(h, embedding)
            skips.append(h)
            h = F.avg_pool2d(h, 2)
        for block in self.bottleneck:
            h = block(h, embedding)
        for blocks in self.decoder:
            h = torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, embedding)

        features = h[:, :, :height, :width]
        out = self.output_block(features)
        return (out, features) if return_features else out

    def make_output_head(self) -> nn.Module:
        head = ImageOutputBlock(self.output_block.conv.in_channels, self.data.shape[0], self.config.num_groups)
        scale_last_layer_(head.conv)
        reference = self.output_block.conv.weight
        return head.to(device=reference.device, dtype=reference.dtype)
