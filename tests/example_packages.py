"""Installing the documentation's example plugins as separate packages, for the tests that use them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def pip_install_examples(names: list[str], tmp_path_factory) -> Path:
    """pip-install the named examples into a private directory (not into the test environment) and
    return it. Each is built from a private copy: setuptools builds in the source folder (build/,
    *.egg-info), and two pytest-xdist workers building one folder at once collide there."""
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("sources")
    for name in names:
        copy = shutil.copytree(EXAMPLES / name, sources / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(target), str(copy)],
            check=True, cwd=sources, capture_output=True,
        )
    return target
