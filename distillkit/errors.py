"""Errors the user can cause. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


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
        super().__init__(f"unknown {kind} {name!r}; available: {choices}")


class RegistrationError(DistillkitError):
    """A plugin registered something the registry refuses (duplicate name, broken contract)."""


class TrainingFailed(DistillkitError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step."""


class TimeGridError(UsageError):
    """A time grid that is not strictly monotone, not finite, or outside [0, 1]."""
