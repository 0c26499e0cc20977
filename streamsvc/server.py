"""The server: listens through a transport (:mod:`streamsvc.transports`), decides every
handshake (:meth:`StreamServer.admit`) and every plain HTTP request on the stream port
(:meth:`StreamServer.answer_http`: probes, metrics, webhooks), tracks the calls in progress
and drains them on shutdown. What one stream connection does is :mod:`streamsvc.core`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import http
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, Protocol

import jwt
import structlog
from websockets.asyncio.server import Server

from .bus import FleetNode
from .config import HEALTH_PATH, METRICS_PATH, READY_PATH, Settings, provider_credentials
from .context.store import MemoryContextStore
from .context.twiml import KEEP_CALL_UP_TWIML
from .live import LiveSession
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, WorkerShare
from .providers.acs_auth import AcsAuthenticator
from .providers.plivo import signature_ok as plivo_signature_ok
from .providers.vonage import jwt_problem as vonage_jwt_problem
from .providers.vonage import token_matches as vonage_token_matches
from .signature import signature_problem
from .transports import websockets_transport
from .web.acs_events import AcsEvents
from .web.front import HttpFront
from .web.webhooks import MAX_BODY_BYTES as MAX_HTTP_BODY_BYTES
from .web.webhooks import HttpRequest, HttpResponse, Webhooks

if TYPE_CHECKING:
    from .core import CallCore

__all__ = ["HEALTH_PATH", "METRICS_PATH", "READY_PATH", "StreamServer"]

logger = structlog.get_logger("streamsvc.server")

# Of a drain's time (drain_timeout_s), what is kept for the end: closing the streams still
# up (CLOSE_GRACE_S each, at once) and letting their handlers finish; at most half of it.
SHUTDOWN_RESERVE_S: Final = 4.0
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
        self.credentials = provider_credentials(settings)  # which providers are checked
        self.contexts = MemoryContextStore()  # calls' context, webhook -> stream (ACS)
        # A fleet sharing Redis (redis_url): set by start().
        self.fleet: FleetNode | None = None
        self.fleet_calls: dict[str, CallCore] = {}  # by stream_sid, while a fleet is set
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
        if s.redis_url is not None:
            self.fleet = FleetNode(s, self.streams)
            await self.fleet.start()
            self.webhooks.fleet = self.acs_events.fleet = self.metrics.bus = self.fleet
        if s.acs_audience and any(route.provider in ("acs", "auto") for route in s.routes):
            self.acs_auth = AcsAuthenticator(s.acs_audience, s.acs_jwks_url)
            await self.acs_auth.start()
        if s.shared_metrics_dir is not None:
            share = self.metrics.share_with_workers(s.shared_metrics_dir)
            self._publisher = asyncio.get_running_loop().create_task(_publish(share))
        if s.effective_transport == "picows":
            from .transports import picows_transport  # only when it is installed

            self._fast_server = await picows_transport.serve(self)
            self.port = self._fast_server.sockets[0].getsockname()[1]
        else:
            self._server = await websockets_transport.serve(self)
            self.port = self._server.sockets[0].getsockname()[1]
        logger.info("server.listening", **self._where(), transport=s.effective_transport,
                    signed=bool(s.auth_tokens))
        self._warn_about_default_twiml()

    def _where(self) -> dict[str, object]:
        """Where the server listens and what it serves (server.listening/stopped fields)."""
        return {"host": self.settings.host, "port": self.port,
                "routes": [route.path for route in self.settings.routes]}

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
              authorization: str | None = None,
              telnyx_token: str | None = None,
              plivo: tuple[str | None, str | None, str] = (None, None, "")
              ) -> HttpResponse | None:
        """The refusal of a stream handshake for ``path`` (without the public prefix)
        carrying ``signature`` (Twilio) or ``authorization`` (ACS's bearer token), logged
        and counted, or None to accept it. Every transport asks this. A handshake with more
        than one signature header is refused."""
        refusal = self._refusal(path, signature, repeated_signature, authorization,
                                telnyx_token, plivo)
        if refusal is not None:
            status, reason = refusal
            self.metrics.handshakes_rejected[reason] += 1
            logger.warning("handshake.rejected", reason=reason, status=int(status), path=path)
            return HttpResponse(status, f"{status.phrase}: {reason}\n".encode())
        return None

    def _refusal(self, path: str, signature: str | None, repeated_signature: bool,
                 authorization: str | None,
                 telnyx_token: str | None = None,
                 plivo: tuple[str | None, str | None, str] = (None, None, ""),
                 ) -> tuple[http.HTTPStatus, str] | None:
        route = self.settings.route_for(path)
        if route is None:
            return http.HTTPStatus.NOT_FOUND, "no_route"
        credentials = (signature, repeated_signature, authorization, telnyx_token, plivo)
        provider: str | None = route.provider
        if provider == "auto":
            provider = self._auto_provider(*credentials)
            # When credentials are configured, an auto route takes none but those: a
            # provider whose check is not configured would admit anything.
            if (provider is not None and self._credentials_configured()
                    and not self._credential_configured(provider)):
                provider = None
        if provider is None:
            return http.HTTPStatus.FORBIDDEN, "missing_token"
        refusal = self._credential_refusal(provider, path, *credentials)
        if refusal is not None:
            return refusal
        if self.draining or self._shutting_down:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "draining"
        if self.active_calls >= self.settings.max_connections:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, "busy"
        return None

    def _credentials_configured(self) -> bool:
        return any(configured for _, configured in self.credentials.values())

    def _credential_configured(self, provider: str) -> bool:
        """Whether streams of ``provider`` are checked for a credential."""
        return self.credentials.get(provider, ("", False))[1]

    def _auto_provider(self, signature: str | None, repeated_signature: bool,
                       authorization: str | None, telnyx_token: str | None,
                       plivo: tuple[str | None, str | None, str]) -> str | None:
        """On a ``provider = "auto"`` route, whose credential the upgrade carries (its
        provider's check applies); "twilio" (no check) when no provider has one configured,
        None when one has and the upgrade carries none (refused)."""
        bearer = _bearer(authorization)
        if signature or repeated_signature:
            return "twilio"
        if telnyx_token:
            return "telnyx"
        if plivo[0] or plivo[1]:
            return "plivo"
        if _basic(authorization):
            return "exotel"
        # ACS signs JWTs (RS256, three dot-separated parts); Vonage an HS256 JWT, or sends
        # the route's custom value (as a bearer token or not); SignalWire a plain token.
        if bearer and self.acs_auth and bearer.count(".") == 2 and (
                _jwt_algorithm(bearer) != "HS256"):
            return "acs"
        if (authorization and self._credential_configured("vonage")
                and self._vonage_problem(authorization) is None):
            return "vonage"
        if bearer:
            return "signalwire"
        return None if self._credentials_configured() else "twilio"

    def _vonage_problem(self, authorization: str | None) -> str | None:
        """Why a Vonage upgrade's ``Authorization`` is refused (None: it is not, or no
        Vonage credential is configured): a JWT signed with ``vonage_signature_secret``
        or the ``vonage_token`` value are accepted."""
        s = self.settings
        if not self._credential_configured("vonage"):
            return None
        if not authorization:
            return "missing_token"
        if s.vonage_signature_secret and vonage_jwt_problem(s.vonage_signature_secret,
                                                            authorization) is None:
            return None
        if s.vonage_token and vonage_token_matches(s.vonage_token, authorization):
            return None
        return "bad_token"

    def _credential_refusal(self, provider: str, path: str, signature: str | None,
                            repeated_signature: bool, authorization: str | None,
                            telnyx_token: str | None,
                            plivo: tuple[str | None, str | None, str],
                            ) -> tuple[http.HTTPStatus, str] | None:
        """Why ``provider``'s credential check refuses this upgrade, or None."""
        forbidden = http.HTTPStatus.FORBIDDEN
        if provider == "acs":
            if self.acs_auth and (problem := self.acs_auth.problem(authorization)):
                return forbidden, problem
        elif provider == "plivo":
            token = self.settings.plivo_auth_token
            if token:
                plivo_signature, nonce, query = plivo
                base = self.settings.public_base("ws")
                url = f"{base}{path}" + (f"?{query}" if query else "")
                if not plivo_signature or not nonce:
                    return forbidden, "missing_signature"
                if not plivo_signature_ok(token, url, plivo_signature, nonce):
                    return forbidden, "bad_signature"
        elif provider == "vonage":
            if problem := self._vonage_problem(authorization):
                return forbidden, problem
        elif provider in ("telnyx", "signalwire", "exotel"):
            if provider == "telnyx":
                expected, given = self.settings.telnyx_stream_token, telnyx_token
            elif provider == "exotel":
                expected, given = self.settings.exotel_basic_auth, _basic(authorization)
            else:
                expected, given = self.settings.signalwire_token, _bearer(authorization)
            if expected and not given:
                return forbidden, "missing_token"
            if expected and not hmac.compare_digest((given or "").encode(),
                                                    expected.encode()):
                return forbidden, "bad_token"
        elif self.settings.auth_tokens and repeated_signature:
            return forbidden, "bad_signature"
        elif self.settings.auth_tokens and (problem := self._signature_problem(signature, path)):
            return forbidden, problem
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



async def _publish(share: WorkerShare) -> None:
    """Publish this worker's metrics for its siblings about once a second."""
    while True:
        try:
            share.publish()
        except OSError as exc:  # the directory went away: the next scrape shows less
            logger.warning("metrics.share_failed", error=str(exc))
        await asyncio.sleep(METRICS_SHARE_INTERVAL_S)


def _basic(authorization: str | None) -> str | None:
    """The ``user:password`` of an ``Authorization: Basic`` header, or None."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8") or None
    except (ValueError, UnicodeDecodeError):
        return None


def _jwt_algorithm(token: str) -> str | None:
    """The ``alg`` a JWT's header names (unverified), or None."""
    try:
        return str(jwt.get_unverified_header(token).get("alg"))
    except jwt.InvalidTokenError:
        return None


def _bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
