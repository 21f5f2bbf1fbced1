"""Typed registries: one per plugin type, each remembering which plugin provided what."""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

import attrs

from .errors import RegistrationError, UnknownNameError

T = TypeVar("T")


@attrs.frozen
class Entry(Generic[T]):
    name: str
    obj: T
    provider: str  # the plugin (entry-point name) that registered it
    aliases: tuple[str, ...] = ()


class Registry(Generic[T]):
    """Names to objects of one kind.

    ``validate(obj)`` returns None when ``obj`` satisfies the contract of this kind, or a sentence
    saying why not. Registration refuses a name (or alias) that is already taken and names both
    plugins in the error.
    """

    def __init__(self, kind: str, validate: Callable[[Any], Optional[str]]):
        self.kind = kind
        self._validate = validate
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, obj: T, *, provider: str, aliases: tuple[str, ...] | list[str] = ()) -> None:
        problem = self._validate(obj)
        if problem is not None:
            raise RegistrationError(f"plugin {provider!r} registered an invalid {self.kind}: {problem}")
        name = obj.name  # type: ignore[attr-defined]
        for taken in (name, *aliases):
            owner = self._owner(taken)
            if owner is not None:
                raise RegistrationError(
                    f"{self.kind} name {taken!r} registered by plugin {provider!r} is already "
                    f"registered by plugin {owner!r}"
                )
        self._entries[name] = Entry(name, obj, provider, tuple(aliases))
        for alias in aliases:
            self._aliases[alias] = name

    def _owner(self, name: str) -> Optional[str]:
        canonical = self._aliases.get(name, name)
        entry = self._entries.get(canonical)
        return None if entry is None else entry.provider

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        canonical = self._aliases.get(name, name)
        try:
            return self._entries[canonical]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.providers()) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every accepted name, aliases included, sorted."""
        return sorted([*self._entries, *self._aliases])

    def providers(self) -> dict[str, str]:
        """name (and alias) -> providing plugin."""
        out = {e.name: e.provider for e in self._entries.values()}
        out.update({a: self._entries[n].provider for a, n in self._aliases.items()})
        return out
