"""CUD stage 1, every option against formulas written out independently here (METHODS.md §2.2-2.9).

The draws are replayed from the same seeded generator in the order the loss documents (noise, then
t, then the uniform behind Δ where Δ is random) and every formula below is written from the spec,
not from the plugin's code.
"""

import copy
import math
import types

import pytest
import torch
from torch import nn

import distillkit
from distillkit import Batch, DataSpec, MethodContext, PrepareContext
from distillkit_cud.encoder import gaussian_kl
from distillkit_cud.loss import catch_up_targets, distance, draw_times, loss_weights
from distillkit_cud.method import PAPER_RK3, CUDConfig, ema_update_
from distillkit_cud.sampling import euler_sample, heun_sample, one_step_sample

T_MIN = 1e-5
N = 64


def field(x, t):
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return torch.sin(x) * (1 + t) + t**2 - 0.3 * x


def context(registries, integrator="euler", total_steps=10, shape=(2,)):
    return MethodContext(
        data=DataSpec(shape),
        integrator=registries.integrators.get(integrator),
        integrator_name=integrator,
        total_steps=total_steps,
        integrators=registries.integrators,
    )


def make_method(registries, integrator="euler", total_steps=10, **options):
    cls = registries.methods.get("cud")
    return cls(cls.config_class(**options), context(registries, integrator, total_steps))


class FieldStudent(nn.Module):
    """Head j = field * (1 + scale_j). The pass with gradient (all heads at once) adds ``offset``
    to every head, standing in for that pass's own dropout mask: it makes a reused prediction
    distinguishable from a separate no-grad pass of the main head."""

    def __init__(self, heads, offset=0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.0, 0.2, heads, dtype=torch.float64))
        self.offset = offset

    def forward(self, x, t, cond=None, head=0):
        if head == "all":  # every head from one pass with gradient, as MultiHeadStudent
            return self.all_heads(x, t, cond)
        return field(x, t) * (1 + self.scale[head])

    def all_heads(self, x, t, cond=None):
        return [field(x, t) * (1 + s) + self.offset for s in self.scale]


# ------------------------------------------------------------------------------------------------
# t and Δ (§2.3-2.4)


def cfg(**options):
    return CUDConfig(**options)


@pytest.mark.parametrize("mode", ["uniform", "origin", "rule"])
def test_continuous_delta_modes_match_the_formulas(mode):
    t, delta = draw_times(N, torch.Generator().manual_seed(1), cfg(delta_mode=mode, tn=8), 1,
                          device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    expected_t = u * (1 - T_MIN) + T_MIN
    expected = {
        "uniform": lambda: torch.rand(N, generator=g, dtype=torch.float64) * (1 / 8),
        "origin": lambda: torch.full((N,), 1 / 8, dtype=torch.float64),
        "rule": lambda: expected_t / 8,
    }[mode]()
    torch.testing.assert_close(t, expected_t)
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("tn", [4, 16, 64])
def test_uniform_delta_statistics_follow_tn(tn):
    # P1: TN is really wired. Δ ~ U(0, 1/TN): inside [0, 1/TN), mean 1/(2 TN), spread over the range.
    _, delta = draw_times(20000, torch.Generator().manual_seed(0), cfg(tn=tn), 1, device="cpu", dtype=torch.float64)
    assert delta.min() >= 0 and delta.max() < 1 / tn
    assert float(delta.mean()) == pytest.approx(1 / (2 * tn), rel=0.03)
    assert float(delta.max()) > 0.99 / tn
    assert float(delta.std()) == pytest.approx(1 / (tn * math.sqrt(12)), rel=0.03)


def test_discrete_time_and_the_euler_variants_floor_rule():
    tn = 16
    t, delta = draw_times(N, torch.Generator().manual_seed(2), cfg(discrete_time=True, tn=tn), 1,
                          device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    k = torch.randint(1, tn + 1, (N,), generator=g)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    expected_t = k.double() / tn
    torch.testing.assert_close(t, expected_t)
    torch.testing.assert_close(delta, torch.floor(u * expected_t * tn) / tn)  # Δ = ⌊U·t·TN⌋/TN
    # on the grid, and never past the first grid point
    assert torch.all((delta * tn - (delta * tn).round()).abs() < 1e-9)
    assert torch.all(t - delta >= 1 / tn - 1e-12)


def test_discrete_time_statistics():
    t, delta = draw_times(20000, torch.Generator().manual_seed(3), cfg(discrete_time=True, tn=4), 1,
                          device="cpu", dtype=torch.float64)
    assert sorted(set((t * 4).round().long().tolist())) == [1, 2, 3, 4]
    # P(Δ = 0 | t = 1) = 1/4 for TN = 4: ⌊U·4⌋ = 0
    at_one = delta[t == 1.0]
    assert float((at_one == 0).double().mean()) == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("heads,mode", [(2, "uniform"), (3, "uniform"), (1, "origin")])
def test_discrete_time_uses_one_grid_step_for_rk_variants_and_origin(heads, mode):
    t, delta = draw_times(N, torch.Generator().manual_seed(4), cfg(discrete_time=True, tn=16, delta_mode=mode),
                          heads, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(delta, torch.full((N,), 1 / 16, dtype=torch.float64))


def test_rule_is_refused_in_discrete_time_and_bad_values_are_config_errors(registries):
    with pytest.raises(distillkit.ConfigError, match="delta_mode"):
        CUDConfig(discrete_time=True, delta_mode="rule")
    for bad in [dict(delta_mode="fixed"), dict(tn=0), dict(target="teacher"), dict(target_decay=1.0),
                dict(weighting="linear"), dict(distance="l1"), dict(coupling="ot"), dict(heads=-1),
                dict(encoder="no-such-backbone"), dict(encoder_options={"channels": 8}), dict(kl_weight=-1.0),
                dict(boundary_mask="yes")]:
        with pytest.raises(distillkit.ConfigError):
            CUDConfig(**bad)
    with pytest.raises(distillkit.ConfigError, match="encoder_options.nope"):
        CUDConfig(coupling="encoder", encoder="mlp", encoder_options={"nope": 1})
    with pytest.raises(distillkit.ConfigError, match="sample_head"):
        make_method(registries, "rk3", heads=2, sample_head=2)


# ------------------------------------------------------------------------------------------------
# targets, heads, the full loss (§2.6-2.8)


def test_first_slope_replaces_k1(registries):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.4 + 0.5
    d = torch.rand(6, generator=g, dtype=torch.float64) / 16
    p = field(x, t) + 0.05
    y1, y2 = catch_up_targets(field, x, t, d, registries.integrators.get("rk2"), 2, T_MIN, first_slope=p)
    dd = d[:, None]
    k2 = field(x - dd * p, t - d)
    s = (p + k2) / 2
    torch.testing.assert_close(y1, field(x - dd * s, t - d))
    torch.testing.assert_close(y2, field(x - 2 * dd * s, t - 2 * d))


def expected_loss(student, x0, seed, integrator, heads, options, step=0, total=10, target_scale=None):
    """The loss written out from §2.6-2.8 for the euler / rk2 / paper-rk3 slopes."""
    o = CUDConfig(**options)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    n = x0.shape[0]
    if o.discrete_time:
        k = torch.randint(1, o.tn + 1, (n,), generator=g)
        t = k.double() / o.tn
        if o.delta_mode == "uniform" and heads == 1:
            d = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * t * o.tn) / o.tn
        else:
            d = torch.full((n,), 1 / o.tn, dtype=torch.float64)
    else:
        t = torch.rand(n, generator=g, dtype=torch.float64) * (1 - T_MIN) + T_MIN
        d = {"uniform": lambda: torch.rand(n, generator=g, dtype=torch.float64) / o.tn,
             "origin": lambda: torch.full((n,), 1 / o.tn, dtype=torch.float64),
             "rule": lambda: t / o.tn}[o.delta_mode]()
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_star = eps - x0
    preds = [field(x_t, t) * (1 + s) + student.offset for s in student.scale]  # with gradient
    main_scale = student.scale[0].detach() if target_scale is None else target_scale
    v = lambda x, s: field(x, s.clamp_min(T_MIN)) * (1 + main_scale)  # noqa: E731
    dd = d[:, None]
    k1 = preds[0].detach() if o.reuse_prediction_as_k1 else v(x_t, t)
    if integrator == "euler":
        slope = k1
    elif integrator == "rk2":
        slope = (k1 + v(x_t - dd * k1, t - d)) / 2
    else:
        k2 = v(x_t - dd * k1, t - d)
        k3 = v(x_t - dd * (7 / 4 * k1 + 1 / 4 * k2), t - 2 * d)
        slope = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
    targets = [v(x_t - j * dd * slope, t - j * d) for j in range(1, heads + 1)]
    if o.boundary_mask:
        near = (t < T_MIN + heads * d)[:, None]
        targets = [torch.where(near, v_star, y) for y in targets]

    def dist(p, y, kind):
        if kind == "mse":
            return ((p - y) ** 2).mean()
        c = o.huber_c or 0.00054 * math.sqrt(p[0].numel())
        return (torch.sqrt(((p - y) ** 2).sum(1) + c**2) - c).mean()

    w_cu, w_gt = o.catch_up_weight, o.ground_truth_weight
    if o.weighting in ("adaptive", "adaptive-all-heads"):
        w_cu, w_gt = w_cu * 2 * step / total, w_gt * 2 * (1 - step / total)
    cu = sum(dist(p, y, o.distance) for p, y in zip(preds, targets))
    gt = sum(dist(p, v_star, o.ground_truth_distance) for p in preds)
    return w_cu * cu + w_gt * gt


VARIANTS = [
    ("euler", {}),
    ("rk2", {}),
    ("rk3", {}),
    ("euler", {"delta_mode": "origin", "tn": 4}),
    ("rk2", {"delta_mode": "rule", "tn": 8}),
    ("euler", {"discrete_time": True, "tn": 8}),
    ("rk2", {"discrete_time": True, "tn": 8}),
    ("rk3", {"discrete_time": True, "delta_mode": "origin", "tn": 16}),
    ("euler", {"reuse_prediction_as_k1": True}),
    ("rk2", {"reuse_prediction_as_k1": True, "tn": 4}),
    ("rk3", {"reuse_prediction_as_k1": True, "delta_mode": "origin", "tn": 8}),
    ("rk2", {"boundary_mask": False, "tn": 2}),
    ("rk3", {"distance": "pseudo-huber"}),
    ("rk2", {"distance": "pseudo-huber", "ground_truth_distance": "pseudo-huber", "huber_c": 0.1}),
    ("euler", {"weighting": "adaptive", "catch_up_weight": 0.5}),
    ("rk2", {"weighting": "adaptive-all-heads"}),
    ("rk3", {"weighting": "adaptive-all-heads", "ground_truth_weight": 0.5}),
    ("rk2", {"catch_up_weight": 0.0, "ground_truth_weight": 2.0}),
]


@pytest.mark.parametrize("integrator,options", VARIANTS)
def test_loss_and_its_gradient_match_the_formula(registries, integrator, options):
    method = make_method(registries, integrator, **options)
    heads = method.heads
    # offset: the gradient pass differs from a no-grad pass (its "dropout mask")
    student = FieldStudent(heads, offset=0.03)
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    step = 7
    output = method.loss(student, Batch(x0), torch.Generator().manual_seed(11), step=step)
    output.loss.backward()
    got_grad = student.scale.grad.clone()

    reference = FieldStudent(heads, offset=0.03)
    expected = expected_loss(reference, x0, 11, integrator, heads, options, step=step)
    expected.backward()
    assert float(output.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    # Targets are constants: the gradient is that of the formula with every target detached.
    torch.testing.assert_close(got_grad, reference.scale.grad, rtol=1e-9, atol=1e-12)


def test_reused_prediction_changes_the_target(registries):
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    losses = []
    for reuse in (False, True):
        method = make_method(registries, "euler", reuse_prediction_as_k1=reuse)
        output = method.loss(FieldStudent(1, offset=0.03), Batch(x0), torch.Generator().manual_seed(1), 0)
        losses.append(float(output.loss.detach()))
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)


def test_boundary_mask_replaces_targets_within_reach_of_the_data_end(registries):
    # origin, TN = 4: Δ = 1/4; two heads reach 2Δ = 1/2: every t < δ + 1/2 takes v* as its target.
    method = make_method(registries, "rk2", delta_mode="origin", tn=4)
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    output = method.loss(FieldStudent(2), Batch(x0), torch.Generator().manual_seed(0), 0)
    assert output.metrics["boundary_fraction"] == pytest.approx(0.5, abs=0.03)
    off = make_method(registries, "rk2", delta_mode="origin", tn=4, boundary_mask=False)
    assert "boundary_fraction" not in off.loss(FieldStudent(2), Batch(x0), torch.Generator().manual_seed(0), 0).metrics


@pytest.mark.parametrize("weighting", ["adaptive", "adaptive-all-heads"])
@pytest.mark.parametrize("step,total", [(0, 100), (25, 100), (50, 100), (99, 100), (3, 7)])
def test_adaptive_weights(weighting, step, total):
    w_cu, w_gt = loss_weights(CUDConfig(weighting=weighting), step, total)
    assert w_cu == pytest.approx(2 * step / total)
    assert w_gt == pytest.approx(2 * (1 - step / total))
    assert loss_weights(CUDConfig(catch_up_weight=0.3, ground_truth_weight=0.7), step, total) == (0.3, 0.7)


@pytest.mark.parametrize("integrator,heads", [("rk2", 0), ("rk3", 0), ("midpoint", 0), ("euler", 2), ("rk2", 1)])
def test_adaptive_is_the_papers_euler_variant_only(registries, integrator, heads):
    # The paper's code schedules ω1, ω2 only with pred_step 1 (Euler slope, one head); elsewhere
    # the schedule is this plugin's extension and must be asked for by its own name.
    with pytest.raises(distillkit.ConfigError, match=r"method_options.weighting.*constant or adaptive-all-heads"):
        make_method(registries, integrator, heads=heads, weighting="adaptive")
    method = make_method(registries, integrator, heads=heads, weighting="adaptive-all-heads")
    assert loss_weights(method.config, 3, 4) == pytest.approx((1.5, 0.5))
    for heads in (0, 1):  # the Euler variant, heads = 0 meaning the tableau's one stage
        assert make_method(registries, "euler", heads=heads, weighting="adaptive").heads == 1


def test_adaptive_with_another_integrator_is_refused_before_training(capsys, tmp_path):
    from distillkit.cli.main import main

    argv = ["run", "--method", "cud", "--integrator", "rk2", "--dataset", "toy2d", "--max-steps", "1", "--no-track",
            "--quiet", "--runs-dir", str(tmp_path), "--set", "method_options.weighting=adaptive"]
    assert main(argv) == 2
    assert "adaptive-all-heads" in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/*/checkpoint.pt"))


def test_pseudo_huber_and_mse():
    g = torch.Generator().manual_seed(0)
    p, y = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    c = 0.03
    per_sample = [math.sqrt(float(((p[i] - y[i]) ** 2).sum()) + c * c) - c for i in range(5)]
    assert float(distance(p, y, "pseudo-huber", c)) == pytest.approx(sum(per_sample) / 5, rel=1e-12)
    assert float(distance(p, y, "mse", c)) == pytest.approx(float(((p - y) ** 2).sum()) / p.numel(), rel=1e-12)
    # small differences: ≈ ‖d‖² / (2c); large: ≈ ‖d‖ - c
    tiny = torch.full((1, 4), 1e-4, dtype=torch.float64)
    assert float(distance(tiny, 0 * tiny, "pseudo-huber", 1.0)) == pytest.approx(4e-8 / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# coupling encoder with a KL penalty (§2.2)


def test_kl_matches_the_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(7, 3, 4, 4, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    per_sample = torch.distributions.kl_divergence(q, p).flatten(1).sum(1) / (3 * 4 * 4)
    assert float(gaussian_kl(mu, logvar)) == pytest.approx(float(per_sample.mean()), rel=1e-12)
    assert float(gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5))) == 0.0


class AffineEncoder(nn.Module):
    """μ = a·x, log σ² = b (a known Gaussian for the closed form)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(-0.4, dtype=torch.float64))

    def forward(self, x, cond=None):
        return self.a * x, self.b.expand_as(x)


def test_encoder_coupling_pairs_noise_and_adds_beta_kl(registries):
    method = make_method(registries, "euler", coupling="encoder", kl_weight=3.0, catch_up_weight=0.0)
    student = FieldStudent(1)
    student.encoder = AffineEncoder()
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = method.loss(student, Batch(x0), torch.Generator().manual_seed(5), 0)
    g = torch.Generator().manual_seed(5)
    n = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.rand(N, generator=g, dtype=torch.float64) * (1 - T_MIN) + T_MIN
    mu, var = 0.5 * x0, math.exp(-0.4)
    eps = mu + math.sqrt(var) * n
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    gt = ((field(x_t, t) - (eps - x0)) ** 2).mean()
    kl = (0.5 * (mu**2 + var - (-0.4) - 1)).sum(1).mean() / 2
    assert float(output.loss.detach()) == pytest.approx(float(gt + 3.0 * kl), rel=1e-10)
    output.loss.backward()
    assert student.encoder.a.grad is not None and student.encoder.b.grad is not None


@pytest.mark.parametrize("integrator", ["euler", "rk2", "rk3"])
def test_encoder_gradient_is_the_papers_with_the_boundary_target_detached(registries, integrator):
    # The paper replaces the catch-up targets near the data end by v* = ε - x inside no_grad, so
    # the encoder's gradient comes from x_t, the ground-truth term and the KL only. Written out
    # here by hand; origin Δ = 1/TN with TN = 2H puts about half the batch in the mask (t < δ + HΔ).
    heads = {"euler": 1, "rk2": 2, "rk3": 3}[integrator]
    tn, beta = 2 * heads, 3.0
    method = make_method(registries, integrator, coupling="encoder", kl_weight=beta, delta_mode="origin", tn=tn)
    assert method.heads == heads
    student = FieldStudent(heads, offset=0.03)
    student.encoder = AffineEncoder()
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = method.loss(student, Batch(x0), torch.Generator().manual_seed(5), 0)
    assert 0.2 < float(output.metrics["boundary_fraction"]) < 0.8
    output.loss.backward()

    def official(detach_replacement=True):
        reference = FieldStudent(heads, offset=0.03)
        reference.encoder = AffineEncoder()
        g = torch.Generator().manual_seed(5)
        n = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        t = torch.rand(N, generator=g, dtype=torch.float64) * (1 - T_MIN) + T_MIN
        d = torch.full((N,), 1 / tn, dtype=torch.float64)[:, None]
        mu, logvar = reference.encoder(x0)
        eps = mu + torch.exp(0.5 * logvar) * n
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        v_star = eps - x0
        preds = reference.all_heads(x_t, t)
        with torch.no_grad():  # the targets, as the paper's code computes them
            v = lambda x, s: field(x, s.clamp_min(T_MIN)) * (1 + reference.scale[0])  # noqa: E731
            tt = t[:, None]
            k1 = v(x_t, t)
            if integrator == "euler":
                slope = k1
            elif integrator == "rk2":
                slope = (k1 + v(x_t - d * k1, t - d[:, 0])) / 2
            else:
                k2 = v(x_t - d * k1, t - d[:, 0])
                k3 = v(x_t - d * (7 / 4 * k1 + 1 / 4 * k2), t - 2 * d[:, 0])
                slope = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
            targets = [v(x_t - j * d * slope, t - j * d[:, 0]) for j in range(1, heads + 1)]
            near = tt < T_MIN + heads * d
        if detach_replacement:
            with torch.no_grad():
                targets = [torch.where(near, v_star, y) for y in targets]
        else:  # what keeping v*'s graph would give: the encoder gets the catch-up term's gradient too
            targets = [torch.where(near, v_star, y) for y in targets]
        kl = (0.5 * (mu**2 + logvar.exp() - logvar - 1)).sum(1).mean() / 2
        loss = sum(((p - y) ** 2).mean() for p, y in zip(preds, targets))
        loss = loss + sum(((p - v_star) ** 2).mean() for p in preds) + beta * kl
        loss.backward()
        return loss, reference

    expected, reference = official()
    assert float(output.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    for name in ("a", "b"):
        got, want = getattr(student.encoder, name).grad, getattr(reference.encoder, name).grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student.scale.grad, reference.scale.grad, rtol=1e-12, atol=1e-12)
    # The comparison can fail: with v*'s graph kept the encoder's gradient is another number.
    _, attached = official(detach_replacement=False)
    assert abs(float(attached.encoder.a.grad - reference.encoder.a.grad)) > 1e-6


@pytest.mark.parametrize("shape,backbone", [((2,), "mlp"), ((1, 8, 8), "unet")])
def test_encoder_lives_inside_the_student_and_starts_independent(registries, shape, backbone):
    cls = registries.methods.get("cud")
    method = cls(cls.config_class(coupling="encoder"), context(registries, "rk2", shape=shape))
    b_cls = registries.backbones.get(backbone)
    student = method.build_student(b_cls.build(b_cls.config_class(), DataSpec(shape)))
    assert any(name.startswith("encoder.") for name in student.state_dict())
    x = torch.randn(3, *shape)
    mu, logvar = student.encoder(x)
    assert mu.shape == logvar.shape == x.shape
    assert mu.abs().max() < 1e-2 and logvar.abs().max() < 1e-2  # ε ≈ n at the start
    output = method.loss(student, Batch(x), torch.Generator().manual_seed(0), 0)
    output.loss.backward()
    assert all(p.grad is not None for p in student.encoder.parameters())


def test_a_registered_backbone_can_be_the_encoder(registries):
    cls = registries.methods.get("cud")
    config = cls.config_class(coupling="encoder", encoder="mlp", encoder_options={"hidden": 16, "layers": 1})
    method = cls(config, context(registries, "euler"))
    b_cls = registries.backbones.get("mlp")
    student = method.build_student(b_cls.build(b_cls.config_class(), DataSpec((2,))))
    assert student.encoder.backbone.config.hidden == 16
    mu, logvar = student.encoder(torch.randn(4, 2))
    assert mu.shape == logvar.shape == (4, 2)


# ------------------------------------------------------------------------------------------------
# the EMA target (§2.5 ablation)


def test_ema_target_is_held_updated_used_and_saved(registries, tmp_path):
    decay = 0.9
    method = make_method(registries, "rk2", target="ema", target_decay=decay)
    student = FieldStudent(2)
    prep = PrepareContext(device="cpu", dataset=None, output_dir=tmp_path, log_artifact=lambda *a: None)
    method.prepare(student, prep)
    target = method.target_network
    torch.testing.assert_close(target.scale, student.scale.detach())
    assert not target.scale.requires_grad
    before = target.scale.detach().clone()
    with torch.no_grad():
        student.scale.add_(0.5)
    method.after_step(student, 0)
    torch.testing.assert_close(target.scale, decay * before + (1 - decay) * student.scale.detach())

    # The loss takes its targets from the EMA copy: the formula with the EMA's main-head scale.
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    output = method.loss(student, Batch(x0), torch.Generator().manual_seed(2), 0)
    expected = expected_loss(student, x0, 2, "rk2", 2, {}, target_scale=target.scale[0].detach())
    assert float(output.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)

    # state_dict / load_state_dict, before and after prepare
    state = method.state_dict()
    for prepared in (True, False):
        other = make_method(registries, "rk2", target="ema", target_decay=decay)
        fresh = FieldStudent(2)
        if prepared:
            other.prepare(fresh, prep)
            other.load_state_dict(state)
        else:
            other.load_state_dict(state)
            other.prepare(fresh, prep)
        torch.testing.assert_close(other.target_network.scale, target.scale)


def test_ema_update_formula_on_buffers_and_parameters():
    average, current = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        current.weight.fill_(2.0)
        current.running_mean.fill_(1.0)
        current.num_batches_tracked.fill_(5)
    ema_update_(average, current, 0.75)
    torch.testing.assert_close(average.weight, torch.full((3,), 0.75 + 0.25 * 2.0))
    torch.testing.assert_close(average.running_mean, torch.full((3,), 0.25))
    assert int(average.num_batches_tracked) == 5


# ------------------------------------------------------------------------------------------------
# network evaluations: counted on a real network for every combination of options


def count_passes(module):
    counts = {"with_grad": 0, "no_grad": 0}

    def hook(mod, args, output):
        counts["with_grad" if torch.is_grad_enabled() else "no_grad"] += 1

    module.register_forward_hook(hook)
    return counts


COMBINATIONS = [
    (integrator, heads, reuse, target, coupling)
    for integrator in ("euler", "rk2", "midpoint", "rk3", "rk4")
    for heads in (0, 1, 3)
    for reuse in (False, True)
    for target in ("live", "ema")
    for coupling in ("independent", "encoder")
]


def test_network_evaluations_per_step_are_exact_for_every_option_combination(registries):
    torch.manual_seed(0)
    mlp = registries.backbones.get("mlp")
    for integrator, heads, reuse, target, coupling in COMBINATIONS:
        method = make_method(registries, integrator, heads=heads, reuse_prediction_as_k1=reuse,
                             target=target, coupling=coupling, encoder_channels=8)
        student = method.build_student(mlp.build(mlp.config_class(hidden=8, layers=1), DataSpec((2,))))
        method.prepare(student, PrepareContext(device="cpu", dataset=None, output_dir=".", log_artifact=None))
        trunk = count_passes(student.backbone)
        target_counts = count_passes(method.target_network) if target == "ema" else trunk
        encoder = count_passes(student.encoder) if coupling == "encoder" else None
        method.loss(student, Batch(torch.randn(4, 2)), torch.Generator().manual_seed(0), 0)
        declared = method.network_evals_per_step()
        label = (integrator, heads, reuse, target, coupling)
        assert trunk["with_grad"] == declared["with_grad"] == 1, label
        no_grad = trunk["no_grad"] + (target_counts["no_grad"] if target == "ema" else 0)
        assert no_grad == declared["no_grad"], label
        stages = 3 if integrator == "rk3" else registries.integrators.get(integrator).stages
        assert declared["no_grad"] == stages + (heads or stages) - reuse, label
        assert set(declared) == {"with_grad", "no_grad"}
        if coupling == "encoder":  # one encoder pass with gradient, named in the tags
            assert encoder == {"with_grad": 1, "no_grad": 0}, label
            assert "1 pass with grad" in method.tags()["distillkit.cud.coupling"]


def test_heads_option_sets_the_number_of_look_ahead_heads(registries):
    mlp = registries.backbones.get("mlp")
    for integrator, heads, expected in [("rk3", 0, 3), ("rk3", 1, 1), ("euler", 3, 3), ("rk4", 0, 4)]:
        method = make_method(registries, integrator, heads=heads)
        student = method.build_student(mlp.build(mlp.config_class(hidden=8, layers=1), DataSpec((2,))))
        assert method.heads == student.num_heads == expected
        x, t = torch.randn(3, 2), torch.rand(3)
        torch.testing.assert_close(method.velocity_fn(student)(x, t), student.all_heads(x, t)[-1])


# ------------------------------------------------------------------------------------------------
# Prior ShakeDrop φ (§2.9, P2)


def test_phi_is_recorded_in_the_method_state_and_checked_on_load(registries):
    mlp = registries.backbones.get("mlp")

    def build(phi):
        backbone = mlp.build(mlp.config_class(hidden=8, layers=1), DataSpec((2,)))
        backbone.config = types.SimpleNamespace(shakedrop=phi is not None, phi=phi)
        method = make_method(registries, "euler")
        method.build_student(backbone)
        return method

    trained = build(0.25)
    state = trained.state_dict()
    assert state["prior_shakedrop"] == {"enabled": True, "phi": 0.25}
    assert trained.tags()["distillkit.cud.prior_shakedrop"] == "phi=0.25"
    build(0.25).load_state_dict(state)  # same φ: fine
    with pytest.raises(distillkit.UsageError, match=r"phi=0.25.*phi=0.75.*P2"):
        build(0.75).load_state_dict(state)
    with pytest.raises(distillkit.UsageError, match="shakedrop off"):
        build(None).load_state_dict(state)


def test_songunet_phi_is_read_from_the_backbone(registries):
    if "songunet" not in registries.backbones.names():
        pytest.skip("songunet backbone not registered")
    cls = registries.backbones.get("songunet")
    # Only a missing backbone skips: a songunet that fails to build is a failure of this test.
    config = cls.config_class(channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=(), shakedrop=True, phi=0.25)
    backbone = cls.build(config, DataSpec((1, 8, 8)))
    method = make_method(registries, "euler")
    method.build_student(backbone)
    assert method.state_dict()["prior_shakedrop"] == {"enabled": True, "phi": 0.25}


# ------------------------------------------------------------------------------------------------
# the paper's samplers (§4, P6)


def counting(fn):
    calls = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return fn(x, t)

    return velocity, calls


@pytest.mark.parametrize("nfe", [1, 3, 5, 15])
def test_heun_sampler_matches_section_4(nfe):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    velocity, calls = counting(field)
    got = heun_sample(velocity, x, nfe)
    assert len(calls) == nfe  # NFE = 2 N' - 1 = N
    steps = (nfe + 1) // 2
    h = 1 / steps
    ref = x.clone()
    for i in range(steps, 0, -1):
        ti = torch.full((4,), i / steps, dtype=torch.float64)
        d1 = field(ref, ti)
        if i > 1:
            d2 = field(ref - d1 / steps, torch.full((4,), (i - 1) / steps, dtype=torch.float64))
            ref = ref - h * (d1 + d2) / 2
        else:
            ref = ref - h * d1
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="odd"):
        heun_sample(field, x, nfe + 1)


def test_euler_and_one_step_samplers_match_the_core_sampler(registries):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2, 16):
        core = distillkit.integrate(field, x, distillkit.uniform_grid(steps), "euler")
        torch.testing.assert_close(euler_sample(field, x, steps), core)
    expected = x - field(x, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(one_step_sample(field, x), expected)
    torch.testing.assert_close(euler_sample(field, x, 1), expected)


def test_paper_rk3_tableau_is_the_papers():
    assert PAPER_RK3.b == pytest.approx((5 / 12, 2 / 3, -1 / 12))
    assert PAPER_RK3.a[2][:2] == pytest.approx((7 / 4, 1 / 4))
    assert PAPER_RK3.c == pytest.approx((0, 1, 2))


def test_method_config_round_trips_through_the_resolved_config(registries):
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve

    options = {"delta_mode": "rule", "tn": 8, "target": "ema", "target_decay": 0.99, "heads": 2,
               "weighting": "adaptive-all-heads", "distance": "pseudo-huber", "coupling": "encoder", "kl_weight": 5,
               "encoder": "mlp", "encoder_options": {"hidden": 16}, "reuse_prediction_as_k1": True}
    tree = {"method": "cud", "integrator": "rk3", "dataset": "toy2d", "method_options": options}
    resolved = resolve(run_config_from_dict(tree), registries)
    again = resolve(run_config_from_dict(copy.deepcopy(resolved.to_dict())), registries)
    assert again.method_config == resolved.method_config
    assert resolved.method_config.kl_weight == 5.0
