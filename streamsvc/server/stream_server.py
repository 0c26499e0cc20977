"""The server: listens through a transport (:mod:`streamsvc.server.transports`), decides every
handshake (:meth:`StreamServer.admit`) and every plain HTTP request on the stream port
(:meth:`StreamServer.answer_http`: probes, metrics, webhooks), tracks the calls in progress
and drains them on shutdown. What one stream connection does is :mod:`streamsvc.server.call`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import time
from collections.abc import Awaitable, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from websockets.asyncio.server import Server

from streamsvc.config import HEALTH_PATH, METRICS_PATH, READY_PATH, Settings
from streamsvc.context.store import ContextStore, MemoryContextStore
from streamsvc.context.twiml import KEEP_CALL_UP_TWIML
from streamsvc.fleet.node import FleetNode
from streamsvc.fleet.store import RedisContextStore
from streamsvc.live import LiveSession
from streamsvc.providers.acs_auth import AcsAuthenticator
from streamsvc.providers.credentials import NONCE_TTL_S, NonceMemory
from streamsvc.providers.genesys_auth import nonce_of as genesys_nonce_of
from streamsvc.providers.plivo import NONCE_HEADER as PLIVO_NONCE_HEADER
from streamsvc.routes import DEFAULT_ROUTES
from streamsvc.server.admission import Admitted, Refused, credentials_of, decide, route_auth
from streamsvc.server.front import HttpFront
from streamsvc.server.host import HostedCall, PendingCall, ShellCall
from streamsvc.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from streamsvc.server.metrics import Metrics, WorkerShare
from streamsvc.server.transports import websockets_transport
from streamsvc.web.acs_events import AcsEvents
from streamsvc.web.context_api import ContextApi
from streamsvc.web.webhooks import MAX_BODY_BYTES as MAX_HTTP_BODY_BYTES
from streamsvc.web.webhooks import HttpRequest, HttpResponse, Webhooks
from streamsvc.wire import Upgrade

__all__ = ["HEALTH_PATH", "METRICS_PATH", "READY_PATH", "StreamServer"]

logger = structlog.get_logger("streamsvc.server")

# Of a drain's time (drain_timeout_s), what is kept for the end: closing the streams still
# up (CLOSE_GRACE_S each, at once) and letting their handlers finish; at most half of it.
SHUTDOWN_RESERVE_S: Final = 4.0
# How long a connection awaiting its start keeps its place when max_pending_starts are
# taken and another comes: past this, the oldest is closed to make room.
PENDING_GRACE_S: Final = 1.0
# How often a worker of `serve --workers N` publishes its metrics for the others.
METRICS_SHARE_INTERVAL_S: Final = 1.0


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
        # Calls' context, from every way in (webhooks, ACS's IncomingCall, Vonage's answer
        # URL) to the stream: in this process until start() finds a fleet.
        self.contexts: ContextStore = MemoryContextStore(ttl_s=settings.context_ttl_s)
        self.webhooks = Webhooks(settings, self.streams, self.contexts)
        self.metrics.stream_status_callbacks = self.webhooks.status_callbacks
        self.metrics.webhooks = self.webhooks.outcomes
        self.draining = False
        # Connections admitted that have not sent their start yet, and streams in progress
        # per client address (kept by each connection's CallCore).
        self.pending: dict[PendingCall, float] = {}
        self.streams_per_address: collections.Counter[str] = collections.Counter()
        self._idle = asyncio.Event()  # set while no call is in progress
        self._idle.set()
        self._server: Server | None = None
        self._fast_server: asyncio.Server | None = None  # transport = "picows"
        self._publisher: asyncio.Task[None] | None = None  # shares metrics with workers
        self._loop_lag: asyncio.Task[None] | None = None  # samples the event loop's lag
        self.calls_begun = 0  # connections taken since start
        self.picows_calls: set[ShellCall] = set()  # their connections in progress
        self._shutting_down = False
        self.stop_deadline: float | None = None  # loop time by which a drain must be done
        self.acs_auth: AcsAuthenticator | None = None  # ACS routes with acs_audience set
        # Plivo's nonces, remembered so a captured signature opens one stream only.
        # Calls carried by a host that brings its own socket (streamsvc.asgi).
        self.hosted_calls: set[Any] = set()
        self.nonces = NonceMemory()
        self.credentials = credentials_of(settings, None, self.nonces)  # again with ACS's
        # A fleet sharing Redis (redis_url): set by start().
        self.fleet: FleetNode | None = None
        self.fleet_calls: dict[str, HostedCall] = {}  # by stream_sid, while a fleet is set
        self.acs_events = AcsEvents(settings, self.contexts)
        self.context_api = ContextApi(settings, self.contexts, self.streams.values,
                                      self.refuse_http)
        self.metrics.acs_events = self.acs_events.outcomes
        self.metrics.acs_callbacks = self.acs_events.callbacks

    @property
    def active_calls(self) -> int:
        return self.metrics.active_calls

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self, *, listen: bool = True) -> None:
        """Start: the fleet, ACS's signing keys, the shared metrics, then (``listen``)
        the transport on the host and port. ``listen=False``: everything but the socket,
        for a host that brings its own (:mod:`streamsvc.asgi`)."""
        s = self.settings
        if s.redis_url is not None:
            self.fleet = FleetNode(s, self.streams)
            await self.fleet.start()
            self.webhooks.fleet = self.acs_events.fleet = self.metrics.bus = self.fleet
            # One store behind one interface: the fleet's, so any instance reads it.
            self.contexts = self.webhooks.store = self.acs_events.store = (
                self.context_api.store) = RedisContextStore(self.fleet)
        if s.acs_audience and any(route.provider in ("acs", "auto") for route in s.routes):
            self.acs_auth = AcsAuthenticator(s.acs_audience, s.acs_jwks_url)
            await self.acs_auth.start()
            self.credentials = credentials_of(s, self.acs_auth, self.nonces)
        if s.shared_metrics_dir is not None:
            share = self.metrics.share_with_workers(s.shared_metrics_dir)
            self._publisher = asyncio.get_running_loop().create_task(_publish(share))
        self._loop_lag = asyncio.get_running_loop().create_task(self.metrics.loop_lag.run())
        auth = {route.path: route_auth(route, s) for route in s.routes}
        signed = any(check is not None for check in auth.values())
        if not listen:
            logger.info("server.mounted", routes=[route.path for route in s.routes],
                        signed=signed, auth=auth)
            self._warn_about_default_twiml()
            return
        if s.effective_transport == "picows":
            from streamsvc.server.transports import picows_transport  # only when it is installed

            self._fast_server = await picows_transport.serve(self)
            self.port = self._fast_server.sockets[0].getsockname()[1]
        else:
            self._server = await websockets_transport.serve(self)
            self.port = self._server.sockets[0].getsockname()[1]
        logger.info("server.listening", **self._where(), transport=s.effective_transport,
                    signed=signed, auth=auth)
        self._warn_about_default_twiml()

    def _where(self) -> dict[str, object]:
        """Where the server listens and what it serves (server.listening/stopped fields)."""
        return {"host": self.settings.host, "port": self.port,
                "routes": [route.path for route in self.settings.routes]}

    def _warn_about_default_twiml(self) -> None:
        # The embedded default routes mean their <Pause>: only a configured route is told.
        kept_up = [route.path for route in self.settings.routes
                   if not route.bidirectional and not route.after_twiml.strip()
                   and route not in DEFAULT_ROUTES]
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
        if self.fleet is not None:
            await self._hand_over()
        reserve = min(timeout_s / 2, SHUTDOWN_RESERVE_S)
        waits = [asyncio.ensure_future(self._idle.wait())]
        if abort is not None:
            waits.append(asyncio.ensure_future(abort.wait()))
        _done, pending = await asyncio.wait(waits, timeout=timeout_s - reserve,
                                            return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()
        await self.stop(within_s=reserve)

    async def _hand_over(self) -> None:
        """In a fleet, bidirectional calls move instead of waiting for the drain to cut
        them: each is marked resumable in Redis, then its stream is closed (1001); Twilio
        requests the <Connect action> URL, and whichever healthy instance gets it answers
        a fresh <Connect><Stream> for the same call."""
        assert self.fleet is not None
        moving = [call for call in self.fleet_calls.values()
                  if call.session.bidirectional and call.session.call_sid]
        if not moving:
            return
        for call in moving:
            assert call.session.call_sid is not None
            assert call.session.stream_sid is not None
            self.fleet.mark_resumable(call.session.call_sid, call.session.stream_sid)
        await self.fleet.flush(within_s=1.0)  # the marks are in Redis before Twilio asks
        logger.info("server.handing_over", calls=len(moving))
        for call in moving:
            call.hand_over()

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
            if self.fleet is not None:
                await self.fleet.stop()
            if self.acs_auth is not None:
                self.acs_auth.stop()
            if self._loop_lag is not None:
                self._loop_lag.cancel()
                self._loop_lag = None
            if self._publisher is not None:
                self._publisher.cancel()
                self._publisher = None
                if self.metrics.share is not None:
                    self.metrics.share.publish()  # the final counts, no call active

    async def _stop(self) -> None:
        hosted = list(self.hosted_calls)
        if hosted:  # calls a host of ours carries (ASGI): closed, then summarized
            self._shutting_down = True
            for call in hosted:
                call.close_for_shutdown()
            await asyncio.gather(*(call.finished for call in hosted))
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

    def screen(self, target: str, headers: Iterable[tuple[str, str]]
               ) -> Awaitable[HttpResponse | None] | None:
        """What an upgrade waits for before its handshake, or None (the usual case): in a
        fleet, a Plivo upgrade whose signature holds asks Redis whether another instance
        saw its nonce (``streamsvc:nonce:plivo:<sha256>``, within ``redis_timeout_ms``;
        Genesys's signature nonce likewise, under ``streamsvc:nonce:genesys:``),
        so that a captured signature opens one stream in the whole fleet."""
        fleet = self.fleet
        if fleet is None:
            return None
        split = urlsplit(target)
        path = self.settings.local_path(split.path)
        upgrade = Upgrade.of(path, split.query, headers)
        nonce = upgrade.get(PLIVO_NONCE_HEADER) or genesys_nonce_of(upgrade)
        route = self.settings.route_for(path)
        if not nonce or route is None:
            return None
        decision = decide(route, upgrade, dataclasses.replace(self.credentials, nonces=None))
        if not isinstance(decision, Admitted) or decision.provider.name not in ("plivo",
                                                                                 "genesys"):
            return None  # not a signature with a nonce that holds: admission says why
        return self._first_in_fleet(fleet, decision, nonce)

    async def _first_in_fleet(self, fleet: FleetNode, admitted: Admitted,
                              nonce: str) -> HttpResponse | None:
        if await fleet.first_use(admitted.provider.name, nonce, NONCE_TTL_S):
            return None
        return self._refusal(Refused(http.HTTPStatus.FORBIDDEN, "replayed_signature",
                                     admitted.provider.name, admitted.provider.credential_env),
                             admitted.upgrade.path)

    def admit(self, path: str, query: str, headers: Iterable[tuple[str, str]],
              address: str | None = None) -> Admitted | HttpResponse:
        """Decide a stream handshake for ``path`` (without the public prefix): the route's
        provider's credential check on its headers (:mod:`streamsvc.server.admission`),
        then room for the call. A refusal is logged, counted and returned as the HTTP
        answer; every transport asks this."""
        upgrade = Upgrade.of(path, query, headers)
        route = self.settings.route_for(path)
        decision: Admitted | Refused
        if route is None:
            decision = Refused(http.HTTPStatus.NOT_FOUND, "no_route")
        else:
            decision = decide(route, upgrade, self.credentials)
        if isinstance(decision, Admitted):
            decision = self._room_for(decision, address)
            if isinstance(decision, Admitted):
                return decision
        return self._refusal(decision, path)

    def _refusal(self, decision: Refused, path: str) -> HttpResponse:
        """A handshake refused: logged (``handshake.rejected``), counted, answered."""
        status, reason = decision.status, decision.reason
        self.metrics.handshakes_rejected[reason] += 1
        fields: dict[str, object] = {}
        if decision.provider is not None:
            fields = {"provider": decision.provider, "credential": decision.credential}
        logger.warning("handshake.rejected", reason=reason, status=int(status), path=path,
                       **fields)
        return HttpResponse(status, f"{status.phrase}: {reason}\n".encode())

    def _room_for(self, admitted: Admitted, address: str | None) -> Admitted | Refused:
        """``admitted``, with the client's address, when there is room for one more stream:
        not draining, under ``max_connections``, under ``max_pending_starts`` connections
        still awaiting their start (so those can never take every slot), and under
        ``max_streams_per_address`` for the address when that is set."""
        s = self.settings
        unavailable = http.HTTPStatus.SERVICE_UNAVAILABLE
        if self.draining or self._shutting_down:
            return Refused(unavailable, "draining")
        if self.active_calls >= s.max_connections:
            return Refused(unavailable, "busy")
        if len(self.pending) >= s.max_pending_starts and not self._evict_oldest_pending():
            return Refused(unavailable, "too_many_pending_starts")
        if (s.max_streams_per_address and address is not None
                and self.streams_per_address[address] >= s.max_streams_per_address):
            return Refused(http.HTTPStatus.TOO_MANY_REQUESTS, "address_limit")
        return dataclasses.replace(admitted, address=address)

    def _evict_oldest_pending(self) -> bool:
        """Make room among the connections awaiting their start: the oldest goes if it has
        waited :data:`PENDING_GRACE_S` (a provider sends its start within milliseconds: a
        connection that has not is the likeliest not to be a call). False when none has."""
        oldest = next(iter(self.pending.items()), None)
        if oldest is None or time.monotonic() - oldest[1] < PENDING_GRACE_S:
            return False
        call, _ = oldest
        del self.pending[call]
        self.metrics.pending_evicted += 1
        call.evict("no start message: its place went to a newer connection")
        return True

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

    def answer_http(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
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
        if self.context_api.handles(local):
            return self.context_api.respond(request)
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
        context = ["/calls/<call id>/context"] if settings.context_api_token else []
        return [*(route.path for route in settings.routes), webhook, f"{webhook}/<route>",
                settings.status_callback_path, settings.acs_events_path,
                settings.acs_callback_path, *context, HEALTH_PATH, READY_PATH, METRICS_PATH]

    def call_began(self) -> None:
        self.calls_begun += 1
        self.metrics.active_calls += 1
        self._idle.clear()

    def call_ended(self) -> None:
        self.metrics.active_calls -= 1
        if self.metrics.active_calls == 0:
            self._idle.set()



async def _publish(share: WorkerShare) -> None:
    """Publish this worker's metrics for its siblings about once a second."""
    while True:
        try:
            share.publish()
        except OSError as exc:  # the directory went away: the next scrape shows less
            logger.warning("metrics.share_failed", error=str(exc))
        await asyncio.sleep(METRICS_SHARE_INTERVAL_S)
