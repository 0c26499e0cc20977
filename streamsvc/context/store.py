"""Where a call's context waits between the webhook that learned it and the stream that
needs it (ACS: IncomingCall, then the media socket). A small interface, so that a store
shared by several instances can take the in-process one's place.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

__all__ = ["ContextStore", "MemoryContextStore"]

# Contexts kept at once in one process; the oldest go first (a webhook whose stream never
# came).
MAX_CONTEXTS: Final = 10_000
DEFAULT_TTL_S: Final = 3600.0


class ContextStore(Protocol):
    def put(self, key: str, context: Mapping[str, str], ttl_s: float = DEFAULT_TTL_S) -> None:
        """Keep ``context`` (names and values, in order) under ``key`` for ``ttl_s``."""

    def get(self, key: str) -> dict[str, str] | None:
        """The context under ``key``, or None when there is none or it expired."""


class MemoryContextStore:
    """The in-process store: bounded (:data:`MAX_CONTEXTS`), entries expire."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_CONTEXTS) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._entries: collections.OrderedDict[str, tuple[float, dict[str, str]]] = (
            collections.OrderedDict())

    def put(self, key: str, context: Mapping[str, str], ttl_s: float = DEFAULT_TTL_S) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (self._clock() + ttl_s, dict(context))
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def get(self, key: str) -> dict[str, str] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, context = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return dict(context)
