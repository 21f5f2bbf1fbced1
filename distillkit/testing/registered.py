"""What the distillkit distribution's own plugins register, for tests that check every built-in
plugin of a kind has its conformance test (a separately installed package tests its own)."""

from __future__ import annotations


def built_in_names(kind: str) -> set[str]:
    """Names of the ``kind`` (``samplers``, ``metrics``, ...) registered by the distillkit distribution."""
    from ..plugin_manager import plugin_state

    state = plugin_state()
    return {entry.name for entry in state.registries.of_kind(kind)
            if state.plugins[entry.provider].distribution == "distillkit"}
