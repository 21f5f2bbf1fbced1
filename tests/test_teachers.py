"""Teachers: a trained run or checkpoint file teaches by its own velocity; analytic teachers by name."""

import re
import shutil
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import TeacherContext
from distillkit.cli.main import main
from distillkit.errors import ConfigError, UsageError
from distillkit.teachers import load_teacher

SMALL = ["--no-track", "--quiet", "--set", "sample.num_samples=32", "--set", "sample.reference_steps=2", "--nfe", "1"]


def train(capsys, runs_dir, *argv):
    assert main(["run", "--max-steps", "3", "--batch-size", "16", "--runs-dir", str(runs_dir), *SMALL, *argv]) == 0
    return Path(re.search(r"checkpoint: (\S+)", capsys.readouterr().out).group(1))


def context(registries, dataset="toy2d", runs_dir="distillkit-runs", tracking_uri=""):
    cls = registries.datasets.get(dataset)
    data = cls(cls.config_class())
    return TeacherContext(data=data.spec, dataset_name=dataset, dataset_config=data.config,
                          runs_dir=str(runs_dir), tracking_uri=tracking_uri)


def test_trained_model_rebuilds_the_run_and_uses_its_sampling_head(cud_rk2_toy2d_checkpoint):
    trained = distillkit.load_trained_model(cud_rk2_toy2d_checkpoint)
    assert trained.resolved.config.method == "cud" and trained.step == 3
    assert trained.spec == distillkit.DataSpec((2,))
    payload = torch.load(cud_rk2_toy2d_checkpoint, weights_only=True)
    state = trained.model.state_dict()
    assert state.keys() == payload["ema"].keys()
    for key, value in payload["ema"].items():  # the EMA weights, not the online ones
        torch.testing.assert_close(state[key], value)
    # CUD-RK2 samples with its last head: the velocity is that head applied to the trunk's features.
    x, t = torch.randn(4, 2), torch.rand(4)
    _, features = trained.model.backbone(x, t, return_features=True)
    torch.testing.assert_close(trained.velocity_fn()(x, t), trained.model.extra_heads[0](features))


def test_checkpoint_file_is_a_teacher_with_a_hash_identity(registries, cud_rk2_toy2d_checkpoint):
    teacher = load_teacher(str(cud_rk2_toy2d_checkpoint), registries, context(registries))
    assert teacher.name == "checkpoint"
    assert teacher.identity.startswith(f"file:{cud_rk2_toy2d_checkpoint.resolve()} sha256:")
    trained = distillkit.load_trained_model(cud_rk2_toy2d_checkpoint)
    x, t = torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(teacher.velocity(x, t), trained.velocity_fn()(x, t))


def test_run_id_teacher_from_local_runs_dir_and_from_mlflow_artifacts(capsys, registries, tmp_path):
    runs = tmp_path / "runs"
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2", "--batch-size", "8",
                 "--runs-dir", str(runs), "--quiet", "--set", "sample.num_samples=16",
                 "--set", "sample.reference_steps=1", "--nfe", "1"]) == 0
    run_id = re.search(r"MLflow run: (\w+)", capsys.readouterr().out).group(1)
    teacher = load_teacher(run_id, registries, context(registries, runs_dir=runs))
    assert teacher.identity.startswith(f"run:{run_id} sha256:")
    shutil.rmtree(runs / "runs" / run_id)  # now only MLflow's artifact store has it
    again = load_teacher(run_id, registries, context(registries, runs_dir=runs))
    assert again.identity == teacher.identity


def test_missing_run_and_unknown_spec_are_one_line_errors(registries, tmp_path):
    with pytest.raises(UsageError, match="run 0123456789abcdef0123456789abcdef cannot be read"):
        load_teacher("0123456789abcdef0123456789abcdef", registries, context(registries, runs_dir=tmp_path))
    with pytest.raises(ConfigError, match="an MLflow run id, a checkpoint file, diffusers:PATH, edm:FILE or a teacher name"):
        load_teacher("no-such-teacher", registries, context(registries))


def test_teacher_for_other_data_is_refused(registries, cud_rk2_toy2d_checkpoint):
    with pytest.raises(ConfigError, match="trained on data like the student's"):
        load_teacher(str(cud_rk2_toy2d_checkpoint), registries, context(registries, dataset="digits"))


def test_corrupted_teacher_checkpoint_is_refused(registries, cud_rk2_toy2d_checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(cud_rk2_toy2d_checkpoint.read_bytes()[:100])
    with pytest.raises(UsageError, match="truncated or corrupted"):
        load_teacher(str(broken), registries, context(registries))


def test_analytic_teacher_by_name_uses_the_runs_mixture(registries):
    cls = registries.datasets.get("toy2d")
    data = cls(cls.config_class(radius=3.0))
    ctx = TeacherContext(data=data.spec, dataset_name="toy2d", dataset_config=data.config)
    teacher = load_teacher("toy2d-exact", registries, ctx)
    assert "radius=3.0" in teacher.identity
    # At t = 0 the exact velocity of the straight path is -x.
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(teacher.velocity(x, torch.zeros(4, dtype=torch.float64)), -x, rtol=1e-6, atol=1e-6)
