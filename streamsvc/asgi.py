"""streamsvc as an ASGI application, to mount in FastAPI or Starlette:

    from fastapi import FastAPI
    from streamsvc.asgi import StreamsvcApp

    voice = StreamsvcApp()  # the settings from the environment and STREAMSVC_CONFIG
    app = FastAPI(lifespan=voice.lifespan)
    app.mount("/voice", voice)  # streams at wss://host/voice/stream, webhooks at /voice/twiml

The same service as ``streamsvc serve``: the routes' streams (every provider), the voice
webhooks, status callbacks, ACS events, the context API, the probes and the metrics, with
the same sessions, handlers, limits and signature checks (:class:`~streamsvc.server.
StreamServer` decides every request; this module only carries its frames). The mount's
prefix is taken off each path (ASGI's ``root_path``); ``public_url`` must name the public
origin and that prefix (``https://voice.example.com/voice``) for signatures to hold.

Start and stop: ``lifespan`` (an async context manager, FastAPI's ``lifespan=``) starts the
service with the app and, at shutdown, closes the calls in progress and waits for their
handlers; a mounted app's own lifespan events never come (Starlette does not send them to
mounts), so without it the service starts on its first request and stops with the process.
Run standalone (``uvicorn streamsvc.asgi:app``) it takes ASGI's lifespan events itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Final

import structlog

from streamsvc.config import Settings, load_settings
from streamsvc.exceptions import CLOSE_POLICY_VIOLATION
from streamsvc.server.admission import Admitted
from streamsvc.server.call import CallCore
from streamsvc.server.stream_server import StreamServer
from streamsvc.session import State, StopReason
from streamsvc.web.webhooks import MAX_BODY_BYTES, HttpRequest, HttpResponse
from streamsvc.wire import BinaryFrame

__all__ = ["StreamsvcApp", "app"]

logger = structlog.get_logger("streamsvc.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Outbound frames queued for one connection (as the websockets transport).
MAX_OUTBOUND_FRAMES: Final = 15_000
_DENIAL: Final = "websocket.http.response"
# What an ASGI server (uvicorn) closes its connections with when it shuts down.
SERVICE_RESTART: Final = 1012


class StreamsvcApp:
    """The ASGI application (see the module docstring); ``settings`` as ``streamsvc
    serve`` would load them when not given."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._server: StreamServer | None = None
        self._starting: asyncio.Lock | None = None

    @property
    def server(self) -> StreamServer | None:
        """The service behind the app, once started."""
        return self._server

    async def start(self) -> StreamServer:
        """Start the service (once; later calls return it)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None:
                server = StreamServer(self._settings or load_settings())
                await server.start(listen=False)
                self._server = server
        return self._server

    async def stop(self) -> None:
        """Close the calls in progress (1001) and wait for their handlers."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(within_s=server.settings.drain_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the service for the host app's lifetime (FastAPI's ``lifespan=``)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        server = await self.start()
        if kind == "http":
            await _serve_http(server, scope, receive, send)
        elif kind == "websocket":
            await _serve_websocket(server, scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # a bad configuration: the host says so
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _local(scope: Scope) -> tuple[str, str]:
    """The request's path without the mount's prefix, and its query."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path, scope.get("query_string", b"").decode("latin-1")


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope.get("headers", [])]


async def _serve_http(server: StreamServer, scope: Scope, receive: Receive,
                      send: Send) -> None:
    path, query = _local(scope)
    headers: dict[str, str] = {}
    for name, value in _headers(scope):
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    target = path + (f"?{query}" if query else "")
    request = HttpRequest(scope["method"], target, headers)
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            response = server.refuse_http(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                          "body_too_large", request)
            break
        if not message.get("more_body"):
            answer = server.answer_http(HttpRequest(scope["method"], target, headers,
                                                    bytes(body)))
            response = answer if isinstance(answer, HttpResponse) else await answer
            break
    await _send_response(send, "http.response", response)


async def _send_response(send: Send, prefix: str, response: HttpResponse) -> None:
    headers = [(b"content-type", response.content_type.encode()),
               (b"content-length", str(len(response.body)).encode()),
               *((name.lower().encode(), value.encode()) for name, value in response.headers)]
    await send({"type": f"{prefix}.start", "status": int(response.status),
                "headers": headers})
    await send({"type": f"{prefix}.body", "body": response.body})


async def _serve_websocket(server: StreamServer, scope: Scope, receive: Receive,
                           send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    path, query = _local(scope)
    headers = _headers(scope)
    client = scope.get("client")
    answer = server.admit(path, query, headers, str(client[0]) if client else None)
    if isinstance(answer, Admitted):
        target = path + (f"?{query}" if query else "")
        screening = server.screen(target, headers)
        refusal = await screening if screening is not None else None
        if refusal is None:
            await _run_call(server, answer, receive, send)
            return
        answer = refusal
    if _DENIAL in scope.get("extensions", {}):
        await _send_response(send, _DENIAL, answer)
    else:
        await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION})


async def _run_call(server: StreamServer, admitted: Admitted, receive: Receive,
                    send: Send) -> None:
    subprotocol = admitted.subprotocol()
    await send({"type": "websocket.accept", "subprotocol": subprotocol})
    server.call_began()
    call = _AsgiCall(server, admitted, send)
    server.hosted_calls.add(call)
    try:
        with structlog.contextvars.bound_contextvars(path=admitted.route.path):
            await call.run(receive)
    finally:
        server.hosted_calls.discard(call)
        call.closed()
        server.call_ended()
        if not call.finished.done():
            call.finished.set_result(None)


class _AsgiCall(CallCore):
    """One stream connection carried by the ASGI server: a receive loop, a writer task,
    the start timeout and the idle watchdog around the call core."""

    server: StreamServer

    __slots__ = ("closing", "finished", "outgoing", "send", "writer")

    def __init__(self, server: StreamServer, admitted: Admitted, send: Send) -> None:
        super().__init__(server, admitted)
        self.send = send
        self.outgoing: asyncio.Queue[bytes | tuple[int, str]] = asyncio.Queue()
        self.writer = asyncio.get_running_loop().create_task(self._write())
        self.closing: StopReason | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def outbound_full(self) -> bool:
        return self.outgoing.qsize() >= MAX_OUTBOUND_FRAMES

    def send_now(self, frame: bytes) -> None:
        self.outgoing.put_nowait(frame)

    def close_with(self, code: int, reason: str, why: StopReason) -> None:
        if self.closing is None:
            self.closing = why
            self.outgoing.put_nowait((code, reason))

    async def _write(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # the client is gone
            while True:
                item = await self.outgoing.get()
                try:
                    if isinstance(item, tuple):
                        await self.send({"type": "websocket.close", "code": item[0],
                                         "reason": item[1]})
                        return
                    if type(item) is BinaryFrame:
                        await self.send({"type": "websocket.send", "bytes": bytes(item)})
                    else:
                        await self.send({"type": "websocket.send", "text": item.decode()})
                finally:
                    self.outgoing.task_done()

    async def run(self, receive: Receive) -> None:
        reason: StopReason = "aborted"
        watchdog = asyncio.get_running_loop().create_task(self._watch())
        try:
            reason = await self._receive_all(receive)
        finally:
            watchdog.cancel()
            if self.server.shutting_down:
                reason = "shutdown"
            if self.session.state is State.AWAITING_START and self.closing != "error":
                self.log_closed_before_start(reason)
            if self.session.stream_sid is not None:
                await self.finish(reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # the last answers (Genesys's closed)
                    await asyncio.wait({self.writer, asyncio.ensure_future(
                        self.outgoing.join())}, return_when=asyncio.FIRST_COMPLETED)
            self.writer.cancel()

    async def _receive_all(self, receive: Receive) -> StopReason:
        limit = self.server.settings.max_message_bytes
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if self.session.state is State.STOPPED:
                    return "stop"
                code = message.get("code", 1005)
                if code == SERVICE_RESTART:  # the ASGI server is shutting down
                    return "shutdown"
                return self.closing or ("closed" if code in (1000, 1001, 1005) else "aborted")
            data = message.get("bytes")
            binary = isinstance(data, bytes)
            frame: bytes = data if isinstance(data, bytes) else (
                message.get("text") or "").encode()
            if len(frame) > limit:
                self.close_with(1009, "message too big", "error")
                continue
            if self.closing is not None:
                continue  # closing: what still comes is not part of the stream
            self.frames_received += 1
            self.receive(frame, binary)
            if self.session.state is State.STOPPED:
                self.close_with(1000, "", "stop")
            elif self.session.state is State.AWAITING_START and (
                    why := self.no_start_coming()):
                self.close_with(CLOSE_POLICY_VIOLATION, why, "error")

    async def _watch(self) -> None:
        """The start timeout, then the idle watchdog."""
        settings = self.server.settings
        await asyncio.sleep(settings.start_timeout_s)
        if self.session.state is State.AWAITING_START and self.closing is None:
            self.log_start_timeout()
            self.close_with(CLOSE_POLICY_VIOLATION, "no start message in time", "error")
            return
        while self.closing is None:
            await asyncio.sleep(self.idle_check_s)
            if self.went_idle():
                self.close_with(CLOSE_POLICY_VIOLATION, "no frame in time", "aborted")


# ``uvicorn streamsvc.asgi:app``: the service on its own, the settings from the environment.
app = StreamsvcApp()
