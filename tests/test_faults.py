"""Faults, limits, drain and metrics: the server keeps every call it can and loses nothing
it should not. Loopback only, bounded in time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from streamsvc import wire
from streamsvc.cli.serve import on_signals
from streamsvc.config import Route, Settings
from streamsvc.handlers import AsyncHandler, Handler, HandlerSpec
from streamsvc.replay import replay, replay_session
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import METRICS_SHARE_INTERVAL_S, StreamServer
from streamsvc.server.metrics import Metrics

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"


class Counting(Handler):
    counts: dict[str, int] = {}  # noqa: RUF012 - shared with the test on purpose

    def on_start(self, session: Any) -> None:
        self.sid = session.stream_sid
        self.counts[self.sid] = 0

    def on_media(self, frame: wire.Media) -> None:
        self.counts[self.sid] += 1


class Slow(AsyncHandler):
    queue_size = 10

    async def on_media(self, frame: wire.Media) -> None:
        await asyncio.sleep(0.05)  # five frames' time for each frame


class Raises(Handler):
    def on_media(self, frame: wire.Media) -> None:
        raise RuntimeError("handler bug")


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current}


async def test_half_open_peer_is_closed_and_nothing_leaks(logs: LogEvents, transport: str) -> None:
    Counting.counts = {}
    server = StreamServer(Settings(port=0, transport=transport,
                                   idle_timeout_s=0.3, ping_interval_s=0,
                                   routes=(Route("/s", (HandlerSpec("c", Counting),)),)))
    await server.start()
    before = other_tasks()
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    peer = await connect(f"ws://127.0.0.1:{server.port}/s")
    for frame in fixture.frames[:10]:
        await peer.send(frame.text)
    peer.transport.pause_reading()  # the peer goes silent and deaf, its socket still open
    await until(lambda: events(logs, "stream.stopped"))
    (stopped,) = events(logs, "stream.stopped")
    assert ("aborted", {"inbound": 8}) == (stopped["reason"], stopped["frames"])
    assert 1 == len(events(logs, "stream.idle_timeout"))
    await until(lambda: server.active_calls == 0)
    assert {} == server.streams
    peer.transport.abort()
    await server.stop()
    await until(lambda: not {t for t in other_tasks() - before if not t.done()})


async def test_slow_handler_drops_while_fast_one_gets_every_frame(
    logs: LogEvents,
    transport: str,
) -> None:
    Counting.counts = {}
    handlers = (HandlerSpec("slow", Slow), HandlerSpec("fast", Counting))
    server = StreamServer(Settings(port=0, transport=transport,
                                   ping_interval_s=0.2, ping_timeout_s=0.5,
                                   routes=(Route("/s", handlers),)))
    await server.start()
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")  # 4 s in real time
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/s", speed=1)
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    assert result.ok
    (stopped,) = events(logs, "stream.stopped")
    frames = fixture.expect["frames"]["inbound"]
    assert "stop" == stopped["reason"]  # no ping timeout: the receive loop never waited
    assert frames == Counting.counts[fixture.expect["stream_sid"]]
    assert stopped["handler_drops"]["slow"] > frames // 2
    assert {} == stopped["handler_errors"]


async def test_a_raising_handler_is_contained(logs: LogEvents, transport: str) -> None:
    Counting.counts = {}
    handlers = (HandlerSpec("raises", Raises), HandlerSpec("fast", Counting))
    server = StreamServer(Settings(port=0, transport=transport, routes=(Route("/s", handlers),)))
    await server.start()
    fixture = load_fixture(FIXTURES / "missing_reordered.jsonl")
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/s", speed=0)
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    assert result.ok
    (stopped,) = events(logs, "stream.stopped")
    assert ({"raises": 1}, fixture.expect["frames"]) == (stopped["handler_errors"],
                                                          stopped["frames"])
    (failed,) = events(logs, "handler.failed")
    assert ("raises", "on_media") == (failed["handler"], failed["method"])
    assert fixture.expect["frames"]["inbound"] == Counting.counts[fixture.expect["stream_sid"]]


async def test_metrics_report_calls_frames_and_latency_without_call_labels(transport: str) -> None:
    server = StreamServer(Settings(port=0, transport=transport))
    await server.start()
    try:
        for name in ("inbound_params.jsonl", "garbage_midcall.jsonl"):
            await replay_session(load_fixture(FIXTURES / name),
                                 f"ws://127.0.0.1:{server.port}/stream", speed=0)
        await until(lambda: server.metrics.calls_ended["stop"] == 2)
        await replay_session(load_fixture(FIXTURES / "inbound_params.jsonl"),
                             f"ws://127.0.0.1:{server.port}/nowhere", speed=0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = (await reader.read()).decode()
        writer.close()
    finally:
        await server.stop()
    head, _, body = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK")
    assert "text/plain; version=0.0.4" in head

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.MULTILINE)
        assert match, sample
        return float(match.group(1))

    assert 2 == value("streamsvc_calls_started_total")
    assert 2 == value('streamsvc_calls_ended_total{reason="stop"}')
    assert 204 + 100 == value('streamsvc_frames_total{track="inbound"}')
    assert 8 == value("streamsvc_bad_frames_total")
    assert 1 == value('streamsvc_handshakes_rejected_total{reason="no_route"}')
    assert 0 == value("streamsvc_active_calls")
    assert value('streamsvc_handler_latency_seconds_bucket{handler="log",le="0.0001"}') > 0
    assert "process_resident_memory_bytes" in body
    assert "CA0000" not in body  # no per-call labels
    assert "MZ0000" not in body


def test_any_worker_answers_metrics_for_all_workers(tmp_path: Path) -> None:
    one, two = Metrics(list), Metrics(list)
    for metrics, calls in ((one, 3), (two, 5)):
        metrics.calls_started = calls
        metrics.frames["inbound"] = 100 * calls
        metrics.active_calls = calls - 1
        metrics.observe_latency("log", 0.00003)
    share_one = one.share_with_workers(str(tmp_path))
    share_two = two.share_with_workers(str(tmp_path))
    share_two.own = tmp_path / "other-worker.json"  # two processes, in one test
    share_one.publish()
    share_two.publish()
    body = one.render().decode()
    samples = dict(re.findall(r"^(streamsvc_\S+) (\S+)$", body, re.MULTILINE))
    assert "8.0" == samples["streamsvc_calls_started_total"]
    assert "800.0" == samples['streamsvc_frames_total{track="inbound"}']
    assert "6.0" == samples["streamsvc_active_calls"]
    assert "2.0" == samples['streamsvc_handler_latency_seconds_bucket{handler="log",le="5e-05"}']
    assert "2.0" == samples["streamsvc_workers"]
    (tmp_path / "other-worker.json").write_text("{half a fi")  # mid-write or broken: skipped
    assert "3.0" == dict(re.findall(r"^(streamsvc_\S+) (\S+)$", one.render().decode(),
                                    re.MULTILINE))["streamsvc_calls_started_total"]


def test_workers_share_the_port_and_their_metrics(
    processes: list[subprocess.Popen[str]],
) -> None:
    port = free_port()
    server = serve(processes, "--workers", "2", "--port", str(port))
    try:
        server.wait_for_log("server.listening")  # the second worker
        fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")
        report = asyncio.run(replay([fixture], f"ws://127.0.0.1:{port}/stream", speed=0,
                                    concurrency=8))
        assert (8, 0) == (len(report.sessions), report.failed)
        time.sleep(2 * METRICS_SHARE_INTERVAL_S + 0.5)  # each worker has published since
        for _ in range(6):  # the kernel spreads these over both workers
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=5) as answer:
                body = answer.read().decode()
            assert re.search(r"^streamsvc_workers 2\.0$", body, re.MULTILINE)
            assert re.search(r"^streamsvc_calls_started_total 8\.0$", body, re.MULTILINE)
    finally:  # the parent forwards SIGTERM to its workers (SIGKILL would orphan them)
        server.process.send_signal(signal.SIGTERM)
        assert 0 == server.process.wait(timeout=30)


class Server:
    """``streamsvc serve`` in a subprocess, its JSON log lines read by a thread (so that a
    full pipe never blocks it) and handed out in order by :meth:`wait_for_log`."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsvc", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "STREAMSVC_LOG_FORMAT": "json"},
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for_log("server.listening")["port"])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_for_log(self, event: str) -> dict[str, Any]:
        while (entry := self.lines.get(timeout=60)) is not None:
            if entry["event"] == event:
                return entry
        raise AssertionError(f"{event} never logged")


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def replay_in_background(port: int, fixture: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "replay", str(FIXTURES / fixture),
         "--url", f"ws://127.0.0.1:{port}/stream", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.communicate()


def free_port() -> int:
    """A loopback port nothing listens on (workers share a fixed port, not 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(processes: list[subprocess.Popen[str]], *args: str) -> Server:
    server = Server(*args)
    processes.append(server.process)
    return server


def test_sigterm_drains_calls_in_flight_then_exits_0(
    processes: list[subprocess.Popen[str]], transport: str,
) -> None:
    server = serve(processes, "--drain-timeout-s", "20", "--transport", transport)
    port = server.port
    call = replay_in_background(port, "inbound_params.jsonl")  # 4 s in real time
    processes.append(call)
    server.wait_for_log("stream.started")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log("server.draining")
    assert (200, 503) == (http_status(port, "/healthz"), http_status(port, "/readyz"))
    late = subprocess.run(
        [sys.executable, "-m", "streamsvc", "replay", str(FIXTURES / "inbound_params.jsonl"),
         "--url", f"ws://127.0.0.1:{port}/stream", "--speed", "0", "--json"],
        capture_output=True, text=True, timeout=60)
    assert ["handshake rejected: HTTP 503"] == json.loads(late.stdout)["errors"]
    summary = json.loads(call.communicate(timeout=30)[0])
    assert (1, 0) == (summary["ok"], summary["failed"])  # the call in flight finished
    stopped = server.wait_for_log("stream.stopped")
    assert ("stop", {"inbound": 204}) == (stopped["reason"], stopped["frames"])
    assert 0 == server.process.wait(timeout=30)


def test_drain_deadline_closes_calls_with_1001_and_a_second_signal_ends_at_once(
    processes: list[subprocess.Popen[str]], transport: str,
) -> None:
    server = serve(processes, "--drain-timeout-s", "0.5", "--transport", transport)
    call = replay_in_background(server.port, "inbound_params.jsonl")
    processes.append(call)
    server.wait_for_log("stream.started")
    server.process.send_signal(signal.SIGTERM)
    stopped = server.wait_for_log("stream.stopped")
    assert "shutdown" == stopped["reason"]
    assert 0 == server.process.wait(timeout=30)
    assert ["server closed the stream early (1001)"] == json.loads(
        call.communicate(timeout=30)[0])["errors"]

    server = serve(processes, "--drain-timeout-s", "60", "--transport", transport)
    call = replay_in_background(server.port, "inbound_params.jsonl")
    processes.append(call)
    server.wait_for_log("stream.started")
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log("server.draining")
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    assert "shutdown" == server.wait_for_log("stream.stopped")["reason"]
    assert 0 == server.process.wait(timeout=30)
    assert time.monotonic() - started < 10  # not the 60 s drain


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match
    return int(match.group(1))


def test_hundreds_of_real_time_calls_lose_no_frame(
    processes: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str],
    transport: str,
) -> None:
    calls = 200
    server = serve(processes, "--transport", transport)
    port = server.port
    idle_rss = rss_kb(server.process.pid)
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")  # 1 s of audio
    # Stretch the call to 3 s so RSS can be read while all calls are up.
    frames = fixture.frames

    async def run() -> tuple[Any, int]:
        task = asyncio.create_task(replay([fixture], f"ws://127.0.0.1:{port}/stream",
                                          speed=1 / 3, concurrency=calls))
        await asyncio.sleep(2.0)
        busy_rss = rss_kb(server.process.pid)
        return await task, busy_rss

    report, busy_rss = asyncio.run(run())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert (calls, 0) == (len(report.sessions), report.failed)
    sent_media = sum(1 for f in frames if '"media"' in f.text) * calls
    received = float(re.search(r'^streamsvc_frames_total\{track="inbound"\} (\S+)$', metrics,
                               re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert sent_media == received  # zero frames lost
    per_call_kb = (busy_rss - idle_rss) / calls
    with capsys.disabled():
        print(f"\n{calls} concurrent calls on {transport}: RSS {idle_rss} kB idle, "
              f"{busy_rss} kB busy, "
              f"{per_call_kb:.1f} kB per active call")
    assert per_call_kb < 1024


def test_a_drain_with_a_peer_that_never_answers_the_close_fits_its_timeout(
    processes: list[subprocess.Popen[str]], transport: str,
) -> None:
    """A platform kills the process after its grace: the whole drain, closes and handlers
    included, stays within drain_timeout_s even when a peer never answers the close."""
    server = serve(processes, "--drain-timeout-s", "3", "--transport", transport)
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        silent.sendall(f"GET /stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        for entry in fixture.frames[:2]:  # connected, start; then silence, reading nothing
            text = entry.text.encode()
            mask = os.urandom(4)
            head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", len(text)) if len(
                text) > 125 else bytes([0x81, 0x80 | len(text)])
            silent.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text)))
        server.wait_for_log("stream.started")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert 0 == server.process.wait(timeout=30)
        took = time.monotonic() - started
    assert took < 3 + 1.0  # the drain's own 3 s, and the process's exit
    assert "shutdown" == server.wait_for_log("stream.stopped")["reason"]


def test_a_killed_worker_is_replaced_and_its_figures_leave_the_sums(
    processes: list[subprocess.Popen[str]],
) -> None:
    port = free_port()
    server = serve(processes, "--workers", "2", "--port", str(port))
    server.wait_for_log("server.listening")  # the second worker
    time.sleep(2 * METRICS_SHARE_INTERVAL_S + 0.5)
    workers = [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True,
        check=True).stdout.split()]
    assert 2 == len(workers)
    os.kill(workers[0], signal.SIGKILL)
    died = server.wait_for_log("server.worker_died")
    assert (workers[0], -9) == (died["pid"], died["exit_code"])
    restarted = server.wait_for_log("server.worker_restarted")
    server.wait_for_log("server.listening")  # the replacement serves
    time.sleep(2 * METRICS_SHARE_INTERVAL_S + 0.5)
    seen = set()
    for _ in range(8):  # the kernel spreads these over both workers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
        seen.update(re.findall(r"^streamsvc_workers (\S+)$", body, re.MULTILINE))
    assert {"2.0"} == seen  # the dead worker's snapshot is gone, the replacement's counted
    assert restarted["pid"] not in workers
    server.process.send_signal(signal.SIGTERM)
    assert 0 == server.process.wait(timeout=30)


def test_a_signal_reaches_the_server_even_when_its_loops_self_pipe_is_full() -> None:
    """`serve` stops on SIGTERM even when its loop has fallen behind: asyncio's own signal
    handling reads the signal from the loop's self-pipe, and CPython drops a signal whose
    byte does not fit there; the service's handler queues the drain regardless."""

    async def run() -> bool:
        loop = asyncio.get_running_loop()
        seen = asyncio.Event()
        restore = on_signals(loop, seen.set, (signal.SIGUSR1,))
        try:
            # Fill the loop's self-pipe, as a flood of thread wake-ups does while it is busy.
            pipe = loop._csock.fileno()  # type: ignore[attr-defined]
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(pipe, bytes(65536))
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.wait_for(seen.wait(), 5)
            return seen.is_set()
        finally:
            restore()

    assert asyncio.run(run())  # the stock asyncio loop: the one that dropped the signal
