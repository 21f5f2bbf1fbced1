"""The built-in datasets and the exact toy2d teacher.

Every expected value here is computed independently of the plugin: the digits straight from
scikit-learn, the mixture's moments in closed form, the velocity by Gaussian regression, by
importance sampling and by transporting noise with a hand-written RK4 loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import distillkit
from distillkit_datasets import Digits, DigitsConfig, Toy2d, Toy2dConfig, Toy2dExactTeacher, gmm_velocity

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def sklearn_digits():
    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float64), torch.tensor(bunch.target)


# ------------------------------------------------------------------------------------ digits


def test_digits_are_sklearns_images_scaled_to_minus_one_one(sklearn_digits):
    raw_images, _ = sklearn_digits
    dataset = Digits(DigitsConfig())
    assert dataset.spec == distillkit.DataSpec((1, 8, 8), None)
    train = dataset.train_set()
    assert isinstance(train, torch.utils.data.TensorDataset)
    assert len(train) == NUM_DIGITS

    first = train[0]
    assert isinstance(first, torch.Tensor)  # a bare tensor, not a 1-tuple, for unconditional data
    assert first.shape == (1, 8, 8) and first.dtype == torch.float32

    images = torch.stack([train[i] for i in range(len(train))])
    assert images.min() == -1.0 and images.max() == 1.0
    # pixel value v in 0..16 becomes v / 8 - 1
    torch.testing.assert_close(images.double(), (raw_images / 8 - 1).reshape(NUM_DIGITS, 1, 8, 8))


def test_class_conditional_digits_yield_image_label_pairs(sklearn_digits):
    _, raw_labels = sklearn_digits
    dataset = Digits(DigitsConfig(class_conditional=True))
    assert dataset.spec.num_classes == 10
    train = dataset.train_set()
    image, label = train[5]
    assert image.shape == (1, 8, 8)
    assert label.dtype == torch.int64 and label.item() == raw_labels[5].item()

    # a DataLoader batches them into the (x, labels) a trainer expects
    x, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=32)))
    assert x.shape == (32, 1, 8, 8)
    assert torch.equal(labels, raw_labels[:32])
    assert set(labels.tolist()) <= set(range(10))

    unconditional = next(iter(torch.utils.data.DataLoader(Digits().train_set(), batch_size=32)))
    assert isinstance(unconditional, torch.Tensor) and unconditional.shape == (32, 1, 8, 8)


def test_digit_reference_samples_are_distinct_real_images_chosen_by_the_generator(sklearn_digits):
    raw_images, _ = sklearn_digits
    dataset = Digits()
    all_rows = {tuple(row) for row in (raw_images / 8 - 1).reshape(NUM_DIGITS, -1).float().tolist()}

    samples = dataset.reference_samples(100, torch.Generator().manual_seed(3))
    assert samples.shape == (100, 1, 8, 8)
    rows = [tuple(row) for row in samples.reshape(100, -1).tolist()]
    assert all(row in all_rows for row in rows)
    # without replacement: the 1,797 digits contain duplicates, so compare indices, not pixels
    again = dataset.reference_samples(100, torch.Generator().manual_seed(3))
    assert torch.equal(samples, again)
    other = dataset.reference_samples(100, torch.Generator().manual_seed(4))
    assert not torch.equal(samples, other)

    everything = dataset.reference_samples(10_000, torch.Generator().manual_seed(0))
    assert everything.shape == (NUM_DIGITS, 1, 8, 8)
    # every image exactly once: sorting rows gives the dataset's sorted rows
    sort = lambda t: np.array(sorted(map(tuple, t.reshape(len(t), -1).tolist())))  # noqa: E731
    assert np.array_equal(sort(everything), sort(dataset.images))


# ------------------------------------------------------------------------------------- toy2d


def test_mixture_means_lie_equally_spaced_on_the_circle():
    means, stds, weights = Toy2d(Toy2dConfig(components=6, radius=3.0, std=0.2)).mixture()
    assert means.shape == (6, 2) and stds.shape == (6,) and weights.shape == (6,)
    torch.testing.assert_close(means.norm(dim=1), torch.full((6,), 3.0))
    angles = torch.atan2(means[:, 1], means[:, 0])
    gaps = torch.remainder(angles.roll(-1) - angles, 2 * math.pi)
    torch.testing.assert_close(gaps, torch.full((6,), 2 * math.pi / 6))
    torch.testing.assert_close(stds, torch.full((6,), 0.2))
    torch.testing.assert_close(weights, torch.full((6,), 1 / 6))


def test_exact_sampler_matches_the_mixture_moments():
    config = Toy2dConfig()  # 8 components, radius 2, std 0.15
    dataset = Toy2d(config)
    means, _, _ = dataset.mixture()
    n = 200_000
    samples, components = dataset.sample(n, torch.Generator().manual_seed(0), return_components=True)
    assert samples.shape == (n, 2)

    samples = samples.double()
    counts = torch.bincount(components, minlength=8).double()
    assert (counts / n - 1 / 8).abs().max() < 0.005  # binomial sd ~ 0.0007
    for k in range(8):
        own = samples[components == k]
        # mean within ~5 standard errors, std within 2 %
        assert (own.mean(0) - means[k].double()).abs().max() < 5 * 0.15 / math.sqrt(len(own))
        assert (own.std(0) / 0.15 - 1).abs().max() < 0.02

    # Overall: mean 0; covariance (r^2 / 2 + std^2) I, since sum_k cos^2(2 pi k / K) = K / 2.
    assert samples.mean(0).abs().max() < 0.02
    expected = (2.0**2 / 2 + 0.15**2) * torch.eye(2, dtype=torch.float64)
    assert (torch.cov(samples.T) - expected).abs().max() < 0.03


def test_train_set_is_fixed_by_the_seed_and_reference_samples_by_the_generator():
    dataset = Toy2d(Toy2dConfig(train_size=500, seed=7))
    train = dataset.train_set()
    assert len(train) == 500
    assert isinstance(train[0], torch.Tensor) and train[0].shape == (2,)
    assert torch.equal(train.tensors[0], Toy2d(Toy2dConfig(train_size=500, seed=7)).train_set().tensors[0])
    assert not torch.equal(train.tensors[0], Toy2d(Toy2dConfig(train_size=500, seed=8)).train_set().tensors[0])

    first = dataset.reference_samples(300, torch.Generator().manual_seed(1))
    assert first.shape == (300, 2)
    assert torch.equal(first, dataset.reference_samples(300, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, dataset.reference_samples(300, torch.Generator().manual_seed(2)))


def test_toy2d_config_checks_its_values():
    assert Toy2dConfig(radius=3).radius == 3.0
    for options in [
        {"components": 0},
        {"radius": 0.0},
        {"std": -0.1},
        {"std": float("nan")},
        {"train_size": 0},
        {"seed": -1},
        {"components": 2.5},
    ]:
        with pytest.raises(distillkit.ConfigError) as caught:
            Toy2dConfig(**options)
        assert caught.value.option in options
    with pytest.raises(distillkit.ConfigError):
        DigitsConfig(class_conditional="yes")


# ------------------------------------------------------------------------- exact velocity


def single_gaussian_velocity(x, t, mu, sigma):
    """E[eps - x0 | x_t = x] for x0 ~ N(mu, sigma^2 I), by linear regression of the jointly
    Gaussian pair (v, x_t) with v = eps - x0, x_t = (1 - t) x0 + t eps:
    E[v | x_t] = E[v] + Cov(v, x_t) / Var(x_t) (x_t - E[x_t])."""
    t = t[:, None]
    mean_v, mean_xt = -mu, (1 - t) * mu
    cov_v_xt = t - (1 - t) * sigma**2  # Cov(eps - x0, (1-t) x0 + t eps), per coordinate
    var_xt = (1 - t) ** 2 * sigma**2 + t**2
    return mean_v + cov_v_xt / var_xt * (x - mean_xt)


def test_velocity_of_a_single_gaussian_matches_gaussian_regression():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        mu = torch.randn(1, 2, generator=generator, dtype=torch.float64) * 2
        sigma = 0.05 + torch.rand((), generator=generator, dtype=torch.float64).item()
        x = torch.randn(64, 2, generator=generator, dtype=torch.float64) * 3
        t = torch.rand(64, generator=generator, dtype=torch.float64)
        t[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
        got = gmm_velocity(x, t, mu, torch.tensor([sigma], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
        torch.testing.assert_close(got, single_gaussian_velocity(x, t, mu, sigma))


def test_mixture_velocity_matches_importance_sampled_posterior_mean():
    # E[eps - x0 | x_t = x] = E[w(x0) ((x - (1-t) x0) / t - x0)] / E[w(x0)] with x0 from the
    # mixture and w(x0) = N(x; (1-t) x0, t^2 I): the mixture formula is never used.
    dataset = Toy2d()
    means, stds, weights = (p.double() for p in dataset.mixture())
    x0 = dataset.sample(400_000, torch.Generator().manual_seed(0)).double()
    points = torch.tensor([[0.3, -0.2], [1.5, 1.0], [-2.0, 0.4], [0.0, 0.0]], dtype=torch.float64)
    for t in [0.35, 0.6, 0.9]:
        for x in points:
            log_w = -((x - (1 - t) * x0) ** 2).sum(1) / (2 * t**2)
            w = torch.softmax(log_w, 0)
            effective_size = 1 / (w**2).sum()
            assert effective_size > 2_000
            samples = (x - (1 - t) * x0) / t - x0
            estimate = (w[:, None] * samples).sum(0)
            spread = ((w[:, None] * (samples - estimate) ** 2).sum(0) / effective_size).sqrt()
            exact = gmm_velocity(x[None], torch.tensor([t], dtype=torch.float64), means, stds, weights)[0]
            assert ((exact - estimate).abs() <= 5 * spread + 1e-3).all(), (t, x, exact, estimate)


def test_mixture_velocity_at_the_ends_of_the_path():
    # At t = 1, x_t = eps is independent of x0: v = x - E[x0]. At t = 0, x_t = x0: v = E[eps] - x0 = -x.
    dataset = Toy2d(Toy2dConfig(components=5, radius=1.5, std=0.1))
    means, stds, weights = dataset.mixture()
    x = torch.tensor([[0.1, 0.2], [1.5, 0.0], [40.0, -60.0], [-1e3, 1e3]])
    at_one = gmm_velocity(x, torch.ones(4), means, stds, weights)
    torch.testing.assert_close(at_one, x - (weights[:, None] * means).sum(0), atol=1e-4, rtol=1e-5)
    at_zero = gmm_velocity(x, torch.zeros(4), means, stds, weights)
    assert torch.isfinite(at_zero).all()  # far points: the log-space responsibilities do not underflow
    torch.testing.assert_close(at_zero, -x, atol=1e-4, rtol=1e-5)
    # a scalar t broadcasts over the batch
    torch.testing.assert_close(gmm_velocity(x, 0.4, means, stds, weights), gmm_velocity(x, torch.full((4,), 0.4), means, stds, weights))


def rk4_from_noise_to_data(velocity, x, steps):
    """Classical RK4 on dx/dt = v(x, t) from t = 1 to t = 0 with a uniform grid."""
    h = -1.0 / steps
    batch = x.shape[0]
    for i in range(steps):
        t = 1.0 + i * h
        at = lambda s: torch.full((batch,), s, dtype=x.dtype)  # noqa: E731
        k1 = velocity(x, at(t))
        k2 = velocity(x + h / 2 * k1, at(t + h / 2))
        k3 = velocity(x + h / 2 * k2, at(t + h / 2))
        k4 = velocity(x + h * k3, at(t + h))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_integrating_the_exact_velocity_maps_noise_onto_the_mixture():
    teacher = Toy2dExactTeacher(Toy2dConfig())
    means = teacher.means.double()
    n = 8000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # 50 RK4 steps: the statistics below no longer change with 100 or 400 steps.
    data = rk4_from_noise_to_data(teacher.velocity, noise, steps=50)

    distances = torch.cdist(data, means)
    nearest = distances.argmin(1)
    assert distances.min(1).values.max() < 1.0  # nothing stranded between the components
    fractions = torch.bincount(nearest, minlength=8).double() / n
    assert (fractions - 1 / 8).abs().max() < 5 * math.sqrt(1 / 8 * 7 / 8 / n)
    for k in range(8):
        own = data[nearest == k]
        # within 5 standard errors of the mixture's component mean and std
        assert (own.mean(0) - means[k]).abs().max() < 5 * 0.15 / math.sqrt(len(own))
        assert (own.std(0) / 0.15 - 1).abs().max() < 5 / math.sqrt(2 * len(own))


def test_teacher_identity_velocity_and_registration():
    teacher = Toy2dExactTeacher(Toy2dConfig(components=8, radius=2.0, std=0.15, seed=3))
    assert teacher.identity == "toy2d-exact:components=8,radius=2.0,std=0.15"
    assert isinstance(teacher, distillkit.Teacher)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    t = torch.rand(10, generator=torch.Generator().manual_seed(1))
    means, stds, weights = Toy2d().mixture()
    torch.testing.assert_close(teacher(x, t), gmm_velocity(x, t, means, stds, weights))
    with pytest.raises(ValueError, match="cond"):
        teacher.velocity(x, t, torch.zeros(10, dtype=torch.long))

    registries = distillkit.get_registries()
    entry = registries.teachers.entry("toy2d-exact")
    assert entry.obj is Toy2dExactTeacher and entry.provider == "datasets"
    for name, cls, backbone in [("digits", Digits, "unet"), ("toy2d", Toy2d, "mlp")]:
        entry = registries.datasets.entry(name)
        assert entry.obj is cls and entry.provider == "datasets"
        assert cls.default_backbone == backbone and backbone in registries.backbones
