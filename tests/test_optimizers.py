"""Optimizers and learning-rate schedules from config (distillkit.config.OptimizerConfig)."""

import math

import pytest
import torch

from distillkit.cli.main import main
from distillkit.config import OptimizerConfig, TrainConfig, run_config_from_dict
from distillkit.errors import ConfigError
from distillkit.training.checkpoint import load_checkpoint
from distillkit.training.optim import build_optimizer, build_scheduler


def parameters():
    torch.manual_seed(0)
    return list(torch.nn.Linear(3, 2).parameters())


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("radam", torch.optim.RAdam)])
def test_each_optimizer_name_builds_its_torch_class_with_the_options(name, cls):
    config = OptimizerConfig(optimizer=name, lr=3e-4, betas=(0.5, 0.95), eps=1e-6, weight_decay=0.02)
    optimizer = build_optimizer(parameters(), config)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.5, 0.95), 1e-6, 0.02)


def test_the_default_is_todays_adam_bitwise():
    a, b = parameters(), parameters()
    mine = build_optimizer(a, TrainConfig().optimizer_config())
    plain = torch.optim.Adam(b, lr=2e-3)
    for _ in range(3):
        for params, optimizer in ((a, mine), (b, plain)):
            optimizer.zero_grad()
            sum((p * torch.arange(p.numel()).view_as(p)).sum() for p in params).backward()
            optimizer.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def lr_curve(schedule: str, warmup: int, total: int, steps: int) -> list[float]:
    config = OptimizerConfig(lr=0.1, lr_schedule=schedule, warmup_steps=warmup)
    optimizer = build_optimizer(parameters(), config)
    scheduler = build_scheduler(optimizer, config, total)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        optimizer.step()
        scheduler.step()
    return curve


def test_schedules_follow_their_closed_forms():
    # step k (0-based) uses lr * factor(k); W = 4 warm-up steps, T = 20 steps in all.
    w, t = 4, 20
    warm = [0.1 * (k + 1) / w for k in range(w)]
    assert lr_curve("constant", w, t, 8) == pytest.approx([0.1] * 8)
    assert lr_curve("warmup", w, t, 8) == pytest.approx(warm + [0.1] * 4)
    assert lr_curve("warmup", 0, t, 3) == pytest.approx([0.1] * 3)
    cosine = lr_curve("cosine", w, t, t + 2)
    assert cosine[:w] == pytest.approx(warm)
    for k in range(w, t):
        assert cosine[k] == pytest.approx(0.1 * (1 + math.cos(math.pi * (k - w) / (t - w))) / 2)
    assert cosine[t] == pytest.approx(0.0, abs=1e-12) and cosine[t + 1] == pytest.approx(0.0, abs=1e-12)
    inverse = lr_curve("inverse-sqrt", w, t, 12)
    assert inverse[:w] == pytest.approx(warm)
    assert inverse[w:] == pytest.approx([0.1 * math.sqrt(w / (k + 1)) for k in range(w, 12)])
    assert lr_curve("inverse-sqrt", 0, t, 3) == pytest.approx([0.1, 0.1 / math.sqrt(2), 0.1 / math.sqrt(3)])


@pytest.mark.parametrize("key, value, allowed", [
    ("optimizer", "sgd", "one of adam, adamw, radam"),
    ("lr_schedule", "linear", "one of warmup, constant, cosine, inverse-sqrt"),
    ("betas", [0.9], "two numbers in [0, 1)"),
    ("betas", [0.9, 1.0], "two numbers in [0, 1)"),
    ("eps", 0, "a positive number"),
    ("weight_decay", -0.1, "a number >= 0"),
    ("networks", {"critic": {"lr": -1}}, "a positive number"),
    ("networks", {"critic": {"momentum": 0.9}}, "unknown option"),
])
def test_bad_values_are_one_line_config_errors(key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        run_config_from_dict({"train": {key: value}})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"train.{key}") and allowed in message


def test_set_train_optimizer_adamw_works_through_the_cli(tmp_path, capsys):
    code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "3", "--batch-size", "16",
                 "--no-track", "--quiet", "--runs-dir", str(tmp_path), "--nfe", "1",
                 "--set", "sample.num_samples=16", "--set", "sample.reference_steps=1",
                 "--set", "dataset_options.train_size=64", "--set", "train.optimizer=adamw",
                 "--set", "train.weight_decay=0.05", "--set", "train.lr_schedule=cosine", "--set", "train.betas=[0.8, 0.9]"])
    assert code == 0, capsys.readouterr().err
    payload = load_checkpoint(next(tmp_path.glob("runs/*/checkpoint.pt")))
    group = payload["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.9)
    assert payload["config"]["train"]["optimizer"] == "adamw"
    # warm-up of 100 steps: after 3 steps the cosine schedule is still warming up
    assert payload["scheduler"]["_last_lr"] == [pytest.approx(2e-3 * 4 / 100)]
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--set", "train.optimizer=lion", "--dry-run"]) == 2
    assert "train.optimizer='lion' is not allowed: one of adam, adamw, radam" in capsys.readouterr().err
