"""jambonz's ``listen`` verb through the provider seam: the first message's attributes as
the call's context, mono and stereo audio, DTMF, ``playAudio`` answered ``playDone`` (the
marks), streamed audio back, ``killAudio`` and ``disconnect``, as the I/O-free codec does
them; and a real server reached with the ``audio.jambonz.org`` subprotocol and Basic auth."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from streamsvc import wire
from streamsvc.config import Route, Settings, load_settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers.auto import provider_from_headers, provider_from_message
from streamsvc.providers.jambonz import SUBPROTOCOL, JambonzCodec
from streamsvc.replay import Signing, replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import Session

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
CREDENTIAL = "jambonz:secret"


def first(**changes: Any) -> str:
    message = {"callSid": "call-1", "direction": "inbound", "from": "+15550100",
               "to": "+15550199", "callerName": "Pat", "accountSid": "acct-1",
               "sampleRate": 16000, "mixType": "mono", "customerData": {"orderId": "o-1"},
               "metadata": {"bot": "parcel", "priority": 2}}
    return json.dumps({**message, **changes})


def started(streaming: bool = False, **changes: Any) -> tuple[Session, wire.Start]:
    session = Session(codec=JambonzCodec(streaming=streaming))
    session.bidirectional = True
    session.receive_message(first(**changes))
    [start] = session.events_received()
    assert isinstance(start, wire.Start)
    return session, start


# -- the codec ------------------------------------------------------------------------------

def test_the_first_message_starts_the_call_with_its_attributes_as_the_context() -> None:
    _, start = started()
    assert ("call-1", "acct-1", ("inbound",), ("audio/l16", 16000)) == (
        start.call_sid, start.account_sid, start.tracks,
        (start.media_format.encoding, start.media_format.sample_rate))
    assert {"callSid": "call-1", "direction": "inbound", "from": "+15550100",
            "to": "+15550199", "callerName": "Pat", "accountSid": "acct-1",
            "orderId": "o-1", "bot": "parcel", "priority": "2"} == dict(
        start.custom_parameters)


def test_stereo_is_split_into_the_two_legs_and_mixed_is_one_track() -> None:
    session, start = started(mixType="stereo")
    left = bytes(range(0, 200, 2)) * 2
    right = bytes(range(1, 201, 2)) * 2
    interleaved = b"".join(left[i:i + 2] + right[i:i + 2] for i in range(0, len(left), 2))
    session.receive_message(interleaved, binary=True)
    media = [e for e in session.events_received() if isinstance(e, wire.Media)]
    assert (("inbound", "outbound"), [left, right]) == (start.tracks,
                                                        [m.payload for m in media])
    assert ("inbound",) == started(mixType="mixed")[1].tracks


def test_a_rate_jambonz_does_not_stream_or_a_first_message_without_call_is_refused() -> None:
    for changes in ({"sampleRate": 44100}, {"callSid": None}):
        session = Session(codec=JambonzCodec())
        session.receive_message(first(**changes))
        assert (1, None) == (session.bad_frames, session.stream_sid)


def test_dtmf_and_unknown_messages() -> None:
    session, _ = started()
    session.receive_message('{"event":"dtmf","dtmf":"5","duration":250}')
    session.receive_message('{"type":"somethingNew"}')
    assert ["5"] == [e.digit for e in session.events_received() if isinstance(e, wire.Dtmf)]
    assert 1 == session.close("stop").ignored_events


def test_audio_back_is_play_audio_and_marks_resolve_on_its_play_done() -> None:
    session, _ = started()
    session.send_media(b"\x01\x00" * 8000)  # 0.5 s at 16 kHz
    session.send_mark("first")
    session.send_media(b"\x02\x00" * 100)
    session.send_mark("second")
    play_one, play_two = (json.loads(frame) for frame in session.data_to_send())
    assert ("playAudio", "raw", 16000, True, b"\x01\x00" * 8000) == (
        play_one["type"], play_one["data"]["audioContentType"],
        play_one["data"]["sampleRate"], play_one["data"]["queuePlay"],
        base64.b64decode(play_one["data"]["audioContent"]))
    assert 200 == len(base64.b64decode(play_two["data"]["audioContent"]))
    session.receive_message('{"type":"playDone"}')
    assert ["first"] == [e.name for e in session.events_received() if isinstance(e, wire.Mark)]
    session.receive_message('{"type":"playDone"}')
    assert ["second"] == [e.name for e in session.events_received()
                          if isinstance(e, wire.Mark)]


def test_streaming_routes_send_binary_audio_and_clear_and_end_are_jambonz_messages() -> None:
    session, _ = started(streaming=True)
    session.send_media(b"\x00" * 640)
    session.send_clear()
    assert session.send_end("completed")
    audio, kill, disconnect = session.data_to_send()
    assert (wire.BinaryFrame, {"type": "killAudio"}, {"type": "disconnect"}) == (
        type(audio), json.loads(kill), json.loads(disconnect))
    assert not session.codec.has_marks  # streamed audio: marks by the playback clock


def test_an_auto_route_tells_jambonz_by_its_subprotocol_or_first_message() -> None:
    assert "jambonz" == provider_from_headers({"sec-websocket-protocol": SUBPROTOCOL})
    assert "jambonz" == provider_from_message(first())


# -- a real server, jambonz's side ----------------------------------------------------------

class Speaker(Handler):
    """Says something with a mark, then disconnects once it has played."""

    def __init__(self) -> None:
        self.results: list[str] = []

    def on_start(self, session: LiveSession) -> None:
        session.send_audio(b"\x10\x00" * 3200)
        asyncio.get_running_loop().create_task(self._then(session))

    async def _then(self, session: LiveSession) -> None:
        self.results.append(await session.mark("said"))
        session.hang_up()


@pytest.fixture
async def server(transport: str) -> AsyncIterator[StreamServer]:
    speaker = Speaker()
    running = StreamServer(Settings(port=0, transport=transport, routes=(
        Route("/jambonz", (resolve_handler("log", {}, key="handlers"),), provider="jambonz"),
        Route("/jambonz-bot", (HandlerSpec("speaker", lambda: speaker),), bidirectional=True,
              provider="jambonz")), jambonz_basic_auth=CREDENTIAL))
    running.speaker = speaker  # type: ignore[attr-defined]
    await running.start()
    yield running
    await running.stop()


async def jambonz_client(port: int, path: str,
                         credential: str = CREDENTIAL) -> ClientConnection:
    token = base64.b64encode(credential.encode()).decode()
    return await connect(f"ws://127.0.0.1:{port}{path}",
                         additional_headers={"Authorization": f"Basic {token}"},
                         subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]


async def test_the_subprotocol_is_accepted_and_a_wrong_credential_refused(
        server: StreamServer) -> None:
    connection = await jambonz_client(server.port, "/jambonz")
    assert SUBPROTOCOL == connection.subprotocol
    await connection.close()
    with pytest.raises(InvalidStatus) as refused:
        await jambonz_client(server.port, "/jambonz", credential="jambonz:wrong")
    assert 403 == refused.value.response.status_code


async def test_a_bot_on_jambonz_plays_is_acknowledged_and_disconnects(
        server: StreamServer, logs: LogEvents) -> None:
    connection = await jambonz_client(server.port, "/jambonz-bot")
    await connection.send(first(sampleRate=8000))
    received: list[Any] = []
    while not received or received[-1].get("type") != "disconnect":
        await connection.send(b"\x00" * 320)
        try:
            message = await asyncio.wait_for(connection.recv(), 0.02)
        except TimeoutError:
            continue
        received.append(json.loads(message))
        if received[-1]["type"] == "playAudio":
            await connection.send('{"type":"playDone"}')
    await connection.close()
    played = b"".join(base64.b64decode(m["data"]["audioContent"]) for m in received
                      if m["type"] == "playAudio")
    assert (b"\x10\x00" * 3200, "disconnect") == (played, received[-1]["type"])
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert ("stop", 1) == (stopped["reason"], stopped["marks_received"])
    assert ["played"] == server.speaker.results  # type: ignore[attr-defined]


async def test_the_bundled_sessions_replay_to_their_expected_outcome(
        server: StreamServer, logs: LogEvents) -> None:
    fixtures = [load_fixture(FIXTURES / name) for name in ("jambonz_listen.jsonl",
                                                           "jambonz_stereo.jsonl")]
    report = await replay(fixtures, f"ws://127.0.0.1:{server.port}/jambonz", speed=0,
                          signing=Signing(jambonz_basic_auth=CREDENTIAL))
    assert [None, None] == [session.error for session in report.sessions]
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for fixture, session in zip(fixtures, report.sessions, strict=True):
        outcome = {event: line for event in ("stream.started", "stream.stopped")
                   for line in events(logs, event) if line["call_sid"] == session.call_sid}
        assert [] == differences(fixture.expect, outcome)


def test_the_docs_routes_and_verb_load(tmp_path: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "providers" / "jambonz.md").read_text(
        encoding="utf-8")
    tomls = [block.split("```", 1)[0] for block in page.split("```toml\n")[1:]]
    (tmp_path / "jambonz.toml").write_text("\n".join(tomls), encoding="utf-8")
    settings = load_settings(config_path=str(tmp_path / "jambonz.toml"), env={})
    assert [("/jambonz", False), ("/jambonz-stream", True)] == [
        (route.path, route.bidirectional_streaming) for route in settings.routes]
    [verb] = [json.loads(block.split("```", 1)[0]) for block in page.split("```json\n")[1:]]
    assert ("listen", SUBPROTOCOL) == (verb["verb"], "audio.jambonz.org")
