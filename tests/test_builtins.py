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
from streamsvc.builtins.files import safe_path_component, write_atomically
from streamsvc.builtins.levels import LevelsHandler
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings, load_settings
from streamsvc.exceptions import ConfigError, LocalProtocolError
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.replay import replay_session
from streamsvc.replay.fixture import Fixture, load_fixture
from streamsvc.replay.synth import SessionPlan, mulaw_encode, synthesize
from streamsvc.server import StreamServer

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


# -- the recorder: playback channel, timeline offset, file modes, hostile timestamps ------

class PlaysAndClears(Handler):
    """Plays 5 s of a loud tone as the stream starts; clears after 1 s of the caller."""

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        self.frames = 0
        session.send_audio(mulaw_encode([8000] * 40_000))

    def on_media(self, frame: wire.Media) -> None:
        self.frames += 1
        if self.frames == 50:
            self.session.clear()


async def test_on_connect_routes_the_audio_played_back_is_the_right_channel(
        tmp_path: Path, transport: str) -> None:
    route = Route("/connect", (HandlerSpec("plays", PlaysAndClears), recorder(tmp_path)),
                  bidirectional=True)
    server = await serve(transport, (route,))
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")  # 204 frames of the caller
    try:
        assert (await replay_session(fixture, f"ws://127.0.0.1:{server.port}/connect",
                                     speed=0)).ok
    finally:
        await server.stop()
    wav = tmp_path / fixture.expect["call_sid"] / f"{fixture.expect['stream_sid']}.wav"
    channels, _, audio = read_wav(wav)
    assert (2, 204 * 160) == (channels, len(audio))
    caller = expected_recording(fixture)[:, 0]
    assert np.array_equal(caller, audio[:, 0])  # left: the caller, as before
    played = np.nonzero(audio[:, 1])[0]
    # Right: the tone from the stream's first sample until the clear after 50 frames.
    assert (0, 50 * 160) == (played[0], played[-1] + 1)
    sidecar = json.loads(wav.with_suffix(".json").read_text(encoding="utf-8"))
    assert ["inbound", "playback"] == sidecar["recording"]["channel_tracks"]


async def test_the_sidecar_says_where_the_recording_starts_on_the_media_timeline(
        tmp_path: Path) -> None:
    server = await serve("websockets", (Route("/stream", (recorder(tmp_path),)),))
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    try:
        await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream", speed=0)
    finally:
        await server.stop()
    folder = tmp_path / fixture.expect["call_sid"]
    sidecar = json.loads((folder / f"{fixture.expect['stream_sid']}.json").read_text())
    first_media = json.loads(next(f.text for f in fixture.frames if '"media"' in f.text))
    assert int(first_media["media"]["timestamp"]) == sidecar["recording"]["first_timestamp_ms"]
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert {0o640} == set(modes.values())
    assert 0o750 == folder.stat().st_mode & 0o777


def test_the_file_mode_is_configurable_and_checked(tmp_path: Path) -> None:
    assert 0o600 == resolve_handler("recorder", {"file_mode": "0600"}, key="t").create().mode
    with pytest.raises(ValueError, match="file_mode"):
        resolve_handler("recorder", {"file_mode": "rw-r"}, key="t").create()


def hostile_session(tmp_path: Path, media: list[tuple[int, bytes]]) -> Fixture:
    """A session whose media frames carry the given (timestamp, payload) pairs."""
    plan = SessionPlan(inbound=[100] * 1600)  # ten ordinary frames first
    frames = synthesize(plan)
    stop = frames.pop()
    for timestamp, payload in media:
        frames.append(type(stop)(stop.at_ms, json.dumps({
            "event": "media", "sequenceNumber": "90", "streamSid": plan.stream_sid,
            "media": {"track": "inbound", "chunk": "90", "timestamp": str(timestamp),
                      "payload": base64.b64encode(payload).decode()}})))
    return Fixture("hostile", (*frames, stop), {"expect": {"call_sid": plan.call_sid,
                                                          "stream_sid": plan.stream_sid}})


async def record(fixture: Fixture, tmp_path: Path, logs: LogEvents, transport: str) -> None:
    """Replay ``fixture`` at a route with the recorder and wait for its summary."""
    server = await serve(transport, (Route("/stream", (recorder(tmp_path),)),))
    try:
        assert (await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream",
                                     speed=0)).ok
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()


async def test_a_timestamp_hours_ahead_writes_at_most_max_gap_of_silence(
        tmp_path: Path, logs: LogEvents, transport: str) -> None:
    fixture = hostile_session(tmp_path, [(4 * 3600 * 1000, b"\x00" * 160),
                                         (4 * 3600 * 1000 + 20, b"\x00" * 160)])
    await record(fixture, tmp_path, logs, transport)
    wav = tmp_path / fixture.expect["call_sid"] / f"{fixture.expect['stream_sid']}.wav"
    _, _, audio = read_wav(wav)
    assert (10 * 160 + 60 * 8000 + 2 * 160) == len(audio)  # audio, 60 s of gap, two frames
    (stopped,) = events(logs, "stream.stopped")
    assert 1 == stopped["handlers"]["recorder"]["gaps_capped"]


async def test_an_oversized_payload_is_counted_and_the_recording_still_ends_whole(
        tmp_path: Path, logs: LogEvents, transport: str) -> None:
    fixture = hostile_session(tmp_path, [(300, b"\x00" * 12_000)])
    await record(fixture, tmp_path, logs, transport)
    folder = tmp_path / fixture.expect["call_sid"]
    assert [] == list(folder.glob("*.partial"))
    _, _, audio = read_wav(folder / f"{fixture.expect['stream_sid']}.wav")
    assert 10 * 160 == len(audio)
    (stopped,) = events(logs, "stream.stopped")
    assert ({}, 1) == (stopped["handler_errors"],
                       stopped["handlers"]["recorder"]["oversized_frames"])


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path / "sidecar.json", b"{}", 0o640)
    assert [] == list(tmp_path.iterdir())


@pytest.mark.parametrize(("first", "second"), [("CA/1", "CA_1"), ("a" * 300, "a" * 301)])
def test_ids_that_sanitise_alike_get_distinct_bounded_file_names(first: str,
                                                                 second: str) -> None:
    assert safe_path_component(first) != safe_path_component(second)
    assert len(safe_path_component(first)) <= 80
    assert "CA0123456789abcdef" == safe_path_component("CA0123456789abcdef")


def test_the_log_handler_logs_the_first_lines_and_counts_the_rest(logs: LogEvents) -> None:
    handler = LogHandler(max_lines=3)
    dtmf = wire.parse(json.dumps({"event": "dtmf", "streamSid": "MZ1",
                                  "dtmf": {"track": "inbound_track", "digit": "1"}}))
    mark = wire.parse(json.dumps({"event": "mark", "streamSid": "MZ1",
                                  "mark": {"name": "m" * 5000}}))
    assert isinstance(dtmf, wire.Dtmf)
    assert isinstance(mark, wire.Mark)
    for _ in range(10):
        handler.on_dtmf(dtmf)
        handler.on_mark(mark)
    assert (3, 3) == (len(events(logs, "call.dtmf")), len(events(logs, "call.mark")))
    assert {"lines_not_logged": 14} == handler.report()
    assert 200 == len(events(logs, "call.mark")[0]["name"])
