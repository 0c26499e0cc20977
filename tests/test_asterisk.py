"""Asterisk's chan_websocket through the provider seam: both control formats (plain text
and JSON) as the I/O-free codec reads them, every format's audio, audio before
MEDIA_START held, flow control holding what the service sends, marks and flush; and a real
server driven by a client that speaks Asterisk's side (the handshake Asterisk accepts,
Basic auth, talk-back acknowledged, hang-up)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamsvc import wire
from streamsvc.audio import alaw_to_pcm16, pcm16_to_alaw
from streamsvc.config import Route, Settings, load_settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers.asterisk import (
    MAX_EARLY_FRAMES,
    MAX_HELD_OUT_BYTES,
    AsteriskCodec,
    plain_fields,
)
from streamsvc.providers.auto import provider_from_message
from streamsvc.replay import Signing, replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import BadFrame, Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
CREDENTIAL = "asterisk:pbx-secret"
PLAIN_START = ("MEDIA_START connection_id:c-1 channel:WebSocket/conn-0001 "
               "channel_id:pbx1-1.1 format:{fmt} optimal_frame_size:{size} ptime:20")


def json_start(fmt: str = "ulaw", size: int = 160, **variables: str) -> str:
    return json.dumps({"event": "MEDIA_START", "connection_id": "c-1",
                       "channel": "WebSocket/conn-0001", "channel_id": "pbx1-1.1",
                       "format": fmt, "optimal_frame_size": size, "ptime": 20,
                       "channel_variables": variables})


def started(start: str, query: str = "") -> tuple[Session, wire.Start]:
    session = Session(codec=AsteriskCodec(query))
    session.bidirectional = True
    session.receive_message(start)
    [event] = [e for e in session.events_received() if isinstance(e, wire.Start)]
    return session, event


# -- the codec ------------------------------------------------------------------------------

def test_both_control_formats_start_the_same_stream() -> None:
    _, plain = started(PLAIN_START.format(fmt="ulaw", size=160))
    _, as_json = started(json_start())
    for start in (plain, as_json):
        assert ("pbx1-1.1", "c-1", None, ("inbound",), ("audio/x-mulaw", 8000)) == (
            start.call_sid, start.started_stream_sid, start.account_sid, start.tracks,
            (start.media_format.encoding, start.media_format.sample_rate))


def test_channel_variables_and_the_urls_parameters_are_the_context() -> None:
    _, start = started(json_start(CUSTOMER="cus_9", LANG="fr"), query="exten=100&LANG=en")
    assert {"exten": "100", "LANG": "fr", "CUSTOMER": "cus_9",
            "channel": "WebSocket/conn-0001"} == dict(start.custom_parameters)


@pytest.mark.parametrize(("fmt", "encoding", "rate"), [
    ("ulaw", "mulaw", 8000), ("alaw", "alaw", 8000), ("slin", "pcm16", 8000),
    ("slin16", "pcm16", 16000), ("slin48", "pcm16", 48000)])
def test_each_format_sets_the_streams_audio(fmt: str, encoding: str, rate: int) -> None:
    session, _ = started(json_start(fmt))
    assert (encoding, rate) == (session.codec.native_encoding, session.sample_rate)


def test_a_law_reaches_handlers_as_pcm16_and_goes_back_as_a_law() -> None:
    session, _ = started(json_start("alaw"))
    tone = b"".join(int(8000 * ((i % 16) - 8) / 8).to_bytes(2, "little", signed=True)
                    for i in range(160))
    session.receive_message(pcm16_to_alaw(tone), binary=True)
    [media] = [e for e in session.events_received() if isinstance(e, wire.Media)]
    assert alaw_to_pcm16(pcm16_to_alaw(tone)) == session.pcm16(media)
    assert 160 == len(media.payload)


def test_audio_before_media_start_is_held_then_counted_in_order() -> None:
    session = Session(codec=AsteriskCodec())
    for byte in (1, 2):
        session.receive_message(bytes([byte]) * 160, binary=True)
    session.receive_message(json_start())
    events = session.events_received()
    assert [wire.Start, wire.Media, wire.Media] == [type(e) for e in events
                                                   if not isinstance(e, wire.Noted)]
    media = [e for e in events if isinstance(e, wire.Media)]
    assert ([b"\x01" * 160, b"\x02" * 160], [0, 20]) == (
        [m.payload for m in media], [m.timestamp_ms for m in media])
    assert {"inbound": 2} == dict(session.close("stop").frames)


def test_what_waits_before_media_start_is_bounded_and_the_rest_counted() -> None:
    codec = AsteriskCodec()
    session = Session(codec=codec)
    for _ in range(MAX_EARLY_FRAMES + 7):
        session.receive_message(b"\xff" * 160, binary=True)
    session.receive_message(json_start())
    summary = session.close("stop")
    assert ({"inbound": MAX_EARLY_FRAMES}, 7) == (
        dict(summary.frames), (summary.protocol or {})["early_frames_dropped"])


def test_dtmf_marks_errors_and_status_in_either_format() -> None:
    session, _ = started(PLAIN_START.format(fmt="ulaw", size=160))
    session.send_mark("greeting")
    [mark_command] = session.data_to_send()
    correlation = mark_command.decode().split()[1]
    for message in ("DTMF_END digit:7", f"MEDIA_MARK_PROCESSED correlation_id:{correlation}",
                    "ERROR error_text:something", "STATUS queue_length:3 xon_level:800",
                    "QUEUE_DRAINED", "SOMETHING_NEW x:1"):
        session.receive_message(message)
    events = session.events_received()
    assert (["7"], ["greeting"]) == ([e.digit for e in events if isinstance(e, wire.Dtmf)],
                                     [e.name for e in events if isinstance(e, wire.Mark)])
    assert ["error", "status", "queue_drained"] == [
        e.name for e in events if isinstance(e, wire.Noted)]
    summary = session.close("stop")
    assert (1, 1, "3") == (summary.ignored_events, (summary.protocol or {})["errors"],
                           (summary.protocol or {})["last_status"]["queue_length"])


def test_commands_go_out_in_the_format_media_start_came_in() -> None:
    plain, _ = started(PLAIN_START.format(fmt="slin16", size=640))
    as_json, _ = started(json_start("slin16", 640))
    for session in (plain, as_json):
        session.send_media(b"\x00" * 640)
        session.send_mark("m")
        session.send_clear()
        assert session.send_end("completed")
    media, mark, flush, hangup = plain.data_to_send()
    assert (wire.BinaryFrame, b"MARK_MEDIA mark-1", b"FLUSH_MEDIA", b"HANGUP") == (
        type(media), mark, flush, hangup)
    assert ["MARK_MEDIA", "FLUSH_MEDIA", "HANGUP"] == [
        json.loads(f)["command"] for f in as_json.data_to_send()[1:]]


def test_media_xoff_holds_what_is_sent_until_media_xon_and_bounds_it() -> None:
    session, _ = started(json_start())
    session.receive_message('{"event":"MEDIA_XOFF"}')
    session.send_media(b"\x01" * 160)
    session.send_mark("after")
    assert [] == session.data_to_send()
    session.receive_message('{"event":"MEDIA_XON"}')
    released = session.data_to_send()
    assert [b"\x01" * 160, "MARK_MEDIA"] == [released[0], json.loads(released[1])["command"]]
    session.receive_message('{"event":"MEDIA_XOFF"}')
    for _ in range(MAX_HELD_OUT_BYTES // 16_000 + 3):
        session.send_media(b"\x02" * 16_000)
    session.send_clear()  # a flush drops what waits and goes at once
    assert [b'{"command":"FLUSH_MEDIA"}'] == session.data_to_send()
    protocol = session.close("stop").protocol or {}
    assert (2, 3) == (protocol["xoffs"], protocol["held_out_dropped"])


def test_a_message_over_asterisks_limit_is_never_sent() -> None:
    session, _ = started(json_start("slin48", 1920))
    with pytest.raises(ValueError, match="65500"):
        session.send_media(b"\x00" * 65_502)


def test_bad_input_is_a_bad_frame_and_the_call_goes_on() -> None:
    session, _ = started(json_start("slin16", 640))
    session.receive_message(b"\x00" * 641, binary=True)  # half a sample
    session.receive_message('{"event": 5}')
    session.receive_message("not asterisk at all")
    session.receive_message(b"\x00" * 640, binary=True)
    assert (3, {"inbound": 1}) == (session.bad_frames, dict(session.close("stop").frames))


@given(st.text(max_size=200))
def test_any_plain_text_is_an_event_or_a_bad_frame(text: str) -> None:
    session, _ = started(json_start())
    session.receive_message(text)
    assert all(isinstance(e, BadFrame | wire.Noted | wire.UnknownEvent | wire.Dtmf
                          | wire.Mark | wire.Start) for e in session.events_received())


def test_plain_fields_are_read_as_asterisk_writes_them() -> None:
    assert ("STATUS", {"queue_length": "43", "bulk_media": "true"}, "") == plain_fields(
        "STATUS queue_length:43 bulk_media:true")
    assert ("MEDIA_BUFFERING_COMPLETED", {}, "id-1") == plain_fields(
        "MEDIA_BUFFERING_COMPLETED id-1")


def test_an_auto_route_tells_asterisk_by_media_start() -> None:
    assert ["asterisk", "asterisk"] == [provider_from_message(m) for m in (
        PLAIN_START.format(fmt="ulaw", size=160), json_start())]


# -- a real server, Asterisk's side ---------------------------------------------------------

class Prompt(Handler):
    """Plays a prompt with a mark, then hangs up once it has played."""

    def __init__(self) -> None:
        self.results: list[str] = []

    def on_start(self, session: LiveSession) -> None:
        session.send_audio(b"\x7f" * 480)
        asyncio.get_running_loop().create_task(self._then(session))

    async def _then(self, session: LiveSession) -> None:
        self.results.append(await session.mark("prompt-end"))
        session.hang_up()


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    prompt = Prompt()
    running = StreamServer(Settings(port=0, transport=transport, routes=(
        Route("/asterisk", (resolve_handler("log", {}, key="handlers"),), provider="asterisk"),
        Route("/asterisk-bot", (HandlerSpec("prompt", lambda: prompt),), bidirectional=True,
              provider="asterisk")), asterisk_basic_auth=CREDENTIAL))
    running.prompt = prompt  # type: ignore[attr-defined]
    await running.start()
    yield running
    await running.stop()


async def asterisk_client(port: int, path: str, credential: str = CREDENTIAL,
                          subprotocols: list[str] | None = None) -> ClientConnection:
    token = base64.b64encode(credential.encode()).decode()
    return await connect(f"ws://127.0.0.1:{port}{path}",
                         additional_headers={"Authorization": f"Basic {token}"},
                         subprotocols=subprotocols,  # type: ignore[arg-type]
                         compression="deflate")  # offered: the answer must take none


async def test_the_handshake_answer_takes_no_extension_and_echoes_an_offered_protocol(
        server: StreamServer) -> None:
    for offered in (None, ["media"]):
        connection = await asterisk_client(server.port, "/asterisk", subprotocols=offered)
        assert (None, offered[0] if offered else None) == (
            connection.response.headers.get("Sec-WebSocket-Extensions"),
            connection.subprotocol)
        await connection.close()
    with pytest.raises(InvalidStatus) as refused:
        await asterisk_client(server.port, "/asterisk", credential="asterisk:wrong")
    assert 403 == refused.value.response.status_code


async def test_a_bot_on_asterisk_plays_marks_and_hangs_up(server: StreamServer,
                                                          logs: LogEvents) -> None:
    connection = await asterisk_client(server.port, "/asterisk-bot")
    await connection.send(b"\xff" * 160)  # before MEDIA_START, as under load
    await connection.send(PLAIN_START.format(fmt="ulaw", size=160))
    received: list[Any] = []
    while not received or received[-1] != "HANGUP":
        await connection.send(b"\xff" * 160)
        try:
            message = await asyncio.wait_for(connection.recv(), 0.02)
        except TimeoutError:
            continue
        received.append(message)
        if isinstance(message, str) and message.startswith("MARK_MEDIA"):
            await connection.send(f"MEDIA_MARK_PROCESSED correlation_id:{message.split()[1]}")
    await connection.close()
    audio = b"".join(m for m in received if isinstance(m, bytes))
    assert (b"\x7f" * 480, ["MARK_MEDIA mark-1", "HANGUP"]) == (
        audio, [m for m in received if isinstance(m, str)])
    assert all(len(m) == 160 for m in received if isinstance(m, bytes))
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert ("stop", 1, 0) == (stopped["reason"], stopped["marks_received"],
                              stopped["missing_frames"]["inbound"])
    assert ["played"] == server.prompt.results  # type: ignore[attr-defined]


async def test_the_bundled_sessions_replay_to_their_expected_outcome(
        server: StreamServer, logs: LogEvents) -> None:
    fixtures = [load_fixture(FIXTURES / name) for name in ("asterisk_json.jsonl",
                                                           "asterisk_plain_slin16.jsonl")]
    report = await replay(fixtures, f"ws://127.0.0.1:{server.port}/asterisk", speed=0,
                          signing=Signing(asterisk_basic_auth=CREDENTIAL))
    assert [None, None] == [session.error for session in report.sessions]
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for fixture, session in zip(fixtures, report.sessions, strict=True):
        assert [] == differences(fixture.expect, outcome_of(logs, session.stream_sid))


async def test_a_peer_that_closes_mid_call_loses_nothing_it_sent(server: StreamServer,
                                                                  logs: LogEvents) -> None:
    connection = await asterisk_client(server.port, "/asterisk")
    await connection.send(json_start(CALLER="+15550100"))
    for _ in range(10):
        await connection.send(b"\xff" * 160)
    await connection.close()
    with pytest.raises(ConnectionClosed):
        await connection.recv()
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert ({"inbound": 10}, {"inbound": 1600}, "stop") == (
        stopped["frames"], stopped["bytes"], stopped["reason"])


def test_the_docs_routes_load(tmp_path: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "providers" / "asterisk.md").read_text(
        encoding="utf-8")
    [toml] = [block.split("```", 1)[0] for block in page.split("```toml\n")[1:]]
    (tmp_path / "asterisk.toml").write_text(toml, encoding="utf-8")
    settings = load_settings(config_path=str(tmp_path / "asterisk.toml"), env={})
    assert [("/asterisk", "asterisk", True)] == [
        (route.path, route.provider, route.bidirectional) for route in settings.routes]


def test_a_text_frame_that_is_not_utf8_is_a_bad_frame() -> None:
    session, _ = started(json_start())
    session.receive_message(b"MEDIA_XOFF \xff\xfe")
    assert [BadFrame] == [type(e) for e in session.events_received()]
