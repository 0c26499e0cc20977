"""Vonage through the provider seam: the codec (Sans-I/O: websocket:connected, binary audio,
notify as the mark's echo), the binary media path of both transports, the upgrade's
credentials (a custom value, a JWT signed with the signature secret), and the bundled
session replayed to its expected outcome and recorded."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers import codec_for
from streamsvc.providers.auto import provider_from_message
from streamsvc.providers.vonage import VonageCodec, jwt_problem, token_matches
from streamsvc.replay import Signing, replay, replay_session
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import Fixture, FixtureFrame, dump_fixture, load_fixture
from streamsvc.replay.synth import SessionPlan
from streamsvc.replay.synth.vonage import synthesize_vonage
from streamsvc.server import StreamServer
from streamsvc.session import Session
from streamsvc.web.ncco import ncco

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
SECRET = "vonage-signature-secret-0123456789abcdef"  # HS256 wants >= 32 bytes
OTHER_SECRET = "another-signature-secret-0123456789abcdef"
CUSTOM = "Bearer vonage-custom-value"


def connected(rate: int = 16000, **headers: object) -> str:
    return json.dumps({"event": "websocket:connected", "content-type": f"audio/l16;rate={rate}",
                       **headers})


def signed_jwt(secret: str = SECRET, issued: float | None = None) -> str:
    return jwt.encode({"iat": int(issued or time.time()), "jti": "j1", "iss": "Vonage",
                       "application_id": "app-1"}, secret, algorithm="HS256")


# -- the codec ------------------------------------------------------------------------


def test_connected_starts_the_stream_with_the_ncco_headers_as_context() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected(language="en-GB", call_uuid="U-1", attempts=2,
                                      vip=True, extra={"a": [1]}))
    [event] = session.events_received()
    assert isinstance(event, wire.Start)
    assert ("U-1", None, ("inbound",)) == (session.call_sid, session.account_sid,
                                           session.tracks)
    assert session.stream_sid
    assert session.stream_sid != "U-1"  # the service's own
    assert {"language": "en-GB", "call_uuid": "U-1", "attempts": "2", "vip": "true",
            "extra": '{"a":[1]}'} == dict(session.custom_parameters)
    assert ("audio/l16", 16000, 1) == (session.media_format.encoding,
                                       session.media_format.sample_rate,
                                       session.media_format.channels)


def test_call_sid_falls_back_to_uuid_then_to_a_generated_one() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected(8000, uuid="U-2"))
    assert ("U-2", 8000) == (session.call_sid, session.sample_rate)
    first, second = Session(codec=VonageCodec()), Session(codec=VonageCodec())
    for session in (first, second):
        session.receive_message(connected())
    assert first.call_sid
    assert second.call_sid
    assert first.call_sid != second.call_sid


@pytest.mark.parametrize("content_type", ["audio/l16;rate=44100", "audio/pcmu;rate=8000",
                                          None])
def test_a_content_type_vonage_does_not_send_is_a_bad_frame(content_type: str | None) -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(json.dumps({"event": "websocket:connected",
                                        "content-type": content_type}))
    [bad] = session.events_received()
    assert "content-type" in getattr(bad, "reason", "")
    assert None is session.stream_sid


def test_binary_frames_are_20_ms_of_pcm16_in_order() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected())
    session.events_received()
    for n in range(3):
        session.receive_message(bytes([n]) * 640, binary=True)
        [media] = session.events_received()
        assert isinstance(media, wire.Media)
        assert ("inbound", n * 20, bytes([n]) * 640) == (media.track, media.timestamp_ms,
                                                         session.pcm16(media))
    summary = session.close("closed")
    assert ({"inbound": 3}, {"inbound": 0}, 60) == (summary.frames, summary.missing_frames,
                                                    summary.duration_ms)


@pytest.mark.parametrize(("frame", "reason"), [(b"", "0 bytes"), (b"\x00" * 321, "321 bytes")])
def test_an_empty_or_odd_binary_frame_is_a_bad_frame(frame: bytes, reason: str) -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected())
    session.events_received()
    session.receive_message(frame, binary=True)
    [bad] = session.events_received()
    assert reason in getattr(bad, "reason", "")
    assert 1 == session.bad_frames


def test_a_second_websocket_connected_is_a_bad_frame_and_changes_nothing() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected(16000))
    session.receive_message(connected(8000, call_uuid="other"))
    [_, bad] = session.events_received()
    assert "websocket:connected while streaming" in getattr(bad, "reason", "")
    assert (16000, 640) == (session.sample_rate, session.codec.frame_bytes)  # type: ignore[attr-defined]


def test_audio_before_websocket_connected_is_a_bad_frame() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(bytes(640), binary=True)
    [bad] = session.events_received()
    assert "before websocket:connected" in getattr(bad, "reason", "")


def test_dtmf_notify_and_cleared() -> None:
    session = Session(codec=VonageCodec())
    session.receive_message(connected())
    session.receive_message('{"event":"websocket:dtmf","digit":"5","duration":260}')
    session.receive_message('{"event":"websocket:notify","payload":{"name":"greeting"}}')
    session.receive_message('{"event":"websocket:notify","payload":{"other":1}}')
    session.receive_message('{"event":"websocket:cleared"}')
    session.receive_message('{"event":"media","media":{}}')  # not Vonage's
    kinds = [type(e).__name__ for e in session.events_received()]
    assert ["Start", "Dtmf", "Mark", "UnknownEvent", "UnknownEvent", "BadFrame"] == kinds
    summary = session.close("stop")
    assert ("5", 1, 2, 1) == (summary.dtmf, summary.marks_received, summary.ignored_events,
                              summary.bad_frames)


async def test_audio_goes_out_binary_in_whole_frames_marks_as_notify() -> None:
    sent: list[bytes] = []
    session = LiveSession(wake=lambda: sent.extend(session.data_to_send()),
                          bidirectional=True, codec=VonageCodec())
    session.receive_message(connected(8000))
    session.events_received()
    session.send_audio(b"\x01\x00" * 400)  # 50 ms at 8 kHz: 320 + 320 + 160 padded
    mark = session.mark("greeting")
    session.clear()
    assert [wire.BinaryFrame] * 3 == [type(frame) for frame in sent[:3]]
    assert [320, 320, 320] == [len(frame) for frame in sent[:3]]
    assert bytes(160) == sent[2][160:]  # the tail padded with silence
    assert {"action": "notify", "payload": {"name": "greeting"}} == json.loads(sent[3])
    assert {"action": "clear"} == json.loads(sent[4])
    # Vonage confirms a clear with websocket:cleared, not with the notifies it dropped.
    assert mark.done()
    assert "cleared" == mark.result()


async def test_a_notify_echo_resolves_its_mark_played() -> None:
    session = LiveSession(wake=lambda: None, bidirectional=True, codec=VonageCodec())
    session.receive_message(connected())
    mark = session.mark("m1")
    session.receive_message('{"event":"websocket:notify","payload":{"name":"m1"}}')
    for event in session.events_received():
        if isinstance(event, wire.Mark):
            session.mark_echoed(event.name)
    assert "played" == mark.result()


@given(st.binary(max_size=2000), st.booleans())
def test_any_message_is_an_event_or_a_reason(frame: bytes, binary: bool) -> None:
    codec = VonageCodec()
    codec.parse(connected())
    outcome: object
    try:
        outcome = codec.parse_binary(frame) if binary else codec.parse(frame)
    except RemoteProtocolError as exc:
        outcome = exc.reason
    assert outcome
    assert isinstance(outcome, str | wire.Start | wire.Media | wire.Dtmf | wire.Mark
                      | wire.UnknownEvent)


def test_binary_frames_are_bad_frames_on_every_other_provider() -> None:
    media = json.dumps({"event": "media", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "0", "payload": "AAAA"}}).encode()
    for provider in ("twilio", "telnyx", "plivo", "exotel", "signalwire"):
        session = Session(codec=codec_for(provider, wire.Upgrade("/")))
        session.receive_message(media, binary=True)  # valid JSON, but in a binary frame
        [bad] = session.events_received()
        assert "binary frame" in getattr(bad, "reason", ""), provider


def test_auto_tells_vonage_from_its_first_message() -> None:
    assert "vonage" == provider_from_message(connected())
    twilio_start = '{"event":"start","streamSid":"MZ1","start":{}}'
    assert "signalwire" == provider_from_message(twilio_start, bearer=True)
    with pytest.raises(RemoteProtocolError, match="ambiguous"):
        provider_from_message(twilio_start)
    codec = codec_for("auto", wire.Upgrade("/", "", (("authorization", "Bearer x"),)))
    with pytest.raises(RemoteProtocolError, match="before the provider is known"):
        codec.parse_binary(bytes(640))  # type: ignore[attr-defined]
    codec.parse(connected())
    assert "vonage" == codec.provider
    assert isinstance(codec.parse_binary(bytes(640)), wire.Media)  # type: ignore[attr-defined]


def test_the_custom_value_and_the_signed_jwt() -> None:
    assert token_matches("vonage-custom-value", CUSTOM)
    assert token_matches(CUSTOM, CUSTOM)  # the value verbatim
    assert not token_matches("vonage-custom-value", "Bearer other")
    assert not token_matches("vonage-custom-value", None)
    assert None is jwt_problem(SECRET, f"Bearer {signed_jwt()}")
    assert "bad_token" == jwt_problem(SECRET, f"Bearer {signed_jwt(OTHER_SECRET)}")
    assert "bad_token" == jwt_problem(SECRET, f"Bearer {signed_jwt(issued=time.time() - 900)}")
    assert "bad_token" == jwt_problem(SECRET, "Bearer not-a-jwt")
    assert "missing_token" == jwt_problem(SECRET, None)
    unsigned_iat = jwt.encode({"iss": "Vonage"}, SECRET, algorithm="HS256")
    assert "bad_token" == jwt_problem(SECRET, f"Bearer {unsigned_iat}")


def test_a_jwt_is_bound_to_the_application_when_its_id_is_set() -> None:
    token = f"Bearer {signed_jwt()}"  # application_id app-1
    assert None is jwt_problem(SECRET, token, application_id="app-1")
    assert "wrong_application" == jwt_problem(SECRET, token, application_id="app-2")
    no_claim = jwt.encode({"iat": int(time.time())}, SECRET, algorithm="HS256")
    assert "wrong_application" == jwt_problem(SECRET, f"Bearer {no_claim}",
                                              application_id="app-1")


async def test_an_upgrade_signed_for_another_application_is_refused(
        transport: str, logs: LogEvents) -> None:
    """With vonage_application_id set, a JWT the account signed for another of its
    applications opens no stream, and replay signs for the application it is given."""
    server = StreamServer(Settings(
        port=0, transport=transport, vonage_signature_secret=SECRET,
        vonage_application_id="app-1", routes=(Route("/vonage", (), provider="vonage"),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
        url = f"ws://127.0.0.1:{server.port}/vonage"
        [other], [own] = [(await replay([fixture], url, speed=0, signing=Signing(
            vonage_signature_secret=SECRET, vonage_application_id=app))).sessions
            for app in ("app-2", "app-1")]
    finally:
        await server.stop()
    assert "HTTP 403" in (other.error or "")
    assert own.ok, own.error
    assert ["wrong_application"] == [line["reason"]
                                     for line in events(logs, "handshake.rejected")]


def test_a_fixture_keeps_binary_frames_byte_for_byte(tmp_path: Path) -> None:
    frames = [FixtureFrame(0.0, connected()), FixtureFrame(40.0, "", b"\x00\xff" * 320)]
    path = tmp_path / "v.jsonl"
    path.write_text(dump_fixture({"provider": "vonage"}, frames), encoding="utf-8")
    assert tuple(frames) == load_fixture(path).frames


# -- end to end, both transports ------------------------------------------------------


@pytest.fixture
async def server(transport: str, tmp_path: Path) -> AsyncIterator[StreamServer]:
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="handlers")
    echo = resolve_handler("echo", {"delay_ms": 100, "mark_every_ms": 400}, key="handlers")
    routes = (Route("/vonage", (HandlerSpec("log", LogHandler), recorder), provider="vonage"),
              Route("/talk", (echo,), bidirectional=True, provider="vonage"),
              Route("/twilio", (HandlerSpec("log", LogHandler),)),
              Route("/auto", (HandlerSpec("log", LogHandler),), provider="auto"))
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   vonage_signature_secret=SECRET,
                                   vonage_token="vonage-custom-value",
                                   public_url="wss://voice.example.com"))
    await server.start()
    yield server
    await server.stop()


async def test_the_bundled_session_replays_and_records(
        server: StreamServer, logs: LogEvents, tmp_path: Path) -> None:
    fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/vonage", speed=0,
                          concurrency=2, headers={"Authorization": f"Bearer {signed_jwt()}"})
    assert (2, 0) == (len(report.sessions), report.failed), report.sessions[0].error
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    audio = b"".join(frame.binary for frame in fixture.frames if frame.binary is not None)
    for session in report.sessions:
        [started] = [e for e in events(logs, "stream.started")
                     if e["call_sid"] == session.call_sid]
        outcome = outcome_of(logs, started["stream_sid"])
        assert [] == differences(session.expect, outcome)
        assert ("vonage", {"encoding": "audio/l16", "sample_rate": 16000, "channels": 1}) == (
            started["provider"], started["media_format"])
        wav_path = tmp_path / session.call_sid / f"{started['stream_sid']}.wav"
        with wave.open(str(wav_path), "rb") as wav:
            assert (1, 2, 16000) == (wav.getnchannels(), wav.getsampwidth(),
                                     wav.getframerate())
            assert audio == wav.readframes(wav.getnframes())
    assert report.sessions[0].call_sid != report.sessions[1].call_sid  # each copy its own


async def test_the_same_session_at_an_auto_route(server: StreamServer,
                                                 logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
    result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/auto", speed=0,
                                  headers={"Authorization": CUSTOM})
    assert result.ok, result.error
    await until(lambda: events(logs, "stream.stopped"))
    [started] = events(logs, "stream.started")
    assert [] == differences(result.expect, outcome_of(logs, started["stream_sid"]))
    assert "vonage" == started["provider"]


@pytest.mark.parametrize(("authorization", "reason"), [
    (None, "missing_token"), ("Bearer wrong", "bad_token"),
    (f"Bearer {signed_jwt(OTHER_SECRET)}", "bad_token")])
async def test_credentials_are_checked(server: StreamServer, logs: LogEvents,
                                       authorization: str | None, reason: str) -> None:
    fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
    headers = {"Authorization": authorization} if authorization else {}
    result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/vonage", speed=0,
                                  headers=headers)
    assert "HTTP 403" in (result.error or "")
    assert reason == events(logs, "handshake.rejected")[0]["reason"]


async def test_talking_back_binary_audio_and_notify_echoes(server: StreamServer,
                                                          logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
    result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/talk", speed=4,
                                  headers={"Authorization": CUSTOM})
    assert result.ok, result.error
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    echo = stopped["handlers"]["echo"]
    # What was echoed came back as binary audio in whole 20 ms frames (the last ones may
    # still be on their way when the replay closes); the notifies the peer echoed after
    # playing resolved their marks.
    assert 0 < result.audio_bytes_received <= echo["frames_echoed"] * 640
    assert 0 == result.audio_bytes_received % 640
    assert echo["marks_sent"] == echo["marks_played"] + echo["marks_cleared"] > 0
    assert len(result.marks_played) >= echo["marks_played"] >= 1


async def test_binary_frames_on_a_twilio_route_are_counted_and_the_call_goes_on(
        server: StreamServer, logs: LogEvents, tmp_path: Path) -> None:
    twilio = load_fixture(FIXTURES / "inbound_params.jsonl")
    media = next(f for f in twilio.frames if '"media"' in f.text)
    frames = list(twilio.frames)
    at = frames.index(media)
    frames[at:at] = [FixtureFrame(media.at_ms, "", media.text.encode()),  # JSON, binary
                     FixtureFrame(media.at_ms, "", bytes(160))]
    path = tmp_path / "binary.jsonl"
    path.write_text(dump_fixture(dict(twilio.header), frames), encoding="utf-8")
    result = await replay_session(load_fixture(path), f"ws://127.0.0.1:{server.port}/twilio",
                                  speed=0)
    assert result.ok, result.error
    await until(lambda: events(logs, "stream.stopped"))
    expect = {**twilio.expect, "bad_frames": 2}
    assert [] == differences(expect, outcome_of(logs, twilio.stream_sid()))
    reasons = {e["reason"] for e in events(logs, "stream.bad_frame")}
    assert {"binary frame: this provider sends text frames only"} == reasons


async def test_a_fragmented_binary_message_is_one_frame_of_audio(server: StreamServer,
                                                                logs: LogEvents) -> None:
    async with connect(f"ws://127.0.0.1:{server.port}/vonage",
                       additional_headers={"Authorization": CUSTOM}) as client:
        await client.send(connected())
        await client.send([b"\x01\x00" * 160, b"\x02\x00" * 160])  # one message, 2 frames
        await client.send(b"\x03\x00" * 320)
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert ({"inbound": 2}, {"inbound": 1280}, 0) == (
        stopped["frames"], stopped["bytes"], stopped["bad_frames"])


def answer(port: int, target: str, *, signed: bool = True,
           body: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Vonage's request to the answer URL: (status, content type, body)."""
    headers = {"Authorization": f"Bearer {signed_jwt()}"} if signed else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{target}", data=data,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def test_the_answer_url_connects_the_call_with_its_context(
        server: StreamServer, logs: LogEvents) -> None:
    status, kind, body = await asyncio.to_thread(
        answer, server.port, "/twiml/talk?customerId=cus_8812&uuid=U-77&from=447700900000"
        "&to=447700900001&conversation_uuid=CON-1")
    assert (200, "application/json") == (status, kind)
    [action] = json.loads(body)
    [endpoint] = action["endpoint"]
    assert ("connect", "websocket", "wss://voice.example.com/talk", "audio/l16;rate=16000",
            {"type": "vonage"}) == (action["action"], endpoint["type"], endpoint["uri"],
                                    endpoint["content-type"], endpoint["authorization"])
    headers = endpoint["headers"]
    assert {"call_uuid": "U-77", "from": "447700900000", "to": "447700900001",
            "customerId": "cus_8812"} == headers
    # Vonage connects with those headers: the stream's call_sid and context are the call's.
    plan = SessionPlan(inbound=[0] * 3200, call_sid=headers["call_uuid"],
                       custom_parameters={k: v for k, v in headers.items()
                                          if k != "call_uuid"})
    fixture = Fixture("answered", tuple(synthesize_vonage(plan)), {"provider": "vonage"})
    result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/talk", speed=0,
                                  headers={"Authorization": f"Bearer {signed_jwt()}"})
    assert result.ok, result.error
    await until(lambda: events(logs, "stream.stopped"))
    [started] = events(logs, "stream.started")
    assert ("U-77", headers) == (started["call_sid"], started["custom_parameters"])


async def test_the_answer_url_takes_a_post_and_refuses_an_unsigned_request(
        server: StreamServer, logs: LogEvents) -> None:
    status, _, body = await asyncio.to_thread(
        answer, server.port, "/twiml/vonage", body={"uuid": "U-8", "from": "4477",
                                                    "to": "4478"})
    assert 200 == status
    assert "U-8" == json.loads(body)[0]["endpoint"][0]["headers"]["call_uuid"]
    status, _, _ = await asyncio.to_thread(answer, server.port, "/twiml/vonage?uuid=U-9",
                                           signed=False)
    assert 403 == status
    assert "missing_token" == events(logs, "webhook.rejected")[0]["reason"]


@pytest.mark.parametrize("transport", ["websockets"])
async def test_the_answer_url_never_hands_the_custom_token_to_an_unsigned_request(
        transport: str, logs: LogEvents) -> None:
    """With vonage_token and no signature secret nothing tells Vonage from a stranger:
    every answer request is refused, and the token is in no answer."""
    server = StreamServer(Settings(
        port=0, transport=transport, public_url="wss://voice.example.com",
        vonage_token="vonage-custom-value",
        routes=(Route("/vonage", (HandlerSpec("log", LogHandler),), provider="vonage"),)))
    await server.start()
    try:
        status, _, body = await asyncio.to_thread(answer, server.port, "/twiml?uuid=U-1",
                                                  signed=False)
    finally:
        await server.stop()
    assert 403 == status
    assert b"vonage-custom-value" not in body
    assert "unsigned_answer_request" == events(logs, "webhook.rejected")[0]["reason"]


def test_ncco_headers_stay_within_vonages_512_bytes() -> None:
    document, left_out = ncco("wss://h/v", {"uuid": "U-1"},
                              {"a": "x" * 300, "b": "y" * 300, "c": "z"}, authorization=None)
    headers = document[0]["endpoint"][0]["headers"]
    assert {"call_uuid": "U-1", "a": "x" * 300, "c": "z"} == headers
    assert ["b"] == left_out
    assert "authorization" not in document[0]["endpoint"][0]


@pytest.mark.parametrize("transport", ["websockets"])
async def test_the_answer_url_refuses_a_request_signed_for_another_application(
        transport: str, logs: LogEvents) -> None:
    server = StreamServer(Settings(
        port=0, transport=transport, public_url="wss://voice.example.com",
        vonage_signature_secret=SECRET, vonage_application_id="app-2",
        routes=(Route("/vonage", (HandlerSpec("log", LogHandler),), provider="vonage"),)))
    await server.start()
    try:
        status, _, _ = await asyncio.to_thread(answer, server.port, "/twiml?uuid=U-1")
    finally:
        await server.stop()
    assert 403 == status
    assert "wrong_application" == events(logs, "webhook.rejected")[0]["reason"]
