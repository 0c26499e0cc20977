"""examples/realtime_bridge.py end to end: a real server, the real replay client playing
Twilio's side, and a local stand-in of a realtime speech model's WebSocket API that answers
twice and is interrupted during its second answer."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from streamsvc.config import Route, Settings
from streamsvc.handlers import resolve_handler
from streamsvc.replay import replay
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
RATE = 24_000


def tone(seconds: float) -> bytes:
    count = int(RATE * seconds)
    return struct.pack(f"<{count}h", *(int(6000 * math.sin(2 * math.pi * 440 * i / RATE))
                                       for i in range(count)))


class Model:
    """A realtime speech model's API, as far as the bridge uses it: it answers after 0.4 s
    of the caller's audio (0.5 s of speech) and after 1.2 s (2 s of speech), and hears the
    caller talk over that second answer at 1.5 s."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[str] = []
        self.audio_bytes = 0

    async def handle(self, connection: ServerConnection) -> None:
        said: set[str] = set()
        with contextlib.suppress(Exception):
            async for message in connection:
                event = json.loads(message)
                self.received.append(event["type"])
                if event["type"] != "input_audio_buffer.append":
                    continue
                self.audio_bytes += len(base64.b64decode(event["audio"]))
                heard_s = self.audio_bytes / 2 / RATE
                if heard_s >= 0.4 and "first" not in said:
                    said.add("first")
                    await self.answer(connection, tone(0.5))
                elif heard_s >= 1.2 and "second" not in said:
                    said.add("second")
                    await self.answer(connection, tone(2.0))
                elif heard_s >= 1.5 and "interrupted" not in said:
                    said.add("interrupted")
                    await connection.send(json.dumps(
                        {"type": "input_audio_buffer.speech_started"}))

    async def answer(self, connection: ServerConnection, audio: bytes) -> None:
        step = RATE * 2 // 10  # 100 ms deltas
        for start in range(0, len(audio), step):
            await connection.send(json.dumps({
                "type": "response.output_audio.delta",
                "delta": base64.b64encode(audio[start:start + step]).decode()}))
        await connection.send(json.dumps({"type": "response.output_audio.done"}))


@pytest.fixture
async def model() -> AsyncIterator[Model]:
    stand_in = Model()
    async with serve(stand_in.handle, "127.0.0.1", 0) as listening:
        stand_in.port = listening.sockets[0].getsockname()[1]
        yield stand_in


async def test_the_bridge_talks_both_ways_barges_in_and_knows_what_was_heard(
        model: Model, logs: LogEvents) -> None:
    bridge = resolve_handler("examples.realtime_bridge:RealtimeBridge",
                             {"url": f"ws://127.0.0.1:{model.port}/v1/realtime"}, key="t")
    server = StreamServer(Settings(port=0, routes=(
        Route("/bridge", (bridge,), bidirectional=True),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/bridge", speed=1)
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    [session] = report.sessions
    assert session.ok, session.error
    [stopped] = events(logs, "stream.stopped")
    assert {"answers": 2, "answers_heard": 1, "answers_cut": 1, "barge_ins": 1} == (
        stopped["handlers"]["examples.realtime_bridge:RealtimeBridge"])
    assert (["answer-1"], ["answer-2"], 1) == (session.marks_played, session.marks_cleared,
                                               session.clears_received)
    assert ("session.update", 1) == (model.received[0],
                                     model.received.count("response.cancel"))
    # The caller's audio reached the model at 24 kHz: 4 s of it, less the resampler's
    # held-back tail.
    assert 0.95 < model.audio_bytes / (fixture.expect["frames"]["inbound"] * 0.02
                                       * RATE * 2) <= 1.0
    assert [("answer-1", "played"), ("answer-2", "cleared")] == [
        (line["name"], line["heard"]) for line in events(logs, "bridge.answer")]
