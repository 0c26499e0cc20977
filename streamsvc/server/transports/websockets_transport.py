"""The fallback transport: websockets' asyncio server, one task per connection
(``transport = "websockets"``, or ``auto`` where picows has no wheels).

Each connection's first request goes through the server's HTTP front
(:mod:`streamsvc.server.front`): a WebSocket handshake reaches websockets unchanged, any
other request is answered by the server's HTTP side. A stream connection is a
:class:`_Call`: a receive loop, an outbound writer task and the idle watchdog around the
shared :class:`~streamsvc.server.call.CallCore`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as serve_websockets
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from streamsvc.exceptions import CLOSE_POLICY_VIOLATION
from streamsvc.server.admission import Admitted
from streamsvc.server.call import CLOSE_GRACE_S, CallCore
from streamsvc.server.front import HttpFront, Upgrade, screened, write_answer
from streamsvc.server.host import TransportHost
from streamsvc.session import State, StopReason
from streamsvc.wire import BinaryFrame

__all__ = ["serve"]

logger = structlog.get_logger("streamsvc.server")

# RFC 6455 close codes.
CLOSE_GOING_AWAY: Final = 1001
# asyncio's selector transport reads up to 256 KiB per recv(); glibc serves buffers that
# large with mmap/munmap, a syscall pair per read (CPython issue 85451). Twilio's frames are
# ~300 bytes: 16 KiB reads stay on the heap. Measured by bench/server.py.
TRANSPORT_READ_BYTES: Final = 16 * 1024
# Outbound frames queued for one connection (20 ms each: 5 minutes of audio); more means
# the peer is not reading and the sending handler gets LocalProtocolError.
MAX_OUTBOUND_FRAMES: Final = 15_000


async def serve(server: TransportHost) -> Server:
    """Listen with websockets on the server's host and port; return the listening server."""
    s = server.settings
    return await serve_websockets(
        functools.partial(_handle, server),
        s.host,
        s.port,
        process_request=functools.partial(_process_request, server),
        select_subprotocol=_select_subprotocol,
        compression=None,  # Twilio does not negotiate it; it would cost CPU and memory
        max_size=s.max_message_bytes,
        max_queue=64,  # frames buffered per connection before TCP backpressure
        ping_interval=s.ping_interval_s or None,
        ping_timeout=s.ping_timeout_s,
        close_timeout=CLOSE_GRACE_S,  # a peer that never answers the close is dropped
        open_timeout=s.handshake_timeout_s,
        server_header=None,
        reuse_port=s.reuse_port or None,
        create_connection=_http_aware_connection(server),
    )


def _process_request(server: TransportHost, connection: ServerConnection,
                     request: Request) -> Response | None:
    target = urlsplit(request.path)
    path = server.settings.local_path(target.path)
    peer = connection.remote_address
    answer = server.admit(path, target.query, request.headers.raw_items(),
                          str(peer[0]) if peer else None)
    if isinstance(answer, Admitted):
        connection.admitted = answer  # type: ignore[attr-defined]  # for _handle
        return None
    response = connection.respond(answer.status, "")
    response.body = answer.body
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = answer.content_type
    response.headers["Content-Length"] = str(len(answer.body))
    return response


def _select_subprotocol(connection: ServerConnection,
                        offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """The subprotocol the admitted route's provider speaks, if the client offered it."""
    admitted: Admitted | None = getattr(connection, "admitted", None)
    chosen = admitted.subprotocol() if admitted is not None else None
    return Subprotocol(chosen) if chosen is not None and chosen in offered else None


async def _handle(server: TransportHost, connection: ServerConnection) -> None:
    _limit_read_size(connection)
    admitted: Admitted = connection.admitted  # type: ignore[attr-defined]
    server.call_began()
    call = _Call(server, connection, admitted)
    try:
        with structlog.contextvars.bound_contextvars(path=admitted.route.path):
            await call.run()
    finally:
        call.closed()
        server.call_ended()
        # websockets' connection objects refer to each other: whatever of ours they hold
        # would wait for a full collection.
        del connection.admitted  # type: ignore[attr-defined]


def _http_aware_connection(server: TransportHost) -> type[ServerConnection]:
    """A websockets connection class whose first request goes through the server's
    :class:`~streamsvc.server.front.HttpFront`: a WebSocket handshake reaches websockets
    unchanged, any other request is answered by the server's HTTP side (websockets' own
    parser takes no request body and answers no method but GET)."""

    class HttpAwareConnection(ServerConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._front: HttpFront | None = server.http_front()
            # Per message received, whether it began as a binary frame: recv(decode=False)
            # returns text and binary alike, and recv(decode=None) would fail the whole
            # connection on a text frame that is not UTF-8, where a bad frame is counted.
            self.binary_messages: collections.deque[bool] = collections.deque()

        def process_event(self, event: Any) -> None:
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                    self.binary_messages.append(opcode is Opcode.BINARY)
            super().process_event(event)

        def data_received(self, data: bytes) -> None:
            front = self._front
            if front is None:
                super().data_received(data)
                # websockets answers pings itself: a peer that floods pings and reads no
                # pong grows this buffer without bound unless it is closed.
                if self.transport.get_write_buffer_size() > server.settings.max_unread_bytes:
                    server.close_unread(self.transport)
                return
            decision = front.receive_data(data)
            if decision is None:
                return
            self._front = None
            if isinstance(decision, Upgrade):
                upgrade = decision
                screened(self.transport, server.screen(upgrade.target, upgrade.headers),
                         lambda: super(HttpAwareConnection, self).data_received(upgrade.data))
                return
            write_answer(self.transport, decision.response)

    return HttpAwareConnection


def _limit_read_size(connection: ServerConnection) -> None:
    # Only the selector transport has this knob (uvloop manages its own buffers).
    transport = connection.transport
    if hasattr(transport, "max_size"):
        transport.max_size = TRANSPORT_READ_BYTES


class _Call(CallCore):
    """One websockets connection: receive loop, outbound writer task, timers."""

    server: TransportHost

    __slots__ = ("closer", "connection", "kinds", "outgoing", "writer")

    def __init__(self, server: TransportHost, connection: ServerConnection,
                 admitted: Admitted) -> None:
        super().__init__(server, admitted)
        self.connection = connection
        # Filled by the connection class of _http_aware_connection (one per message).
        self.kinds: collections.deque[bool] = getattr(connection, "binary_messages",
                                                      collections.deque())
        self.outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Task[None] | None = None  # hand_over's close

    def outbound_full(self) -> bool:
        return self.outgoing.qsize() >= MAX_OUTBOUND_FRAMES

    def send_now(self, frame: bytes) -> None:
        if self.writer is None:  # a protocol answer on a route that does not talk back
            self.start_writer()
        self.outgoing.put_nowait(frame)

    def hand_over(self) -> None:
        self.moved = True
        self.closer = asyncio.get_running_loop().create_task(
            self.connection.close(CLOSE_GOING_AWAY, "moving to another instance"))

    def end_stream(self, reason: str, why: StopReason = "handed_off") -> None:
        self.closer = asyncio.get_running_loop().create_task(self._close_after_writes(reason))

    async def _close_after_writes(self, reason: str) -> None:
        await self._drain()
        await self.connection.close(1000, reason)

    async def _drain(self) -> None:
        """Let the writer send what is queued (the protocol's last answers: Genesys's
        ``closed``), for at most :data:`CLOSE_GRACE_S`."""
        writer = self.writer
        if writer is None or writer.done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self.outgoing.join()

    def close_for_policy(self, reason: str) -> None:
        self.closer = asyncio.get_running_loop().create_task(
            self.connection.close(CLOSE_POLICY_VIOLATION, reason))

    def start_writer(self) -> None:
        self.writer = asyncio.get_running_loop().create_task(self._write())

    async def run(self) -> None:
        reason: StopReason = "error"
        try:
            if await self._await_start():
                reason = await self._stream()
        finally:
            if self.session.stream_sid is not None:  # a stream started: summarize it
                await self.finish(reason)
            await self._drain()
            if self.writer is not None:
                self.writer.cancel()
                # Its CancelledError's traceback refers back to this call: let go of it.
                self.writer = None

    async def _await_start(self) -> bool:
        """Receive until ``start``; False if the stream ended or timed out first."""
        limit = self.server.settings.start_timeout_s
        try:
            async with asyncio.timeout(limit):
                kinds = self.kinds
                while self.session.state is State.AWAITING_START:
                    frame = await self.connection.recv(decode=False)
                    self.receive(frame, kinds.popleft() if kinds else False)
                    if reason := self.no_start_coming():
                        await self.connection.close(CLOSE_POLICY_VIOLATION, reason)
                        return False
        except TimeoutError:
            self.log_start_timeout()
            await self.connection.close(CLOSE_POLICY_VIOLATION, "no start message in time")
            return False
        except ConnectionClosed as exc:
            self.log_closed_before_start(self._closed_reason(exc))
            return False
        return self.session.state is State.STREAMING

    async def _stream(self) -> StopReason:
        receive, connection, session = self.receive, self.connection, self.session
        kinds = self.kinds
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle())
        try:
            while session.state is State.STREAMING:
                frame = await connection.recv(decode=False)
                self.frames_received += 1
                receive(frame, kinds.popleft() if kinds else False)
        except ConnectionClosed as exc:
            return self._closed_reason(exc)
        finally:
            watchdog.cancel()
        return "stop"

    async def _watch_idle(self) -> None:
        """Close a stream that has sent nothing for ``idle_timeout_s``."""
        while True:
            await asyncio.sleep(self.idle_check_s)
            if self.went_idle():
                break
        try:  # a silent peer may never answer the close handshake
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self.connection.close(CLOSE_POLICY_VIOLATION, "no frame in time")
        except TimeoutError:
            self.connection.transport.abort()

    def _closed_reason(self, exc: ConnectionClosed) -> StopReason:
        if self.server.shutting_down:
            return "shutdown"
        if self.idle_closed:
            return "aborted"  # the peer went silent: it is gone
        if isinstance(exc, ConnectionClosedOK):
            return "closed"
        if exc.sent is not None and exc.rcvd is None and exc.sent.code != CLOSE_GOING_AWAY:
            return "error"  # we closed it: oversize message, protocol violation
        return "aborted"

    async def _write(self) -> None:
        # Own task: a slow peer never blocks the receive loop.
        try:
            while True:
                frame = await self.outgoing.get()
                try:
                    await self.connection.send(frame, text=type(frame) is not BinaryFrame)
                finally:
                    self.outgoing.task_done()
        except ConnectionClosed:
            pass
