"""The baseline methods from the command line, as a user runs them: with a teacher trained by fm,
without a teacher where none is needed, one-line errors, what is tracked in MLflow, phase chains,
and on toy2d each distilled sampler's error against the analytic teacher falling with training."""

import re
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import Batch, MethodContext, PrepareContext
from distillkit.cli.main import main
from distillkit_datasets import Toy2d, Toy2dConfig, Toy2dExactTeacher

TINY = ["--set", "backbone_options.hidden=16", "--set", "backbone_options.layers=1",
        "--set", "backbone_options.time_embedding_dim=8"]
SMALL = ["--max-steps", "3", "--batch-size", "16", "--quiet", "--nfe", "1,2", "--set", "sample.num_samples=32",
         "--set", "sample.reference_steps=2", "--set", "dataset_options.train_size=256", *TINY]
FAST_PAIRS = ["--set", "method_options.num_pairs=64", "--set", "method_options.pair_nfe=8"]


def run(capsys, runs, *argv, track=False):
    code = main(["run", "--dataset", "toy2d", "--runs-dir", str(runs), *SMALL, *([] if track else ["--no-track"]), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def checkpoint_of(out):
    return Path(re.search(r"checkpoint: (\S+)", out).group(1))


@pytest.fixture(scope="module")
def fm_teacher(tmp_path_factory):
    runs = tmp_path_factory.mktemp("fm")
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--runs-dir", str(runs), "--no-track", *SMALL]) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


@pytest.mark.parametrize("method,extra", [
    ("cd", []),
    ("cd", ["--set", "method_options.parameterization=velocity", "--set", "method_options.target_rate=0.95",
            "--set", "method_options.distance=pseudo-huber", "--set", "method_options.teacher_integrator=rk4"]),
    ("pd", ["--set", "method_options.teacher_steps=4"]),
    ("rf-reflow", FAST_PAIRS),
    ("rf-distill", FAST_PAIRS + ["--set", "method_options.k=2"]),
])
def test_distillation_from_a_trained_teacher_checkpoint(capsys, tmp_path, fm_teacher, method, extra):
    code, out, err = run(capsys, tmp_path, "--method", method, "--teacher", str(fm_teacher), *extra)
    assert code == 0, err
    payload = torch.load(checkpoint_of(out), weights_only=True)
    assert payload["config"]["teacher"] == str(fm_teacher)
    # The trained student is a model like any other: it can be rebuilt without its teacher.
    trained = distillkit.load_trained_model(checkpoint_of(out))
    x = torch.randn(4, 2)
    assert torch.isfinite(trained.velocity_fn()(x, torch.full((4,), 0.5))).all()


@pytest.mark.parametrize("method", ["ct", "otcfm"])
def test_methods_without_a_teacher(capsys, tmp_path, method):
    code, out, err = run(capsys, tmp_path, "--method", method)
    assert code == 0, err


@pytest.mark.parametrize("method", ["cd", "pd", "rf-reflow", "rf-distill"])
def test_a_distillation_method_without_a_teacher_is_one_line_exit_2(capsys, tmp_path, method):
    code, out, err = run(capsys, tmp_path, "--method", method)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("distillkit: error: ") and "teacher" in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("option,value,allowed", [
    ("distance", "lpips", "one of l2, l1, pseudo-huber"),
    ("teacher_integrator", "dopri5", "a registered integrator"),
    ("num_points", "1", "an integer >= 2"),
])
def test_bad_cd_options_are_one_line_exit_2(capsys, tmp_path, fm_teacher, option, value, allowed):
    code, out, err = run(capsys, tmp_path, "--method", "cd", "--teacher", str(fm_teacher),
                         "--set", f"method_options.{option}={value}")
    assert code == 2 and err.count("\n") == 1
    assert f"method_options.{option}=" in err and allowed in err


def test_tracked_reflow_logs_its_pairs_teacher_and_costs(capsys, tmp_path, fm_teacher):
    from mlflow.tracking import MlflowClient

    code, out, err = run(capsys, tmp_path, "--method", "rf-reflow", "--teacher", str(fm_teacher), *FAST_PAIRS, track=True)
    assert code == 0, err
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    data = client.get_run(run_id).data
    assert data.tags["distillkit.teacher"].startswith(f"file:{fm_teacher.resolve()} sha256:")
    assert data.tags["distillkit.rf-reflow.init"] == "teacher"
    assert data.tags["distillkit.rf-reflow.pairs"].startswith("64 pairs, rk4 NFE 8")
    assert data.params["method_options.num_pairs"] == "64"
    assert data.metrics["cost/network_evals_with_grad"] == 1
    assert "pairs/reflow_pairs.pt" in {a.path for a in client.list_artifacts(run_id, "pairs")}
    # A later run reuses the logged pairs instead of generating them again.
    pairs = next(tmp_path.glob("runs/*/reflow_pairs.pt"))
    code, out, err = run(capsys, tmp_path / "later", "--method", "rf-distill", "--teacher", str(fm_teacher),
                         "--set", f"method_options.pairs_file={pairs}")
    assert code == 0, err


def test_progressive_distillation_phases_chain_through_checkpoints(capsys, tmp_path, fm_teacher):
    code, out, err = run(capsys, tmp_path, "--method", "pd", "--teacher", str(fm_teacher),
                         "--set", "method_options.teacher_steps=8")
    assert code == 0, err
    phase1 = checkpoint_of(out)
    code, out, err = run(capsys, tmp_path, "--method", "pd", "--teacher", str(phase1),
                         "--set", "method_options.teacher_steps=4")
    assert code == 0, err
    # A consistency model can teach too: its velocity is the implied one.
    code, out, err = run(capsys, tmp_path, "--method", "cd", "--teacher", str(fm_teacher))
    code, out, err = run(capsys, tmp_path, "--method", "pd", "--teacher", str(checkpoint_of(out)),
                         "--set", "method_options.teacher_steps=2")
    assert code == 0, err


def test_student_starts_as_its_teacher(fm_teacher):
    from distillkit.teachers import load_teacher

    registries = distillkit.get_registries()
    data = Toy2d(Toy2dConfig(train_size=64))
    teacher = load_teacher(str(fm_teacher), registries, distillkit.TeacherContext(data.spec, "toy2d", data.config))
    backbone_cls = registries.backbones.get("mlp")
    x, t = torch.randn(8, 2), torch.rand(8)
    for name, options in [("pd", {}), ("rf-reflow", {"num_pairs": 16, "pair_nfe": 4}),
                          ("cd", {"parameterization": "velocity"})]:
        cls = registries.methods.get(name)
        context = MethodContext(data.spec, registries.integrators.get("euler"), "euler", 10, registries.integrators,
                                teacher)
        method = cls(cls.config_class(**options), context)
        student = method.build_student(backbone_cls.build(backbone_cls.config_class(hidden=16, layers=1,
                                                                                    time_embedding_dim=8), data.spec))
        method.prepare(student, PrepareContext("cpu", data, "/nonexistent" if name != "rf-reflow" else
                                               str(Path(str(fm_teacher)).parent / "pairs-test"), lambda *a: None))
        network = student.backbone if name == "cd" else student
        torch.testing.assert_close(network(x, t), teacher.velocity(x, t))
        assert method.tags()[f"distillkit.{name}.init"] == "teacher"


# ------------------------------------------------------------------------------------------------
# toy2d: the distilled samplers approach the exact teacher's ODE solution as training proceeds


def sampler_error_during_training(name, options, nfe, checkpoints):
    registries = distillkit.get_registries()
    teacher = Toy2dExactTeacher()
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(123))
    exact = distillkit.integrate(teacher, noise.double(), distillkit.uniform_grid(64), "rk4").float()
    cls = registries.methods.get(name)
    data = Toy2d(Toy2dConfig(train_size=4096))
    context = MethodContext(data.spec, registries.integrators.get("euler"), "euler", checkpoints[-1],
                            registries.integrators, teacher)
    method = cls(cls.config_class(**options), context)
    torch.manual_seed(0)
    backbone_cls = registries.backbones.get("mlp")
    student = method.build_student(backbone_cls.build(backbone_cls.config_class(hidden=64, layers=2,
                                                                                time_embedding_dim=16), data.spec))
    method.prepare(student, PrepareContext("cpu", data, "/tmp", lambda *a: None, progress=False))
    loader = torch.utils.data.DataLoader(method.train_set(data), batch_size=128, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)

    def error():
        student.eval()
        with torch.no_grad():
            x = distillkit.integrate(method.velocity_fn(student), noise, distillkit.uniform_grid(nfe), "euler")
        student.train()
        return float((x - exact).square().sum(1).mean().sqrt())

    errors, step, batches = [error()], 0, iter(loader)
    for until in checkpoints:
        while step < until:
            try:
                item = next(batches)
            except StopIteration:
                batches = iter(loader)
                item = next(batches)
            loss = method.loss(student, Batch.from_item(item), generator, step).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_step(student, step)
            step += 1
        errors.append(error())
    return errors


@pytest.mark.parametrize("name,options,nfe,monotone", [
    # The EDM-parameterised consistency model drops fast, then hovers (0.66, 0.72 at lr 3e-3 here).
    ("cd", {}, 1, False),
    ("cd", {"parameterization": "velocity"}, 1, True),
    ("rf-distill", {"k": 1, "num_pairs": 2048}, 1, True),
    ("rf-reflow", {"num_pairs": 2048}, 1, True),
    ("pd", {"teacher_steps": 4}, 2, True),
])
def test_distilled_sampler_error_against_the_exact_teacher_falls(name, options, nfe, monotone):
    errors = sampler_error_during_training(name, options, nfe, [40, 120])
    assert max(errors[1:]) < errors[0] and errors[2] < 0.6 * errors[0], errors
    if monotone:
        assert errors[0] > errors[1] > errors[2], errors
