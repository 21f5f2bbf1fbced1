"""Every registered dataset against distillkit's dataset contract (distillkit.testing.datasets).

The file-backed datasets read small files this module writes in the real formats (IDX, CIFAR-10
pickle batches, downsampled-ImageNet npz); nothing is downloaded. The classifier capability of
``digits``, ``mnist`` and ``fashion-mnist`` is checked against what ``distillkit.classifier``
read through the class-conditional training set before the datasets provided it.
"""

from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import classifier
from distillkit.testing.datasets import DatasetConformance, small_mnist, write_cifar, write_idx, write_npz

DATASETS = sorted(distillkit.get_registries().datasets.names())

OPTIONS = {
    "toy2d": {"train_size": 64},
    "cifar10": {"verify_checksums": False},
}


def write_files(name: str, folder: Path) -> str | None:
    """Small files in the real format of each file-backed built-in dataset; None for the others."""
    if name in ("mnist", "fashion-mnist"):
        write_idx(folder, *small_mnist(n=12, seed=len(name)))
    elif name == "cifar10":
        write_cifar(folder / "cifar-10-batches-py", per_batch=2)
    elif name == "imagenet64":
        write_npz(folder / "train_data_batch_1.npz", 6, 0)
    else:
        return None
    return str(folder)


@pytest.fixture
def no_download(monkeypatch):
    import torchvision.datasets as tv

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for cls in (tv.MNIST, tv.FashionMNIST, tv.CIFAR10):
        monkeypatch.setattr(cls, "download", refuse)


@pytest.fixture(params=DATASETS)
def dataset_name(request, no_download):
    return request.param


class TestEveryRegisteredDataset(DatasetConformance):
    def options(self, name):
        return OPTIONS.get(name, {})

    def data_root(self, name, folder):
        return write_files(name, folder)


# ------------------------------------------------------------------- the classifier capability

#: what distillkit.classifier.RECIPES held when the recipes moved onto the datasets
EXPECTED_RECIPES = {
    "digits": {"epochs": 20, "batch_size": 64, "lr": 2e-3},
    "mnist": {"epochs": 3, "batch_size": 128, "lr": 2e-3},
    "fashion-mnist": {"epochs": 5, "batch_size": 128, "lr": 2e-3},
}


def built(name: str, folder: Path, **options):
    cls = distillkit.get_registries().datasets.get(name)
    root = write_files(name, folder)
    return cls(cls.config_class(**{**OPTIONS.get(name, {}), **options}), root), root


@pytest.mark.parametrize("name", DATASETS)
def test_exactly_the_classifier_datasets_have_a_recipe(name, tmp_path, no_download):
    dataset, _ = built(name, tmp_path)
    assert dataset.classifier_recipe() == EXPECTED_RECIPES.get(name)
    core_table = getattr(classifier, "RECIPES", {})  # the core's table, while it still has one
    if name in core_table:
        assert dataset.classifier_recipe() == core_table[name]
    if dataset.classifier_recipe() is None:
        with pytest.raises(NotImplementedError):
            dataset.labelled_images()


def labelled_images_as_the_classifier_read_them(name: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``distillkit.classifier.labelled_images`` returned before the datasets provided them:
    the class-conditional training set read in order through a DataLoader. The classifier's cache
    file name hashes these tensors, so they must not change by a bit."""
    cls = distillkit.get_registries().datasets.get(name)
    config = cls.config_class(**{**OPTIONS.get(name, {}), "class_conditional": True})
    loader = torch.utils.data.DataLoader(cls(config, root).train_set(), batch_size=4096, shuffle=False)
    images, labels = [], []
    for item in loader:
        batch = distillkit.Batch.from_item(item)
        images.append(batch.x.float())
        labels.append(batch.cond.long())
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("name", sorted(EXPECTED_RECIPES))
@pytest.mark.parametrize("class_conditional", [False, True])
def test_labelled_images_are_what_the_classifier_read_before(name, class_conditional, tmp_path, no_download):
    dataset, root = built(name, tmp_path, class_conditional=class_conditional)
    images, labels = dataset.labelled_images()
    expected_images, expected_labels = labelled_images_as_the_classifier_read_them(name, root)
    assert images.dtype == expected_images.dtype and labels.dtype == expected_labels.dtype
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    # a copy: a caller that changes it cannot change the dataset
    images.add_(1), labels.add_(1)
    assert torch.equal(dataset.labelled_images()[0], expected_images)


def test_mnist_labelled_images_are_the_files_pixels_scaled(tmp_path, no_download):
    pixels, raw_labels = small_mnist(n=12, seed=len("mnist"))
    dataset, _ = built("mnist", tmp_path)
    images, labels = dataset.labelled_images()
    expected = torch.as_tensor(pixels, dtype=torch.float64)[:, None] / 127.5 - 1
    torch.testing.assert_close(images.double(), expected)
    assert labels.tolist() == raw_labels.tolist()
