"""Exotel through the provider seam: the codec (Sans-I/O), query-string context, 100 ms
frames counted as such, outbound chunks in multiples of 320 bytes, Basic credentials on the
upgrade, and the bundled session replayed through both transports."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers.exotel import ExotelCodec
from streamsvc.replay import replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
CREDENTIALS = "exokey:exotoken"
BASIC = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()


def start(**parameters: str) -> str:
    return json.dumps({"event": "start", "sequence_number": "1", "stream_sid": "MZ1",
                       "start": {"stream_sid": "MZ1", "call_sid": "CA1", "account_sid": "A1",
                                 "custom_parameters": parameters,
                                 "media_format": {"encoding": "audio/x-raw",
                                                  "sample_rate": "8000", "bit_rate": "16"}}})


def media(chunk: int, samples: int = 800) -> str:
    return json.dumps({"event": "media", "sequence_number": str(chunk + 1), "stream_sid": "MZ1",
                       "media": {"chunk": str(chunk), "timestamp": str((chunk - 1) * 100),
                                 "payload": base64.b64encode(bytes(2 * samples)).decode()}})


def test_the_start_and_the_url_query_give_the_context() -> None:
    session = Session(codec=ExotelCodec("lang=hi&tier=gold&sample-rate=8000"))
    session.receive_message(start(tier="platinum"))
    [event] = session.events_received()
    assert isinstance(event, wire.Start)
    assert ("CA1", "MZ1", "A1") == (session.call_sid, session.stream_sid, session.account_sid)
    assert {"lang": "hi", "tier": "platinum"} == dict(session.custom_parameters)


def start_with(media_format: dict[str, object]) -> str:
    return json.dumps({"event": "start", "stream_sid": "MZ1",
                       "start": {"stream_sid": "MZ1", "call_sid": "CA1",
                                 "media_format": media_format}})


@pytest.mark.parametrize(("media_format", "query", "rate", "encoding"), [
    pytest.param({"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}, "",
                 8000, "pcm16", id="current"),
    pytest.param({"encoding": "base64", "sample_rate": "8000", "bit_rate": "128kbps"}, "",
                 8000, "pcm16", id="older"),
    pytest.param({"encoding": "base64", "sample_rate": 16000, "bit_rate": 256}, "",
                 16000, "pcm16", id="older-numbers"),
    pytest.param({"encoding": "audio/x-mulaw;rate=8000"}, "", 8000, "mulaw",
                 id="extension-mulaw"),
    pytest.param({"encoding": "audio/L16;rate=16000"}, "", 16000, "pcm16", id="extension-l16"),
    pytest.param({"encoding": "audio/x-raw"}, "sample-rate=24000", 24000, "pcm16",
                 id="rate-from-the-url"),
    pytest.param({"bit_rate": {"odd": ["type"]}, "encoding": 7}, "", 8000, "pcm16",
                 id="odd-unused-fields"),
])
def test_every_documented_media_format_starts_the_stream(
        media_format: dict[str, object], query: str, rate: int, encoding: str) -> None:
    session = Session(codec=ExotelCodec(query))
    session.receive_message(start_with(media_format))
    assert [wire.Start] == [type(event) for event in session.events_received()]
    assert (rate, encoding) == (session.sample_rate, session.codec.native_encoding)


def test_mulaw_audio_is_decoded_and_its_frames_measured_one_byte_a_sample() -> None:
    session = Session(codec=ExotelCodec())
    session.receive_message(start_with({"encoding": "audio/x-mulaw;rate=8000"}))
    session.events_received()
    session.receive_message(json.dumps({
        "event": "media", "stream_sid": "MZ1",
        "media": {"chunk": "1", "timestamp": "0",
                  "payload": base64.b64encode(b"\xff" * 800).decode()}}))
    [frame] = session.events_received()
    assert isinstance(frame, wire.Media)
    assert (100, bytes(1600)) == (session.codec.frame_ms, session.pcm16(frame))


def test_both_tracks_come_with_a_track_on_each_message() -> None:
    session = Session(codec=ExotelCodec())
    session.receive_message(start())
    for chunk, track in ((1, "inbound"), (1, "outbound"), (2, "inbound"), (2, "outbound")):
        message = json.loads(media(chunk))
        message["media"]["track"] = track
        session.receive_message(json.dumps(message))
    assert {"inbound": 2, "outbound": 2} == session.close("stop").frames


@pytest.mark.parametrize("rate", ["0", "100000000", "8k"])
def test_a_rate_the_service_cannot_take_refuses_the_start(rate: str) -> None:
    session = Session(codec=ExotelCodec())
    session.receive_message(start_with({"encoding": "audio/x-raw", "sample_rate": rate}))
    assert 1 == session.bad_frames


def test_100_ms_messages_are_counted_as_frames_and_gaps_in_100_ms_slots() -> None:
    session = Session(codec=ExotelCodec())
    session.receive_message(start())
    for chunk in (1, 2, 4, 3, 6):  # 5 lost, 3 late
        session.receive_message(media(chunk))
    summary = session.close("stop")
    assert ({"inbound": 5}, {"inbound": 1}, {"inbound": 1}, 600) == (
        summary.frames, summary.missing_frames, summary.out_of_order_frames,
        summary.duration_ms)


def test_audio_sent_back_goes_in_multiples_of_320_bytes() -> None:
    sent: list[bytes] = []
    session = LiveSession(wake=lambda: sent.extend(session.data_to_send()),
                          bidirectional=True, codec=ExotelCodec())
    session.receive_message(start())
    session.events_received()
    session.send_audio(bytes(7000))
    sizes = [len(base64.b64decode(json.loads(frame)["media"]["payload"])) for frame in sent]
    assert [3200, 3200, 640] == sizes  # the tail padded with silence
    assert all(json.loads(frame)["stream_sid"] == "MZ1" for frame in sent)


@pytest.fixture
async def server(transport: str, tmp_path: Path) -> AsyncIterator[StreamServer]:
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="handlers")
    routes = (Route("/exotel", (HandlerSpec("log", LogHandler), recorder), bidirectional=True,
                    provider="exotel"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   exotel_basic_auth=CREDENTIALS))
    await server.start()
    yield server
    await server.stop()


async def test_the_bundled_session_replays_to_its_expected_outcome(
        server: StreamServer, logs: LogEvents, tmp_path: Path) -> None:
    fixture = load_fixture(FIXTURES / "exotel_voicebot.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/exotel?lang=hi",
                          speed=0, concurrency=2, headers={"Authorization": BASIC})
    assert (2, 0) == (len(report.sessions), report.failed), report.sessions[0].error
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for session in report.sessions:
        outcome = outcome_of(logs, session.stream_sid)
        expect = dict(session.expect)
        expect["custom_parameters"] = {"lang": "hi", **expect["custom_parameters"]}
        assert [] == differences(expect, outcome)
        assert "exotel" == outcome["stream.started"]["provider"]
    assert 2 == len(list(tmp_path.rglob("*.wav")))


@pytest.mark.parametrize(("authorization", "reason"), [
    (None, "missing_token"), ("Basic " + base64.b64encode(b"exokey:wrong").decode(),
                              "bad_token")])
async def test_basic_credentials_are_checked(server: StreamServer, logs: LogEvents,
                                             authorization: str | None, reason: str) -> None:
    fixture = load_fixture(FIXTURES / "exotel_voicebot.jsonl")
    headers = {"Authorization": authorization} if authorization else {}
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/exotel", speed=0,
                          headers=headers)
    assert "HTTP 403" in (report.sessions[0].error or "")
    assert reason == events(logs, "handshake.rejected")[0]["reason"]


def test_numeric_custom_parameters_become_text() -> None:
    session = Session(codec=ExotelCodec())
    session.receive_message(start(order="1"))
    session.events_received()
    other = Session(codec=ExotelCodec())
    other.receive_message(start().replace('"custom_parameters": {}',
                                          '"custom_parameters": {"order": 1}'))
    assert dict(session.custom_parameters) == dict(other.custom_parameters) == {"order": "1"}
