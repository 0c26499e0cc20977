"""Azure Communication Services: the codec both ways, its parser against any input, the
session over ACS frames, and the stream end to end with ACS's signed upgrade."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings, load_settings
from streamsvc.exceptions import ConfigError, RemoteProtocolError
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers import CodecOptions, codec_for
from streamsvc.providers.acs import AcsCodec, parse_timestamp_ms
from streamsvc.providers.acs_auth import ACS_ISSUER
from streamsvc.server import StreamServer
from streamsvc.session import BadFrame, Session

from .conftest import LogEvents, events, until

HEADERS = {"x-ms-call-connection-id": "421f0b00-call-conn",
           "x-ms-call-correlation-id": "e6f7a0c1-corr"}
SUBSCRIPTION = "7b3a1c2d-subscription"
T0 = "2026-11-23T10:00:00.000Z"
T0_MS = parse_timestamp_ms(T0)


def metadata(rate: int = 16000) -> str:
    return json.dumps({"kind": "AudioMetadata", "audioMetadata": {
        "subscriptionId": SUBSCRIPTION, "encoding": "PCM", "sampleRate": rate, "channels": 1,
        "length": rate // 25}})


def audio(offset_ms: int, *, participant: str = "8:acs:caller", silent: bool = False,
          size: int = 640) -> str:
    ms = T0_MS + offset_ms
    stamp = f"2026-11-23T10:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}Z"
    return json.dumps({"kind": "AudioData", "audioData": {
        "timestamp": stamp, "participantRawID": participant,
        "data": base64.b64encode(bytes(size)).decode(), "silent": silent}})


def dtmf(digit: str) -> str:
    return json.dumps({"kind": "DtmfData", "dtmfData": {"data": digit}})


# -- the codec, both ways -----------------------------------------------------------------

def test_audio_metadata_opens_the_stream_with_the_upgrades_ids() -> None:
    codec = AcsCodec(HEADERS)
    start = codec.parse(metadata())
    assert isinstance(start, wire.Start)
    assert (SUBSCRIPTION, "421f0b00-call-conn", ("inbound",), 16000, "audio/pcm") == (
        start.started_stream_sid, start.call_sid, start.tracks, start.media_format.sample_rate,
        start.media_format.encoding)
    assert "e6f7a0c1-corr" == codec.correlation_id


@pytest.mark.parametrize(("frame", "expected"), [
    pytest.param(audio(0), ("inbound", T0_MS, 640), id="mixed-audio"),
    pytest.param(audio(20, participant=""), ("inbound", T0_MS + 20, 640), id="no-participant"),
    pytest.param(audio(40, silent=True, size=0), ("inbound", T0_MS + 40, 0), id="silent"),
])
def test_audio_data_is_media_on_the_epoch_millisecond_timeline(
        frame: str, expected: tuple[str, int, int]) -> None:
    codec = AcsCodec(HEADERS)
    codec.parse(metadata())
    media = codec.parse(frame)
    assert isinstance(media, wire.Media)
    assert expected == (media.track, media.timestamp_ms, len(media.payload))
    assert SUBSCRIPTION == media.stream_sid


def test_unmixed_audio_makes_each_participant_a_track() -> None:
    codec = AcsCodec(HEADERS, unmixed=True)
    start = codec.parse(metadata())
    assert isinstance(start, wire.Start)
    assert () == start.tracks
    media = codec.parse(audio(0, participant="8:acs:agent"))
    assert isinstance(media, wire.Media)
    assert "8:acs:agent" == media.track


def test_dtmf_data_is_a_key_press_and_anything_else_a_bad_frame() -> None:
    codec = AcsCodec(HEADERS)
    event = codec.parse(dtmf("#"))
    assert isinstance(event, wire.Dtmf)
    assert "#" == event.digit
    with pytest.raises(RemoteProtocolError, match="not a key"):
        codec.parse(dtmf("7" * 500))


@pytest.mark.parametrize(("frame", "reason"), [
    ("not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"audioData": {}}', "missing or non-string `kind`"),
    ('{"kind": "AudioData", "audioData": {"timestamp": "yesterday", "data": ""}}',
     "timestamp"),
    ('{"kind": "AudioData", "audioData": {"timestamp": "' + T0 + '", "data": "!!"}}',
     "invalid AudioData"),
    ('{"kind": "AudioMetadata", "audioMetadata": {"subscriptionId": 5}}',
     "invalid AudioMetadata"),
])
def test_bad_frames_raise_with_a_reason(frame: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        AcsCodec(HEADERS).parse(frame)


def test_a_kind_this_version_does_not_know_is_ignored() -> None:
    assert wire.UnknownEvent("TranscriptionData") == AcsCodec(HEADERS).parse(
        '{"kind": "TranscriptionData", "transcriptionData": {}}')


def test_outbound_audio_and_stop_audio_are_exactly_acs_shapes() -> None:
    codec = AcsCodec(HEADERS)
    assert {"Kind": "AudioData", "AudioData": {"Data": "AAEC"}, "StopAudio": None} == (
        json.loads(codec.serialize_media(SUBSCRIPTION, b"\x00\x01\x02")))
    assert {"Kind": "StopAudio", "AudioData": None, "StopAudio": {}} == json.loads(
        codec.serialize_clear(SUBSCRIPTION))
    assert codec.serialize_mark(SUBSCRIPTION, "m") is None  # ACS has no marks


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.builds(lambda kind, body: json.dumps({"kind": kind, **body}),
                           st.sampled_from(["AudioMetadata", "AudioData", "DtmfData", "x"]),
                           st.dictionaries(st.sampled_from(
                               ["audioMetadata", "audioData", "dtmfData"]),
                               st.dictionaries(st.text(max_size=12), st.one_of(
                                   st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
                                   max_size=5), max_size=2))))
def test_any_input_is_an_event_or_a_remote_protocol_error(frame: Any) -> None:
    codec = AcsCodec(HEADERS)
    try:
        event: object = codec.parse(frame)
    except RemoteProtocolError as exc:
        event = exc
    assert isinstance(event, wire.Start | wire.Media | wire.Dtmf | wire.UnknownEvent) or (
        isinstance(event, RemoteProtocolError) and event.reason)


# -- the session over ACS ----------------------------------------------------------------

def acs_session(*, unmixed: bool = False) -> Session:
    session = Session(codec=codec_for("acs", wire.Upgrade.of("/", "", HEADERS.items()),
                                      CodecOptions(unmixed=unmixed)))
    session.receive_message(metadata())
    assert [wire.Start] == [type(e) for e in session.events_received()]
    return session


def test_an_acs_calls_duration_is_its_length_not_a_wall_clock_moment() -> None:
    """ACS timestamps are ISO 8601 wall-clock times: 60 frames of 20 ms last 1,200 ms."""
    session = acs_session()
    for offset in range(0, 1200, 20):
        session.receive_message(audio(offset))
    assert 1200 == session.close("stop").duration_ms


def test_gaps_reordering_and_duplicates_are_counted_from_the_timestamps() -> None:
    session = acs_session()
    for offset in (0, 20, 80, 60, 100, 100):  # 40 missing, 60 late, 100 twice
        session.receive_message(audio(offset))
    session.receive_message(dtmf("4"))
    summary = session.close("stop")
    assert ({"inbound": 6}, {"inbound": 1}, {"inbound": 1}, {"inbound": 1}, "4") == (
        summary.frames, summary.missing_frames, summary.out_of_order_frames,
        summary.duplicate_frames, summary.dtmf)
    assert 16000 == session.sample_rate
    assert summary.frames["inbound"] * 640 == summary.bytes["inbound"]


def test_unmixed_participants_are_tracks_up_to_a_bound() -> None:
    session = acs_session(unmixed=True)
    for index in range(12):
        session.receive_message(audio(0, participant=f"8:acs:p{index}"))
    bad = [e for e in session.events_received() if isinstance(e, BadFrame)]
    assert 8 == len(session.track_stats)
    assert 4 == len(bad)


def test_pcm16_is_the_payload_itself_on_acs() -> None:
    session = acs_session()
    session.receive_message(audio(0))
    [media] = session.events_received()
    assert isinstance(media, wire.Media)
    assert media.payload == session.pcm16(media)


# -- end to end: ACS's signed upgrade, the stream, the recording ---------------------------

AUDIENCE = "c5b6e1a0-acs-resource-id"


class KeySet:
    """A JSON Web Key Set served over HTTP on loopback, as ACS publishes its keys."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        body = json.dumps({"keys": [{**jwk, "kid": "acs-key-1", "use": "sig"}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/calling/keys"

    def token(self, *, audience: str = AUDIENCE, expires_in: float = 300,
              key: rsa.RSAPrivateKey | None = None) -> str:
        claims = {"iss": ACS_ISSUER, "aud": audience, "exp": int(time.time() + expires_in)}
        return jwt.encode(claims, key or self.private, algorithm="RS256",
                          headers={"kid": "acs-key-1"})


@pytest.fixture(scope="module")
def keys() -> Iterator[KeySet]:
    key_set = KeySet()
    yield key_set
    key_set.http.shutdown()
    key_set.http.server_close()


@pytest.fixture
async def acs_server(keys: KeySet, transport: str,
                     tmp_path: Path) -> AsyncIterator[StreamServer]:
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="t")
    routes = (Route("/acs", (HandlerSpec("log", LogHandler), recorder), provider="acs"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   acs_audience=AUDIENCE, acs_jwks_url=keys.url))
    await server.start()
    yield server
    await server.stop()


async def test_an_acs_stream_arrives_with_its_ids_counts_and_a_16_khz_recording(
        acs_server: StreamServer, keys: KeySet, logs: LogEvents, tmp_path: Path) -> None:
    headers = {**HEADERS, "Authorization": f"Bearer {keys.token()}"}
    async with connect(f"ws://127.0.0.1:{acs_server.port}/acs",
                       additional_headers=headers) as connection:
        await connection.send(metadata())
        for index in range(50):
            if index != 20:  # one frame lost
                await connection.send(audio(index * 20))
        await connection.send(dtmf("5"))
    await until(lambda: events(logs, "stream.stopped"))
    (started,) = events(logs, "stream.started")
    assert ("acs", "421f0b00-call-conn", SUBSCRIPTION, "e6f7a0c1-corr") == (
        started["provider"], started["call_sid"], started["stream_sid"],
        started["correlation_id"])
    (stopped,) = events(logs, "stream.stopped")
    assert ("stop", {"inbound": 49}, {"inbound": 1}, "5") == (
        stopped["reason"], stopped["frames"], stopped["missing_frames"], stopped["dtmf"])
    wav_path = tmp_path / "421f0b00-call-conn" / f"{SUBSCRIPTION}.wav"
    with wave.open(str(wav_path), "rb") as wav:
        assert (1, 16000, 50 * 320) == (wav.getnchannels(), wav.getframerate(),
                                        wav.getnframes())


@pytest.mark.parametrize(("make_token", "reason"), [
    pytest.param(lambda keys: None, "missing_token", id="missing"),
    pytest.param(lambda keys: "Bearer not.a.jwt", "bad_token", id="garbage"),
    pytest.param(lambda keys: f"Bearer {keys.token(audience='someone-else')}", "bad_token",
                 id="other-audience"),
    pytest.param(lambda keys: f"Bearer {keys.token(expires_in=-60)}", "bad_token",
                 id="expired"),
    pytest.param(lambda keys: "Bearer " + keys.token(key=rsa.generate_private_key(
        public_exponent=65537, key_size=2048)), "bad_token", id="signed-by-another-key"),
])
async def test_an_acs_upgrade_without_a_valid_token_gets_403_before_any_session(
        acs_server: StreamServer, keys: KeySet, logs: LogEvents,
        make_token: Any, reason: str) -> None:
    authorization = make_token(keys)
    headers = dict(HEADERS) | ({"Authorization": authorization} if authorization else {})
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://127.0.0.1:{acs_server.port}/acs", additional_headers=headers):
            pass
    assert 403 == refused.value.response.status_code
    (rejected,) = events(logs, "handshake.rejected")
    assert (reason, 403) == (rejected["reason"], rejected["status"])
    assert [] == events(logs, "stream.started")


def test_an_acs_route_on_a_public_address_needs_the_audience_or_insecure(
        tmp_path: Path) -> None:
    config = tmp_path / "acs.toml"
    config.write_text('[[routes]]\npath = "/acs"\nprovider = "acs"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(config_path=str(config), env={"STREAMSVC_HOST": "0.0.0.0"})
    assert "acs_audience" == refused.value.key
    load_settings(config_path=str(config), env={"STREAMSVC_HOST": "0.0.0.0",
                                                "STREAMSVC_ACS_AUDIENCE": AUDIENCE})


async def test_on_a_bidirectional_acs_route_audio_goes_back_and_marks_follow_its_clock(
        keys: KeySet, logs: LogEvents, transport: str) -> None:
    outcomes: dict[str, str] = {}

    class Talker(Handler):
        def on_start(self, session: LiveSession) -> None:
            self.session = session
            session.send_audio(bytes(16000 * 2 // 5))  # 200 ms of PCM16 at 16 kHz
            self._mark("greeting")

        def on_dtmf(self, event: wire.Dtmf) -> None:
            self._mark("after-dtmf")  # nothing queued: played at once
            self.session.send_audio(bytes(16000 * 2 * 5))  # 5 s: cleared before it ends
            self._mark("long")
            self.session.clear()

        def _mark(self, name: str) -> None:
            self.session.mark(name).add_done_callback(
                lambda done: outcomes.__setitem__(name, done.result()))

    route = Route("/acs", (HandlerSpec("talker", Talker), HandlerSpec("log", LogHandler)),
                  bidirectional=True, provider="acs")
    server = StreamServer(Settings(port=0, routes=(route,), transport=transport))
    await server.start()
    received: list[dict[str, Any]] = []
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/acs",
                           additional_headers=HEADERS) as connection:
            await connection.send(metadata())
            for index in range(20):
                await connection.send(audio(index * 20))
            await asyncio.sleep(0.4)  # the greeting has played by the clock
            await connection.send(dtmf("1"))
            await asyncio.sleep(0.2)
            with contextlib.suppress(TimeoutError):
                while True:
                    received.append(json.loads(await asyncio.wait_for(connection.recv(),
                                                                      0.2)))
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    kinds = [message["Kind"] for message in received]
    assert "StopAudio" == kinds[-1]
    assert 10 + 250 == kinds.count("AudioData")  # 20 ms messages of 640 bytes
    assert {640} == {len(base64.b64decode(m["AudioData"]["Data"]))
                     for m in received if m["Kind"] == "AudioData"}
    (stopped,) = events(logs, "stream.stopped")
    assert (3, 0) == (stopped["marks_sent"], stopped["marks_received"])
    assert {"greeting": "played", "after-dtmf": "played", "long": "cleared"} == outcomes
