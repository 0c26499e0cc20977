"""``python -m bench forward``: what forwarding each call's audio costs, side by side in one
run: a naive forwarder written from Twilio's samples (``bench.servers naive-forward``)
against ``streamsvc serve`` with the built-in ``forward`` (PCM16) to the same local sink
(``bench.sink``, a picows server on the load generator's core).

Server CPU per received frame under paced real-time calls (``bench/loadgen.c``), read from
``/proc/<pid>/stat`` of the server process alone; median of the repeats, rounds
interleaved; calls per core is what that cost leaves room for (1 s of CPU / (CPU per frame x
50 frames a second)); delivered is the audio the sink received against what was sent."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .loadgen import compiled_loadgen
from .served import start_served
from .server import LOAD_CPU, SERVER_CPU, cpu_seconds, free_port, installed, pin, warm_up

ROOT = Path(__file__).parent.parent
PCM16_FRAME_BYTES = 320


def _ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    if '"ready"' not in line:
        raise RuntimeError(f"not ready: {line!r}")


def _served_config(port: int, sink: str, options: dict[str, Any] | None) -> str:
    lines = ["[server]", f"port = {port}", "max_connections = 10000", "",
             "[[routes]]", 'path = "/stream"',
             f"handlers = {json.dumps(['forward'] if options is not None else [])}"]
    if options is not None:
        lines += ["", "[handlers.forward]", f'url = "{sink}/listen?call={{call_sid}}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def run_once(variant: str, options: dict[str, Any] | None, calls: int, seconds: float,
             directory: Path) -> dict[str, Any]:
    """One server and one sink; the server's CPU per frame and what reached the sink."""
    binary = compiled_loadgen()
    sink_port, port = free_port(), free_port()
    sink_url = f"ws://127.0.0.1:{sink_port}"
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(sink_port)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=pin(LOAD_CPU))
    server: subprocess.Popen[Any] | None = None
    log = directory / f"{variant}-{port}.log"
    try:
        _ready(sink)
        if variant == "naive":
            server = subprocess.Popen(
                [sys.executable, "-m", "bench.servers", "naive-forward", "--port", str(port),
                 "--sink", f"{sink_url}/listen"], stdout=subprocess.PIPE, text=True,
                cwd=ROOT, preexec_fn=pin(SERVER_CPU))
            _ready(server)
        else:
            server = start_served(_served_config(port, sink_url, options), log)
        url = f"ws://127.0.0.1:{port}/stream"
        warm_frames = warm_up(url)
        command = ([str(binary), "127.0.0.1", str(port), "/stream", str(calls),
                    str(seconds), "1", "0"] if binary is not None else
                   [sys.executable, "-m", "bench.loadgen", "--url", url, "--calls",
                    str(calls), "--seconds", str(seconds)])
        generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     preexec_fn=pin(LOAD_CPU))
        assert generator.stdout is not None
        json.loads(generator.stdout.readline())
        before = cpu_seconds(server.pid)
        load = json.loads(generator.stdout.read())
        generator.wait()
        time.sleep(0.5)  # the last frames, and the calls' ends
        spent = cpu_seconds(server.pid) - before
        server.terminate()
        server.wait(timeout=60)
        sink.terminate()
        assert sink.stdout is not None
        received = json.loads(sink.stdout.read().splitlines()[-1])
        sink.wait(timeout=30)
    finally:
        for process in (server, sink):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
    sent = load["frames_sent"]
    expected = (sent + warm_frames) * PCM16_FRAME_BYTES
    return {"cpu_us_per_frame": spent / sent * 1e6 if sent else 0.0,
            "delivered": received["binary_bytes"] / expected if variant != "receive" else None,
            "sink": received, "failed": load["failed"]}


VARIANTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("naive forwarder (websockets, json, base64, audioop)", "naive", {}),
    ("streamsvc serve, no handler (receive only)", "receive", None),
    ("streamsvc serve + forward, websockets client", "served", {"client": "websockets"}),
    ("streamsvc serve + forward (default: picows)", "served", {}),
    ("streamsvc serve + forward, batch_ms = 100", "served", {"batch_ms": 100}),
]


def suite(*, quick: bool = False) -> None:
    calls, seconds, repeats = (150, 3.0, 1) if quick else (300, 6.0, 3)
    variants = [v for v in VARIANTS if "picows" not in v[0] or installed("picows")]
    print(f"\nforward: server CPU per frame, {calls} real-time calls x {seconds:g} s to a local "
          f"sink, median of {repeats} (min-max), rounds interleaved; ratios against the "
          "naive forwarder")
    print(f"{'server':52} {'us/frame':>9} {'spread':>11} {'x naive':>8} {'calls/core':>11} "
          f"{'delivered':>10}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="streamsvc-forward-") as directory:
        for _ in range(repeats):
            for name, variant, options in variants:
                runs[name].append(run_once(variant, options, calls, seconds, Path(directory)))
    naive = statistics.median(r["cpu_us_per_frame"] for r in runs[variants[0][0]])
    for name, _, _ in variants:
        values = [r["cpu_us_per_frame"] for r in runs[name]]
        median = statistics.median(values)
        delivered = [r["delivered"] for r in runs[name] if r["delivered"] is not None]
        shown = f"{100 * min(delivered):9.1f}%" if delivered else f"{'-':>10}"
        print(f"{name:52} {median:9.1f} {min(values):5.1f}-{max(values):<5.1f} "
              f"{median / naive:8.2f} {1e6 / (median * 50):11.0f} {shown}", flush=True)
