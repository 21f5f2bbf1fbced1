"""Errors the user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: object, choices: Iterable[object], n: int = 2, cutoff: float = 0.6, prefix: str = "") -> str:
    """`` (did you mean 'cud'?)`` for the ``n`` closest of ``choices`` to a misspelled ``word``,
    or "" when none is close (difflib's similarity ratio below ``cutoff``). ``prefix`` is shown
    before each match but not compared (``train.`` of ``train.lr``: a shared prefix would make
    every key look close)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(prefix + c) for c in close)}?)" if close else ""


class DistillkitError(Exception):
    """Base class for every error distillkit raises on purpose."""


class UsageError(DistillkitError):
    """Bad input from the user: an option, a value, a file. Reported in one line, exit code 2."""


class ConfigError(UsageError):
    """A configuration value is not allowed.

    The message always names the option, the value given and what is allowed, so that the CLI
    can print it as the one line the user sees.
    """

    def __init__(self, option: str, value: object, allowed: str):
        self.option = option
        self.value = value
        self.allowed = allowed
        super().__init__(f"{option}={value!r} is not allowed: {allowed}")


class UnknownNameError(UsageError):
    """A name that no installed plugin registered (method, integrator, dataset, ...)."""

    def __init__(self, kind: str, name: str, available: dict[str, str]):
        self.kind = kind
        self.name = name
        self.available = available
        choices = ", ".join(f"{n} ({p})" for n, p in sorted(available.items())) or "none installed"
        super().__init__(f"unknown {kind} {name!r}{did_you_mean(name, available)}; available: {choices}")


class RegistrationError(DistillkitError):
    """A plugin registered something the registry refuses (duplicate name, broken contract)."""


class TrainingFailed(DistillkitError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step."""


def exit_status(exc: DistillkitError) -> int:
    """The exit code of a command that ends with ``exc``: 2 for bad input (``UsageError``, which
    ``ConfigError`` is), 1 for a run that failed."""
    return 2 if isinstance(exc, UsageError) else 1


class TrackingFailed(DistillkitError):
    """The tracking store cannot record the run (its disk is full); exit code 1."""


class TimeGridError(UsageError):
    """A time grid that is not strictly monotone, not finite, or outside [0, 1]."""
