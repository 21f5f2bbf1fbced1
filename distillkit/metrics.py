"""Quality metrics that need no downloaded weights.

- ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (the
  formula behind FID); on raw pixels of small images it is a usable offline quality measure.
- ``energy_distance``: a distance between sample sets that needs no features (toy 2-D data).
- ``ode_error``: root-mean-square distance between few-step samples and a high-accuracy solve
  from the same noise: the direct measure of how far a few-step sampler is from its own ODE.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    a = features_a.detach().double().flatten(1).cpu().numpy()
    b = features_b.detach().double().flatten(1).cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Fewer samples than dimensions make the product singular; its square root is still
        # the right quantity (the same as FID implementations compute).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    covmean = np.real(covmean)  # sqrtm returns tiny imaginary parts from rounding
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))
    return max(value, 0.0)


def energy_distance(samples_a: torch.Tensor, samples_b: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Székely), with the unbiased within-set means."""
    a = samples_a.detach().double().flatten(1)
    b = samples_b.detach().double().flatten(1)

    def mean_within(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        return torch.cdist(x, x).sum() / (n * (n - 1))

    value = 2 * torch.cdist(a, b).mean() - mean_within(a) - mean_within(b)
    return float(value.clamp_min(0.0))


def ode_error(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS over samples of the per-sample Euclidean distance, divided by sqrt(dimension)."""
    diff = (samples.double() - reference.double()).flatten(1)
    return float(diff.pow(2).mean(1).mean().sqrt())


def distribution_metric(generated: torch.Tensor, reference: torch.Tensor, *, is_image: bool) -> tuple[str, float]:
    """The distribution distance the end-of-run table reports: (name, value)."""
    if is_image:
        return "fd_pixels", frechet_distance(generated, reference)
    return "energy", energy_distance(generated, reference)
