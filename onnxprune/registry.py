"""One registry type for per-op and per-kind behaviour: channel rules, fixups, criteria, MACs counters, VJPs.

A registry is an object (tests build their own, nothing is filled at import time) and registering a key
twice is an error: two handlers for one op would make the result depend on registration order.

Example:
    >>> rules = OpRegistry[str]("channel rule")
    >>> rules.register(("Conv", "ConvTranspose"), "conv")
    >>> rules.get("Conv", "ai.onnx")
    'conv'
    >>> rules.register("Conv", "again")
    Traceback (most recent call last):
    ValueError: a channel rule for ai.onnx::Conv is already registered (registered twice)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_DOMAIN = ""
"""The default ONNX domain; ``ai.onnx`` is another spelling of it."""


def op_key(op_type: str, domain: str | None = DEFAULT_DOMAIN) -> tuple[str, str]:
    """``(domain, op_type)`` with both spellings of the default domain made one."""
    return ("" if domain in (None, "", "ai.onnx") else domain, op_type)


class Registry(Generic[K, V]):
    """Key → handler, each key once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[K, V] = {}

    def add(self, key: K, value: V) -> None:
        """Raises:
            ValueError: ``key`` already has a handler.
        """
        if key in self._items:
            raise ValueError(f"a {self.what} for {self._describe(key)} is already registered (registered twice)")
        self._items[key] = value

    def lookup(self, key: K) -> V | None:
        return self._items.get(key)

    def keys(self) -> list[K]:
        return sorted(self._items, key=str)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _describe(self, key: K) -> str:
        return repr(key)


class OpRegistry(Registry[tuple[str, str], V]):
    """Handlers keyed by (domain, op type)."""

    def register(self, ops: str | Iterable[str], value: V, domain: str | None = DEFAULT_DOMAIN) -> None:
        """Add ``value`` for one op type or several (ValueError for one that already has a handler)."""
        for op in [ops] if isinstance(ops, str) else ops:
            self.add(op_key(op, domain), value)

    def get(self, op_type: str, domain: str | None = DEFAULT_DOMAIN) -> V | None:
        """The handler for an op, or None (the caller's stated policy applies)."""
        return self.lookup(op_key(op_type, domain))

    def ops(self) -> list[str]:
        return sorted(op for _, op in self._items)

    def __contains__(self, item: object) -> bool:
        """An op type of the default domain, or a ``(domain, op)`` key."""
        key = op_key(item) if isinstance(item, str) else item
        return key in self._items

    def _describe(self, key: tuple[str, str]) -> str:
        return f"{key[0] or 'ai.onnx'}::{key[1]}"
