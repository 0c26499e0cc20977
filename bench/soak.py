"""Soak: N minutes of real-time calls against a server process, sampling its RSS and open
file descriptors, to show whether either drifts. Not run in CI.

    python -m bench.soak --minutes 10 --concurrency 100 [--transport picows]
    python -m bench.soak --minutes 5 --concurrency 20 --adversarial

Calls start and end continuously (each replays a bundled fixture in real time); every
``--sample-s`` seconds the server's RSS, open FD count and ``/healthz`` answer time are
printed, and at the end the drift between the first and last quarter of the run (medians).

``--adversarial``: after the first quarter (honest calls only: the RSS it settles at is the
honest-load level), the attacks of ``bench/attacks.py`` run in loops beside the honest calls
(ping floods, oversized messages, track names with huge gaps, DTMF and mark spam, idle and
half-open sockets, junk HTTP). The report adds the peak RSS against the honest level, the
slowest ``/healthz``, the honest calls' pacing lateness (p99), and how many honest calls the
server did not see whole (``stream.stopped`` with reason ``stop`` and every frame, read from
its own log).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from streamsvc.replay import SessionResult, replay_session
from streamsvc.replay.fixture import load_fixture

from .attacks import ATTACKS

FIXTURE = Path(__file__).parent.parent / "fixtures" / "inbound_params.jsonl"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# Each honest call's copy number: fresh ids for every call, across the concurrent loops (a
# second stream with a live stream's ids is refused).
COPIES = itertools.count(1)


async def call_loop(url: str, deadline: float, results: list[SessionResult]) -> None:
    fixture = load_fixture(FIXTURE)
    while time.monotonic() < deadline:
        results.append(await replay_session(fixture, url, speed=1, copy=next(COPIES)))


async def attack_loop(name: str, port: int, deadline: float, counts: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        await ATTACKS[name](port)
        counts[name] = counts.get(name, 0) + 1


async def healthz_ms(port: int) -> float:
    """How long ``GET /healthz`` takes to answer (a stalled loop shows here first)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.read()
            writer.close()
    except (OSError, TimeoutError):
        return float("inf")
    return (time.monotonic() - started) * 1000


async def soak(port: int, pid: int, minutes: float, concurrency: int, sample_s: float,
               stopped: dict[str, dict[str, object]], adversarial: bool) -> None:
    url = f"ws://127.0.0.1:{port}/stream"
    started = time.monotonic()
    deadline = started + minutes * 60
    results: list[SessionResult] = []
    loops = [asyncio.create_task(call_loop(url, deadline, results))
             for _ in range(concurrency)]
    attacks: dict[str, int] = {}
    attack_from = started + minutes * 60 / 4 if adversarial else deadline
    samples: list[tuple[float, int, int, float]] = []
    print(f"{'t_s':>7} {'rss_kB':>9} {'fds':>6} {'calls':>7} {'healthz_ms':>10}")
    while time.monotonic() < deadline:
        await asyncio.sleep(sample_s)
        if adversarial and not attacks and time.monotonic() >= attack_from:
            attacks = dict.fromkeys(ATTACKS, 0)
            loops += [asyncio.create_task(attack_loop(name, port, deadline, attacks))
                      for name in ATTACKS]
        sample = (time.monotonic() - started, rss_kb(pid), open_fds(pid),
                  await healthz_ms(port))
        samples.append(sample)
        print(f"{sample[0]:7.0f} {sample[1]:9d} {sample[2]:6d} {len(results):7d} "
              f"{sample[3]:10.1f}", flush=True)
    await asyncio.gather(*loops)
    await asyncio.sleep(2)  # the last calls' summaries reach the log
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    report: dict[str, object] = {
        "minutes": minutes, "concurrency": concurrency, "calls": len(results),
        "failed": sum(not r.ok for r in results),
        "failures": dict(collections.Counter(str(r.error)[:120] for r in results if not r.ok)),
        "rss_drift_kb": statistics.median(s[1] for s in last)
        - statistics.median(s[1] for s in first),
        "fd_drift": statistics.median(s[2] for s in last)
        - statistics.median(s[2] for s in first),
        "healthz_max_ms": round(max(s[3] for s in samples), 1),
    }
    if adversarial:
        honest = statistics.median(s[1] for s in samples if s[0] <= attack_from - started)
        peak = max(s[1] for s in samples if s[0] > attack_from - started)
        lateness = sorted(x for r in results for x in r.lateness_ms)
        incomplete = [r.stream_sid for r in results if not _whole(stopped.get(r.stream_sid or ""))]
        report.update({
            "attacks": attacks, "rss_honest_kb": honest, "rss_peak_kb": peak,
            "rss_peak_x_honest": round(peak / honest, 2),
            "honest_lateness_p99_ms": round(lateness[int(len(lateness) * 0.99)], 1)
            if lateness else None,
            "honest_calls_incomplete": len(incomplete),
            "server_error_lines": len(ERROR_LINES),
        })
    print(json.dumps(report))


def _whole(stopped: dict[str, object] | None) -> bool:
    """Whether the server saw an honest call whole: ended by its stop, every frame there."""
    return bool(stopped) and stopped.get("reason") == "stop" and stopped.get(
        "frames") == {"inbound": 204} and stopped.get("missing_frames") == {"inbound": 0}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--transport", choices=["auto", "websockets", "picows"],
                        default="auto", help="the server's transport (default: the "
                        "service's own default, picows where it is installed)")
    parser.add_argument("--adversarial", action="store_true",
                        help="run the attacks of bench/attacks.py beside the honest calls")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--port", "0", "--log-level", "info",
         "--transport", args.transport],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "STREAMSVC_LOG_FORMAT": "json"})
    try:
        assert server.stdout is not None
        listening = json.loads(server.stdout.readline())
        port = listening["port"]
        print(f"transport: {listening['transport']}", flush=True)
        # Keep reading the server's log (so that its pipe never fills), keeping each
        # stream's summary.
        stopped: dict[str, dict[str, object]] = {}
        reader = threading.Thread(target=_read_log, args=(server.stdout, stopped), daemon=True)
        reader.start()
        asyncio.run(soak(port, server.pid, args.minutes, args.concurrency, args.sample_s,
                         stopped, args.adversarial))
    finally:
        server.terminate()
        server.wait()


# Error-level lines and tracebacks the server wrote (a peer's fault must never be one).
ERROR_LINES: list[str] = []


def _read_log(stream: IO[str], stopped: dict[str, dict[str, object]]) -> None:
    for line in stream:
        if '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line:
            ERROR_LINES.append(line.strip()[:300])
            if len(ERROR_LINES) <= 5:
                print("server error line:", ERROR_LINES[-1], flush=True)
        if '"stream.stopped"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            stopped[str(entry.get("stream_sid"))] = entry


if __name__ == "__main__":
    main()
