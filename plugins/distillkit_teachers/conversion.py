"""The math that turns models trained in other conventions into distillkit's velocity.

distillkit's path: t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, v = eps - x. Every
function here is written from that definition (docs/teachers.md derives each formula):

- VP models (DDPM / DDIM / Euler schedulers): z_s = alpha_s x + sigma_s eps with
  alpha_s^2 + sigma_s^2 = 1 is the same path as ours, rescaled, at the time where the
  signal-to-noise ratios agree: sigma_s / alpha_s = t / (1 - t). So
  alpha_s = (1 - t) / N(t), sigma_s = t / N(t), N(t) = sqrt((1 - t)^2 + t^2), and
  z = x_t / N(t). The model's discrete timestep for that SNR is found by linear interpolation
  in log-SNR between the grid points of its schedule (exact on the grid).
- EDM / VE denoisers D(y; sigma): y = x + sigma eps is our x_t / (1 - t) at sigma = t / (1 - t).

All of it runs in float64; the caller casts back.
"""

from __future__ import annotations

import torch

#: prediction types of diffusers' VP schedulers
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha_s, sigma_s, N(t))`` of the VP time with the SNR of our time ``t``.

    alpha_s / sigma_s = (1 - t) / t and alpha_s^2 + sigma_s^2 = 1 give these in closed form; they
    need no schedule, so the input scaling is exact at every t, on the grid or not."""
    norm = torch.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / norm, t / norm, norm


def log_snr_of_schedule(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda_n = log(abar_n / (1 - abar_n)) of a discrete VP schedule, float64, decreasing in n."""
    abar = alphas_cumprod.to(torch.float64)
    return torch.log(abar) - torch.log1p(-abar)


def time_of_log_snr(log_snr: torch.Tensor) -> torch.Tensor:
    """Our t with log-SNR ``log_snr``: lambda = 2 log((1 - t) / t)  =>  t = 1 / (1 + exp(lambda / 2))."""
    return torch.sigmoid(-0.5 * log_snr.to(torch.float64))


def log_snr_of_time(t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = 2 log((1 - t) / t), for t in (0, 1)."""
    return 2.0 * (torch.log1p(-t) - torch.log(t))


def timestep_at_log_snr(log_snr_star: torch.Tensor, schedule_log_snr: torch.Tensor) -> torch.Tensor:
    """The fractional model timestep n* whose log-SNR is ``log_snr_star``.

    ``schedule_log_snr`` is lambda_0 > lambda_1 > ... > lambda_{T-1}. Between neighbours,
    n* = n + (lambda_n - lambda*) / (lambda_n - lambda_{n+1}): linear in log-SNR, so n* = n
    exactly when lambda* = lambda_n. Values outside [lambda_{T-1}, lambda_0] are clamped to the
    grid's ends (callers clamp t first, so this only absorbs rounding).
    """
    ascending = schedule_log_snr.flip(0)  # lambda_{T-1} .. lambda_0
    last = ascending.numel() - 1
    target = log_snr_star.clamp(ascending[0], ascending[-1])
    upper = torch.searchsorted(ascending, target, right=True).clamp(1, last)
    low, high = ascending[upper - 1], ascending[upper]
    gap = high - low
    fraction = torch.where(gap > 0, (target - low) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    position = (upper - 1).to(torch.float64) + fraction  # index into the ascending array
    return last - position


def vp_prediction_to_velocity(
    prediction_type: str, output: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor,
    t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
) -> torch.Tensor:
    """Our v = eps - x from a VP model's ``output`` at the state ``z = alpha x + sigma eps``.

    - epsilon: x_hat = (z - sigma eps_hat) / alpha, v = eps_hat - x_hat (needs alpha > 0, t < 1);
    - sample: x_hat is the output, v = (x_t - x_hat) / t (needs t > 0);
    - v_prediction (v_vp = alpha eps - sigma x): eps = sigma z + alpha v_vp and
      x = alpha z - sigma v_vp, so v = (sigma - alpha) z + (alpha + sigma) v_vp (no division).
    ``t``, ``alpha`` and ``sigma`` are broadcast against ``z``.
    """
    if prediction_type == "epsilon":
        x_hat = (z - sigma * output) / alpha
        return output - x_hat
    if prediction_type == "sample":
        return (x_t - output) / t
    if prediction_type == "v_prediction":
        return (sigma - alpha) * z + (alpha + sigma) * output
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def denoiser_to_velocity(x_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x_hat) / t from a denoiser's estimate of the data (EDM's D)."""
    return (x_t - x_hat) / t


def edm_sigma_of_time(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t): EDM's noise level with the SNR of our time t."""
    return t / (1 - t)


def time_of_edm_sigma(sigma: float) -> float:
    """t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)
