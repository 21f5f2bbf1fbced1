"""Progressive distillation in velocity space (``pd``), METHODS.md §8.5; after Salimans and Ho,
"Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR 2022), in the form CUD's
repository uses on a rectified-flow teacher, written here from the mathematics.

One phase per run. With TN = ``teacher_steps`` and h = 1/TN, per sample

    t = j / TN,  j ~ U{2, ..., TN}       (or j even only: the student's own grid points)
    x_t  = (1 - t) x + t eps
    x'   = x_t - h v_T(x_t, t)           two Euler steps of the teacher toward the data end
    x''  = x' - h v_T(x', t - h)
    L    = ||v_theta(x_t, t) - (x_t - x'') / (2h)||^2

so one Euler step of 2h by the student lands where two of h by the teacher land. The student
starts from the teacher's weights and samples with TN/2 Euler steps. The next phase is a new run
with this run as ``--teacher`` and ``teacher_steps`` halved (16 -> 8 -> 4 -> 2 -> 1 step).
"""

from __future__ import annotations

import attrs
import torch
from torch.nn.functional import mse_loss

import distillkit
from distillkit import validators
from distillkit import LossOutput, Method, hookimpl, straight_path

from distillkit import copy_teacher_weights


def _teacher_steps(instance, attribute, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 2 and value % 2 == 0):
        raise distillkit.ConfigError(attribute.name, value, "an even integer >= 2")


@attrs.frozen
class PDConfig:
    #: TN: the teacher's Euler steps on [0, 1]; the student learns TN/2
    teacher_steps: int = attrs.field(default=16, validator=_teacher_steps)
    #: train only at the student's grid points j = 2, 4, ..., TN (Salimans and Ho) instead of every j
    student_grid_only: bool = attrs.field(default=False, validator=validators.boolean)
    #: start the student from the teacher's weights when the shapes match
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)


def two_step_target(velocity, x_t: torch.Tensor, t: torch.Tensor, h: float) -> torch.Tensor:
    """(x_t - x'') / (2h) after two Euler steps of ``velocity`` of size h from (x_t, t) toward t = 0."""
    x1 = x_t - h * velocity(x_t, t)
    x2 = x1 - h * velocity(x1, t - h)
    return (x_t - x2) / (2.0 * h)


class ProgressiveDistillation(Method):
    name = "pd"
    config_class = PDConfig
    requires_teacher = True

    def __init__(self, config: PDConfig, context):
        super().__init__(config, context)
        self.init_source = "random"

    @property
    def student_steps(self) -> int:
        return self.config.teacher_steps // 2

    def prepare(self, student, context):
        if self.config.init_from_teacher and self.context.teacher is not None:
            self.init_source = copy_teacher_weights(student, self.context.teacher)

    def network_evals_per_step(self):
        return {"with_grad": 1, "no_grad": 2}

    def tags(self):
        return {
            "distillkit.pd.teacher_steps": str(self.config.teacher_steps),
            "distillkit.pd.student_steps": str(self.student_steps),
            "distillkit.pd.init": self.init_source,
        }

    def loss(self, student, batch, generator, step):
        teacher = self.context.teacher
        if teacher is None:
            raise distillkit.UsageError("pd distils a teacher: pass --teacher (a run id, a checkpoint file or a teacher name)")
        tn = self.config.teacher_steps
        x0, cond = batch.x, batch.cond
        n = x0.shape[0]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.config.student_grid_only:
            j = 2 * torch.randint(1, tn // 2 + 1, (n,), generator=generator, device=x0.device)
        else:
            j = torch.randint(2, tn + 1, (n,), generator=generator, device=x0.device)
        t = j.to(x0.dtype) / tn
        x_t, _ = straight_path(x0, eps, t)
        with torch.no_grad():
            target = two_step_target(lambda x, s: teacher.velocity(x, s, cond), x_t, t, 1.0 / tn)
        return LossOutput(mse_loss(student(x_t, t, cond), target))


@hookimpl
def distillkit_register_methods(register):
    register(ProgressiveDistillation)
