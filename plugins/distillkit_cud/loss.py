"""The catch-up objective of CUD stage 1 (METHODS.md §2.3-2.8), for any explicit tableau.

Per sample, with Δ ~ U(0, 1/TN), t ~ U(δ, 1), x_t = (1 - t) x + t eps and v* = eps - x:

    k_i = sg v(x_t - Δ Σ_j a_ij k_j,  max(t - c_i Δ, δ))        stage slopes toward the data end
    s   = Σ_i b_i k_i                                            the catch-up slope
    y_j = sg v(x_t - j Δ s,  max(t - j Δ, δ))                    j = 1 .. H look-ahead targets
    y_j = v*                          where t < δ + H Δ          (too close to the data end)
    L   = Σ_j  w_cu MSE(p_j, y_j) + w_gt MSE(p_j, v*)

``v`` is the live network's main head under stop-gradient, in train mode (dropout active, fresh
per pass, as the paper's code does). ``p_j`` are the H heads of one trunk pass with gradient.
Euler (H = 1), Heun (H = 2) and the paper's RK3 slope (H = 3) give §2.6, §2.7 and §2.8 exactly.
"""

from __future__ import annotations

import torch
from torch.nn.functional import mse_loss

from distillkit import Batch, ButcherTableau, LossOutput


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def catch_up_targets(
    velocity, x_t: torch.Tensor, t: torch.Tensor, delta: torch.Tensor, tableau: ButcherTableau, heads: int, t_min: float
) -> list[torch.Tensor]:
    """The H look-ahead targets y_1..y_H (without the boundary mask), under no_grad."""
    step = _per_sample(delta, x_t)
    with torch.no_grad():
        slopes: list[torch.Tensor] = []
        for i in range(tableau.stages):
            x_i = x_t
            for j, a_ij in enumerate(tableau.a[i][:i]):
                if a_ij != 0.0:
                    x_i = x_i - step * a_ij * slopes[j]
            slopes.append(velocity(x_i, (t - tableau.c[i] * delta).clamp_min(t_min)))
        slope = sum(b_i * k_i for b_i, k_i in zip(tableau.b, slopes) if b_i != 0.0)
        return [
            velocity(x_t - j * step * slope, (t - j * delta).clamp_min(t_min)) for j in range(1, heads + 1)
        ]


def catch_up_loss(student, batch: Batch, generator: torch.Generator, tableau: ButcherTableau, heads: int, config) -> LossOutput:
    x0, cond = batch.x, batch.cond
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.rand(n, generator=generator, device=x0.device, dtype=x0.dtype) * (1.0 - config.t_min) + config.t_min
    delta = torch.rand(n, generator=generator, device=x0.device, dtype=x0.dtype) / config.tn
    t_b = _per_sample(t, x0)
    x_t = (1.0 - t_b) * x0 + t_b * eps
    v_star = eps - x0

    predictions = student.all_heads(x_t, t, cond)
    targets = catch_up_targets(lambda x, s: student(x, s, cond), x_t, t, delta, tableau, heads, config.t_min)
    near_data = _per_sample(t < config.t_min + heads * delta, x0)
    targets = [torch.where(near_data, v_star, y) for y in targets]

    catch_up = sum(mse_loss(p, y) for p, y in zip(predictions, targets))
    ground_truth = sum(mse_loss(p, v_star) for p in predictions)
    loss = config.catch_up_weight * catch_up + config.ground_truth_weight * ground_truth
    return LossOutput(
        loss,
        {
            "loss_catch_up": float(catch_up.detach()),
            "loss_ground_truth": float(ground_truth.detach()),
            "boundary_fraction": float(near_data.float().mean()),
        },
    )
