"""Which layer may import which, read from the source with ``ast`` (no module is imported).

(a) No module under ``distillkit/cli`` imports another ``distillkit.cli`` module, except
    ``cli/main.py``: it is the dispatcher that maps each command name to its module, so it
    imports them all. A command module that needs what another command does calls the library
    both use instead.
(b) No file under ``benchmarks/`` imports ``distillkit.cli``: the benchmarks use the library
    (``distillkit.comparison``, ``distillkit.evaluation``, the trainer), not the CLI's internals.
(c) No module under ``distillkit/cli`` imports the evaluation math, the samplers or the trainer
    (``distillkit.metrics``; ``distillkit.fid``'s features and distances; ``distillkit.sampling``;
    ``distillkit.classifier``'s training and distances; ``distillkit.training.trainer``): the CLI
    parses and prints, and calls ``distillkit.evaluation``, ``distillkit.comparison`` and
    ``distillkit.training.launch`` for the work.
(d) The core never imports a plugin: ``tests/test_plugin_manager.py::test_core_never_imports_plugins``.

Each rule is also run on a small source that breaks it, to show that the check reports it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "distillkit" / "cli"
BENCHMARKS = ROOT / "benchmarks"

#: the one CLI module allowed to import the others (rule a)
DISPATCHER = "distillkit.cli.main"

#: rule (c): names a CLI module must not reach (a module, or a module's attribute)
EVALUATION_INTERNALS = (
    "distillkit.metrics",
    "distillkit.sampling",
    "distillkit.fid.frechet_distance", "distillkit.fid.gaussian_stats", "distillkit.fid.compute_features",
    "distillkit.fid.prepare_images", "distillkit.fid.fid",
    "distillkit.classifier.train_classifier", "distillkit.classifier.classifier_for",
    "distillkit.classifier.classifier_fd", "distillkit.classifier.accuracy_on",
    "distillkit.training.trainer",
)


class Use(NamedTuple):
    line: int
    name: str  # absolute dotted name: a module, or a module's attribute


def _absolute(module: str, level: int, package: str) -> str:
    """``from <level dots><module> import ...`` seen from ``package``, as an absolute name."""
    if not level:
        return module
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> [a, b, c]; None for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else [*head, node.attr]
    return None


def uses_of(source: str, module: str, *, is_package: bool = False) -> list[Use]:
    """Every absolute name ``source`` (the text of ``module``) imports, or reaches as an attribute
    of an imported name (``from .. import fid`` then ``fid.frechet_distance``), or imports with
    ``importlib.import_module("...")``. Imports inside functions count like the others."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> what it names
    uses: list[Use] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                uses.append(Use(node.lineno, alias.name))
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    head = alias.name.partition(".")[0]
                    bound[head] = head
        elif isinstance(node, ast.ImportFrom):
            origin = _absolute(node.module or "", node.level, package)
            for alias in node.names:
                name = f"{origin}.{alias.name}" if alias.name != "*" else origin
                uses.append(Use(node.lineno, name))
                bound[alias.asname or alias.name] = name
        elif isinstance(node, ast.Call):
            called = _dotted(node.func)
            if called and called[-1] in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                uses.append(Use(node.lineno, node.args[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain and chain[0] in bound:
                uses.append(Use(node.lineno, ".".join([bound[chain[0]], *chain[1:]])))
    return uses


def violations(source: str, module: str, forbidden: Iterable[str], *, is_package: bool = False) -> list[Use]:
    """The uses in ``source`` of a forbidden name or of anything inside it."""
    forbidden = tuple(forbidden)
    return sorted({use for use in uses_of(source, module, is_package=is_package)
                   if any(use.name == f or use.name.startswith(f + ".") for f in forbidden)})


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _cli_modules() -> list[Path]:
    modules = sorted(CLI.glob("*.py"))
    assert {p.stem for p in modules} >= {"main", "run", "compare", "evaluate", "sample", "fid_stats"}
    return modules


def _report(found: dict[str, list[Use]]) -> str:
    return "; ".join(f"{where}:{use.line} {use.name}" for where, uses in found.items() for use in uses)


def cli_imports_of_other_commands(path: Path) -> list[Use]:
    module, is_package = _module_name(path)
    if module == DISPATCHER:
        return []
    return violations(path.read_text(), module, ["distillkit.cli"], is_package=is_package)


# -- (a) ---------------------------------------------------------------------------------------


def test_no_cli_module_imports_another_except_the_dispatcher():
    found = {p.name: cli_imports_of_other_commands(p) for p in _cli_modules()}
    assert not any(found.values()), _report(found)
    # the dispatcher does import the command modules: the exception is needed, not decorative
    main = CLI / "main.py"
    assert violations(main.read_text(), DISPATCHER, ["distillkit.cli.compare"])


def test_rule_a_reports_a_command_module_importing_another():
    source = "from . import compare\nfrom .evaluate import settings_from_args\nfrom ..arguments import parse_nfe\n"
    assert [u.name for u in violations(source, "distillkit.cli.run", ["distillkit.cli"])] == [
        "distillkit.cli.compare", "distillkit.cli.evaluate.settings_from_args"]
    assert [u.line for u in violations("import distillkit.cli.sample as s\n", "distillkit.cli.run",
                                       ["distillkit.cli"])] == [1]


# -- (b) ---------------------------------------------------------------------------------------


def test_benchmarks_do_not_import_the_cli():
    files = sorted(BENCHMARKS.rglob("*.py"))
    assert files, "no benchmark scripts found"
    found = {str(p.relative_to(ROOT)): violations(p.read_text(), "benchmarks." + p.stem, ["distillkit.cli"])
             for p in files}
    assert not any(found.values()), _report(found)


def test_rule_b_reports_a_benchmark_importing_the_cli():
    source = ("import json\nfrom distillkit.comparison import Row\n"
              "def f():\n    from distillkit.cli.run import config_identity\n"
              "import importlib\nimportlib.import_module('distillkit.cli.compare')\n")
    assert [(u.line, u.name) for u in violations(source, "benchmarks.x", ["distillkit.cli"])] == [
        (4, "distillkit.cli.run.config_identity"), (6, "distillkit.cli.compare")]
    assert not violations("from distillkit import comparison\n", "benchmarks.x", ["distillkit.cli"])


# -- (c) ---------------------------------------------------------------------------------------


def test_cli_does_not_import_evaluation_math_samplers_or_the_trainer():
    found = {}
    for path in _cli_modules():
        module, is_package = _module_name(path)
        found[path.name] = violations(path.read_text(), module, EVALUATION_INTERNALS, is_package=is_package)
    assert not any(found.values()), _report(found)


@pytest.mark.parametrize("source, reported", [
    ("from ..metrics import energy_distance\n", "distillkit.metrics.energy_distance"),
    ("from .. import metrics\n", "distillkit.metrics"),
    ("from .. import fid\n\ndef f(a):\n    return fid.frechet_distance(*a)\n", "distillkit.fid.frechet_distance"),
    ("from ..fid import compute_features as features\n", "distillkit.fid.compute_features"),
    ("from ..sampling import generate\n", "distillkit.sampling.generate"),
    ("import distillkit.sampling\ndistillkit.sampling.sample_seeded()\n", "distillkit.sampling"),
    ("import distillkit.classifier as c\nc.train_classifier()\n", "distillkit.classifier.train_classifier"),
    ("from ..training.trainer import train\n", "distillkit.training.trainer.train"),
])
def test_rule_c_reports_the_cli_reaching_evaluation_internals(source, reported):
    assert reported in [u.name for u in violations(source, "distillkit.cli.sample", EVALUATION_INTERNALS)]


def test_rule_c_lets_the_cli_use_the_libraries():
    source = ("from .. import fid\nfrom ..fid import DEFAULT_REFERENCE_IMAGES\nfid.reference_stats()\n"
              "from ..evaluation import Evaluator, draw\nfrom ..comparison import run_comparison\n"
              "from ..training.launch import launch\nfrom ..classifier import VERSION\n")
    assert violations(source, "distillkit.cli.sample", EVALUATION_INTERNALS) == []


def test_relative_imports_resolve_from_the_package():
    assert _absolute("arguments", 2, "distillkit.cli") == "distillkit.arguments"
    assert _absolute("", 1, "distillkit.cli") == "distillkit.cli"
    assert [u.name for u in uses_of("from . import plan\n", "distillkit.comparison", is_package=True)] == [
        "distillkit.comparison.plan"]
