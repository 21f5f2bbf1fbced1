"""Rectified-flow reflow and k-step distillation (plugins/distillkit_rectified_flow): the pairs are
the teacher's ODE solution (an RK4 written out here), generated once and reused, and the losses
match their formulas."""

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext, PrepareContext
from distillkit_datasets import Toy2d, Toy2dConfig, Toy2dExactTeacher, gmm_velocity, mixture_parameters

SEED_OFFSET = 7919  # the pairs' documented noise stream: seed + 7919


def context(teacher):
    registries = distillkit.get_registries()
    return MethodContext(data=DataSpec((2,)), integrator=registries.integrators.get("euler"), integrator_name="euler",
                         total_steps=10, integrators=registries.integrators, teacher=teacher)


def build(name, teacher, **options):
    cls = distillkit.get_registries().methods.get(name)
    return cls(cls.config_class(**options), context(teacher))


def prepare(method, student, tmp_path, seed=0):
    logged = []
    method.prepare(student, PrepareContext(device="cpu", dataset=Toy2d(Toy2dConfig(train_size=64)), output_dir=tmp_path,
                                           log_artifact=lambda path, folder=None: logged.append((path, folder)),
                                           seed=seed, progress=False))
    return logged


def rk4_by_hand(field, x, steps):
    """Classical RK4 from t = 1 to t = 0 in equal steps."""
    h = -1.0 / steps
    for i in range(steps):
        t = 1.0 + i * h
        k1 = field(x, t)
        k2 = field(x + h / 2 * k1, t + h / 2)
        k3 = field(x + h / 2 * k2, t + h / 2)
        k4 = field(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_reflow_pairs_are_the_teachers_ode_solution_generated_once(tmp_path):
    teacher = Toy2dExactTeacher()
    reflow = build("rf-reflow", teacher, num_pairs=300, pair_integrator="rk4", pair_nfe=16)
    logged = prepare(reflow, torch.nn.Linear(2, 2), tmp_path, seed=3)
    pairs = reflow.pairs
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(3 + SEED_OFFSET))
    assert torch.equal(pairs["noise"], noise)
    means, stds, weights = mixture_parameters(Toy2dConfig())
    exact = rk4_by_hand(lambda x, t: gmm_velocity(x, t, means, stds, weights), noise.double(), 4)
    torch.testing.assert_close(pairs["x"].double(), exact, rtol=0, atol=2e-5)
    assert (pairs["integrator"], pairs["nfe"], pairs["teacher"]) == ("rk4", 16, teacher.identity)
    # Saved as tensors under the run's folder, logged as an artifact, loadable with weights_only.
    path = tmp_path / "reflow_pairs.pt"
    assert logged == [(path, "pairs")]
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["x"], pairs["x"]) and torch.equal(saved["noise"], noise)
    # train_set serves the pairs as {"x", "noise"} items that collate into Batch(x, noise=...).
    data = reflow.train_set(None)
    item = data[5]
    assert set(item) == {"x", "noise"} and torch.equal(item["noise"], noise[5])
    batch = Batch.from_item(next(iter(torch.utils.data.DataLoader(data, batch_size=8))))
    assert torch.equal(batch.noise, noise[:8]) and torch.equal(batch.x, pairs["x"][:8])


def test_pairs_are_reused_not_regenerated(tmp_path, monkeypatch):
    teacher = Toy2dExactTeacher()
    first = build("rf-reflow", teacher, num_pairs=50, pair_nfe=8)
    prepare(first, torch.nn.Linear(2, 2), tmp_path)
    import distillkit_rectified_flow.method as method_module

    def refuse(*args, **kwargs):
        raise AssertionError("pairs were generated again")

    monkeypatch.setattr(method_module, "generate_pairs", refuse)
    # A resumed run finds its own pairs in its folder ...
    again = build("rf-reflow", teacher, num_pairs=50, pair_nfe=8)
    assert prepare(again, torch.nn.Linear(2, 2), tmp_path) == []
    assert torch.equal(again.pairs["x"], first.pairs["x"])
    # ... and a later run (or phase) reuses an earlier run's pairs file.
    later = build("rf-distill", teacher, pairs_file=str(tmp_path / "reflow_pairs.pt"))
    assert prepare(later, torch.nn.Linear(2, 2), tmp_path / "later") == []
    assert torch.equal(later.pairs["x"], first.pairs["x"])
    assert "50 pairs, rk4 NFE 8" in later.tags()["distillkit.rf-distill.pairs"]


def test_pairs_file_of_other_data_is_refused(tmp_path):
    torch.save({"format": "distillkit-pairs", "noise": torch.zeros(4, 3), "x": torch.zeros(4, 3)}, tmp_path / "p.pt")
    method = build("rf-reflow", Toy2dExactTeacher(), pairs_file=str(tmp_path / "p.pt"))
    with pytest.raises(distillkit.ConfigError, match="pairs of samples shaped"):
        prepare(method, torch.nn.Linear(2, 2), tmp_path)


def test_pair_options_are_checked():
    cls = distillkit.get_registries().methods.get("rf-reflow")
    with pytest.raises(distillkit.ConfigError, match="pair_nfe.*multiple of 4"):
        cls.config_class(pair_integrator="rk4", pair_nfe=6)
    with pytest.raises(distillkit.ConfigError, match="pair_integrator"):
        cls.config_class(pair_integrator="nope")
    with pytest.raises(distillkit.ConfigError, match="pairs_file"):
        cls.config_class(pairs_file="/no/such/file.pt")


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.seen_t = None

    def forward(self, x, t, cond=None):
        self.seen_t = t.detach().clone()
        return self.w * x + t.view(-1, 1)


def test_reflow_loss_interpolates_the_pair():
    reflow = build("rf-reflow", Toy2dExactTeacher())
    x0, eps = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    out = reflow.loss(Field(), Batch(x0, noise=eps), torch.Generator().manual_seed(2), 0)
    t = torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * (1 - 1e-5) + 1e-5
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    expected = ((0.5 * x_t + t[:, None] - (eps - x0)) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(ValueError, match="no noise"):
        reflow.loss(Field(), Batch(x0), torch.Generator(), 0)


def test_one_step_distillation_trains_at_t_1_on_the_one_step_sample():
    distill = build("rf-distill", Toy2dExactTeacher(), k=1)
    x0, eps = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    field = Field()
    out = distill.loss(field, Batch(x0, noise=eps), torch.Generator().manual_seed(0), 0)
    assert torch.equal(field.seen_t, torch.ones(16, dtype=torch.float64))
    one_step_sample = eps - 1.0 * (0.5 * eps + 1.0)  # Euler from t = 1 to 0
    assert float(out.loss.detach()) == pytest.approx(float(((one_step_sample - x0) ** 2).mean()), rel=1e-12)


def test_k_step_distillation_trains_at_the_samplers_start_times():
    distill = build("rf-distill", Toy2dExactTeacher(), k=3)
    x0, eps = torch.randn(600, 2, dtype=torch.float64), torch.randn(600, 2, dtype=torch.float64)
    field = Field()
    out = distill.loss(field, Batch(x0, noise=eps), torch.Generator().manual_seed(1), 0)
    t = field.seen_t
    assert sorted(set(t.tolist())) == pytest.approx([1 / 3, 2 / 3, 1.0])
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    assert float(out.loss.detach()) == pytest.approx(float(((0.5 * x_t + t[:, None] - (eps - x0)) ** 2).mean()))
    edm = build("rf-distill", Toy2dExactTeacher(), k=3, grid="edm")
    assert edm.times.tolist() == pytest.approx(distillkit.edm_grid(3)[:-1].tolist())
