"""The built-in capture handler: a live call becomes a fixture that replays to the same
outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.replay import replay_session
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
COMPARED = ("call_sid", "stream_sid", "account_sid", "tracks", "custom_parameters", "frames",
            "missing_frames", "out_of_order_frames", "bad_frames", "ignored_events", "dtmf",
            "reason")


class Greeter(Handler):
    """Sends a mark when the call starts, so that the capture has a `sent` line."""

    def on_start(self, session: Session) -> None:
        session.send_mark("hello")


async def capture_run(tmp_path: Path, fixture_name: str, path: str = "/stream") -> Path:
    capture = resolve_handler("capture", {"dir": str(tmp_path), "flush_lines": 7}, key="t")
    routes = (Route("/stream", (capture,)),
              Route("/connect", (capture, HandlerSpec("greet", Greeter)), True))
    server = StreamServer(Settings(port=0, routes=routes))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / fixture_name)
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}{path}", speed=0)
        assert result.ok
    finally:
        await server.stop()
    expect = fixture.expect
    return tmp_path / expect["call_sid"] / f"{expect['stream_sid']}.jsonl"


@pytest.mark.parametrize("name", ["garbage_midcall.jsonl", "both_tracks.jsonl",
                                  "missing_reordered.jsonl"])
async def test_a_captured_call_carries_the_same_outcome(tmp_path: Path, name: str) -> None:
    captured = load_fixture(await capture_run(tmp_path, name))
    original = load_fixture(FIXTURES / name)
    assert {k: original.expect[k] for k in COMPARED} == {k: captured.expect[k] for k in COMPARED}
    assert [f.text for f in original.frames] == [f.text for f in captured.frames]
    assert [] == list(tmp_path.rglob("*.partial"))


async def test_a_capture_replays_to_the_outcome_it_recorded(
    tmp_path: Path, logs: LogEvents,
) -> None:
    captured = load_fixture(await capture_run(tmp_path, "garbage_midcall.jsonl"))
    server = StreamServer(Settings(port=0))
    await server.start()
    try:
        result = await replay_session(captured, f"ws://127.0.0.1:{server.port}/stream", speed=0)
        assert result.ok
        await until(lambda: len(events(logs, "stream.stopped")) == 2)
    finally:
        await server.stop()
    replayed = events(logs, "stream.stopped")[-1]
    for key in ("frames", "missing_frames", "bad_frames", "ignored_events", "reason"):
        assert captured.expect[key] == replayed[key], key


async def test_frames_the_server_sent_are_captured_as_sent_lines(tmp_path: Path) -> None:
    path = await capture_run(tmp_path, "bidirectional_dtmf_marks.jsonl", path="/connect")
    sent = [json.loads(line)["sent"] for line in path.read_text().splitlines()[1:]
            if "sent" in json.loads(line)]
    assert [{"event": "mark", "streamSid": "MZ00000000000000000000000000000103",
             "mark": {"name": "hello"}}] == [json.loads(s) for s in sent]


async def test_an_aborted_call_still_leaves_a_complete_capture(
    tmp_path: Path, logs: LogEvents,
) -> None:
    from websockets.asyncio.client import connect

    capture = resolve_handler("capture", {"dir": str(tmp_path)}, key="t")
    server = StreamServer(Settings(port=0, routes=(Route("/stream", (capture,)),)))
    await server.start()
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    try:
        ws = await connect(f"ws://127.0.0.1:{server.port}/stream")
        for frame in fixture.frames[:30]:
            await ws.send(frame.text)
        await until(lambda: server.streams)
        ws.transport.abort()
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()
    path = tmp_path / fixture.expect["call_sid"] / f"{fixture.expect['stream_sid']}.jsonl"
    captured = load_fixture(path)
    assert ({"inbound": 28}, "closed") == (captured.expect["frames"], captured.expect["reason"])
    assert 30 == len(captured.frames)


async def test_a_vonage_call_is_captured_with_its_binary_frames(tmp_path: Path) -> None:
    capture = resolve_handler("capture", {"dir": str(tmp_path)}, key="t")
    server = StreamServer(Settings(port=0, routes=(Route("/vonage", (capture,),
                                                         provider="vonage"),)))
    await server.start()
    fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
    try:
        result = await replay_session(fixture, f"ws://127.0.0.1:{server.port}/vonage",
                                      speed=0)
        assert result.ok
    finally:
        await server.stop()
    [path] = (tmp_path / fixture.expect["call_sid"]).glob("*.jsonl")
    captured = load_fixture(path)
    assert [(f.text, f.binary) for f in fixture.frames] == [
        (f.text, f.binary) for f in captured.frames]
    compared = [k for k in COMPARED if k != "stream_sid"]  # Vonage's is the service's own
    assert {k: fixture.expect[k] for k in compared} == {k: captured.expect[k] for k in compared}
