"""The shared numerics (distillkit.numerics) and files (distillkit.files) against closed forms
written out independently here, and the bit-for-bit equalities the built-in methods rely on."""

import math
import os
import stat

import pytest
import torch
from torch import nn

import distillkit
from distillkit import (
    ButcherTableau,
    TargetNetwork,
    broadcast_time,
    ema_update_,
    generate_once,
    load_payload,
    read_cached,
    rk_slopes,
    rk_step_per_sample,
    save_atomic,
    straight_path,
    uniform_time,
    write_atomic,
)

INTEGRATORS = distillkit.get_registries().integrators
TABLEAUX = ["euler", "heun", "midpoint", "rk3", "ralston3", "rk4"]


# ------------------------------------------------------------------------------------------------
# the straight path


def test_broadcast_time_scales_each_sample_by_its_own_time():
    x = torch.ones(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.5, 2.0])
    assert broadcast_time(t, x).shape == (3, 1, 1, 1)
    scaled = broadcast_time(t, x) * x
    for n in range(3):
        assert torch.equal(scaled[n], torch.full((2, 4, 4), float(t[n])))
    assert broadcast_time(t, torch.ones(3)).shape == (3,)


def test_straight_path_is_the_interpolation_and_its_velocity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2, 2, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 3, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t, v = straight_path(x, eps, t)
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[4], eps[4])  # the ends exactly
    for n in range(5):
        torch.testing.assert_close(x_t[n], (1 - float(t[n])) * x[n] + float(t[n]) * eps[n])
    assert torch.equal(v, eps - x)
    # v* is d x_t / dt: a finite difference along the path, per sample
    dt = 1e-6
    x_later, _ = straight_path(x, eps, t.clamp(max=1 - dt) + dt)
    torch.testing.assert_close((x_later - straight_path(x, eps, t.clamp(max=1 - dt))[0]) / dt, v, rtol=1e-6, atol=1e-6)


def test_straight_path_is_bit_identical_to_the_formula_the_methods_wrote_out():
    generator = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 7, 3, generator=generator).unbind(0)
    t = torch.rand(7, generator=generator)
    t_b = t.view(-1, 1)
    x_t, v = straight_path(x, eps, t)
    assert torch.equal(x_t, (1.0 - t_b) * x + t_b * eps) and torch.equal(v, eps - x)


def test_uniform_time_draws_n_uniforms_in_t_min_to_one():
    generator = torch.Generator().manual_seed(2)
    t = uniform_time(1000, generator, 0.25, dtype=torch.float64)
    assert t.shape == (1000,) and float(t.min()) >= 0.25 and float(t.max()) < 1.0
    reference = torch.Generator().manual_seed(2)
    assert torch.equal(t, torch.rand(1000, generator=reference, dtype=torch.float64) * 0.75 + 0.25)
    assert torch.equal(generator.get_state(), reference.get_state())  # one draw, nothing more


# ------------------------------------------------------------------------------------------------
# the per-sample Runge-Kutta step


def taylor(z: torch.Tensor, order: int) -> torch.Tensor:
    """sum_{k <= order} z^k / k!: an explicit RK method with s = p <= 4 stages applied to dx/dt = a x."""
    return sum(z**k / math.factorial(k) for k in range(order + 1))


@pytest.mark.parametrize("name", TABLEAUX)
def test_linear_field_gives_the_truncated_exponential_per_sample(name):
    tableau = INTEGRATORS.get(name)
    a = -1.3
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0], [-1.0, 0.25]], dtype=torch.float64)
    t = torch.tensor([1.0, 0.7, 0.2, 0.5], dtype=torch.float64)
    h = torch.tensor([-0.3, -0.05, 0.1, 0.0], dtype=torch.float64)  # both directions, and no step
    out = rk_step_per_sample(lambda y, s: a * y, x, t, h, tableau)
    expected = x * taylor(a * h, tableau.order)[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(out[3], x[3])


@pytest.mark.parametrize("name", TABLEAUX)
def test_local_error_is_of_order_p_plus_one(name):
    # dx/dt = t x: x(t + h) = x exp(((t + h)^2 - t^2) / 2). Each sample steps by its own h.
    tableau = INTEGRATORS.get(name)
    h = -torch.tensor([0.04, 0.02, 0.01], dtype=torch.float64)
    t = torch.full((3,), 0.9, dtype=torch.float64)
    x = torch.ones(3, 1, dtype=torch.float64)
    out = rk_step_per_sample(lambda y, s: s[:, None] * y, x, t, h, tableau)
    exact = torch.exp(((t + h) ** 2 - t**2) / 2)[:, None]
    error = (out - exact).abs().flatten()
    ratios = error[:-1] / error[1:]  # halving h divides the error by about 2^(p+1)
    expected = 2.0 ** (tableau.order + 1)
    assert all(0.8 * expected < float(r) < 1.25 * expected for r in ratios), (ratios, expected)


@pytest.mark.parametrize("name", TABLEAUX)
def test_polynomial_fields_of_degree_below_the_order_are_integrated_exactly(name):
    tableau = INTEGRATORS.get(name)
    coefficients = [0.7, -1.1, 2.3, -0.4][: tableau.order]  # degree p - 1
    x = torch.tensor([[0.3], [-1.0], [2.0]], dtype=torch.float64)
    t = torch.tensor([1.0, 0.4, 0.0], dtype=torch.float64)
    h = torch.tensor([-0.7, 0.3, 0.9], dtype=torch.float64)

    def field(y, s):
        return sum(c * s**k for k, c in enumerate(coefficients))[:, None] * torch.ones_like(y)

    def antiderivative(s):
        return sum(c * s ** (k + 1) / (k + 1) for k, c in enumerate(coefficients))

    out = rk_step_per_sample(field, x, t, h, tableau)
    expected = x + (antiderivative(t + h) - antiderivative(t))[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", TABLEAUX)
def test_each_row_is_the_cores_float_step(name):
    from distillkit.integrators import rk_step

    tableau = INTEGRATORS.get(name)
    field = lambda y, s: torch.sin(y) * (1 + s[:, None]) - 0.3 * y  # noqa: E731
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([0.95, 0.6, 0.3, 0.1], dtype=torch.float64)
    h = torch.tensor([-0.2, -0.05, 0.25, -0.1], dtype=torch.float64)
    out = rk_step_per_sample(field, x, t, h, tableau)
    for n in range(4):
        row = rk_step(field, x[n:n + 1], float(t[n]), float(h[n]), tableau)
        torch.testing.assert_close(out[n:n + 1], row, rtol=1e-14, atol=1e-14)


def test_a_known_first_slope_is_not_evaluated_again():
    tableau = INTEGRATORS.get("rk4")
    calls = []

    def field(y, s):
        calls.append(s.clone())
        return torch.cos(y) * s[:, None]

    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    t, h = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([-0.1, -0.2, -0.05])
    full = rk_slopes(field, x, t, h, tableau)
    assert len(calls) == 4 and torch.equal(calls[0], t)
    calls.clear()
    reused = rk_slopes(field, x, t, h, tableau, first_slope=full[0].clone().requires_grad_())
    assert len(calls) == 3 and not reused[0].requires_grad
    for a, b in zip(reused, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tableau", [
    INTEGRATORS.get("rk4"),
    INTEGRATORS.get("ralston3"),
    ButcherTableau(name="t-rk3", a=((0, 0, 0), (1, 0, 0), (7 / 4, 1 / 4, 0)), b=(5 / 12, 2 / 3, -1 / 12),
                   c=(0, 1, 2), order=2),
], ids=lambda tab: tab.name)
def test_a_step_toward_the_data_is_bit_identical_to_the_subtracted_form(tableau):
    # CUD writes the stages as x - (Δ a_ij) k_j at t - c_i Δ; the shared step takes h = -Δ.
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(64, 3, generator=generator)
    t = torch.rand(64, generator=generator) * 0.9 + 0.1
    delta = torch.rand(64, generator=generator) / 16

    def field(y, s):
        return torch.sin(3 * y) * (1 + s[:, None]) - y * s[:, None] ** 2

    step = delta.view(-1, 1)
    slopes = []
    for i in range(tableau.stages):
        x_i = x
        for j, a_ij in enumerate(tableau.a[i][:i]):
            if a_ij != 0.0:
                x_i = x_i - step * a_ij * slopes[j]
        slopes.append(field(x_i, t - tableau.c[i] * delta))
    shared = rk_slopes(field, x, t, -delta, tableau)
    for a, b in zip(shared, slopes):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# the target network


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)  # a floating buffer (running_mean) and a counter

    def forward(self, x):
        return self.norm(self.linear(x))


def moved(net: Net) -> Net:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.5)
        net.norm.running_mean.fill_(2.0)
        net.norm.num_batches_tracked.fill_(7)
    return net


def test_start_makes_a_frozen_independent_copy_in_the_same_mode():
    torch.manual_seed(0)
    online = Net().eval()
    target = TargetNetwork()
    assert not target.started and target.module is None and target.state_dict() is None
    copy = target.start(online)
    assert target.started and copy is target.module and not copy.training
    assert not any(p.requires_grad for p in copy.parameters())
    for a, b in zip(copy.state_dict().values(), online.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert target.ensure(online) is copy  # no second copy
    x = torch.randn(4, 3)
    assert torch.equal(target(x), online(x))


@pytest.mark.parametrize("average_buffers", [True, False])
def test_update_is_the_ema_lerp_with_buffers_averaged_or_copied(average_buffers):
    torch.manual_seed(0)
    online = Net()
    target = TargetNetwork(average_buffers=average_buffers)
    target.start(online)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    moved(online)
    mu = 0.75
    target.update(online, mu)
    after, now = target.state_dict(), online.state_dict()
    for key in ("linear.weight", "linear.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[key], before[key].lerp(now[key], 1 - mu))  # the exact arithmetic
        torch.testing.assert_close(after[key], mu * before[key] + (1 - mu) * now[key])
    expected_mean = torch.full((2,), 0.25 * 2.0) if average_buffers else torch.full((2,), 2.0)
    torch.testing.assert_close(after["norm.running_mean"], expected_mean)
    assert int(after["norm.num_batches_tracked"]) == 7  # counters follow, whatever the decay


def test_decay_zero_copies_and_decay_one_keeps():
    torch.manual_seed(0)
    online = Net()
    target = TargetNetwork()
    target.start(online)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    moved(online)
    target.update(online, 1.0)
    for key in ("linear.weight", "linear.bias"):
        assert torch.equal(target.state_dict()[key], before[key])
    target.update(online, 0.0)
    for key, value in online.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_ema_update_is_the_update_on_two_given_modules():
    torch.manual_seed(0)
    average, current = Net(), moved(Net())
    expected = {k: v.clone() for k, v in average.state_dict().items()}
    ema_update_(average, current, 0.5, average_buffers=False)
    assert torch.equal(average.linear.weight, expected["linear.weight"].lerp(current.linear.weight, 0.5))
    assert torch.equal(average.norm.running_mean, current.norm.running_mean)


def test_state_loaded_before_the_copy_exists_is_kept_and_applied_when_it_starts():
    torch.manual_seed(0)
    trained = TargetNetwork()
    trained.start(moved(Net()))
    state = trained.state_dict()

    restored = TargetNetwork()
    restored.load_state_dict(state)
    assert not restored.started
    assert restored.state_dict().keys() == state.keys()  # a checkpoint written now keeps it
    torch.manual_seed(1)
    restored.start(Net())  # another network's weights; the loaded state wins
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], value)
    later = TargetNetwork()
    later.start(Net())
    later.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(later.state_dict()[key], value)


def test_a_target_without_a_copy_refuses_to_update_or_run():
    target = TargetNetwork()
    with pytest.raises(RuntimeError, match="before start"):
        target.update(Net(), 0.9)
    with pytest.raises(RuntimeError, match="before start"):
        target(torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------------
# atomic files


def test_write_atomic_writes_with_the_usual_permissions_and_the_paths_suffix(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("hello")

    path = write_atomic(tmp_path / "sub" / "figure.png", write)
    assert path == tmp_path / "sub" / "figure.png" and path.read_text() == "hello"
    # writers that choose the format by the file name (matplotlib) see the path's suffix
    assert seen[0].suffix == ".png" and seen[0].name.startswith(".figure.png.") and seen[0].parent == path.parent
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "stats.json", lambda tmp: tmp.write_text("old"))

    def failing(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_save_atomic_round_trips_and_its_temporary_ends_in_tmp(tmp_path, monkeypatch):
    path = save_atomic({"x": torch.arange(3)}, tmp_path / "pairs.pt")
    assert torch.equal(load_payload(path)["x"], torch.arange(3))
    names = []
    real_save = torch.save

    def recording_save(obj, stream, *args, **kwargs):
        names.append(os.path.basename(stream.name))
        real_save(obj, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    save_atomic({"x": torch.zeros(1)}, path)
    assert names[0].startswith(".pairs.pt.") and names[0].endswith(".tmp")  # what the trainer clears after a kill


def test_the_core_names_are_the_one_implementation():
    from distillkit.evaluation import write_atomic as evaluation_write
    from distillkit.training.checkpoint import save_atomic as checkpoint_save

    assert evaluation_write is write_atomic and checkpoint_save is save_atomic


# ------------------------------------------------------------------------------------------------
# generated once


class Generator:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return {"format": "test-data", "data": torch.full((2,), float(self.value))}


def test_generated_once_then_reused_while_the_identity_matches(tmp_path):
    path, logged = tmp_path / "data.pt", []
    identity = {"format": "test-data", "teacher": "a", "steps": 4}
    generate = Generator(1)
    first = generate_once(path, identity, generate, log_artifact=logged.append)
    assert generate.calls == 1 and logged == [path]
    assert load_payload(path)["teacher"] == "a" and load_payload(path)["steps"] == 4  # the file records it
    again = generate_once(path, identity, generate, log_artifact=logged.append)
    assert generate.calls == 1 and logged == [path]  # reused, not logged again
    assert torch.equal(again["data"], first["data"])


@pytest.mark.parametrize("change", [{"teacher": "b"}, {"steps": 8}, {"format": "other"}])
def test_data_made_for_another_teacher_or_config_are_generated_again(tmp_path, change):
    path = tmp_path / "data.pt"
    identity = {"format": "test-data", "teacher": "a", "steps": 4}
    generate_once(path, identity, Generator(1))
    other = Generator(2)
    payload = generate_once(path, {**identity, **change}, other)
    assert other.calls == 1 and torch.equal(payload["data"], torch.full((2,), 2.0))
    assert torch.equal(load_payload(path)["data"], torch.full((2,), 2.0))  # replaced on disk


def test_an_unreadable_file_is_generated_again_and_read_may_complete_the_payload(tmp_path):
    path = tmp_path / "data.pt"
    path.write_bytes(b"not a torch file")
    generate = Generator(3)
    generate_once(path, {"teacher": "a"}, generate)
    assert generate.calls == 1

    def read(found):
        return {**load_payload(found), "count": 2}  # what the file holds, computed on reading

    assert generate_once(path, {"teacher": "a", "count": 2}, generate, read=read)["count"] == 2
    assert generate.calls == 1


def test_read_cached_says_why_a_file_does_not_fit(tmp_path):
    path = save_atomic({"format": "test-data", "teacher": "a", "steps": 16}, tmp_path / "data.pt")
    assert read_cached(path, {"format": "test-data", "teacher": "a"})[1] == ""
    assert read_cached(path, {"format": "test-data", "steps": 8}) == (None, "has steps = 16, this run needs 8")
    assert read_cached(path, {"format": "other-data"}) == (None, "is not a other-data file")
    assert read_cached(tmp_path / "missing.pt", {})[1].startswith("cannot be read (")
    save_atomic([1, 2], tmp_path / "list.pt")
    assert read_cached(tmp_path / "list.pt", {"format": "test-data"}) == (None, "is not a test-data file")
