"""The plugin-author guide's example, installed as a separate package and used by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from example_packages import pip_install_examples

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "distillkit-ssprk3"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example into a private directory (not into the test environment)."""
    target = pip_install_examples(["distillkit-ssprk3"], tmp_path_factory)
    env = dict(os.environ, PYTHONPATH=str(target))
    return env


def run(env, *argv):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_plugin_listed_with_its_own_distribution(installed):
    result = run(installed, str(BIN / "distillkit"), "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["ssprk3"]["distribution"] == "distillkit-ssprk3"
    assert plugins["ssprk3"]["version"] == "0.1.0"
    assert plugins["ssprk3"]["registered"] == {"integrators": ["ssprk3"]}
    assert plugins["ssprk3"]["errors"] == []


def test_plugin_integrator_usable_by_name_in_integrate(installed):
    code = (
        "import torch, distillkit\n"
        "x = torch.ones(3, 1, dtype=torch.float64)\n"
        "out = distillkit.integrate(lambda x, t: -x, x, distillkit.uniform_grid(1, 0.0, 1.0), integrator='ssprk3')\n"
        "print(float(out[0, 0]))\n"
    )
    result = run(installed, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    # One SSPRK3 step of dx/dt = -x with h = 1: the cubic Taylor polynomial of exp(-1).
    assert float(result.stdout) == pytest.approx(1 - 1 + 1 / 2 - 1 / 6)


def test_plugin_integrator_usable_on_the_cli(installed):
    result = run(installed, str(BIN / "distillkit"), "run", "--method", "cud", "--integrator", "ssprk3",
                 "--set", "sample.integrator=ssprk3", "--nfe", "3,6", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert 'integrator = "ssprk3"' in result.stdout


def test_plugin_passes_the_reusable_tableau_contract(installed):
    result = run(installed, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                 str(EXAMPLE / "test_ssprk3.py"))
    assert result.returncode == 0, result.stdout[-2000:]
    assert " passed" in result.stdout


def test_guide_shows_the_example_verbatim():
    guide = (ROOT / "docs" / "plugin-guide.md").read_text()
    for name in ("pyproject.toml", "distillkit_ssprk3.py", "test_ssprk3.py"):
        assert (EXAMPLE / name).read_text().strip() in guide, name
