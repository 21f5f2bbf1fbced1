"""``train.checkpoint_format = "safetensors"``: the payload round-trips with its types, resume
stays bitwise, and a safetensors checkpoint is accepted wherever a checkpoint path is."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

import distillkit
from distillkit.cli.main import main
from distillkit.config import run_config_from_dict
from distillkit.resolve import resolve
from distillkit.tracking import NullTracker
from distillkit.training.checkpoint import load_checkpoint, save_checkpoint
from distillkit.training.trainer import train

from crashing import Crash, crash_at as _crash_at

# as tests/test_engine.py: two epoch boundaries, dropout (the global RNG matters), two EMAs
TREE = {
    "method": "fm", "dataset": "toy2d", "seed": 3,
    "dataset_options": {"train_size": 448},
    "backbone_options": {"dropout": 0.1, "hidden": 32},
    "train": {"max_steps": 16, "batch_size": 64, "checkpoint_every": 8, "warmup_steps": 4, "ema_decay": [0.9, 0.99]},
    "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1},
}


def _resolved(checkpoint_format: str):
    tree = {**TREE, "train": {**TREE["train"], "checkpoint_format": checkpoint_format}}
    return resolve(run_config_from_dict(tree), distillkit.get_registries())


def _same(a, b, where="payload"):
    """Equal values of equal types all the way down (tensors: dtype, shape and bytes)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        _same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{where}._metadata")
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def test_the_payload_round_trips_with_its_types(tmp_path):
    payload = {
        "format": "distillkit-checkpoint", "version": 2, "step": 7, "run_id": None, "lr": 1e-3 / 3,
        "flags": [True, False], "nan": float("nan"), "inf": float("-inf"),
        "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 2)}},
                      "param_groups": [{"params": [0], "betas": (0.9, 0.999)}]},
        "rng": [{"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)}],
        "weights": {"a": torch.randn(4, dtype=torch.bfloat16), "b": torch.arange(6).view(2, 3).t(),
                    "c": torch.tensor([True, False]), "d": torch.randn(2, dtype=torch.float64)},
        "__odd": "a key with the tag prefix",
    }
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    payload["module"] = module.state_dict()  # an OrderedDict with the modules' versions in _metadata
    assert payload["module"]._metadata
    shared = torch.randn(5)
    payload["tied"] = {"x": shared, "y": shared}  # two names, one storage
    path = save_checkpoint(payload, tmp_path / "checkpoint.pt", "safetensors")
    assert path.read_bytes()[:2] != b"PK"  # not a torch zip archive
    loaded = load_checkpoint(path)
    _same(payload, loaded)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_resume_from_safetensors_checkpoints_is_bitwise_and_the_format_changes_no_number(tmp_path):
    whole = train(_resolved("torch"), NullTracker(), tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        train(_resolved("safetensors"), NullTracker(), tmp_path / "parts", progress=False, on_step=_crash_at(9))
    path = tmp_path / "parts" / "checkpoint.pt"
    assert path.read_bytes()[8:9] == b"{"  # an 8-byte header length, then the JSON header
    payload = load_checkpoint(path)
    assert payload["step"] == 8
    resumed = train(_resolved("safetensors"), NullTracker(), tmp_path / "parts", resume=payload, progress=False)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("student", "ema"):
        _same(a[key], b[key], key)
    _same(a["emas"], b["emas"], "emas")
    _same(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["data"][0]["epoch"] == b["data"][0]["epoch"] == 2


def test_a_safetensors_checkpoint_is_accepted_where_a_checkpoint_is(tmp_path):
    runs = tmp_path / "runs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "4", "--batch-size", "32",
                     "--runs-dir", str(runs), "--no-track", "--quiet", "--nfe", "1",
                     "--set", "train.checkpoint_format=safetensors", "--set", "sample.num_samples=32",
                     "--set", "sample.reference_steps=2"]) == 0
        checkpoint = next(runs.glob("runs/*/checkpoint.pt"))
        assert checkpoint.read_bytes()[8:9] == b"{"
        # sample, export and a teacher read it
        assert main(["sample", "--run", str(checkpoint), "--nfe", "1", "--n", "4", "--seed", "0",
                     "--out", str(tmp_path / "s.npz")]) == 0
        assert main(["export", "--run", str(checkpoint), "--nfe", "1", "--format", "safetensors",
                     "--out", str(tmp_path / "g.safetensors")]) == 0
        assert main(["run", "--method", "cd", "--teacher", str(checkpoint), "--dataset", "toy2d", "--max-steps", "2",
                     "--batch-size", "16", "--runs-dir", str(tmp_path / "cd"), "--no-track", "--quiet", "--nfe", "1",
                     "--set", "sample.num_samples=16", "--set", "sample.reference_steps=2"]) == 0
    samples = np.load(tmp_path / "s.npz")["nfe1"]
    np.testing.assert_allclose(distillkit.load_generator(tmp_path / "g.safetensors").sample(4, 0).numpy(), samples,
                               rtol=0, atol=1e-6)
    teacher = distillkit.load_trained_model(checkpoint)
    assert teacher.step == 4


def test_an_unknown_checkpoint_format_is_one_line(capsys, tmp_path):
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--runs-dir", str(tmp_path),
                 "--set", "train.checkpoint_format=pickle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.checkpoint_format='pickle'" in err and "safetensors" in err, err


def test_a_state_value_safetensors_cannot_hold_is_a_one_line_run_failure(tmp_path):
    from distillkit.errors import TrainingFailed
    from distillkit.training.checkpoint import save_checkpoint

    with pytest.raises(TrainingFailed, match="cannot hold a set .*checkpoint_format=torch"):
        save_checkpoint({"method": {"seen": {1, 2}}}, tmp_path / "c.pt", "safetensors")
    assert not (tmp_path / "c.pt").exists()
