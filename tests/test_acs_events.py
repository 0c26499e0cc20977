"""ACS contextual calling end to end: Event Grid's validation and IncomingCall, the call
answered through the official SDK (its real request checked by a local HTTPS stand-in for
the ACS endpoint, HMAC signature included), the context reaching the stream by correlation
id, and the callbacks."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.context.twiml import ContextMapping
from streamsvc.handlers import HandlerSpec
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until
from .test_acs import HEADERS, audio, metadata

ACCESS_KEY = base64.b64encode(b"streamsvc-test-access-key-0123456789").decode()
SECRET = "s3cr3t-event-grid"
CORRELATION = HEADERS["x-ms-call-correlation-id"]
INCOMING_CALL = {
    "id": "e1", "eventType": "Microsoft.Communication.IncomingCall", "subject": "call",
    "eventTime": "2026-11-23T10:00:00Z", "dataVersion": "1.0",
    "data": {
        "to": {"kind": "phoneNumber", "rawId": "4:+15550100"},
        "from": {"kind": "phoneNumber", "rawId": "4:+15550199"},
        "callerDisplayName": "Jane", "serverCallId": "srv-1",
        "incomingCallContext": "eyJhbGciOi.incoming-call-context",
        "correlationId": CORRELATION,
        "customContext": {
            "sipHeaders": {"X-MS-Custom-CustomerId": "cus_8812",
                           "X-MS-Custom-Intent": "order-status",
                           "User-To-User": "0123456789ABCDEF;encoding=hex"},
            "voipHeaders": {"tier": "gold"},
        },
    },
}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as files in ``directory``:
    for a stand-in serving TLS on loopback that a client is told to trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    ca_file = directory / "stand-in.pem"
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = directory / "stand-in.key"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, key_file


class AcsStandIn:
    """The ACS endpoint the SDK talks to, over TLS on loopback: records each request and
    whether its HMAC-SHA256 signature is the one ACS would accept."""

    def __init__(self, tmp: Path, *, tls: bool = True) -> None:
        self.ca_file, key_file = self_signed(tmp)
        self.requests: list[dict[str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stand_in.requests.append({"path": self.path, "body": json.loads(body),
                                          "signed": stand_in.signed(self, body)})
                answer = json.dumps({"callConnectionId": "421f0b00-call-conn",
                                     "serverCallId": "srv-1", "correlationId": CORRELATION,
                                     "callConnectionState": "connecting",
                                     "callbackUri": "x", "targets": []}).encode()
                # ACS accepts a transfer with 202 (its outcome comes as a callback).
                self.send_response(202 if ":transferToParticipant" in self.path else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.ca_file, key_file)
            self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        scheme = "https" if tls else "http"
        self.connection_string = (f"endpoint={scheme}://127.0.0.1:"
                                  f"{self.http.server_address[1]}/;accesskey={ACCESS_KEY}")

    @staticmethod
    def signed(request: BaseHTTPRequestHandler, body: bytes) -> bool:
        """ACS's HMAC scheme: SHA-256 of the body, and an HMAC over method, path and query,
        date, host and that hash, keyed by the access key."""
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        headers = request.headers
        to_sign = (f"POST\n{request.path}\n{headers['x-ms-date']};{headers['Host']};"
                   f"{digest}")
        signature = base64.b64encode(hmac.digest(base64.b64decode(ACCESS_KEY),
                                                 to_sign.encode(), "sha256")).decode()
        expected = ("HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                    f"&Signature={signature}")
        return headers["x-ms-content-sha256"] == digest and headers["Authorization"] == expected


@pytest.fixture(params=["https", "http"])
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Iterator[AcsStandIn]:
    """The ACS endpoint over TLS (as Azure serves it), and over plain HTTP (as a local
    stand-in may): the connection string's scheme is honoured."""
    acs = AcsStandIn(tmp_path, tls=request.param == "https")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(acs.ca_file))  # trust the stand-in only
    yield acs
    acs.http.shutdown()
    acs.http.server_close()


@pytest.fixture
async def server(stand_in: AcsStandIn, transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/media", (HandlerSpec("log", LogHandler),)),
              Route("/acs", (HandlerSpec("log", LogHandler),), bidirectional=True,
                    provider="acs", context=ContextMapping(priority=("CustomerId",))))
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   public_url="https://voice.example.com",
                                   auth_token="twilio-token", acs_events_secret=SECRET,
                                   acs_connection_string=stand_in.connection_string))
    await server.start()
    yield server
    await server.stop()


def post(port: int, path: str, body: object) -> tuple[int, bytes]:
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[1]


async def test_event_grid_validation_is_answered_with_its_code(server: StreamServer) -> None:
    validation = [{"id": "v1", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                   "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}}]
    status, body = await asyncio.to_thread(post, server.port, f"/acs/events?secret={SECRET}",
                                           validation)
    assert (200, {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}) == (
        status, json.loads(body))


@pytest.mark.parametrize("code", [{"a": "x" * 1000}, "x" * 55_000, 7, ""])
async def test_a_validation_code_that_is_not_one_is_refused_not_echoed(
        server: StreamServer, code: object) -> None:
    validation = [{"id": "v1", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                   "data": {"validationCode": code}}]
    status, body = await asyncio.to_thread(post, server.port, f"/acs/events?secret={SECRET}",
                                           validation)
    assert 400 == status
    assert b"xxxxxxxx" not in body


async def test_an_incoming_call_after_a_validation_in_one_delivery_is_taken(
        server: StreamServer, logs: LogEvents) -> None:
    validation = {"id": "v1", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                  "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}}
    status, body = await asyncio.to_thread(post, server.port, f"/acs/events?secret={SECRET}",
                                           [validation, INCOMING_CALL])
    assert (200, "512d38b6-c7b8-40c8-89fe-f46f9e9622b6") == (
        status, json.loads(body)["validationResponse"])
    assert [CORRELATION] == [line["correlation_id"]
                             for line in events(logs, "acs.incoming_call")]


@pytest.mark.parametrize("query", ["", "?secret=wrong"])
async def test_a_delivery_without_the_secret_is_refused(server: StreamServer, logs: LogEvents,
                                                        query: str) -> None:
    status, _ = await asyncio.to_thread(post, server.port, f"/acs/events{query}",
                                        [INCOMING_CALL])
    assert 403 == status
    assert ["bad_secret"] == [e["reason"] for e in events(logs, "webhook.rejected")]


async def test_an_incoming_call_is_answered_and_its_context_reaches_the_stream(
        server: StreamServer, stand_in: AcsStandIn, logs: LogEvents) -> None:
    status, _ = await asyncio.to_thread(post, server.port, f"/acs/events?secret={SECRET}",
                                        [INCOMING_CALL])
    assert 200 == status
    (incoming,) = events(logs, "acs.incoming_call")
    assert CORRELATION == incoming["correlation_id"]
    await until(lambda: events(logs, "acs.answered"))
    assert "421f0b00-call-conn" == events(logs, "acs.answered")[0]["call_connection_id"]
    [request] = stand_in.requests
    assert request["signed"]
    assert request["path"].startswith("/calling/callConnections:answer?api-version=")
    body = request["body"]
    assert ("eyJhbGciOi.incoming-call-context",
            f"https://voice.example.com/acs/callbacks?secret={SECRET}") == (
        body["incomingCallContext"], body["callbackUri"])
    assert {"transportType": "websocket", "transportUrl": "wss://voice.example.com/acs",
            "contentType": "audio", "audioChannelType": "mixed", "startMediaStreaming": True,
            "enableBidirectional": True, "audioFormat": "Pcm16KMono",
            "enableDtmfTones": True} == body["mediaStreamingOptions"]

    async with connect(f"ws://127.0.0.1:{server.port}/acs",
                       additional_headers=HEADERS) as connection:
        await connection.send(metadata())
        for index in range(5):
            await connection.send(audio(index * 20))
    await until(lambda: events(logs, "stream.stopped"))
    (started,) = events(logs, "stream.started")
    assert {"CustomerId": "cus_8812", "Intent": "order-status",
            "User-To-User": "0123456789ABCDEF;encoding=hex", "tier": "gold",
            "CorrelationId": CORRELATION, "From": "4:+15550199", "To": "4:+15550100"} == (
        started["custom_parameters"])
    assert "CustomerId" == next(iter(started["custom_parameters"]))  # the route's priority


async def test_callbacks_are_logged_with_the_calls_ids_and_failures_warned(
        server: StreamServer, logs: LogEvents) -> None:
    callbacks = [
        {"type": "Microsoft.Communication.CallConnected",
         "data": {"callConnectionId": "421f0b00-call-conn", "correlationId": CORRELATION}},
        {"type": "Microsoft.Communication.MediaStreamingFailed",
         "data": {"callConnectionId": "421f0b00-call-conn", "correlationId": CORRELATION,
                  "resultInformation": {"code": 500, "subCode": 8581,
                                        "message": "transport url unreachable"}}},
    ]
    status, _ = await asyncio.to_thread(post, server.port, f"/acs/callbacks?secret={SECRET}",
                                        callbacks)
    assert 200 == status
    logged = events(logs, "acs.callback")
    assert [("CallConnected", "info"), ("MediaStreamingFailed", "warning")] == [
        (e["callback"], e["log_level"]) for e in logged]
    assert {"421f0b00-call-conn"} == {e["call_sid"] for e in logged}
    assert 1 == server.metrics.acs_callbacks["MediaStreamingFailed"]
