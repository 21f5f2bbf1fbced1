"""The class labels of evaluated samples: label i depends only on the seed of sample i."""

from __future__ import annotations

import torch

#: Added to a sample's seed for its class label, so the label stream is not the noise stream.
_LABEL_SEED_OFFSET = 0x5DEECE66D


def class_labels(n: int, num_classes: int, seed: int, *, start: int = 0) -> torch.Tensor:
    """Labels of samples ``start .. start + n - 1``, uniform over ``num_classes``; label i drawn
    from its own generator seeded from ``seed + i``, so it does not depend on the batch size."""
    generator = torch.Generator()
    out = torch.empty(n, dtype=torch.int64)
    for j in range(n):
        generator.manual_seed((seed + start + j + _LABEL_SEED_OFFSET) % (2**63 - 1))
        out[j] = torch.randint(num_classes, (1,), generator=generator)
    return out


def labels_for(spec, n: int, seed: int):
    """``class_labels`` for class-conditional data (``spec.num_classes``), else None."""
    return class_labels(n, spec.num_classes, seed) if spec.num_classes else None
