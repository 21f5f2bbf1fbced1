"""A residual MLP for vector data ``[D]`` (the 2-D toy mixtures).

Layout::

    input:         Linear(D, hidden)
    layers times:  h + Linear(Dropout(SiLU(Linear(SiLU(LayerNorm(h))) + time embedding)))
    output block:  LayerNorm -> SiLU -> Linear(hidden, D)

The output block mirrors the U-Net's (normalise -> SiLU -> project), so a head from
``make_output_head`` reads the same residual stream ``h`` that ``return_features=True`` returns.
The time embedding (EDM sinusoidal of the raw t, plus a label embedding when the data have
classes, then an MLP) is added inside every block rather than concatenated to the input, so
that every depth sees t directly. Extra scalar inputs (``conditioning=("d",)``) are embedded
the same way, each with its own MLP, and added to t's embedding.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from distillkit import OUTPUT_HEADS, Backbone, DataSpec

from .embeddings import (
    ConditionEmbedding,
    ExtraEmbedding,
    checked_inputs,
    dropout_probability,
    positional_scalar_embedding,
    positive_even_int,
    positive_int,
    require_data_kind,
    scale_last_layer_,
    to_float,
)


@attrs.frozen
class MLPConfig:
    """Options of the ``mlp`` backbone."""

    hidden: int = attrs.field(default=128, validator=positive_int)
    #: number of residual blocks
    layers: int = attrs.field(default=3, validator=positive_int)
    time_embedding_dim: int = attrs.field(default=64, validator=positive_even_int)
    dropout: float = attrs.field(default=0.0, converter=to_float, validator=dropout_probability)


class ResidualMLPBlock(nn.Module):
    def __init__(self, hidden: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.embedding_projection = nn.Linear(embedding_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.embedding_projection(embedding)
        return h + self.fc2(self.dropout(F.silu(y)))


class VectorOutputBlock(nn.Module):
    """LayerNorm -> SiLU -> Linear(hidden, D)."""

    def __init__(self, hidden: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(self.norm(features)))


class MLP(Backbone):
    name = "mlp"
    data_kinds = frozenset({"vectors"})
    config_class = MLPConfig
    accepts_conditioning = True
    capabilities = frozenset({OUTPUT_HEADS})

    def __init__(self, config: MLPConfig, data: DataSpec, conditioning: tuple[str, ...] = ()):
        super().__init__()
        require_data_kind(self.name, data, images=False)
        self.config = config
        self.data = data
        (dim,) = data.shape
        self.condition_embedding = ConditionEmbedding(
            config.time_embedding_dim, config.time_embedding_dim, data.num_classes
        )
        self.input_projection = nn.Linear(dim, config.hidden)
        self.blocks = nn.ModuleList(
            ResidualMLPBlock(config.hidden, config.time_embedding_dim, config.dropout) for _ in range(config.layers)
        )
        self.output_block = VectorOutputBlock(config.hidden, dim)
        # Last, so that every weight above is drawn exactly as without conditioning.
        self.extra_embedding = ExtraEmbedding(
            conditioning, lambda: positional_scalar_embedding(config.time_embedding_dim, config.time_embedding_dim)
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
        embedding = self.extra_embedding(self.condition_embedding(t, cond), extra)
        h = self.input_projection(x)
        for block in self.blocks:
            h = block(h, embedding)
        out = self.output_block(h)
        return (out, h) if return_features else out

    def make_output_head(self) -> nn.Module:
        head = VectorOutputBlock(self.config.hidden, self.data.shape[0])
        scale_last_layer_(head.linear)
        reference = self.output_block.linear.weight
        return head.to(device=reference.device, dtype=reference.dtype)
