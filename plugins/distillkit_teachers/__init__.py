"""Teachers: trained distillkit models (a checkpoint file or an MLflow run id) and models trained
elsewhere (``diffusers:PATH``, ``edm:FILE``; see docs/teachers.md).

Any method's trained run can teach any other method: the teacher's velocity is the trained
method's own sampling velocity (e.g. CUD's sampling head), from its EMA weights.
"""

from __future__ import annotations

from typing import Optional

import torch

import distillkit
from distillkit import Teacher, TeacherContext, hookimpl


class CheckpointTeacher(Teacher):
    name = "checkpoint"

    def __init__(self, trained, identity: str):
        self.trained = trained
        self.identity = identity

    @classmethod
    def from_spec(cls, spec: str, context: TeacherContext) -> Optional["CheckpointTeacher"]:
        found = distillkit.find_checkpoint(spec, runs_dir=context.runs_dir, tracking_uri=context.tracking_uri)
        if found is None:
            return None
        path, identity = found
        trained = distillkit.load_trained_model(path, weights="ema", device=context.device)
        if trained.spec != context.data:
            raise distillkit.ConfigError(
                "teacher", spec,
                f"a teacher trained on data like the student's {context.data}; this one was trained on {trained.spec}",
            )
        return cls(trained, f"{identity} sha256:{trained.sha256}")

    @torch.no_grad()
    def velocity(self, x, t, cond=None):
        return self.trained.velocity_fn(cond)(x, t)


@hookimpl
def distillkit_register_teachers(register):
    from .diffusers_teacher import DiffusersTeacher  # imports diffusers only when one is loaded
    from .edm_teacher import EdmTeacher

    register(CheckpointTeacher)
    register(DiffusersTeacher)
    register(EdmTeacher)
