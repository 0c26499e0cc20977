"""The built-in handlers: recorder, levels, dtmf, echo, and the talking-back verbs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamsvc import wire
from streamsvc.builtins.dtmf import DtmfHandler
from streamsvc.builtins.levels import LevelsHandler
from streamsvc.config import Route, Settings, load_settings
from streamsvc.exceptions import ConfigError, LocalProtocolError
from streamsvc.fixtures import Fixture, load_fixture
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.replay import replay_session
from streamsvc.server import StreamServer
from streamsvc.synth import SessionPlan, mulaw_encode, synthesize

from .conftest import LogEvents, events, until
from .test_audio import g711_ulaw_to_linear

FIXTURES = Path(__file__).parent.parent / "fixtures"
G711 = np.array([g711_ulaw_to_linear(code) for code in range(256)], dtype="<i2")


def expected_recording(fixture: Fixture) -> np.ndarray:
    """The WAV the recorder must write, built from the fixture's frames alone: each payload
    expanded by the G.711 reference table, at (timestamp - first) * 8, silence elsewhere."""
    media = []
    for frame in fixture.frames:
        try:
            message = json.loads(frame.text)
            body = message["media"]
            entry = (body["track"], int(body["timestamp"]),
                     base64.b64decode(body["payload"], validate=True))
        except (ValueError, TypeError, KeyError):
            continue  # not a valid media frame: the garbage the server counts as bad
        if message["streamSid"] == fixture.expect["stream_sid"] and entry[1] >= 0:
            media.append(entry)
    tracks = [t for t in ("inbound", "outbound") if any(m[0] == t for m in media)]
    first = min(timestamp for _, timestamp, _ in media)
    length = max((ts - first) * 8 + len(payload) for _, ts, payload in media)
    audio = np.zeros((length, len(tracks)), dtype="<i2")
    for track, timestamp, payload in media:
        start = (timestamp - first) * 8
        audio[start : start + len(payload), tracks.index(track)] = G711[list(payload)]
    return audio


def read_wav(path: Path) -> tuple[int, int, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        channels, rate = wav.getnchannels(), wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return channels, rate, data.reshape(-1, channels)


async def serve(transport: str, routes: tuple[Route, ...]) -> StreamServer:
    server = StreamServer(Settings(port=0, routes=routes, transport=transport))
    await server.start()
    return server


def recorder(directory: Path, **options: Any) -> HandlerSpec:
    return resolve_handler("recorder", {"dir": str(directory), **options}, key="test")


@pytest.mark.parametrize("name", ["inbound_params.jsonl", "both_tracks.jsonl",
                                  "missing_reordered.jsonl", "garbage_midcall.jsonl"])
async def test_recording_equals_the_g711_decode_of_what_was_sent(tmp_path: Path,
                                                                 name: str, transport: str) -> None:
    server = await serve(transport, (Route("/stream", (recorder(tmp_path),)),))
    fixture = load_fixture(FIXTURES / name)
    try:
        assert (await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream",
                                     speed=0)).ok
    finally:
        await server.stop()
    expect = fixture.expect
    wav_path = tmp_path / expect["call_sid"] / f"{expect['stream_sid']}.wav"
    channels, rate, audio = read_wav(wav_path)
    expected = expected_recording(fixture)
    assert (expected.shape[1], 8000) == (channels, rate)
    assert expected.shape == audio.shape
    assert np.array_equal(expected, audio)
    sidecar = json.loads(wav_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert expect["custom_parameters"] == sidecar["custom_parameters"]
    assert (expect["frames"], expect["missing_frames"]) == (
        sidecar["summary"]["frames"], sidecar["summary"]["missing_frames"])
    assert [] == list(tmp_path.rglob("*.partial"))


async def test_missing_frames_are_silence_in_the_recording(tmp_path: Path, transport: str) -> None:
    server = await serve(transport, (Route("/stream", (recorder(tmp_path),)),))
    fixture = load_fixture(FIXTURES / "missing_reordered.jsonl")  # frames 50-52, 90 dropped
    try:
        await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream", speed=0)
    finally:
        await server.stop()
    wav = tmp_path / fixture.expect["call_sid"] / f"{fixture.expect['stream_sid']}.wav"
    _, _, audio = read_wav(wav)
    assert not audio[50 * 160 : 53 * 160].any()
    assert not audio[90 * 160 : 91 * 160].any()
    assert audio[53 * 160 : 90 * 160].any()


async def test_an_aborted_call_leaves_a_valid_wav_and_sidecar(tmp_path: Path,
                                                              logs: LogEvents,
                                                              transport: str) -> None:
    server = await serve(transport, (Route("/stream", (recorder(tmp_path, window_ms=200),)),))
    fixture = load_fixture(FIXTURES / "both_tracks.jsonl")
    try:
        ws = await connect(f"ws://127.0.0.1:{server.port}/stream")
        for frame in fixture.frames[:102]:  # connected, start, 50 frames of each track
            await ws.send(frame.text)
        await until(lambda: server.streams)
        ws.transport.abort()
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    wav = tmp_path / fixture.expect["call_sid"] / f"{fixture.expect['stream_sid']}.wav"
    channels, _, audio = read_wav(wav)
    assert (2, (50 * 160, 2)) == (channels, audio.shape)
    sent = Fixture("sent", fixture.frames[:102], fixture.header)
    assert np.array_equal(expected_recording(sent), audio)
    sidecar = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
    assert "aborted" == sidecar["summary"]["reason"]


async def test_a_full_disk_stops_only_the_recorder(
    tmp_path: Path,
    logs: LogEvents,
    transport: str,
) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    folder = tmp_path / fixture.expect["call_sid"]
    folder.mkdir()
    # A real ENOSPC: the recording's file is /dev/full, where every write fails.
    os.symlink("/dev/full", folder / f"{fixture.expect['stream_sid']}.wav.partial")
    levels = resolve_handler("levels", {}, key="test")
    route = Route("/stream", (recorder(tmp_path, window_ms=200), levels))
    server = await serve(transport, (route,))
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream",
                                      speed=0)
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    assert result.ok
    (disk_error,) = events(logs, "recorder.disk_error")
    assert "ENOSPC" == disk_error["error"]
    (stopped,) = events(logs, "stream.stopped")
    assert ("stop", {"recorder": 1}) == (stopped["reason"], stopped["handler_errors"])
    assert fixture.expect["frames"] == stopped["frames"]
    assert "levels" in stopped["handlers"]


def media_event(timestamp: int, samples: list[int], track: str = "inbound") -> wire.Media:
    payload = base64.b64encode(mulaw_encode(samples)).decode()
    event = wire.parse(json.dumps({"event": "media", "streamSid": "MZ1", "media": {
        "track": track, "chunk": "1", "timestamp": str(timestamp), "payload": payload}}))
    assert isinstance(event, wire.Media)
    return event


def tone(frames: int, amplitude: int = 8000) -> list[list[int]]:
    t = np.arange(frames * 160) / 8000
    samples = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(int).tolist()
    return [samples[i * 160 : (i + 1) * 160] for i in range(frames)]


@pytest.mark.parametrize("detector", ["energy", "webrtc"])
def test_levels_finds_the_speech_segment_and_its_level(detector: str) -> None:
    handler = LevelsHandler(detector=detector, hangover_ms=100)
    chunks = [[0] * 160] * 25 + tone(25) + [[0] * 160] * 50  # 0.5 s tone at 0.5 s
    for i, samples in enumerate(chunks):
        handler.on_media(media_event(99 + 20 * i, samples))
    report = handler.report()["inbound"]
    assert detector == report["detector"]
    (segment,) = report["segments"]
    if detector == "energy":
        assert ([599, 1099], 500) == (segment, report["talk_ms"])
    else:  # WebRTC's detector takes a frame or two to decide and holds on a little
        assert 599 <= segment[0] <= 660
        assert 1099 <= segment[1] <= 1320
    # A sine of amplitude 8000 (-15.2 dBFS RMS) for a quarter of the time: 6 dB less.
    assert -21.5 < report["rms_dbfs"] < -21.0
    assert -12.5 < report["peak_dbfs"] < -12.0


def test_levels_reports_silence_as_silence() -> None:
    handler = LevelsHandler(detector="energy")
    for i in range(20):
        handler.on_media(media_event(99 + 20 * i, [0] * 160))
    assert {"detector": "energy", "segments": [], "segments_dropped": 0, "talk_ms": 0,
            "rms_dbfs": -120.0, "peak_dbfs": -120.0} == handler.report()["inbound"]


collected: list[str] = []


def collect(session: LiveSession, digits: str) -> None:
    collected.append(digits)


def test_dtmf_times_presses_and_collects_digits_up_to_the_terminator() -> None:
    collected.clear()
    handler = DtmfHandler(on_collect="tests.test_builtins:collect")
    handler.on_start(LiveSession(wake=lambda: None))
    script: list[tuple[int, str | None]] = [(99, None), (119, "1"), (139, "2"), (159, "#"),
                                            (179, "9")]
    for timestamp, digit in script:
        handler.on_media(media_event(timestamp, [0] * 160))
        if digit:
            handler.on_dtmf(wire.Dtmf(dtmf=wire._DtmfBody("inbound_track", digit)))
    report = handler.report()
    assert ("12#9", ["12"]) == (report["digits"], report["collected"])
    assert [{"digit": "1", "at_ms": 119}, {"digit": "2", "at_ms": 139},
            {"digit": "#", "at_ms": 159}, {"digit": "9", "at_ms": 179}] == report["presses"]
    assert ["12"] == collected


async def test_echo_route_returns_the_callers_audio_and_marks_come_back_played(
    logs: LogEvents,
    transport: str,
) -> None:
    echo = resolve_handler("echo", {"delay_ms": 100, "mark_every_ms": 200}, key="test")
    server = await serve(transport, (Route("/connect", (echo,), bidirectional=True),))
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")  # 50 frames, 1 s
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/connect",
                                      speed=1)
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    assert result.ok
    assert (50 - 5) * 160 == result.audio_bytes_received  # all but the last 100 ms
    report = events(logs, "stream.stopped")[0]["handlers"]["echo"]
    assert (45, 4) == (report["frames_echoed"], report["marks_sent"])
    # Marks whose audio had played out before the call ended came back played; the rest
    # were still queued at the end and resolve cleared.
    assert len(result.marks_played) == report["marks_played"] >= 3
    assert 4 == report["marks_played"] + report["marks_cleared"]


class Talker(Handler):
    """Sends a long prompt and a mark, a short one and a mark, then clears."""

    results: list[str] = []  # noqa: RUF012 - shared with the test on purpose

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        self.frames = 0
        session.send_audio(np.zeros(8000, "<i2").tobytes(), sample_rate=16000)  # 0.5 s
        session.mark("short").add_done_callback(lambda f: self.results.append(f.result()))

    def on_media(self, frame: wire.Media) -> None:
        self.frames += 1
        if self.frames == 30:  # 0.6 s: "short" has played
            self.session.send_audio(b"\xff" * 80000)  # 10 s
            self.session.mark("long").add_done_callback(
                lambda f: self.results.append(f.result()))
        elif self.frames == 40:
            self.session.clear()


async def test_marks_resolve_played_or_cleared_like_twilio(transport: str) -> None:
    Talker.results = []
    server = await serve(transport, (Route("/connect", (HandlerSpec("talker", Talker),), True),))
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/connect",
                                      speed=1)
        await until(lambda: len(Talker.results) == 2)
    finally:
        await server.stop()
    assert ["played", "cleared"] == Talker.results
    assert 4000 + 80000 == result.audio_bytes_received  # 0.5 s at 16 kHz became 4000 bytes


async def test_talking_back_on_a_unidirectional_route_is_refused() -> None:
    session = LiveSession(wake=lambda: None, bidirectional=False)
    session.receive_message(synthesize(SessionPlan(inbound=[0] * 160))[1].text)
    for talk in (lambda: session.send_audio(b"\xff" * 160), lambda: session.mark("m"),
                 session.clear):
        with pytest.raises(LocalProtocolError, match="unidirectional"):
            talk()
    assert [] == session.data_to_send()
    await asyncio.sleep(0)


def test_echo_needs_a_bidirectional_route(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[[routes]]\npath = "/s"\nhandlers = ["echo"]\n')
    with pytest.raises(ConfigError, match="bidirectional = true") as caught:
        load_settings(config_path=str(config), env={})
    assert "routes[0].handlers" == caught.value.key
