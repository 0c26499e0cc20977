"""The default transport: the same service on picows (``transport = "auto"``, as it is by
default where picows is installed, a regular dependency; or ``"picows"``).

picows parses WebSocket frames in C from a preallocated read buffer and calls back per
frame, with no task per connection; the service's own work is unchanged: every frame goes
through :class:`~streamsvc.server.call.CallCore` (session, handler chain, summary), and
every handshake through the host's ``admit`` and its HTTP front, exactly as with
websockets. What this module adds is the shell: timers instead of awaiting tasks, close
codes, message reassembly, backpressure on outbound audio.

Requests that are not WebSocket handshakes (probes, metrics, the voice webhook's form
``POST``, status callbacks, anything unknown) never reach picows: the server's HTTP front
reads and answers them, exactly as on the websockets transport.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any, Final, cast
from urllib.parse import urlsplit

import structlog
from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from streamsvc.exceptions import CLOSE_POLICY_VIOLATION
from streamsvc.server.admission import Admitted
from streamsvc.server.call import CLOSE_GRACE_S, CallCore
from streamsvc.server.front import Upgrade, screened, write_answer
from streamsvc.server.host import TransportHost
from streamsvc.server.metrics import Metrics
from streamsvc.session import State, StopReason
from streamsvc.web.webhooks import HttpResponse
from streamsvc.wire import BinaryFrame

__all__ = ["PicowsLog", "serve"]

logger = structlog.get_logger("streamsvc.server")

# Bytes of outbound frames waiting in the socket's buffer (about 5 minutes of 20 ms audio
# frames) beyond which the peer counts as not reading.
MAX_OUTBOUND_BYTES: Final = 15_000 * 300
READ_BUFFER_BYTES: Final = 2048
_TEXT, _BINARY, _CONTINUATION, _CLOSE, _PING = (
    WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE, WSMsgType.PING)
# RFC 6455 5.5: a control frame carries at most 125 bytes.
MAX_CONTROL_PAYLOAD: Final = 125
# picows' lines about a peer's fault (by how they begin), and what they are counted as.
PEER_FAULTS: Final = (("WS parser error", "bad_frame"),
                      ("Protocol writing pause", "not_reading"),
                      ("Protocol writing resume", "not_reading"))
PEER_FAULT_LOG_INTERVAL_S: Final = 1.0


class PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' own lines. A peer's faults (a malformed or oversized frame, a peer that
    stops reading and resumes) are the peer's, not ours: counted
    (``streamsvc_peer_faults_total``) and logged as ``connection.peer_fault`` warnings, at
    most one a second with how many were not (``not_logged``), so that a client cannot
    fill the log. picows' other lines pass as they are."""

    def __init__(self, logger: logging.Logger, metrics: Metrics) -> None:
        super().__init__(logger, {})
        self.metrics = metrics
        self.last_line = -PEER_FAULT_LOG_INTERVAL_S
        self.not_logged = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        kind = next((kind for prefix, kind in PEER_FAULTS if isinstance(msg, str)
                     and msg.startswith(prefix)), None)
        if kind is None:
            super().log(level, msg, *args, **kwargs)
            return
        self.metrics.peer_faults[kind] += 1
        now = time.monotonic()
        if now - self.last_line < PEER_FAULT_LOG_INTERVAL_S:
            self.not_logged += 1
            return
        self.last_line = now
        try:
            detail = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            detail = str(msg)
        logger.warning("connection.peer_fault", kind=kind, detail=detail[:300],
                       not_logged=self.not_logged)
        self.not_logged = 0


async def serve(server: TransportHost) -> asyncio.Server:
    """Listen on the server's host and port; return the listening server. Each connection
    starts with the server's :class:`~streamsvc.server.front.HttpFront`: a WebSocket handshake
    is handed to a picows protocol, any other request is answered by the HTTP side."""
    settings = server.settings
    pinging = settings.ping_interval_s > 0
    picows_logger = PicowsLog(logging.getLogger("streamsvc.picows"), server.metrics)

    def websocket_protocol(address: str | None) -> WSProtocol:
        # ws_create_server's own factory, with the same arguments (picows 2.x).
        return WSProtocol(
            None, None, False,  # host and port, path: a server's
            lambda request: _route(server, request, address),
            picows_logger,
            True,  # disconnect on an exception in a callback
            settings.start_timeout_s,  # handshake timeout
            pinging,
            settings.ping_interval_s if pinging else 20,
            min(settings.ping_timeout_s, settings.ping_interval_s) if pinging else 20,
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # pings are answered by _PicowsCall, which bounds what waits unread
            settings.max_message_bytes,  # the largest frame
            None,  # extra response headers
            # Twilio's frames are ~350 bytes: a small first buffer (it grows for a larger
            # message) keeps memory per call down; picows' default is 16 KiB.
            READ_BUFFER_BYTES,
        )

    return await asyncio.get_running_loop().create_server(
        lambda: _FrontProtocol(server, websocket_protocol),
        settings.host, settings.port, reuse_port=settings.reuse_port or None,
    )


class _FrontProtocol(asyncio.Protocol):
    """The first request of one connection, read by the server's HTTP front; on a WebSocket
    handshake the connection switches to a picows protocol, fed what was read so far."""

    def __init__(self, server: TransportHost,
                 websocket_protocol: Callable[[str | None], WSProtocol]) -> None:
        self.server = server
        self.front = server.http_front()
        self.websocket_protocol = websocket_protocol
        self.head_timeout_s = server.settings.handshake_timeout_s
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(self.head_timeout_s,
                                                           self.transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.front.decided:
            return
        decision = self.front.receive_data(data)
        if decision is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        if isinstance(decision, Upgrade):
            upgrade = decision

            def proceed() -> None:
                peer = transport.get_extra_info("peername")
                protocol = self.websocket_protocol(str(peer[0]) if peer else None)
                transport.set_protocol(protocol)
                protocol.connection_made(transport)
                _feed(protocol, upgrade.data)

            screened(transport, self.server.screen(upgrade.target, upgrade.headers), proceed)
            return
        write_answer(transport, decision.response)

    def eof_received(self) -> bool:
        return False  # the peer is done sending before its request was whole: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand bytes already read to a buffered protocol as if they were read now."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        protocol.buffer_updated(count)
        view = view[count:]


def _route(server: TransportHost, request: WSUpgradeRequest,
           address: str | None) -> WSListener | WSUpgradeResponseWithListener:
    """Every request that reaches picows is a WebSocket handshake (the front answered the
    rest): admit it, or refuse it with the server's answer."""
    target = urlsplit(request.path.decode("latin-1"))
    path = server.settings.local_path(target.path)
    answer = server.admit(path, target.query, request.headers.items(), address)
    if isinstance(answer, Admitted):
        subprotocol = answer.subprotocol()
        if subprotocol is None:
            return _Listener(server, answer)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(
            {"Sec-WebSocket-Protocol": subprotocol}), _Listener(server, answer))
    return WSUpgradeResponseWithListener(_response(answer), None)


def _response(answer: HttpResponse) -> WSUpgradeResponse:
    headers = {"Content-Type": answer.content_type}
    if answer.status < 400:  # 200, or 204 for a status callback
        response = WSUpgradeResponse.create_ok_response(answer.body or None, headers)
        response.status = answer.status
    else:
        response = WSUpgradeResponse.create_error_response(answer.status, answer.body or None,
                                                           headers)
    return response  # type: ignore[no-any-return]


class _Listener(WSListener):
    """One stream connection: picows calls back per frame; :class:`_PicowsCall` does the
    work inside the connection's own context (its ids bound into every log line)."""

    def __init__(self, server: TransportHost, admitted: Admitted) -> None:
        self.server = server
        self.admitted = admitted
        self.call: _PicowsCall | None = None
        self.context = contextvars.copy_context()
        # picows flags a frame over its size limit but may still hand it over: checked here.
        self.max_message_bytes = server.settings.max_message_bytes

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.context.run(self._connected, transport)

    def _connected(self, transport: WSTransport) -> None:
        structlog.contextvars.bind_contextvars(path=self.admitted.route.path)
        self.call = _PicowsCall(self.server, self.admitted, transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        call = self.call
        assert call is not None
        if (frame.fin and frame.msg_type is _TEXT and not call.fragments
                and frame.payload_size <= self.max_message_bytes):
            # The hot path: one whole text frame, one message.
            call.frames_received += 1
            self.context.run(call.message, frame.get_payload_as_bytes())
        elif (frame.fin and frame.msg_type is _BINARY and not call.fragments
                and frame.payload_size <= self.max_message_bytes):
            # Vonage's audio (a bad frame from any other provider).
            call.frames_received += 1
            self.context.run(call.message, frame.get_payload_as_bytes(), True)
        else:
            self.context.run(call.frame, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        # picows calls nothing more: the call (which refers to the transport, which refers
        # to this listener) is let go, so that it is freed once it has finished.
        call, self.call = self.call, None
        if call is not None:
            self.context.run(call.disconnected)


class _PicowsCall(CallCore):
    """The shell around :class:`~streamsvc.server.CallCore` for one picows connection."""

    server: TransportHost

    __slots__ = (
        "closing_reason",
        "finished",
        "fragment_bytes",
        "fragments",
        "fragments_binary",
        "timed_out_before_start",
        "timers",
        "transport",
    )

    def __init__(self, server: TransportHost, admitted: Admitted,
                 transport: WSTransport) -> None:
        super().__init__(server, admitted)
        self.transport = transport
        self.fragments: list[bytes] = []
        self.fragment_bytes = 0
        self.fragments_binary = False  # the fragmented message began as a binary frame
        self.closing_reason: StopReason | None = None
        self.timed_out_before_start = False
        loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = loop.create_future()
        server.call_began()
        server.picows_calls.add(self)
        settings = server.settings
        self.timers = [loop.call_later(settings.start_timeout_s, self._start_timeout),
                       loop.call_later(self.idle_check_s, self._watch_idle)]

    def outbound_full(self) -> bool:
        buffered = self.transport.underlying_transport.get_write_buffer_size()
        return bool(buffered >= MAX_OUTBOUND_BYTES)

    def send_now(self, frame: bytes) -> None:
        self.transport.send(_BINARY if type(frame) is BinaryFrame else _TEXT, frame)

    # -- frames -----------------------------------------------------------------------

    def message(self, payload: bytes, binary: bool = False) -> None:
        if self.closing_reason is not None:
            return  # closing: what still comes is not part of the stream
        self.receive(payload, binary)
        if self.session.state is State.STOPPED:
            self._close(WSCloseCode.OK, "", "stop")
        elif self.session.state is State.AWAITING_START and (reason := self.no_start_coming()):
            self.timed_out_before_start = True  # said by no_start_coming
            self._close(WSCloseCode(CLOSE_POLICY_VIOLATION), reason, "error",
                        await_answer=True)

    def frame(self, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _CLOSE:
            code = frame.get_close_code()
            if self.transport.is_close_frame_sent:  # the answer to our close (or picows')
                self.closing_reason = self.closing_reason or "error"
            else:
                self.closing_reason = self.closing_reason or (
                    "closed" if code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY,
                                         WSCloseCode.NO_INFO) else "aborted")
                self.transport.send_close(code if code is not WSCloseCode.NO_INFO
                                          else WSCloseCode.OK)
            self.transport.disconnect()
            return
        if kind is _PING:
            self._pong(frame)
            return
        if kind not in (_TEXT, _BINARY, _CONTINUATION):
            return  # PONG
        if kind is not _CONTINUATION and self.fragments:
            self._close(WSCloseCode.PROTOCOL_ERROR, "expected a continuation frame", "error")
            return
        if kind is _CONTINUATION and not self.fragments:
            self._close(WSCloseCode.PROTOCOL_ERROR, "unexpected continuation frame", "error")
            return
        if kind is not _CONTINUATION:
            self.fragments_binary = kind is _BINARY
        self.fragment_bytes += frame.payload_size
        if self.fragment_bytes > self.server.settings.max_message_bytes:
            self.fragments.clear()
            self._close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "error")
            return
        self.fragments.append(frame.get_payload_as_bytes())
        if frame.fin:
            payload = b"".join(self.fragments)
            self.fragments, self.fragment_bytes = [], 0
            self.frames_received += 1
            self.message(payload, self.fragments_binary)

    def _pong(self, ping: WSFrame) -> None:
        if self.closing_reason is not None:
            return  # closing: the pings still queued behind this one are not answered
        if ping.payload_size > MAX_CONTROL_PAYLOAD:
            self._close(WSCloseCode.PROTOCOL_ERROR, "control frame too long", "error")
        elif (self.transport.underlying_transport.get_write_buffer_size()
              > self.server.settings.max_unread_bytes):
            self.closing_reason = self.closing_reason or "aborted"
            self.server.close_unread(self.transport.underlying_transport)
        else:
            self.transport.send_pong(ping.get_payload_as_bytes())

    # -- ending -----------------------------------------------------------------------

    def _close(self, code: WSCloseCode, reason: str, why: StopReason, *,
               await_answer: bool = False) -> None:
        """Close with ``code``; ``await_answer``: keep reading (and ignoring) until the
        peer answers the close, so that what it is still sending cannot make the kernel
        reset the connection before the peer reads why (RFC 6455 7.1.1)."""
        if self.closing_reason is None:
            self.closing_reason = why
        self.transport.send_close(code, reason.encode())
        if not await_answer:
            self.transport.disconnect()
        # A graceful close waits for the socket's buffer to drain; a peer that no longer
        # reads would hold it (and a shutdown) forever: drop it after a grace period.
        self.timers.append(asyncio.get_running_loop().call_later(
            CLOSE_GRACE_S, self.transport.disconnect, False))

    def hand_over(self) -> None:
        self.moved = True
        self._close(WSCloseCode.GOING_AWAY, "moving to another instance", "shutdown")

    def end_stream(self, reason: str, why: StopReason = "handed_off") -> None:
        self._close(WSCloseCode.OK, reason, why, await_answer=True)

    def close_for_policy(self, reason: str) -> None:
        self.timed_out_before_start = True  # said by evict()
        self._close(WSCloseCode(CLOSE_POLICY_VIOLATION), reason, "error")

    def close_for_shutdown(self) -> None:
        self._close(WSCloseCode.GOING_AWAY, "server shutting down", "shutdown")

    def disconnected(self) -> None:
        for timer in self.timers:
            timer.cancel()
        session = self.session
        if session.state is State.AWAITING_START and not self.timed_out_before_start:
            self.log_closed_before_start(self._reason())
        if session.stream_sid is None:
            self._done()
            return
        task = asyncio.get_running_loop().create_task(self.finish(self._reason()))
        task.add_done_callback(lambda _: self._done())

    def _reason(self) -> StopReason:
        if self.server.shutting_down:
            return "shutdown"
        if self.session.state is State.STOPPED:
            return "stop"
        if self.closing_reason is not None:
            return self.closing_reason
        handshake = self.transport.close_handshake
        if handshake is not None and handshake.sent is not None and handshake.recv is None:
            return "error"  # picows closed it: oversize frame, protocol violation
        return "aborted"

    def _done(self) -> None:
        self.timers.clear()
        self.closed()
        self.server.picows_calls.discard(self)
        self.server.call_ended()
        if not self.finished.done():
            self.finished.set_result(None)

    # -- timers -----------------------------------------------------------------------

    def _start_timeout(self) -> None:
        if self.session.state is State.AWAITING_START and self.closing_reason is None:
            self.timed_out_before_start = True
            self.log_start_timeout()
            self._close(WSCloseCode(CLOSE_POLICY_VIOLATION), "no start message in time",
                        "error")

    def _watch_idle(self) -> None:
        if self.closing_reason is None and self.went_idle():
            self._close(WSCloseCode(CLOSE_POLICY_VIOLATION), "no frame in time", "aborted")
            return
        self.timers[1] = asyncio.get_running_loop().call_later(self.idle_check_s,
                                                               self._watch_idle)
