"""``mnist`` and ``fashion-mnist``: 60,000 28x28 grey-scale training images in the IDX format.

Files are looked up in ``data_root`` (the run's ``--data-root``), in two layouts:

- flat: ``DIR/train-images-idx3-ubyte.gz`` and ``DIR/train-labels-idx1-ubyte.gz`` (as the
  original sites, ``../shared/data/mnist`` and Debian's ``dataset-fashion-mnist`` ship them);
- torchvision's: ``DIR/MNIST/raw/`` (``DIR/FashionMNIST/raw/``), as ``download=True`` leaves it.

Each file may be gzipped (``.gz``) or not. Only the two training files are read; the test files
may be present or not. Gzipped files are decompressed into a temporary directory with
torchvision's ``extract_archive`` and parsed with torchvision's IDX readers, so a read-only
data directory works. No hash is checked: gzip files re-compressed by a mirror or a distribution
differ byte for byte from the originals; the parsed arrays are checked instead (shape
``[N, 28, 28]`` uint8, ``N`` labels in 0..9).

Nothing is downloaded unless ``download = true``; then torchvision downloads the four files into
``DIR/MNIST/raw`` (``DIR/FashionMNIST/raw``). Missing files without ``download`` are a one-line
``UsageError`` naming the files and where to put them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Optional

import attrs
import torch
import torchvision.datasets as tv_datasets
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from .images import ArrayImageDataset, boolean, data_error, first_line, to_unit_range

IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"


@attrs.frozen
class IdxConfig:
    """Options of the ``mnist`` and ``fashion-mnist`` datasets."""

    #: train with labels (num_classes = 10); items become (image, label) pairs
    class_conditional: bool = attrs.field(default=False, validator=boolean)
    #: let torchvision download the files into --data-root when they are not there
    download: bool = attrs.field(default=False, validator=boolean)


def find_file(folder: Path, base: str) -> Optional[Path]:
    """``folder/base`` or ``folder/base.gz``, whichever exists (the plain file first)."""
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


class IdxDataset(ArrayImageDataset):
    """Shared by ``mnist`` and ``fashion-mnist``; subclasses name the torchvision class."""

    config_class = IdxConfig
    default_backbone = "songunet"
    shape = (1, 28, 28)
    num_classes = 10
    #: the torchvision dataset class: its folder name (``DIR/<name>/raw``) and its download
    torchvision_class: ClassVar[type]
    #: folders searched when no --data-root is given (system-wide installs)
    system_folders: ClassVar[tuple[str, ...]] = ()
    #: what the error message suggests for getting the files
    source_hint: ClassVar[str] = ""
    #: how ``classifier_fd``'s small classifier is trained on these images
    classifier_settings: ClassVar[dict[str, Any]]

    def __init__(self, config: Optional[IdxConfig] = None, data_root: Optional[str] = None):
        super().__init__(config if config is not None else IdxConfig(), data_root)

    def folders(self, root: Path) -> list[Path]:
        return [root, root / self.torchvision_class.__name__ / "raw"]

    def find(self) -> Optional[tuple[Path, Path]]:
        roots = [self.root] if self.root is not None else [Path(p) for p in self.system_folders]
        for root in roots:
            for folder in self.folders(root):
                images, labels = find_file(folder, IMAGES_FILE), find_file(folder, LABELS_FILE)
                if images is not None and labels is not None:
                    return images, labels
        return None

    def missing_error(self):
        files = f"{IMAGES_FILE}.gz and {LABELS_FILE}.gz (IDX, gzipped or not)"
        raw = f"{self.torchvision_class.__name__}/raw"
        if self.root is None:
            where = " or ".join(self.system_folders) if self.system_folders else ""
            return data_error(
                self.name,
                f"no --data-root given{' and nothing in ' + where if where else ''}: pass --data-root DIR "
                f"with {files} in DIR or DIR/{raw}{self.source_hint}, or add "
                f"--set dataset_options.download=true to let torchvision download them into DIR",
            )
        return data_error(
            self.name,
            f"training files not found: put {files} in {self.root} or {self.root / raw}{self.source_hint}, "
            f"or set dataset_options.download=true to let torchvision download them there",
        )

    def download(self) -> None:
        if self.root is None:
            raise data_error(self.name, "dataset_options.download=true needs --data-root DIR to download into")
        try:
            self.torchvision_class(root=str(self.root), train=True, download=True)
        except Exception as exc:  # network errors come in many types; the user needs one line
            raise data_error(
                self.name,
                f"downloading into {self.root} failed ({first_line(exc)}); "
                f"put {IMAGES_FILE}.gz and {LABELS_FILE}.gz in {self.root} by hand",
            ) from None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.find()
        if found is None and self.config.download:
            self.download()
            found = self.find()
        if found is None:
            raise self.missing_error()
        images_path, labels_path = found
        with tempfile.TemporaryDirectory(prefix="distillkit-idx-") as scratch:
            images = self._read(images_path, scratch, read_image_file)
            labels = self._read(labels_path, scratch, read_label_file)
        if images.dim() != 3 or tuple(images.shape[1:]) != self.shape[1:]:
            raise data_error(self.name, f"{images_path} holds images of shape {tuple(images.shape[1:])}; expected 28x28")
        if len(images) != len(labels):
            raise data_error(self.name, f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
        return images.unsqueeze(1).contiguous(), labels.to(torch.int64)

    def classifier_recipe(self) -> Optional[dict[str, Any]]:
        return dict(self.classifier_settings)

    def labelled_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images in [-1, 1] and their labels, in file order (whether or not this
        dataset trains with labels)."""
        return to_unit_range(self.images), self.labels.clone()

    def _read(self, path: Path, scratch: str, reader) -> torch.Tensor:
        try:
            plain = extract_archive(str(path), scratch) if path.suffix == ".gz" else str(path)
            return reader(plain)
        except Exception as exc:  # gzip, IDX magic, shape or dtype problems: all one line
            raise data_error(self.name, f"{path} is not a readable IDX file ({first_line(exc)})") from None


class Mnist(IdxDataset):
    name = "mnist"
    torchvision_class = tv_datasets.MNIST
    source_hint = " (from https://yann.lecun.com/exdb/mnist/ or a torchvision mirror)"
    classifier_settings = {"epochs": 3, "batch_size": 128, "lr": 2e-3}


class FashionMnist(IdxDataset):
    name = "fashion-mnist"
    torchvision_class = tv_datasets.FashionMNIST
    # Debian / Ubuntu: apt-get install dataset-fashion-mnist puts the four .gz files here.
    system_folders = ("/usr/share/datasets/fashion-mnist",)
    source_hint = " (from https://github.com/zalandoresearch/fashion-mnist or the Debian package dataset-fashion-mnist)"
    classifier_settings = {"epochs": 5, "batch_size": 128, "lr": 2e-3}
