"""The contract every training method must satisfy, as a reusable pytest test base.

A plugin that registers a method checks it with::

    from distillkit.testing.methods import MethodConformance

    class TestMyMethod(MethodConformance):
        method_name = "my-method"        # a registered name ...
        # method_class = MyMethod        # ... or the class itself (registered or not)

or, to check several methods, with a fixture named ``method_name`` in the test module::

    @pytest.fixture(params=["fm", "otcfm"])
    def method_name(request):
        return request.param

    class TestMyMethods(MethodConformance):
        pass

Every check runs on the CPU in a few milliseconds: a tiny backbone (the ``mlp`` with 16 hidden
units) on ``toy2d``, a few optimizer steps. A multi-network method (``build_networks``,
``update_plan``) is stepped through its plan as the trainer steps it: each update with only its
networks requiring gradients, one Adam per network. A method that ``requires_teacher`` gets the teacher named
by ``teacher`` (the analytic ``toy2d-exact`` by default; any ``--teacher`` value works, e.g. a
checkpoint file). Override ``options(name)`` to give a method options that keep it fast, and the
class attributes below to use other data or another backbone.

What is checked, for each method:

- its options are an attrs class whose defaults build, flatten into scalar MLflow params and come
  back unchanged through TOML (how ``--config`` files and ``--dry-run`` carry them);
- ``prepare`` + ``train_set`` give items the trainer's loader collates into a ``Batch``;
- one training step: a finite scalar loss with a graph, finite gradients that reach every
  parameter that requires one, float metrics, and ``after_step`` runs;
- every update of the plan's first steps: a finite loss whose gradients reach every trainable
  parameter of the networks it updates and none of the others, which its step leaves unchanged;
- the loss draws its random numbers from the generator it is given, never from the global RNG
  (checked with the networks in eval mode, so that dropout does not count): the same generator
  seed under two global seeds gives bit-identical losses;
- the method's state (``state_dict``) and every network's weights survive ``torch.save`` and
  ``torch.load(weights_only=True)`` (how checkpoints store them) and restore a fresh method and
  networks to the same next loss and the same velocity;
- determinism: two setups with the same seed give bit-identical losses, before and after a step;
- ``velocity_fn`` is shaped like ``x`` and finite at every t in [0, 1], and a method rebuilt
  without its teacher (as ``load_trained_model`` rebuilds a run) can still sample;
- ``network_evals_per_step`` and ``tags`` have the types the trainer logs.
"""

from __future__ import annotations

import io
import math
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Optional

import attrs
import pytest
import tomli_w
import torch

from ..config import build_attrs, flatten, to_dict
from ..contracts import Batch, Method, MethodContext, PrepareContext, TeacherContext, Update
from ..integrators import integrate, uniform_grid
from ..plugin_manager import get_registries
from ..teachers import load_teacher

_MLFLOW_SCALARS = (str, int, float, bool)
_TEACHERS: dict = {}


@attrs.define
class Setup:
    """One method wired up the way the trainer wires it, before any step."""

    method: Method
    student: torch.nn.Module  # the sampling network
    dataset: Any
    batch: Batch
    artifacts: list  # (path, folder) pairs given to log_artifact
    output_dir: Path
    networks: dict = attrs.field(factory=dict)  # every trainable network by name (the student among them)
    optimizers: dict = attrs.field(factory=dict)  # one Adam per network, made at its first update
    #: each network's parameters that require a gradient after ``prepare`` (what updates toggle)
    trainable: dict = attrs.field(factory=dict)


def _trainable(setup: Setup) -> dict[str, list]:
    if not setup.trainable:
        setup.trainable = {name: [p for p in network.parameters() if p.requires_grad]
                           for name, network in setup.networks.items()}
    return setup.trainable


def freeze_all_but(setup: Setup, updated: tuple[str, ...]) -> None:
    """What the trainer does during an update: only the updated networks require gradients."""
    for name, parameters in _trainable(setup).items():
        for parameter in parameters:
            parameter.requires_grad_(name in updated)


def update_loss(setup: Setup, update: Update, step: int = 0, seed: int = 1):
    """One update's loss with the trainer's per-update generator and a seeded dropout RNG."""
    torch.manual_seed(seed)
    return setup.method.update_loss(setup.networks, update, setup.batch, torch.Generator().manual_seed(seed), step)


def check_loss_ignores_global_rng(setup: Setup, steps: int = 3) -> None:
    """Every update of the first ``steps`` steps gives the same loss for the same generator seed
    under two different global torch seeds, with the networks in eval mode (no dropout): the loss
    draws no random number from the global RNG. Raises ``AssertionError`` naming the update."""
    modes = {name: network.training for name, network in setup.networks.items()}
    for network in setup.networks.values():
        network.eval()
    try:
        for step in range(steps):
            for update in setup.method.update_plan(step):
                freeze_all_but(setup, update.networks)
                losses = []
                for global_seed in (11, 12):
                    torch.manual_seed(global_seed)
                    generator = torch.Generator().manual_seed(5)
                    with torch.no_grad():
                        output = setup.method.update_loss(setup.networks, update, setup.batch, generator, step)
                    losses.append(output.loss.detach().clone())
                assert torch.equal(losses[0], losses[1]), (
                    f"the {update.loss!r} loss at step {step} changes with the global torch seed "
                    f"({float(losses[0])} vs {float(losses[1])}): it draws random numbers from the global RNG "
                    "instead of the generator it is given")
    finally:
        freeze_all_but(setup, tuple(setup.networks))
        for name, network in setup.networks.items():
            network.train(modes[name])


def assert_same_state(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts / lists of tensors and plain values, compared exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: keys differ"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: not a tensor"
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"{where} differs")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _labels(spec, n: int) -> Optional[torch.Tensor]:
    """Labels for a class-conditional model's velocity (None for unconditional data)."""
    if spec.num_classes is None:
        return None
    return torch.arange(n) % spec.num_classes


class MethodConformance:
    """Subclass as ``class TestX(MethodConformance)`` and name the method (see module docstring)."""

    method_name: ClassVar[Optional[str]] = None
    method_class: ClassVar[Optional[type]] = None

    dataset: ClassVar[str] = "toy2d"
    dataset_options: ClassVar[dict] = {"train_size": 256}
    backbone: ClassVar[str] = "mlp"
    backbone_options: ClassVar[dict] = {"hidden": 16, "layers": 1, "time_embedding_dim": 8}
    batch_size: ClassVar[int] = 16
    integrator: ClassVar[str] = "euler"
    total_steps: ClassVar[int] = 10
    #: what ``--teacher`` would be for methods that distil one
    teacher: ClassVar[str] = "toy2d-exact"
    seed: ClassVar[int] = 0

    # -- hooks ----------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        # A subclass that names its method is parametrised with it; one whose module defines a
        # `method_name` fixture instead is left to pytest.
        cls = type(self)
        name = cls.method_class.name if isinstance(cls.method_class, type) else cls.method_name
        if isinstance(name, str) and "method_name" in metafunc.fixturenames:
            metafunc.parametrize("method_name", [name], ids=[name], scope="class")

    def options(self, name: str) -> dict:
        """``method_options`` for the method named ``name`` (default: none, its defaults)."""
        return {}

    def method_cls(self, name: str) -> type:
        cls = type(self)
        if isinstance(cls.method_class, type) and cls.method_class.name == name:
            return cls.method_class
        return get_registries().methods.get(name)

    def make_dataset(self):
        cls = get_registries().datasets.get(self.dataset)
        return cls(build_attrs(cls.config_class, dict(self.dataset_options), "dataset_options."))

    def make_teacher(self, dataset):
        """The teacher ``self.teacher`` names, loaded once per test session (teachers are frozen)."""
        key = (self.teacher, self.dataset, repr(dataset.config))
        if key not in _TEACHERS:
            context = TeacherContext(data=dataset.spec, dataset_name=self.dataset, dataset_config=dataset.config)
            _TEACHERS[key] = load_teacher(self.teacher, get_registries(), context)
        return _TEACHERS[key]

    def build(self, name: str, tmp_path: Path, *, seed: Optional[int] = None, teacher: bool = True,
              prepare: bool = True) -> Setup:
        """The method, its student and a first batch, built as the trainer builds them."""
        seed = self.seed if seed is None else seed
        registries = get_registries()
        method_cls = self.method_cls(name)
        dataset = self.make_dataset()
        spec = dataset.spec
        context = MethodContext(
            data=spec,
            integrator=registries.integrators.get(self.integrator),
            integrator_name=self.integrator,
            total_steps=self.total_steps,
            integrators=registries.integrators,
            teacher=self.make_teacher(dataset) if (teacher and method_cls.requires_teacher) else None,
        )
        method = method_cls(build_attrs(method_cls.config_class, self.options(name), "method_options."), context)
        backbone_cls = registries.backbones.get(self.backbone)
        backbone_config = build_attrs(backbone_cls.config_class, dict(self.backbone_options), "backbone_options.")

        def make_backbone(conditioning: tuple[str, ...] = ()):
            if conditioning:
                return backbone_cls.build(backbone_config, spec, tuple(conditioning))
            return backbone_cls.build(backbone_config, spec)

        torch.manual_seed(seed)
        networks = method.build_networks(make_backbone)
        assert isinstance(networks, dict) and method.sampling_network in networks, \
            f"build_networks must return a dict holding the sampling network {method.sampling_network!r}"
        assert set(method.ema_networks()) <= set(networks), "ema_networks names networks build_networks did not build"
        student = networks[method.sampling_network]
        artifacts: list = []
        output_dir = Path(tmp_path) / f"{name}-seed{seed}"
        batch = None
        if prepare:
            method.prepare(student, PrepareContext(
                device=torch.device("cpu"), dataset=dataset, output_dir=output_dir,
                log_artifact=lambda path, folder=None: artifacts.append((Path(path), folder)),
                seed=seed, progress=False,
            ))
            data = method.train_set(dataset)
            loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                                 generator=torch.Generator().manual_seed(seed))
            batch = Batch.from_item(next(iter(loader)))
        for network in networks.values():
            network.train()
        setup = Setup(method, student, dataset, batch, artifacts, output_dir, networks=dict(networks))
        _trainable(setup)  # captured after prepare, as the trainer does
        return setup

    def loss(self, setup: Setup, step: int = 0, seed: int = 1):
        """The loss of the first update of step ``step``'s plan (for a single-network method: its
        ``loss``) with the trainer's per-step generator and dropout RNG."""
        update = setup.method.update_plan(step)[0]
        freeze_all_but(setup, update.networks)
        return update_loss(setup, update, step, seed)

    def train_step(self, setup: Setup, step: int = 0) -> float:
        """Optimizer step ``step`` as the trainer takes it: each update of the plan with only its
        networks trainable, one Adam per network; the first update's loss."""
        losses = []
        for index, update in enumerate(setup.method.update_plan(step)):
            freeze_all_but(setup, update.networks)
            output = update_loss(setup, update, step, seed=1 + index)
            for name in update.networks:
                if name not in setup.optimizers:
                    setup.optimizers[name] = torch.optim.Adam(setup.networks[name].parameters(), lr=1e-3)
                setup.optimizers[name].zero_grad(set_to_none=True)
            output.loss.backward()
            for name in update.networks:
                setup.optimizers[name].step()
            losses.append(float(output.loss.detach()))
        freeze_all_but(setup, tuple(setup.networks))
        setup.method.after_step(setup.student, step)
        return losses[0]

    def plan_updates(self, setup: Setup, steps: int = 6) -> list[tuple[int, Update]]:
        """(step, update) for the first distinct updates (by loss and networks) of the plan."""
        seen, out = set(), []
        for step in range(steps):
            for update in setup.method.update_plan(step):
                key = (update.loss, tuple(update.networks))
                if key not in seen:
                    seen.add(key)
                    out.append((step, update))
        return out

    # -- the contract ---------------------------------------------------------------------------

    def test_options_flatten_into_mlflow_params_and_round_trip_through_toml(self, method_name):
        cls = self.method_cls(method_name)
        assert attrs.has(cls.config_class), "config_class must be an attrs class"
        defaults = cls.config_class()
        tree = to_dict(defaults)
        flat = flatten({"method_options": tree})
        for key, value in flat.items():
            assert isinstance(key, str) and key.startswith("method_options.")
            values = value if isinstance(value, list) else [value]
            assert all(isinstance(v, _MLFLOW_SCALARS) for v in values), f"{key}={value!r} is not an MLflow param"
        # TOML has no null: None means "unset" and is dropped, as `--dry-run` does.
        text = tomli_w.dumps({k: v for k, v in tree.items() if v is not None})
        again = build_attrs(cls.config_class, tomllib.loads(text), "method_options.")
        assert again == defaults

    def test_train_set_items_collate_into_batches(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        spec = setup.dataset.spec
        assert setup.batch.x.shape == (self.batch_size, *spec.shape)
        assert setup.batch.x.dtype == torch.float32 and torch.isfinite(setup.batch.x).all()
        if setup.batch.noise is not None:
            assert setup.batch.noise.shape == setup.batch.x.shape
        if spec.num_classes is not None:
            assert setup.batch.cond is not None and setup.batch.cond.shape == (self.batch_size,), "labels are lost"
        for path, _ in setup.artifacts:
            assert path.is_file(), f"log_artifact was given {path}, which does not exist"

    def _first_update_parameters(self, setup: Setup):
        update = setup.method.update_plan(0)[0]
        return [(f"{name}.{n}", p) for name in update.networks for n, p in setup.networks[name].named_parameters()]

    def test_one_cpu_training_step(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        output = self.loss(setup)
        assert output.loss.dim() == 0 and output.loss.requires_grad
        assert torch.isfinite(output.loss), f"loss {output.loss}"
        assert all(isinstance(k, str) and math.isfinite(float(v)) for k, v in output.metrics.items())
        output.loss.backward()
        grads = [p.grad for _, p in self._first_update_parameters(setup) if p.requires_grad and p.grad is not None]
        assert grads, "no parameter received a gradient"
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), "every gradient is zero"
        freeze_all_but(setup, tuple(setup.networks))
        setup.method.after_step(setup.student, 0)
        assert math.isfinite(self.train_step(setup, 1))

    def test_gradients_reach_every_trainable_parameter(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        self.loss(setup).loss.backward()
        missing = [n for n, p in self._first_update_parameters(setup) if p.requires_grad and p.grad is None]
        assert not missing, f"parameters the loss never reaches: {missing}"

    def test_every_update_reaches_its_networks_and_leaves_the_others(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        trainable = _trainable(setup)
        plan = self.plan_updates(setup)
        assert plan and all(isinstance(u, Update) for _, u in plan), "update_plan must return Update objects"
        for step, update in plan:
            assert update.networks and set(update.networks) <= set(setup.networks), f"{update} names unknown networks"
            for network in setup.networks.values():
                network.zero_grad(set_to_none=True)
            frozen = {name: [p.detach().clone() for p in setup.networks[name].parameters()]
                      for name in setup.networks if name not in update.networks}
            freeze_all_but(setup, update.networks)
            output = update_loss(setup, update, step)
            assert output.loss.dim() == 0 and torch.isfinite(output.loss), f"{update.loss} loss {output.loss}"
            output.loss.backward()
            for name in update.networks:
                missing = [n for n, p in setup.networks[name].named_parameters()
                           if any(p is q for q in trainable[name]) and p.grad is None]
                assert not missing, f"the {update.loss!r} update never reaches {name}'s {missing}"
                assert all(torch.isfinite(p.grad).all() for p in trainable[name] if p.grad is not None)
            for name, before in frozen.items():
                parameters = list(setup.networks[name].parameters())
                assert all(p.grad is None for p in parameters), f"the {update.loss!r} update gave {name} gradients"
                assert all(torch.equal(p, b) for p, b in zip(parameters, before)), \
                    f"the {update.loss!r} update changed the weights of {name}, which it does not update"
        freeze_all_but(setup, tuple(setup.networks))

    def test_loss_draws_randomness_only_from_its_generator(self, method_name, tmp_path):
        check_loss_ignores_global_rng(self.build(method_name, tmp_path))

    def test_state_round_trips_through_a_checkpoint(self, method_name, tmp_path):
        first = self.build(method_name, tmp_path)
        self.train_step(first, 0)
        self.train_step(first, 1)
        buffer = io.BytesIO()
        torch.save({"networks": {name: net.state_dict() for name, net in first.networks.items()},
                    "method": first.method.state_dict()}, buffer)
        buffer.seek(0)
        payload = torch.load(buffer, weights_only=True)  # what checkpoints allow

        second = self.build(method_name, tmp_path, seed=self.seed + 1)
        for name, network in second.networks.items():
            network.load_state_dict(payload["networks"][name])
        second.method.load_state_dict(payload["method"])
        assert_same_state(second.method.state_dict(), first.method.state_dict(), "method.state_dict()")
        second.batch = first.batch
        for step, update in self.plan_updates(first):
            assert float(update_loss(second, update, step).loss.detach()) == \
                float(update_loss(first, update, step).loss.detach()), f"the {update.loss!r} loss after a restore"
        spec = first.dataset.spec
        x = torch.randn(4, *spec.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([1.0, 0.7, 0.3, 0.0])
        for network in (*first.networks.values(), *second.networks.values()):
            network.eval()
        with torch.no_grad():
            torch.testing.assert_close(second.method.velocity_fn(second.student, _labels(spec, 4))(x, t),
                                       first.method.velocity_fn(first.student, _labels(spec, 4))(x, t),
                                       rtol=0, atol=0)

    def test_same_seed_gives_identical_losses(self, method_name, tmp_path):
        a = self.build(method_name, tmp_path / "a")
        b = self.build(method_name, tmp_path / "b")
        assert torch.equal(a.batch.x, b.batch.x)
        assert self.train_step(a, 0) == self.train_step(b, 0)
        assert float(self.loss(a, 1).loss.detach()) == float(self.loss(b, 1).loss.detach())

    def test_velocity_is_finite_everywhere_and_samples(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        self.train_step(setup, 0)
        setup.student.eval()
        velocity = setup.method.velocity_fn(setup.student, _labels(setup.dataset.spec, 8))
        x = torch.randn(8, *setup.dataset.spec.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in (1.0, 0.5, 1e-3, 0.0):
                v = velocity(x, torch.full((x.shape[0],), t))
                assert v.shape == x.shape and torch.isfinite(v).all(), f"velocity at t={t}"
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            for integrator, steps in (("euler", 1), ("heun", 2), ("rk4", 2)):  # heun and rk4 reach t = 0
                samples = integrate(velocity, noise, uniform_grid(steps), integrator)
                assert torch.isfinite(samples).all(), f"{integrator} samples"

    def test_rebuilt_without_teacher_can_sample(self, method_name, tmp_path):
        # `load_trained_model` rebuilds a run's method with no teacher and never calls prepare.
        setup = self.build(method_name, tmp_path, teacher=False, prepare=False)
        setup.student.eval()
        x = torch.randn(3, *setup.dataset.spec.shape)
        with torch.no_grad():
            v = setup.method.velocity_fn(setup.student, _labels(setup.dataset.spec, 3))(x, torch.full((3,), 0.5))
        assert v.shape == x.shape and torch.isfinite(v).all()

    def test_costs_and_tags_are_loggable(self, method_name, tmp_path):
        setup = self.build(method_name, tmp_path)
        evals = setup.method.network_evals_per_step()
        assert {"with_grad", "no_grad"} <= set(evals) <= {"with_grad", "no_grad", "jvp"}
        assert all(isinstance(v, int) and v >= 0 for v in evals.values()) and evals["with_grad"] >= 1
        once = setup.method.network_evals_once()
        assert isinstance(once, int) and once >= 0
        tags = setup.method.tags()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
