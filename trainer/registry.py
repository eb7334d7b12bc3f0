"""One generic registry, used for every pluggable kind the trainer resolves by name.

Entries are frozen ``*Info`` records. Registering a name twice raises; looking up an unknown name raises
``UnknownName`` (an invalid-input error) that lists the valid names, closest matches first, in the same words
``kiln validate`` uses for the same mistake (``kiln.api.catalogue.unknown_name_message``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from kiln.api.catalogue import unknown_name_message
from kiln.trainer.errors import InvalidInput


class Named(Protocol):
    @property
    def name(self) -> str: ...


InfoT = TypeVar("InfoT", bound=Named)


class UnknownName(InvalidInput):
    """A name that no registry entry answers to."""


class Registry(Generic[InfoT]):
    """Name -> frozen info record, with aliases."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, InfoT] = {}
        self._aliases: dict[str, str] = {}

    def register(self, info: InfoT) -> InfoT:
        if info.name in self._entries or info.name in self._aliases:
            raise ValueError(f"{self.kind} {info.name!r} is already registered")
        self._entries[info.name] = info
        return info

    def register_alias(self, alias: str, target: str) -> None:
        if alias in self._entries or alias in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is already registered")
        self.get(target)
        self._aliases[alias] = target

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[InfoT]:
        return iter(self._entries.values())

    def get(self, name: str) -> InfoT:
        entry = self._entries.get(self._aliases.get(name, name))
        if entry is None:
            raise UnknownName(unknown_name_message(self.kind, name, self.names()))
        return entry

    def names(self) -> list[str]:
        return sorted([*self._entries, *self._aliases])
