"""Offline metrics against formulas written independently here."""

import numpy as np
import pytest
import scipy.linalg
import torch

from distillkit.metrics import energy_distance, frechet_distance, ode_error


def reference_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n,d", [(400, 6), (40, 30)])  # more samples than dimensions, and fewer
def test_frechet_distance_matches_the_sqrtm_formula(n, d):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2, d, dtype=torch.float64)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero_and_finite_for_constant_pixels():
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    x[:, :3] = -1.0  # constant border pixels: rank-deficient covariance
    y = x.clone()
    y[:, 3:] += 0.5
    assert frechet_distance(x, y) == pytest.approx(0.5**2 * 7, rel=1e-6)


def test_energy_distance_and_ode_error_closed_forms():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300, 2, generator=g)
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Two point masses at distance 3 (with a little jitter): 2 E|X-Y| - E|X-X'| - E|Y-Y'| ≈ 6.
    x = torch.zeros(200, 1) + 1e-6 * torch.randn(200, 1, generator=g)
    assert energy_distance(x, x + 3) == pytest.approx(6.0, rel=1e-3)
    assert ode_error(torch.zeros(4, 9), torch.full((4, 9), 2.0)) == pytest.approx(2.0)
