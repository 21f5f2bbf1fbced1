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
