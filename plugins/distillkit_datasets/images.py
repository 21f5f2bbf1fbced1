"""What the file-backed image datasets share: uint8 storage scaled to [-1, 1] on access, random
horizontal flips, labels, reference samples, config checks and the one-line data errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import torch

import distillkit
from distillkit import DataSpec, Dataset


def boolean(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise distillkit.ConfigError(attribute.name, value, "true or false")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 to float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.to(torch.float32) / 127.5 - 1.0


def data_error(dataset: str, message: str) -> distillkit.UsageError:
    """The one-line error a user sees for missing or broken data files."""
    return distillkit.UsageError(f"dataset {dataset}: {message}")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and its message with line breaks folded, shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UInt8Images(torch.utils.data.Dataset):
    """Images stored as uint8 ``[N, C, H, W]``, served as float32 in [-1, 1].

    Items follow ``distillkit.Dataset``'s contract: a bare tensor, or ``(image, label)`` when
    ``labels`` is given. With ``hflip`` every access flips the image left-right with probability
    1/2, drawn from the global torch RNG (so a seeded run is reproducible, as with torchvision's
    ``RandomHorizontalFlip``). ``__getitems__`` serves a whole batch with one indexing operation;
    ``DataLoader`` uses it when present.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, hflip: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}]; got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.hflip = hflip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        x = to_unit_range(self.images[index])
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x if self.labels is None else (x, self.labels[index])

    def __getitems__(self, indices: list[int]) -> list:
        index = torch.as_tensor(indices, dtype=torch.long)
        x = to_unit_range(self.images[index])
        if self.hflip:
            flip = torch.rand(len(index)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.labels is None:
            return list(x.unbind(0))
        return list(zip(x.unbind(0), self.labels[index].unbind(0)))


class ArrayImageDataset(Dataset):
    """A dataset held in memory as uint8 images and int64 labels, loaded by ``load()`` when the
    dataset is constructed (so missing or broken files fail before any network is built).

    Its config needs ``class_conditional`` and may have ``hflip``.
    """

    data_kind = "images"

    shape: ClassVar[tuple[int, int, int]]
    num_classes: ClassVar[int]

    def __init__(self, config, data_root: Optional[str] = None):
        super().__init__(config, data_root)
        images, labels = self.load()
        if images.shape[1:] != self.shape:
            raise data_error(self.name, f"images have shape {tuple(images.shape[1:])}; expected {self.shape}")
        if labels.shape != (images.shape[0],):
            raise data_error(self.name, f"{images.shape[0]} images but {labels.shape[0]} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise data_error(
                self.name, f"labels run from {int(labels.min())} to {int(labels.max())}; expected 0 .. {self.num_classes - 1}"
            )
        self.images = images
        self.labels = labels

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[N, C, H, W]`` and int64 labels ``[N]`` (0-based); raises a one-line
        ``UsageError`` when the files are missing or malformed."""
        raise NotImplementedError

    @property
    def root(self) -> Optional[Path]:
        return Path(self.data_root).expanduser() if self.data_root else None

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.shape, self.num_classes if self.config.class_conditional else None)

    def train_set(self) -> torch.utils.data.Dataset:
        labels = self.labels if self.config.class_conditional else None
        return UInt8Images(self.images, labels, hflip=getattr(self.config, "hflip", False))

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``min(n, N)`` distinct training images (never flipped), chosen by ``generator``."""
        order = torch.randperm(len(self.images), generator=generator, device=generator.device).cpu()
        return to_unit_range(self.images[order[:n]])
