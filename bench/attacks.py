"""Hostile clients for ``python -m bench.soak --adversarial``: each coroutine attacks a
server on loopback once, bounded in bytes and time, and returns. The soak runs them in loops
beside honest real-time calls.

Every attack is one the service must survive without losing an honest call's frames,
growing without bound or stalling: ping floods that read no pong, oversized messages (one
frame, and fragments), thousands of track names with huge timestamp gaps, DTMF and mark
spam, binary messages at a text-only route, idle and half-open sockets, slow request heads,
and junk HTTP; JSON nested past any decoder's limit, starts at absurd sample rates, a second
stream with a live stream's ids, upgrades that never start, repeated headers and request
heads past the limits written in one piece.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import struct
from collections.abc import Awaitable, Callable

__all__ = ["ATTACKS"]

# Each attack gives up after this long, whatever the server does.
ATTACK_LIMIT_S = 10.0


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if size < 4096 else (
        (int.from_bytes(payload, "big") ^ int.from_bytes(
            (mask * (size // 4 + 1))[:size], "big")).to_bytes(size, "big"))
    return head + mask + masked


async def _open(port: int, path: str = "/stream") -> tuple[asyncio.StreamReader,
                                                           asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def _start(sid: str, tracks: list[str]) -> bytes:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
        "accountSid": "AC1", "streamSid": sid, "callSid": "CA" + sid[2:], "tracks": tracks,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {}}}).encode()


def _media(sid: str, track: str, timestamp: int) -> bytes:
    return json.dumps({"event": "media", "streamSid": sid, "media": {
        "track": track, "chunk": "1", "timestamp": str(timestamp),
        "payload": base64.b64encode(bytes(160)).decode()}}).encode()


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def ping_flood(port: int) -> None:
    _, writer = await _open(port)
    burst = ws_frame(0x9, b"p" * 125) * 200
    for _ in range(2000):  # 50 MB at most
        await _send(writer, burst)
    writer.close()


async def oversized(port: int) -> None:
    reader, writer = await _open(port)
    await _send(writer, ws_frame(0x1, b"x" * 4_000_000))
    await reader.read()
    writer.close()
    reader, writer = await _open(port)
    piece = b"y" * 60_000
    await _send(writer, ws_frame(0x1, piece, fin=False)
                + b"".join(ws_frame(0x0, piece, fin=False) for _ in range(60)))
    await reader.read()
    writer.close()


async def tracks_and_gaps(port: int) -> None:
    sid = "MZ" + os.urandom(16).hex()
    tracks = ["inbound", *(f"t{i}" for i in range(6000))]
    _, writer = await _open(port)
    await _send(writer, ws_frame(0x1, _start(sid, tracks)))
    for i, track in enumerate(tracks[:400]):
        for timestamp in (0, 1_000_000 + i):
            await _send(writer, ws_frame(0x1, _media(sid, track, timestamp)))
    writer.close()


async def dtmf_and_mark_spam(port: int) -> None:
    sid = "MZ" + os.urandom(16).hex()
    _, writer = await _open(port, "/connect")
    await _send(writer, ws_frame(0x1, _start(sid, ["inbound"])))
    digit = json.dumps({"event": "dtmf", "streamSid": sid,
                        "dtmf": {"track": "inbound_track", "digit": "7" * 60_000}}).encode()
    mark = json.dumps({"event": "mark", "streamSid": sid,
                       "mark": {"name": "m" * 60_000}}).encode()
    key = json.dumps({"event": "dtmf", "streamSid": sid,
                      "dtmf": {"track": "inbound_track", "digit": "5"}}).encode()
    for _ in range(500):
        await _send(writer, ws_frame(0x1, digit) + ws_frame(0x1, mark) + ws_frame(0x1, key))
    writer.close()


async def binary_frames(port: int) -> None:
    # Binary messages at a Twilio route: a media frame's JSON, random bytes, and the same
    # fragmented; each is a counted bad frame, the stream goes on.
    sid = "MZ" + os.urandom(16).hex()
    _, writer = await _open(port)
    await _send(writer, ws_frame(0x1, _start(sid, ["inbound"])))
    media = _media(sid, "inbound", 0)
    noise = os.urandom(640)
    burst = (ws_frame(0x2, media) + ws_frame(0x2, noise)
             + ws_frame(0x2, noise[:320], fin=False) + ws_frame(0x0, noise[320:]))
    for _ in range(2000):
        await _send(writer, burst)
    writer.close()


async def idle_sockets(port: int) -> None:
    writers = []
    for _ in range(200):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    for writer in writers[:100]:
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
    await asyncio.sleep(6)
    for writer in writers:
        writer.close()


async def junk_http(port: int) -> None:
    requests = [
        b"POST /twiml/nosuch HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nCallSid=CA1",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
        b"GET /twiml HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST /stream-status HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ]
    await _each_answered(port, requests * 20)


async def _each_answered(port: int, requests: list[bytes]) -> None:
    """Each request on a connection of its own, written in one piece, read to the end."""
    for request in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(OSError):
            await _send(writer, request)
            await reader.read()
        writer.close()


async def deep_json(port: int) -> None:
    # JSON nested far past any decoder's recursion limit (about 2 kB each), before and after
    # a start: each a counted bad frame.
    sid = "MZ" + os.urandom(16).hex()
    _, writer = await _open(port)
    deep = b"[" * 1000 + b"]" * 1000
    nested = b'{"event":"media","media":' + b'{"a":' * 1000 + b"1" + b"}" * 1001
    await _send(writer, ws_frame(0x1, deep))
    await _send(writer, ws_frame(0x1, _start(sid, ["inbound"])))
    for _ in range(200):
        await _send(writer, ws_frame(0x1, deep) + ws_frame(0x1, nested))
    writer.close()


async def rate_bomb(port: int) -> None:
    # Starts at rates no provider streams at (a recorder sized from them would take
    # gigabytes; zero would divide by zero): each refused as a bad start.
    for rate in (100_000_000, 0, -8000, 7):
        sid = "MZ" + os.urandom(16).hex()
        _, writer = await _open(port)
        start = json.loads(_start(sid, ["inbound"]))
        start["start"]["mediaFormat"]["sampleRate"] = rate
        await _send(writer, ws_frame(0x1, json.dumps(start).encode()))
        for timestamp in range(0, 2000, 20):
            await _send(writer, ws_frame(0x1, _media(sid, "inbound", timestamp)))
        writer.close()


async def duplicate_ids(port: int) -> None:
    # A second stream with a live stream's ids: refused (1008) before any handler sees it,
    # so no recording or capture is ever shared.
    sid = "MZ" + os.urandom(16).hex()
    _, first = await _open(port)
    await _send(first, ws_frame(0x1, _start(sid, ["inbound"])))
    for _ in range(5):
        reader, second = await _open(port)
        with contextlib.suppress(OSError):  # refused: the server closes it at once
            await _send(second, ws_frame(0x1, _start(sid, ["inbound"])))
            for timestamp in range(0, 400, 20):
                await _send(second, ws_frame(0x1, _media(sid, "inbound", timestamp)))
            await reader.read()
        second.close()
    for timestamp in range(0, 1000, 20):
        await _send(first, ws_frame(0x1, _media(sid, "inbound", timestamp)))
    first.close()


async def idle_upgrades(port: int) -> None:
    # Upgrades that never send a start, held: bounded apart from calls
    # (max_pending_starts), the oldest evicted for newer ones.
    writers = []
    for _ in range(300):
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            _, writer = await _open(port)
            writers.append(writer)
    await asyncio.sleep(4)
    for writer in writers:
        writer.close()


async def repeated_headers(port: int) -> None:
    # A header sent twice (a proxy's second X-Forwarded-For) and a credential twice.
    for extra in (b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n",
                  b"X-Twilio-Signature: a\r\nX-Twilio-Signature: b\r\n",
                  b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"):
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16))
            await _send(writer, b"GET /stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
                        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n")
            await reader.readuntil(b"\r\n\r\n")
            writer.close()


async def big_heads(port: int) -> None:
    # Heads past the limits written whole in one write: a 17 KB field, a 20 KB request
    # line, 500 fields.
    heads = [
        b"GET /stream HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 17_000 + b"\r\n\r\n",
        b"GET /stream?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % n for n in range(500)) + b"\r\n",
    ]
    await _each_answered(port, heads * 10)


async def _bounded(attack: Callable[[int], Awaitable[None]], port: int) -> None:
    with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
        async with asyncio.timeout(ATTACK_LIMIT_S):
            await attack(port)


_RAW_ATTACKS: dict[str, Callable[[int], Awaitable[None]]] = {
    "ping_flood": ping_flood,
    "oversized": oversized,
    "tracks_and_gaps": tracks_and_gaps,
    "dtmf_and_mark_spam": dtmf_and_mark_spam,
    "binary_frames": binary_frames,
    "idle_sockets": idle_sockets,
    "junk_http": junk_http,
    "deep_json": deep_json,
    "rate_bomb": rate_bomb,
    "duplicate_ids": duplicate_ids,
    "idle_upgrades": idle_upgrades,
    "repeated_headers": repeated_headers,
    "big_heads": big_heads,
}


def _limited(attack: Callable[[int], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
    return functools.partial(_bounded, attack)


ATTACKS: dict[str, Callable[[int], Awaitable[None]]] = {
    name: _limited(attack) for name, attack in _RAW_ATTACKS.items()}
