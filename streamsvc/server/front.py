"""The first request on every connection, read with h11 before any WebSocket code sees it.

Sans-I/O, like the rest of the core: bytes in through :meth:`HttpFront.receive_data`, one
decision out once there is enough to decide:

* :class:`Upgrade`: a WebSocket handshake (``GET`` with ``Upgrade: websocket``); the shell
  hands every byte read so far to the transport's WebSocket protocol, which answers it;
* :class:`Answer`: any other request, read whole (body included, up to a limit) and
  answered by the server's HTTP side (probes, metrics, webhooks, 404, 405, 413, 400); the
  shell writes the response and closes the connection.

So every HTTP request on the stream port gets a status line, whichever transport carries
the streams, and the WebSocket transport only ever sees upgrade requests.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import h11
import structlog

from streamsvc.web.webhooks import HttpRequest, HttpResponse

logger = structlog.get_logger("streamsvc.web.front")

__all__ = ["Answer", "HttpFront", "Upgrade", "screened", "write_answer"]

# Longest request head accepted (request line and headers); Twilio's are under 2 KiB.
MAX_HEAD_BYTES: Final = 16 * 1024
# Longest request target, and most header fields, accepted (nginx's defaults: 8 KiB lines;
# a provider's webhook sends about 20 fields).
MAX_TARGET_BYTES: Final = 8 * 1024
MAX_HEADER_FIELDS: Final = 100


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A WebSocket handshake: ``data`` is everything read from the connection so far;
    ``target`` and ``headers`` (as they came) its request's."""

    data: bytes
    target: str = "/"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Answer:
    """A plain HTTP request, answered: write ``response``, then close."""

    response: HttpResponse | Awaitable[HttpResponse]  # awaitable: answered when ready


Responder = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
# Answers that wait for something (a fleet's Redis, bounded in time), until written.
_LATER: set[asyncio.Task[None]] = set()


def write_answer(transport: asyncio.Transport,
                 response: HttpResponse | Awaitable[HttpResponse]) -> None:
    """Write ``response`` on ``transport`` and close it; an awaitable one once it is
    ready (a failure there answers 500, logged)."""
    if isinstance(response, HttpResponse):
        transport.write(response.serialize())
        transport.close()
        return
    task = asyncio.ensure_future(_write_later(transport, response))
    _LATER.add(task)
    task.add_done_callback(_LATER.discard)


def screened(transport: asyncio.Transport,
             screening: Awaitable[HttpResponse | None] | None,
             proceed: Callable[[], None]) -> None:
    """Go on with an upgrade (``proceed``) once ``screening`` (the server's
    :meth:`~streamsvc.server.stream_server.StreamServer.screen`) finds nothing against it, or
    answer what it found and close; reading waits meanwhile."""
    if screening is None:
        proceed()
        return
    transport.pause_reading()
    task = asyncio.ensure_future(_after_screening(transport, screening, proceed))
    _LATER.add(task)
    task.add_done_callback(_LATER.discard)


async def _after_screening(transport: asyncio.Transport,
                           screening: Awaitable[HttpResponse | None],
                           proceed: Callable[[], None]) -> None:
    refusal = await screening
    if transport.is_closing():
        return
    if refusal is not None:
        transport.write(refusal.serialize())
        transport.close()
        return
    proceed()
    transport.resume_reading()


async def _write_later(transport: asyncio.Transport,
                       pending: Awaitable[HttpResponse]) -> None:
    try:
        response = await pending
    except Exception:  # a bug of ours: answer 500, keep serving
        logger.exception("http.answer_failed")
        response = HttpResponse(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n")
    if not transport.is_closing():
        transport.write(response.serialize())
    transport.close()
# What the responder is told when a request is refused before it was read whole:
# (status, reason, the request as far as it is known).
Refuser = Callable[[http.HTTPStatus, str, HttpRequest], HttpResponse]


class HttpFront:
    """Reads the first request of one connection (see the module docstring).

    ``respond`` answers a whole request; ``refuse`` answers one that cannot be read (too
    large, malformed). ``max_body_bytes`` bounds a request body, ``max_head_bytes`` its
    head. Call :meth:`receive_data` with each chunk read until it returns a decision."""

    def __init__(self, respond: Responder, refuse: Refuser, *, max_body_bytes: int,
                 max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._respond = respond
        self._refuse = refuse
        self._max_body_bytes = max_body_bytes
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._max_head_bytes = max_head_bytes
        self._read = bytearray()  # what the WebSocket protocol gets on an upgrade
        self._request: HttpRequest | None = None
        self._body = bytearray()
        self.decided = False

    def receive_data(self, data: bytes) -> Upgrade | Answer | None:
        """Feed bytes read from the connection; a decision, or None to read more. After a
        decision the front is done: feed it nothing more."""
        assert not self.decided, "the front has decided already"
        if self._request is None:
            self._read += data
        self._parser.receive_data(data)
        decision = self._next_decision()
        self.decided = decision is not None
        return decision

    def _next_decision(self) -> Upgrade | Answer | None:
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                return self._refused(http.HTTPStatus(exc.error_status_hint), "bad_request")
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                decision = self._on_head(event)
                if decision is not None:
                    return decision
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body_bytes:
                    return self._refused(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                         "body_too_large")
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                request = HttpRequest(self._request.method, self._request.target,
                                      self._request.headers, bytes(self._body))
                return Answer(self._respond(request))
            else:  # ConnectionClosed: the peer went before the request was whole
                return None

    def _on_head(self, event: h11.Request) -> Upgrade | Answer | None:
        # h11 bounds a head only while it is incomplete: one that came whole in a single
        # read is measured here.
        size = len(event.method) + len(event.target) + sum(
            len(name) + len(value) + 4 for name, value in event.headers)
        if len(event.target) > MAX_TARGET_BYTES:
            self._request = HttpRequest(event.method.decode("latin-1"),
                                        event.target[:200].decode("latin-1"), {})
            return self._refused(http.HTTPStatus.REQUEST_URI_TOO_LONG, "target_too_long")
        if len(event.headers) > MAX_HEADER_FIELDS or size > self._max_head_bytes:
            self._request = HttpRequest(event.method.decode("latin-1"),
                                        event.target.decode("latin-1"), {})
            return self._refused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 "head_too_large")
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            # A repeated header becomes one comma-joined value (RFC 9110 5.3), so that a
            # repeated signature is one value that matches nothing.
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._request = HttpRequest(event.method.decode("latin-1"),
                                    event.target.decode("latin-1"), headers)
        if self._request.method == "GET" and "websocket" in headers.get("upgrade", "").lower():
            return Upgrade(bytes(self._read), self._request.target,
                           tuple((name.decode("latin-1"), value.decode("latin-1"))
                                 for name, value in event.headers))
        length = headers.get("content-length")
        if length is not None and int(length) > self._max_body_bytes:  # h11 checked it
            return self._refused(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large")
        self._read.clear()  # not an upgrade: nothing more to hand over
        return None

    def _refused(self, status: http.HTTPStatus, reason: str) -> Answer:
        request = self._request or HttpRequest("", "/", {})
        return Answer(self._refuse(status, reason, request))
