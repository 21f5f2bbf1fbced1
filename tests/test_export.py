"""``distillkit export`` and ``distillkit.load_generator``: the TorchScript file runs in a Python
that cannot import distillkit and equals ``distillkit sample``; the safetensors file rebuilds the
same function; the MLflow model is served and answers; bad input is one line, exit 2, nothing
written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import distillkit
from distillkit.cli.main import main

TINY_EVAL = ["--set", "sample.num_samples=64", "--set", "sample.reference_steps=4"]
ROOT = Path(__file__).resolve().parent.parent


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tracked fm run on toy2d (ode sampler): (runs dir, run id)."""
    runs = tmp_path_factory.mktemp("export-toy")
    code, out = _quiet_main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "32",
                             "--runs-dir", str(runs), "--quiet", "--nfe", "1", *TINY_EVAL])
    assert code == 0
    return runs, re.search(r"MLflow run: (\w+)", out).group(1)


def _write_checkpoint(folder: Path, tree: dict, shape: tuple, num_classes) -> Path:
    """A checkpoint of a network built from ``tree`` with perturbed initial weights (every head,
    zero-initialised ones too, then produces output): no training is needed to test export."""
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.trained import CONVENTION
    from distillkit.training.build import build_model
    from distillkit.training.checkpoint import FORMAT, VERSION, save_atomic

    resolved = resolve(run_config_from_dict({**tree, "runs_dir": str(folder)}), distillkit.get_registries())
    _, network = build_model(resolved, distillkit.DataSpec(shape, num_classes), torch.device("cpu"), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    state = network.state_dict()
    return save_atomic({"format": FORMAT, "version": VERSION, "convention": CONVENTION, "config": resolved.to_dict(),
                        "data_spec": {"shape": list(shape), "num_classes": num_classes}, "run_id": None, "step": 4,
                        "student": state, "ema": state, "emas": {}},
                       folder / "runs" / "written" / "checkpoint.pt")


@pytest.fixture(scope="module")
def consistency_checkpoint(tmp_path_factory):
    """ct on toy2d: the consistency sampler re-noises (fresh noise is an input)."""
    folder = tmp_path_factory.mktemp("export-ct")
    return _write_checkpoint(folder, {"method": "ct", "dataset": "toy2d", "backbone_options": {"hidden": 32}},
                             (2,), None)


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    """Class-conditional cud (rk2) on digits, sampled with the registered cud-heun sampler."""
    folder = tmp_path_factory.mktemp("export-digits")
    tree = {"method": "cud", "integrator": "rk2", "dataset": "digits", "dataset_options": {"class_conditional": True},
            "sample": {"sampler": "cud-heun", "nfe": [1, 3]}}
    return _write_checkpoint(folder, tree, (1, 8, 8), 10)


def _sample_npz(run: str, runs: Path, nfe: int, n: int, seed: int, out: Path) -> np.ndarray:
    code, _ = _quiet_main(["sample", "--run", run, "--runs-dir", str(runs), "--nfe", str(nfe), "--n", str(n),
                           "--seed", str(seed), "--batch-size", "2", "--out", str(out)])
    assert code == 0
    return np.load(out)[f"nfe{nfe}"]


def _export(run: str, runs: Path, nfe: int, fmt: str, out: Path, *extra: str) -> Path:
    code, printed = _quiet_main(["export", "--run", run, "--runs-dir", str(runs), "--nfe", str(nfe),
                                 "--format", fmt, "--out", str(out), *extra])
    assert code == 0
    assert Path(printed.strip()) == out.resolve()
    return out


def _prior_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    """The seeding rule docs/export.md states, written here: sample i is randn(shape) from a
    generator seeded seed + i."""
    generator = torch.Generator()
    return torch.stack([torch.randn(shape, generator=generator.manual_seed(seed + i)) for i in range(n)])


def _run_without_distillkit(module: Path, inputs: Path, output: Path, cwd: Path) -> str:
    """``torch.jit.load(module)`` on the inputs in a fresh ``python -I -S`` whose path holds only the
    folder torch is installed in (no .pth files, so no editable distillkit): distillkit cannot be
    imported there, and the script checks that."""
    torch_home = str(Path(torch.__file__).resolve().parent.parent)
    script = (
        "import importlib.util, sys\n"
        f"sys.path.append({torch_home!r})\n"
        "assert importlib.util.find_spec('distillkit') is None, 'distillkit is importable'\n"
        "import torch\n"
        f"noise, labels, fresh = torch.load({str(inputs)!r}, weights_only=True)\n"
        f"module = torch.jit.load({str(module)!r})\n"
        "out = module(noise, labels, fresh) if labels is not None else module(noise, fresh=fresh)\n"
        f"torch.save(out, {str(output)!r})\n"
        "print('distillkit' in sys.modules, module.fresh_draws)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _cases(request):
    """(reference, runs dir, NFE, expected fresh draws) of the three sampler kinds."""
    if request.param == "ode":
        runs, run_id = request.getfixturevalue("toy_run")
        return run_id, runs, 2, 0
    if request.param == "consistency":
        checkpoint = request.getfixturevalue("consistency_checkpoint")
        return str(checkpoint), checkpoint.parent.parent.parent, 3, 2
    checkpoint = request.getfixturevalue("conditional_checkpoint")
    return str(checkpoint), checkpoint.parent.parent.parent, 3, 0


@pytest.fixture(params=["ode", "consistency", "cud-heun"])
def case(request):
    return _cases(request)


def test_torchscript_runs_without_distillkit_and_equals_distillkit_sample(case, tmp_path):
    reference, runs, nfe, fresh_draws = case
    n, seed = 5, 11
    module = _export(reference, runs, nfe, "torchscript", tmp_path / "generator.pt")
    expected = _sample_npz(reference, runs, nfe, n, seed, tmp_path / "samples.npz")

    generator = distillkit.load_generator(_export(reference, runs, nfe, "safetensors", tmp_path / "g.safetensors"))
    noise, labels, fresh = generator.seeded_inputs(n, seed)
    assert torch.equal(noise, _prior_noise(n, generator.spec.shape, seed))
    assert fresh.shape == (fresh_draws, n, *generator.spec.shape)
    torch.save((noise, labels, fresh), tmp_path / "inputs.pt")
    printed = _run_without_distillkit(module, tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path)
    assert printed == f"False {fresh_draws}"
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got.shape == (n, *generator.spec.shape)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    # the rebuilt safetensors generator is the same function, called directly or seeded
    np.testing.assert_allclose(generator(noise, labels, fresh).numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(generator.sample(n, seed).numpy(), expected, rtol=0, atol=1e-5)


def test_the_fresh_noise_is_an_input_and_changes_the_sample(consistency_checkpoint, tmp_path):
    runs = consistency_checkpoint.parent.parent.parent
    module = torch.jit.load(str(_export(str(consistency_checkpoint), runs, 3, "torchscript", tmp_path / "ct.pt")))
    noise = _prior_noise(4, (2,), 0)
    fresh = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(1))
    same = module(noise, fresh=fresh)
    assert torch.equal(same, module(noise, fresh=fresh))
    assert not torch.allclose(same, module(noise, fresh=fresh + 1.0))
    # without it, torch.randn draws it: torch.manual_seed makes it repeatable
    torch.manual_seed(3)
    first = module(noise)
    torch.manual_seed(3)
    assert torch.equal(first, module(noise))


def test_torchscript_record_and_safetensors_metadata(toy_run, tmp_path):
    runs, run_id = toy_run
    files = {"distillkit.json": ""}
    torch.jit.load(str(_export(run_id, runs, 2, "torchscript", tmp_path / "g.pt")), _extra_files=files)
    record = json.loads(files["distillkit.json"])
    assert record["nfe"] == 2 and record["run_id"] == run_id and record["weights"] == "ema"
    assert record["sampler"]["describe"] == "ode/euler" and record["time_grid"] == [1.0, 0.5, 0.0]
    assert record["config"]["method"] == "fm"
    assert distillkit.export.read_record(_export(run_id, runs, 2, "safetensors", tmp_path / "g.safetensors")) == record


def test_a_sampler_the_trace_cannot_follow_is_refused(toy_run, monkeypatch):
    """A sampler whose arithmetic reads the batch size as a Python number is traced with that
    number as a constant; the check on a batch of another size must catch it."""
    from distillkit.export import generator_of
    from distillkit.trained import load_trained_model

    runs, run_id = toy_run
    generator = generator_of(load_trained_model(runs / "runs" / run_id / "checkpoint.pt"), 1)
    original = generator.sampler.sample

    def batch_dependent(model, noise, time_grid, fresh_noise):
        return original(model, noise, time_grid, fresh_noise) * float(noise.shape[0])

    monkeypatch.setattr(generator.sampler, "sample", batch_dependent)
    with pytest.raises(distillkit.DistillkitError, match="cannot be traced faithfully"):
        generator.to_torchscript()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def test_mlflow_model_is_logged_to_the_run_and_served(toy_run, tmp_path):
    from mlflow.tracking import MlflowClient

    runs, run_id = toy_run
    out = _export(run_id, runs, 2, "mlflow", tmp_path / "model")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process's tracking URI is put back as it was
    assert (out / "MLmodel").is_file() and (out / "artifacts" / "generator.safetensors").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # put back as it was after logging
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in logged if m.source_run_id == run_id] == ["generator-nfe2"]

    expected = distillkit.load_generator(out).sample(3, 7).numpy()
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(out),
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the model server did not start"
                time.sleep(1)
        answer = np.asarray(_post(port, {"inputs": {"seed": 7, "n": 3}})["predictions"], dtype=np.float32)
        assert answer.shape == (3, 2)
        np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6)
        two = np.asarray(_post(port, {"dataframe_records": [{"seed": 7, "n": 1}, {"seed": 9, "n": 2}]})["predictions"])
        np.testing.assert_allclose(two[0], expected[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(two[1:], distillkit.load_generator(out).sample(2, 9).numpy(), rtol=0, atol=1e-6)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its worker
        server.wait(timeout=30)
    assert server.returncode is not None


# --------------------------------------------------------------------------------------------
# bad input


def _one_line_error(capsys, argv, *, match: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("distillkit: error: "), err
    assert re.search(match, err), err
    return err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(toy_run, conditional_checkpoint, tmp_path, capsys):
    runs, run_id = toy_run
    base = ["export", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1"]
    _one_line_error(capsys, [*base, "--format", "onnx", "--out", str(tmp_path / "x")],
                    match=r"--format='onnx'.*torchscript, safetensors, mlflow")
    _one_line_error(capsys, [*base, "--format", "torchscript,mlflow", "--out", str(tmp_path / "x")],
                    match="one of torchscript")
    _one_line_error(capsys, ["export", "--run", "0" * 32, "--runs-dir", str(tmp_path / "none"), "--nfe", "1",
                             "--format", "torchscript", "--out", str(tmp_path / "x.pt")], match="no run folder")
    _one_line_error(capsys, ["export", "--run", "missing.pt", "--runs-dir", str(runs), "--nfe", "1",
                             "--format", "torchscript", "--out", str(tmp_path / "x.pt")], match="not a checkpoint")
    digits_runs = conditional_checkpoint.parent.parent.parent
    _one_line_error(capsys, ["export", "--run", str(conditional_checkpoint), "--runs-dir", str(digits_runs),
                             "--nfe", "2", "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")],
                    match=r"--nfe=2.*odd number")
    _one_line_error(capsys, [*base, "--format", "torchscript", "--nfe", "0", "--out", str(tmp_path / "x.pt")],
                    match="positive integer")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(capsys, [*base, "--format", "torchscript", "--out", str(blocker / "x.pt")],
                    match="not a writable folder")
    _one_line_error(capsys, [*base, "--format", "safetensors", "--out", str(tmp_path)], match="is a folder")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("")
    _one_line_error(capsys, [*base, "--format", "mlflow", "--out", str(full)], match="not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "full"]
    assert sorted(p.name for p in full.iterdir()) == ["keep"]


def test_a_failed_write_leaves_nothing(toy_run, tmp_path, monkeypatch):
    from distillkit.export import formats

    runs, run_id = toy_run

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        main(["export", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1", "--format", "safetensors",
              "--out", str(tmp_path / "g.safetensors")])
    monkeypatch.setattr(formats, "write_safetensors", broken)
    with pytest.raises(OSError):
        main(["export", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1", "--format", "mlflow",
              "--out", str(tmp_path / "model")])
    assert list(tmp_path.iterdir()) == []


def test_run_export_flag_is_checked_before_training(tmp_path, capsys):
    _one_line_error(capsys, ["run", "--method", "fm", "--dataset", "toy2d", "--runs-dir", str(tmp_path / "r"),
                             "--export", "torchscript,pickle"], match=r"--export='pickle'")
    _one_line_error(capsys, ["run", "--method", "fm", "--dataset", "toy2d", "--runs-dir", str(tmp_path / "r"),
                             "--nfe", "2,4", "--set", "sample.integrator=rk2",
                             "--export", "torchscript", "--export-nfe", "3"], match=r"--export-nfe=3.*multiples of 2")
    assert not (tmp_path / "r").exists()
