"""Plivo through the provider seam: the codec (Sans-I/O), the V3 signature on the upgrade,
checkpoints as marks, and the bundled session replayed through both transports."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import HandlerSpec
from streamsvc.live import LiveSession
from streamsvc.providers.plivo import (
    NONCE_HEADER,
    SIGNATURE_V3_HEADER,
    PlivoCodec,
    extra_headers,
    sign_v3,
)
from streamsvc.replay import Signing, replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "plivo-auth-token"
PUBLIC = "wss://voice.example.com"


def start(encoding: str = "audio/x-mulaw", rate: int = 8000) -> str:
    return json.dumps({"event": "start", "sequenceNumber": 1, "start": {
        "callId": "C1", "streamId": "S1", "accountId": "MA1", "tracks": ["inbound"],
        "mediaFormat": {"encoding": encoding, "sampleRate": rate}},
        "extra_headers": "userId=12345;sessionId=abc;broken;=x"})


def test_the_start_gives_the_ids_and_the_extra_headers_as_context() -> None:
    session = Session(codec=PlivoCodec())
    session.receive_message(start())
    [event] = session.events_received()
    assert isinstance(event, wire.Start)
    assert ("C1", "S1", "MA1") == (session.call_sid, session.stream_sid, session.account_sid)
    assert {"userId": "12345", "sessionId": "abc"} == dict(session.custom_parameters)
    assert {} == extra_headers("")


def test_checkpoints_are_marks_and_their_echo_is_played_stream() -> None:
    sent: list[bytes] = []
    session = LiveSession(wake=lambda: sent.extend(session.data_to_send()),
                          bidirectional=True, codec=PlivoCodec())
    session.receive_message(start("audio/x-l16", 16000))
    session.events_received()
    session.send_audio(bytes(640))
    session.send_mark("intro")
    session.send_clear()
    sent.extend(session.data_to_send())
    kinds = [json.loads(frame) for frame in sent]
    assert ["playAudio", "checkpoint", "clearAudio"] == [k["event"] for k in kinds]
    assert ("audio/x-l16", 16000, "S1") == (kinds[0]["media"]["contentType"],
                                           kinds[0]["media"]["sampleRate"], kinds[0]["streamId"])
    session.receive_message('{"event":"playedStream","streamId":"S1","name":"intro"}')
    [echo] = session.events_received()
    assert isinstance(echo, wire.Mark)
    assert "intro" == echo.name


def test_the_v3_signature_is_plivos() -> None:
    # Plivo's SDKs: URL without query, "?", the query sorted, ".", the nonce; HMAC-SHA256.
    import hashlib
    import hmac

    data = b"wss://h.example/plivo?a=1&b=2.n1"
    expected = base64.b64encode(hmac.new(b"tok", data, hashlib.sha256).digest()).decode()
    assert expected == sign_v3("tok", "wss://h.example/plivo?b=2&a=1", "n1")


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/plivo", (HandlerSpec("log", LogHandler),), bidirectional=True,
                    provider="plivo"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   plivo_auth_token=TOKEN, public_url=PUBLIC))
    await server.start()
    yield server
    await server.stop()


def signed(query: str = "") -> dict[str, str]:
    url = f"{PUBLIC}/plivo" + (f"?{query}" if query else "")
    return {SIGNATURE_V3_HEADER: "other," + sign_v3(TOKEN, url, "nonce-1"),
            NONCE_HEADER: "nonce-1"}


async def test_the_bundled_session_replays_to_its_expected_outcome(
        server: StreamServer, logs: LogEvents) -> None:
    """Each copy signed as Plivo signs it, with a nonce of its own (a nonce opens one
    stream)."""
    fixture = load_fixture(FIXTURES / "plivo_stream.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/plivo?b=2&a=1",
                          speed=0, concurrency=2,
                          signing=Signing(public_url=PUBLIC, plivo_auth_token=TOKEN))
    assert (2, 0) == (len(report.sessions), report.failed), report.sessions[0].error
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for session in report.sessions:
        outcome = outcome_of(logs, session.stream_sid)
        assert [] == differences(session.expect, outcome)
        assert "plivo" == outcome["stream.started"]["provider"]


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "missing_signature"),
    ({SIGNATURE_V3_HEADER: "bad", NONCE_HEADER: "n"}, "bad_signature")])
async def test_an_unsigned_or_badly_signed_upgrade_gets_403(
        server: StreamServer, logs: LogEvents, headers: dict[str, str], reason: str) -> None:
    fixture = load_fixture(FIXTURES / "plivo_stream.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/plivo", speed=0,
                          headers=headers)
    assert "HTTP 403" in (report.sessions[0].error or "")
    assert reason == events(logs, "handshake.rejected")[0]["reason"]


def test_extra_headers_as_an_object_are_taken_too() -> None:
    session = Session(codec=PlivoCodec())
    session.receive_message(json.dumps({"event": "start", "start": {
        "callId": "C1", "streamId": "S1", "mediaFormat": {"encoding": "audio/x-mulaw",
                                                         "sampleRate": 8000}},
        "extra_headers": {"userId": 12345}}))
    assert {"userId": "12345"} == dict(session.custom_parameters)
