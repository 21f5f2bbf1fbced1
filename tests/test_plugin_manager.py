"""Plugin loading: built-ins through entry points, broken plugins reported and never fatal."""

import types

import pytest

import distillkit
from distillkit import ButcherTableau, hookimpl
from distillkit.errors import RegistrationError, UnknownNameError
from distillkit.plugin_manager import load_plugins
from distillkit.registry import Registry

EXPECTED_BUILTINS = {
    "integrators": {"integrators": {"euler", "heun", "rk2", "midpoint", "rk3", "ralston3", "rk4"}},
    "fm": {"methods": {"fm"}},
    "cud": {"methods": {"cud"}},
    "backbones": {"backbones": {"unet", "mlp"}},
    "datasets": {"datasets": {"digits", "toy2d"}, "teachers": {"toy2d-exact"}},
    "teachers": {"teachers": {"checkpoint"}},
}

EULER_COPY = ButcherTableau(name="euler", a=((0,),), b=(1,), c=(0,), order=1)
SSPRK2 = ButcherTableau(name="test-ssprk2", a=((0, 0), (1, 0)), b=(0.5, 0.5), c=(0, 1), order=2)


def plugin(**hooks):
    """A throw-away plugin object with the given hook implementations."""
    namespace = types.SimpleNamespace()
    for name, function in hooks.items():
        setattr(namespace, name, hookimpl(function))
    return namespace


def test_builtins_register_through_entry_points_with_distribution():
    state = load_plugins()
    for name, expected in EXPECTED_BUILTINS.items():
        info = state.plugins[name]
        assert info.distribution == "distillkit" and info.version == distillkit.__version__
        assert info.errors == []
        for kind, names in expected.items():  # at least these (other engineers' plugins add more)
            assert names <= set(info.registered[kind]), (name, kind)
    assert state.registries.integrators.entry("rk2").provider == "integrators"
    assert state.registries.methods.entry("cud").provider == "cud"


def test_core_never_imports_plugins():
    import pathlib
    import re

    core = pathlib.Path(distillkit.__file__).parent
    offenders = [
        str(path) for path in core.rglob("*.py")
        if re.search(r"^\s*(from|import)\s+(plugins|distillkit_\w+)", path.read_text(), re.M)
    ]
    assert offenders == []


def test_duplicate_name_is_refused_and_names_both_plugins():
    third = plugin(distillkit_register_integrators=lambda register: register(EULER_COPY))
    state = load_plugins([("zz-third", third)])
    errors = state.plugins["zz-third"].errors
    assert len(errors) == 1 and "'euler'" in errors[0] and "'integrators'" in errors[0] and "'zz-third'" in errors[0]
    assert state.registries.integrators.entry("euler").provider == "integrators"


def test_raising_hook_and_invalid_object_are_reported_and_others_still_load():
    def explode(register):
        raise RuntimeError("boom")

    broken = plugin(distillkit_register_methods=explode)
    invalid = plugin(distillkit_register_methods=lambda register: register(object()))
    good = plugin(distillkit_register_integrators=lambda register: register(SSPRK2))
    state = load_plugins([("broken", broken), ("invalid", invalid), ("good", good)])
    assert "RuntimeError: boom" in state.plugins["broken"].errors[0]
    assert "not a subclass of distillkit.Method" in state.plugins["invalid"].errors[0]
    assert state.registries.integrators.get("test-ssprk2") is SSPRK2
    assert "cud" in state.registries.methods  # built-ins unaffected


def test_misspelled_hook_is_reported_not_loaded():
    typo = plugin(distillkit_register_integrator=lambda register: register(SSPRK2))
    state = load_plugins([("typo", typo)])
    assert state.plugins["typo"].errors and "distillkit_register_integrator" in state.plugins["typo"].errors[0]
    assert "test-ssprk2" not in state.registries.integrators


def test_broken_entry_point_is_reported(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[distillkit]\nbroken = broken_plugin_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state = load_plugins()
    info = state.plugins["broken"]
    assert info.distribution == "broken-plugin" and info.version == "0.1"
    assert "ModuleNotFoundError" in info.errors[0]
    assert "cud" in state.registries.methods


def test_allow_and_block_lists(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_LOAD_PLUGINS", "integrators,fm")
    state = load_plugins()
    assert set(state.plugins) == {"integrators", "fm"}
    monkeypatch.delenv("DISTILLKIT_LOAD_PLUGINS")
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGINS", "cud")
    state = load_plugins()
    assert "cud" not in state.plugins and "cud" not in state.registries.methods


def test_registry_unknown_name_lists_available_with_providers():
    registry = Registry("integrator", lambda obj: None)
    registry.register(SSPRK2, provider="p1", aliases=("ssp2",))
    with pytest.raises(UnknownNameError, match=r"unknown integrator 'nope'; available: ssp2 \(p1\), test-ssprk2 \(p1\)"):
        registry.get("nope")
    assert registry.get("ssp2") is SSPRK2
    with pytest.raises(RegistrationError, match="already registered by plugin 'p1'"):
        registry.register(SSPRK2, provider="p2")


def test_plugins_command_json_lists_everything(capsys):
    import json

    from distillkit.cli.main import main

    assert main(["plugins", "--json"]) == 0
    listing = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    for name, expected in EXPECTED_BUILTINS.items():
        for kind, names in expected.items():
            assert names <= set(listing[name]["registered"][kind])
        assert listing[name]["distribution"] == "distillkit"


# --- plugins that cannot take the tool down -------------------------------------------------------

def _install_entry_point(root, name, module_source):
    """A throw-away distribution ``<name>-plugin`` whose entry point ``name`` is a module with
    ``module_source``, importable once ``root`` is on the path."""
    dist = root / f"{name}_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[distillkit]\n{name} = {name}_plugin_module\n")
    (root / f"{name}_plugin_module.py").write_text(module_source)


class Abort(BaseException):
    """Neither an Exception nor SystemExit / KeyboardInterrupt."""


def test_systemexit_or_baseexception_at_import_or_in_a_hook_is_one_plugin_error(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, "exits", "import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def exit_in_hook(register):
        raise SystemExit(4)

    def abort_in_hook(register):
        raise Abort("stop everything")

    state = load_plugins([("exit-hook", plugin(distillkit_register_methods=exit_in_hook)),
                          ("abort-hook", plugin(distillkit_register_integrators=abort_in_hook))])
    assert state.plugins["exits"].errors == [state.plugins["exits"].errors[0]]
    assert "could not load: SystemExit: 3" in state.plugins["exits"].errors[0]
    assert "raised SystemExit: 4" in state.plugins["exit-hook"].errors[0]
    assert "raised Abort: stop everything" in state.plugins["abort-hook"].errors[0]
    assert "fm" in state.registries.methods and "rk3" in state.registries.integrators


def test_keyboard_interrupt_in_a_plugin_still_stops_the_tool():
    def interrupted(register):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_plugins([("ctrl-c", plugin(distillkit_register_methods=interrupted))])


def test_a_plugin_calling_sys_exit_leaves_plugins_and_run_working_with_the_error_shown(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    site = tmp_path / "site"
    site.mkdir()
    _install_entry_point(site, "exits", "import sys\nsys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    binary = str(Path(sys.executable).parent / "distillkit")
    listing = subprocess.run([binary, "plugins"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "exits  (exits-plugin 0.1)" in listing.stdout and "ERROR: could not load: SystemExit: 3" in listing.stdout
    run = subprocess.run([binary, "run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2", "--batch-size", "8",
                          "--no-track", "--quiet", "--runs-dir", str(tmp_path / "runs"), "--nfe", "1",
                          "--set", "sample.num_samples=8", "--set", "sample.reference_steps=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "distillkit: warning: plugin 'exits': could not load: SystemExit: 3" in run.stderr
    assert "Traceback" not in run.stderr and "quality per NFE" in run.stdout


def test_a_third_party_plugin_cannot_take_a_builtin_name_whatever_its_name_sorts_as():
    """'aaa' sorts before 'integrators': ordered by plugin name alone, it would take ``euler``."""
    thief = plugin(distillkit_register_integrators=lambda register: register(EULER_COPY))
    state = load_plugins([("aaa-third", thief)])
    assert state.registries.integrators.entry("euler").provider == "integrators"
    assert state.registries.integrators.get("euler") is not EULER_COPY
    (error,) = state.plugins["aaa-third"].errors
    assert "'euler'" in error and "already registered by plugin 'integrators'" in error
    assert state.plugins["integrators"].errors == []


def test_every_command_shows_a_refused_name_conflict(monkeypatch, tmp_path, capsys):
    from distillkit import plugin_manager
    from distillkit.cli.main import main

    thief = plugin(distillkit_register_integrators=lambda register: register(EULER_COPY))
    monkeypatch.setattr(plugin_manager, "_STATE", load_plugins([("aaa-third", thief)]))
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "distillkit: warning: plugin 'aaa-third': integrator name 'euler'" in err


def test_plugins_into_a_closed_pipe_prints_no_traceback():
    """``distillkit plugins | head -3``: the reader is gone before the listing is written."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([str(Path(sys.executable).parent / "distillkit"), "plugins"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the process has started writing: every write hits a broken pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141
