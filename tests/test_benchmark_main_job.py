"""``benchmarks/main_job.py`` times the real main job and splits its wall time into phases that add
up to the whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SMALL = ["--set", "sample.num_samples=100", "--set", "sample.reference_steps=4", "--no-track"]


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISTILLKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / "main_job.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_a_short_main_job_is_split_into_phases_that_add_up_to_its_wall_time(tmp_path):
    out = tmp_path / "main-job.md"
    done = run_script("--steps", "14", "--out", str(out), "--", *SMALL, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    phases = row["phases_s"]
    assert list(phases) == ["start-up", "training", "evaluation", "exit"] and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(row["wall_s"], rel=1e-9)
    assert row["steps"] == 14 and sorted(row["quality"], key=int) == ["1", "2", "4", "8"]
    assert row["eta_s"] is not None and 0 < row["actual_rest_s"] < row["wall_s"]
    assert (row["steps_trained"], row["batch_size"], row["cpu_threads"]) == (14, 64, 1)
    assert "| 1 | idle | 1 | 1 | 14 × 64 |" in out.read_text()
    assert not list(tmp_path.glob("distillkit-runs"))  # the runs lived in a temporary directory


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "ten"], ["--repeats", "0"], ["--threads", "0"],
                                  ["--threads", "two"], ["--neighbour", "loaded"]])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args):
    done = run_script(*args, "--out", str(tmp_path / "x.md"), tmp_path=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("main_job: error: --") and not (tmp_path / "x.md").exists()


def test_eta_durations_read_back_in_seconds():
    sys.path.insert(0, str(BENCHMARKS))
    from main_job import seconds_of

    assert [seconds_of(d) for d in ("9s", "2m14s", "1h03m")] == [9, 134, 3780]


def test_a_busy_neighbour_spins_during_the_block_and_is_gone_after():
    sys.path.insert(0, str(BENCHMARKS))
    from _common import busy_neighbour

    with busy_neighbour() as neighbour:
        assert neighbour.poll() is None
        user_ticks = int(Path(f"/proc/{neighbour.pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
        assert user_ticks > 0  # it had half a second to spin before the block began
    assert neighbour.returncode is not None
    with busy_neighbour(False) as nothing:
        assert nothing is None
