"""sCT and sCD: continuous-time consistency models (Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", arXiv 2410.11081), trained in TrigFlow coordinates
around a backbone that sees the project's (x_t, t) (see ``trigflow`` for the mapping).

Per sample (s is the TrigFlow angle; the paper's t):

    tau ~ N(P_mean, P_std^2), sigma = clamp(e^tau, sigma_min, sigma_max), s = arctan(sigma / sigma_d)
    x_s = cos s x + sin s z,  z = sigma_d eps                  (= sigma_d x_t / N(t), t = sigma / (1 + sigma))
    dx_s/ds = cos s z - sin s x                                   sCT (the conditional velocity)
            = sigma_d F_teacher(x_s, s)                           sCD (the teacher's v mapped to TrigFlow)
    F^-, J = jvp(F_theta^-, (x_s, s), (cos s sin s dx_s/ds, cos s sin s))    J = cos s sin s dF^-/ds
    g = -cos^2 s (sigma_d F^- - dx_s/ds) - r (cos s sin s x_s + sigma_d J)   (= cos s df^-/ds at r = 1)
    r = min(1, step / H)                                          the tangent warm-up
    g <- g / (||g|| + c)                                          the tangent normalisation
    L = mean[ e^{w_phi(s)} lambda(s) / D ||F_theta(x_s, s) - F^- - g||^2 - w_phi(s) ],  lambda = 1 / (sigma_d tan s)

F_theta^- is the online network under stop-gradient (no EMA target, as in the paper). The JVP
runs under no_grad on the unwrapped network (``torch.func.jvp`` cannot see through DDP) and the
gradient pass runs through the wrapped one, with the same dropout masks (the RNG is forked).
F_theta(x_s, s) is the backbone's output v(x_t, t), read as our velocity and mapped exactly to
TrigFlow's F; the consistency function is then f = x_t - t v in our frame.

With ``jvp = "finite-difference"`` J is a central difference along the same tangent instead
(two forward passes without gradient; for a device path without forward-mode AD through the
network's attention), and F^- is the gradient pass's own output, detached.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs
import torch
from torch import nn

import distillkit
from distillkit import (FD_STEP, JVP_MODES, Batch, LossOutput, Method, SamplingModel, broadcast_time,
                        copy_teacher_weights, forward_mode_safe, same_dropout, unwrap_module, validators)

from .trigflow import linear_from_trigflow, time_from_angle, trigflow_velocity

NORMALIZATIONS = ("rms", "l2", "clip", "none")
PRIOR_WEIGHTINGS = ("inverse-sigma", "none")


# ------------------------------------------------------------------------------------------------
# options


def _real(instance, attribute, value):
    validators.require(validators.is_number(value) and math.isfinite(value), attribute, value, "a finite number")


@attrs.frozen
class SCMConfig:
    #: sigma_d, the data standard deviation of TrigFlow (0.5 for images in [-1, 1])
    sigma_data: float = attrs.field(default=0.5, validator=validators.positive_number)
    #: log-normal proposal of sigma = sigma_d tan s: ln sigma ~ N(p_mean, p_std^2)
    p_mean: float = attrs.field(default=-1.0, validator=_real)
    p_std: float = attrs.field(default=1.4, validator=validators.positive_number)
    #: the drawn sigma is clamped to [sigma_min, sigma_max] (t = sigma / (1 + sigma))
    sigma_min: float = attrs.field(default=0.002, validator=validators.positive_number)
    sigma_max: float = attrs.field(default=800.0, validator=validators.positive_number)
    #: H: the tangent's r coefficient grows linearly from 0 to 1 over the first H steps (0: r = 1)
    tangent_warmup_steps: int = attrs.field(default=10000, validator=validators.non_negative_int)
    #: rms: g / (||g||/sqrt(D) + c); l2: g / (||g|| + c); clip: g clipped to [-1, 1]; none
    tangent_normalization: str = attrs.field(default="rms", validator=validators.one_of(*NORMALIZATIONS))
    #: c of the tangent normalisation
    tangent_norm_c: float = attrs.field(default=0.1, validator=validators.positive_number)
    #: the learned adaptive weighting w_phi(s) (a small head on Fourier features of ln sigma)
    adaptive_weighting: bool = attrs.field(default=True, validator=validators.boolean)
    #: Fourier features of the adaptive weighting's head
    logvar_features: int = attrs.field(default=128, validator=validators.positive_int)
    #: lambda(s): inverse-sigma = 1 / (sigma_d tan s); none = 1
    prior_weighting: str = attrs.field(default="inverse-sigma", validator=validators.one_of(*PRIOR_WEIGHTINGS))
    #: dF^-/ds by ``autograd`` (one torch.func.jvp, the paper's) or ``finite-difference`` (two forward
    #: passes without gradient; for device paths without forward-mode AD through attention)
    jvp: str = attrs.field(default="autograd", validator=validators.one_of(*JVP_MODES))
    #: the finite difference's step, relative to s: s +- fd_step s (only with jvp = "finite-difference")
    fd_step: float = attrs.field(default=FD_STEP, validator=validators.relative_step)

    def __attrs_post_init__(self):
        if self.sigma_max <= self.sigma_min:
            raise distillkit.ConfigError("sigma_max", self.sigma_max, f"a number > sigma_min = {self.sigma_min}")


@attrs.frozen
class SCDConfig(SCMConfig):
    #: start the student's backbone from the teacher's network when the shapes match
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)


# ------------------------------------------------------------------------------------------------
# the student: the backbone plus the adaptive weighting's head


class LogVarianceHead(nn.Module):
    """w_phi(s): fixed random Fourier features of ln(sigma) / 4 (EDM2's logvar input) and a linear
    layer to one number, initialised at zero (w = 0: every time weighted equally at the start)."""

    def __init__(self, features: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # fixed features: not drawn from the global RNG
        self.register_buffer("frequencies", torch.randn(features, generator=generator))
        self.register_buffer("phases", torch.rand(features, generator=generator))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * (torch.outer(log_sigma / 4, self.frequencies.to(log_sigma.dtype)) + self.phases.to(log_sigma.dtype))
        features = math.sqrt(2) * angle.cos()
        return self.linear(features).squeeze(1)


class SCMStudent(nn.Module):
    """The trained module: ``backbone`` (our velocity v(x_t, t)) and the adaptive weighting's head.
    ``forward(x, t, cond)`` is the backbone's; with ``log_sigma`` it also returns w_phi, so that
    the head's parameters are used inside the (possibly DDP-wrapped) forward pass."""

    def __init__(self, backbone: nn.Module, logvar: Optional[LogVarianceHead]):
        super().__init__()
        self.backbone = backbone
        self.logvar = logvar

    def forward(self, x, t, cond=None, log_sigma: Optional[torch.Tensor] = None):
        v = self.backbone(x, t, cond)
        if log_sigma is None:
            return v
        return v, self.logvar(log_sigma)




# ------------------------------------------------------------------------------------------------
# the method


class _ContinuousConsistency(Method):
    default_sampler = "consistency"
    provides = frozenset({"velocity", "denoise"})

    # the student, sampling --------------------------------------------------------------------------
    def build_student(self, backbone):
        head = LogVarianceHead(self.config.logvar_features) if self.config.adaptive_weighting else None
        return SCMStudent(backbone, head)

    def velocity_fn(self, student, cond=None):
        """The backbone's output: our velocity v, with (x - f(x, t)) / t = v, so one Euler step
        from t to 0 is the consistency sample f(x, t) = x - t v."""
        return lambda x, t: student(x, t, cond)

    def sampling_model(self, network, cond=None):
        """The consistency function f(x, t) = x - t v(x, t) as ``denoise`` (the registered
        ``consistency`` sampler: one step, or re-noising onto the straight path, which is the
        paper's x_s = cos s x_hat + sin s sigma_d z mapped into ours); v for the ``ode`` sampler."""

        def denoise(x, t):
            return x - broadcast_time(t, x) * network(x, t, cond)

        return SamplingModel(velocity=lambda x, t, t_next: network(x, t, cond), denoise=denoise, t_min=0.0)

    # pieces of the loss -------------------------------------------------------------------------------
    def draw_angles(self, n: int, generator: torch.Generator, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, ln sigma): ln sigma ~ N(p_mean, p_std^2) clamped to [ln sigma_min, ln sigma_max],
        s = arctan(sigma / sigma_d)."""
        cfg = self.config
        log_sigma = cfg.p_mean + cfg.p_std * torch.randn(n, generator=generator, device=device, dtype=dtype)
        log_sigma = log_sigma.clamp(math.log(cfg.sigma_min), math.log(cfg.sigma_max))
        return torch.atan(log_sigma.exp() / cfg.sigma_data), log_sigma

    def trigflow_network(self, network: nn.Module, cond: Optional[torch.Tensor]):
        """F(x_s, s): the network's v at (x_t(x_s, s), t(s)) mapped to TrigFlow's F."""
        sigma_data = self.config.sigma_data

        def F(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            t = time_from_angle(s, sigma_data)
            x_t = linear_from_trigflow(x_s, s, sigma_data)
            return trigflow_velocity(network(x_t, t, cond), x_t, t, s, sigma_data)

        return F

    def tangent_warmup(self, step: int) -> float:
        """r = min(1, step / H); r = 1 when H = 0."""
        horizon = self.config.tangent_warmup_steps
        return 1.0 if horizon == 0 else min(1.0, step / horizon)

    def derivative(self, network: nn.Module, x_s, s, dxds, cond) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(F^-, J), J = cos s sin s dF^-/ds along (dx_s/ds, 1), without gradient, on the plain
        module, each pass under the RNG state of the call. ``autograd``: one JVP whose tangents
        are scaled by cos s sin s (as the paper does, for a tangent that stays finite near
        s = pi/2). ``finite-difference``: F^- is None (the caller has it from its own pass) and

            J ~ cos s sin s (F(x_s + d dx_s/ds, s + d) - F(x_s - d dx_s/ds, s - d)) / (2 d),  d = step s

        The step is relative to s (as FastGen's fallback): near s = 0 F changes on the scale of s,
        and J carries the factor cos s sin s < s, so the rounding error of the division, about
        eps |F| / (step s), stays about eps |F| / step in J at every s. d is the step as rounded,
        (s+ - s-) / 2 (exact). Near s = pi/2 the pass at s + d crosses pi/2: t(s) and x_t(x_s, s)
        are smooth there (t slightly above 1), so no clamp (which would bias the difference)."""
        F = self.trigflow_network(unwrap_module(network), cond)
        scale = s.cos() * s.sin()
        if self.config.jvp == "autograd":
            with torch.no_grad(), forward_mode_safe(x_s.device):
                return torch.func.jvp(F, (x_s, s), (broadcast_time(scale, x_s) * dxds, scale))
        step = self.config.fd_step
        s_plus, s_minus = s * (1 + step), s * (1 - step)
        half = (s_plus - s_minus) / 2
        x_step = broadcast_time(half, x_s) * dxds

        def F_at(x_, s_):
            with same_dropout(x_s.device):
                return F(x_, s_)

        # autocast off: a difference divided by a small step needs the network's own precision
        with torch.no_grad(), torch.autocast(x_s.device.type, enabled=False):
            difference = F_at(x_s + x_step, s_plus) - F_at(x_s - x_step, s_minus)
        return None, broadcast_time(scale / (2 * half), x_s) * difference

    def tangent_from(self, F_minus, J, x_s, s, dxds, r: float) -> torch.Tensor:
        """g = -cos^2 s (sigma_d F^- - dx_s/ds) - r (cos s sin s x_s + sigma_d J): cos s df^-/ds at r = 1."""
        sigma_data = self.config.sigma_data
        cos, sin = broadcast_time(s.cos(), x_s), broadcast_time(s.sin(), x_s)
        return -cos * cos * (sigma_data * F_minus - dxds) - r * (cos * sin * x_s + sigma_data * J)

    def tangent(self, network: nn.Module, x_s, s, dxds, cond, r: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(F^-, g) with g = cos s df^-/ds at r = 1, before normalisation, F^- = sg F_theta. With
        finite differences F^- is a third, plain pass (the loss uses its gradient pass's instead)."""
        F_minus, J = self.derivative(network, x_s, s, dxds, cond)
        if F_minus is None:
            with torch.no_grad(), torch.autocast(x_s.device.type, enabled=False), same_dropout(x_s.device):
                F_minus = self.trigflow_network(unwrap_module(network), cond)(x_s, s)
        return F_minus, self.tangent_from(F_minus, J, x_s, s, dxds, r)

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.tangent_normalization == "clip":
            return g.clamp(-1.0, 1.0)
        if cfg.tangent_normalization == "none":
            return g
        norm = g.flatten(1).norm(dim=1)
        if cfg.tangent_normalization == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / broadcast_time(norm + cfg.tangent_norm_c, g)

    def ode_tangent(self, x: torch.Tensor, z: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """dx_s/ds: the PF-ODE's direction at (x_s, s) (sCT: the conditional one)."""
        raise NotImplementedError

    # the loss ---------------------------------------------------------------------------------------
    def loss(self, student, batch: Batch, generator, step):
        cfg = self.config
        x, cond = batch.x, batch.cond
        n = x.shape[0]
        s, log_sigma = self.draw_angles(n, generator, x.device, x.dtype)
        z = cfg.sigma_data * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_s = broadcast_time(s.cos(), x) * x + broadcast_time(s.sin(), x) * z
        dxds = self.ode_tangent(x, z, x_s, s, cond)
        r = self.tangent_warmup(step)
        with same_dropout(x.device):
            F_minus, J = self.derivative(student, x_s, s, dxds, cond)

        # the gradient pass, through the (possibly wrapped) student, with the JVP's dropout masks
        t = time_from_angle(s, cfg.sigma_data)
        x_t = linear_from_trigflow(x_s, s, cfg.sigma_data)
        if cfg.adaptive_weighting:
            v, logvar = student(x_t, t, cond, log_sigma=log_sigma)
        else:
            v, logvar = student(x_t, t, cond), torch.zeros_like(s)
        F = trigflow_velocity(v, x_t, t, s, cfg.sigma_data)
        if F_minus is None:  # finite differences: sg F_theta is this pass's own output
            F_minus = F.detach()
        g = self.tangent_from(F_minus, J, x_s, s, dxds, r)
        target_shift = self.normalize(g)
        residual = (F - F_minus - target_shift).flatten(1).square().mean(1)  # ||.||^2 / D
        prior = (-log_sigma).exp() if cfg.prior_weighting == "inverse-sigma" else torch.ones_like(s)
        per_sample = logvar.exp() * prior * residual - logvar
        metrics = {
            "tangent_rms": g.detach().flatten(1).square().mean(1).sqrt().mean(),
            "tangent_warmup": r,
            "logvar_mean": logvar.detach().mean(),
        }
        return LossOutput(per_sample.mean(), metrics)

    def tags(self):
        cfg = self.config
        return {
            f"distillkit.{self.name}.tangent_normalization": cfg.tangent_normalization,
            f"distillkit.{self.name}.adaptive_weighting": str(cfg.adaptive_weighting),
            f"distillkit.{self.name}.jvp": cfg.jvp,
        }

    def derivative_evals(self) -> dict:
        """The JVP, or the finite difference's two passes without gradient (F^- is the gradient
        pass's own output)."""
        return {"no_grad": 2} if self.config.jvp == "finite-difference" else {"no_grad": 0, "jvp": 1}


class ContinuousConsistencyTraining(_ContinuousConsistency):
    """sCT: no teacher; the PF-ODE's direction is the conditional one, cos s z - sin s x."""

    name = "sct"
    config_class = SCMConfig

    def ode_tangent(self, x, z, x_s, s, cond):
        return broadcast_time(s.cos(), x) * z - broadcast_time(s.sin(), x) * x

    def network_evals_per_step(self):
        return {"with_grad": 1, **self.derivative_evals()}


class ContinuousConsistencyDistillation(_ContinuousConsistency):
    """sCD: the PF-ODE's direction is the teacher's, sigma_d F_teacher(x_s, s)."""

    name = "scd"
    config_class = SCDConfig
    requires_teacher = True

    def __init__(self, config: Any, context):
        super().__init__(config, context)
        self.init_source = "random"

    def prepare(self, student, context):
        if self.config.init_from_teacher and self.context.teacher is not None:
            self.init_source = copy_teacher_weights(student.backbone, self.context.teacher)

    def _teacher(self):
        if self.context.teacher is None:
            raise distillkit.UsageError("scd distils a teacher: pass --teacher (a run id, a checkpoint file or a teacher name)")
        return self.context.teacher

    def ode_tangent(self, x, z, x_s, s, cond):
        teacher = self._teacher()
        sigma_data = self.config.sigma_data
        with torch.no_grad():
            t = time_from_angle(s, sigma_data)
            x_t = linear_from_trigflow(x_s, s, sigma_data)
            return sigma_data * trigflow_velocity(teacher.velocity(x_t, t, cond), x_t, t, s, sigma_data)

    def network_evals_per_step(self):
        evals = {"with_grad": 1, **self.derivative_evals()}
        evals["no_grad"] += 1  # the teacher
        return evals

    def tags(self):
        tags = super().tags()
        tags["distillkit.scd.init"] = self.init_source
        return tags
