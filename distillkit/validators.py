"""attrs validators for config classes, core and plugins alike.

Each raises ``distillkit.ConfigError(field, value, allowed)``: the core prefixes the section
(``method_options.tn=0 is not allowed: a positive integer``) and the CLI prints that one line.
Plugins use them as ``distillkit.validators.positive_int`` and write their own only for rules
of their own (``require`` gives those the same error).
"""

from __future__ import annotations

import math
from typing import Callable

from .errors import ConfigError

Validator = Callable[[object, object, object], None]


def is_int(value: object) -> bool:
    """An integer, not a bool (TOML's ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, attribute, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(attribute.name, value, allowed)


def positive_int(instance, attribute, value) -> None:
    require(is_int(value) and value > 0, attribute, value, "a positive integer")


def non_negative_int(instance, attribute, value) -> None:
    require(is_int(value) and value >= 0, attribute, value, "an integer >= 0")


#: The largest seed accepted: torch generators take 64-bit seeds, and a run derives further seeds
#: from it (seed + sample index), which must stay below 2**64.
MAX_SEED = 2**63 - 1


def seed_int(instance, attribute, value) -> None:
    require(is_int(value) and 0 <= value <= MAX_SEED, attribute, value, f"an integer from 0 to {MAX_SEED} (2**63 - 1)")


def positive_number(instance, attribute, value) -> None:
    require(is_number(value) and value > 0, attribute, value, "a positive number")


def non_negative_number(instance, attribute, value) -> None:
    require(is_number(value) and value >= 0, attribute, value, "a number >= 0")


def unit_interval(instance, attribute, value) -> None:
    """[0, 1): probabilities that must leave something, decays, small times."""
    require(is_number(value) and 0.0 <= value < 1.0, attribute, value, "a number in [0, 1)")


def boolean(instance, attribute, value) -> None:
    require(isinstance(value, bool), attribute, value, "true or false")


def relative_step(instance, attribute, value) -> None:
    """A finite difference's step relative to its time t, in (0, 0.1]: beyond 0.1 the central
    difference's own error (~ step^2) is no longer small, and up to it t - step t stays above
    t / 2, so the rounded step (t+ - t-) / 2 is exact (Sterbenz)."""
    require(is_number(value) and 0 < value <= 0.1, attribute, value, "a number in (0, 0.1]")


def one_of(*choices: str) -> Validator:
    def check(instance, attribute, value) -> None:
        require(value in choices, attribute, value, "one of " + ", ".join(choices))

    return check


def registered_integrator(instance, attribute, value) -> None:
    """The name of an integrator in the registry (looked up when the config is built)."""
    from .plugin_manager import get_registries

    names = get_registries().integrators.names()
    require(isinstance(value, str) and value in names, attribute, value, "a registered integrator: " + ", ".join(names))



def _split(text: str, kind: type) -> tuple:
    """``"1, 2"`` -> (kind(1), kind(2)); the raw parts when one is not a ``kind``, for the
    field's validator to name in its one-line error."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        return tuple(parts)


def float_tuple(value) -> tuple:
    """A converter for list options: a number, a comma-separated string (``"1,0.5,0"``, as
    ``--set`` gives it) or a sequence, to a tuple of floats (integers become floats)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, str):
        return _split(value, float)
    return tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)


def int_tuple(value) -> tuple:
    """A converter for integer list options: a comma-separated string (``"1,2,4"``) or a sequence."""
    return _split(value, int) if isinstance(value, str) else tuple(value)
