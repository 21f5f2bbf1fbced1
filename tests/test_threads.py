"""The command line's CPU thread default: one core spare unless the environment chose a count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distillkit.threads import spare_core_threads


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (4, 3), (64, 63)])
def test_one_core_is_left_spare_when_nothing_chose_a_count(cores, expected):
    assert spare_core_threads(cores, {}) == expected


@pytest.mark.parametrize("environ", [{"OMP_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "3"}, {"OMP_NUM_THREADS": "1"}])
def test_a_count_the_environment_chose_wins(environ):
    assert spare_core_threads(8, environ) is None


def test_an_empty_variable_chooses_nothing():
    assert spare_core_threads(4, {"OMP_NUM_THREADS": " "}) == 3


CHILD = """
import torch
from distillkit.threads import leave_a_core_spare
torch.set_num_threads(4)  # stands for torch's default on a 4-core machine
print(leave_a_core_spare(), leave_a_core_spare(), torch.get_num_threads())
"""


def test_applying_it_twice_in_one_process_keeps_one_count():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "3", "3"]


def _start_line(tmp_path, environ: dict, before: str = "pass") -> str:
    """The first line of a 2-step CLI run in a fresh process, ``before`` run first."""
    code = f"import sys, torch; from distillkit.cli.main import main; {before}; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2",
                           "--no-track", "--runs-dir", str(tmp_path), "--set", "sample.num_samples=16",
                           "--set", "sample.reference_steps=1", "--nfe", "1"],
                          env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return next(line for line in done.stderr.splitlines() if line.startswith("distillkit: fm on toy2d"))


def test_the_command_line_applies_it_and_the_run_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # torch's default on a 3-core machine, then the command line's: one core spare.
    assert "steps of 64 on 2 CPU threads," in _start_line(tmp_path, env, before="torch.set_num_threads(3)")
    assert "steps of 64 on 1 CPU thread," in _start_line(tmp_path, {**env, "OMP_NUM_THREADS": "1"})
