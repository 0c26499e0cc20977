"""Soak: N minutes of real-time calls against a server process, sampling its RSS and open
file descriptors, to show whether either drifts. Not run in CI.

    python -m bench.soak --minutes 10 --concurrency 100 [--transport picows]

Calls start and end continuously (each replays a bundled fixture in real time); every
``--sample-s`` seconds the server's RSS and open FD count are printed, and at the end the
drift between the first and last quarter of the run (medians) is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from streamsvc.fixtures import load_fixture
from streamsvc.replay import replay_session

FIXTURE = Path(__file__).parent.parent / "fixtures" / "inbound_params.jsonl"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def call_loop(url: str, deadline: float, results: list[bool]) -> None:
    fixture = load_fixture(FIXTURE)
    while time.monotonic() < deadline:
        copy = len(results) + 1  # fresh streamSid and callSid for every call
        results.append((await replay_session(fixture, url, speed=1, copy=copy)).ok)


async def soak(url: str, pid: int, minutes: float, concurrency: int, sample_s: float) -> None:
    deadline = time.monotonic() + minutes * 60
    results: list[bool] = []
    loops = [asyncio.create_task(call_loop(url, deadline, results))
             for _ in range(concurrency)]
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    print(f"{'t_s':>7} {'rss_kB':>9} {'fds':>6} {'calls':>7}")
    while time.monotonic() < deadline:
        await asyncio.sleep(sample_s)
        sample = (time.monotonic() - started, rss_kb(pid), open_fds(pid))
        samples.append(sample)
        print(f"{sample[0]:7.0f} {sample[1]:9d} {sample[2]:6d} {len(results):7d}", flush=True)
    await asyncio.gather(*loops)
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    rss_drift = statistics.median(s[1] for s in last) - statistics.median(s[1] for s in first)
    fd_drift = statistics.median(s[2] for s in last) - statistics.median(s[2] for s in first)
    print(json.dumps({"minutes": minutes, "concurrency": concurrency, "calls": len(results),
                      "failed": results.count(False), "rss_drift_kb": rss_drift,
                      "fd_drift": fd_drift}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--transport", choices=["websockets", "picows"], default="websockets")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--port", "0", "--log-level", "info",
         "--transport", args.transport],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "STREAMSVC_LOG_FORMAT": "json"})
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        # Keep reading the server's log so that its pipe never fills.
        drain = subprocess.Popen(["cat"], stdin=server.stdout, stdout=subprocess.DEVNULL)
        asyncio.run(soak(f"ws://127.0.0.1:{port}/stream", server.pid, args.minutes,
                         args.concurrency, args.sample_s))
    finally:
        server.terminate()
        server.wait()
    drain.wait()


if __name__ == "__main__":
    main()
