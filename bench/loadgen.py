"""A cheap load generator: many Twilio-like real-time streams from one process, over raw
sockets, so that the server under test gets the CPU. The suites use its compiled twin,
``bench/loadgen.c`` (the same streams at about 13 us of CPU a frame on loopback, most of
it the kernel's; :func:`compiled_loadgen` builds it with the machine's C compiler), and
fall back to this one where there is none.

    python -m bench.loadgen --url ws://127.0.0.1:8080/stream --calls 500 --seconds 10

Each call does a WebSocket handshake, sends ``connected`` and ``start``, then one 160-byte
``media`` frame every 20 ms per track for ``--seconds``, then ``stop``. Calls are spread
evenly over the 20 ms period, as real calls are, and each payload starts with the sender's
``time.monotonic_ns()`` (a clock shared by every process on the machine), so that the server
can measure receive-to-handler latency. Frames are masked with the all-zero key, which
RFC 6455 allows and which costs nothing to apply. Prints one JSON line: calls connected,
frames sent, and how late the sender itself was (which bounds what the server can show).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

FRAME_S = 0.020
SLOTS = 20  # sub-ticks per 20 ms period over which calls are spread
_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
SOURCE = Path(__file__).with_name("loadgen.c")


def compiled_loadgen() -> Path | None:
    """``bench/loadgen.c`` compiled (once per version of the source), or None without a C
    compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = Path(tempfile.gettempdir()) / f"streamsvc-loadgen-{digest}"
    if not binary.exists():
        partial = binary.with_suffix(".partial")
        subprocess.run([compiler, "-O2", "-o", str(partial), str(SOURCE)], check=True)
        partial.replace(binary)
    return binary


def frame(text: bytes) -> bytes:
    """A masked client text frame (FIN, opcode 1) with the all-zero masking key."""
    length = len(text)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + text


def connect(host: str, port: int, path: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during handshake")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(response.split(b"\r\n", 1)[0].decode())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Call:
    def __init__(self, sock: socket.socket, index: int, tracks: tuple[str, ...]) -> None:
        self.sock = sock
        self.sid = f"MZ{index:032x}"
        self.tracks = tracks
        self.chunk = 0
        self.sequence = 1

    def send_text(self, message: dict[str, object]) -> None:
        self.sock.sendall(frame(json.dumps(message, separators=(",", ":")).encode()))

    def start(self) -> None:
        self.send_text({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        self.send_text({"event": "start", "sequenceNumber": "1", "streamSid": self.sid,
                        "start": {"accountSid": "AC" + "0" * 32, "streamSid": self.sid,
                                  "callSid": "CA" + self.sid[2:], "tracks": list(self.tracks),
                                  "customParameters": {"bench": "1"},
                                  "mediaFormat": {"encoding": "audio/x-mulaw",
                                                  "sampleRate": 8000, "channels": 1}}})

    def media(self) -> None:
        self.chunk += 1
        timestamp = str(99 + (self.chunk - 1) * 20)
        payload = base64.b64encode(struct.pack("<q", time.monotonic_ns()) + bytes(152))
        out = []
        for track in self.tracks:
            self.sequence += 1
            out.append(frame(
                b'{"event":"media","sequenceNumber":"%d","media":{"track":"%s","chunk":"%d",'
                b'"timestamp":"%s","payload":"%s"},"streamSid":"%s"}' % (
                    self.sequence, track.encode(), self.chunk, timestamp.encode(), payload,
                    self.sid.encode())))
        self.sock.sendall(b"".join(out))

    def stop(self) -> None:
        self.sequence += 1
        self.send_text({"event": "stop", "sequenceNumber": str(self.sequence),
                        "streamSid": self.sid, "stop": {}})
        self.sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000
        self.sock.close()


def run(url: str, calls: int, seconds: float, tracks: tuple[str, ...], first: int,
        idle: bool = False) -> dict[str, object]:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    live: list[Call] = []
    failed = 0
    for i in range(calls):
        try:
            call = Call(connect(host, port, path), first + i, tracks)
            call.start()
            live.append(call)
        except OSError:
            failed += 1
    print(json.dumps({"connected": len(live)}), flush=True)
    slots = [live[i::SLOTS] for i in range(SLOTS)]
    sent, lateness = 0, []
    started = time.monotonic()
    if idle:  # calls that started but send no audio
        time.sleep(seconds)
        slots = []
    periods = round(seconds / FRAME_S)
    for period in range(periods):
        for slot, members in enumerate(slots):
            due = started + period * FRAME_S + slot * FRAME_S / SLOTS
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            lateness.append(max(0.0, time.monotonic() - due) * 1000)
            for call in list(members):
                try:
                    call.media()
                    sent += len(tracks)
                except OSError:
                    failed += 1
                    members.remove(call)
    for call in live:
        with contextlib.suppress(OSError):
            call.stop()
    lateness.sort()
    return {"calls": len(live), "failed": failed, "frames_sent": sent,
            "sender_lateness_ms": {
                "p50": round(statistics.median(lateness), 3) if lateness else 0,
                "p99": round(lateness[int(len(lateness) * 0.99)], 3) if lateness else 0}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--both-tracks", action="store_true")
    parser.add_argument("--first", type=int, default=0, help="index of the first call's id")
    parser.add_argument("--idle", action="store_true", help="start the calls, send no media")
    args = parser.parse_args()
    tracks = ("inbound", "outbound") if args.both_tracks else ("inbound",)
    print(json.dumps(run(args.url, args.calls, args.seconds, tracks, args.first, args.idle)))


if __name__ == "__main__":
    main()
