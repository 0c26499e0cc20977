"""Capacity of the process users run: ``streamsvc serve`` started as the README starts it
(default settings, JSON logging at the default level to a file, pings on), one route whose
handler measures receive-to-handler latency on the public handler API
(:mod:`bench.latency`), stepped with real-time calls from the compiled load generator
(``bench/loadgen.c``; the Python one in several processes where no C compiler is found).

The server is pinned to one core and the load generator to the other. Per step: calls, p50
and p99 receive-to-handler latency over every frame of every call (from the calls'
``stream.stopped`` reports), frames lost, the server's CPU, the longest event-loop stall
(``streamsvc_event_loop_lag_max_seconds`` at the end of the step) and the load generator's
own p99 lateness and CPU per frame (what it costs).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import latency
from .loadgen import compiled_loadgen
from .server import (
    LATENCY_LIMIT_MS,
    LOAD_CPU,
    SERVER_CPU,
    cpu_seconds,
    free_port,
    installed,
    pin,
    run_load,
)

ROOT = Path(__file__).parent.parent
STALL_LIMIT_MS = 10.0


def load_command(binary: Path | None, port: int, calls: int, seconds: float,
                 tracks: int) -> list[list[str]]:
    """The load generator's command line(s): one compiled process, or four Python ones
    sharing the calls."""
    if binary is not None:
        return [[str(binary), "127.0.0.1", str(port), "/stream", str(calls), str(seconds),
                 str(tracks), "0"]]
    share = -(-calls // 4)
    commands = []
    for first in range(0, calls, share):
        commands.append([sys.executable, "-m", "bench.loadgen", "--url",
                         f"ws://127.0.0.1:{port}/stream", "--calls",
                         str(min(share, calls - first)), "--seconds", str(seconds),
                         "--first", str(first)] + ["--both-tracks"] * (tracks == 2))
    return commands


def cpu_times() -> list[int]:
    """The machine's CPU time counters (``/proc/stat``): user ... steal."""
    return [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """CPU time the hypervisor took from this machine between two readings, in percent: a
    virtual machine's noise, which no process here controls."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return 100 * spent[7] / sum(spent) if sum(spent) else 0.0


def lag_buckets(port: int) -> dict[float, float]:
    """``streamsvc_event_loop_lag_seconds``'s cumulative bucket counts, by upper bound."""
    buckets = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("streamsvc_event_loop_lag_seconds_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def longest_stall_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the highest lag bucket that counted a sample between two
    scrapes: the longest stall, to the histogram's resolution."""
    bounds = sorted(after)
    highest = 0.0
    previous_after = previous_before = 0.0
    for bound in bounds:
        count = (after[bound] - previous_after) - (before.get(bound, 0.0) - previous_before)
        if count > 0:
            highest = bound
        previous_after, previous_before = after[bound], before.get(bound, 0.0)
    return highest * 1000


LATENCY_ROUTE = '[[routes]]\npath = "/stream"\nhandlers = ["bench.latency:LatencyHandler"]\n'


def start_served(config: str, log: Path) -> subprocess.Popen[bytes]:
    """``streamsvc serve --config`` with ``config`` (TOML), pinned to the server's core,
    its log in ``log``; returns once it listens."""
    path = log.with_suffix(".toml")
    path.write_text(config, encoding="utf-8")
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "streamsvc", "serve", "--config",
                                   str(path)], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=ROOT, preexec_fn=pin(SERVER_CPU))
    deadline = time.monotonic() + 30
    while b'"server.listening"' not in log.read_bytes():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"streamsvc serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return server


def stopped_lines(log: Path) -> tuple[list[dict[str, Any]], int]:
    """From a served process's log: the latency handler's reports, and the frames its
    calls' summaries counted."""
    reports, received = [], 0
    for line in log.read_bytes().splitlines():
        if b'"stream.stopped"' in line:
            stopped = json.loads(line)
            received += sum(stopped["frames"].values())
            reports += [r for r in stopped["handlers"].values() if "latency_0_1ms" in r]
    return reports, received


def run_step(binary: Path | None, calls: int, seconds: float, tracks: int,
             directory: Path) -> dict[str, Any]:
    port = free_port()
    log = directory / "serve.log"
    # max_connections: the default 1,000 is below what is measured here.
    server = start_served(f"[server]\nport = {port}\nmax_connections = 10000\n\n"
                          + LATENCY_ROUTE, log)
    try:
        generators = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                       cwd=ROOT, preexec_fn=pin(LOAD_CPU))
                      for command in load_command(binary, port, calls, seconds, tracks)]
        for generator in generators:
            assert generator.stdout is not None
            json.loads(generator.stdout.readline())  # its calls connected and started
        cpu_before = cpu_seconds(server.pid)
        machine_before = cpu_times()
        streaming = time.monotonic()
        lag_before = lag_buckets(port)
        # The stall is read over the streaming alone: the calls' set-up before it and their
        # ends after it (every call stopping at once) are not the load being measured.
        time.sleep(max(0.0, seconds - 0.3 - (time.monotonic() - streaming)))
        lag_during = lag_buckets(port)
        steal = steal_percent(machine_before, cpu_times())
        loads, load_cpu = [], 0.0
        for generator in generators:
            assert generator.stdout is not None
            loads.append(json.loads(generator.stdout.read()))
            _, status, usage = os.wait4(generator.pid, 0)
            generator.returncode = os.waitstatus_to_exitcode(status)
            load_cpu += usage.ru_utime + usage.ru_stime
        cpu_spent = cpu_seconds(server.pid) - cpu_before
        time.sleep(1.0)  # the stops in flight
        server.terminate()
        server.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
    reports, received = stopped_lines(log)
    sent = sum(load["frames_sent"] for load in loads)
    return {"calls": sum(load["calls"] for load in loads),
            "failed": sum(load["failed"] for load in loads), "frames_sent": sent,
            "lost": sent - received, "cpu_percent": 100 * cpu_spent / seconds,
            "latency_ms": latency.percentiles(latency.merge(reports)),
            "stall_ms": longest_stall_ms(lag_before, lag_during), "steal_percent": steal,
            "sender_p99_ms": max(load["sender_lateness_ms"]["p99"] for load in loads),
            "load_us_per_frame": load_cpu / sent * 1e6 if sent else 0.0}


def passes(step: dict[str, Any]) -> bool:
    return (step["failed"] == 0 and step["lost"] == 0
            and step["latency_ms"].get("p99", 1e9) < LATENCY_LIMIT_MS)


def suite(*, quick: bool = False) -> None:
    """Steps the served process, and beside each step the in-process service
    (``bench.servers service-latency``) under the same load generator."""
    seconds = 5.0 if quick else 10.0
    binary = compiled_loadgen()
    generator = ("the compiled load generator (bench/loadgen.c)" if binary is not None else
                 "4 Python load generators (no C compiler found)")
    steps = range(250, 3001, 250)
    print(f"\ncalls per process: streamsvc serve (default settings, JSON logs at info, pings "
          f"on, a latency handler on the public API) and the in-process service, "
          f"{generator}; p99 receive-to-handler latency < {LATENCY_LIMIT_MS:g} ms and no "
          f"frame lost; {seconds:g} s per step; stall: the longest event-loop lag while "
          "streaming (to the histogram's bucket); steal: CPU the hypervisor took")
    print(f"{'process':10} {'tracks':7} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'lost':>5} {'cpu %':>6} {'stall ms':>9} {'steal %':>8} {'sender p99':>11} "
          f"{'gen us/frame':>13}")
    loop = "uvloop" if installed("uvloop") else "asyncio"
    with tempfile.TemporaryDirectory(prefix="streamsvc-served-") as directory:
        for tracks in (1, 2):
            name = "inbound" if tracks == 1 else "both"
            best = {"served": 0, "in-process": 0}
            going = {"served": True, "in-process": True}
            for calls in steps:
                if not any(going.values()):
                    break
                if going["served"]:
                    step = run_step(binary, calls, seconds, tracks, Path(directory))
                    going["served"] = _report("served", name, calls, step)
                    best["served"] = calls if going["served"] else best["served"]
                if going["in-process"]:
                    run = run_load("service-latency", calls, seconds, loop=loop,
                                   transport="auto", both_tracks=tracks == 2)
                    latency_ms = run["latency_ms"]
                    step = {"failed": run["failed"],
                            "lost": run["frames_sent"] - run["frames_received"],
                            "cpu_percent": 100 * run["cpu_s"] / seconds,
                            "latency_ms": latency_ms, "stall_ms": float("nan"),
                            "steal_percent": float("nan"),
                            "sender_p99_ms": run["sender_lateness_ms"]["p99"],
                            "load_us_per_frame": float("nan")}
                    going["in-process"] = _report("in-process", name, calls, step)
                    best["in-process"] = calls if going["in-process"] else best["in-process"]
            for process, calls in best.items():
                print(f"{process:10} {name:7} most calls passing: {calls}")


def _report(process: str, tracks: str, calls: int, step: dict[str, Any]) -> bool:
    """Print one step; whether the next step should run."""
    lat = step["latency_ms"]
    print(f"{process:10} {tracks:7} {calls:6d} {lat.get('p50', 0):7.1f} {lat.get('p99', 0):7.1f} "
          f"{lat.get('max', 0):7.1f} {step['lost']:5d} {step['cpu_percent']:6.0f} "
          f"{step['stall_ms']:9.1f} {step['steal_percent']:8.1f} {step['sender_p99_ms']:11.2f} "
          f"{step['load_us_per_frame']:13.1f}", flush=True)
    if step["sender_p99_ms"] >= LATENCY_LIMIT_MS:
        print(f"{process:10} {tracks:7} the load generator fell behind: the limit of this "
              "measurement, not of the server")
        return False
    return passes(step)


def ramp_once(interval_s: float, waves: int, calls_per_wave: int, gap_s: float,
              directory: Path) -> dict[str, Any]:
    """``streamsvc serve`` with ``gc_full_interval_s = interval_s`` while calls join in
    waves, each wave streaming until the end: the latency over every frame and the
    longest loop stall, from the first wave's start to the last call's end."""
    binary = compiled_loadgen()
    if binary is None:
        raise RuntimeError("the ramp needs the compiled load generator (a C compiler)")
    port = free_port()
    log = directory / f"ramp-{port}.log"
    server = start_served(f"[server]\nport = {port}\nmax_connections = 10000\n"
                          f"gc_full_interval_s = {interval_s}\n\n" + LATENCY_ROUTE, log)
    try:
        before = lag_buckets(port)
        generators = []
        total_s = waves * gap_s + 4.0
        for wave in range(waves):
            generator = subprocess.Popen(
                [str(binary), "127.0.0.1", str(port), "/stream", str(calls_per_wave),
                 str(total_s - wave * gap_s), "1", str(wave * 100_000)],
                stdout=subprocess.PIPE, text=True, preexec_fn=pin(LOAD_CPU))
            assert generator.stdout is not None
            generator.stdout.readline()
            generators.append(generator)
            time.sleep(gap_s)
        for generator in generators:
            assert generator.stdout is not None
            generator.stdout.read()
            generator.wait()
        stall = longest_stall_ms(before, lag_buckets(port))
        server.terminate()
        server.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
    reports, _ = stopped_lines(log)
    return {"latency_ms": latency.percentiles(latency.merge(reports)), "stall_ms": stall}


def ramp_suite(*, quick: bool = False) -> None:
    """The collection policy's effect: calls joining while others stream, with
    ``gc_full_interval_s`` at its default and at 0 (CPython's own collector), rounds
    interleaved."""
    waves, per_wave, gap_s, repeats = (4, 100, 1.0, 1) if quick else (6, 125, 1.5, 3)
    print(f"\ngc: {waves} waves of {per_wave} calls joining {gap_s:g} s apart while the "
          f"earlier ones stream (streamsvc serve, the latency handler), median of {repeats} "
          "(min-max), rounds interleaved")
    print(f"{'collector':36} {'p99 ms':>7} {'spread':>11} {'max ms':>7} {'spread':>11} "
          f"{'stall ms':>9} {'spread':>11}")
    variants = [("policy (gc_full_interval_s = 600)", 600.0),
                ("CPython's own (gc_full_interval_s = 0)", 0.0)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="streamsvc-ramp-") as directory:
        for _ in range(repeats):
            for name, interval in variants:
                runs[name].append(ramp_once(interval, waves, per_wave, gap_s, Path(directory)))
    for name, _ in variants:
        p99 = [r["latency_ms"].get("p99", 0.0) for r in runs[name]]
        worst = [r["latency_ms"].get("max", 0.0) for r in runs[name]]
        stall = [r["stall_ms"] for r in runs[name]]
        print(f"{name:36} " + " ".join(
            f"{statistics.median(values):7.1f} {min(values):5.1f}-{max(values):<5.1f}"
            for values in (p99, worst, stall)), flush=True)
