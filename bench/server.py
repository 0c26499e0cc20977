"""Server benchmarks under paced real-time load, each server in its own process and the load
from ``bench.loadgen`` in another (raw sockets, calls spread over the 20 ms period).

* ``server``: CPU per received frame, the real service (asyncio and uvloop, no handler, and
  with the recorder) against the bare websockets receive loop and a naive server that
  ``json.loads`` every frame on stock asyncio; ratios against the naive server.
* ``capacity``: the most concurrent real-time calls one server process carries with p99
  receive-to-handler latency under 20 ms and no frame lost, found by stepping the load, for
  inbound-only and both-track calls.
* ``memory``: RSS per idle call (started, no audio) and per active call.

CPU is read from ``/proc/<pid>/stat`` of the server process alone; every figure is the
median of the repeats.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .loadgen import compiled_loadgen

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LATENCY_LIMIT_MS = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def installed(module: str) -> bool:
    """Whether an optional package (uvloop, picows: the ``fast`` extra) is importable."""
    return importlib.util.find_spec(module) is not None


def run_load(variant: str, calls: int, seconds: float, *, loop: str = "asyncio",
             transport: str = "websockets", both_tracks: bool = False,
             idle: bool = False, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One server process, one load generator process; what the server spent and saw."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", variant, "--port", str(port), "--loop", loop,
         "--transport", transport, *extra],
        stdout=subprocess.PIPE, text=True, preexec_fn=pin(SERVER_CPU))
    try:
        assert server.stdout is not None
        json.loads(server.stdout.readline())  # ready
        url = f"ws://127.0.0.1:{port}/stream"
        warm_up_frames = warm_up(url)
        rss_before = rss_kb(server.pid)
        binary = None if idle else compiled_loadgen()
        if binary is not None:
            command = [str(binary), "127.0.0.1", str(port), "/stream", str(calls),
                       str(seconds), "2" if both_tracks else "1", "0"]
        else:
            command = [sys.executable, "-m", "bench.loadgen", "--url", url, "--calls",
                       str(calls), "--seconds", str(seconds)]
            command += ["--both-tracks"] * both_tracks + ["--idle"] * idle
        generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=pin(LOAD_CPU))
        assert generator.stdout is not None
        json.loads(generator.stdout.readline())  # all calls connected and started
        cpu_before = cpu_seconds(server.pid)
        time.sleep(seconds / 2)
        rss_during = rss_kb(server.pid)
        load = json.loads(generator.stdout.read())
        generator.wait()
        time.sleep(0.3)  # the last frames in flight
        cpu_spent = cpu_seconds(server.pid) - cpu_before
        server.terminate()
        try:
            output = server.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            # The SIGTERM can be lost: a loop that is behind lets its self-pipe fill, and
            # CPython then drops the signal ("Exception ignored when trying to write to the
            # signal wakeup fd"). Ask again.
            server.terminate()
            output = server.communicate(timeout=60)[0]
        seen = json.loads(output.splitlines()[-1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
    sent = load["frames_sent"]
    return {
        "calls": load["calls"], "failed": load["failed"], "frames_sent": sent,
        "frames_received": seen["frames"] - warm_up_frames, "cpu_s": cpu_spent,
        "cpu_us_per_frame": cpu_spent / sent * 1e6 if sent else 0.0,
        "latency_ms": seen.get("latency_ms", {}), "rss_before_kb": rss_before,
        "rss_during_kb": rss_during, "sender_lateness_ms": load["sender_lateness_ms"],
    }


# The server gets one core and the load generator the other, so that neither's work shows
# up in the other's figures (on a machine with fewer cores, both share what there is).
SERVER_CPU, LOAD_CPU = 0, 1


def pin(cpu: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child process to ``cpu``, when this machine has it."""
    available = os.sched_getaffinity(0)
    if cpu not in available or len(available) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def warm_up(url: str) -> int:
    """Put a server in the state production is in before it is measured: a few calls have
    connected and ended. Until a connection has once closed, asyncio's selector transport
    serves each 256 KiB read buffer with mmap/munmap, a cost a running server no longer
    pays; measuring before that made the stock-asyncio baselines look slower than they are.
    Returns the frames it sent (the server counts them too)."""
    # Ids of their own: a stream id still live on the server would be refused.
    done = subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", url, "--calls",
                           "4", "--seconds", "0.5", "--first", "1000000"],
                          capture_output=True, text=True,
                          check=True, timeout=60, preexec_fn=pin(LOAD_CPU))
    return int(json.loads(done.stdout.splitlines()[-1])["frames_sent"])


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def cpu_suite(*, quick: bool = False) -> None:
    calls, seconds, repeats = (150, 3.0, 1) if quick else (300, 6.0, 3)
    fast = installed("picows") and installed("uvloop")
    variants = [("naive", "naive", "asyncio", "websockets"),
                ("bare websockets", "bare", "asyncio", "websockets"),
                ("streamsvc, websockets", "service", "asyncio", "websockets"),
                ("streamsvc + recorder, websockets", "service-recorder", "asyncio",
                 "websockets")]
    if installed("uvloop"):
        variants[1:1] = [("naive, uvloop", "naive", "uvloop", "websockets")]
        variants.insert(4, ("streamsvc, websockets, uvloop", "service", "uvloop",
                            "websockets"))
    if installed("fastapi") and installed("uvicorn"):
        variants[1:1] = [("fastapi + uvicorn, uvloop", "fastapi", "uvloop", "websockets"),
                         ("fastapi + uvicorn, asyncio", "fastapi", "asyncio", "websockets")]
        variants.append(("streamsvc mounted in FastAPI (asgi)", "asgi", "uvloop",
                         "websockets"))
    if fast:
        variants += [("picows listener, no parse (floor)", "floor", "uvloop", "auto"),
                     ("streamsvc default (picows, uvloop)", "service", "uvloop", "auto"),
                     ("streamsvc default + recorder", "service-recorder", "uvloop", "auto")]
    print(f"\nserver CPU per frame: {calls} real-time calls x {seconds:g} s, median of "
          f"{repeats} (min-max); ratios against the naive server and FastAPI on uvloop")
    print(f"{'server':36} {'us/frame':>9} {'spread':>11} {'x naive':>8} {'x fastapi':>10} "
          f"{'lost':>5}")
    results = {}
    for name, variant, loop, transport in variants:
        runs = [run_load(variant, calls, seconds, loop=loop, transport=transport)
                for _ in range(repeats)]
        lost = max(r["frames_sent"] - r["frames_received"] for r in runs)
        values = [r["cpu_us_per_frame"] for r in runs]
        results[name] = (statistics.median(values), min(values), max(values), lost)
    naive = results["naive"][0]
    fastapi = results.get("fastapi + uvicorn, uvloop", (0.0,))[0]
    for name, (micros, low, high, lost) in results.items():
        versus_fastapi = f"{micros / fastapi:10.2f}" if fastapi else f"{'-':>10}"
        print(f"{name:36} {micros:9.1f} {low:5.1f}-{high:<5.1f} {micros / naive:8.2f} "
              f"{versus_fastapi} {lost:5d}", flush=True)


def bus_suite(*, quick: bool = False) -> None:
    """The fleet's cost per frame: the default service with no Redis, as a fleet member
    publishing its call events, and publishing its audio too (a redis-server on loopback,
    started here, on the load generator's core)."""
    import shutil
    import tempfile

    program = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if program is None:
        print("\nbus: redis-server is not installed (apt-get install redis-server): skipped")
        return
    calls, seconds, repeats = (150, 3.0, 1) if quick else (300, 6.0, 3)
    redis_port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        redis = subprocess.Popen([program, "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", directory],
                                 stdout=subprocess.DEVNULL, preexec_fn=pin(LOAD_CPU))
        try:
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{redis_port}/0"
            variants = [("no bus", ()), ("events", ("--redis-url", url)),
                        ("events + audio", ("--redis-url", url, "--publish-audio"))]
            print(f"\nbus: server CPU per frame, default transport, {calls} real-time calls x "
                  f"{seconds:g} s, median of {repeats} (min-max), rounds interleaved")
            print(f"{'server':20} {'us/frame':>9} {'spread':>11} {'x no bus':>9} {'lost':>5}")
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
            for _ in range(repeats):
                for name, extra in variants:
                    runs[name].append(run_load("service", calls, seconds, loop="uvloop",
                                               transport="auto", extra=extra))
        finally:
            redis.kill()
            redis.wait()
    base = statistics.median(r["cpu_us_per_frame"] for r in runs["no bus"])
    for name, _ in variants:
        values = [r["cpu_us_per_frame"] for r in runs[name]]
        lost = max(r["frames_sent"] - r["frames_received"] for r in runs[name])
        median = statistics.median(values)
        print(f"{name:20} {median:9.1f} {min(values):5.1f}-{max(values):<5.1f} "
              f"{median / base:9.2f} {lost:5d}", flush=True)


def passes(run: dict[str, Any]) -> bool:
    return (run["failed"] == 0 and run["frames_received"] == run["frames_sent"]
            and run["latency_ms"].get("p99", 1e9) < LATENCY_LIMIT_MS)


def capacity_suite(*, quick: bool = False) -> None:
    """The served process beside the in-process service (bench.served), then the
    in-process service on the websockets transport."""
    from . import served

    served.suite(quick=quick)
    capacity("websockets", quick=quick)


def capacity(transport: str, *, quick: bool) -> None:
    seconds = 4.0 if quick else 8.0
    loop = "uvloop" if installed("uvloop") else "asyncio"
    steps = list(range(250, 3001, 250))
    print(f"\ncalls per server process ({transport}, {loop}): p99 receive-to-handler latency "
          f"< {LATENCY_LIMIT_MS:g} ms and no frame lost, {seconds:g} s per step")
    print(f"{'tracks':8} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} "
          f"{'cpu %':>6} {'sender p99 ms':>14}")
    for both in (False, True):
        best = 0
        for calls in steps:
            run = run_load("service-latency", calls, seconds, loop=loop, transport=transport,
                           both_tracks=both)
            latency = run["latency_ms"]
            print(f"{'both' if both else 'inbound':8} {calls:6d} {latency.get('p50', 0):8.2f} "
                  f"{latency.get('p99', 0):8.2f} {run['frames_sent'] - run['frames_received']:6d} "
                  f"{100 * run['cpu_s'] / seconds:6.0f} {run['sender_lateness_ms']['p99']:14.2f}",
                  flush=True)
            if run["sender_lateness_ms"]["p99"] >= LATENCY_LIMIT_MS:
                # The load generator could not send in real time: this step's load was
                # below its nominal rate, so it says nothing about the server.
                print(f"{'both' if both else 'inbound':8} the load generator fell behind "
                      f"(its own p99 lateness >= {LATENCY_LIMIT_MS:g} ms): the limit of "
                      "this measurement, not of the server")
                break
            if not passes(run):
                break
            best = calls
        print(f"{'both' if both else 'inbound':8} most calls passing: {best}")


def memory_suite(*, quick: bool = False) -> None:
    calls = 200 if quick else 500
    print(f"\nmemory: RSS of one server process with {calls} calls")
    runs = [("idle (started, no audio)", run_load("service", calls, 4.0, idle=True)),
            ("active (50 frames/s)", run_load("service", calls, 4.0))]
    if installed("picows"):
        runs += [("picows idle", run_load("service", calls, 4.0, idle=True,
                                          transport="picows")),
                 ("picows active", run_load("service", calls, 4.0, transport="picows"))]
    for name, run in runs:
        per_call = (run["rss_during_kb"] - run["rss_before_kb"]) / calls
        print(f"{name:28} {run['rss_before_kb']:7d} kB before {run['rss_during_kb']:7d} kB "
              f"during  {per_call:6.1f} kB per call")
