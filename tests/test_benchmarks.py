"""The benchmark scripts run, write their tables, and compare like with like.

Speed is never asserted here (machines are shared); these tests check that each script runs end to
end on a tiny network, that what it writes holds finite positive rates, and that the hand-written
loop of ``benchmarks/overhead.py`` computes exactly the loss distillkit computes (otherwise the
overhead ratio would compare different work).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import Batch
from distillkit.config import run_config_from_dict
from distillkit.resolve import resolve
from distillkit.training.build import build_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_overhead_writes_both_loops_per_variant(tmp_path):
    out = tmp_path / "overhead.md"
    done = run_script("overhead.py", "--preset", "tiny", "--warmup", "2", "--steps", "4", "--rounds", "2",
                      "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == {"fm", "cud-euler", "cud-rk3"}
    for label, result in data["results"].items():
        assert len(result["distillkit"]) == len(result["hand_written"]) == 2
        assert all(finite_positive(v) for v in result["distillkit"] + result["hand_written"] + result["ratios"])
        assert f"| {label} |" in out.read_text()
    assert "target >= 0.97" in out.read_text()


def test_method_cost_counts_network_evaluations(tmp_path):
    out = tmp_path / "cost.md"
    done = run_script("method_cost.py", "--preset", "tiny", "--variants", "fm,cud-rk3,rf-distill,sct,dmd2", "--warmup", "1",
                      "--steps", "2", "--rounds", "1", "--no-memory", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["fm"]["evals"] == {"with_grad": 1, "no_grad": 0}
    # The paper's RK3: three stage slopes and three look-ahead targets without gradient.
    assert rows["cud-rk3"]["evals"] == {"with_grad": 1, "no_grad": 6}
    assert rows["fm"]["relative_time"] == pytest.approx(1.0)
    # The pairs rf-distill trains on cost the teacher num_pairs x pair_nfe evaluations (defaults 10,000 x 32).
    assert rows["rf-distill"]["evals_once"] == 10_000 * 32 and rows["fm"]["evals_once"] == 0
    # sCT's tangent is one JVP through the network, counted apart from the forward with gradient.
    assert rows["sct"]["evals"] == {"with_grad": 1, "no_grad": 0, "jvp": 1}
    # DMD2's cycle of fake-score updates and one generator update, per step, rounded up.
    assert {k: rows["dmd2"]["evals"][k] for k in ("with_grad", "no_grad")} == {"with_grad": 2, "no_grad": 2}
    assert rows["dmd2"]["evals"].get("jvp", 0) == 0
    for row in rows.values():
        assert finite_positive(row["images_per_second"]) and finite_positive(row["relative_time"])


def test_sampling_compares_with_the_raw_forward(tmp_path):
    out = tmp_path / "sampling.md"
    done = run_script("sampling.py", "--preset", "tiny", "--nfe", "1,2", "--count", "64", "--batch", "32",
                      "--rounds", "1", "--full-count", "100", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == {"1", "2"}
    for by_way in data["results"].values():
        assert set(by_way) == {"raw forward", "sample_ode", "sample_seeded"}
        assert all(finite_positive(v) for values in by_way.values() for v in values)
    assert data["full"]["count"] == 100 and finite_positive(data["full"]["seconds"])


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C compiler (cc or gcc)")
def test_speed_options_measures_graph_capture_against_strict_fp32(tmp_path):
    """The setting the GPU call measures for launch-bound networks: on a CPU, reduce-overhead
    compiles without CUDA graphs, and inductor's count says it declined to capture one."""
    out = tmp_path / "speed.md"
    done = run_script("speed_options.py", "--device", "cpu", "--preset", "tiny", "--settings", "fp32",
                      "--compile", "tf32 + graphs", "--compile-budget", "0", "--warmup", "1", "--steps", "2",
                      "--rounds", "1", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == {"fp32", "tf32 + graphs"} and data["pending"] == [] and data["skipped"] == []
    graphs = data["results"]["tf32 + graphs"]
    assert finite_positive(graphs["images_per_second"][0]) and graphs["graph_skips"] >= 1
    assert "| tf32 + graphs |" in out.read_text() and "capture declined" in out.read_text()


def test_speed_options_rejects_an_unknown_setting_in_one_line(tmp_path):
    done = run_script("speed_options.py", "--device", "cpu", "--preset", "tiny", "--settings", "fp8",
                      "--out", str(tmp_path / "s.md"), tmp_path=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--settings 'fp8'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s.md").exists()


# --------------------------------------------------------------------------------------------
# the hand-written losses of the overhead benchmark are distillkit's losses


def _overhead_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import overhead
    finally:
        sys.path.remove(str(BENCHMARKS))
    return overhead


@pytest.mark.parametrize("label", ["fm", "cud-euler", "cud-rk3"])
def test_hand_written_loss_equals_distillkit_loss(label):
    overhead = _overhead_module()
    method_name, _, integrator = label.partition("-")
    tree = {"method": method_name, "integrator": integrator or "euler", "dataset": "digits", "backbone": "unet",
            "backbone_options": {"channels": 8, "num_groups": 4}}
    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    method, net = build_model(resolved, distillkit.DataSpec((1, 8, 8)), torch.device("cpu"), seed=0)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    theirs = method.loss(net, Batch(x0), torch.Generator().manual_seed(5), step=0).loss
    gen = torch.Generator().manual_seed(5)
    ours = overhead.fm_loss(net, x0, gen) if label == "fm" else overhead.cud_loss(net, x0, gen, rk3=label == "cud-rk3")
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
