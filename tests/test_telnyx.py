"""Telnyx through the provider seam: the codec (Sans-I/O), the bundled Telnyx sessions
replayed through both transports to their expected outcome, the streaming auth token, the
recorder, and ``fixture synth --provider telnyx``."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.providers import codec_for
from streamsvc.providers.telnyx import TOKEN_HEADER, TelnyxCodec, client_state_text
from streamsvc.replay import replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
TELNYX_FIXTURES = sorted(path.name for path in FIXTURES.glob("telnyx_*.jsonl"))
TOKEN = "telnyx-stream-token"


def start(encoding: str = "PCMU", rate: int = 8000, **extra: object) -> bytes:
    body = {"call_control_id": "v3:abc", "from": "+1", "to": "+2",
            "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
            **extra}
    return json.dumps({"event": "start", "sequence_number": "1", "stream_id": "S1",
                       "start": body}).encode()


def media(payload: bytes, timestamp: int = 20, track: str = "inbound") -> bytes:
    return json.dumps({"event": "media", "sequence_number": "2", "stream_id": "S1",
                       "media": {"track": track, "chunk": "1", "timestamp": str(timestamp),
                                 "payload": base64.b64encode(payload).decode()}}).encode()


def test_a_start_gives_the_ids_and_the_context_as_the_table_says() -> None:
    session = Session(codec=TelnyxCodec())
    state = base64.b64encode(b"order-status").decode()
    session.receive_message(start(custom_parameters={"customer_id": "c-1"},
                                  client_state=state))
    [event] = session.events_received()
    assert isinstance(event, wire.Start)
    assert ("v3:abc", "S1", None) == (session.call_sid, session.stream_sid,
                                      session.account_sid)
    assert {"customer_id": "c-1", "client_state": "order-status"} == dict(
        session.custom_parameters)


def test_client_state_that_is_not_text_is_kept_as_sent() -> None:
    binary = base64.b64encode(b"\xff\x00\x81").decode()
    assert binary == client_state_text(binary)
    assert "not base64!" == client_state_text("not base64!")


def test_l16_arrives_big_endian_and_handlers_see_pcm16_little_endian() -> None:
    codec = TelnyxCodec()
    session = Session(codec=codec)
    session.receive_message(start("L16", 16000))
    session.receive_message(media(b"\x01\x02" * 320))
    _, frame = session.events_received()
    assert isinstance(frame, wire.Media)
    assert (16000, b"\x02\x01" * 320) == (session.sample_rate, session.pcm16(frame))
    sent = json.loads(codec.serialize_media("S1", b"\x02\x01"))
    assert b"\x01\x02" == base64.b64decode(sent["media"]["payload"])  # back to big-endian


def test_pcma_is_decoded_and_audio_sent_back_is_encoded_to_it() -> None:
    codec = TelnyxCodec()
    session = Session(codec=codec)
    session.receive_message(start("PCMA"))
    session.receive_message(media(b"\xd5" * 160))
    _, frame = session.events_received()
    assert isinstance(frame, wire.Media)
    assert 320 == len(session.pcm16(frame))
    sent = json.loads(codec.serialize_media("S1", bytes(320)))
    assert 160 == len(base64.b64decode(sent["media"]["payload"]))


def test_an_encoding_that_cannot_be_decoded_is_refused_with_its_name() -> None:
    session = Session(codec=TelnyxCodec())
    session.receive_message(start("OPUS", 16000))
    [bad] = session.events_received()
    assert "OPUS" in bad.reason  # type: ignore[union-attr]


def test_telnyx_errors_are_bad_frames_with_telnyxs_reason() -> None:
    codec = TelnyxCodec()
    with pytest.raises(RemoteProtocolError, match="Telnyx error 100003: Malformed frame"):
        codec.parse(b'{"event":"error","payload":{"code":100003,"title":"Malformed frame",'
                    b'"detail":"x"},"stream_id":"S1"}')


def test_outbound_frames_are_telnyxs() -> None:
    codec = codec_for("telnyx", wire.Upgrade("/"))
    assert {"event": "clear"} == json.loads(codec.serialize_clear("S1"))
    mark = codec.serialize_mark("S1", "greeting")
    assert mark is not None
    assert {"event": "mark", "mark": {"name": "greeting"}} == json.loads(mark)


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_an_event_or_a_reason(frame: bytes) -> None:
    reason = "parsed"
    try:
        TelnyxCodec().parse(frame)
    except RemoteProtocolError as exc:
        reason = exc.reason
    assert reason


@pytest.fixture
async def server(transport: str, tmp_path: Path) -> AsyncIterator[StreamServer]:
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="handlers")
    routes = (Route("/telnyx", (HandlerSpec("log", LogHandler), recorder),
                    bidirectional=True, provider="telnyx"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   telnyx_stream_token=TOKEN))
    await server.start()
    yield server
    await server.stop()


def test_two_telnyx_sessions_are_bundled() -> None:
    assert ["telnyx_marks.jsonl", "telnyx_params.jsonl"] == TELNYX_FIXTURES


@pytest.mark.parametrize("name", TELNYX_FIXTURES)
async def test_each_telnyx_fixture_replays_to_its_expected_outcome(
        server: StreamServer, logs: LogEvents, name: str, tmp_path: Path) -> None:
    fixture = load_fixture(FIXTURES / name)
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/telnyx", speed=0,
                          concurrency=2, headers={TOKEN_HEADER: TOKEN})
    assert (2, 0) == (len(report.sessions), report.failed), report.sessions[0].error
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for session in report.sessions:
        outcome = outcome_of(logs, session.stream_sid)
        assert [] == differences(session.expect, outcome)
        assert "telnyx" == outcome["stream.started"]["provider"]
    wavs = sorted(tmp_path.rglob("*.wav"))
    assert 2 == len(wavs)
    with wave.open(str(wavs[0])) as recording:
        assert (8000, 2) == (recording.getframerate(), recording.getsampwidth())
        assert recording.getnframes() >= 160 * fixture.expect["frames"]["inbound"]


@pytest.mark.parametrize(("headers", "reason"), [({}, "missing_token"),
                                                 ({TOKEN_HEADER: "wrong"}, "bad_token")])
async def test_a_wrong_or_missing_token_gets_403(server: StreamServer, logs: LogEvents,
                                                 headers: dict[str, str], reason: str) -> None:
    fixture = load_fixture(FIXTURES / "telnyx_params.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/telnyx", speed=0,
                          headers=headers)
    assert "handshake rejected: HTTP 403" in (report.sessions[0].error or "")
    assert reason == events(logs, "handshake.rejected")[0]["reason"]


def test_fixture_synth_makes_a_telnyx_session(tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(16000))
    output = tmp_path / "call.jsonl"
    subprocess.run([sys.executable, "-m", "streamsvc", "fixture", "synth", "--provider",
                    "telnyx", "--inbound", str(wav), "--client-state", "vip", "--param",
                    "k=v", "--dtmf", "5@0.2", "-o", str(output)], check=True, timeout=60)
    fixture = load_fixture(output)
    assert ("telnyx", "/telnyx") == (fixture.provider, fixture.path)
    assert {"k": "v", "client_state": "vip"} == fixture.expect["custom_parameters"]
    assert fixture.call_sid().startswith("v3:")  # type: ignore[union-attr]
    opening = json.loads(fixture.frames[1].text)
    assert ("start", fixture.stream_sid()) == (opening["event"], opening["stream_id"])


def test_an_event_of_a_kind_it_does_not_know_is_ignored_not_refused() -> None:
    event = TelnyxCodec().parse(b'{"event":"future_thing","stream_id":"S1"}')
    assert wire.UnknownEvent("future_thing") == event
    with pytest.raises(RemoteProtocolError, match="invalid media"):
        TelnyxCodec().parse(b'{"event":"media","stream_id":"S1"}')


@pytest.mark.parametrize("parameters", [
    {"customer_id": "c-1", "attempt": 2, "vip": True},
    [{"name": "customer_id", "value": "c-1"}, {"name": "attempt", "value": 2},
     {"name": "vip", "value": True}],
])
def test_custom_parameters_come_as_an_object_or_a_list_and_become_text(
        parameters: object) -> None:
    session = Session(codec=TelnyxCodec())
    session.receive_message(start(custom_parameters=parameters))
    assert {"customer_id": "c-1", "attempt": "2", "vip": "true"} == dict(
        session.custom_parameters)
