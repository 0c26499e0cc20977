"""Every HTTP request on the stream port gets a status and a log line, on both transports;
and a deployment behind a path prefix (``public_url`` with a path) works end to end."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator

import pytest
from twilio.request_validator import RequestValidator

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.context.twiml import parameters_from_twiml
from streamsvc.handlers import HandlerSpec
from streamsvc.replay import replay_session, signature_headers
from streamsvc.replay.fixture import Fixture
from streamsvc.replay.synth import SessionPlan, synthesize
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

TOKEN = "12345"
CALL_SID = "CA0123456789abcdef0123456789abcdef"


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/media", (HandlerSpec("log", LogHandler),)),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport))
    await server.start()
    yield server
    await server.stop()


def _exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer until the server closes: (status, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


def _post(target: str, body: bytes = b"CallSid=CA1") -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-"
            f"urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        pytest.param(_post("/twiml/nosuch"), 404, "not_found", id="webhook-of-no-route"),
        pytest.param(_post("/voice"), 404, "not_found", id="unknown-path"),
        pytest.param(_post("/stream-status/"), 404, "not_found", id="trailing-slash"),
        pytest.param(b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method",
                     id="probe-method"),
        pytest.param(b"GET /media HTTP/1.1\r\nHost: x\r\n\r\n", 426, "not_websocket",
                     id="stream-route-without-upgrade"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400,
                     "bad_request", id="tls-hello"),
        pytest.param(_post("/upload", b"x" * 70_000), 413, "body_too_large",
                     id="large-body"),
    ],
)
async def test_a_request_the_service_does_not_serve_gets_a_status_and_a_log_line(
        server: StreamServer, logs: LogEvents, request_bytes: bytes, status: int,
        reason: str) -> None:
    answered, _ = await asyncio.to_thread(_exchange, server.port, request_bytes)
    assert status == answered
    (rejected,) = events(logs, "http.rejected")
    assert (reason, status) == (rejected["reason"], rejected["status"])
    assert "/media" in rejected["known_paths"]
    assert "/twiml" in rejected["known_paths"]
    assert 1 == server.metrics.http_rejected[reason]


async def test_a_probe_with_a_body_or_a_pipelined_second_request_is_answered(
        server: StreamServer) -> None:
    request = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
               b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, answer = await asyncio.to_thread(_exchange, server.port, request)
    assert 200 == status
    assert answer.endswith(b"\r\n\r\nok\n")  # the first is answered, then the server closes


async def test_metrics_answer_a_head_request(server: StreamServer) -> None:
    status, answer = await asyncio.to_thread(_exchange, server.port,
                                             b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert 200 == status
    assert answer.endswith(b"\r\n\r\n")  # no body


# -- behind a path prefix ---------------------------------------------------------------

@pytest.fixture
async def prefixed(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/media", (HandlerSpec("log", LogHandler),)),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   public_url="https://api.example.com/voice/",
                                   auth_token=TOKEN))
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize("forwarded_prefix", ["/voice", ""],
                         ids=["proxy-keeps-prefix", "proxy-strips-prefix"])
async def test_behind_a_path_prefix_the_webhook_twiml_and_stream_all_carry_it(
        prefixed: StreamServer, logs: LogEvents, forwarded_prefix: str) -> None:
    public_webhook = "https://api.example.com/voice/twiml/media"
    fields = {"CallSid": CALL_SID, "From": "+15550100"}
    signature = RequestValidator(TOKEN).compute_signature(public_webhook, fields)
    body = "&".join(f"{k}={v}" for k, v in fields.items()).replace("+", "%2B").encode()
    request = _post(f"{forwarded_prefix}/twiml/media", body).replace(
        b"\r\n\r\n", f"\r\nX-Twilio-Signature: {signature}\r\n\r\n".encode(), 1)
    status, answer = await asyncio.to_thread(_exchange, prefixed.port, request)
    assert 200 == status
    document = answer.split(b"\r\n\r\n", 1)[1].decode()
    assert 'url="wss://api.example.com/voice/media"' in document
    assert 'statusCallback="https://api.example.com/voice/stream-status"' in document

    plan = SessionPlan(inbound=[0] * 800, custom_parameters=parameters_from_twiml(document),
                       call_sid=CALL_SID)
    url = f"ws://127.0.0.1:{prefixed.port}{forwarded_prefix}/media"
    headers = signature_headers("wss://api.example.com/voice/media", TOKEN)
    result = await replay_session(Fixture("prefixed", tuple(synthesize(plan))), url, speed=0,
                                  headers=headers)
    assert (True, None) == (result.ok, result.error)
    await until(lambda: prefixed.active_calls == 0)
    (started,) = events(logs, "stream.started")
    assert ("/media", CALL_SID) == (started["path"], started["call_sid"])
    assert {"CallSid": CALL_SID, "From": "+15550100"} == started["custom_parameters"]


async def test_behind_a_path_prefix_a_stream_signed_without_it_is_refused(
        prefixed: StreamServer) -> None:
    plan = SessionPlan(inbound=[0] * 80, call_sid=CALL_SID)
    url = f"ws://127.0.0.1:{prefixed.port}/media"
    headers = signature_headers("wss://api.example.com/media", TOKEN)
    result = await replay_session(Fixture("unprefixed", tuple(synthesize(plan))), url,
                                  speed=0, headers=headers)
    assert "handshake rejected: HTTP 403" == (result.error or "")[:28]


@pytest.mark.parametrize("sent", [b"", b"GET /stream HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half-a-head"])
async def test_a_socket_that_sends_no_whole_request_is_closed_after_the_handshake_timeout(
        transport: str, sent: bytes) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/media", ()),), transport=transport,
                                   handshake_timeout_s=0.3))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        async with asyncio.timeout(5):  # well past the 0.3 s: the server hung up by then
            assert b"" == await reader.read()
        writer.close()
    finally:
        await server.stop()


# -- only what the signature covers is used ---------------------------------------------

@pytest.fixture
async def signed(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/media", (HandlerSpec("log", LogHandler),)),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   public_url="wss://example.ngrok.app", auth_token=TOKEN))
    await server.start()
    yield server
    await server.stop()


async def test_a_signed_get_webhook_ignores_its_unsigned_body(signed: StreamServer) -> None:
    target = f"/twiml/media?CallSid={CALL_SID}"
    signature = RequestValidator(TOKEN).compute_signature(
        "https://example.ngrok.app" + target, {})
    body = b"injected=evil&CallSid=CAforged"
    request = (f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: {signature}\r\n"
               f"Content-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    status, answer = await asyncio.to_thread(_exchange, signed.port, request)
    assert 200 == status
    document = answer.split(b"\r\n\r\n", 1)[1].decode()
    assert {"CallSid": CALL_SID} == parameters_from_twiml(document)


async def test_a_repeated_signature_header_is_refused_403_not_500(
        signed: StreamServer, logs: LogEvents) -> None:
    target = f"/twiml/media?CallSid={CALL_SID}"
    good = RequestValidator(TOKEN).compute_signature("https://example.ngrok.app" + target, {})
    request = (f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: {good}\r\n"
               f"X-Twilio-Signature: {good}\r\n\r\n").encode()
    status, _ = await asyncio.to_thread(_exchange, signed.port, request)
    assert 403 == status
    twice = signature_headers("wss://example.ngrok.app/media", TOKEN)
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (f"GET /media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n" + "".join(
                     f"X-Twilio-Signature: {value}\r\n" for value in twice.values()) * 2
                 + "\r\n").encode()
    status, _ = await asyncio.to_thread(_exchange, signed.port, handshake)
    assert 403 == status
    assert ["bad_signature"] == [e["reason"] for e in events(logs, "handshake.rejected")]
