"""The catch-up objective of CUD stage 1 (METHODS.md §2.2-2.8), for any explicit tableau.

Per sample, with t and Δ drawn as ``draw_times`` documents, x_t = (1 - t) x + t eps, v* = eps - x:

    k_i = sg v⁻(x_t - Δ Σ_j a_ij k_j,  max(t - c_i Δ, δ))       stage slopes toward the data end
    s   = Σ_i b_i k_i                                            the catch-up slope
    y_j = sg v⁻(x_t - j Δ s,  max(t - j Δ, δ))                   j = 1 .. H look-ahead targets
    y_j = sg v*               where t < δ + R Δ                  boundary mask (R = max(H, max c_i))
    L   = w_cu Σ_j d(p_j, y_j) + w_gt Σ_j d_gt(p_j, v*) + β KL

``v⁻`` is the target network's main head under stop-gradient: the live network itself (default;
train mode, dropout active, a fresh mask per pass, as the paper's code does) or an EMA copy.
``p_j`` are the H heads of one trunk pass with gradient. With ``reuse_prediction_as_k1`` the first
stage slope is k_1 = sg p_1 instead of a separate pass. Euler (H = 1), Heun (H = 2) and the paper's
RK3 slope (H = 3) give §2.6, §2.7 and §2.8 exactly.

Random draws, in this order, from the generator the trainer passes: n ~ N(0, I) (the noise, or
the encoder's standard-normal input), then t, then (only where Δ is random) the uniform behind Δ.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.nn.functional import mse_loss

from distillkit import (Batch, ButcherTableau, LossOutput, broadcast_time, rk_slopes, straight_path, uniform_time,
                        unwrap_module)

from .encoder import gaussian_kl

#: iCT's pseudo-Huber constant (Song & Dhariwal 2023): c = 0.00054 * sqrt(dimensions).
HUBER_C_PER_SQRT_DIM = 0.00054


def draw_times(
    n: int, generator: torch.Generator, config, heads: int, *, device, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, Δ) per sample (§2.3-2.4), TN = ``config.tn``, δ = ``config.t_min``.

    continuous time: t = u (1 - δ) + δ, u ~ U(0, 1), and
        uniform: Δ ~ U(0, 1/TN)    origin: Δ = 1/TN    rule: Δ = t/TN
    discrete time: t = k/TN, k ~ U{1, ..., TN}, and
        uniform, one look-ahead head (the paper's Euler variant): Δ = ⌊U·t·TN⌋/TN, U ~ U(0, 1)
        uniform with several heads (RK2 / RK3 variants), or origin: Δ = 1/TN
    """
    tn = config.tn
    if config.discrete_time:
        k = torch.randint(1, tn + 1, (n,), generator=generator, device=device)
        t = k.to(dtype) / tn
        if config.delta_mode == "uniform" and heads == 1:
            u = torch.rand(n, generator=generator, device=device, dtype=dtype)
            # ⌊U·t·TN⌋ with t·TN = k exactly: a whole number of grid steps in 0 .. k - 1.
            delta = torch.floor(u * k.to(dtype)) / tn
        else:
            delta = torch.full((n,), 1.0 / tn, device=device, dtype=dtype)
        return t, delta
    t = uniform_time(n, generator, config.t_min, device=device, dtype=dtype)
    if config.delta_mode == "uniform":
        delta = torch.rand(n, generator=generator, device=device, dtype=dtype) / tn
    elif config.delta_mode == "origin":
        delta = torch.full((n,), 1.0 / tn, device=device, dtype=dtype)
    else:  # rule
        delta = t / tn
    return t, delta


def catch_up_targets(
    velocity,
    x_t: torch.Tensor,
    t: torch.Tensor,
    delta: torch.Tensor,
    tableau: ButcherTableau,
    heads: int,
    t_min: float,
    first_slope: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """The H look-ahead targets y_1..y_H (without the boundary mask), under no_grad.

    ``first_slope``, when given, is used as k_1 instead of evaluating ``velocity(x_t, t)``
    (an explicit tableau's first stage is always at (x_t, t)).

    The stage slopes are one per-sample Runge-Kutta step of size h = -Δ (``rk_slopes``):
    x_t + (a_ij (-Δ)) k_j and t + c_i (-Δ) are x_t - (Δ a_ij) k_j and t - c_i Δ to the bit.
    """
    step = broadcast_time(delta, x_t)
    with torch.no_grad():
        clamped = lambda x, s: velocity(x, s.clamp_min(t_min))  # noqa: E731 - never before δ
        slopes = rk_slopes(clamped, x_t, t, -delta, tableau, first_slope)
        slope = sum(b_i * k_i for b_i, k_i in zip(tableau.b, slopes) if b_i != 0.0)
        return [
            velocity(x_t - j * step * slope, (t - j * delta).clamp_min(t_min)) for j in range(1, heads + 1)
        ]


def mask_reach(tableau: ButcherTableau, heads: int) -> float:
    """How many Δ the targets look ahead at most: H for the paper's variants (max c_i < H)."""
    return float(max(heads, max(tableau.c)))


def huber_constant(config, x: torch.Tensor) -> float:
    return config.huber_c if config.huber_c > 0 else HUBER_C_PER_SQRT_DIM * math.sqrt(x[0].numel())


def distance(p: torch.Tensor, y: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """``mse``: mean over batch and every element (the paper's nn.MSELoss). ``pseudo-huber``
    (iCT): sqrt(‖p - y‖² + c²) - c per sample, averaged over the batch.

    Pseudo-Huber suits a target that is a function of x_t (the catch-up targets). On the
    ground-truth term, whose target ε - x is random given x_t, it regresses a conditional
    *median*-like point instead of the mean velocity E[ε - x | x_t] that the ODE needs, which is why
    the two terms have separate options and the ground-truth one defaults to ``mse``."""
    if kind == "mse":
        return mse_loss(p, y)
    squared = (p - y).flatten(1).pow(2).sum(dim=1)
    return (torch.sqrt(squared + c * c) - c).mean()


def loss_weights(config, step: int, total_steps: int) -> tuple[float, float]:
    """(w_cu, w_gt) at optimizer step ``step`` (0-based) of ``total_steps``.

    constant: the configured weights. adaptive (the Euler variant only, checked by the method)
    and adaptive-all-heads (any tableau and head count): ω1(i) = 2 i / I on the catch-up term and
    ω2(i) = 2 (1 - i / I) on the ground-truth term (§2.6, the figure's ω1(i), ω2(i)), times the
    configured weights, with i = ``step`` and I = ``total_steps``.
    """
    if config.weighting == "constant":
        return config.catch_up_weight, config.ground_truth_weight
    fraction = step / total_steps
    return config.catch_up_weight * 2.0 * fraction, config.ground_truth_weight * 2.0 * (1.0 - fraction)


def catch_up_loss(
    student,
    batch: Batch,
    generator: torch.Generator,
    step: int,
    *,
    tableau: ButcherTableau,
    heads: int,
    config,
    total_steps: int,
    target_network: Optional[Callable] = None,
) -> LossOutput:
    """The stage-1 loss for one batch; ``target_network(x, t, cond)`` is the EMA target (None:
    the live student's main head)."""
    x0, cond = batch.x, batch.cond
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t, delta = draw_times(n, generator, config, heads, device=x0.device, dtype=x0.dtype)
    metrics: dict[str, float | torch.Tensor] = {}

    kl = None
    if config.coupling == "encoder":
        # Outside the wrapper's forward: its parameters still get their gradient through x_t and v*.
        mu, logvar = unwrap_module(student).encoder(x0, cond)
        eps = mu + torch.exp(0.5 * logvar) * noise
        kl = gaussian_kl(mu, logvar)
        metrics["kl"] = kl.detach()
    else:
        eps = noise
    x_t, v_star = straight_path(x0, eps, t)

    predictions = student(x_t, t, cond, head="all")  # one trunk pass with gradient, every head
    if target_network is None:
        velocity = lambda x, s: student(x, s, cond)  # noqa: E731 - the live main head
    else:
        velocity = lambda x, s: target_network(x, s, cond)  # noqa: E731
    first = predictions[0] if config.reuse_prediction_as_k1 else None
    targets = catch_up_targets(velocity, x_t.detach(), t, delta, tableau, heads, config.t_min, first)
    if config.boundary_mask:
        near_data = broadcast_time(t < config.t_min + mask_reach(tableau, heads) * delta, x0)
        # Detached: the replaced target is a constant, as every other target (the paper replaces
        # it under no_grad). With the encoder coupling v* = ε(φ) - x carries the encoder's graph,
        # and the ground-truth term is where that gradient belongs, not the catch-up term too.
        targets = [torch.where(near_data, v_star.detach(), y) for y in targets]
        metrics["boundary_fraction"] = near_data.float().mean()

    c = huber_constant(config, x0)
    catch_up = sum(distance(p, y, config.distance, c) for p, y in zip(predictions, targets))
    ground_truth = sum(distance(p, v_star, config.ground_truth_distance, c) for p in predictions)
    w_cu, w_gt = loss_weights(config, step, total_steps)
    loss = w_cu * catch_up + w_gt * ground_truth
    if kl is not None:
        loss = loss + config.kl_weight * kl
    metrics.update(
        {
            "loss_catch_up": catch_up.detach(),
            "loss_ground_truth": ground_truth.detach(),
            "delta_mean": delta.mean(),
            "weight_catch_up": float(w_cu),
            "weight_ground_truth": float(w_gt),
        }
    )
    return LossOutput(loss, metrics)
