"""The ode_error reference solve cache: a hit gives the cold values exactly, any change of what the
solve depends on misses, and a corrupt file is solved again with one log line."""

from __future__ import annotations

import attrs
import pytest
import torch

import distillkit
from distillkit.config import run_config_from_dict
from distillkit.evaluation import EvalSettings, Evaluator, evaluator, of_network
from distillkit.evaluation.choice import SamplingChoice
from distillkit.resolve import resolve
from distillkit.training.build import build_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ode_error"


@pytest.fixture
def solves(monkeypatch):
    """How many reference solves ran (the evaluator's ``sample_seeded``)."""
    count = [0]
    real = evaluator.sample_seeded

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "sample_seeded", counting)
    return count


def toy(seed: int = 0):
    tree = {"method": "fm", "dataset": "toy2d", "sample": {"num_samples": 40, "reference_steps": 4, "nfe": [1, 3]}}
    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    dataset = resolved.dataset_cls(resolved.dataset_config)
    method, network = build_model(resolved, dataset.spec, torch.device("cpu"), seed=seed)
    return resolved, dataset, method, network.eval()


def evaluate(parts, *, n: int = 40, seed: int = 1234, dataset_name: str = "", cache: bool = True, log=None):
    resolved, dataset, method, network = parts
    subject = of_network(method, network, resolved, dataset=dataset, spec=dataset.spec)
    if dataset_name:
        subject = attrs.evolve(subject, dataset_name=dataset_name)
    settings = EvalSettings(metrics=("ode_error",), nfes=(1, 3), n=n, seed=seed,
                            metric_options={"ode_error": {"cache": cache}})
    result = Evaluator(subject, settings, sampling=SamplingChoice(resolved.sampler, resolved.grid),
                       log=log or (lambda line: None)).run()
    return result.values["ode_error"], result.protocol["metrics"]["ode_error"]["cache"]


def test_a_hit_gives_exactly_the_cold_values_without_solving(solves, private_cache):
    parts = toy()
    cold, how = evaluate(parts)
    assert solves[0] == 1 and how.startswith("saved as") and len(list(private_cache.glob("*.pt"))) == 1
    hit, how = evaluate(parts)
    assert solves[0] == 1 and how.startswith("read from")
    assert hit == cold  # bit for bit: the cached tensor is the solved one


@pytest.mark.parametrize("change", ["n", "seed", "dataset", "weights"])
def test_a_changed_key_misses(change, solves, private_cache):
    evaluate(toy())
    changed = {"n": dict(n=41), "seed": dict(seed=1235), "dataset": dict(dataset_name="toy2d-other"),
               "weights": {}}[change]
    _, how = evaluate(toy(seed=1) if change == "weights" else toy(), **changed)
    assert solves[0] == 2 and how.startswith("saved as") and len(list(private_cache.glob("*.pt"))) == 2


def test_a_corrupt_file_is_solved_again_with_one_log_line(solves, private_cache):
    parts = toy()
    cold, _ = evaluate(parts)
    (path,) = private_cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    lines: list[str] = []
    again, how = evaluate(parts, log=lines.append)
    assert again == cold and solves[0] == 2 and how.startswith("saved as")
    ignored = [line for line in lines if "ignoring the cached ode_error reference" in line]
    assert len(ignored) == 1 and str(path) in ignored[0] and "cannot be read" in ignored[0]
    _, how = evaluate(parts)  # rewritten whole: read again next time
    assert how.startswith("read from") and solves[0] == 2


def test_cache_false_writes_nothing(solves, private_cache):
    evaluate(toy(), cache=False)
    _, how = evaluate(toy(), cache=False)
    assert solves[0] == 2 and how == "off" and not private_cache.exists()


def test_eval_after_run_reads_the_reference_the_run_solved(tmp_path, capsys, private_cache):
    """The case the cache is for: ``distillkit eval`` of a finished run with its own settings."""
    import json

    from distillkit.cli.main import main

    runs = tmp_path / "runs"
    small = ["--set", "sample.num_samples=64", "--set", "sample.reference_steps=4", "--nfe", "1,2"]
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "5", "--no-track", "--quiet",
                 "--runs-dir", str(runs), *small]) == 0
    assert len(list(private_cache.glob("toy2d-*.pt"))) == 1
    (run,) = [p.name for p in (runs / "runs").iterdir()]
    capsys.readouterr()
    assert main(["eval", "--run", run, "--runs-dir", str(runs), "--no-log", "--json", "--metric", "ode_error",
                 "--nfe", "1,2"]) == 0
    protocol = json.loads(capsys.readouterr().out)
    assert "read from" in json.dumps(protocol)
