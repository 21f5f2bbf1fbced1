"""The contract every dataset must satisfy, as a reusable pytest test base, and writers of small
files in the real formats of the built-in file-backed datasets.

A plugin that registers a dataset checks it with::

    from distillkit.testing.datasets import DatasetConformance

    class TestMyDataset(DatasetConformance):
        dataset_name = "my-data"          # a registered name ...
        # dataset_class = MyData          # ... or the class itself (registered or not)

        def data_root(self, name, folder):  # a dataset that reads files: write small ones here
            write_my_files(folder)
            return str(folder)

or, to check several datasets, with a fixture named ``dataset_name`` in the test module (as
``MethodConformance`` does). ``options(name)`` gives ``dataset_options``; a config with a boolean
``class_conditional`` is checked both ways.

What is checked, for each dataset:

- its options are an attrs class whose defaults flatten into scalar MLflow params and come back
  unchanged through TOML; its ``default_backbone`` is registered;
- ``spec`` is a ``DataSpec``; ``train_set`` items collate with torch's default collate into a
  ``Batch`` whose ``x`` is float32 of ``spec.shape`` (images in [-1, 1]) and whose ``cond`` holds
  integer labels in ``[0, num_classes)`` exactly when ``spec.num_classes`` is set;
- ``reference_samples(n, generator)``: at most ``n`` samples of ``spec.shape``, finite, the same
  for the same generator seed;
- ``classifier_recipe()`` is None or a dict with positive ``epochs``, ``batch_size`` and ``lr``;
  with a recipe, ``labelled_images()`` gives images of ``spec.shape`` in [-1, 1] and integer
  labels, one per image, the same on every call, and in the order of the class-conditional
  training set (each image equal to that item's image, or its mirror image under random flips).
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import tomllib
from pathlib import Path
from typing import ClassVar, Optional

import attrs
import numpy as np
import pytest
import tomli_w
import torch

from ..config import build_attrs, flatten, to_dict
from ..contracts import Batch, DataSpec, Dataset
from ..plugin_manager import get_registries

_MLFLOW_SCALARS = (str, int, float, bool)

# ------------------------------------------------------------------------------------------------
# Writers of the real file formats (the files mnist, fashion-mnist, cifar10 and imagenet64 read)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: magic (0, 0, type 0x08 = uint8, number of dims), big-endian int32 dims, data."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
    return header + array.tobytes()


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, *, gz: bool = True) -> None:
    """``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for base, array in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)]:
        data = idx_bytes(array)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / base).write_bytes(data)


def small_mnist(n: int = 12, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 images ``[n, size, size]`` and labels in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def cifar_images(n: int, seed: int) -> np.ndarray:
    """``n`` random CIFAR-10 rows: uint8 ``[n, 3072]``, channel-major (R plane, G plane, B plane)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar(folder: Path, per_batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five python pickle batches (protocol 2, like the real files) and batches.meta; returns all
    rows and labels in batch order. Read them with ``verify_checksums = false``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for k in range(1, 6):
        data = cifar_images(per_batch, seed + k)
        batch_labels = [int(v) for v in np.random.default_rng(100 + k).integers(0, 10, per_batch)]
        batch = {"batch_label": f"training batch {k} of 5", "labels": batch_labels, "data": data,
                 "filenames": [f"img_{k}_{i}.png" for i in range(per_batch)]}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
        rows.append(data)
        labels += batch_labels
    meta = {"num_cases_per_batch": 10000, "label_names": ["airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(rows), np.array(labels)


def write_npz(path: Path, n: int, seed: int, first_label: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet batch: ``data`` uint8 ``[n, 12288]`` (CHW rows) and ``labels``
    from ``first_label`` (1-based in the real files) to 1000."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
    labels = rng.integers(first_label, 1001, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=data, labels=labels, mean=data.mean(0))
    return data, labels


# ------------------------------------------------------------------------------------------------
# The conformance base


def _loader(data: torch.utils.data.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
    # torch's default collate, as the trainer's loader uses it; no shuffling, so items keep order
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


class DatasetConformance:
    """Subclass as ``class TestX(DatasetConformance)`` and name the dataset (see module docstring)."""

    dataset_name: ClassVar[Optional[str]] = None
    dataset_class: ClassVar[Optional[type]] = None

    batch_size: ClassVar[int] = 4
    reference_n: ClassVar[int] = 5
    #: how many labelled images are compared with the training set's items
    aligned_items: ClassVar[int] = 8

    # -- hooks ----------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        cls = type(self)
        name = cls.dataset_class.name if isinstance(cls.dataset_class, type) else cls.dataset_name
        if isinstance(name, str) and "dataset_name" in metafunc.fixturenames:
            metafunc.parametrize("dataset_name", [name], ids=[name], scope="class")

    def options(self, name: str) -> dict:
        """``dataset_options`` for the dataset named ``name`` (default: none, its defaults)."""
        return {}

    def data_root(self, name: str, folder: Path) -> Optional[str]:
        """The ``--data-root`` to build with; a dataset that reads files writes small ones into the
        empty ``folder`` here and returns it. Default: None (the dataset needs no files)."""
        return None

    def dataset_cls(self, name: str) -> type:
        cls = type(self)
        if isinstance(cls.dataset_class, type) and cls.dataset_class.name == name:
            return cls.dataset_class
        return get_registries().datasets.get(name)

    def option_sets(self, name: str) -> list[dict]:
        """The options each check runs with: ``options(name)``, and the same with
        ``class_conditional`` flipped when the config has that boolean field."""
        base = dict(self.options(name))
        fields = attrs.fields_dict(self.dataset_cls(name).config_class)
        if "class_conditional" not in fields:
            return [base]
        current = base.get("class_conditional", fields["class_conditional"].default)
        if not isinstance(current, bool):
            return [base]
        return [base, {**base, "class_conditional": not current}]

    def make(self, name: str, folder: Path, options: Optional[dict] = None) -> Dataset:
        cls = self.dataset_cls(name)
        folder.mkdir(parents=True, exist_ok=True)
        root = self.data_root(name, folder)
        values = dict(self.options(name) if options is None else options)
        return cls(build_attrs(cls.config_class, values, "dataset_options."), root)

    def datasets(self, name: str, folder: Path) -> list[Dataset]:
        return [self.make(name, folder / f"options{i}", options) for i, options in enumerate(self.option_sets(name))]

    # -- the contract ---------------------------------------------------------------------------

    def test_options_flatten_into_mlflow_params_and_round_trip_through_toml(self, dataset_name):
        cls = self.dataset_cls(dataset_name)
        assert issubclass(cls, Dataset) and cls.name == dataset_name
        assert attrs.has(cls.config_class), "config_class must be an attrs class"
        defaults = cls.config_class()
        tree = to_dict(defaults)
        for key, value in flatten({"dataset_options": tree}).items():
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, _MLFLOW_SCALARS) for v in values), f"{key}={value!r} is not an MLflow param"
        text = tomli_w.dumps({k: v for k, v in tree.items() if v is not None})
        assert build_attrs(cls.config_class, tomllib.loads(text), "dataset_options.") == defaults
        assert cls.default_backbone in get_registries().backbones, f"default_backbone {cls.default_backbone} is not registered"

    def test_spec_describes_the_samples(self, dataset_name, tmp_path):
        for dataset in self.datasets(dataset_name, tmp_path):
            spec = dataset.spec
            assert isinstance(spec, DataSpec)
            assert isinstance(spec.shape, tuple) and spec.shape and all(isinstance(n, int) and n > 0 for n in spec.shape)
            assert len(spec.shape) in (1, 3), "samples are vectors [D] or images [C, H, W]"
            assert spec.num_classes is None or (isinstance(spec.num_classes, int) and spec.num_classes > 1)

    def test_train_set_items_collate_into_batches(self, dataset_name, tmp_path):
        for dataset in self.datasets(dataset_name, tmp_path):
            spec, train = dataset.spec, dataset.train_set()
            assert len(train) >= 1
            size = min(self.batch_size, len(train))
            batch = Batch.from_item(next(iter(_loader(train, size))))
            assert batch.x.shape == (size, *spec.shape), f"batch of shape {tuple(batch.x.shape)} for {spec}"
            assert batch.x.dtype == torch.float32 and torch.isfinite(batch.x).all()
            if spec.is_image:
                assert batch.x.min() >= -1 and batch.x.max() <= 1, "images must lie in [-1, 1]"
            if spec.num_classes is None:
                assert batch.cond is None, "unconditional data must not carry labels"
            else:
                assert batch.cond is not None and batch.cond.shape == (size,), "labels are lost"
                assert not batch.cond.dtype.is_floating_point and batch.cond.dtype != torch.bool
                assert batch.cond.min() >= 0 and batch.cond.max() < spec.num_classes

    def test_reference_samples_are_shaped_and_seeded(self, dataset_name, tmp_path):
        for dataset in self.datasets(dataset_name, tmp_path):
            spec, n = dataset.spec, self.reference_n
            first = dataset.reference_samples(n, torch.Generator().manual_seed(3))
            again = dataset.reference_samples(n, torch.Generator().manual_seed(3))
            assert isinstance(first, torch.Tensor) and first.dim() == 1 + len(spec.shape)
            assert 1 <= first.shape[0] <= n and tuple(first.shape[1:]) == spec.shape
            assert torch.isfinite(first).all() and first.dtype.is_floating_point
            if spec.is_image:
                assert first.min() >= -1 and first.max() <= 1, "images must lie in [-1, 1]"
            assert torch.equal(first, again), "the same generator seed must give the same samples"
            assert dataset.reference_samples(1, torch.Generator().manual_seed(3)).shape == (1, *spec.shape)

    def test_classifier_recipe_and_labelled_images(self, dataset_name, tmp_path):
        for dataset in self.datasets(dataset_name, tmp_path):
            recipe = dataset.classifier_recipe()
            if recipe is None:
                continue
            assert isinstance(recipe, dict)
            for key in ("epochs", "batch_size"):
                assert isinstance(recipe.get(key), int) and not isinstance(recipe[key], bool) and recipe[key] > 0, key
            assert isinstance(recipe.get("lr"), float) and math.isfinite(recipe["lr"]) and recipe["lr"] > 0

            images, labels = dataset.labelled_images()
            spec = dataset.spec
            assert images.dtype == torch.float32 and tuple(images.shape[1:]) == spec.shape
            assert spec.is_image, "the classifier is a CNN: labelled images must be images"
            assert images.min() >= -1 and images.max() <= 1
            assert labels.shape == (images.shape[0],) and labels.dtype == torch.int64 and len(labels) >= 1
            assert labels.min() >= 0
            if spec.num_classes is not None:
                assert labels.max() < spec.num_classes
            again_images, again_labels = dataset.labelled_images()
            assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
            self.check_aligned_with_the_training_set(dataset, images, labels)

    def check_aligned_with_the_training_set(self, dataset: Dataset, images: torch.Tensor, labels: torch.Tensor
                                            ) -> None:
        if dataset.spec.num_classes is None:
            return  # the unconditional train set has no labels to align with; the other option set does
        train = dataset.train_set()
        assert len(train) == len(images), "labelled_images must hold every training image"
        k = min(self.aligned_items, len(train))
        batch = Batch.from_item(next(iter(_loader(train, k))))
        assert torch.equal(batch.cond.long(), labels[:k]), "labels are not in the training set's order"
        for i in range(k):
            x = batch.x[i]
            assert torch.equal(images[i], x) or torch.equal(images[i], x.flip(-1)), f"image {i} is not item {i}"


__all__ = [
    "DatasetConformance",
    "cifar_images",
    "idx_bytes",
    "small_mnist",
    "write_cifar",
    "write_idx",
    "write_npz",
]
