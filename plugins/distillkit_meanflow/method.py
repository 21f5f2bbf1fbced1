"""MeanFlow (Geng, Deng, Bai, Kolter and He, "Mean Flows for One-step Generative Modeling", 2025),
written from the paper's math (and METHODS-ONE-STEP.md §2), not from its code.

The paper's convention is the project's: z_t = (1 - t) x + t eps, v = eps - x, r <= t, sampling
from t = 1 to t = 0. No mapping is needed at the boundary.

The network predicts the *average* velocity over [r, t],

    u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds,    so that  z_r = z_t - (t - r) u,

through two time inputs: t (the backbone's own time input) and the interval h = t - r (an extra
conditioning input named ``h``). The paper's ablation of the time inputs found (t, t - r) as good as
(t, r, t - r) and better than (t, r); it is the paper's default, and it makes r = t (h = 0, plain
flow matching) one fixed point of the second embedding.

Differentiating (t - r) u = integral_r^t v ds in t with r fixed gives the MeanFlow identity
u = v - (t - r) du/dt, with the total derivative du/dt = (du/dz) v + du/dt, one Jacobian-vector
product of the network along the tangent (dz, dr, dt) = (v, 0, 1). The loss regresses

    u_tgt = sg( v - (t - r) du/dt ),    Delta = sum over the sample's elements (u - u_tgt)^2,
    L = mean_batch( sg(w) Delta ),     w = 1 / (Delta + c)^p          (adaptive weighting)

du/dt is taken by forward-mode AD (``jvp = "autograd"``, the default) or, for a device path where
forward-mode AD through the network is slow or missing (fused attention kernels), by a central
difference along the same tangent (``jvp = "finite-difference"``, see ``finite_difference_derivative``).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
from torch import nn

import distillkit
from distillkit import (FD_STEP, JVP_MODES, LossOutput, Method, SamplingModel, broadcast_time, forward_mode_safe,
                        same_dropout, straight_path, unwrap_module, validators)

#: The name of the backbone's extra conditioning input: the interval h = t - r.
INTERVAL = "h"


def _real(instance, attribute, value) -> None:
    validators.require(validators.is_number(value), attribute, value, "a number")


def _fraction(instance, attribute, value) -> None:
    validators.require(validators.is_number(value) and 0 <= value <= 1, attribute, value, "a number in [0, 1]")


@attrs.frozen
class MeanFlowConfig:
    """Defaults: the paper's ImageNet choices (from its ablations); the CIFAR-10 recipe
    (recipes/meanflow-cifar10.toml) sets its own."""

    #: mean of the logit-normal time distribution: t', r' = sigmoid(N(mean, std^2)) (paper: -0.4)
    time_mean: float = attrs.field(default=-0.4, validator=_real)
    #: standard deviation of the logit-normal time distribution (paper: 1.0)
    time_std: float = attrs.field(default=1.0, validator=validators.positive_number)
    #: share of each batch with r < t; the rest has r = t, i.e. flow matching (paper: 25 %)
    interval_fraction: float = attrs.field(default=0.25, validator=_fraction)
    #: p of the adaptive weight w = 1 / (Delta + c)^p (paper: 1.0 on ImageNet; 0 = plain squared L2)
    norm_p: float = attrs.field(default=1.0, validator=validators.non_negative_number)
    #: c of the adaptive weight (paper: 1e-3)
    norm_c: float = attrs.field(default=1e-3, validator=validators.positive_number)
    #: du/dt by ``autograd`` (one torch.func.jvp, the paper's) or ``finite-difference`` (two forward
    #: passes without gradient; for device paths without forward-mode AD through attention)
    jvp: str = attrs.field(default="autograd", validator=validators.one_of(*JVP_MODES))
    #: the finite difference's step, relative to t: t +- fd_step t (only with jvp = "finite-difference")
    fd_step: float = attrs.field(default=FD_STEP, validator=validators.relative_step)


def sample_times(n: int, config: MeanFlowConfig, generator: torch.Generator, *, device=None,
                 dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r), each [n]: two independent logit-normal draws, sorted so that r <= t; then r = t on
    the first n - round(n * interval_fraction) samples (the paper draws the count exactly, on the
    first rows of the batch; the batch order is already random)."""
    draws = torch.randn(2, n, generator=generator, device=device, dtype=dtype)
    times = torch.sigmoid(config.time_mean + config.time_std * draws)
    t, r = times.max(dim=0).values, times.min(dim=0).values
    equal = torch.arange(n, device=device) < n - round(n * config.interval_fraction)
    return t, torch.where(equal, t, r)


def _network_precision(device: torch.device):
    """Autocast off: a finite difference divides a difference of two outputs by a small step, so
    the passes must run in the network's own precision (fp32); bf16's ~4e-3 rounding would swamp
    it. Attention keeps whatever kernel the device picks (no forward-mode AD is needed)."""
    return torch.autocast(device.type, enabled=False)


def finite_difference_derivative(network: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                                 v: torch.Tensor, cond: Optional[torch.Tensor], step: float = FD_STEP):
    """du/dt along the tangent (v, 0, 1) by a central difference, without gradient:

        du/dt ~ (u(z + d v, r, t + d) - u(z - d v, r, t - d)) / (2 d),    d = step * t

    two forward passes, each under the RNG state of the call (the dropout masks of the forward
    pass after it). The step is relative to t: near t = 0 the flow changes on the scale of t
    itself, and the target multiplies du/dt by t - r <= t, so the rounding error the division
    brings, about eps |u| / (step t), stays about eps |u| / step in the target at every t. d is
    the step as rounded, (t+ - t-) / 2 (exact), so the time difference carries no rounding error.
    At r = t the pass at t - d sees the interval h = -d (the embeddings are smooth through 0)."""
    t_plus, t_minus = t * (1 + step), t * (1 - step)
    half = (t_plus - t_minus) / 2
    z_step = broadcast_time(half, z) * v

    def u_at(z_, t_):
        with same_dropout(z.device):
            return network(z_, t_, cond, extra={INTERVAL: t_ - r})

    with torch.no_grad(), _network_precision(z.device):
        difference = u_at(z + z_step, t_plus) - u_at(z - z_step, t_minus)
    return difference / broadcast_time(2 * half, z)


def average_velocity_and_derivative(network: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                                    v: torch.Tensor, cond: Optional[torch.Tensor], *, jvp: str = "autograd",
                                    fd_step: float = FD_STEP):
    """(u, du/dt) at (z, r, t), without gradient. ``autograd``: one ``torch.func.jvp`` of
    (z, r, t) -> u(z, r, t) along the tangent (v, 0, 1); the interval h = t - r is computed inside
    the function, so its tangent is 1 - 0 = 1. ``finite-difference``: ``finite_difference_derivative``
    and a third, plain forward pass for u (the loss does not need this one: it has its own)."""
    if jvp == "finite-difference":
        dudt = finite_difference_derivative(network, z, r, t, v, cond, fd_step)
        with torch.no_grad(), _network_precision(z.device), same_dropout(z.device):
            return network(z, t, cond, extra={INTERVAL: t - r}), dudt

    def u_of(z_, r_, t_):
        return network(z_, t_, cond, extra={INTERVAL: t_ - r_})

    with torch.no_grad(), forward_mode_safe(z.device):
        return torch.func.jvp(u_of, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))


class MeanFlow(Method):
    name = "meanflow"
    config_class = MeanFlowConfig
    conditioning = (INTERVAL,)
    default_sampler = "meanflow"
    # ``meanflow`` steps with u over each whole step; ``consistency`` re-noises the one-step
    # estimate x - t u(x, 0, t). The ``ode`` sampler's Runge-Kutta stages would read u at
    # intermediate times with the step's end, which is not what u means: it is not offered.
    samplers = ("meanflow", "consistency")
    provides = frozenset({"velocity", "denoise"})

    def loss(self, student, batch, generator, step):
        cfg = self.config
        x, cond = batch.x, batch.cond
        n = x.shape[0]
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t, r = sample_times(n, cfg, generator, device=x.device, dtype=x.dtype)
        z, v = straight_path(x, eps, t)
        # The target is under stop-gradient, so du/dt is taken without a graph, on the plain
        # module (forward-mode AD goes through neither DDP's forward nor a compiled graph; the
        # trained pass below goes through them, so DDP still averages the gradients), with the
        # dropout masks of the forward pass below (one forward + one JVP, or + two plain passes).
        dudt = self.total_derivative(unwrap_module(student), z, r, t, v, cond)
        u = student(z, t, cond, extra={INTERVAL: t - r})
        target = (v - broadcast_time(t - r, x) * dudt).detach()
        delta = (u - target).square().flatten(1).sum(1)
        weight = (delta.detach() + cfg.norm_c).pow(-cfg.norm_p)
        loss = (weight * delta).mean()
        return LossOutput(loss, {"mse": delta.detach().mean() / x[0].numel()})

    def total_derivative(self, network, z, r, t, v, cond) -> torch.Tensor:
        """du/dt along (v, 0, 1) as configured; the loss's own forward pass gives u."""
        if self.config.jvp == "finite-difference":
            return finite_difference_derivative(network, z, r, t, v, cond, self.config.fd_step)
        with same_dropout(z.device):
            return average_velocity_and_derivative(network, z, r, t, v, cond)[1]

    # sampling -----------------------------------------------------------------------------------
    def velocity_fn(self, student, cond=None):
        """The instantaneous velocity: u(x, t, t) (h = 0)."""

        def velocity(x, t):
            return student(x, t, cond, extra={INTERVAL: torch.zeros_like(t)})

        return velocity

    def sampling_model(self, network, cond=None):
        """The average velocity over the step (r = t_next), and the one-step estimate of the data
        x0 = x - t u(x, 0, t)."""

        def step_velocity(x, t, t_next):
            return network(x, t, cond, extra={INTERVAL: t - t_next})

        def denoise(x, t):
            return x - broadcast_time(t, x) * network(x, t, cond, extra={INTERVAL: t})

        return SamplingModel(velocity=step_velocity, denoise=denoise)

    def network_evals_per_step(self):
        # The forward pass with gradient, and the JVP (its own primal pass plus the tangent), or
        # the finite difference's two passes without gradient (its u is the forward pass's).
        if self.config.jvp == "finite-difference":
            return {"with_grad": 1, "no_grad": 2}
        return {"with_grad": 1, "no_grad": 0, "jvp": 1}

    def tags(self):
        return {"distillkit.meanflow.time_inputs": "t,t-r",
                "distillkit.meanflow.jvp": self.config.jvp,
                "distillkit.meanflow.interval_fraction": str(self.config.interval_fraction),
                "distillkit.meanflow.norm_p": str(self.config.norm_p)}


class MeanFlowSampler(distillkit.Sampler):
    """x_{t_next} = x_t - (t - t_next) u(x_t, t_next, t) on the run's time grid: one evaluation a
    step. With one step, x = eps - u(eps, 0, 1), the paper's 1-NFE sample."""

    name = "meanflow"
    needs = frozenset({"velocity"})

    def steps_for_nfe(self, nfe: int) -> int:
        return nfe

    def sample(self, model, noise, time_grid, fresh_noise):
        times = distillkit.validate_time_grid(time_grid).tolist()
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            now = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            end = torch.full_like(now, t_next)
            x = x - (t - t_next) * model.velocity(x, now, end)
        return x
