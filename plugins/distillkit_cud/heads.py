"""A backbone with extra output heads that share its trunk (CUD's look-ahead heads), and the
optional coupling encoder, in one module so that the trainer's optimizer, EMA and checkpoint
cover all of it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from distillkit import Backbone


class MultiHeadStudent(nn.Module):
    """Head 0 is the backbone's own output; heads 1.. read the same decoder features.

    ``forward(x, t, cond, head=k)`` returns one head's output (head 0 by default), so the module
    can stand wherever a single-output velocity network is expected; ``head="all"`` returns every
    head from one trunk pass (through ``forward``, so that a DDP or compiled wrapper sees the
    pass with gradient). ``encoder`` (CUD's coupling encoder, §2.2) is trained with the student
    but never used for sampling.
    """

    def __init__(self, backbone: Backbone, extra_heads: int, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.extra_heads = nn.ModuleList(backbone.make_output_head() for _ in range(extra_heads))
        self.encoder = encoder

    @property
    def num_heads(self) -> int:
        return 1 + len(self.extra_heads)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None, head: int | str = 0):
        if head == "all":
            return self.all_heads(x, t, cond)
        if head == 0:
            return self.backbone(x, t, cond)
        _, features = self.backbone(x, t, cond, return_features=True)
        return self.extra_heads[head - 1](features)

    def all_heads(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Every head's output from one pass of the trunk."""
        if not self.extra_heads:
            return [self.backbone(x, t, cond)]
        out, features = self.backbone(x, t, cond, return_features=True)
        return [out, *(head(features) for head in self.extra_heads)]
