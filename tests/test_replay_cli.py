"""The simulator as a new user meets it: ``streamsvc replay`` and ``fixture synth`` refuse
what they cannot use with one clear line, say what a refused signature needs, count a session
that never began as failed, and ``replay --check`` compares the server's outcome with the
fixture's ``expect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamsvc.replay.fixture import dump_fixture, load_fixture

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOT = Path(__file__).parent.parent


def streamsvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamsvc", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=ROOT)


class Server:
    """``streamsvc serve`` in a subprocess on a free port, its JSON log in a file."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamsvc", "serve", "--port", "0"],
                stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "STREAMSVC_EVENT_LOOP": "asyncio", **env})
        self.port = self._listening_port()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def _listening_port(self) -> int:
        for _ in range(200):
            for line in self.log.read_text().splitlines():
                if '"server.listening"' in line:
                    return int(json.loads(line)["port"])
            time.sleep(0.05)
        raise AssertionError("the server did not start: " + self.log.read_text())

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "server.log", {})
    yield running
    running.stop()


def test_a_file_that_is_no_fixture_is_refused_with_a_reason() -> None:
    done = streamsvc("replay", "README.md", "--url", "ws://127.0.0.1:9/stream")
    assert 2 == done.returncode
    assert "neither a streamsvc fixture" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/stream", "127.0.0.1:8080/stream"])
def test_a_url_that_is_not_websocket_is_refused_in_one_line(url: str) -> None:
    done = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url", url)
    assert (2, 1) == (done.returncode, len(done.stderr.splitlines()))
    assert "--url must be ws://" in done.stderr


@pytest.mark.parametrize(("inbound", "output", "said"), [
    ("nosuch.wav", "out.jsonl", "cannot read"),
    ("README.md", "out.jsonl", "is not a PCM WAV file"),
    ("caller.wav", "no/such/dir/out.jsonl", "cannot write"),
])
def test_synth_says_what_is_wrong_in_one_line(tmp_path: Path, inbound: str, output: str,
                                              said: str) -> None:
    with wave.open(str(tmp_path / "caller.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(3200))
    source = inbound if inbound == "README.md" else str(tmp_path / inbound)
    done = streamsvc("fixture", "synth", "--inbound", source, "-o", str(tmp_path / output))
    assert (2, 1) == (done.returncode, len(done.stderr.splitlines()))
    assert said in done.stderr


def test_synth_takes_the_ids_a_webhook_was_given(tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "caller.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(3200))
    output = tmp_path / "call.jsonl"
    done = streamsvc("fixture", "synth", "--inbound", str(tmp_path / "caller.wav"),
                     "--call-sid", "CA42", "--stream-sid", "MZ42", "--account-sid", "AC42",
                     "-o", str(output))
    assert 0 == done.returncode, done.stderr
    fixture = load_fixture(output)
    assert ("CA42", "MZ42", "AC42") == (fixture.call_sid(), fixture.stream_sid(),
                                        fixture.expect["account_sid"])


def test_replay_check_matches_an_honest_server_and_exits_0(server: Server) -> None:
    done = streamsvc("replay", "fixtures/inbound_params.jsonl",
                     "fixtures/missing_reordered.jsonl", "fixtures/garbage_midcall.jsonl",
                     "--url", server.url("/stream"), "--speed", "0", "--check",
                     "--log", str(server.log))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "check: matched 3  mismatched 0" in done.stdout


def test_replay_check_reports_each_difference_and_exits_1(server: Server,
                                                         tmp_path: Path) -> None:
    honest = load_fixture(FIXTURES / "missing_reordered.jsonl")
    expect = {**honest.expect, "missing_frames": {"inbound": 0}, "dtmf": "9"}
    doctored = tmp_path / "doctored.jsonl"
    doctored.write_text(dump_fixture({"expect": expect}, honest.frames), encoding="utf-8")
    done = streamsvc("replay", str(doctored), "--url", server.url("/stream"), "--speed", "0",
                     "--check", "--log", str(server.log))
    assert 1 == done.returncode
    mismatches = [line for line in done.stdout.splitlines() if line.startswith("mismatch:")]
    assert 2 == len(mismatches)
    assert 'missing_frames: expected {"inbound":0}, server reported {"inbound":4}' in (
        mismatches[0])


def test_a_session_that_never_sent_a_valid_start_failed(server: Server,
                                                        tmp_path: Path) -> None:
    frames = [frame for frame in load_fixture(FIXTURES / "inbound_params.jsonl").frames
              if '"start"' not in frame.text]
    startless = tmp_path / "startless.jsonl"
    startless.write_text(dump_fixture({}, frames), encoding="utf-8")
    done = streamsvc("replay", str(startless), "--url", server.url("/stream"), "--speed", "0")
    assert 1 == done.returncode
    assert "ok: 0  failed: 1" in done.stdout
    assert "no start message" in done.stdout


def test_a_providers_session_at_another_providers_route_fails_even_without_the_log(
        server: Server) -> None:
    """The server cannot read a Telnyx start on a Twilio route: it closes the stream (1008)
    after MAX_BAD_FRAMES_BEFORE_START frames instead of waiting, so the client knows."""
    done = streamsvc("replay", "fixtures/telnyx_params.jsonl", "--url", server.url("/stream"),
                     "--speed", "0", "--check")
    assert 1 == done.returncode, done.stdout
    assert "ok: 0  failed: 1" in done.stdout
    assert "1008" in done.stdout
    assert '"stream.no_start"' in server.log.read_text()


def test_only_lines_written_after_the_replay_began_count(server: Server,
                                                         tmp_path: Path) -> None:
    first = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url",
                      server.url("/stream"), "--speed", "0", "--check", "--log",
                      str(server.log))
    assert 0 == first.returncode, first.stdout
    other = Server(tmp_path / "other.log", {})
    try:  # the same call again, to another server, checked against the first one's log
        stale = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url",
                          other.url("/stream"), "--speed", "0", "--check", "--log",
                          str(server.log))
    finally:
        other.stop()
    assert 1 == stale.returncode, stale.stdout
    assert "no stream.started line" in stale.stdout


def test_a_stream_whose_handler_failed_never_checks_out(tmp_path: Path) -> None:
    (tmp_path / "failing_handler.py").write_text(
        "from streamsvc import Handler\n\n"
        "class Failing(Handler):\n"
        "    def on_media(self, frame):\n"
        "        raise RuntimeError('always')\n", encoding="utf-8")
    config = tmp_path / "streamsvc.toml"
    config.write_text('[[routes]]\npath = "/stream"\nhandlers = ["failing_handler:Failing"]\n',
                      encoding="utf-8")
    failing = Server(tmp_path / "failing.log", {"STREAMSVC_CONFIG": str(config),
                                                "PYTHONPATH": str(tmp_path)})
    try:
        done = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url",
                         failing.url("/stream"), "--speed", "0", "--check", "--log",
                         str(failing.log))
    finally:
        failing.stop()
    assert 1 == done.returncode, done.stdout + failing.log.read_text()[-2000:]
    assert "handler_errors" in done.stdout


def test_a_refused_signature_says_what_is_missing(tmp_path: Path) -> None:
    signed = Server(tmp_path / "signed.log", {"TWILIO_AUTH_TOKEN": "12345",
                                               "STREAMSVC_PUBLIC_URL": "wss://voice.example.com"})
    try:
        url = signed.url("/stream")
        unsigned = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url", url,
                             env={"TWILIO_AUTH_TOKEN": ""})
        assert "--auth-token" in unsigned.stdout
        no_public = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url", url,
                              env={"TWILIO_AUTH_TOKEN": "12345", "STREAMSVC_PUBLIC_URL": ""})
        assert "--public-url" in no_public.stdout
        right = streamsvc("replay", "fixtures/inbound_params.jsonl", "--url", url, "--speed",
                          "0", env={"TWILIO_AUTH_TOKEN": "12345",
                                    "STREAMSVC_PUBLIC_URL": "wss://voice.example.com"})
        assert 0 == right.returncode, right.stdout
    finally:
        signed.stop()


def test_check_says_when_a_providers_session_went_to_another_providers_route(
        server: Server) -> None:
    done = streamsvc("replay", "fixtures/acs_mixed.jsonl", "--url", server.url("/stream"),
                     "--speed", "0", "--check", "--log", str(server.log))
    assert 1 == done.returncode
    assert 'is --url a route with provider = "acs"?' in done.stdout


def test_a_synthesized_vonage_session_checks_out_by_its_call_id(tmp_path: Path) -> None:
    # Vonage sends no stream id: --check finds the stream's lines by the call's uuid.
    with wave.open(str(tmp_path / "caller.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(bytes(16000))  # 1 s
    output = tmp_path / "vonage.jsonl"
    done = streamsvc("fixture", "synth", "--provider", "vonage", "--sample-rate", "8000",
                     "--inbound", str(tmp_path / "caller.wav"), "--param", "lang=en-GB",
                     "--call-sid", "U-42", "--dtmf", "5@0.5s", "-o", str(output))
    assert 0 == done.returncode, done.stderr
    fixture = load_fixture(output)
    assert ("U-42", None, 50) == (fixture.call_sid(), fixture.stream_sid(),
                                  fixture.expect["frames"]["inbound"])
    config = tmp_path / "streamsvc.toml"
    config.write_text('[[routes]]\npath = "/vonage"\nprovider = "vonage"\n'
                      'handlers = ["log"]\n', encoding="utf-8")
    server = Server(tmp_path / "server.log", {"STREAMSVC_CONFIG": str(config)})
    try:
        checked = streamsvc("replay", str(output), "--url", server.url("/vonage"),
                            "--speed", "0", "--concurrency", "2", "--check",
                            "--log", str(server.log))
    finally:
        server.stop()
    assert 0 == checked.returncode, checked.stdout + checked.stderr
    assert "check: matched 2  mismatched 0" in checked.stdout
