"""SignalWire through the provider seam: Twilio's protocol with linear PCM codecs (Sans-I/O),
the bearer token on the upgrade, and the bundled session replayed through both
transports."""

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
from streamsvc.providers.signalwire import SignalWireCodec
from streamsvc.replay import replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "signalwire-bearer"


def start(encoding: str, rate: int) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
        "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
        "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
        "customParameters": {"k": "v"}}})


def media(payload: bytes) -> str:
    return json.dumps({"event": "media", "sequenceNumber": "2", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20",
        "payload": base64.b64encode(payload).decode()}, "streamSid": "MZ1"})


@pytest.mark.parametrize(("little_endian", "expected"), [(False, b"\x02\x01"),
                                                         (True, b"\x01\x02")])
def test_l16_reaches_handlers_as_pcm16_little_endian(little_endian: bool,
                                                     expected: bytes) -> None:
    codec = SignalWireCodec(l16_little_endian=little_endian)
    session = Session(codec=codec)
    session.receive_message(start("audio/x-l16", 16000))
    session.receive_message(media(b"\x01\x02" * 320))
    _, frame = session.events_received()
    assert isinstance(frame, wire.Media)
    assert (16000, "pcm16", expected * 320) == (session.sample_rate, codec.native_encoding,
                                                session.pcm16(frame))
    sent = json.loads(codec.serialize_media("MZ1", expected))
    assert b"\x01\x02" == base64.b64decode(sent["media"]["payload"])  # as the stream has it


def test_pcmu_streams_are_twilios() -> None:
    codec = SignalWireCodec()
    session = Session(codec=codec)
    session.receive_message(start("audio/x-mulaw", 8000))
    session.receive_message(media(b"\xff" * 160))
    _, frame = session.events_received()
    assert ("mulaw", b"\xff" * 160) == (codec.native_encoding, frame.payload)  # type: ignore[union-attr]
    assert {"k": "v"} == dict(session.custom_parameters)


def test_an_encoding_it_cannot_read_is_a_bad_start_naming_it() -> None:
    session = Session(codec=SignalWireCodec())
    session.receive_message(start("audio/opus", 48000))
    [bad] = session.events_received()
    assert "audio/opus" in bad.reason  # type: ignore[union-attr]


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/signalwire", (HandlerSpec("log", LogHandler),), bidirectional=True,
                    provider="signalwire"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   signalwire_token=TOKEN))
    await server.start()
    yield server
    await server.stop()


async def test_the_bundled_session_replays_to_its_expected_outcome(
        server: StreamServer, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "signalwire_params.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/signalwire", speed=0,
                          concurrency=2, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (2, 0) == (len(report.sessions), report.failed), report.sessions[0].error
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for session in report.sessions:
        outcome = outcome_of(logs, session.stream_sid)
        assert [] == differences(session.expect, outcome)
        assert "signalwire" == outcome["stream.started"]["provider"]


@pytest.mark.parametrize(("authorization", "reason"), [
    (None, "missing_token"), ("Bearer nope", "bad_token"), ("Basic " + TOKEN, "missing_token")])
async def test_the_bearer_token_is_checked(server: StreamServer, logs: LogEvents,
                                           authorization: str | None, reason: str) -> None:
    fixture = load_fixture(FIXTURES / "signalwire_params.jsonl")
    headers = {"Authorization": authorization} if authorization else {}
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/signalwire", speed=0,
                          headers=headers)
    assert "HTTP 403" in (report.sessions[0].error or "")
    assert reason == events(logs, "handshake.rejected")[0]["reason"]
