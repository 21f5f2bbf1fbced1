"""The file-backed datasets ``mnist``, ``fashion-mnist``, ``cifar10`` and ``imagenet64``.

Every test writes its own small files in the real formats (IDX, gzipped or not; CIFAR-10 python
pickle batches; downsampled-ImageNet .npz batches; an image folder) and never downloads. One test
reads the real MNIST files of ``../shared/data/mnist`` and is skipped where they are absent.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import distillkit
from distillkit.cli.main import main
from distillkit.testing.datasets import cifar_images, idx_bytes, small_mnist, write_cifar, write_idx, write_npz
from distillkit_datasets import (
    CIFAR10Config,
    Cifar10,
    FashionMnist,
    IdxConfig,
    ImageNet64,
    ImageNet64Config,
    Mnist,
    UInt8Images,
)
from distillkit_datasets import cifar10 as cifar10_module
from distillkit_datasets.cifar10 import pickle_imports_problem

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def pixels_to_unit(array) -> torch.Tensor:
    return torch.as_tensor(np.array(array), dtype=torch.float64) / 127.5 - 1


def one_line_usage_error(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, distillkit.UsageError)
    assert "\n" not in message and message.startswith("dataset ")
    return message


# ------------------------------------------------------------------------------ IDX writers


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test."""
    import torchvision.datasets as tv

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for cls in (tv.MNIST, tv.FashionMNIST, tv.CIFAR10):
        monkeypatch.setattr(cls, "download", refuse)


# ------------------------------------------------------------------------------ MNIST family


@pytest.mark.parametrize("cls", [Mnist, FashionMnist])
@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw", "torchvision-raw-gz"])
def test_idx_files_are_read_in_either_layout(tmp_path, cls, layout, no_download):
    images, labels = small_mnist()
    folder = tmp_path if layout == "flat-gz" else tmp_path / cls.torchvision_class.__name__ / "raw"
    write_idx(folder, images, labels, gz=layout != "torchvision-raw")

    dataset = cls(IdxConfig(), str(tmp_path))
    assert dataset.spec == distillkit.DataSpec((1, 28, 28), None)
    assert cls.default_backbone == "songunet"
    train = dataset.train_set()
    assert len(train) == 12
    first = train[0]
    assert isinstance(first, torch.Tensor) and first.shape == (1, 28, 28) and first.dtype == torch.float32
    everything = torch.stack([train[i] for i in range(12)])
    torch.testing.assert_close(everything.double(), pixels_to_unit(images)[:, None])
    assert torch.equal(dataset.labels, torch.as_tensor(labels, dtype=torch.int64))


def test_class_conditional_mnist_yields_pairs_and_batches(tmp_path):
    images, labels = small_mnist(n=20)
    write_idx(tmp_path, images, labels)
    dataset = Mnist(IdxConfig(class_conditional=True), str(tmp_path))
    assert dataset.spec.num_classes == 10
    image, label = dataset.train_set()[3]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64 and label.item() == labels[3]
    x, y = next(iter(torch.utils.data.DataLoader(dataset.train_set(), batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and torch.equal(y, torch.as_tensor(labels[:8], dtype=torch.int64))
    torch.testing.assert_close(x.double(), pixels_to_unit(images[:8])[:, None])


def test_mnist_reference_samples_are_distinct_training_images(tmp_path):
    images, labels = small_mnist(n=30)
    write_idx(tmp_path, images, labels)
    dataset = Mnist(None, str(tmp_path))
    samples = dataset.reference_samples(10, torch.Generator().manual_seed(0))
    assert samples.shape == (10, 1, 28, 28)
    rows = {tuple(r) for r in images.reshape(30, -1).tolist()}
    picked = [tuple(r) for r in ((samples.double() + 1) * 127.5).round().reshape(10, -1).int().tolist()]
    assert all(r in rows for r in picked) and len(set(picked)) == 10
    assert torch.equal(samples, dataset.reference_samples(10, torch.Generator().manual_seed(0)))
    assert dataset.reference_samples(100, torch.Generator().manual_seed(1)).shape == (30, 1, 28, 28)


@pytest.mark.parametrize("cls", [Mnist, FashionMnist])
def test_missing_idx_files_are_one_line_naming_files_and_folders(tmp_path, cls, no_download):
    with pytest.raises(distillkit.UsageError) as caught:
        cls(IdxConfig(), str(tmp_path))
    message = one_line_usage_error(caught)
    for text in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(tmp_path),
                 f"{cls.torchvision_class.__name__}/raw", "download=true"]:
        assert text in message
    # only one of the two files: still missing
    images, labels = small_mnist()
    write_idx(tmp_path, images, labels)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(distillkit.UsageError, match="not found"):
        cls(IdxConfig(), str(tmp_path))


def test_without_data_root_mnist_says_to_pass_one(no_download):
    with pytest.raises(distillkit.UsageError) as caught:
        Mnist(IdxConfig(), None)
    assert "--data-root DIR" in one_line_usage_error(caught)
    with pytest.raises(distillkit.UsageError, match="needs --data-root"):
        Mnist(IdxConfig(download=True), None)


def test_download_option_asks_torchvision_and_reports_failure_in_one_line(tmp_path, monkeypatch):
    images, labels = small_mnist()
    calls = []

    class FakeMNIST:
        __name__ = "MNIST"

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_idx(Path(root) / "MNIST" / "raw", images, labels, gz=False)  # what torchvision leaves

    monkeypatch.setattr(Mnist, "torchvision_class", type("MNIST", (), {"__init__": FakeMNIST.__init__}))
    dataset = Mnist(IdxConfig(download=True), str(tmp_path))
    assert calls == [(str(tmp_path), True, True)] and len(dataset.train_set()) == 12
    Mnist(IdxConfig(download=True), str(tmp_path))  # present now: no second download
    assert len(calls) == 1

    def offline(self, root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n<urlopen error>")

    monkeypatch.setattr(Mnist, "torchvision_class", type("MNIST", (), {"__init__": offline}))
    with pytest.raises(distillkit.UsageError) as caught:
        Mnist(IdxConfig(download=True), str(tmp_path / "elsewhere"))
    message = one_line_usage_error(caught)
    assert "downloading into" in message and "urlopen error" in message


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncated-gzip", "not a readable IDX file"),
        ("not-idx", "not a readable IDX file"),
        ("short-data", "not a readable IDX file"),
        ("wrong-size", "expected 28x28"),
        ("count-mismatch", "12 images but"),
        ("bad-label", "labels run from"),
    ],
)
def test_broken_idx_files_are_one_line_errors(tmp_path, damage, match):
    images, labels = small_mnist()
    if damage == "wrong-size":
        images, _ = small_mnist(size=32)
    if damage == "count-mismatch":
        labels = labels[:10]
    if damage == "bad-label":
        labels[4] = 10
    write_idx(tmp_path, images, labels)
    image_file = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncated-gzip":
        image_file.write_bytes(image_file.read_bytes()[:200])
    if damage == "not-idx":
        image_file.write_bytes(gzip.compress(b"<html>not found</html>" * 10))
    if damage == "short-data":
        image_file.write_bytes(gzip.compress(idx_bytes(images)[:-100]))
    with pytest.raises(distillkit.UsageError, match=match) as caught:
        Mnist(IdxConfig(), str(tmp_path))
    one_line_usage_error(caught)


@pytest.mark.skipif(not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="real MNIST files absent")
def test_real_mnist_files():
    dataset = Mnist(IdxConfig(class_conditional=True), str(REAL_MNIST))
    train = dataset.train_set()
    assert len(train) == 60_000
    x = torch.cat([torch.stack([item[0] for item in train.__getitems__(list(range(start, start + 10_000)))])
                   for start in range(0, 60_000, 10_000)])
    assert x.shape == (60_000, 1, 28, 28) and x.min() == -1.0 and x.max() == 1.0
    # the README's class counts and mean pixel
    assert torch.bincount(dataset.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs((x.double().mean().item() + 1) / 2 - 0.1307) < 1e-3
    image, label = train[59_999]
    assert image.shape == (1, 28, 28) and label.item() == dataset.labels[-1].item()


# ------------------------------------------------------------------------------ CIFAR-10


UNCHECKED = CIFAR10Config(verify_checksums=False)


@pytest.mark.parametrize("flat", [False, True])
def test_cifar_batches_are_read_in_channel_major_order(tmp_path, flat):
    rows, labels = write_cifar(tmp_path if flat else tmp_path / "cifar-10-batches-py")
    dataset = Cifar10(CIFAR10Config(verify_checksums=False, hflip=False), str(tmp_path))
    assert dataset.spec == distillkit.DataSpec((3, 32, 32), None)
    assert Cifar10.default_backbone == "songunet" and CIFAR10Config().hflip  # the recipe flips
    train = dataset.train_set()
    assert len(train) == 15
    images = torch.stack([train[i] for i in range(15)])
    # each row holds the red plane, then green, then blue, each row-major 32x32
    torch.testing.assert_close(images.double(), pixels_to_unit(rows).reshape(15, 3, 32, 32))
    assert torch.equal(dataset.labels, torch.as_tensor(labels))
    assert (tmp_path / ("" if flat else "cifar-10-batches-py") / "data_batch_1").is_file()


def test_cifar_class_conditional_and_horizontal_flip(tmp_path):
    rows, labels = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=8)
    originals = torch.from_numpy(rows).reshape(40, 3, 32, 32).float() / 127.5 - 1  # the dataset's float32 arithmetic
    dataset = Cifar10(CIFAR10Config(verify_checksums=False, class_conditional=True), str(tmp_path))
    assert dataset.spec.num_classes == 10
    train = dataset.train_set()
    torch.manual_seed(0)
    one_at_a_time = [train[i] for i in range(40)]  # __getitem__
    batched = list(torch.utils.data.DataLoader(train, batch_size=8))  # __getitems__
    for items in [one_at_a_time, [(x, y) for xs, ys in batched for x, y in zip(xs, ys)]]:
        flipped = 0
        for i, (x, y) in enumerate(items):
            assert y.item() == labels[i]
            if torch.equal(x, originals[i].flip(-1)):
                flipped += 1
            else:
                assert torch.equal(x, originals[i])
        assert 5 <= flipped <= 35  # about half: both kinds occur
    # without the option nothing is flipped; reference samples are never flipped
    plain = Cifar10(CIFAR10Config(verify_checksums=False, hflip=False), str(tmp_path)).train_set()
    assert torch.equal(torch.stack([plain[i] for i in range(40)]), originals)
    refs = dataset.reference_samples(40, torch.Generator().manual_seed(0))
    assert sorted(map(tuple, refs.reshape(40, -1).tolist())) == sorted(map(tuple, originals.reshape(40, -1).tolist()))


def test_uint8_images_getitem_and_getitems_agree_without_flip():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    data = UInt8Images(images, labels)
    batch = data.__getitems__([4, 1, 1])
    for (x, y), i in zip(batch, [4, 1, 1]):
        assert torch.equal(x, data[i][0]) and y.item() == i
    assert data[0][0].min() >= -1 and data[0][0].max() <= 1
    with pytest.raises(ValueError):
        UInt8Images(images.float())


def fake_expected(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest())
            for p in folder.iterdir() if p.name in cifar10_module.REQUIRED_FILES}


def test_cifar_checksums_are_verified_by_default(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    # the real table: the tiny test files have the wrong size, refused before any unpickling
    with pytest.raises(distillkit.UsageError) as caught:
        Cifar10(CIFAR10Config(), str(tmp_path))
    message = one_line_usage_error(caught)
    assert "data_batch_1" in message and "31,035,704" in message

    # a table computed from the test files: they pass, then one changed byte fails the MD5
    monkeypatch.setattr(cifar10_module, "EXPECTED_FILES", fake_expected(folder))
    assert len(Cifar10(CIFAR10Config(), str(tmp_path)).train_set()) == 15
    data = bytearray((folder / "data_batch_3").read_bytes())
    data[-20] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(data))
    with pytest.raises(distillkit.UsageError, match="data_batch_3 has the right size but not the MD5") as caught:
        Cifar10(CIFAR10Config(), str(tmp_path))
    one_line_usage_error(caught)


def test_cifar_files_larger_than_the_real_ones_are_refused_unchecked(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    caps = {name: size - 1 for name, (size, _) in fake_expected(folder).items()}
    monkeypatch.setattr(cifar10_module, "MAX_UNCHECKED_SIZE", caps)
    with pytest.raises(distillkit.UsageError, match="more than a CIFAR-10 data_batch_1 can hold") as caught:
        Cifar10(UNCHECKED, str(tmp_path))
    one_line_usage_error(caught)


class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_a_pickle_that_imports_anything_else_is_never_unpickled(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    target = tmp_path / "pwned"
    batch = {"labels": [1], "data": cifar_images(1, 0), "extra": _Payload(target)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(distillkit.UsageError, match="data_batch_2 imports .*mkdir; refusing to unpickle") as caught:
        Cifar10(UNCHECKED, str(tmp_path))
    one_line_usage_error(caught)
    assert not target.exists()
    # protocol 4+ imports through STACK_GLOBAL: refused too
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(distillkit.UsageError, match="refusing to unpickle"):
        Cifar10(UNCHECKED, str(tmp_path))
    assert not target.exists()
    # not a pickle at all
    (folder / "data_batch_2").write_bytes(b"<html>404</html>")
    with pytest.raises(distillkit.UsageError, match="not a valid pickle"):
        Cifar10(UNCHECKED, str(tmp_path))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_batches_pass_the_format_check_in_every_protocol(protocol):
    batch = {"labels": [1, 2], "data": cifar_images(2, 0), "filenames": [b"a", "b"]}
    assert pickle_imports_problem(pickle.dumps(batch, protocol=protocol)) is None


def test_cifar_batches_with_wrong_contents_are_one_line_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_4").write_bytes(pickle.dumps({"labels": [1, 2], "data": cifar_images(2, 0)[:, :100]}, protocol=2))
    with pytest.raises(distillkit.UsageError, match="could not be read") as caught:
        Cifar10(UNCHECKED, str(tmp_path))
    one_line_usage_error(caught)
    (folder / "data_batch_4").write_bytes(pickle.dumps({"labels": [1], "data": cifar_images(2, 0)}, protocol=2))
    with pytest.raises(distillkit.UsageError, match="images but"):
        Cifar10(UNCHECKED, str(tmp_path))


def test_missing_cifar_files_are_one_line_and_nothing_is_downloaded(tmp_path, no_download):
    with pytest.raises(distillkit.UsageError) as caught:
        Cifar10(CIFAR10Config(), str(tmp_path))
    message = one_line_usage_error(caught)
    for text in ["data_batch_1", "batches.meta", str(tmp_path / "cifar-10-batches-py"), "download=true"]:
        assert text in message
    with pytest.raises(distillkit.UsageError, match="--data-root DIR"):
        Cifar10(CIFAR10Config(), None)


# ------------------------------------------------------------------------------ ImageNet-64


def test_imagenet64_npz_batches_in_subfolders_are_read_in_batch_order(tmp_path):
    d10, l10 = write_npz(tmp_path / "Imagenet64_train_part2" / "train_data_batch_10.npz", 2, 10)
    d2, l2 = write_npz(tmp_path / "Imagenet64_train_part1" / "train_data_batch_2.npz", 3, 2)
    d1, l1 = write_npz(tmp_path / "Imagenet64_train_part1" / "train_data_batch_1.npz", 1, 1)
    dataset = ImageNet64(ImageNet64Config(hflip=False), str(tmp_path))
    assert dataset.spec == distillkit.DataSpec((3, 64, 64), 1000)  # class-conditional by default
    assert ImageNet64.default_backbone == "adm"
    train = dataset.train_set()
    assert len(train) == 6
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=6)))
    want = pixels_to_unit(np.concatenate([d1, d2, d10])).reshape(6, 3, 64, 64)
    torch.testing.assert_close(x.double(), want)
    assert torch.equal(y, torch.as_tensor(np.concatenate([l1, l2, l10]) - 1))  # 1-based on disk
    assert dataset.reference_samples(4, torch.Generator().manual_seed(0)).shape == (4, 3, 64, 64)

    unconditional = ImageNet64(ImageNet64Config(class_conditional=False), str(tmp_path))
    assert unconditional.spec.num_classes is None and isinstance(unconditional.train_set()[0], torch.Tensor)


@pytest.mark.parametrize(
    "contents, match",
    [
        ({"data": np.zeros((2, 12288), np.uint8)}, "no 'labels' array"),
        ({"data": np.zeros((2, 12288), np.uint8), "labels": np.array([0, 5])}, "labels run from 0"),
        ({"data": np.zeros((2, 3, 64, 64), np.uint8), "labels": np.array([1, 5])}, "'data' must be uint8 of shape"),
        ({"data": np.zeros((2, 12288), np.float32), "labels": np.array([1, 5])}, "'data' must be uint8"),
        ({"data": np.array([{"x": 1}], dtype=object), "labels": np.array([1])}, "not a readable .npz"),
    ],
)
def test_broken_imagenet64_npz_files_are_one_line_errors(tmp_path, contents, match):
    np.savez(tmp_path / "train_data_batch_1.npz", **contents)
    with pytest.raises(distillkit.UsageError, match=match) as caught:
        ImageNet64(ImageNet64Config(), str(tmp_path))
    one_line_usage_error(caught)


def test_imagenet64_image_folder_is_resized_and_labelled(tmp_path):
    rng = np.random.default_rng(0)
    for wnid, size in [("n01440764", (100, 80)), ("n01443537", (64, 64)), ("n01484850", (40, 130))]:
        folder = tmp_path / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i}.png")
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(tmp_path / "train" / "n01443537" / "grey.png")
    dataset = ImageNet64(ImageNet64Config(), str(tmp_path))
    train = dataset.train_set()
    assert len(train) == 7
    labels = []
    for i in range(7):
        x, y = train[i]
        assert x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1
        labels.append(y.item())
    assert labels == [0, 0, 1, 1, 1, 2, 2]  # sorted class folders
    # an image already 64x64 is unchanged (up to a flip)
    x = ImageNet64(ImageNet64Config(hflip=False), str(tmp_path)).train_set()[3][0]
    original = np.asarray(Image.open(tmp_path / "train" / "n01443537" / "n01443537_0.png"))
    torch.testing.assert_close(x.double(), pixels_to_unit(original).permute(2, 0, 1))
    assert dataset.reference_samples(3, torch.Generator().manual_seed(0)).shape == (3, 3, 64, 64)
    # npz batches win over the folder in auto mode; source=folder forces the folder
    write_npz(tmp_path / "train_data_batch_1.npz", 2, 0)
    assert len(ImageNet64(ImageNet64Config(), str(tmp_path)).train_set()) == 2
    assert len(ImageNet64(ImageNet64Config(source="folder"), str(tmp_path)).train_set()) == 7


def test_missing_imagenet64_data_is_one_line(tmp_path):
    for config, root, text in [
        (ImageNet64Config(), tmp_path, "train_data_batch_1.npz"),
        (ImageNet64Config(source="npz"), tmp_path, "no train_data_batch_<k>.npz"),
        (ImageNet64Config(source="folder"), tmp_path, "no class folders"),
        (ImageNet64Config(), None, "--data-root DIR"),
        (ImageNet64Config(), tmp_path / "absent", "no data in"),
    ]:
        with pytest.raises(distillkit.UsageError) as caught:
            ImageNet64(config, None if root is None else str(root))
        assert text in one_line_usage_error(caught)


def test_dataset_configs_check_their_values():
    for config_class, options in [
        (IdxConfig, {"download": "yes"}),
        (CIFAR10Config, {"hflip": 1}),
        (CIFAR10Config, {"verify_checksums": None}),
        (ImageNet64Config, {"source": "tar"}),
        (ImageNet64Config, {"class_conditional": 0}),
    ]:
        with pytest.raises(distillkit.ConfigError) as caught:
            config_class(**options)
        assert caught.value.option in options


def test_datasets_are_registered_with_the_papers_backbones():
    registries = distillkit.get_registries()
    for name, cls, backbone in [("mnist", Mnist, "songunet"), ("fashion-mnist", FashionMnist, "songunet"),
                                ("cifar10", Cifar10, "songunet"), ("imagenet64", ImageNet64, "adm")]:
        entry = registries.datasets.entry(name)
        assert entry.obj is cls and entry.provider == "datasets"
        assert cls.default_backbone == backbone and backbone in registries.backbones


# ------------------------------------------------------------------------------ the CLI


def test_cli_missing_data_is_one_line_and_exit_code_2(tmp_path, capsys, no_download):
    code = main(["run", "--dataset", "mnist", "--data-root", str(tmp_path / "empty"), "--backbone", "unet",
                 "--no-track", "--quiet", "--runs-dir", str(tmp_path / "runs"), "--max-steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distillkit: error: dataset mnist: training files not found")


def test_cli_cifar10_preset_resolves_from_files_in_the_real_format(tmp_path, capsys):
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=4)
    assert main(["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--backbone", "songunet",
                 "--set", "backbone_options.preset=cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert 'preset = "cifar10"' in out and "channels = 128" in out and "hflip = true" in out


def one_training_step(tree: dict) -> float:
    """What the trainer does for one step, without its end-of-run evaluation: components from a
    resolved config, a batch from the dataset's loader, the method's loss, a backward pass."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.training.build import build_components

    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    parts = build_components(resolved, torch.device("cpu"), seed=0)
    loader = StatefulDataLoader(parts.dataset.train_set(), batch_size=4, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
    item = next(iter(loader))  # a tensor, or [images, labels]: the Dataset contract's items, collated
    batch = distillkit.Batch(*item) if isinstance(item, (list, tuple)) else distillkit.Batch(item)
    assert batch.x.shape[1:] == parts.spec.shape and batch.x.abs().max() <= 1
    assert (batch.cond is None) == (parts.spec.num_classes is None)
    output = parts.method.loss(parts.student, batch, torch.Generator().manual_seed(1), 0)
    output.loss.backward()
    assert all(p.grad is not None for p in parts.student.parameters())
    return float(output.loss.detach())


def test_cifar10_and_imagenet64_train_a_step_with_the_papers_backbones_small(tmp_path):
    # Small songunet / adm configs: the paper presets are checked on the meta device elsewhere
    # and are never trained in tests.
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", per_batch=2)
    loss = one_training_step({
        "method": "cud", "dataset": "cifar10", "data_root": str(tmp_path / "cifar"), "backbone": "songunet",
        "dataset_options": {"verify_checksums": False, "class_conditional": True},
        "backbone_options": {"channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16],
                             "shakedrop": True},
    })
    assert math.isfinite(loss)
    write_npz(tmp_path / "imagenet" / "train_data_batch_1.npz", 5, 0)
    loss = one_training_step({
        "method": "fm", "dataset": "imagenet64", "data_root": str(tmp_path / "imagenet"),
        "backbone_options": {"channels": 16, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                             "attention_resolutions": [8], "num_head_channels": 16, "num_groups": 8},
    })
    assert math.isfinite(loss)
