"""Garbage collection and event-loop stalls: an ended call is freed by reference counting
(no cycle of the service's own waits for a full collection), ``streamsvc serve``'s
collection policy, and the loop-lag probe behind ``/metrics``."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection

from streamsvc.config import Route, Settings
from streamsvc.handlers import resolve_handler
from streamsvc.replay import replay
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.server.gc_policy import NO_AUTOMATIC_FULL, GcPolicy, calls_between, interval_for
from streamsvc.server.loop_lag import BUCKETS_S, LoopLag
from tests.conftest import BUNDLED, LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
HANDLERS = ("log", "recorder", "levels", "dtmf", "capture")


@pytest.fixture
def no_automatic_collection() -> Iterator[None]:
    """Nothing collected behind the test's back: what it collects, it finds."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage_of_the_service(older: frozenset[int] = frozenset()) -> list[str]:
    """The service's objects (not the replay client's, none of ``older``, the ids of what
    existed before) that only a full collection would free, each with the cycle that
    holds it. websockets' connection objects refer to one
    another (the library's design, on the websockets transport): our subclass of its
    connection is theirs."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    ours = [thing for thing in garbage if id(thing) not in older
            and type(thing).__module__.startswith("streamsvc.")
            and not type(thing).__module__.startswith("streamsvc.replay.")
            and not issubclass(type(thing), ServerConnection)]
    return sorted({_cycle(thing, garbage) for thing in ours})


def _cycle(start: object, garbage: list[object]) -> str:
    """``start``'s type, and the shortest reference cycle through it among ``garbage``."""
    among = {id(thing) for thing in garbage}
    came_from: dict[int, object | None] = {id(start): None}
    queue = collections.deque([start])
    while queue:
        thing = queue.popleft()
        for referent in gc.get_referents(thing):
            if referent is start:
                path = [thing]
                while (previous := came_from[id(path[-1])]) is not None:
                    path.append(previous)
                return " -> ".join(type(step).__qualname__ for step in reversed(path))
            if id(referent) in among and id(referent) not in came_from:
                came_from[id(referent)] = thing
                queue.append(referent)
    return f"{type(start).__qualname__} (held by a cycle of others)"


@pytest.mark.parametrize("provider", sorted(BUNDLED))
async def test_an_ended_call_leaves_no_cycle_of_the_services_own(
        provider: str, transport: str, tmp_path: Path, logs: LogEvents,
        no_automatic_collection: None) -> None:
    """On every provider and transport, with the built-in handlers: once a call has ended
    its connection, session, chain and handlers are freed by reference counting."""
    options = {"recorder": {"dir": str(tmp_path / "rec")},
               "capture": {"dir": str(tmp_path / "cap")}}
    handlers = tuple(resolve_handler(kind, options.get(kind, {}), key="handlers")
                     for kind in HANDLERS)
    server = StreamServer(Settings(port=0, transport=transport,
                                   routes=(Route("/s", handlers, provider=provider),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / BUNDLED[provider])
        url = f"ws://127.0.0.1:{server.port}/s"
        report = await replay([fixture], url, speed=0)  # first use: caches fill
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: server.active_calls == 0)
        cyclic_garbage_of_the_service()
        older = frozenset(id(thing) for thing in gc.get_objects())
        report = await replay([fixture], url, speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: len(events(logs, "stream.stopped")) == 2
                    and server.active_calls == 0)
        await asyncio.sleep(0.05)  # the transport's last callbacks
        found = cyclic_garbage_of_the_service(older)
        assert [] == found, "\n".join(found)
    finally:
        await server.stop()


def test_the_policy_freezes_start_up_and_turns_off_cpythons_full_collections() -> None:
    before = gc.get_threshold()
    policy = GcPolicy(600, lambda: 3)
    try:
        policy.apply()
        assert (before[0], before[1], NO_AUTOMATIC_FULL) == gc.get_threshold()
        assert gc.get_freeze_count() > 0
        with capture_logs() as logs:
            policy.collect("interval")
        [line] = logs
        assert ("server.gc", "interval", 3) == (line["event"], line["reason"],
                                                line["active_calls"])
        assert {"duration_ms", "collected"} <= set(line)
    finally:
        policy.restore()
    assert before == gc.get_threshold()
    assert 0 == gc.get_freeze_count()


def test_gc_full_interval_zero_leaves_cpythons_collector_alone() -> None:
    before = gc.get_threshold()
    policy = GcPolicy(0, lambda: 0)
    policy.apply()
    assert (before, 0) == (gc.get_threshold(), gc.get_freeze_count())
    policy.restore()


async def test_the_policy_collects_once_no_call_is_in_progress(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamsvc.server.gc_policy.CHECK_EVERY_S", 0.01)
    calls, begun = [2], [5]
    policy = GcPolicy(3600, lambda: calls[0], lambda: begun[0])
    running = asyncio.get_running_loop().create_task(policy.run())
    try:
        await asyncio.sleep(0.05)
        assert 0 == policy.collections  # calls in progress, the interval far off
        calls[0] = 0
        await until(lambda: policy.collections == 1)
        await asyncio.sleep(0.05)
        assert 1 == policy.collections  # once per quiet spell
        begun[0] += 1  # a call came and went between two looks
        await until(lambda: policy.collections == 2)
    finally:
        running.cancel()


async def test_the_policy_collects_after_twice_the_calls_in_progress_have_begun(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("streamsvc.server.gc_policy.CHECK_EVERY_S", 0.01)
    monkeypatch.setattr("streamsvc.server.gc_policy.MIN_CALLS_BETWEEN", 5)
    begun = [0]
    policy = GcPolicy(3600, lambda: 4, lambda: begun[0])
    running = asyncio.get_running_loop().create_task(policy.run())
    try:
        await asyncio.sleep(0.02)  # the policy has looked once
        begun[0] = 7  # fewer than twice the 4 in progress
        await asyncio.sleep(0.05)
        assert 0 == policy.collections
        begun[0] = 8
        await until(lambda: policy.collections == 1)
    finally:
        running.cancel()
    assert (5, 1000, 5000) == (calls_between(0), calls_between(500), calls_between(2500))


def test_the_policy_applies_on_picows_only() -> None:
    """websockets' connections are cycles of the library's own: every ended one is
    garbage for the collector, so CPython's collector stays on that transport."""
    assert 600 == interval_for(Settings(transport="picows"))
    assert 0 == interval_for(Settings(transport="websockets"))
    assert 0 == interval_for(Settings(transport="picows", gc_full_interval_s=0))


def test_loop_lag_counts_each_sample_and_keeps_the_last_minutes_longest() -> None:
    lag = LoopLag()
    lag.clock = lambda: 100.5
    with capture_logs() as logs:
        for value, now in ((0.0004, 10.0), (0.012, 50.0), (0.003, 100.0), (0.25, 100.2),
                           (0.3, 100.4)):
            lag.observe(value, now)
    assert 5 == sum(lag.counts)
    assert 1 == lag.counts[BUCKETS_S.index(0.001)]  # 0.4 ms
    assert 0.3 == lag.recent_max()  # 10.0 and 50.0 are more than a minute old
    lag.clock = lambda: 170.0
    assert 0.0 == lag.recent_max()
    # A stall of 100 ms or more is logged, at most once per 10 s; the rest are counted.
    [stall] = [line for line in logs if line["event"] == "server.loop_stall"]
    assert (250.0, 0) == (stall["lag_ms"], stall["not_logged"])
    assert 1 == lag.not_logged


async def test_metrics_show_the_event_loop_lag() -> None:
    server = StreamServer(Settings(port=0))
    await server.start()
    try:
        await asyncio.sleep(0.05)  # a few samples
        page = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
    finally:
        await server.stop()
    assert 'streamsvc_event_loop_lag_seconds_bucket{le="0.01"}' in page
    count = next(line for line in page.splitlines()
                 if line.startswith("streamsvc_event_loop_lag_seconds_count"))
    assert float(count.split()[1]) >= 2
    assert "streamsvc_event_loop_lag_max_seconds " in page


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def test_the_served_process_collects_when_its_calls_have_ended() -> None:
    """``streamsvc serve`` as users run it: after a call, the idle collection
    (``server.gc``, reason ``idle``)."""
    env = {**os.environ, "PORT": "0", "STREAMSVC_LOG_FORMAT": "json",
           "STREAMSVC_LOG_LEVEL": "debug"}
    with subprocess.Popen([sys.executable, "-m", "streamsvc", "serve", "--host", "127.0.0.1"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                          text=True) as process:
        try:
            assert process.stdout is not None
            listening = next(json.loads(line) for line in process.stdout
                             if '"server.listening"' in line)
            subprocess.run([sys.executable, "-m", "streamsvc", "replay",
                            str(FIXTURES / "inbound_params.jsonl"), "--url",
                            f"ws://127.0.0.1:{listening['port']}/stream", "--speed", "0"],
                           capture_output=True, check=True, timeout=60)
            collected = next(json.loads(line) for line in process.stdout
                             if '"server.gc"' in line)
        finally:
            process.kill()
    assert ("idle", 0) == (collected["reason"], collected["active_calls"])
