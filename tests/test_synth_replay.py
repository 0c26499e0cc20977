"""The fixture synthesizer and reader, the replay client's Twilio-like answers, and the
handshake signature."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec
from streamsvc.providers.signature import sign, signature_matches
from streamsvc.replay import replay_session, signature_headers
from streamsvc.replay.fixture import FixtureError, load_fixture
from streamsvc.replay.synth import SessionPlan, expected_outcome, mulaw_encode, read_wav, synthesize
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"

# G.711 mu-law reference points (ITU-T G.711; Sun's g711.c linear2ulaw).
MULAW_REFERENCE = [(0, 0xFF), (-1, 0x7E), (1, 0xFF), (32767, 0x80), (-32768, 0x00),
                   (8031, 0xA0), (-8031, 0x20), (100, 0xF2), (-100, 0x72), (1000, 0xCE)]


@pytest.mark.parametrize(("sample", "code"), MULAW_REFERENCE)
def test_mulaw_encoding_matches_g711_reference_points(sample: int, code: int) -> None:
    assert bytes([code]) == mulaw_encode([sample])


def test_mulaw_encoding_matches_the_stdlib_codec_on_every_sample() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            audioop: Any = importlib.import_module("audioop")
        except ImportError:
            pytest.skip("no audioop on this Python")
    samples = list(range(-32768, 32768))
    pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in samples)
    assert audioop.lin2ulaw(pcm, 2) == mulaw_encode(samples)


def write_wav(path: Path, samples: list[int], *, rate: int = 8000, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(b"".join(s.to_bytes(2, "little", signed=True)
                                 for s in samples for _ in range(channels)))


def test_read_wav_converts_to_8khz_mono(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", [1000, -1000] * 8000, rate=16000, channels=2)
    samples = read_wav(tmp_path / "a.wav")
    assert 8000 == len(samples)  # one second
    assert all(-1000 <= s <= 1000 for s in samples)


def test_synthesized_frames_look_like_twilios() -> None:
    plan = SessionPlan(inbound=[0] * 1600, outbound=[0] * 1600, custom_parameters={"a": "b"},
                       dtmf=[("7", 0.05)])
    frames = [json.loads(f.text) for f in synthesize(plan)]
    assert ["connected", "start"] == [f["event"] for f in frames[:2]]
    media = [f for f in frames if f["event"] == "media"]
    assert 20 == len(media)  # 10 per track, interleaved
    assert ["inbound", "outbound"] * 2 == [m["media"]["track"] for m in media[:4]]
    first = media[0]
    assert ("99", "1", "2") == (first["media"]["timestamp"], first["media"]["chunk"],
                                first["sequenceNumber"])
    assert 160 == len(wire.parse_media(json.dumps(first)).payload)  # type: ignore[union-attr]
    assert {"track": "inbound_track", "digit": "7"} == next(
        f["dtmf"] for f in frames if f["event"] == "dtmf")
    assert "stop" == frames[-1]["event"]


def test_expected_outcome_follows_the_plan() -> None:
    plan = SessionPlan(inbound=[0] * 160 * 100, drop=frozenset({0, 10, 11, 99}),
                       swap=frozenset({50}), dtmf=[("1", 0.1), ("#", 0.2)])
    expect = expected_outcome(plan)
    assert ({"inbound": 96}, {"inbound": 2}, {"inbound": 1}, "1#") == (
        expect["frames"], expect["missing_frames"], expect["out_of_order_frames"],
        expect["dtmf"])


def test_synth_command_writes_a_fixture_with_its_expectation(tmp_path: Path) -> None:
    write_wav(tmp_path / "caller.wav", [500, -500] * 4000, rate=16000)
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "streamsvc", "fixture", "synth",
               "--inbound", str(tmp_path / "caller.wav"), "--param", "customerId=cus_1",
               "--param", "name=Zoë", "--dtmf", "4@0.1s,5@0.2s", "--drop", "10-12",
               "-o", str(output)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    fixture = load_fixture(output)
    assert {"customerId": "cus_1", "name": "Zoë"} == fixture.expect["custom_parameters"]
    assert ({"inbound": 22}, {"inbound": 3}, "45") == (
        fixture.expect["frames"], fixture.expect["missing_frames"], fixture.expect["dtmf"])


def test_synth_command_rejects_a_malformed_option(tmp_path: Path) -> None:
    write_wav(tmp_path / "caller.wav", [0] * 800)
    command = [sys.executable, "-m", "streamsvc", "fixture", "synth", "--inbound",
               str(tmp_path / "caller.wav"), "--dtmf", "4@soon", "-o", str(tmp_path / "x")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert 2 == completed.returncode
    assert "--dtmf: bad time in '4@soon'" in completed.stderr


def test_raw_capture_lines_are_paced_by_media_timestamps() -> None:
    fixture = load_fixture(FIXTURES / "raw_capture.txt")
    media_times = [f.at_ms for f in fixture.frames if '"media"' in f.text]
    assert [0.0, 20.0, 40.0] == media_times[:3]
    assert fixture.frames[0].at_ms == fixture.frames[1].at_ms == 0.0  # connected, start


def test_fixture_reader_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"streamsvc_fixture": 1}\n{"at_ms": 0, "frame": "x"}\n{"frame": "y"}\n')
    with pytest.raises(FixtureError, match=r"bad.jsonl:3"):
        load_fixture(path)


def test_signature_matches_the_documented_vector() -> None:
    assert "qAJ3tVzuyieOXZQE3PxbZnXhiQ8=" == sign("12345", "wss://example.ngrok.app/media")


def test_signature_check_accepts_either_token_during_rotation() -> None:
    url = "wss://example.ngrok.app/media"
    good = sign("new-token", url)
    assert signature_matches(good, url, ["old-token", "new-token"])
    assert not signature_matches(good, url, ["old-token"])
    assert not signature_matches(good, url + "x", ["new-token"])


def test_replay_signs_the_public_url_with_the_local_path() -> None:
    headers = signature_headers("ws://127.0.0.1:9000/media", "12345",
                                public_url="wss://example.ngrok.app/")
    assert {"X-Twilio-Signature": "qAJ3tVzuyieOXZQE3PxbZnXhiQ8="} == headers
    assert {} == signature_headers("ws://127.0.0.1:9000/media", None)


class TalksBack(Handler):
    """Plays 0.5 s and a mark at once; later 5 s and a mark; then clears."""

    def on_start(self, session: Session) -> None:
        self.session = session
        self.frames = 0
        session.send_media(b"\xff" * 4000)
        session.send_mark("played")

    def on_media(self, frame: wire.Media) -> None:
        self.frames += 1
        if self.frames == 10:
            self.session.send_media(b"\xff" * 40000)
            self.session.send_mark("cleared")
        elif self.frames == 40:
            self.session.send_clear()


@pytest.fixture
async def server(logs: list[dict[str, Any]]) -> AsyncIterator[StreamServer]:
    handlers = (HandlerSpec("talks", TalksBack), HandlerSpec("log", LogHandler))
    server = StreamServer(Settings(port=0, routes=(Route("/connect", handlers, True),)))
    await server.start()
    yield server
    await server.stop()


async def test_replay_echoes_marks_after_playback_and_at_once_on_clear(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")  # 1 s of audio
    result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/connect", speed=1)
    assert result.ok
    assert (["played"], ["cleared"], 1) == (result.marks_played, result.marks_cleared,
                                            result.clears_received)
    assert 44000 == result.audio_bytes_received
    await until(lambda: events(logs, "stream.stopped"))
    (stopped,) = events(logs, "stream.stopped")
    assert (2, 2) == (stopped["marks_sent"], stopped["marks_received"])
    assert ["played", "cleared"] == [e["name"] for e in logs if e["event"] == "call.mark"]
