"""End to end: the real server on port 0, the bundled fixtures played by the real replay
client, and the public log events checked against each fixture's expected outcome."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec
from streamsvc.replay import replay, replay_session
from streamsvc.replay.fixture import Fixture, load_fixture
from streamsvc.replay.synth import SessionPlan, synthesize
from streamsvc.server import StreamServer
from streamsvc.session import CallSummary, Session

from .conftest import events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
# Twilio's sessions (ACS's are replayed at ACS routes in tests/test_acs_fixtures.py).
BUNDLED = sorted(path for path in FIXTURES.glob("*.jsonl")
                 if load_fixture(path).provider == "twilio")


class Probe(Handler):
    """Records each call's handler events, by stream_sid, for the assertions."""

    calls: dict[str, list[str]] = {}  # noqa: RUF012 - shared on purpose, reset per test

    def on_start(self, session: Session) -> None:
        self.sid = session.stream_sid or "?"
        self.calls[self.sid] = ["start"]
        if session.bidirectional:
            session.send_mark("hello")

    def on_media(self, frame: wire.Media) -> None:
        if self.calls[self.sid][-1] != "media":
            self.calls[self.sid].append("media")

    def on_stop(self, session: Session, summary: CallSummary) -> None:
        self.calls[self.sid].append(f"stop:{summary.reason}")


def routes() -> tuple[Route, ...]:
    handlers = (HandlerSpec("log", LogHandler), HandlerSpec("probe", Probe))
    return (Route("/stream", handlers), Route("/connect", handlers, bidirectional=True))


@pytest.fixture
async def server(logs: list[dict[str, Any]], transport: str) -> AsyncIterator[StreamServer]:
    Probe.calls = {}
    server = StreamServer(Settings(port=0, routes=routes(), start_timeout_s=0.5,
                                   max_message_bytes=4096, max_connections=20,
                                   transport=transport))
    await server.start()
    yield server
    await server.stop()


def url(server: StreamServer, path: str = "/stream") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


def check_against_expectation(logs: list[dict[str, Any]], expect: dict[str, Any]) -> None:
    (started,) = [e for e in events(logs, "stream.started")
                  if e["stream_sid"] == expect["stream_sid"]]
    (stopped,) = [e for e in events(logs, "stream.stopped")
                  if e["stream_sid"] == expect["stream_sid"]]
    for key in ("call_sid", "stream_sid", "account_sid", "tracks", "custom_parameters"):
        assert expect[key] == started[key], key
    for key in ("frames", "missing_frames", "out_of_order_frames", "bad_frames",
                "ignored_events", "dtmf", "reason"):
        assert expect[key] == stopped[key], key
    if "custom_parameters_bytes" in expect:
        assert expect["custom_parameters_bytes"] == stopped["custom_parameters_bytes"]


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
async def test_bundled_fixture_replays_to_its_expected_outcome(
    server: StreamServer, logs: list[dict[str, Any]], path: Path,
) -> None:
    fixture = load_fixture(path)
    result = await replay_session(fixture, url(server, fixture.path or "/stream"), speed=0)
    assert (True, None) == (result.ok, result.error)
    assert len(fixture.frames) == result.frames_sent
    await until(lambda: events(logs, "stream.stopped"))
    check_against_expectation(logs, dict(fixture.expect))
    assert ["start", "media", "stop:stop"] == Probe.calls[fixture.expect["stream_sid"]]


async def test_raw_capture_replays_like_a_fixture(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "raw_capture.txt")
    expect = json.loads((FIXTURES / "raw_capture.expect.json").read_text())
    result = await replay_session(fixture, url(server), speed=0)
    assert result.ok
    await until(lambda: events(logs, "stream.stopped"))
    check_against_expectation(logs, expect)
    assert "en/US" == events(logs, "stream.started")[0]["custom_parameters"]["lang"]


async def test_bad_frames_are_logged_with_their_reason_a_few_times(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "garbage_midcall.jsonl")
    assert (await replay_session(fixture, url(server), speed=0)).ok
    await until(lambda: events(logs, "stream.stopped"))
    bad = events(logs, "stream.bad_frame")
    assert 5 == len(bad)  # the first few; the rest are only counted
    assert "not JSON" in bad[0]["reason"]
    assert "this is not json" == bad[0]["excerpt"]


async def test_concurrent_copies_are_distinct_calls(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")
    report = await replay([fixture], url(server), speed=0, concurrency=4)
    assert (4, 0) == (len(report.sessions), report.failed)
    await until(lambda: len(events(logs, "stream.stopped")) == 4)
    stopped = events(logs, "stream.stopped")
    assert 4 == len({e["stream_sid"] for e in stopped})
    assert 4 == len({e["call_sid"] for e in stopped})
    assert all(fixture.expect["frames"] == e["frames"] for e in stopped)


async def test_bidirectional_route_sends_back_in_twilios_shape(server: StreamServer) -> None:
    fixture = load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl")
    async with connect(url(server, "/connect")) as ws:
        for frame in fixture.frames[:2]:
            await ws.send(frame.text)
        reply = json.loads(await ws.recv())
    assert {"event": "mark", "streamSid": fixture.stream_sid(),
            "mark": {"name": "hello"}} == reply


async def test_unidirectional_route_sends_nothing(server: StreamServer) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    result = await replay_session(fixture, url(server), speed=0)
    assert (True, 0) == (result.ok, result.frames_received)


async def test_unknown_path_is_refused_at_the_handshake(server: StreamServer) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    result = await replay_session(fixture, url(server, "/nowhere"), speed=0)
    assert (False, "handshake rejected: HTTP 404") == (result.ok, result.error)


async def test_health_is_answered_on_the_stream_port(server: StreamServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status = await reader.readline()
    writer.close()
    assert b"HTTP/1.1 200 OK\r\n" == status


async def test_no_start_in_time_closes_with_policy_violation(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    async with connect(url(server)) as ws:
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert 1008 == ws.close_code
    assert 1 == len(events(logs, "stream.start_timeout"))
    assert [] == events(logs, "stream.stopped")


async def test_oversize_message_closes_with_1009_and_handlers_stop(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    async with connect(url(server)) as ws:
        for frame in fixture.frames[:5]:
            await ws.send(frame.text)
        await ws.send("x" * 5000)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert 1009 == ws.close_code
    await until(lambda: events(logs, "stream.stopped"))
    assert "error" == events(logs, "stream.stopped")[0]["reason"]
    assert "stop:error" == Probe.calls[fixture.expect["stream_sid"]][-1]


async def test_a_message_larger_than_the_first_read_buffer_arrives_whole(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    parameters = {f"p{i:02d}": "é" * 60 for i in range(25)}  # 3,075 bytes of parameters
    plan = SessionPlan(inbound=[0] * 1600, custom_parameters=parameters)
    result = await replay_session(Fixture("big-start", tuple(synthesize(plan))),
                                  url(server), speed=0)
    assert (True, None) == (result.ok, result.error)
    (started,) = events(logs, "stream.started")
    assert parameters == started["custom_parameters"]
    assert {"inbound": 10} == events(logs, "stream.stopped")[0]["frames"]


async def test_fragmented_messages_are_reassembled_and_their_total_size_capped(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    texts = [frame.text for frame in fixture.frames[:12]]
    async with connect(url(server)) as ws:
        for text in texts:  # each message in three fragments
            third = len(text) // 3
            await ws.send([text[:third], text[third : 2 * third], text[2 * third :]])
        await until(lambda: fixture.expect["stream_sid"] in Probe.calls)
        await ws.send(["x" * 3000, "y" * 3000])  # 6,000 bytes in all: over the 4,096 cap
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert 1009 == ws.close_code
    await until(lambda: events(logs, "stream.stopped"))
    (started,) = events(logs, "stream.started")
    assert fixture.expect["custom_parameters"] == started["custom_parameters"]
    (stopped,) = events(logs, "stream.stopped")
    assert ("error", {"inbound": 10}, 0) == (stopped["reason"], stopped["frames"],
                                             stopped["bad_frames"])


async def test_abrupt_tcp_drop_still_runs_on_stop(
    server: StreamServer, logs: list[dict[str, Any]],
) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    tasks_before = asyncio.all_tasks()
    ws = await connect(url(server))
    for frame in fixture.frames[:20]:
        await ws.send(frame.text)
    await until(lambda: fixture.expect["stream_sid"] in Probe.calls)
    (session,) = server.streams_for_call(fixture.expect["call_sid"])
    assert fixture.expect["stream_sid"] == session.stream_sid
    ws.transport.abort()
    await until(lambda: events(logs, "stream.stopped"))
    stopped = events(logs, "stream.stopped")[0]
    assert ("aborted", {"inbound": 18}) == (stopped["reason"], stopped["frames"])
    assert "stop:aborted" == Probe.calls[fixture.expect["stream_sid"]][-1]
    await until(lambda: server.active_calls == 0)
    assert {} == server.streams
    await until(lambda: not [t for t in asyncio.all_tasks() - tasks_before if not t.done()])


async def test_server_stop_ends_calls_in_flight_with_reason_shutdown(
    logs: list[dict[str, Any]], transport: str,
) -> None:
    Probe.calls = {}
    server = StreamServer(Settings(port=0, routes=routes(), transport=transport))
    await server.start()
    fixture = load_fixture(FIXTURES / "both_tracks.jsonl")
    call = asyncio.create_task(replay_session(fixture, url(server), speed=1))
    await until(lambda: fixture.expect["stream_sid"] in Probe.calls)
    await server.stop()
    result = await call
    assert 1001 == result.close_code
    assert "shutdown" == events(logs, "stream.stopped")[0]["reason"]
    assert "stop:shutdown" == Probe.calls[fixture.expect["stream_sid"]][-1]


async def test_connections_beyond_the_limit_get_503(logs: list[dict[str, Any]],
                                                     transport: str) -> None:
    server = StreamServer(Settings(port=0, routes=routes(), max_connections=1,
                                   transport=transport))
    await server.start()
    try:
        async with connect(url(server)):
            await until(lambda: server.active_calls == 1)
            fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
            result = await replay_session(fixture, url(server), speed=0)
            assert "handshake rejected: HTTP 503" == result.error
    finally:
        await server.stop()


def test_serve_command_runs_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`python -m streamsvc serve` as the Procfile runs it: JSON logs, SIGTERM, exit 0."""
    env = {**os.environ, "PORT": "0", "STREAMSVC_LOG_FORMAT": "json"}
    with subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    ) as process:
        try:
            assert process.stdout is not None
            listening = json.loads(process.stdout.readline())
            assert "server.listening" == listening["event"]
            replay_command = [
                sys.executable, "-m", "streamsvc", "replay",
                str(FIXTURES / "inbound_params.jsonl"),
                "--url", f"ws://127.0.0.1:{listening['port']}/stream", "--speed", "0", "--json",
            ]
            summary = json.loads(subprocess.run(replay_command, capture_output=True,
                                                check=True, timeout=60).stdout)
            assert (1, 0) == (summary["ok"], summary["failed"])
            process.send_signal(signal.SIGTERM)
            assert 0 == process.wait(timeout=30)
            lines = [json.loads(line) for line in process.stdout.read().splitlines()]
        finally:
            process.kill()
    started = next(e for e in lines if e["event"] == "stream.started")
    assert {"customerId": "cus_8812", "displayName": "Jane Doe",
            "intent": "order-status"} == started["custom_parameters"]
    stopped = next(e for e in lines if e["event"] == "stream.stopped")
    assert (started["call_sid"], "/stream") == (stopped["call_sid"], stopped["path"])
    assert "server.stopped" == lines[-1]["event"]


def test_replay_exits_non_zero_when_a_session_fails() -> None:
    command = [sys.executable, "-m", "streamsvc", "replay",
               str(FIXTURES / "inbound_params.jsonl"), "--url", "ws://127.0.0.1:9/stream"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert 1 == completed.returncode
    assert "failed: 1" in completed.stdout


