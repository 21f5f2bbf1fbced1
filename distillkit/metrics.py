"""Quality metrics that need no downloaded weights.

- ``frechet_distance``: the Fréchet distance between Gaussians fitted to two feature sets (the
  formula behind FID); on raw pixels of small images it is a usable offline quality measure.
- ``energy_distance``: a distance between sample sets that needs no features (toy 2-D data).
- ``ode_error``: root-mean-square distance between few-step samples and a high-accuracy solve
  from the same noise: the direct measure of how far a few-step sampler is from its own ODE.
"""

from __future__ import annotations

import math

import torch


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), the FID formula.

    With centred, scaled samples A, B (S_a = A^T A), tr sqrt(S_a S_b) is the sum of the singular
    values of A B^T (n_a x n_b) or, equally, of S_a^(1/2) S_b^(1/2) (d x d): whichever is smaller is
    used. Both are exact, need no matrix square root of a non-symmetric product (scipy's sqrtm is
    slow in 3,072 dimensions and returns NaN for rank-deficient covariances), and stay finite.
    """
    a = features_a.detach().double().flatten(1).cpu()
    b = features_b.detach().double().flatten(1).cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a = (a - mu_a) / math.sqrt(max(len(a) - 1, 1))
    centred_b = (b - mu_b) / math.sqrt(max(len(b) - 1, 1))
    dimension = a.shape[1]
    if min(len(a), len(b)) < dimension:
        cross = torch.linalg.svdvals(centred_a @ centred_b.T).sum()
    else:
        cross = torch.linalg.svdvals(_psd_sqrt(centred_a.T @ centred_a) @ _psd_sqrt(centred_b.T @ centred_b)).sum()
    value = (mu_a - mu_b).pow(2).sum() + centred_a.pow(2).sum() + centred_b.pow(2).sum() - 2 * cross
    return max(float(value), 0.0)


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
