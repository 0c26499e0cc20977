"""The simulator speaks ACS: the bundled ACS sessions replayed through both transports
match their expected outcome, ``fixture synth --provider acs`` makes such sessions from a
WAV, and ``replay --acs-token`` signs upgrades as ACS does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.replay import replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, outcome_of, until
from .test_acs import AUDIENCE, KeySet, keys  # noqa: F401 (the module's fixture)

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOT = Path(__file__).parent.parent
ACS_FIXTURES = sorted(path.name for path in FIXTURES.glob("acs_*.jsonl"))


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/acs", (HandlerSpec("log", LogHandler),), provider="acs"),
              Route("/acs-unmixed", (HandlerSpec("log", LogHandler),), provider="acs",
                    unmixed=True))
    server = StreamServer(Settings(port=0, routes=routes, transport=transport))
    await server.start()
    yield server
    await server.stop()


async def test_a_fixtures_incoming_call_carries_its_context_into_the_stream(
        server: StreamServer, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "acs_mixed.jsonl")
    url = f"ws://127.0.0.1:{server.port}/acs"
    without = await replay([fixture], url, speed=0)
    await until(lambda: events(logs, "stream.stopped"))
    assert {} == events(logs, "stream.started")[0]["custom_parameters"]
    with_event = await replay([fixture], url, speed=0,
                              acs_events_url=f"http://127.0.0.1:{server.port}/acs/events")
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    assert (0, 0) == (without.failed, with_event.failed)
    assert fixture.expect["custom_parameters"] == events(
        logs, "stream.started")[1]["custom_parameters"]
    assert ["CustomerId", "Intent"] == list(fixture.expect["custom_parameters"])[:2]


def test_four_acs_sessions_are_bundled() -> None:
    assert ["acs_dtmf_gap.jsonl", "acs_mixed.jsonl", "acs_silent.jsonl",
            "acs_unmixed.jsonl"] == ACS_FIXTURES


@pytest.mark.parametrize("name", ACS_FIXTURES)
async def test_each_acs_fixture_replays_to_its_expected_outcome(
        server: StreamServer, logs: LogEvents, name: str) -> None:
    fixture = load_fixture(FIXTURES / name)
    path = "/acs-unmixed" if "unmixed" in name else "/acs"
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}{path}", speed=0,
                          concurrency=2,
                          acs_events_url=f"http://127.0.0.1:{server.port}/acs/events")
    assert (2, 0) == (len(report.sessions), report.failed)
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for session in report.sessions:
        outcome = outcome_of(logs, session.stream_sid)
        assert [] == differences(session.expect, outcome)


def test_synth_makes_acs_sessions_from_a_wav(tmp_path: Path) -> None:
    with wave.open(str(tmp_path / "caller.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(bytes(44100 * 2))  # one second
    output = tmp_path / "acs.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "fixture", "synth", "--provider", "acs",
         "--inbound", str(tmp_path / "caller.wav"), "--participant",
         f"8:acs:agent={tmp_path / 'caller.wav'}", "--dtmf", "9@0.5s", "--drop", "10",
         "--call-sid", "conn-42", "--stream-sid", "sub-42", "-o", str(output)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert 0 == done.returncode, done.stderr
    fixture = load_fixture(output)
    assert ("acs", "sub-42", "conn-42", "/acs") == (fixture.provider, fixture.stream_sid(),
                                                    fixture.call_sid(), fixture.path)
    assert ({"8:acs:caller": 49, "8:acs:agent": 49}, "9", []) == (
        fixture.expect["frames"], fixture.expect["dtmf"], fixture.expect["tracks"])


async def test_replay_signs_acs_upgrades_with_a_given_key(keys: KeySet,  # noqa: F811
                                                          tmp_path: Path, transport: str,
                                                          logs: LogEvents) -> None:
    routes = (Route("/acs", (HandlerSpec("log", LogHandler),), provider="acs"),)
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   acs_audience=AUDIENCE, acs_jwks_url=keys.url))
    await server.start()
    key_file = tmp_path / "acs-key.pem"
    key_file.write_bytes(keys.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    url = f"ws://127.0.0.1:{server.port}/acs"
    try:
        base = [sys.executable, "-m", "streamsvc", "replay", "fixtures/acs_mixed.jsonl",
                "--url", url, "--speed", "0", "--acs-kid", "acs-key-1"]
        signed = await asyncio_run([*base, "--acs-token", str(key_file),
                                    "--acs-audience", AUDIENCE])
        unsigned = await asyncio_run(base)
    finally:
        await server.stop()
    assert 0 == signed.returncode, signed.stdout + signed.stderr
    assert 1 == unsigned.returncode
    assert ["missing_token"] == [e["reason"] for e in events(logs, "handshake.rejected")]


async def asyncio_run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                   timeout=60, cwd=ROOT, env={**os.environ})


async def test_the_recorder_and_levels_work_unchanged_on_acs_audio(
        logs: LogEvents, tmp_path: Path, transport: str) -> None:
    handlers = (resolve_handler("levels", {}, key="t"),
                resolve_handler("recorder", {"dir": str(tmp_path)}, key="t"))
    server = StreamServer(Settings(port=0, routes=(Route("/acs", handlers, provider="acs"),),
                                   transport=transport))
    await server.start()
    fixture = load_fixture(FIXTURES / "acs_silent.jsonl")  # 1 s speech, 2 s silence, 1 s
    try:
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/acs", speed=0)
        assert 0 == report.failed
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    (stopped,) = events(logs, "stream.stopped")
    levels = stopped["handlers"]["levels"]["inbound"]
    assert 0 < levels["talk_ms"] < 3000  # the speech (and its hangover), not the silence
    with wave.open(str(tmp_path / fixture.call_sid() / f"{fixture.stream_sid()}.wav")) as wav:
        assert (16000, 200 * 320) == (wav.getframerate(), wav.getnframes())
