"""``imagenet64``: ImageNet at 64x64 with its 1,000 class labels (class-conditional by default).

Two sources, looked up in ``data_root`` (the run's ``--data-root``):

- ``npz``: the downsampled-ImageNet batches of Chrabaszcz et al. 2017 (image-net.org,
  ``Imagenet64_train_part1.zip`` / ``part2.zip``): ``train_data_batch_1.npz`` ..
  ``train_data_batch_10.npz`` in ``DIR`` or in its immediate sub-folders. Each holds ``data``
  (``[N, 12288]`` uint8, every row a CHW-flattened 3x64x64 image) and ``labels`` (1..1000).
  They are read with ``numpy.load(allow_pickle=False)`` into one uint8 array: the full set is
  1,281,167 images, 15.7 GB of memory.
- ``folder``: an ImageNet-style image folder ``DIR/train/<class>/<image>`` (or
  ``DIR/<class>/<image>``) read with torchvision's ``ImageFolder``; each image is resized
  (bicubic, antialiased) so its shorter side is 64 and centre-cropped to 64x64. Labels are the
  sorted class-folder indices (for ImageNet's wnid folders that is the usual 0..999 order,
  which is *not* the order of the npz labels).

There is no download: ImageNet needs an account at image-net.org. Missing data are a one-line
``UsageError`` saying which files to put where.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import attrs
import numpy as np
import torch

import distillkit
from distillkit import DataSpec

from .images import ArrayImageDataset, boolean, data_error, first_line, to_unit_range

IMAGENET_CLASSES = 1000
IMAGE_SIZE = 64
_BATCH_NAME = re.compile(r"^train_data_batch_(\d+)\.npz$")


def _source(instance, attribute, value) -> None:
    if value not in ("auto", "npz", "folder"):
        raise distillkit.ConfigError(attribute.name, value, "auto, npz or folder")


@attrs.frozen
class ImageNet64Config:
    """Options of the ``imagenet64`` dataset."""

    #: train with labels (num_classes = 1000); items are (image, label) pairs
    class_conditional: bool = attrs.field(default=True, validator=boolean)
    #: random horizontal flip of training images (as in the CM / CUD ImageNet-64 loaders)
    hflip: bool = attrs.field(default=True, validator=boolean)
    #: where the images come from: npz batches, an image folder, or auto (npz if any are found)
    source: str = attrs.field(default="auto", validator=_source)


def find_npz_batches(root: Path) -> list[Path]:
    """``train_data_batch_<k>.npz`` in ``root`` and its immediate sub-folders, ordered by k."""
    found: dict[int, Path] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        for path in folder.iterdir():
            match = _BATCH_NAME.match(path.name)
            if match and path.is_file():
                index = int(match.group(1))
                if index in found:
                    raise data_error("imagenet64", f"two copies of train_data_batch_{index}.npz: {found[index]} and {path}")
                found[index] = path
    return [found[k] for k in sorted(found)]


def find_image_folder(root: Path) -> Optional[Path]:
    """``root/train`` if it exists, else ``root``, when it has at least one sub-folder."""
    for folder in (root / "train", root):
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            return folder
    return None


class FolderImages(torch.utils.data.Dataset):
    """An ``ImageFolder`` at 64x64, served like ``UInt8Images``: float32 in [-1, 1], optional
    label, optional random flip (global torch RNG)."""

    def __init__(self, folder, with_labels: bool, hflip: bool):
        self.folder = folder
        self.with_labels = with_labels
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.folder)

    def image(self, index: int) -> torch.Tensor:
        return to_unit_range(self.folder[index][0])

    def __getitem__(self, index: int):
        x = self.image(index)
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if not self.with_labels:
            return x
        return x, torch.tensor(self.folder.targets[index], dtype=torch.int64)


class ImageNet64(ArrayImageDataset):
    name = "imagenet64"
    config_class = ImageNet64Config
    default_backbone = "adm"
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    num_classes = IMAGENET_CLASSES

    def __init__(self, config: Optional[ImageNet64Config] = None, data_root: Optional[str] = None):
        config = config if config is not None else ImageNet64Config()
        self.folder_images: Optional[FolderImages] = None
        super().__init__(config, data_root)

    def missing_error(self):
        what = (
            "the downsampled ImageNet 64x64 batches train_data_batch_1.npz .. train_data_batch_10.npz "
            "(Imagenet64_train_part1.zip and part2.zip from https://image-net.org, extracted)"
        )
        folder = "an image folder DIR/train/<class>/<image>"
        if self.root is None:
            return data_error(self.name, f"no --data-root given: pass --data-root DIR holding {what}, or {folder}")
        source = self.config.source
        if source == "npz":
            return data_error(self.name, f"no train_data_batch_<k>.npz in {self.root} or its sub-folders: put {what} there")
        if source == "folder":
            return data_error(self.name, f"no class folders in {self.root / 'train'} or {self.root}: put the images in {self.root}/train/<class>/")
        return data_error(
            self.name, f"no data in {self.root}: put {what} there, or the images in {self.root}/train/<class>/"
        )

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.root is None or not self.root.is_dir():
            raise self.missing_error()
        if self.config.source in ("auto", "npz"):
            batches = find_npz_batches(self.root)
            if batches:
                return self.load_npz(batches)
        if self.config.source in ("auto", "folder"):
            folder = find_image_folder(self.root)
            if folder is not None:
                self.load_folder(folder)
                return torch.empty(0, *self.shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        raise self.missing_error()

    def load_npz(self, batches: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        # Two passes, so that the images go straight into one preallocated array.
        labels = [self._read_npz(path, "labels") for path in batches]
        for path, batch_labels in zip(batches, labels):
            if batch_labels.ndim != 1 or batch_labels.dtype.kind not in "iu":
                raise data_error(self.name, f"{path}: 'labels' must be a 1-D integer array; got {batch_labels.dtype} {batch_labels.shape}")
            if len(batch_labels) and (batch_labels.min() < 1 or batch_labels.max() > IMAGENET_CLASSES):
                raise data_error(self.name, f"{path}: labels run from {batch_labels.min()} to {batch_labels.max()}; expected 1 .. 1000")
        total = sum(len(batch_labels) for batch_labels in labels)
        images = torch.empty(total, IMAGE_SIZE * IMAGE_SIZE * 3, dtype=torch.uint8)
        start = 0
        for path, batch_labels in zip(batches, labels):
            data = self._read_npz(path, "data")
            if data.dtype != np.uint8 or data.shape != (len(batch_labels), IMAGE_SIZE * IMAGE_SIZE * 3):
                raise data_error(
                    self.name,
                    f"{path}: 'data' must be uint8 of shape ({len(batch_labels)}, 12288); got {data.dtype} {data.shape}",
                )
            images[start : start + len(data)] = torch.from_numpy(data)
            start += len(data)
            del data
        all_labels = torch.from_numpy(np.concatenate(labels).astype(np.int64)) - 1  # 1-based on disk
        return images.view(total, *self.shape), all_labels

    def _read_npz(self, path: Path, key: str) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise data_error(self.name, f"{path} has no '{key}' array (it holds {', '.join(archive.files) or 'nothing'})")
                return archive[key]
        except distillkit.UsageError:
            raise
        except Exception as exc:
            raise data_error(self.name, f"{path} is not a readable .npz file ({first_line(exc)})") from None

    def load_folder(self, folder: Path) -> None:
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        transform = transforms.Compose(
            [
                transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
                transforms.CenterCrop(IMAGE_SIZE),
                transforms.PILToTensor(),
            ]
        )
        try:
            images = ImageFolder(str(folder), transform=transform, loader=_rgb_loader)
        except Exception as exc:
            raise data_error(self.name, f"{folder} is not an image folder ({first_line(exc)})") from None
        if len(images.classes) > IMAGENET_CLASSES:
            raise data_error(self.name, f"{folder} has {len(images.classes)} class folders; ImageNet has 1000")
        self.folder_images = FolderImages(images, self.config.class_conditional, self.config.hflip)

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.shape, IMAGENET_CLASSES if self.config.class_conditional else None)

    def train_set(self) -> torch.utils.data.Dataset:
        if self.folder_images is not None:
            return self.folder_images
        return super().train_set()

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.folder_images is None:
            return super().reference_samples(n, generator)
        order = torch.randperm(len(self.folder_images), generator=generator, device=generator.device).cpu()
        return torch.stack([self.folder_images.image(int(i)) for i in order[:n]])


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")
