"""The narrow interface a stream connection needs from the server that hosts it.

:class:`~streamsvc.server.call.CallCore` and the transport shells
(:mod:`streamsvc.server.transports`) are written against these protocols, not against
:class:`~streamsvc.server.stream_server.StreamServer`, so the server can import its
transports without the transports importing the server back.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Iterable
from typing import Protocol

from streamsvc.config import Settings
from streamsvc.context.store import ContextStore
from streamsvc.fleet.node import FleetNode
from streamsvc.live import LiveSession
from streamsvc.server.admission import Admitted
from streamsvc.server.front import HttpFront
from streamsvc.server.metrics import Metrics
from streamsvc.web.webhooks import HttpResponse

__all__ = ["CallHost", "HostedCall", "PendingCall", "ShellCall", "TransportHost"]


class HostedCall(Protocol):
    """What the host keeps of a stream in progress (in a fleet: to hand it over)."""

    @property
    def session(self) -> LiveSession: ...

    def hand_over(self) -> None:
        """Close the stream (1001) for another instance to resume the call."""


class PendingCall(Protocol):
    """A connection still awaiting its start, as the host may need to end it."""

    def evict(self, reason: str) -> None:
        """Close it (1008 with ``reason``): the host needs its place for a newer one."""


class ShellCall(Protocol):
    """What the host's shutdown needs of a connection a transport shell tracks."""

    finished: asyncio.Future[None]  # resolved once the call's handlers have finished

    def close_for_shutdown(self) -> None: ...


class CallHost(Protocol):
    """What one call needs of its host: the settings, the calls in progress, the metrics,
    the context store every way in writes, the fleet (or None)."""

    settings: Settings
    metrics: Metrics
    contexts: ContextStore
    fleet: FleetNode | None
    stop_deadline: float | None  # loop time by which a drain must be done
    streams: dict[str, LiveSession]  # by stream_sid
    # Connections that have not sent their start yet, oldest first, with when they came.
    pending: dict[PendingCall, float]
    streams_per_address: collections.Counter[str]  # connections in progress by address
    fleet_calls: dict[str, HostedCall]  # by stream_sid, while a fleet is set

    @property
    def shutting_down(self) -> bool: ...


class TransportHost(CallHost, Protocol):
    """What a transport shell needs besides: the handshake decision, the HTTP front, the
    count of calls in progress and the shutdown's state."""

    picows_calls: set[ShellCall]

    def admit(self, path: str, query: str, headers: Iterable[tuple[str, str]],
              address: str | None = None) -> Admitted | HttpResponse:
        """The stream handshake admitted, or the HTTP answer refusing it."""

    def http_front(self) -> HttpFront: ...

    def screen(self, target: str, headers: Iterable[tuple[str, str]]
               ) -> Awaitable[HttpResponse | None] | None:
        """What an upgrade must wait for before the handshake (a fleet's nonce check):
        None when nothing, else the refusal or None once known."""
        ...

    def call_began(self) -> None: ...

    def call_ended(self) -> None: ...

    def close_unread(self, transport: asyncio.WriteTransport) -> None: ...
