"""Closed forms and toy networks shared by the one-step methods' tests (dmd2, sid, meanflow, scm).

Everything here is written from the Gaussian algebra, independently of the plugins: for data
x ~ N(mu, s^2 I) and x_t = (1 - t) x + t eps,

    x_t ~ N((1 - t) mu, V I),  V = (1 - t)^2 s^2 + t^2,
    E[x | x_t] = mu + c (x_t - (1 - t) mu),  c = (1 - t) s^2 / V,
    v(x_t, t) = E[eps - x | x_t] = (x_t - E[x | x_t]) / t.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import distillkit
from distillkit.config import run_config_from_dict
from distillkit.resolve import resolve
from distillkit.tracking import NullTracker
from distillkit.training.build import build_model
from distillkit.training.checkpoint import load_checkpoint
from distillkit.training.trainer import train

from crashing import Crash, assert_same, crash_at


def gaussian_slope(t: torch.Tensor, s: float) -> torch.Tensor:
    """c = dE[x | x_t] / dx_t = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2), per sample [B, 1]."""
    t = t.reshape(-1, 1)
    return (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2)


def gaussian_x0(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    return mu + gaussian_slope(t, s) * (x_t - (1 - t.reshape(-1, 1)) * mu)


def gaussian_velocity(x_t, t, mu, s):
    return (x_t - gaussian_x0(x_t, t, mu, s)) / t.reshape(-1, 1)


def mixture_x0(x_t: torch.Tensor, t: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """E[x | x_t] for an equal-weight mixture of N(mu_k, std^2 I): each component's posterior mean
    weighted by its responsibility (Bayes with the marginal N((1 - t) mu_k, V I))."""
    t = t.reshape(-1, 1, 1).double()
    x = x_t.double()[:, None, :]
    mu = means.double()[None]
    variance = (1 - t) ** 2 * std**2 + t**2
    centred = x - (1 - t) * mu
    log_density = -0.5 * centred.square().sum(-1, keepdim=True) / variance - centred.shape[-1] / 2 * torch.log(variance)
    weights = torch.softmax(log_density, dim=1)
    component = mu + (1 - t) * std**2 / variance * centred
    return (weights * component).sum(1).to(x_t.dtype)


class RecordingTeacher(distillkit.Teacher):
    """A teacher that remembers where it was asked: the velocity of N(mu, s^2 I), or of another
    teacher it wraps. Differentiable in x (an analytic field in torch)."""

    name = "recording-test-teacher"

    def __init__(self, mu=None, s=None, wrapped=None):
        self.mu, self.s, self.wrapped = mu, s, wrapped
        self.identity = "recording-test-teacher"
        self.calls = []

    def velocity(self, x, t, cond=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        if self.wrapped is not None:
            return self.wrapped.velocity(x, t, cond)
        return gaussian_velocity(x, t, self.mu, self.s)


class GaussianGenerator(nn.Module):
    """A generator whose samples are exactly N(mu_g, s_g^2 I): the plugins read a generator as a
    velocity network at (x_in, tau) = (t_g eps, t_g) and take x_g = x_in - tau * out, so out =
    (x_in - mu_g - s_g x_in / tau) / tau gives x_g = mu_g + s_g eps. Records its input and output."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float32).clone())
        self.s = nn.Parameter(torch.tensor(float(s)))
        self.records = []

    def forward(self, x, t, cond=None):
        tau = t.reshape(-1, 1)
        out = (x - self.mu - self.s * x / tau) / tau
        out.retain_grad()
        self.records.append((x.detach(), t.detach(), out))
        return out


class GaussianScore(nn.Module):
    """The exact velocity of N(mu, s^2 I) as a (frozen) fake-score network."""

    def __init__(self, mu, s):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32).clone())
        self.s = float(s)

    def forward(self, x, t, cond=None):
        return gaussian_velocity(x, t, self.mu, self.s)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic)."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


# -- training on toy2d through the trainer ---------------------------------------------------

SMALL_MLP = {"hidden": 64, "layers": 2, "time_embedding_dim": 16}


def toy2d_tree(method: str, steps: int, *, lr=1e-3, fake_lr=1e-3, method_options=None, **train_options):
    return {
        "method": method, "dataset": "toy2d", "seed": 0, "teacher": "toy2d-exact",
        "dataset_options": {"train_size": 2048}, "backbone_options": dict(SMALL_MLP),
        "method_options": dict(method_options or {}),
        "train": {"max_steps": steps, "batch_size": 128, "lr": lr, "warmup_steps": 0, "lr_schedule": "constant",
                  "ema_decay": [0.9], "log_every": 10, "networks": {"fake_score": {"lr": fake_lr}}, **train_options},
        "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1},
    }


def resolved(tree):
    return resolve(run_config_from_dict(tree), distillkit.get_registries())


def toy2d_teacher(r):
    return distillkit.get_registries().teachers.get("toy2d-exact")(r.dataset_config)


def run(tree, folder: Path, **kwargs):
    r = resolved(tree)
    return train(r, NullTracker(), folder, teacher=toy2d_teacher(r), progress=False, log=lambda line: None, **kwargs)


def one_step_samples(method, network, n=2000, seed=2):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return method.sampling_model(network).denoise(noise, torch.ones(n))


def demonstration(method: str, steps: int, folder: Path, **tree_options) -> tuple[float, float, float]:
    """(energy distance untrained, trained, seconds) at NFE 1 against 2000 exact toy2d samples."""
    tree = toy2d_tree(method, steps, **tree_options)
    r = resolved(tree)
    data = r.dataset_cls(r.dataset_config)
    reference = data.reference_samples(2000, torch.Generator().manual_seed(1))
    untrained_method, untrained = build_model(r, data.spec, torch.device("cpu"), seed=0)
    before = energy_distance(one_step_samples(untrained_method, untrained.eval()), reference)
    started = time.perf_counter()
    result = run(tree, folder)
    trained = distillkit.load_trained_model(result.checkpoint, weights="online")
    after = energy_distance(one_step_samples(trained.method, trained.model), reference)
    return before, after, time.perf_counter() - started


def assert_resume_is_bitwise(method: str, folder: Path, steps: int = 12, every: int = 4, crash: int = 6, **options):
    tree = toy2d_tree(method, steps, checkpoint_every=every, **options)
    whole = run(tree, folder / "whole")
    try:
        run(tree, folder / "parts", on_step=crash_at(crash))
    except Crash:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    payload = load_checkpoint(folder / "parts" / "checkpoint.pt")
    assert payload["step"] == (crash // every) * every
    resumed = run(tree, folder / "parts", resume=payload)
    assert resumed.resumed_from_step == payload["step"]
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("student", "emas", "networks", "network_emas", "network_ema_state", "optimizers", "schedulers",
                "method", "skipped_steps"):
        assert_same(a[key], b[key], key)
    return a


class CallCounter:
    """Counts a callable's evaluations: ``with_grad`` when its output carries a graph, else ``no_grad``."""

    def __init__(self):
        self.counts = {"with_grad": 0, "no_grad": 0}

    def count(self, output):
        tensor = output[0] if isinstance(output, tuple) else output
        self.counts["with_grad" if tensor.requires_grad else "no_grad"] += 1
        return output


class Counted(nn.Module):
    def __init__(self, module, counter):
        super().__init__()
        self.module, self.counter = module, counter

    def forward(self, *args, **kwargs):
        return self.counter.count(self.module(*args, **kwargs))


class CountingNetwork(nn.Module):
    """Records, for each forward call, whether gradients were on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args, **kwargs):
        self.calls.append(torch.is_grad_enabled())
        return self.inner(*args, **kwargs)
