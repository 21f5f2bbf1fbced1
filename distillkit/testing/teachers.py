"""The contract every registered ``Teacher`` must satisfy, as a reusable pytest test base.

A plugin that registers a teacher checks it with::

    from distillkit.testing.teachers import TeacherConformance

    class TestMyTeacher(TeacherConformance):
        teacher_spec = "my-teacher"        # what a user passes to --teacher

or, for specs that need a file made first (a checkpoint), with a fixture named ``teacher_spec``
in the test module. ``context(spec)`` builds the ``TeacherContext`` (default: the student's data
is ``dataset`` with ``dataset_options``); override it for other data.

What is checked: ``distillkit.teachers.load_teacher`` finds it; it answers ``None`` to a spec it
does not handle (so it never hides another teacher); ``identity`` is a non-empty one-line string,
the same for two loads; the velocity is shaped like ``x``, finite at every t in [0, 1] (both ends
included), deterministic, carries no gradient, and does not depend on which other samples are in
the batch; ``teacher(x, t)`` is ``teacher.velocity(x, t)``; with class-conditional data the labels
are accepted.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import pytest
import torch

from ..contracts import Teacher, TeacherContext
from ..plugin_manager import get_registries
from ..teachers import load_teacher


class TeacherConformance:
    """Subclass with ``teacher_spec`` set (or a ``teacher_spec`` fixture); see the module docstring."""

    teacher_spec: ClassVar[Optional[str]] = None
    dataset: ClassVar[str] = "toy2d"
    dataset_options: ClassVar[dict] = {"train_size": 64}
    batch: ClassVar[int] = 12

    # -- hooks ------------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "teacher_spec" in metafunc.fixturenames and isinstance(self.teacher_spec, str):
            metafunc.parametrize("teacher_spec", [self.teacher_spec])

    def context(self, spec: str) -> TeacherContext:
        from ..config import build_attrs

        dataset_cls = get_registries().datasets.get(self.dataset)
        config = build_attrs(dataset_cls.config_class, dict(self.dataset_options), "dataset_options.")
        data = dataset_cls(config).spec
        return TeacherContext(data=data, dataset_name=self.dataset, dataset_config=config)

    # -- helpers ----------------------------------------------------------------------------------

    def load(self, spec: str) -> Teacher:
        return load_teacher(spec, get_registries(), self.context(spec))

    def inputs(self, spec: str, seed: int = 0):
        data = self.context(spec).data
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, *data.shape, generator=generator)
        t = torch.linspace(0.0, 1.0, self.batch)
        cond = torch.arange(self.batch) % data.num_classes if data.num_classes else None
        return x, t, cond

    # -- the contract -----------------------------------------------------------------------------

    def test_is_found_by_load_teacher(self, teacher_spec):
        teacher = self.load(teacher_spec)
        assert isinstance(teacher, Teacher)

    def test_every_teacher_class_refuses_specs_it_does_not_handle(self, teacher_spec):
        context = self.context(teacher_spec)
        for entry in get_registries().teachers:
            assert entry.obj.from_spec("no-such-teacher-spec-0c8f", context) is None, entry.name

    def test_identity_is_one_stable_line(self, teacher_spec):
        first, second = self.load(teacher_spec), self.load(teacher_spec)
        assert isinstance(first.identity, str) and first.identity.strip() and "\n" not in first.identity
        assert first.identity == second.identity

    def test_velocity_is_shaped_like_x_finite_at_both_ends_and_gradient_free(self, teacher_spec):
        teacher = self.load(teacher_spec)
        x, t, cond = self.inputs(teacher_spec)
        v = teacher.velocity(x, t, cond)
        assert v.shape == x.shape
        assert torch.isfinite(v).all(), "the velocity must be finite at every t in [0, 1]"
        assert not v.requires_grad

    def test_velocity_is_deterministic_and_batch_independent(self, teacher_spec):
        teacher = self.load(teacher_spec)
        x, t, cond = self.inputs(teacher_spec)
        whole = teacher.velocity(x, t, cond)
        torch.testing.assert_close(teacher.velocity(x, t, cond), whole, rtol=0, atol=0)
        half = self.batch // 2
        parts = [teacher.velocity(x[s], t[s], None if cond is None else cond[s]) for s in (slice(0, half), slice(half, None))]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)

    def test_call_is_the_unconditional_velocity(self, teacher_spec):
        teacher = self.load(teacher_spec)
        x, t, _ = self.inputs(teacher_spec)
        if self.context(teacher_spec).data.num_classes:
            pytest.skip("class-conditional teachers are called with labels")
        torch.testing.assert_close(teacher(x, t), teacher.velocity(x, t), rtol=0, atol=0)
