"""CUD stage 2 (METHODS.md §3): trajectories generated once, the three-phase curriculum, the
self-EMA regulariser, initialisation from a stage-1 run, one-step sampling; and the end-to-end
path a user takes (stage 1, then stage 2 with the stage-1 checkpoint as its teacher)."""

import re
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext, PrepareContext, Teacher, TeacherContext
from distillkit.cli.main import main
from distillkit.teachers import load_teacher
from distillkit_cud.sampling import one_step_sample
from distillkit_cud.stage2 import dequantize, generate_trajectories, quantize

from crashing import Crash, crash_at

SMALL = ["--no-track", "--quiet", "--set", "sample.num_samples=32", "--set", "sample.reference_steps=2", "--nfe", "1"]


def field(x, t):
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return torch.sin(x) * (1 + t) + t**2 - 0.3 * x


class FieldTeacher(Teacher):
    """An analytic teacher that counts its calls."""

    name = "field-test"
    identity = "analytic:field-test"

    def __init__(self):
        self.calls = 0

    def velocity(self, x, t, cond=None):
        self.calls += 1
        return field(x, t)


def stage2(registries, teacher, shape=(2,), total_steps=9, **options):
    cls = registries.methods.get("cud-stage2")
    ctx = MethodContext(data=DataSpec(shape), integrator=registries.integrators.get("euler"), integrator_name="euler",
                        total_steps=total_steps, integrators=registries.integrators, teacher=teacher)
    defaults = {"num_trajectories": 40, "generation_batch": 16, "init_from_teacher": False}
    return cls(cls.config_class(**{**defaults, **options}), ctx)


def tiny_mlp(registries, hidden=8):
    mlp = registries.backbones.get("mlp")
    torch.manual_seed(0)
    return mlp.build(mlp.config_class(hidden=hidden, layers=1), DataSpec((2,)))


class Artifacts:
    def __init__(self):
        self.logged = []

    def __call__(self, path, folder=None):
        self.logged.append((Path(path), folder))


def prepare_context(directory, artifacts=None, seed=0):
    return PrepareContext(device="cpu", dataset=None, output_dir=directory, log_artifact=artifacts or Artifacts(),
                          seed=seed, progress=False)


def first_batch(method, size=40):
    data = method.train_set(None)
    loader = torch.utils.data.DataLoader(data, batch_size=size, shuffle=False)
    return Batch.from_item(next(iter(loader)))


# ------------------------------------------------------------------------------------------------
# trajectories


def test_trajectories_are_the_euler_data_predictions_at_the_kept_indices():
    teacher = FieldTeacher()
    out = generate_trajectories(teacher.velocity, (2,), 10, 16, (8, 11, 14), seed=3, batch=4)
    noise = torch.randn((10, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["noise"], noise)
    x, kept = noise.clone(), {}
    for i in range(16):  # index i at t = (16 - i)/16
        t = torch.full((10,), (16 - i) / 16)
        v = field(x, t)
        kept[i] = x - (16 - i) / 16 * v
        x = x - v / 16
    for slot, index in enumerate((8, 11, 14)):
        torch.testing.assert_close(out["targets"][:, slot], kept[index])
    # the loop stops after the last kept index: 15 evaluations per trajectory, batches of 4
    assert out["teacher_evals"] == 10 * 15
    assert teacher.calls == 3 * 15


def test_quantized_targets_are_8_bit_like_the_papers_pngs():
    x = torch.linspace(-1.2, 1.2, 101)
    q = quantize(x)
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 255
    assert torch.all((dequantize(q) - x.clamp(-1, 1)).abs() <= 1 / 255 + 1e-6)
    out = generate_trajectories(lambda x, t, c: 0.1 * x, (1, 4, 4), 6, 4, (1, 3), seed=0, batch=6, quantized=True)
    assert out["targets"].dtype == torch.uint8


def test_quantize_needs_image_data(registries):
    with pytest.raises(distillkit.ConfigError, match="quantize"):
        stage2(registries, FieldTeacher(), quantize=True)


def test_generated_once_and_reused_by_every_phase_by_resume_and_by_later_runs(registries, tmp_path):
    teacher = FieldTeacher()
    method = stage2(registries, teacher)
    student = tiny_mlp(registries)
    artifacts = Artifacts()
    method.prepare(student, prepare_context(tmp_path / "run1", artifacts))
    generation_calls = teacher.calls
    assert generation_calls == 3 * 15  # ceil(40 / 16) batches x 15 Euler steps
    assert artifacts.logged == [(tmp_path / "run1" / "trajectories.pt", "trajectories")]
    for step in range(9):  # all three phases
        method.loss(student, first_batch(method), torch.Generator(), step)
        method.after_step(student, step)
    assert teacher.calls == generation_calls  # nothing regenerated per phase

    resumed = stage2(registries, teacher)
    resumed.prepare(tiny_mlp(registries), prepare_context(tmp_path / "run1"))
    assert teacher.calls == generation_calls
    torch.testing.assert_close(resumed.trajectories["targets"], method.trajectories["targets"])

    later = stage2(registries, teacher, trajectory_file=str(tmp_path / "run1" / "trajectories.pt"), phase_indices=(14, 8))
    later.prepare(tiny_mlp(registries), prepare_context(tmp_path / "run2"))
    assert teacher.calls == generation_calls
    assert not (tmp_path / "run2" / "trajectories.pt").exists()
    torch.testing.assert_close(later.trajectories["targets"][:, 0], method.trajectories["targets"][:, 2])

    misfit = stage2(registries, teacher, trajectory_file=str(tmp_path / "run1" / "trajectories.pt"),
                    trajectory_steps=8, phase_indices=(2, 5, 7))
    with pytest.raises(distillkit.ConfigError, match="has steps = 16"):
        misfit.prepare(tiny_mlp(registries), prepare_context(tmp_path / "run3"))
    other_teacher = FieldTeacher()
    other_teacher.identity = "analytic:another-field"
    with pytest.raises(distillkit.ConfigError, match="teacher"):
        stage2(registries, other_teacher, trajectory_file=str(tmp_path / "run1" / "trajectories.pt")).prepare(
            tiny_mlp(registries), prepare_context(tmp_path / "run4"))


# ------------------------------------------------------------------------------------------------
# curriculum and loss


def test_phases_switch_at_the_configured_steps(registries):
    even = stage2(registries, FieldTeacher(), total_steps=9)
    assert [even.phase(s) for s in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    explicit = stage2(registries, FieldTeacher(), total_steps=9, steps_per_phase=2)
    assert [explicit.phase(s) for s in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    uneven = stage2(registries, FieldTeacher(), total_steps=10, phase_indices=(3, 5))
    assert [uneven.phase(s) for s in range(10)] == [0] * 5 + [1] * 5
    with pytest.raises(distillkit.ConfigError, match="phase_indices"):
        stage2(registries, FieldTeacher(), phase_indices=(8, 16))


def test_loss_targets_the_phase_index_and_pulls_towards_the_self_ema(registries, tmp_path):
    method = stage2(registries, FieldTeacher(), total_steps=9, regulariser_weight=0.1, regulariser_decay=0.5)
    student = tiny_mlp(registries)
    method.prepare(student, prepare_context(tmp_path))
    assert method.network_evals_per_step() == {"with_grad": 1, "no_grad": 1}

    batch = first_batch(method)
    assert batch.x.shape == batch.noise.shape == (40, 2)  # items are shaped like the data
    out = method.loss(student, batch, torch.Generator(), 0)  # θ̄ = θ at the start: no pull yet
    assert out.metrics["loss_regulariser"] == 0.0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    for step in range(9):
        batch = first_batch(method)  # fetched for this step, as the trainer's loader does
        phase = step // 3
        target = method.trajectories["targets"][:, phase]
        torch.testing.assert_close(batch.x, target)
        torch.testing.assert_close(batch.noise, method.trajectories["noise"])
        out = method.loss(student, batch, torch.Generator(), step)
        eps, ones = batch.noise, torch.ones(len(batch.noise))
        with torch.no_grad():
            v = student(eps, ones)
            v_bar = method.regulariser(eps, ones)
        expected = ((eps - v - target) ** 2).mean() + 0.1 * ((v - v_bar) ** 2).mean()
        assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
        assert out.metrics["trajectory_index"] == (8, 11, 14)[phase]
        # θ̄ ← 0.5 θ̄ + 0.5 θ after each step
        before = [p.clone() for p in method.regulariser.parameters()]
        method.after_step(student, step)
        for b, p, q in zip(before, method.regulariser.parameters(), student.parameters()):
            torch.testing.assert_close(p, 0.5 * b + 0.5 * q.detach())
    off = stage2(registries, FieldTeacher(), regulariser_weight=0.0)
    assert off.network_evals_per_step() == {"with_grad": 1, "no_grad": 0}


def test_the_regulariser_pass_runs_the_ema_copy_in_eval_mode(registries, tmp_path):
    # The paper's code calls .eval() on its EMA copy: no dropout in θ̄'s pass, a deterministic
    # target, while the student itself keeps training with dropout.
    method = stage2(registries, FieldTeacher(), regulariser_weight=0.1)
    mlp = registries.backbones.get("mlp")
    torch.manual_seed(0)
    student = mlp.build(mlp.config_class(hidden=16, layers=2, dropout=0.5), DataSpec((2,)))
    student.train()
    method.prepare(student, prepare_context(tmp_path))
    passes = []
    method.regulariser.register_forward_hook(lambda module, args, output: passes.append(output.detach().clone()))
    batch = first_batch(method)
    for seed in (1, 2):  # different global RNG states: any dropout would draw different masks
        torch.manual_seed(seed)
        method.loss(student, batch, torch.Generator(), 0)
    assert len(passes) == 2 and torch.equal(passes[0], passes[1])
    assert student.training and not method.regulariser.training
    eps, ones = batch.noise, torch.ones(len(batch.noise))
    assert not torch.equal(student(eps, ones), student(eps, ones))  # the student's dropout is still on

    # The loss with the student's dropout mask replayed and θ̄'s pass drawing none.
    torch.manual_seed(3)
    out = method.loss(student, batch, torch.Generator(), 0)
    torch.manual_seed(3)
    with torch.no_grad():
        v = student(eps, ones)
        v_bar = method.regulariser(eps, ones)
    expected = ((eps - v - batch.x) ** 2).mean() + 0.1 * ((v - v_bar) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(v_bar, passes[0])


def test_the_regulariser_copy_made_by_the_loss_is_in_eval_mode_too(registries):
    method = stage2(registries, FieldTeacher(), regulariser_weight=0.1)
    mlp = registries.backbones.get("mlp")
    student = mlp.build(mlp.config_class(hidden=16, layers=1, dropout=0.5), DataSpec((2,))).train()
    batch = Batch(torch.randn(8, 2), noise=torch.randn(8, 2))
    method.loss(student, batch, torch.Generator(), 0)  # prepare not called: the loss makes the copy
    assert not method.regulariser.training and student.training


def test_a_batch_fetched_for_another_phase_is_refused_and_resume_restores_the_phase(registries, tmp_path):
    method = stage2(registries, FieldTeacher(), total_steps=9)
    student = tiny_mlp(registries)
    method.prepare(student, prepare_context(tmp_path))
    batch = first_batch(method)  # phase 0
    with pytest.raises(distillkit.UsageError, match="phase"):
        method.loss(student, batch, torch.Generator(), 3)
    for step in range(4):
        method.after_step(student, step)
    state = method.state_dict()
    assert state["next_step"] == 4
    resumed = stage2(registries, FieldTeacher(), total_steps=9)
    resumed.prepare(tiny_mlp(registries), prepare_context(tmp_path))
    resumed.train_set(None)
    resumed.load_state_dict(state)
    torch.testing.assert_close(first_batch(resumed).x, method.trajectories["targets"][:, 1])


def test_quantized_targets_are_served_as_floats(registries, tmp_path):
    method = stage2(registries, FieldTeacher(), shape=(1, 4, 4), quantize=True, num_trajectories=8)
    method.prepare(torch.nn.Identity(), prepare_context(tmp_path))
    assert method.trajectories["targets"].dtype == torch.uint8
    batch = first_batch(method, size=8)
    assert batch.x.dtype == torch.float32 and batch.x.shape == (8, 1, 4, 4)
    torch.testing.assert_close(batch.x, dequantize(method.trajectories["targets"][:, 0]))


# ------------------------------------------------------------------------------------------------
# with a real stage-1 run as the teacher (CLI)


def run(capsys, runs_dir, *argv):
    assert main(["run", "--dataset", "toy2d", "--batch-size", "16", "--runs-dir", str(runs_dir), *SMALL, *argv]) == 0
    return Path(re.search(r"checkpoint: (\S+)", capsys.readouterr().out).group(1))


def checkpoint_teacher(registries, path):
    cls = registries.datasets.get("toy2d")
    data = cls(cls.config_class())
    return load_teacher(str(path), registries, TeacherContext(data=data.spec, dataset_name="toy2d", dataset_config=data.config))


def test_student_starts_from_the_teachers_ema_main_network(registries, cud_rk2_toy2d_checkpoint, tmp_path):
    teacher = checkpoint_teacher(registries, cud_rk2_toy2d_checkpoint)
    method = stage2(registries, teacher, init_from_teacher=True)
    mlp = registries.backbones.get("mlp")
    student = mlp.build(mlp.config_class(), DataSpec((2,)))
    method.prepare(student, prepare_context(tmp_path))
    ema = torch.load(cud_rk2_toy2d_checkpoint, weights_only=True)["ema"]
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, ema[f"backbone.{key}"])
    # the trajectories come from the teacher's sampling velocity (CUD-RK2: its extra head)
    sampling = teacher.trained.velocity_fn()
    expected = generate_trajectories(lambda x, t, c: sampling(x, t), (2,), 40, 16, (8, 11, 14), seed=0, batch=16)
    torch.testing.assert_close(method.trajectories["targets"], expected["targets"])


def test_student_network_must_be_the_teachers(registries, cud_rk2_toy2d_checkpoint, tmp_path):
    teacher = checkpoint_teacher(registries, cud_rk2_toy2d_checkpoint)
    with pytest.raises(distillkit.ConfigError, match="--backbone mlp with backbone_options"):
        stage2(registries, teacher, init_from_teacher=True).prepare(tiny_mlp(registries, hidden=16), prepare_context(tmp_path))


def test_teacher_trained_with_another_phi_is_refused(registries, cud_rk2_toy2d_checkpoint, tmp_path):
    payload = torch.load(cud_rk2_toy2d_checkpoint, weights_only=True)
    payload["method"]["prior_shakedrop"] = {"enabled": True, "phi": 0.25}
    changed = tmp_path / "phi.pt"
    torch.save(payload, changed)
    teacher = checkpoint_teacher(registries, changed)
    mlp = registries.backbones.get("mlp")
    with pytest.raises(distillkit.UsageError, match=r"phi=0.25.*P2"):
        stage2(registries, teacher, init_from_teacher=True).prepare(
            mlp.build(mlp.config_class(), DataSpec((2,))), prepare_context(tmp_path / "run"))


TINY_SONGUNET = {"channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(scope="module")
def phi_teacher_checkpoint(tmp_path_factory):
    """A 2-step CUD run on digits with a tiny SongUNet and Prior ShakeDrop φ = 0.75."""
    runs = tmp_path_factory.mktemp("cud-phi-digits")
    options = [f"--set=backbone_options.{k}={v}" for k, v in {**TINY_SONGUNET, "shakedrop": "true", "phi": 0.75}.items()]
    assert main(["run", "--method", "cud", "--dataset", "digits", "--backbone", "songunet", "--max-steps", "2",
                 "--batch-size", "8", "--runs-dir", str(runs), *SMALL, *options]) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


def songunet_student(registries, **options):
    cls = registries.backbones.get("songunet")
    config = cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in {**TINY_SONGUNET, **options}.items()})
    return cls.build(config, DataSpec((1, 8, 8)))


def digits_teacher(registries, path):
    cls = registries.datasets.get("digits")
    data = cls(cls.config_class())
    return load_teacher(str(path), registries, TeacherContext(data=data.spec, dataset_name="digits", dataset_config=data.config))


def digits_stage2(registries, teacher, **options):
    cls = registries.methods.get("cud-stage2")
    ctx = MethodContext(data=DataSpec((1, 8, 8)), integrator=registries.integrators.get("euler"), integrator_name="euler",
                        total_steps=3, integrators=registries.integrators, teacher=teacher)
    defaults = {"num_trajectories": 8, "generation_batch": 8, "init_from_teacher": True}
    return cls(cls.config_class(**{**defaults, **options}), ctx)


def test_student_shakedrop_must_be_teacher_or_off(registries):
    with pytest.raises(distillkit.ConfigError, match="student_shakedrop.*one of teacher, off"):
        stage2(registries, FieldTeacher(), student_shakedrop="on")
    assert stage2(registries, FieldTeacher()).config.student_shakedrop == "teacher"


def test_student_shakedrop_off_switches_it_off_on_the_student_only(registries, phi_teacher_checkpoint, tmp_path):
    # The paper's stage-2 code builds its student without Prior ShakeDrop although the stage-1
    # teacher trained with φ = 0.75: "off" does the same, from the teacher's backbone options.
    teacher = digits_teacher(registries, phi_teacher_checkpoint)
    assert teacher.trained.model.backbone.config.shakedrop and teacher.trained.model.backbone.config.phi == 0.75
    method = digits_stage2(registries, teacher, student_shakedrop="off")
    student = method.build_student(songunet_student(registries, shakedrop=True, phi=0.75))
    assert not student.config.shakedrop
    method.prepare(student, prepare_context(tmp_path / "off"))  # loading from the φ teacher: no refusal
    assert teacher.trained.model.backbone.config.shakedrop  # the teacher keeps its φ
    ema = torch.load(phi_teacher_checkpoint, weights_only=True)["ema"]
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, ema[f"backbone.{key}"])
    # The same network as one built with shakedrop = false and these weights; not the teacher's.
    plain = songunet_student(registries, shakedrop=False)
    plain.load_state_dict(student.state_dict())
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.1, 0.4, 0.7, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(student(x, t), plain(x, t))
        assert not torch.allclose(student(x, t), teacher.trained.model.backbone(x, t))
    assert method.tags()["distillkit.cud_stage2.student_shakedrop"] == "off"


def test_student_shakedrop_teacher_keeps_phi_and_refuses_a_mismatch(registries, phi_teacher_checkpoint, tmp_path):
    teacher = digits_teacher(registries, phi_teacher_checkpoint)
    method = digits_stage2(registries, teacher)
    student = method.build_student(songunet_student(registries, shakedrop=True, phi=0.75))
    assert student.config.shakedrop and student.config.phi == 0.75
    method.prepare(student, prepare_context(tmp_path / "teacher"))
    with pytest.raises(distillkit.UsageError, match=r"phi=0.75.*shakedrop off.*P2"):
        digits_stage2(registries, teacher).prepare(
            songunet_student(registries, shakedrop=False), prepare_context(tmp_path / "mismatch"))


def test_student_shakedrop_off_from_the_command_line_is_rebuilt_off(capsys, phi_teacher_checkpoint, tmp_path):
    options = [f"--set=backbone_options.{k}={v}" for k, v in {**TINY_SONGUNET, "shakedrop": "true", "phi": 0.75}.items()]
    argv = ["run", "--method", "cud-stage2", "--teacher", str(phi_teacher_checkpoint), "--dataset", "digits",
            "--backbone", "songunet", "--max-steps", "2", "--batch-size", "8", "--runs-dir", str(tmp_path), *SMALL,
            *options, "--set", "method_options.num_trajectories=16", "--set", "method_options.student_shakedrop=off"]
    assert main(argv) == 0
    checkpoint = Path(re.search(r"checkpoint: (\S+)", capsys.readouterr().out).group(1))
    trained = distillkit.load_trained_model(checkpoint)  # what sampling and evaluation rebuild
    assert not trained.model.config.shakedrop


def test_stage1_then_stage2_from_the_command_line(capsys, cud_rk2_toy2d_checkpoint, tmp_path):
    checkpoint = run(capsys, tmp_path, "--method", "cud-stage2", "--teacher", str(cud_rk2_toy2d_checkpoint), "--max-steps", "4",
                     "--set", "method_options.num_trajectories=48", "--set", "method_options.phase_indices=[2,5,14]")
    assert (checkpoint.parent / "trajectories.pt").is_file()
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["method"]["next_step"] == 4
    trained = distillkit.load_trained_model(checkpoint)
    assert trained.resolved.config.method == "cud-stage2"
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    one_step = one_step_sample(trained.velocity_fn(), noise)
    core = distillkit.integrate(trained.velocity_fn(), noise, distillkit.uniform_grid(1), "euler")
    torch.testing.assert_close(one_step, core)


def test_a_seeded_run_is_reproducible(capsys, cud_rk2_toy2d_checkpoint, tmp_path):
    again = run(capsys, tmp_path, "--method", "cud", "--integrator", "rk2", "--max-steps", "3")
    first, second = torch.load(cud_rk2_toy2d_checkpoint, weights_only=True), torch.load(again, weights_only=True)
    for key in ("student", "ema"):
        for name, value in first[key].items():
            assert torch.equal(value, second[key][name]), (key, name)


# ------------------------------------------------------------------------------------------------
# exact resume (the training engine restores method state with load_state_dict after prepare)


def resumed_equals_whole(tree, tmp_path, crash, teacher=None):
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.tracking import NullTracker
    from distillkit.training.checkpoint import load_checkpoint
    from distillkit.training.trainer import train

    def resolved():
        return resolve(run_config_from_dict(tree), distillkit.get_registries())

    whole = train(resolved(), NullTracker(), tmp_path / "whole", teacher=teacher, progress=False, log=lambda line: None)
    with pytest.raises(Crash):
        train(resolved(), NullTracker(), tmp_path / "parts", teacher=teacher, progress=False, on_step=crash_at(crash),
              log=lambda line: None)
    calls_before_resume = getattr(teacher, "calls", 0)
    payload = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    resumed = train(resolved(), NullTracker(), tmp_path / "parts", teacher=teacher, resume=payload, progress=False,
                    log=lambda line: None)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert a["method"].keys() == b["method"].keys()
    for key, value in a["method"].items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            for name in value:
                assert torch.equal(value[name], b["method"][key][name]), (key, name)
        else:
            assert value == b["method"][key], key
    return a, calls_before_resume


RUN = {"dataset": "toy2d", "seed": 1, "dataset_options": {"train_size": 256},
       "backbone_options": {"hidden": 16, "layers": 1, "dropout": 0.1},
       "train": {"batch_size": 32, "checkpoint_every": 3, "max_steps": 9},
       "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1}}


def test_cud_with_an_ema_target_resumes_exactly(tmp_path):
    tree = {**RUN, "method": "cud", "integrator": "rk2",
            "method_options": {"target": "ema", "target_decay": 0.9, "coupling": "encoder", "encoder_channels": 8}}
    checkpoint, _ = resumed_equals_whole(tree, tmp_path, crash=5)
    assert "target" in checkpoint["method"]


def test_stage2_resumes_exactly_across_a_phase_switch_without_regenerating(registries, tmp_path):
    class CountingExact(FieldTeacher):
        identity = "analytic:field-test-resume"

    teacher = CountingExact()
    tree = {**RUN, "method": "cud-stage2", "teacher": "toy2d-exact",
            "method_options": {"num_trajectories": 64, "generation_batch": 64, "init_from_teacher": False}}
    checkpoint, calls = resumed_equals_whole(tree, tmp_path, crash=5, teacher=teacher)
    assert checkpoint["method"]["next_step"] == 9
    assert calls == 2 * 15 and teacher.calls == calls  # whole run + crashed run; the resumed run reused its file
