"""Genesys AudioHook and Audio Connector through the provider seam: the upgrade's RFC 9421
signature (the reference implementation's test vector, replays, rotation), the session
protocol as the I/O-free codec answers it (open/opened, ping/pong, update/updated,
paused/resumed/discarded, close/closed, sequence and position checks, the two channels
de-interleaved), and a real server driven by a client of Genesys's side written here
(probe, refused organization, talk-back, pause, hang-up and hand-off)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamsvc import wire
from streamsvc.config import ConfigError, Route, Settings, load_settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers import CodecOptions, codec_for
from streamsvc.providers.credentials import Credentials, NonceMemory, genesys_problem
from streamsvc.providers.genesys import (
    PROBE_ID,
    GenesysCodec,
    choose_media,
    duration_ms,
    format_duration,
)
from streamsvc.providers.genesys_auth import GenesysKey, sign_headers, signature_problem
from streamsvc.replay import Signing, replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import BadFrame, Session

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
ORG = "d7934305-0972-4844-938e-9060eef73d05"
API_KEY = "genesys-api-key"
SECRET = base64.b64encode(b"a client secret of the integration").decode()
STEREO = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"],
          "rate": 8000}
EXTERNAL = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}

# The reference implementation's test vector (signature-verifier.test.ts).
VECTOR = {
    "host": "audiohook.example.com",
    "audiohook-organization-id": ORG,
    "audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c0",
    "audiohook-correlation-id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "x-api-key": "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
    "signature-input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    'keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";'
    'alg="hmac-sha256";created=1641013200;expires=3282026430',
    "signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
}
VECTOR_KEY = GenesysKey.of("SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
                           "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU=")
VECTOR_TARGET = "/api/v1/voicebiometrics/ws"


def vector(**changes: str) -> wire.Upgrade:
    return wire.Upgrade.of(VECTOR_TARGET, "", {**VECTOR, **changes}.items())


# -- the signature ------------------------------------------------------------------------

def test_the_reference_implementations_test_vector_verifies() -> None:
    assert None is signature_problem(vector(), [VECTOR_KEY], now=1641013205)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c1"}, "bad_signature"),
    ({"host": "elsewhere.example.com"}, "bad_signature"),
    ({"x-api-key": "another-key"}, "bad_signature"),
    ({"signature": "sig1=:AAAAyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:"}, "bad_signature"),
    ({"signature": ""}, "missing_signature"),
])
def test_a_changed_request_or_signature_does_not_verify(changes: dict[str, str],
                                                        problem: str) -> None:
    upgrade = vector(**changes)
    if changes.get("signature") == "":
        upgrade = wire.Upgrade(upgrade.path, "", tuple(
            (name, value) for name, value in upgrade.headers if name != "signature"))
    assert problem == signature_problem(upgrade, [VECTOR_KEY], now=1641013205)


def test_the_vector_is_refused_long_after_it_was_created_and_with_another_secret() -> None:
    assert "expired_signature" == signature_problem(vector(), [VECTOR_KEY])
    other = GenesysKey.of(VECTOR_KEY.api_key, base64.b64encode(b"not the secret").decode())
    assert "bad_signature" == signature_problem(vector(), [other], now=1641013205)


def signed(url: str = "wss://voice.example.com/genesys", key: GenesysKey | None = None,
           **overrides: Any) -> wire.Upgrade:
    key = key or GenesysKey.of(API_KEY, SECRET)
    headers = sign_headers(url, key, organization_id=ORG, session_id=str(uuid.uuid4()),
                           correlation_id=str(uuid.uuid4()), **overrides)
    return wire.Upgrade.of("/genesys", "", [*headers.items(), ("host", "voice.example.com")])


def test_a_signature_of_ours_verifies_with_either_pair_of_a_rotation() -> None:
    other_secret = base64.b64encode(b"the rotated client secret").decode()
    old, new = GenesysKey.of("old-key", SECRET), GenesysKey.of(API_KEY, other_secret)
    same_key = GenesysKey.of("old-key", other_secret)  # a secret rotated under one key
    assert None is signature_problem(signed(key=old), [new, old])
    assert None is signature_problem(signed(key=new), [new, old])
    assert None is signature_problem(signed(key=old), [same_key, old])
    assert "bad_signature" == signature_problem(signed(key=old), [new, same_key])


def test_a_short_nonce_or_an_old_signature_is_refused() -> None:
    assert "bad_signature" == signature_problem(signed(nonce="short"), [GenesysKey.of(
        API_KEY, SECRET)])
    assert "expired_signature" == signature_problem(signed(), [GenesysKey.of(API_KEY, SECRET)],
                                                    now=__import__("time").time() + 60)


def test_a_captured_upgrade_opens_one_stream() -> None:
    upgrade = signed()
    credentials = Credentials(genesys_keys=(GenesysKey.of(API_KEY, SECRET),),
                              nonces=NonceMemory())
    assert (None, "replayed_signature") == (genesys_problem(upgrade, credentials),
                                            genesys_problem(upgrade, credentials))


def test_the_public_url_is_what_the_signature_may_cover_behind_a_proxy() -> None:
    upgrade = signed("wss://voice.example.com/prefix/genesys")
    inside = wire.Upgrade("/genesys", "", tuple(
        (name, "10.0.0.5:8080" if name == "host" else value) for name, value in upgrade.headers))
    key = [GenesysKey.of(API_KEY, SECRET)]
    assert "bad_signature" == signature_problem(inside, key)
    assert None is signature_problem(inside, key,
                                     public_ws_base="wss://voice.example.com/prefix")


def test_the_settings_take_the_key_and_secret_together_and_base64(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="genesys_client_secret"):
        load_settings(env={"STREAMSVC_GENESYS_API_KEY": "k"})
    with pytest.raises(ConfigError, match="base64"):
        load_settings(env={"STREAMSVC_GENESYS_API_KEY": "k",
                           "STREAMSVC_GENESYS_CLIENT_SECRET": "not base64!"})
    config = tmp_path / "genesys.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\n[[routes]]\npath = "/genesys"\n'
                      'provider = "genesys"\nhandlers = ["log"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="STREAMSVC_GENESYS_API_KEY"):  # fails closed
        load_settings(config_path=str(config), env={})


# -- the session protocol (I/O-free) ------------------------------------------------------

class Genesys:
    """Genesys's side of a session, as messages."""

    def __init__(self, session_id: str = "s-1") -> None:
        self.session_id = session_id
        self.seq = 0

    def message(self, kind: str, position: str | None = None, **parameters: Any) -> str:
        self.seq += 1
        message: dict[str, Any] = {"version": "2", "id": self.session_id, "type": kind,
                                   "seq": self.seq, "serverseq": 0, "parameters": parameters}
        if position is not None:
            message["position"] = position
        return json.dumps(message)

    def open(self, media: list[dict[str, Any]] | None = None, conversation: str = "conv-1",
             **extra: Any) -> str:
        return self.message("open", organizationId=ORG, conversationId=conversation,
                            participant={"id": "p-1", "ani": "tel:+15550100",
                                         "aniName": "Pat", "dnis": "tel:+15550199"},
                            media=media or [STEREO, EXTERNAL], **extra)


def opened_session(channels: str = "both", media: list[dict[str, Any]] | None = None,
                   **extra: Any) -> tuple[Session, Genesys, list[dict[str, Any]]]:
    genesys = Genesys()
    session = Session(codec=GenesysCodec({"audiohook-organization-id": ORG}, channels))
    session.receive_message(genesys.open(media, **extra))
    return session, genesys, [json.loads(frame) for frame in session.data_to_send()]


def test_open_is_answered_opened_with_one_offered_format_and_the_call_starts() -> None:
    session, _, [opened] = opened_session(
        customConfig={"customerId": "cus_1", "tier": 2}, inputVariables={"intent": "billing"},
        language="en-US")
    assert ("opened", 1, 1, "s-1", {"media": [STEREO]}) == (
        opened["type"], opened["seq"], opened["clientseq"], opened["id"], opened["parameters"])
    [start] = session.events_received()
    assert isinstance(start, wire.Start)
    assert ("conv-1", "s-1", ORG, ("inbound", "outbound")) == (
        start.call_sid, start.started_stream_sid, start.account_sid, start.tracks)
    assert {"ani": "tel:+15550100", "aniName": "Pat", "dnis": "tel:+15550199",
            "language": "en-US", "customerId": "cus_1", "tier": "2",
            "intent": "billing"} == dict(start.custom_parameters)


@pytest.mark.parametrize(("channels", "offered", "chosen"), [
    ("both", [EXTERNAL, STEREO], STEREO),
    ("external", [STEREO, EXTERNAL], EXTERNAL),
    ("external", [STEREO], STEREO),
    ("both", [{**STEREO, "format": "L16"}, STEREO], STEREO),
    ("both", [{**STEREO, "rate": 16000}, {**EXTERNAL, "format": "L16"}],
     {**EXTERNAL, "format": "L16"}),
    ("both", [{**STEREO, "format": "opus"}], None),
])
def test_the_format_chosen_follows_the_routes_channels_then_pcmu(
        channels: str, offered: list[dict[str, Any]], chosen: dict[str, Any] | None) -> None:
    assert chosen == choose_media(offered, channels)


def test_an_open_asking_for_supported_languages_gets_the_list_in_opened() -> None:
    _, _, [opened] = opened_session(supportedLanguages=True)
    assert {"media": [STEREO], "supportedLanguages": []} == opened["parameters"]


def test_an_open_offering_nothing_usable_is_answered_disconnect_and_never_starts() -> None:
    session, _, [answer] = opened_session(media=[{**STEREO, "format": "opus"}])
    assert ("disconnect", "error") == (answer["type"], answer["parameters"]["reason"])
    [bad] = session.events_received()
    assert isinstance(bad, BadFrame)
    assert session.stream_sid is None


def test_stereo_audio_is_split_into_the_two_tracks() -> None:
    session, _, _ = opened_session()
    session.events_received()
    frame = bytes(range(200)) + bytes(range(120))
    session.receive_message(frame, binary=True)
    media = [e for e in session.events_received() if isinstance(e, wire.Media)]
    assert [("inbound", frame[0::2]), ("outbound", frame[1::2])] == [
        (m.track, m.payload) for m in media]
    assert {"inbound": 160, "outbound": 160} == {
        track: stats.bytes for track, stats in session.track_stats.items()}


def test_l16_stereo_keeps_each_sample_whole() -> None:
    l16 = {**STEREO, "format": "L16"}
    session, _, _ = opened_session(media=[l16])
    session.events_received()
    left = b"".join(i.to_bytes(2, "little", signed=True) for i in range(-80, 80))
    right = b"".join((1000 + i).to_bytes(2, "little") for i in range(160))
    interleaved = b"".join(left[i:i + 2] + right[i:i + 2] for i in range(0, 320, 2))
    session.receive_message(interleaved, binary=True)
    media = [e for e in session.events_received() if isinstance(e, wire.Media)]
    assert [left, right] == [m.payload for m in media]
    assert left == session.pcm16(media[0])


def test_audio_before_open_or_in_broken_samples_is_a_bad_frame() -> None:
    session = Session(codec=GenesysCodec())
    session.receive_message(b"\xff" * 160, binary=True)
    opened = opened_session()[0]
    opened.events_received()
    opened.receive_message(b"\xff" * 161, binary=True)
    assert ["audio before the session was opened"] == [
        e.reason for e in session.events_received() if isinstance(e, BadFrame)]
    assert 1 == opened.bad_frames


def test_ping_update_and_close_are_answered_in_sequence() -> None:
    session, genesys, _ = opened_session()
    session.receive_message(genesys.message("ping", rtt="PT0.05S"))
    session.receive_message(genesys.message("update", language="fr-FR"))
    session.receive_message(genesys.message("close", reason="end"))
    answers = [json.loads(frame) for frame in session.data_to_send()]
    assert [("pong", 2, 2), ("updated", 3, 3), ("closed", 4, 4)] == [
        (a["type"], a["seq"], a["clientseq"]) for a in answers]
    kinds = [type(e).__name__ for e in session.events_received()]
    assert ["Start", "Noted", "Noted", "Stop"] == kinds
    summary = session.close("stop")
    assert (0, 0, "end") == (summary.ignored_events, summary.bad_frames,
                             (summary.protocol or {})["close_reason"])


def test_pauses_and_discarded_audio_are_counted_never_as_lost_frames() -> None:
    session, genesys, _ = opened_session()
    for _ in range(5):
        session.receive_message(b"\xff" * 320, binary=True)
    session.receive_message(genesys.message("paused", position="PT0.10S"))
    session.receive_message(genesys.message("resumed", position="PT0.10S", start="PT0.10S",
                                            discarded="PT2.5S"))
    session.receive_message(genesys.message("discarded", position="PT2.60S",
                                            start="PT0.10S", discarded="PT0.5S"))
    session.receive_message(b"\xff" * 320, binary=True)
    summary = session.close("stop")
    protocol = dict(summary.protocol or {})
    assert (1, 3000, 0, 0) == (protocol["pauses"], protocol["discarded_ms"],
                               protocol["seq_errors"], protocol["position_mismatches"])
    assert ({"inbound": 6, "outbound": 6}, {"inbound": 0, "outbound": 0}) == (
        dict(summary.frames), dict(summary.missing_frames))


def test_sequence_and_position_errors_are_counted_and_the_call_goes_on() -> None:
    session, genesys, _ = opened_session()
    session.receive_message(b"\xff" * 320, binary=True)
    genesys.seq += 3  # three messages Genesys never sent
    session.receive_message(genesys.message("ping", position="PT5S"))
    session.receive_message(b"\xff" * 320, binary=True)
    protocol = dict(session.close("stop").protocol or {})
    assert (1, 1) == (protocol["seq_errors"], protocol["position_mismatches"])
    assert 0 == session.bad_frames


def test_a_probe_is_answered_opened_and_never_started() -> None:
    codec = GenesysCodec()
    session = Session(codec=codec)
    genesys = Genesys()
    session.receive_message(genesys.message(
        "open", organizationId=ORG, conversationId=PROBE_ID, participant={"id": PROBE_ID},
        media=[STEREO]))
    session.receive_message(genesys.message("close", reason="end"))
    assert ["opened", "closed"] == [json.loads(f)["type"] for f in session.data_to_send()]
    assert (True, True, None) == (codec.is_probe, codec.finished, session.stream_sid)
    assert not any(isinstance(e, BadFrame | wire.Start) for e in session.events_received())


def test_an_open_for_another_organization_is_refused_unauthorized() -> None:
    codec = GenesysCodec({"audiohook-organization-id": "another-org"})
    session = Session(codec=codec)
    session.receive_message(Genesys().open())
    [answer] = [json.loads(frame) for frame in session.data_to_send()]
    assert ("disconnect", "unauthorized") == (answer["type"], answer["parameters"]["reason"])
    assert ("organization_mismatch", None) == (codec.refusal, session.stream_sid)


def test_dtmf_and_playback_completed_resolve_in_order_and_clear_is_barge_in() -> None:
    session, genesys, _ = opened_session(media=[EXTERNAL])
    session.bidirectional = True
    session.send_media(b"\xff" * 160)
    session.send_mark("first")
    session.send_mark("second")
    session.receive_message(genesys.message("dtmf", digit="5"))
    session.receive_message(genesys.message("playback_completed"))
    session.send_mark("third")
    session.send_clear()
    sent = session.data_to_send()
    assert wire.BinaryFrame is type(sent[0])
    assert {"entities": [{"type": "barge_in", "data": {}}]} == json.loads(
        sent[-1])["parameters"]
    events = session.events_received()
    assert ["5"] == [e.digit for e in events if isinstance(e, wire.Dtmf)]
    assert ["first", "second"] == [e.name for e in events if isinstance(e, wire.Mark)]


def test_ending_and_pausing_are_genesys_messages() -> None:
    session, _, _ = opened_session()
    session.send_pause(True)
    session.send_pause(False)
    assert session.send_end("completed", {"streamsvc_call": "conv-1", "intent": "billing"})
    pause, resume, disconnect = (json.loads(f) for f in session.data_to_send())
    assert ["pause", "resume", "disconnect"] == [m["type"] for m in (pause, resume, disconnect)]
    assert {"reason": "completed", "outputVariables": {"streamsvc_call": "conv-1",
                                                       "intent": "billing"}} == (
        disconnect["parameters"])


def test_unknown_fields_and_messages_never_fail_a_session() -> None:
    session, genesys, _ = opened_session(futureField={"x": 1})
    session.receive_message(genesys.message("something_new", whatever=[1, 2]))
    assert (0, 1) == (session.bad_frames, session.close("stop").ignored_events)


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False))
def test_a_position_reads_back_as_written(milliseconds: float) -> None:
    assert abs(milliseconds - (duration_ms(format_duration(milliseconds)) or -1)) <= 5


@given(st.text(max_size=40))
def test_any_text_is_a_duration_or_none(text: str) -> None:
    value = duration_ms(text)
    assert value is None or value >= 0


@given(st.binary(max_size=600) | st.text(max_size=200))
def test_any_message_either_parses_or_is_a_bad_frame(frame: bytes | str) -> None:
    session, _, _ = opened_session()
    session.receive_message(frame, binary=isinstance(frame, bytes) and len(frame) % 2 == 0)
    assert all(isinstance(e, wire.Media | wire.Batch | wire.Start | BadFrame | wire.Noted
                          | wire.UnknownEvent | wire.Stop | wire.Dtmf | wire.Mark)
               for e in session.events_received())


def test_routes_ask_for_both_channels_when_a_handler_reads_the_agents_side() -> None:
    log, recorder = (resolve_handler(name, {}, key="handlers") for name in ("log", "recorder"))
    forward = resolve_handler("forward", {"url": "ws://x", "tracks": ["inbound", "outbound"]},
                              key="handlers")
    assert ["external", "both", "both", "both"] == [
        Route("/g", handlers, provider="genesys").channels_for()
        for handlers in ((log,), (log, recorder), (forward,))] + [
        Route("/g", (log,), provider="genesys", channels="both").channels_for()]
    assert "external" == codec_for("genesys", wire.Upgrade("/"), CodecOptions(
        channels="external")).channels  # type: ignore[attr-defined]


# -- a real server, a client of Genesys's side ---------------------------------------------

class Talker(Handler):
    """An Audio Connector bot: pauses and resumes the caller's audio, says something with a
    mark, then hands the call on (or hangs up)."""

    def __init__(self, hand_off: bool = True) -> None:
        self.hand_off = hand_off
        self.results: list[str] = []

    def on_start(self, session: LiveSession) -> None:
        session.update_context({"intent": "card-dispute"})
        session.pause_audio()
        session.resume_audio()
        session.send_audio(b"\x7f" * 800)
        asyncio.get_running_loop().create_task(self._then(session))

    async def _then(self, session: LiveSession) -> None:
        self.results.append(await session.mark("said"))
        if self.hand_off:
            await session.hand_off("queue:disputes")
        else:
            session.hang_up()


@pytest.fixture
async def server(request: pytest.FixtureRequest,
                 transport: str) -> AsyncIterator[StreamServer]:
    talker = Talker(hand_off=getattr(request, "param", True))
    spec = HandlerSpec("talker", lambda: talker)
    running = StreamServer(Settings(port=0, routes=(
        Route("/genesys", (resolve_handler("log", {}, key="handlers"),), provider="genesys"),
        Route("/connector", (spec,), bidirectional=True, provider="genesys")),
        genesys_api_key=API_KEY, genesys_client_secret=SECRET, transport=transport))
    running.talker = talker  # type: ignore[attr-defined]
    await running.start()
    yield running
    await running.stop()


async def genesys_client(port: int, path: str, *, organization: str = ORG,
                         sign: bool = True) -> ClientConnection:
    url = f"ws://127.0.0.1:{port}{path}"
    headers = sign_headers(url, GenesysKey.of(API_KEY, SECRET), organization_id=organization,
                           session_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()))
    if not sign:
        headers = {k: v for k, v in headers.items() if not k.startswith("signature")}
    return await connect(url, additional_headers=headers)


async def answers(connection: ClientConnection, until_type: str) -> list[Any]:
    received: list[Any] = []
    while not received or (isinstance(received[-1], dict)
                           and received[-1].get("type") != until_type):
        message = await asyncio.wait_for(connection.recv(), 5)
        received.append(json.loads(message) if isinstance(message, str) else message)
    return received


async def test_a_probe_is_answered_and_closed_cleanly_and_is_not_a_call(
        server: StreamServer, logs: LogEvents) -> None:
    genesys = Genesys(str(uuid.uuid4()))
    connection = await genesys_client(server.port, "/genesys")
    await connection.send(genesys.message("open", organizationId=ORG,
                                          conversationId=PROBE_ID,
                                          participant={"id": PROBE_ID}, media=[STEREO]))
    [opened] = await answers(connection, "opened")
    await connection.send(genesys.message("close", reason="end"))
    [closed] = await answers(connection, "closed")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 5)
    assert ("opened", "closed", 1000) == (opened["type"], closed["type"],
                                          connection.close_code)
    await until(lambda: events(logs, "genesys.probe_closed"))
    assert [ORG] == [line["organization_id"] for line in events(logs, "genesys.probe")]
    assert [] == events(logs, "stream.started") + events(logs, "stream.closed_before_start")


async def test_an_unsigned_upgrade_and_another_organization_are_refused(
        server: StreamServer, logs: LogEvents) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await genesys_client(server.port, "/genesys", sign=False)
    assert 403 == refused.value.response.status_code
    connection = await genesys_client(server.port, "/genesys", organization="another-org")
    await connection.send(Genesys().open())
    [disconnect] = await answers(connection, "disconnect")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 5)
    assert ("unauthorized", 1008) == (disconnect["parameters"]["reason"],
                                      connection.close_code)
    assert ["organization_mismatch"] == [line["reason"] for line in events(logs,
                                                                             "stream.refused")]
    assert [] == events(logs, "stream.started")


async def play_connector(port: int) -> tuple[list[Any], ClientConnection]:
    """An Audio Connector call as Genesys makes it: open, 20 ms frames, answers to pause,
    resume and the bot's audio; close once the bot disconnects."""
    genesys = Genesys(str(uuid.uuid4()))
    connection = await genesys_client(port, "/connector")
    await connection.send(genesys.open([EXTERNAL], conversation="conv-connector",
                                       inputVariables={"customerId": "cus_77"}))
    received = await answers(connection, "opened")
    audio_bytes = 0
    while not any(isinstance(m, dict) and m.get("type") == "disconnect" for m in received):
        await connection.send(b"\xff" * 160)
        try:
            message = await asyncio.wait_for(connection.recv(), 0.02)
        except TimeoutError:
            continue
        item = json.loads(message) if isinstance(message, str) else message
        received.append(item)
        if isinstance(item, bytes):
            audio_bytes += len(item)
            if audio_bytes >= 800:  # what the bot said has played
                await connection.send(genesys.message("playback_completed"))
        elif item.get("type") == "pause":
            await connection.send(genesys.message("paused"))
        elif item.get("type") == "resume":
            await connection.send(genesys.message("resumed", start="PT0S",
                                                  discarded="PT0.04S"))
    await connection.send(genesys.message("close", reason="disconnect"))
    received += await answers(connection, "closed")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 5)
    return received, connection


async def test_an_audio_connector_bot_talks_pauses_and_hands_the_call_off(
        server: StreamServer, logs: LogEvents) -> None:
    received, connection = await play_connector(server.port)
    kinds = [m["type"] if isinstance(m, dict) else "audio" for m in received]
    assert ["opened", "pause", "resume", "audio"] == list(dict.fromkeys(kinds))[:4]
    [disconnect] = [m for m in received if isinstance(m, dict) and m["type"] == "disconnect"]
    variables = disconnect["parameters"]["outputVariables"]
    assert ("completed", "conv-connector", "queue:disputes", "card-dispute", "cus_77") == (
        disconnect["parameters"]["reason"], variables["streamsvc_call"],
        variables["streamsvc_target"], variables["intent"], variables["customerId"])
    assert 1000 == connection.close_code
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert ("handed_off", 1, 1, 40) == (
        stopped["reason"], stopped["marks_received"], stopped["protocol"]["pauses"],
        stopped["protocol"]["discarded_ms"])
    assert ["played"] == server.talker.results  # type: ignore[attr-defined]
    assert "genesys_disconnect" == stopped["hand_off"]["mechanism"]


@pytest.mark.parametrize("server", [False], indirect=True)
async def test_hang_up_sends_disconnect_completed_and_the_call_stops(
        server: StreamServer, logs: LogEvents) -> None:
    received, _ = await play_connector(server.port)
    [disconnect] = [m for m in received if isinstance(m, dict) and m["type"] == "disconnect"]
    assert {"reason": "completed"} == disconnect["parameters"]
    await until(lambda: events(logs, "stream.stopped"))
    assert "stop" == events(logs, "stream.stopped")[0]["reason"]


async def test_the_bundled_sessions_replay_to_their_expected_outcome(
        server: StreamServer, logs: LogEvents) -> None:
    fixtures = [load_fixture(FIXTURES / name) for name in ("genesys_audiohook.jsonl",
                                                           "genesys_connector.jsonl")]
    report = await replay(fixtures, f"ws://127.0.0.1:{server.port}/genesys", speed=0,
                          signing=Signing(genesys_api_key=API_KEY,
                                          genesys_client_secret=SECRET))
    assert [None, None] == [session.error for session in report.sessions]
    await until(lambda: len(events(logs, "stream.stopped")) == 2)
    for fixture, session in zip(fixtures, report.sessions, strict=True):
        assert [] == differences(fixture.expect, outcome_of(logs, session.stream_sid))
    for stopped in events(logs, "stream.stopped"):
        assert (0, 0) == (stopped["protocol"]["seq_errors"],
                          stopped["protocol"]["position_mismatches"])


# -- the docs page and its example ---------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs" / "providers" / "genesys.md"


def test_the_docs_show_the_example_bot_as_it_is_and_their_routes_load(tmp_path: Path) -> None:
    page = DOCS.read_text(encoding="utf-8")
    example = (Path(__file__).parent.parent / "examples" / "genesys_bot.py").read_text(
        encoding="utf-8")
    [python] = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    assert example[example.index("from __future__"):] == python
    [toml] = [block.split("```", 1)[0] for block in page.split("```toml\n")[1:]]
    config = tmp_path / "genesys.toml"
    config.write_text(toml, encoding="utf-8")
    settings = load_settings(config_path=str(config), env={})
    assert [("/genesys", "both", False), ("/genesys-bot", "both", True)] == [
        (route.path, route.channels_for(), route.bidirectional) for route in settings.routes]


async def test_the_example_bot_pauses_for_the_card_number_and_hands_the_call_back(
        transport: str, logs: LogEvents) -> None:
    bot = resolve_handler("examples.genesys_bot:CardBot", {}, key="t")
    running = StreamServer(Settings(port=0, transport=transport, routes=(
        Route("/genesys-bot", (bot,), bidirectional=True, provider="genesys"),),
        genesys_api_key=API_KEY, genesys_client_secret=SECRET))
    await running.start()
    try:
        genesys = Genesys(str(uuid.uuid4()))
        connection = await genesys_client(running.port, "/genesys-bot")
        await connection.send(genesys.open([EXTERNAL], conversation="conv-card"))
        received = await answers(connection, "opened")
        for digit in "*12345#":
            await connection.send(b"\xff" * 160)
            await connection.send(genesys.message("dtmf", digit=digit))
        received += await answers(connection, "disconnect")
        await connection.send(genesys.message("close", reason="disconnect"))
        received += await answers(connection, "closed")
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await running.stop()
    kinds = [m["type"] for m in received if isinstance(m, dict)]
    assert ["opened", "pause", "resume", "disconnect", "closed"] == kinds
    variables = received[-2]["parameters"]["outputVariables"]
    assert ("conv-card", "queue:disputes", "2345", "yes", "card-dispute") == (
        variables["streamsvc_call"], variables["streamsvc_target"], variables["card_last4"],
        variables["verified"], variables["intent"])
    assert "handed_off" == events(logs, "stream.stopped")[0]["reason"]
