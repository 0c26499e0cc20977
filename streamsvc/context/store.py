"""One context store: what the service knows of a call before its stream starts, written
by every way a call comes in (the voice webhook in each provider's form, ACS's
IncomingCall, Vonage's answer URL) and read once by the call when its stream starts.

A record per call (:class:`CallContext`): the webhook's whole context, the stream
parameters it gave the provider, the budget report, and (in a fleet) the stream a
drained instance closed for this call. In one process the store is
:class:`MemoryContextStore` (bounded, entries expire); in a fleet the Redis one
(:class:`streamsvc.fleet.store.RedisContextStore`) takes its place behind the same
interface, so a stream that lands on another instance finds what the webhook learned.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = ["DEFAULT_TTL_S", "CallContext", "ContextStore", "MemoryContextStore"]

# Records kept at once in one process; the oldest go first (a webhook whose stream never
# came).
MAX_CONTEXTS: Final = 10_000
DEFAULT_TTL_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the store knows of one call (every part may be missing)."""

    context: dict[str, str] | None = None  # the call's whole context (ways in, handlers')
    parameters: dict[str, str] | None = None  # what the stream was given to carry
    budget: dict[str, Any] | None = None  # the budget report of the answer
    resumed_from: str | None = None  # the stream a drained instance closed for this call
    call_sid: str | None = None  # the call's own id, where the record's key is another
    updated_at: float | None = None  # when the record was last written (Unix time)
    hand_offs: tuple[dict[str, Any], ...] = ()  # the call's hand-offs, in order


class ContextStore(Protocol):
    """Where each way in writes a call's record and the call reads it at start."""

    def put(self, call_id: str, record: CallContext) -> asyncio.Future[None] | None:
        """Keep ``record`` under ``call_id`` (the id the stream will carry: the call's
        sid, ACS's correlation id); a future done once every instance can read it, or None
        when it already can."""

    async def written(self, *done: asyncio.Future[None]) -> None:
        """Wait (bounded) for :meth:`put`'s futures: answer the provider after it."""

    def look_up(self, call_id: str | None,
                call_sid: str | None) -> CallContext | Awaitable[CallContext]:
        """The record for the stream of ``call_id`` (``call_sid``: the call's own sid,
        when a drained instance may have handed it over), at once or (shared store)
        bounded in time; an empty record when there is none."""

    def read(self, call_id: str) -> CallContext | Awaitable[CallContext | None] | None:
        """The record kept under ``call_id`` as it is (None when there is none), at once or
        (shared store) bounded in time; unlike :meth:`look_up` it takes nothing."""


class MemoryContextStore:
    """The in-process store: bounded (:data:`MAX_CONTEXTS`), entries expire after
    ``ttl_s``. Answers at once."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_CONTEXTS, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._entries: collections.OrderedDict[str, tuple[float, CallContext]] = (
            collections.OrderedDict())

    def put(self, call_id: str, record: CallContext) -> None:
        self._entries.pop(call_id, None)
        self._entries[call_id] = (self._clock() + self._ttl_s, record)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def written(self, *done: asyncio.Future[None]) -> None:
        return None

    def look_up(self, call_id: str | None, call_sid: str | None = None) -> CallContext:
        return (self.read(call_id) if call_id else None) or CallContext()

    def read(self, call_id: str) -> CallContext | None:
        entry = self._entries.get(call_id)
        if entry is None:
            return None
        expires, record = entry
        if self._clock() >= expires:
            del self._entries[call_id]
            return None
        return record
