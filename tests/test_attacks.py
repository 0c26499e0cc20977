"""Hostile peers beside honest calls, on both transports: each attack is bounded in time and
memory, loopback only, and the honest call beside it ends with all its frames."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.attacks import ws_frame as frame
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.replay import SessionResult, replay_session
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    routes = (Route("/stream", (HandlerSpec("log", LogHandler),)),
              Route("/connect", (resolve_handler("echo", {}, key="t"),), bidirectional=True))
    server = StreamServer(Settings(port=0, routes=routes, transport=transport,
                                   max_unread_bytes=65536))
    await server.start()
    yield server
    await server.stop()


async def raw_stream(port: int, path: str = "/stream") -> tuple[asyncio.StreamReader,
                                                                  asyncio.StreamWriter]:
    """A connection past the WebSocket handshake; it reads nothing more unless asked (its
    reader buffers 64 KiB, then the kernel's small window fills)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return reader, writer


async def honest_call(server: StreamServer) -> SessionResult:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    return await replay_session(fixture, f"ws://127.0.0.1:{server.port}/stream", speed=4)


async def flood_pings(port: int) -> int:
    """Send pings and read no pong until the server drops us (or 50 MB went out, or 20 s
    passed); return how many were sent."""
    _, writer = await raw_stream(port)
    burst = frame(0x9, b"p" * 125) * 100
    sent = 0
    try:
        async with asyncio.timeout(20):
            while sent < 400_000:
                writer.write(burst)
                await writer.drain()
                sent += 100
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return sent


async def test_a_ping_flood_is_cut_off_and_honest_calls_go_on(server: StreamServer,
                                                             logs: LogEvents) -> None:
    honest = asyncio.create_task(honest_call(server))
    sent = await flood_pings(server.port)
    result = await honest
    assert (True, None) == (result.ok, result.error)
    assert sent < 400_000  # the server dropped the flooding peer
    assert 1 == server.metrics.unread_closes
    assert 1 == len(events(logs, "connection.unread"))


async def send_then_close(port: int, data: bytes) -> bytes:
    """Send ``data`` after the handshake; return what the server answered before closing."""
    reader, writer = await raw_stream(port)
    try:
        writer.write(data)
        async with asyncio.timeout(20):
            await writer.drain()
            return await reader.read()
    except OSError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize("shape", ["one-frame", "fragments", "ping"])
async def test_a_message_over_the_limit_is_never_handled(server: StreamServer, logs: LogEvents,
                                                         shape: str) -> None:
    body = b'{"event": not JSON, a bad frame if it were ever handled ' + b"x" * 4_000_000
    if shape == "one-frame":
        data = frame(0x1, body)
    elif shape == "fragments":
        pieces = [body[i:i + 60_000] for i in range(0, len(body), 60_000)]
        data = frame(0x1, pieces[0], fin=False) + b"".join(
            frame(0x0, piece, fin=i == len(pieces) - 2) for i, piece in enumerate(pieces[1:]))
    else:
        data = frame(0x9, body[:200_000])
    answer = await send_then_close(server.port, data)
    await until(lambda: server.active_calls == 0)
    # A close frame (1009 too big; 1002 a control frame over 125 bytes), unless the server's
    # close came while megabytes were still arriving and the kernel reset the connection.
    if answer:
        assert answer.startswith(b"\x88")
        assert struct.unpack(">H", answer[2:4])[0] in (1002, 1009)
    assert [] == events(logs, "stream.bad_frame")  # nothing of it reached the session
    (closed,) = events(logs, "stream.closed_before_start")
    assert closed["reason"] in ("error", "aborted")


async def test_on_the_echo_route_a_peer_that_stops_reading_costs_only_its_frames(
        server: StreamServer, logs: LogEvents) -> None:
    """The echo handler plays back everything; this peer reads nothing. Its call goes on,
    and what could not be sent is dropped and counted."""
    fixture = load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl")
    frames = [frame(0x1, entry.text.encode()) for entry in fixture.frames[1:-1]]
    _, writer = await raw_stream(server.port, "/connect")
    try:
        for _ in range(60):  # 60 x 204 frames: far more audio than the peer will read
            writer.write(b"".join(frames))
            await writer.drain()
            if events(logs, "stream.peer_not_reading") or server.metrics.unread_closes:
                break
        assert server.streams  # the call is still up
    finally:
        writer.close()
    await until(lambda: events(logs, "stream.stopped"))
    (stopped,) = events(logs, "stream.stopped")
    # echo counts what the peer would not take and rides it out: never a handler failure.
    assert {} == stopped["handler_errors"]
    assert "error" != stopped["reason"]
