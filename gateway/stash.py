"""Typed per-gateway state that the wired parts keep for each other (after pytest's ``Stash``).

The composition root does not know what the web layer or the daemon keep on a
gateway (the metrics registry, the running scheduler), and should not: each of
them declares its own :class:`StashKey` next to the type it stores, and reads
and writes it through ``gateway.stash``. A key carries the value's type, so
``gateway.stash[METRICS_KEY]`` is a ``Metrics`` to the type checker, with no
cast and no string key two modules must spell alike.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key of a :class:`Stash`, bound to the type ``T`` of its value; every key is unique."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<StashKey {self.name or hex(id(self))}>"


class Stash:
    """A mutable mapping from :class:`StashKey` to values of each key's type."""

    __slots__ = ("_storage",)

    def __init__(self) -> None:
        self._storage: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._storage[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        """The value of ``key``; KeyError if it was never set."""
        return cast(T, self._storage[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        """The value of ``key``, or ``default`` if it was never set."""
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        """The value of ``key``; if it was never set, set it to ``default`` first."""
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._storage[key]

    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._storage

    def __len__(self) -> int:
        return len(self._storage)
