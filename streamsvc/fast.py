"""The optional fast transport: the same service on picows (``transport = "picows"``).

picows parses WebSocket frames in C from a preallocated read buffer and calls back per
frame, with no task per connection; the service's own work is unchanged: every frame goes
through :class:`~streamsvc.server.CallCore` (session, handler chain, summary), and every
handshake through :meth:`StreamServer.admit` and :meth:`StreamServer.probe`, exactly as with
websockets. What this module adds is the shell: timers instead of awaiting tasks, close
codes, message reassembly, backpressure on outbound audio.

One difference: picows takes only bodiless ``GET`` requests, so the voice webhook answers
``GET`` here (set the number's voice URL method to GET; a form ``POST`` needs the default
transport) and the TwiML it serves asks for status callbacks by ``GET``.
"""

from __future__ import annotations

import asyncio
import contextvars
import http
import logging
from typing import Final
from urllib.parse import urlsplit

import structlog
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from .config import Route
from .exceptions import CLOSE_POLICY_VIOLATION
from .server import CLOSE_GRACE_S, CallCore, StreamServer
from .session import State, StopReason
from .signature import SIGNATURE_HEADER
from .webhooks import HttpRequest, HttpResponse

__all__ = ["serve"]

logger = structlog.get_logger("streamsvc.server")

# Bytes of outbound frames waiting in the socket's buffer (about 5 minutes of 20 ms audio
# frames) beyond which the peer counts as not reading.
MAX_OUTBOUND_BYTES: Final = 15_000 * 300
READ_BUFFER_BYTES: Final = 2048
_TEXT, _BINARY, _CONTINUATION, _CLOSE = (WSMsgType.TEXT, WSMsgType.BINARY,
                                         WSMsgType.CONTINUATION, WSMsgType.CLOSE)


async def serve(server: StreamServer) -> asyncio.Server:
    """Listen on the server's host and port with picows; return the listening server."""
    settings = server.settings
    pinging = settings.ping_interval_s > 0
    return await ws_create_server(
        lambda request: _route(server, request),
        settings.host,
        settings.port,
        websocket_handshake_timeout=settings.start_timeout_s,
        logger_name=logging.getLogger("streamsvc.picows"),
        enable_auto_ping=pinging,
        auto_ping_idle_timeout=settings.ping_interval_s if pinging else 20,
        auto_ping_reply_timeout=(min(settings.ping_timeout_s, settings.ping_interval_s)
                                 if pinging else 20),
        max_frame_size=settings.max_message_bytes,
        # Twilio's frames are ~350 bytes: a small first buffer (it grows for a larger
        # message) keeps memory per call down; picows' default is 16 KiB.
        read_buffer_init_size=READ_BUFFER_BYTES,
        reuse_port=settings.reuse_port or None,
    )


def _route(server: StreamServer,
           request: WSUpgradeRequest) -> WSListener | WSUpgradeResponseWithListener:
    target = request.path.decode("latin-1")
    path = urlsplit(target).path
    answer = server.probe(path)
    if answer is None and server.webhooks.handles(path):
        headers = {name.lower(): value for name, value in request.headers.items()}
        webhook = HttpRequest(request.method.decode("latin-1"), target, headers)
        if webhook.method != "GET" or headers.get("content-length", "0") != "0":
            # picows reads no request body: a form POST needs the websockets transport.
            answer = server.webhooks.refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "method",
                                            webhook)
        else:
            answer = server.webhooks.respond(webhook)
    if answer is None:
        answer = server.admit(path, request.headers.get(SIGNATURE_HEADER))
        if answer is None:
            route = server.settings.route_for(path)
            assert route is not None  # admit() refuses unknown paths
            return _Listener(server, route)
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

    def __init__(self, server: StreamServer, route: Route) -> None:
        self.server = server
        self.route = route
        self.call: _PicowsCall | None = None
        self.context = contextvars.copy_context()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.context.run(self._connected, transport)

    def _connected(self, transport: WSTransport) -> None:
        structlog.contextvars.bind_contextvars(path=self.route.path)
        self.call = _PicowsCall(self.server, self.route, transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        call = self.call
        assert call is not None
        if frame.fin and frame.msg_type is _TEXT and not call.fragments:
            # The hot path: one whole text frame, one message.
            call.frames_received += 1
            self.context.run(call.message, frame.get_payload_as_bytes())
        else:
            self.context.run(call.frame, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.call is not None:
            self.context.run(self.call.disconnected)


class _PicowsCall(CallCore):
    """The shell around :class:`~streamsvc.server.CallCore` for one picows connection."""

    def __init__(self, server: StreamServer, route: Route, transport: WSTransport) -> None:
        super().__init__(server, route)
        self.transport = transport
        self.fragments: list[bytes] = []
        self.fragment_bytes = 0
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
        self.transport.send(_TEXT, frame)

    # -- frames -----------------------------------------------------------------------

    def message(self, payload: bytes) -> None:
        if self.closing_reason is not None:
            return  # closing: what still comes is not part of the stream
        self.receive(payload)
        if self.session.state is State.STOPPED:
            self._close(WSCloseCode.OK, "", "stop")

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
        if kind not in (_TEXT, _BINARY, _CONTINUATION):
            return  # PONG
        if kind is not _CONTINUATION and self.fragments:
            self._close(WSCloseCode.PROTOCOL_ERROR, "expected a continuation frame", "error")
            return
        if kind is _CONTINUATION and not self.fragments:
            self._close(WSCloseCode.PROTOCOL_ERROR, "unexpected continuation frame", "error")
            return
        self.fragment_bytes += frame.payload_size
        if self.fragment_bytes > self.server.settings.max_message_bytes:
            self._close(WSCloseCode.MESSAGE_TOO_BIG, "message too big", "error")
            return
        self.fragments.append(frame.get_payload_as_bytes())
        if frame.fin:
            payload = b"".join(self.fragments)
            self.fragments, self.fragment_bytes = [], 0
            self.frames_received += 1
            self.message(payload)

    # -- ending -----------------------------------------------------------------------

    def _close(self, code: WSCloseCode, reason: str, why: StopReason) -> None:
        if self.closing_reason is None:
            self.closing_reason = why
        self.transport.send_close(code, reason.encode())
        self.transport.disconnect()
        # A graceful close waits for the socket's buffer to drain; a peer that no longer
        # reads would hold it (and a shutdown) forever: drop it after a grace period.
        self.timers.append(asyncio.get_running_loop().call_later(
            CLOSE_GRACE_S, self.transport.disconnect, False))

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
