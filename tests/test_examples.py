"""The examples, end to end: a real server, the real replay client, and a local WebSocket
server playing the speech-to-text service's role. Also the built-in ``forward`` handler's
reconnects and drops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest
import structlog
from structlog.testing import capture_logs
from websockets.asyncio.server import Server, ServerConnection, serve

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.context.handoff import HandOffMapping
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.replay import replay_session
from streamsvc.replay.call import replay_call
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
PCM16_BYTES_PER_SECOND = 8000 * 2


@dataclass
class FakeStt:
    """A speech-to-text service: takes the start message and PCM16 audio, answers a final
    transcript per second of audio heard. ``drop_first`` closes the first connection after
    half a second of its audio (a service that restarts)."""

    drop_first: bool = False
    starts: list[dict[str, object]] = field(default_factory=list)
    audio_bytes: int = 0
    sizes: list[int] = field(default_factory=list)  # of each binary message
    stops: list[dict[str, object]] = field(default_factory=list)

    async def handle(self, connection: ServerConnection) -> None:
        start = json.loads(await connection.recv())
        self.starts.append(start)
        seconds, heard_here = 0, 0
        async for message in connection:
            if isinstance(message, bytes):
                self.sizes.append(len(message))
                self.audio_bytes += len(message)
                heard_here += len(message)
                if self.drop_first and len(self.starts) == 1 and heard_here >= 8000:
                    await connection.close()
                    return
                while self.audio_bytes >= (seconds + 1) * PCM16_BYTES_PER_SECOND:
                    seconds += 1
                    await connection.send(json.dumps(
                        {"type": "transcript", "text": f"second {seconds}", "is_final": True}))
            elif json.loads(message)["event"] == "stop":
                self.stops.append(json.loads(message))
                return  # as a real service does: it closes when the audio ends


@pytest.fixture
async def stt() -> AsyncIterator[tuple[FakeStt, Server]]:
    fake = FakeStt()
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        yield fake, server


@pytest.fixture(params=["picows", "websockets"])
def client(request: pytest.FixtureRequest) -> str:
    """Each WebSocket client ``forward`` can send with."""
    return str(request.param)


async def run_call(handlers: tuple[HandlerSpec, ...], fixture_name: str, *,
                   bidirectional: bool = False, transport: str = "websockets",
                   speed: float = 0) -> object:
    route = Route("/call", handlers, bidirectional=bidirectional)
    server = StreamServer(Settings(port=0, routes=(route,), transport=transport))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / fixture_name)
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/call",
                                      speed=speed)
        await until(lambda: server.active_calls == 0)
    finally:
        await server.stop()
    return result


async def test_the_stt_example_forwards_every_frame_and_logs_each_transcript(
        stt: tuple[FakeStt, Server], transport: str) -> None:
    fake, stt_server = stt
    url = f"ws://127.0.0.1:{stt_server.sockets[0].getsockname()[1]}/listen"
    handler = resolve_handler("examples.stt_forward:TranscriptLogger", {"url": url}, key="t")
    # With the call's ids bound into each line, as the service's own pipeline does.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await run_call((handler,), "inbound_params.jsonl", transport=transport)
    (start,) = fake.starts
    assert ("CA00000000000000000000000000000101", {"customerId": "cus_8812",
            "displayName": "Jane Doe", "intent": "order-status"}) == (
        start["call_sid"], start["custom_parameters"])
    assert 204 * 160 * 2 == fake.audio_bytes  # every frame, as PCM16
    assert [{"event": "stop", "reason": "stop"}] == fake.stops
    transcripts = events(logs, "stt.transcript")
    assert ["second 1", "second 2", "second 3", "second 4"] == [t["text"] for t in transcripts]
    assert {"CA00000000000000000000000000000101"} == {t["call_sid"] for t in transcripts}
    (stopped,) = events(logs, "stream.stopped")
    report = stopped["handlers"]["examples.stt_forward:TranscriptLogger"]
    assert (204, 0, 4) == (report["frames_sent"], report["dropped_frames"],
                           report["transcripts"])


async def test_forward_reconnects_and_sends_start_again(stt: tuple[FakeStt, Server],
                                                        logs: LogEvents, client: str) -> None:
    fake, stt_server = stt
    fake.drop_first = True
    url = f"ws://127.0.0.1:{stt_server.sockets[0].getsockname()[1]}/listen"
    forward = resolve_handler("forward", {"url": url, "client": client}, key="t")
    await run_call((forward,), "inbound_params.jsonl", speed=1)  # a 4 s call
    (stopped,) = events(logs, "stream.stopped")
    report = stopped["handlers"]["forward"]
    assert 2 == len(fake.starts)
    assert 1 == report["reconnects"]
    assert 204 == report["frames_sent"] + report["dropped_frames"]  # every frame accounted
    # What reached the service: all but what was in flight when it dropped the first.
    assert 150 * 320 < fake.audio_bytes <= report["frames_sent"] * 320
    assert [{"event": "stop", "reason": "stop"}] == fake.stops
    assert [] == events(logs, "handler.failed")


async def test_forward_to_a_service_that_is_down_drops_and_counts_and_the_call_goes_on(
        logs: LogEvents, client: str) -> None:
    forward = resolve_handler("forward", {"url": "ws://127.0.0.1:9/nothing",
                                          "client": client}, key="t")
    result = await run_call((forward, HandlerSpec("log", LogHandler)), "inbound_params.jsonl")
    assert result.ok
    (stopped,) = events(logs, "stream.stopped")
    assert ("stop", {}) == (stopped["reason"], stopped["handler_errors"])
    report = stopped["handlers"]["forward"]
    assert (0, 204) == (report["frames_sent"], report["dropped_frames"])
    assert 1 == len(events(logs, "forward.disconnected"))  # once, not per frame
    assert client == report["client"]


@pytest.mark.parametrize("batch_ms", [20, 100, 60])
async def test_forward_gathers_batch_ms_of_audio_per_message(
        stt: tuple[FakeStt, Server], logs: LogEvents, client: str, batch_ms: int) -> None:
    """Each binary message carries ``batch_ms`` of the track (the last one what was left
    when the call ended); every frame is counted once, in order."""
    fake, stt_server = stt
    url = f"ws://127.0.0.1:{stt_server.sockets[0].getsockname()[1]}/listen"
    forward = resolve_handler("forward", {"url": url, "client": client,
                                          "batch_ms": batch_ms}, key="t")
    await run_call((forward,), "inbound_params.jsonl")
    (stopped,) = events(logs, "stream.stopped")
    report = stopped["handlers"]["forward"]
    per_message = batch_ms // 20
    whole, left = divmod(204, per_message)
    assert [per_message * 320] * whole + [left * 320] * bool(left) == fake.sizes
    assert (204, 0, len(fake.sizes) + 2) == (  # and the start and stop messages
        report["frames_sent"], report["dropped_frames"], report["messages_sent"])
    assert [{"event": "stop", "reason": "stop"}] == fake.stops


async def test_the_dtmf_bot_answers_key_presses_and_barges_in(logs: LogEvents,
                                                              transport: str) -> None:
    bot = resolve_handler("examples.dtmf_bot:DtmfBot", {}, key="t")
    result = await run_call((bot, HandlerSpec("log", LogHandler)),
                            "bidirectional_dtmf_marks.jsonl", bidirectional=True,
                            transport=transport)
    assert result.ok
    assert 3 == result.clears_received  # one barge-in per key press
    assert result.audio_bytes_received > 8000  # the greeting and the beeps
    (stopped,) = events(logs, "stream.stopped")
    report = stopped["handlers"]["examples.dtmf_bot:DtmfBot"]
    assert "42#" == report["digits"]
    assert 4 == report["marks_played"] + report["marks_cleared"]  # greeting + 3 digits
    greeting = [m for m in events(logs, "bot.mark") if m["name"] == "greeting"]
    assert [("greeting", "cleared")] == [(m["name"], m["result"]) for m in greeting]
    await asyncio.sleep(0)


async def test_the_handoff_bot_hands_the_caller_to_support_with_what_it_learned(
        logs: LogEvents, transport: str) -> None:
    bot = resolve_handler("examples.handoff_bot:HandOffBot", {}, key="t")
    server = StreamServer(Settings(
        port=0, transport=transport, auth_token="token", public_url="https://voice.example.com",
        routes=(Route("/connect", (bot,), bidirectional=True,
                      handoff=HandOffMapping(priority=("intent", "account"))),)))
    await server.start()
    try:
        [leg] = await replay_call(
            load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl"),  # keys 4, 2, #
            f"http://127.0.0.1:{server.port}/twiml/connect?customerID=cus_8812", speed=0,
            auth_token="token", public_url="https://voice.example.com",
            stream_url=f"ws://127.0.0.1:{server.port}/connect")
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    assert leg.hand_off is not None
    root = ElementTree.fromstring(leg.hand_off)
    assert "support" == root.findtext("./Dial/Client/Identity")
    parameters = [(p.attrib["name"], p.attrib["value"]) for p in root.iter("Parameter")]
    assert [("streamsvc_call", leg.result.call_sid), ("intent", "other"),
            ("account", "2")] == parameters[:3]
    assert ("customerID", "cus_8812") in parameters
    [handed] = events(logs, "bot.handed_off")
    assert handed["ok"] is True
    [stopped] = events(logs, "stream.stopped")
    assert "handed_off" == stopped["reason"]
