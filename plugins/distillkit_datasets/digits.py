"""``digits``: the 1,797 real 8x8 handwritten digits that ship with scikit-learn.

No download: ``sklearn.datasets.load_digits`` reads a file inside the scikit-learn package, so
this dataset works offline and ignores ``data_root``. Pixel values are integers 0..16 and are
mapped to [-1, 1] by ``x / 8 - 1``.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch
from sklearn.datasets import load_digits

import distillkit
from distillkit import DataSpec, Dataset

DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10
DIGITS_MAX_VALUE = 16.0
#: how ``classifier_fd``'s small classifier is trained on the digits (1,797 images: many epochs)
DIGITS_CLASSIFIER_RECIPE = {"epochs": 20, "batch_size": 64, "lr": 2e-3}


class SampleTensorDataset(torch.utils.data.TensorDataset):
    """A TensorDataset whose items follow ``distillkit.Dataset``'s contract.

    ``TensorDataset(x)[i]`` is the 1-tuple ``(x[i],)``; the contract wants the bare tensor for
    unconditional data and an ``(x, label)`` pair for labelled data, which this returns.
    """

    def __getitem__(self, index):
        items = super().__getitem__(index)
        return items[0] if len(items) == 1 else items


def _bool(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise distillkit.ConfigError(attribute.name, value, "true or false")


@attrs.frozen
class DigitsConfig:
    """Options of the ``digits`` dataset."""

    #: train with labels (num_classes = 10); items become (image, label) pairs
    class_conditional: bool = attrs.field(default=False, validator=_bool)


def load_scaled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All images as float32 ``[1797, 1, 8, 8]`` in [-1, 1], and their int64 labels ``[1797]``."""
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, *DIGITS_SHAPE)
    images = images / (DIGITS_MAX_VALUE / 2) - 1.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


class Digits(Dataset):
    name = "digits"
    config_class = DigitsConfig
    default_backbone = "unet"
    data_kind = "images"

    def __init__(self, config: Optional[DigitsConfig] = None, data_root: Optional[str] = None):
        super().__init__(config if config is not None else DigitsConfig(), data_root)
        self.images, self.labels = load_scaled_digits()

    @property
    def spec(self) -> DataSpec:
        return DataSpec(DIGITS_SHAPE, DIGITS_CLASSES if self.config.class_conditional else None)

    def train_set(self) -> torch.utils.data.Dataset:
        if self.config.class_conditional:
            return SampleTensorDataset(self.images, self.labels)
        return SampleTensorDataset(self.images)

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``min(n, 1797)`` distinct real images, chosen by ``generator``."""
        order = torch.randperm(len(self.images), generator=generator, device=generator.device).cpu()
        return self.images[order[:n]].clone()

    def classifier_recipe(self) -> Optional[dict[str, Any]]:
        return dict(DIGITS_CLASSIFIER_RECIPE)

    def labelled_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1,797 images in [-1, 1] and their labels, in scikit-learn's order (whether or not
        this dataset trains with labels)."""
        return self.images.clone(), self.labels.clone()
