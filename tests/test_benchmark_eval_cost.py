"""``benchmarks/eval_cost.py`` times the real evaluation path and its parts add up to the whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / "eval_cost.py"), *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_the_parts_of_a_toy2d_evaluation_add_up_to_the_whole(tmp_path):
    out = tmp_path / "cost.md"
    done = run_script("--datasets", "toy2d", "--no-cached", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    run = data["results"][0]["runs"]["end-of-run cold"]
    parts = run["parts"]
    assert {"ode_error reference solve", "measure energy", "other"} <= set(parts)
    assert {f"sampling NFE {k}" for k in (1, 2, 4, 8)} <= set(parts)
    assert sum(p["wall_s"] for p in parts.values()) == pytest.approx(run["wall_s"], rel=1e-6)
    assert sum(p["fraction_cpu"] for p in parts.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(p["wall_s"] >= 0 for p in parts.values()) and parts["ode_error reference solve"]["wall_s"] > 0
    assert set(run["values"]) == {f"eval/{m}/nfe{k}" for m in ("energy", "ode_error") for k in (1, 2, 4, 8)}
    assert "| ode_error reference solve |" in out.read_text()
    combined = tmp_path / "combined.md"
    done = run_script("--combine", str(out.with_suffix(".json")), "--out", str(combined), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| cost | toy2d | 1000 | end-of-run cold |" in combined.read_text()
    assert json.loads(combined.with_suffix(".json").read_text())["sources"]["cost"]["results"][0]["dataset"] == "toy2d"


def test_an_unknown_dataset_is_one_line_and_exit_2(tmp_path):
    done = run_script("--datasets", "cifar10", tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "digits, mnist, toy2d" in done.stderr
