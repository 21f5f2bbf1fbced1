"""TrigFlow (Lu & Song 2024) <-> the project's straight path, written out exactly.

TrigFlow, with the data standard deviation sigma_d and the angle s in [0, pi/2] (the paper's
``t``, renamed here so it does not clash with ours):

    x_s = cos(s) x + sin(s) z,   z = sigma_d eps,   dx_s/ds = sigma_d F(x_s / sigma_d, s)
    f(x_s, s) = cos(s) x_s - sin(s) sigma_d F       (the consistency function; f(x, 0) = x)

Ours: x_t = (1 - t) x + t eps, v = eps - x, t in [0, 1].

Both are the same Gaussian path up to a scale per time. Divide x_s by (cos s + sigma_d sin s):

    x_s / (cos s + sigma_d sin s)
        = [cos s / (cos s + sigma_d sin s)] x + [sigma_d sin s / (cos s + sigma_d sin s)] eps

whose two coefficients sum to 1, i.e. it is x_t with

    t(s) = sigma_d sin s / (cos s + sigma_d sin s),   x_t = x_s / (cos s + sigma_d sin s).

Inversely, with N(t) = sqrt(sigma_d^2 (1 - t)^2 + t^2) (so cos s = sigma_d (1 - t) / N and
sin s = t / N):

    s(t) = atan2(t, sigma_d (1 - t)),   x_s = sigma_d x_t / N(t),   sigma_d tan s = t / (1 - t).

The last identity says that sigma_d tan s is EDM's noise level sigma = t / (1 - t) (divide x_s by
cos s: x + sigma_d tan s eps), so the paper's log-normal proposal on sigma_d tan s is a log-normal
proposal on t / (1 - t). For sigma_d = 1: t = sin s / (sin s + cos s), x_t = x_s / (sin s + cos s).
(METHODS-ONE-STEP.md section 1 writes t = sin s / (sin s + sigma_d cos s); that is right only
for sigma_d = 1.)

Velocities. Posterior means are the same in both frames: x_hat = E[x | x_t] = x_t - t v and
eps_hat = E[eps | x_t] = x_t + (1 - t) v. Differentiating x_s = cos s x + sin s sigma_d eps
under the posterior gives the TrigFlow velocity

    sigma_d F = -sin(s) x_hat + cos(s) sigma_d eps_hat,

and then f = cos s x_s - sin s sigma_d F = x_hat: the consistency function is x_t - t v in our
frame (one Euler step from t to 0), for any v. A network whose output is read as our velocity v
therefore *is* a TrigFlow consistency model, and a flow-matching teacher's weights start it as the
teacher's own F (the paper's initialisation from a pretrained diffusion model).
"""

from __future__ import annotations

import torch

from distillkit import broadcast_time


def time_from_angle(s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t(s) = sigma_d sin s / (cos s + sigma_d sin s): smooth on [0, pi/2], t(0) = 0, t(pi/2) = 1."""
    return sigma_data * s.sin() / (s.cos() + sigma_data * s.sin())


def angle_from_time(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """s(t) = atan2(t, sigma_d (1 - t)): safe at both ends."""
    return torch.atan2(t, sigma_data * (1.0 - t))


def linear_from_trigflow(x_s: torch.Tensor, s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """x_t = x_s / (cos s + sigma_d sin s)."""
    return x_s / broadcast_time(s.cos() + sigma_data * s.sin(), x_s)


def trigflow_from_linear(x_t: torch.Tensor, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """x_s = sigma_d x_t / N(t), N(t) = sqrt(sigma_d^2 (1 - t)^2 + t^2)."""
    norm = (sigma_data**2 * (1.0 - t) ** 2 + t**2).sqrt()
    return sigma_data * x_t / broadcast_time(norm, x_t)


def trigflow_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                      sigma_data: float) -> torch.Tensor:
    """F with dx_s/ds = sigma_d F, from our velocity v at (x_t, t) = (x_s, s) mapped:
    sigma_d F = -sin s (x_t - t v) + cos s sigma_d (x_t + (1 - t) v)."""
    t_, sin, cos = (broadcast_time(a, x_t) for a in (t, s.sin(), s.cos()))
    x_hat = x_t - t_ * v
    eps_hat = x_t + (1.0 - t_) * v
    return -sin * x_hat / sigma_data + cos * eps_hat


def consistency_output(x_s: torch.Tensor, s: torch.Tensor, F: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """f(x_s, s) = cos s x_s - sin s sigma_d F (TrigFlow's consistency function)."""
    return broadcast_time(s.cos(), x_s) * x_s - broadcast_time(s.sin(), x_s) * sigma_data * F
