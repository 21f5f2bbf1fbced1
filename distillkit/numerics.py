"""Numerics that several methods share, in one public version each.

Plugins import these from ``distillkit`` (``from distillkit import straight_path, TargetNetwork``);
this module is their home. Convention everywhere: t = 0 data, t = 1 noise, time tensors have
shape [batch] (one time per sample) and are broadcast over the sample's other dimensions.

``broadcast_time(t, like)``            t [B] -> [B, 1, ..., 1], shaped to multiply ``like`` [B, ...]
``uniform_time(n, generator, t_min)``  t ~ U(t_min, 1) per sample
``straight_path(x, eps, t)``           x_t = (1 - t) x + t eps and its velocity v* = eps - x
``rk_slopes`` / ``rk_step_per_sample`` one explicit Runge-Kutta step with a time and a step size
                                       per sample (the core's ``rk_step`` takes one float t and h)
``TargetNetwork``, ``ema_update_``     a frozen copy of a network that follows it by an EMA
``same_dropout``, ``forward_mode_safe`` the contexts of a derivative along a tangent (MeanFlow,
                                       sCT / sCD): the same dropout in two passes, a JVP-safe pass
``JVP_MODES``, ``FD_STEP``             how such a derivative is taken, and a finite difference's step

Each function keeps the exact floating-point operations (and their order) the built-in methods
used before they shared it, so a method's results do not change by a bit when it switches.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .integrators.tableau import ButcherTableau

#: ``velocity(x, t)`` with ``t`` of shape [batch]
PerSampleVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# the straight path


def broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` of shape [B] as [B, 1, ..., 1] with ``like.dim()`` dimensions (a view where possible),
    so that ``broadcast_time(t, x) * x`` scales sample n by t[n]."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def uniform_time(
    n: int, generator: torch.Generator, t_min: float, *, device: Any = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """t = u (1 - t_min) + t_min with u ~ U(0, 1): n times in [t_min, 1), one draw of ``n``
    uniforms from ``generator``."""
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (1.0 - t_min) + t_min


def straight_path(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v*) on the straight path from data ``x`` (t = 0) to noise ``eps`` (t = 1):

        x_t = (1 - t) x + t eps,     v* = d x_t / dt = eps - x,

    with ``t`` of shape [B], one time per sample, broadcast over the other dimensions of ``x``.
    Computed as ``(1.0 - t_b) * x + t_b * eps``: x_0 = x and x_1 = eps exactly.
    """
    t_b = broadcast_time(t, x)
    return (1.0 - t_b) * x + t_b * eps, eps - x


# ------------------------------------------------------------------------------------------------
# an explicit Runge-Kutta step per sample


def rk_slopes(
    velocity: PerSampleVelocity,
    x: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    tableau: ButcherTableau,
    first_slope: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """The stage slopes k_1 .. k_s of one explicit Runge-Kutta step, per sample n:

        k_i = v(x + h sum_{j<i} a_ij k_j,  t + c_i h)

    with ``t`` and ``h`` of shape [B] (h < 0 steps toward the data end). Each stage adds
    ``(a_ij * h_b) * k_j`` for every non-zero a_ij in order. ``first_slope``, when given, is
    k_1 (an explicit tableau's first stage is at (x, t)), detached, and not evaluated again.
    """
    step = broadcast_time(h, x)
    slopes: list[torch.Tensor] = []
    for i, (row, c) in enumerate(zip(tableau.a, tableau.c)):
        if i == 0 and first_slope is not None:
            slopes.append(first_slope.detach())
            continue
        stage = x
        for a_ij, k_j in zip(row, slopes):
            if a_ij != 0.0:
                stage = stage + (a_ij * step) * k_j
        slopes.append(velocity(stage, t + c * h))
    return slopes


def combine_slopes(x: torch.Tensor, h: torch.Tensor, weights: Sequence[float], slopes: Sequence[torch.Tensor]) -> torch.Tensor:
    """x + h sum_i w_i k_i per sample, adding ``(w_i * h_b) * k_i`` for every non-zero w_i in order."""
    step = broadcast_time(h, x)
    out = x
    for w_i, k_i in zip(weights, slopes):
        if w_i != 0.0:
            out = out + (w_i * step) * k_i
    return out


def rk_step_per_sample(
    velocity: PerSampleVelocity, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, tableau: ButcherTableau
) -> torch.Tensor:
    """One explicit Runge-Kutta step per sample, each from its own time t[n] by its own h[n]:

        k_i = v(x + h sum_j a_ij k_j,  t + c_i h),     x' = x + h sum_i b_i k_i.

    A tableau of order p is exact for velocities that are polynomials in t of degree < p and has
    local error O(h^(p+1)). Row n equals the core's ``rk_step(v, x[n:n+1], t[n], h[n], tableau)``
    up to rounding (that one scales by a float h in a fused add).
    """
    return combine_slopes(x, h, tableau.b, rk_slopes(velocity, x, t, h, tableau))


# ------------------------------------------------------------------------------------------------
# a target network


@torch.no_grad()
def ema_update_(average: nn.Module, current: nn.Module, decay: float, *, average_buffers: bool = True) -> None:
    """θ⁻ ← decay θ⁻ + (1 - decay) θ in place, per tensor as ``θ⁻.lerp_(θ, 1 - decay)``.

    Parameters are averaged; floating buffers too when ``average_buffers`` (else copied); other
    buffers (counters) are copied. decay = 0 copies θ exactly, decay = 1 leaves θ⁻ as it is.
    """
    for target, online in zip(average.parameters(), current.parameters()):
        _follow(target, online, decay, average=True)
    for target, online in zip(average.buffers(), current.buffers()):
        _follow(target, online, decay, average=average_buffers)


def _follow(target: torch.Tensor, online: torch.Tensor, decay: float, average: bool) -> None:
    if average and target.is_floating_point():
        target.lerp_(online.detach(), 1.0 - decay)
    else:
        target.copy_(online)


class TargetNetwork:
    """θ⁻: a frozen copy of an online network θ that follows it by an exponential moving average,

        θ⁻ ← μ θ⁻ + (1 - μ) θ        computed per tensor as ``θ⁻.lerp_(θ, 1 - μ)``,

    the target networks of consistency models, CUD's EMA target and CUD stage 2's regulariser.
    Floating buffers are averaged the same way (``average_buffers=True``, as the trainer's EMA)
    or copied (``False``); other buffers are always copied.

    The copy is made by ``start(online)`` (a deep copy, same device, dtype and train/eval mode,
    ``requires_grad`` off). A state loaded before that (a checkpoint restored before the method's
    ``prepare``) is kept and applied when the copy is made, and returned by ``state_dict`` until
    then. The state dict is the copy's own, so checkpoints hold it unchanged.
    """

    def __init__(self, *, average_buffers: bool = True):
        self.average_buffers = average_buffers
        self.module: Optional[nn.Module] = None
        self._pending: Optional[dict[str, Any]] = None

    @property
    def started(self) -> bool:
        return self.module is not None

    def start(self, online: nn.Module) -> nn.Module:
        """θ⁻ = θ (then any state loaded before); returns the copy."""
        self.module = copy.deepcopy(online).requires_grad_(False)
        if self._pending is not None:
            self.module.load_state_dict(self._pending)
            self._pending = None
        return self.module

    def ensure(self, online: nn.Module) -> nn.Module:
        """The copy, made from ``online`` first if there is none yet."""
        return self.module if self.module is not None else self.start(online)

    def update(self, online: nn.Module, decay: float) -> None:
        """θ⁻ ← decay θ⁻ + (1 - decay) θ (``ema_update_``; see the class docstring for buffers)."""
        if self.module is None:
            raise RuntimeError("TargetNetwork.update before start(): there is no copy to update")
        ema_update_(self.module, online, decay, average_buffers=self.average_buffers)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module is None:
            raise RuntimeError("TargetNetwork called before start(): there is no copy yet")
        return self.module(*args, **kwargs)

    def state_dict(self) -> Optional[dict[str, Any]]:
        """The copy's state dict, or the one loaded for it before it was made, or None."""
        if self.module is not None:
            return self.module.state_dict()
        return self._pending

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.module is not None:
            self.module.load_state_dict(state)
        else:
            self._pending = dict(state)  # applied by start()


def generator_x0(network: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                 cond: Optional[torch.Tensor], generator_time: float) -> torch.Tensor:
    """A one-step generator built on a velocity network (DMD2, SiD): the x0 estimate
    x_in - tau * net(x_in, tau), so that a generator copied from the teacher starts as the
    teacher's denoiser.

    At t = 1 the state is pure noise eps; it is read as the state at ``generator_time`` t_g with
    nothing of the data in it: x_in = t_g eps, tau = t_g (DMD2: EDM's sigma_max = 80,
    t_g = 80/81; SiD: sigma_init = 2.5, t_g = 2.5/3.5). Below t = 1 (a k-step generator's later
    steps) the state is read as it is, at its own time."""
    top = t >= 1
    tau = torch.where(top, torch.full_like(t, generator_time), t)
    x_in = x * broadcast_time(torch.where(top, tau, torch.ones_like(t)), x)
    return x_in - broadcast_time(tau, x) * network(x_in, tau, cond)


def unwrap_module(network: nn.Module) -> nn.Module:
    """The plain module under the trainer's wrappers: DistributedDataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``), however nested. For what must not go through a wrapper:
    forward-mode AD (a JVP), a target or EMA copy, the student's own extra parts."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            network = network._orig_mod
        else:
            return network


#: How a method takes a network's derivative along a tangent: forward-mode AD
#: (``torch.func.jvp``) or a central finite difference (two passes without gradient, for device
#: paths without forward-mode AD through the network's attention).
JVP_MODES = ("autograd", "finite-difference")
#: The default step of such a finite difference, relative to the time it is taken at
#: (``validators.relative_step`` bounds it).
FD_STEP = 1e-3


def same_dropout(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork the RNG: the pass inside the block draws the randomness (dropout masks) that the pass
    after it draws too, so that a derivative or a target is taken of the very network output
    that is trained."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def forward_mode_safe(device: torch.device) -> contextlib.ExitStack:
    """For a JVP: attention on the math kernel (the flash and memory-efficient SDPA kernels, CPU's
    flash included, have no forward-mode AD) and autocast off (the tangent in the network's own
    precision, fp32, as MeanFlow's PyTorch code takes it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    stack.enter_context(torch.autocast(device.type, enabled=False))
    return stack
