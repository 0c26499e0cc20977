"""The asyncio shell: a websockets server moving frames between each socket, its
:class:`~streamsvc.session.Session` and the route's handler chain.

Timers, limits, signals and backpressure live here and only here. One connection is one
stream; its ids are bound into every log line through contextvars.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.http11 import Request, Response

from . import wire
from .acs_auth import AcsAuthenticator
from .acs_events import AcsEvents
from .config import HEALTH_PATH, METRICS_PATH, READY_PATH, Route, Settings
from .context_store import MemoryContextStore
from .exceptions import CLOSE_POLICY_VIOLATION, LocalProtocolError
from .handlers import HandlerChain, RawFrame
from .httpfront import HttpFront, Upgrade
from .live import LiveSession
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, WorkerShare
from .providers import codec_for
from .session import BadFrame, State, StopReason
from .signature import SIGNATURE_HEADER, signature_problem
from .twiml import KEEP_CALL_UP_TWIML
from .webhooks import MAX_BODY_BYTES as MAX_HTTP_BODY_BYTES
from .webhooks import HttpRequest, HttpResponse, Webhooks

__all__ = ["HEALTH_PATH", "METRICS_PATH", "READY_PATH", "StreamServer"]

logger = structlog.get_logger("streamsvc.server")

# Bad frames logged individually per call; the rest are only counted.
BAD_FRAMES_LOGGED: Final = 5
# Frames before `start` kept for handlers that record raw frames (connected, start, a few
# bad ones); later ones are not kept: the start timeout bounds how many can come.
EARLY_FRAMES_KEPT: Final = 16
# RFC 6455 close codes.
CLOSE_GOING_AWAY: Final = 1001
# asyncio's selector transport reads up to 256 KiB per recv(); glibc serves buffers that
# large with mmap/munmap, a syscall pair per read (CPython issue 85451). Twilio's frames are
# ~300 bytes: 16 KiB reads stay on the heap. Measured by bench/server.py.
TRANSPORT_READ_BYTES: Final = 16 * 1024
# Outbound frames queued for one connection (20 ms each: 5 minutes of audio); more means
# the peer is not reading and the sending handler gets LocalProtocolError.
MAX_OUTBOUND_FRAMES: Final = 15_000
# How long a connection the service closes gets (to flush, to answer the close handshake)
# before the TCP connection is dropped.
CLOSE_GRACE_S: Final = 1.0
# Of a drain's time (drain_timeout_s), what is kept for the end: closing the streams still
# up (CLOSE_GRACE_S each, at once) and letting their handlers finish; at most half of it.
SHUTDOWN_RESERVE_S: Final = 4.0
# What is left of it at the very end, for the summaries to be logged.
SHUTDOWN_CLOSE_S: Final = 0.25
# How often a worker of `serve --workers N` publishes its metrics for the others.
METRICS_SHARE_INTERVAL_S: Final = 1.0


class ShellCall(Protocol):
    """What :meth:`StreamServer.stop` needs of a connection a transport shell tracks."""

    finished: asyncio.Future[None]  # resolved once the call's handlers have finished

    def close_for_shutdown(self) -> None: ...


class StreamServer:
    """Serves Media Streams on ``settings.host:settings.port``, with ``/healthz``,
    ``/readyz`` and ``/metrics`` on the same port.

    ``await start()`` binds (``port`` then holds the real port, useful with 0);
    ``await drain(timeout)`` stops taking calls and lets those in progress finish;
    ``await stop()`` closes every stream with 1001 after its handlers got ``on_stop``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int = settings.port
        # Streams in progress, keyed by stream_sid: several streams may belong to one call
        # (a <Start> beside a <Connect>), so a call is found by scanning its call_sid.
        self.streams: dict[str, LiveSession] = {}
        self.metrics = Metrics(lambda: list(self.streams.values()))
        self.webhooks = Webhooks(settings, self.streams)
        self.metrics.stream_status_callbacks = self.webhooks.status_callbacks
        self.metrics.webhooks = self.webhooks.outcomes
        self.draining = False
        self._idle = asyncio.Event()  # set while no call is in progress
        self._idle.set()
        self._server: Server | None = None
        self._fast_server: asyncio.Server | None = None  # transport = "picows"
        self._publisher: asyncio.Task[None] | None = None  # shares metrics with workers
        self.picows_calls: set[ShellCall] = set()  # their connections in progress
        self._shutting_down = False
        self.stop_deadline: float | None = None  # loop time by which a drain must be done
        self.acs_auth: AcsAuthenticator | None = None  # ACS routes with acs_audience set
        self.contexts = MemoryContextStore()  # calls' context, webhook -> stream (ACS)
        self.acs_events = AcsEvents(settings, self.contexts)
        self.metrics.acs_events = self.acs_events.outcomes
        self.metrics.acs_callbacks = self.acs_events.callbacks

    @property
    def active_calls(self) -> int:
        return self.metrics.active_calls

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self) -> None:
        s = self.settings
        if s.acs_audience and any(route.provider == "acs" for route in s.routes):
            self.acs_auth = AcsAuthenticator(s.acs_audience, s.acs_jwks_url)
            await self.acs_auth.start()
        if s.shared_metrics_dir is not None:
            share = self.metrics.share_with_workers(s.shared_metrics_dir)
            self._publisher = asyncio.get_running_loop().create_task(_publish(share))
        if s.transport == "picows":
            from . import fast  # optional: pip install 'streamsvc[fast]'

            self._fast_server = await fast.serve(self)
            self.port = self._fast_server.sockets[0].getsockname()[1]
        else:
            await self._serve_websockets()
        logger.info("server.listening", **self._where(), transport=s.transport,
                    signed=bool(s.auth_tokens))
        self._warn_about_default_twiml()

    def _where(self) -> dict[str, object]:
        """Where the server listens and what it serves (server.listening/stopped fields)."""
        return {"host": self.settings.host, "port": self.port,
                "routes": [route.path for route in self.settings.routes]}

    async def _serve_websockets(self) -> None:
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            compression=None,  # Twilio does not negotiate it; it would cost CPU and memory
            max_size=s.max_message_bytes,
            max_queue=64,  # frames buffered per connection before TCP backpressure
            ping_interval=s.ping_interval_s or None,
            ping_timeout=s.ping_timeout_s,
            close_timeout=CLOSE_GRACE_S,  # a peer that never answers the close is dropped
            open_timeout=s.handshake_timeout_s,
            server_header=None,
            reuse_port=s.reuse_port or None,
            create_connection=_http_aware_connection(self),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _warn_about_default_twiml(self) -> None:
        kept_up = [route.path for route in self.settings.routes
                   if not route.bidirectional and not route.after_twiml.strip()]
        if kept_up:
            logger.warning("twiml.default_after", routes=kept_up, after=KEEP_CALL_UP_TWIML,
                           message="the voice webhook follows <Start><Stream> on these routes "
                           "with a long <Pause> so the call stays up; set [routes.twiml] "
                           "after to what the call should do meanwhile (e.g. <Dial>)")

    async def drain(self, timeout_s: float, *, abort: asyncio.Event | None = None) -> None:
        """Stop taking calls (``/readyz`` and new handshakes answer 503, ``/healthz`` stays
        200), wait until the calls in progress end or ``abort`` is set, then :meth:`stop`;
        all within ``timeout_s``: the last :data:`SHUTDOWN_RESERVE_S` (at most half of it)
        is kept for closing what is left and finishing its handlers."""
        self.draining = True
        logger.info("server.draining", active_calls=self.active_calls, timeout_s=timeout_s)
        reserve = min(timeout_s / 2, SHUTDOWN_RESERVE_S)
        waits = [asyncio.ensure_future(self._idle.wait())]
        if abort is not None:
            waits.append(asyncio.ensure_future(abort.wait()))
        _done, pending = await asyncio.wait(waits, timeout=timeout_s - reserve,
                                            return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()
        await self.stop(within_s=reserve)

    async def stop(self, *, within_s: float | None = None) -> None:
        """Close every stream (1001, reason ``shutdown``) and wait for their handlers; with
        ``within_s``, handlers get what is left of it, and whatever is still running then
        is left behind (``server.stop_timeout``)."""
        loop = asyncio.get_running_loop()
        if within_s is not None:
            self.stop_deadline = loop.time() + within_s
        try:
            if within_s is None:
                await self._stop()
            else:
                try:
                    await asyncio.wait_for(self._stop(), within_s)
                except TimeoutError:
                    logger.warning("server.stop_timeout", within_s=within_s,
                                   active_calls=self.active_calls)
        finally:
            if self.acs_auth is not None:
                self.acs_auth.stop()
            if self._publisher is not None:
                self._publisher.cancel()
                self._publisher = None
                if self.metrics.share is not None:
                    self.metrics.share.publish()  # the final counts, no call active

    async def _stop(self) -> None:
        if self._fast_server is not None:
            self._shutting_down = True
            self._fast_server.close()
            calls = list(self.picows_calls)
            for call in calls:
                call.close_for_shutdown()
            await asyncio.gather(*(call.finished for call in calls))
            self._fast_server = None
            logger.info("server.stopped", **self._where())
            return
        if self._server is None:
            return
        self._shutting_down = True
        self._server.close()
        await self._server.wait_closed()
        logger.info("server.stopped", **self._where())

    def streams_for_call(self, call_sid: str) -> list[LiveSession]:
        """The sessions in progress that belong to ``call_sid``."""
        return [session for session in self.streams.values() if session.call_sid == call_sid]

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, then stop."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def admit(self, path: str, signature: str | None, *, repeated_signature: bool = False,
              authorization: str | None = None) -> HttpResponse | None:
        """The refusal of a stream handshake for ``path`` (without the public prefix)
        carrying ``signature`` (Twilio) or ``authorization`` (ACS's bearer token), logged
        and counted, or None to accept it. Every transport asks this. A handshake with more
        than one signature header is refused."""
        refusal = self._refusal(path, signature, repeated_signature, authorization)
        if refusal is not None:
            status, reason = refusal
            self.metrics.handshakes_rejected[reason] += 1
            logger.warning("handshake.rejected", reason=reason, status=int(status), path=path)
            return HttpResponse(status, f"{status.phrase}: {reason}\n".encode())
        return None

    def _refusal(self, path: str, signature: str | None, repeated_signature: bool,
                 authorization: str | None) -> tuple[http.HTTPStatus, str] | None:
        route = self.settings.route_for(path)
        forbidden = http.HTTPStatus.FORBIDDEN
        if route is None:
            return http.HTTPStatus.NOT_FOUND, "no_route"
        if route.provider == "acs":
            if self.acs_auth and (problem := self.acs_auth.problem(authorization)):
                return forbidden, problem
        elif self.settings.auth_tokens and repeated_signature:
            return forbidden, "bad_signature"
        elif self.settings.auth_tokens and (problem := self._signature_problem(signature, path)):
            return forbidden, problem
        if self.draining or self._shutting_down:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "draining"
        if self.active_calls >= self.settings.max_connections:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "busy"
        return None

    def probe(self, path: str) -> HttpResponse | None:
        """Answers for the probes and the metrics, or None for other paths."""
        if path == HEALTH_PATH:
            return HttpResponse(http.HTTPStatus.OK, b"ok\n")
        if path == READY_PATH:
            if self.draining or self._shutting_down:
                return HttpResponse(http.HTTPStatus.SERVICE_UNAVAILABLE, b"draining\n")
            return HttpResponse(http.HTTPStatus.OK, b"ready\n")
        if path == METRICS_PATH:
            return HttpResponse(http.HTTPStatus.OK, self.metrics.render(),
                                METRICS_CONTENT_TYPE)
        return None

    def http_front(self) -> HttpFront:
        """A reader for the first request of a new connection (every transport uses one)."""
        return HttpFront(self.answer_http, self.refuse_http, max_body_bytes=MAX_HTTP_BODY_BYTES)

    def answer_http(self, request: HttpRequest) -> HttpResponse:
        """Answer a request that is not a WebSocket handshake: probes and metrics (logged
        at debug level), the webhooks, else 426 on a stream route and 404 elsewhere."""
        local = self.settings.local_path(request.path)
        if local != request.path:  # a proxy forwarded the public prefix: drop it
            target = local + request.target[len(request.path):]
            request = dataclasses.replace(request, target=target)
        answer = self.probe(local)
        if answer is not None:
            if request.method not in ("GET", "HEAD"):
                return self.refuse_http(http.HTTPStatus.METHOD_NOT_ALLOWED, "method", request)
            logger.debug("http.probe", method=request.method, path=local,
                         status=int(answer.status))
            return dataclasses.replace(answer, body=b"") if request.method == "HEAD" else answer
        if local in self.acs_events.paths:
            return self.acs_events.respond(request)
        if self.webhooks.handles(local):
            try:
                return self.webhooks.respond(request)
            except Exception:  # a bug of ours: answer 500, keep serving
                logger.exception("webhook.failed", path=local)
                self.webhooks.outcomes["error"] += 1
                return HttpResponse(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n")
        if self.settings.route_for(local) is not None:
            return self.refuse_http(http.HTTPStatus.UPGRADE_REQUIRED, "not_websocket", request)
        return self.refuse_http(http.HTTPStatus.NOT_FOUND, "not_found", request)

    def refuse_http(self, status: http.HTTPStatus, reason: str,
                    request: HttpRequest) -> HttpResponse:
        """Refuse a plain HTTP request: logged as ``http.rejected`` (``webhook.rejected``
        on the webhook paths) with the paths the service does answer, and counted."""
        path = self.settings.local_path(request.path)
        if self.webhooks.handles(path):
            return self.webhooks.refuse(status, reason, request)
        self.metrics.http_rejected[reason] += 1
        logger.warning("http.rejected", reason=reason, status=int(status),
                       method=request.method, path=request.path,
                       known_paths=self.known_paths())
        response = HttpResponse(status, f"{status.phrase}: {reason}\n".encode())
        if status is http.HTTPStatus.UPGRADE_REQUIRED:
            response = dataclasses.replace(response, headers=(("Upgrade", "websocket"),))
        return response

    def close_unread(self, transport: asyncio.WriteTransport) -> None:
        """Drop a connection whose peer does not read what it asks for (counted, logged)."""
        self.metrics.unread_closes += 1
        logger.warning("connection.unread", limit_bytes=self.settings.max_unread_bytes)
        transport.abort()

    def known_paths(self) -> list[str]:
        """Every path this service answers, for the log line of a request it does not."""
        settings = self.settings
        webhook = settings.webhook_path
        return [*(route.path for route in settings.routes), webhook, f"{webhook}/<route>",
                settings.status_callback_path, settings.acs_events_path,
                settings.acs_callback_path, HEALTH_PATH, READY_PATH, METRICS_PATH]

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = self.settings.local_path(urlsplit(request.path).path)
        signatures = request.headers.get_all(SIGNATURE_HEADER)
        answer = self.admit(path, signatures[0] if len(signatures) == 1 else None,
                            repeated_signature=len(signatures) > 1,
                            authorization=request.headers.get("Authorization"))
        if answer is None:
            return None
        response = connection.respond(answer.status, "")
        response.body = answer.body
        del response.headers["Content-Type"], response.headers["Content-Length"]
        response.headers["Content-Type"] = answer.content_type
        response.headers["Content-Length"] = str(len(answer.body))
        return response

    def _signature_problem(self, signature: str | None, path: str) -> str | None:
        """Why the handshake's X-Twilio-Signature is not acceptable, or None if it is. The
        URL is the configured public origin plus the request path (shared/protocol.md)."""
        base = self.settings.public_base("ws")
        assert base is not None  # load_settings requires public_url with a token
        return signature_problem(signature, base + path, self.settings.auth_tokens)

    def call_began(self) -> None:
        self.metrics.active_calls += 1
        self._idle.clear()

    def call_ended(self) -> None:
        self.metrics.active_calls -= 1
        if self.metrics.active_calls == 0:
            self._idle.set()

    async def _handle(self, connection: ServerConnection) -> None:
        _limit_read_size(connection)
        path = urlsplit(connection.request.path).path if connection.request else "/"
        path = self.settings.local_path(path)
        route = self.settings.route_for(path)
        assert route is not None  # _process_request answered 404 otherwise
        self.call_began()
        try:
            with structlog.contextvars.bound_contextvars(path=path):
                await _Call(self, connection, route).run()
        finally:
            self.call_ended()


async def _publish(share: WorkerShare) -> None:
    """Publish this worker's metrics for its siblings about once a second."""
    while True:
        try:
            share.publish()
        except OSError as exc:  # the directory went away: the next scrape shows less
            logger.warning("metrics.share_failed", error=str(exc))
        await asyncio.sleep(METRICS_SHARE_INTERVAL_S)


def _http_aware_connection(server: StreamServer) -> type[ServerConnection]:
    """A websockets connection class whose first request goes through the server's
    :class:`~streamsvc.httpfront.HttpFront`: a WebSocket handshake reaches websockets
    unchanged, any other request is answered by the server's HTTP side (websockets' own
    parser takes no request body and answers no method but GET)."""

    class HttpAwareConnection(ServerConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._front: HttpFront | None = server.http_front()

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
                super().data_received(decision.data)
                return
            self.transport.write(decision.response.serialize())
            self.transport.close()

    return HttpAwareConnection


def _limit_read_size(connection: ServerConnection) -> None:
    # Only the selector transport has this knob (uvloop manages its own buffers).
    transport = connection.transport
    if hasattr(transport, "max_size"):
        transport.max_size = TRANSPORT_READ_BYTES


class CallCore:
    """What one stream connection does whatever carries its frames: feeds them to the
    session and the route's handler chain, logs the start and the summary. A transport
    shell calls :meth:`receive` per message, sends what :meth:`take_outbound` yields (after
    :meth:`wake`), and awaits :meth:`finish` once when the connection ends."""

    def __init__(self, server: StreamServer, route: Route,
                 headers: Mapping[str, str]) -> None:
        self.server = server
        self.route = route
        settings = server.settings
        self.session = LiveSession(
            wake=self._flush,
            path=route.path,
            bidirectional=route.bidirectional,
            parameter_budget_bytes=settings.parameter_budget_bytes,
            codec=codec_for(route.provider, headers, unmixed=route.unmixed,
                            context=server.contexts.get),
        )
        self.chain = HandlerChain(route.handlers, observe=server.metrics.observe_latency)
        self.connected_at = time.monotonic()
        self.early_frames: list[RawFrame] = []
        self.frames_received = 0  # read by the idle watchdog
        self.outbound_dropped = 0  # frames for a peer that stopped reading
        self.idle_closed = False
        self._idle_seen = -1  # frames_received at the watchdog's last look
        self._quiet_since = self.connected_at
        # The budget report of the webhook that started this call's stream, if it was ours.
        self.context_budget: dict[str, object] | None = None

    def outbound_full(self) -> bool:
        """True when the peer has stopped reading: frames to send are refused."""
        raise NotImplementedError

    @property
    def idle_check_s(self) -> float:
        """How often a shell's watchdog should call :meth:`went_idle`."""
        return min(self.server.settings.idle_timeout_s / 4, 1.0)

    def went_idle(self) -> bool:
        """True (and logged) once no frame has come for ``idle_timeout_s``: a half-open
        peer, since Twilio sends a frame every 20 ms. Compares a counter; costs nothing per
        frame."""
        now = time.monotonic()
        if self.frames_received != self._idle_seen:
            self._idle_seen, self._quiet_since = self.frames_received, now
            return False
        limit = self.server.settings.idle_timeout_s
        if now - self._quiet_since < limit:
            return False
        self.idle_closed = True
        logger.warning("stream.idle_timeout", timeout_s=limit)
        return True

    def log_start_timeout(self) -> None:
        logger.warning("stream.start_timeout", timeout_s=self.server.settings.start_timeout_s,
                       bad_frames=self.session.bad_frames)

    def log_closed_before_start(self, reason: StopReason) -> None:
        logger.info("stream.closed_before_start", reason=reason,
                    bad_frames=self.session.bad_frames)

    def send_now(self, frame: bytes) -> None:
        """Hand one outbound text frame to the transport without blocking."""
        raise NotImplementedError

    def _now_ms(self) -> float:
        return (time.monotonic() - self.connected_at) * 1000

    def receive(self, frame: bytes) -> None:
        session = self.session
        if session.state is State.AWAITING_START:
            if len(self.early_frames) < EARLY_FRAMES_KEPT:
                self.early_frames.append(RawFrame(self._now_ms(), frame))
        elif self.chain.wants_raw_frames:
            self.chain.on_raw_frame(RawFrame(self._now_ms(), frame))
        session.receive_message(frame)
        for event in session.events_received():
            if type(event) is wire.Media:
                self.chain.on_media(event)
            elif isinstance(event, BadFrame):
                self._log_bad_frame(event)
            elif isinstance(event, wire.Start):
                self._started()
            else:
                if isinstance(event, wire.Mark):
                    session.mark_echoed(event.name)
                self.chain.dispatch(event)
        if session.bidirectional:
            self._flush_quietly()

    def _started(self) -> None:
        session = self.session
        structlog.contextvars.bind_contextvars(
            call_sid=session.call_sid, stream_sid=session.stream_sid
        )
        media_format = session.media_format
        logger.info(
            "stream.started",
            call_sid=session.call_sid,
            stream_sid=session.stream_sid,
            account_sid=session.account_sid,
            tracks=list(session.tracks),
            media_format={
                "encoding": media_format.encoding,
                "sample_rate": media_format.sample_rate,
                "channels": media_format.channels,
            } if media_format else None,
            custom_parameters=dict(session.custom_parameters),
            path=session.path,
            bidirectional=session.bidirectional,
            protocol_version=session.protocol_version,
            provider=session.codec.provider,
            correlation_id=session.codec.correlation_id,
        )
        if session.parameters_over_budget:
            logger.warning(
                "stream.parameters_over_budget",
                custom_parameters_bytes=session.custom_parameters_bytes,
                budget_bytes=session.parameter_budget_bytes,
            )
        assert session.stream_sid is not None  # set by start
        if session.stream_sid in self.server.streams:
            logger.warning("stream.duplicate_stream_sid")
        self.server.streams[session.stream_sid] = session
        self.server.metrics.calls_started += 1
        self.context_budget = self.server.webhooks.pop_context_report(session.call_sid)
        if session.bidirectional:
            self.start_writer()
        self.chain.start(session)
        if self.chain.wants_raw_frames:
            for raw in self.early_frames:
                self.chain.on_raw_frame(raw)
        self.early_frames = []

    def _log_bad_frame(self, bad: BadFrame) -> None:
        if bad.count <= BAD_FRAMES_LOGGED:
            logger.warning("stream.bad_frame", reason=bad.reason, excerpt=bad.excerpt,
                           count=bad.count, last_logged=bad.count == BAD_FRAMES_LOGGED)

    def _flush(self) -> None:
        """Hand what the session queued to the transport; raises LocalProtocolError (in the
        handler that sent) when the peer has stopped reading: the frames are dropped."""
        if self.outbound_full():
            self._drop_outbound()
            raise LocalProtocolError("the peer is not reading: too many frames wait to be sent")
        self._send_queued()

    def _flush_quietly(self) -> None:
        """As :meth:`_flush`, from the receive loop: a peer that stopped reading costs the
        frames queued for it (counted), never the call."""
        if self.outbound_full():
            self._drop_outbound()
        else:
            self._send_queued()

    def _drop_outbound(self) -> None:
        dropped = len(self.session.data_to_send())
        if dropped and not self.outbound_dropped:
            logger.warning("stream.peer_not_reading", dropped_frames=dropped)
        self.outbound_dropped += dropped
        self.server.metrics.outbound_dropped += dropped

    def _send_queued(self) -> None:
        for frame in self.session.data_to_send():
            self.send_now(frame)
            if self.chain.wants_raw_frames:
                self.chain.on_raw_frame(RawFrame(self._now_ms(), frame, sent=True))

    async def finish(self, reason: StopReason) -> None:
        if reason == "closed" and self.session.codec.stops_on_close:
            reason = "stop"  # the provider has no stop message: its close is the stop
        stream_sid = self.session.stream_sid
        if stream_sid is not None and self.server.streams.get(stream_sid) is self.session:
            del self.server.streams[stream_sid]
        self.session.abandon_marks()  # no echo can come any more
        await asyncio.sleep(0)  # their callbacks run before the handlers report
        closed = dataclasses.replace(self.session.close(reason),
                                     context_budget=self.context_budget)
        summary = await self.chain.finish(self.session, closed, self._handler_grace_s())
        self.server.metrics.call_ended(summary, self.chain.errors(), self.chain.drops())
        logger.info(
            "stream.stopped",
            call_sid=self.session.call_sid,
            stream_sid=self.session.stream_sid,
            **summary.log_fields(),
            handler_errors=self.chain.errors(),
            handler_drops=self.chain.drops(),
            outbound_dropped=self.outbound_dropped,
            custom_parameters_bytes=self.session.custom_parameters_bytes,
            wall_ms=round((time.monotonic() - self.connected_at) * 1000),
        )

    def _handler_grace_s(self) -> float:
        """How long handlers may take to finish: their stop timeout, cut to what is left
        of a drain's time."""
        grace = self.server.settings.handler_stop_timeout_s
        deadline = self.server.stop_deadline
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time() - SHUTDOWN_CLOSE_S
            grace = max(0.0, min(grace, left))
        return grace

    def start_writer(self) -> None:
        """Called when a bidirectional stream starts (before any handler can send)."""


class _Call(CallCore):
    """One websockets connection: receive loop, outbound writer task, timers."""

    def __init__(self, server: StreamServer, connection: ServerConnection, route: Route) -> None:
        headers = connection.request.headers if connection.request else {}
        super().__init__(server, route, {name.lower(): value for name, value in headers.items()})
        self.connection = connection
        self.outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None

    def outbound_full(self) -> bool:
        return self.outgoing.qsize() >= MAX_OUTBOUND_FRAMES

    def send_now(self, frame: bytes) -> None:
        self.outgoing.put_nowait(frame)

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
            if self.writer is not None:
                self.writer.cancel()

    async def _await_start(self) -> bool:
        """Receive until ``start``; False if the stream ended or timed out first."""
        limit = self.server.settings.start_timeout_s
        try:
            async with asyncio.timeout(limit):
                while self.session.state is State.AWAITING_START:
                    self.receive(await self.connection.recv(decode=False))
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
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle())
        try:
            while session.state is State.STREAMING:
                frame = await connection.recv(decode=False)
                self.frames_received += 1
                receive(frame)
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
        if self.server._shutting_down:
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
                await self.connection.send(frame, text=True)
        except ConnectionClosed:
            pass

