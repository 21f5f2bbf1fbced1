"""Every built-in teacher passes distillkit's Teacher conformance base: the analytic toy2d field
and the checkpoint teacher (a trained run, on toy2d and on class-conditional digits)."""

import pytest

from distillkit.cli.main import main
from distillkit.testing.teachers import TeacherConformance


class TestToy2dExact(TeacherConformance):
    teacher_spec = "toy2d-exact"


class TestCheckpointTeacher(TeacherConformance):
    @pytest.fixture
    def teacher_spec(self, cud_rk2_toy2d_checkpoint):
        return str(cud_rk2_toy2d_checkpoint)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    runs = tmp_path_factory.mktemp("fm-digits-conditional")
    assert main(["run", "--method", "fm", "--dataset", "digits", "--set", "dataset_options.class_conditional=true",
                 "--set", "backbone_options.channels=8", "--max-steps", "2", "--batch-size", "8",
                 "--runs-dir", str(runs), "--no-track", "--quiet", "--set", "sample.num_samples=8",
                 "--set", "sample.reference_steps=1", "--nfe", "1"]) == 0
    return str(next(runs.glob("runs/*/checkpoint.pt")))


class TestClassConditionalCheckpointTeacher(TeacherConformance):
    dataset = "digits"
    dataset_options = {"class_conditional": True}

    @pytest.fixture
    def teacher_spec(self, digits_checkpoint):
        return digits_checkpoint
