"""The conformance suite: every provider of the registry, every built-in handler, the same
invariants. Each provider's bundled fixture is replayed, signed with the provider's own
credential (every check on), at a route of that provider running forward (to a local
receiver), the recorder, levels, dtmf, capture and log; a bidirectional route of each runs
echo and talks back. A provider added to the registry with a fixture here gets all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers import REGISTRY, CodecOptions, codec_for
from streamsvc.replay import Signing, replay, upgrade_headers, write_acs_keys
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import Fixture, load_fixture
from streamsvc.replay.signing import SIGNERS
from streamsvc.server import StreamServer
from streamsvc.session import CallSummary, Session
from tests.conftest import BUNDLED, LogEvents, SttStandIn, events, outcome_of, stt_stand_in, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
PUBLIC = "wss://voice.example.com"
AUDIENCE = "acs-resource-0001"
# Each provider's bundled fixture, and one whose talk-back is exercised.
PROVIDERS = [row.name for row in REGISTRY if row.name != "auto"]
CONTEXT_TOKEN = "context-api-token"
SECRETS = {"auth_token": "twilio-token", "signalwire_token": "signalwire-token",
           "telnyx_stream_token": "telnyx-token", "exotel_basic_auth": "key:exotel-token",
           "plivo_auth_token": "plivo-token", "vonage_signature_secret": "vonage-secret-" * 3,
           "genesys_api_key": "genesys-api-key",
           "genesys_client_secret": "Z2VuZXN5cy1jbGllbnQtc2VjcmV0LWZvci10ZXN0cw==",
           "asterisk_basic_auth": "asterisk:pbx-secret", "jambonz_basic_auth": "jambonz:secret"}


def test_every_provider_of_the_registry_has_a_bundled_fixture_and_a_signer() -> None:
    assert sorted(PROVIDERS) == sorted(BUNDLED)
    assert {row.name for row in REGISTRY if row.check is not None} == set(SIGNERS)


class Enricher(Handler):
    """What a handler learns during the call joins the call's context."""

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        session.update_context({"learned": f"on {session.codec.provider}"})

    def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        session.update_context({"summary": f"{summary.frames.get('inbound', 0)} frames"})


def read_context(port: int, call_id: str, token: str | None = CONTEXT_TOKEN
                 ) -> tuple[int, dict[str, Any]]:
    """``GET /calls/<call id>/context`` as an agent's app asks it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/calls/{urllib.parse.quote(call_id)}/context",
        headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


@pytest.fixture
async def receiver() -> AsyncIterator[SttStandIn]:
    async with stt_stand_in() as stand_in:
        yield stand_in


@pytest.fixture
async def server(tmp_path: Path, receiver: SttStandIn) -> AsyncIterator[StreamServer]:
    _, jwks = write_acs_keys(tmp_path / "keys")

    def handlers(name: str) -> tuple[HandlerSpec, ...]:
        options = {"forward": {"url": f"ws://127.0.0.1:{receiver.port}/stt", "linger_s": 0.2},
                   "recorder": {"dir": str(tmp_path / "recordings" / name)},
                   "capture": {"dir": str(tmp_path / "captures" / name)},
                   "levels": {}, "dtmf": {}}
        return (HandlerSpec("log", LogHandler), HandlerSpec("enricher", Enricher),
                *(resolve_handler(kind, opts, key="handlers") for kind, opts in options.items()))

    echo = resolve_handler("echo", {"delay_ms": 100, "mark_every_ms": 400}, key="handlers")
    routes = [Route(f"/{name}", handlers(name), provider=name) for name in PROVIDERS]
    routes += [Route(f"/{name}-talk", (echo,), bidirectional=True, provider=name)
               for name in PROVIDERS]
    routes.append(Route("/auto", handlers("auto"), provider="auto"))
    running = StreamServer(Settings(
        port=0, routes=tuple(routes), public_url=PUBLIC, acs_audience=AUDIENCE,
        acs_jwks_url=jwks.as_uri(), context_api_token=CONTEXT_TOKEN, **SECRETS))
    await running.start()
    yield running
    await running.stop()


def signing(tmp_path: Path) -> Signing:
    return Signing(public_url=PUBLIC, acs_audience=AUDIENCE,
                   acs_key_pem=(tmp_path / "keys" / "acs-signing-key.pem").read_bytes(),
                   **SECRETS)


def decoded(fixture: Fixture, provider: str) -> tuple[bytes, int, int]:
    """The fixture's inbound audio as PCM16 at the stream's rate, frame by frame in the
    order sent, as the I/O-free session takes it; that rate; and the mark echoes the
    fixture itself carries."""
    session = Session(codec=codec_for(provider, wire.Upgrade.of("/", "", fixture.headers.items()),
                                      CodecOptions()))
    pieces, marks = [], 0
    for frame in fixture.frames:
        session.receive_message(frame.binary if frame.binary is not None else frame.text,
                                frame.binary is not None)
        for event in session.events_received():
            if type(event) is wire.Media and event.track == "inbound":
                pieces.append(session.pcm16(event))
            marks += isinstance(event, wire.Mark)
    return b"".join(pieces), session.sample_rate, marks


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_every_handler_gets_the_calls_audio_and_events_on_every_provider(
        provider: str, server: StreamServer, receiver: SttStandIn, tmp_path: Path,
        logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/{provider}", speed=0,
                          signing=signing(tmp_path),
                          acs_events_url=f"http://127.0.0.1:{server.port}/acs/events")
    [session] = report.sessions
    assert session.ok, session.error
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    [started] = events(logs, "stream.started")
    outcome = outcome_of(logs, started["stream_sid"])
    # Ids, tracks, context, counts, DTMF and the stop reason: as the fixture expects.
    assert [] == differences(fixture.expect, outcome)
    assert ({}, provider) == (stopped["handler_errors"], started["provider"])
    audio, rate, _ = decoded(fixture, provider)
    assert rate == started["media_format"]["sample_rate"]
    # forward: a start naming the stream's true rate, then exactly the decoded audio.
    await until(lambda: receiver.messages and any(
        isinstance(m, str) and '"stop"' in m for m in receiver.messages[-1]))
    [messages] = receiver.messages
    start = orjson.loads(messages[0])
    assert ("start", "pcm16", rate) == (start["event"], start["audio"]["encoding"],
                                       start["audio"]["sample_rate"])
    assert audio == b"".join(m for m in messages if isinstance(m, bytes))
    # The duration is the call's length in media time, whatever the provider's clock.
    frames = stopped["frames"]["inbound"] + stopped["missing_frames"]["inbound"]
    frame_ms = session_frame_ms(stopped, audio, rate)
    assert frames * frame_ms <= stopped["duration_ms"] <= frames * frame_ms + 1000
    # recorder: a WAV at the stream's rate holding at least every sample received.
    recording = stopped["handlers"]["recorder"]
    with wave.open(recording["file"]) as wav:
        assert (rate, 2) == (wav.getframerate(), wav.getsampwidth())
        assert wav.getnframes() >= len(audio) // 2
    # levels: the inbound track measured (the fixtures carry a tone, not silence).
    assert stopped["handlers"]["levels"]["inbound"]["rms_dbfs"] > -100
    # dtmf: every key the caller pressed.
    assert list(fixture.expect["dtmf"]) == [
        press["digit"] for press in stopped["handlers"]["dtmf"]["presses"]]
    # capture: every frame the call sent, kept as a fixture of the same provider.
    await until(lambda: list((tmp_path / "captures").rglob("*.jsonl")))
    [file] = (tmp_path / "captures").rglob("*.jsonl")
    captured = load_fixture(file)
    assert (provider, len(fixture.frames)) == (captured.provider, len(captured.frames))


def session_frame_ms(stopped: dict[str, Any], audio: bytes, rate: int) -> int:
    """Milliseconds per media frame of this stream, from its audio and frame count."""
    samples = len(audio) // 2
    return round(samples * 1000 / rate / stopped["frames"]["inbound"])


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_calls_context_goes_in_is_enriched_and_is_read_by_the_agent_on_every_provider(
        provider: str, server: StreamServer, tmp_path: Path, logs: LogEvents) -> None:
    """What the call's way in carried and what a handler added, through the context API
    with its token only (401 without, 404 for a call nobody knows), values never logged."""
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/{provider}", speed=0,
                          signing=signing(tmp_path),
                          acs_events_url=f"http://127.0.0.1:{server.port}/acs/events")
    assert report.sessions[0].ok, report.sessions[0].error
    await until(lambda: events(logs, "stream.stopped"))
    [started] = events(logs, "stream.started")
    call_id = started["correlation_id"] or started["call_sid"]
    status, answer = await asyncio.to_thread(read_context, server.port, call_id)
    assert 200 == status
    assert started["call_sid"] == answer["call_sid"]
    context = answer["context"]
    # The ways in (the stream's parameters, or what ACS's IncomingCall stored) are there,
    # with what the handler added at the start and at the end.
    assert {**started["custom_parameters"], **(started["context"] or {})}.items() <= (
        context.items())
    assert (f"on {provider}", f"{started_frames(logs)} frames") == (
        context["learned"], context["summary"])
    assert answer["updated_at"].endswith("Z")
    assert (401, 401, 404) == (
        (await asyncio.to_thread(read_context, server.port, call_id, None))[0],
        (await asyncio.to_thread(read_context, server.port, call_id, "wrong"))[0],
        (await asyncio.to_thread(read_context, server.port, "CA-nobody"))[0])
    updates = events(logs, "call.context_updated")
    assert [["learned"], ["summary"]] == [line["names"] for line in updates]
    assert not any("frames" in str(line) for line in updates)  # names, never values
    [stopped] = events(logs, "stream.stopped")
    assert 2 == stopped["context_updates"]


def started_frames(logs: LogEvents) -> int:
    [stopped] = events(logs, "stream.stopped")
    return int(stopped["frames"].get("inbound", 0))


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_talk_back_reaches_the_caller_on_every_provider(
        provider: str, server: StreamServer, tmp_path: Path, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/{provider}-talk",
                          speed=4, signing=signing(tmp_path),
                          acs_events_url=f"http://127.0.0.1:{server.port}/acs/events")
    [session] = report.sessions
    assert session.ok, session.error
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    assert {} == stopped["handler_errors"]
    assert session.audio_bytes_received > 0  # the echo came back in the provider's shape
    assert stopped["marks_sent"] > 0
    if provider in ("genesys", "jambonz"):  # a playback acknowledgement resolves the marks
        # sent before it, however many
        assert session.marks_played
        assert stopped["marks_received"] > 0
    elif codec_for(provider, wire.Upgrade("/")).has_marks:  # else resolved by the clock
        # The peer answered marks in the provider's own shape, and each answer counted.
        assert session.marks_played
        recorded = decoded(fixture, provider)[2]  # echoes the fixture itself carries
        assert stopped["marks_received"] == recorded + len(session.marks_played) + len(
            session.marks_cleared)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_unsigned_upgrade_is_refused_and_the_hint_names_the_providers_credential(
        provider: str, server: StreamServer, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    report = await replay([fixture], f"ws://127.0.0.1:{server.port}/{provider}", speed=0)
    [session] = report.sessions
    assert not session.ok
    assert session.error is not None
    assert SIGNERS[provider].needs in session.error
    [rejected] = events(logs, "handshake.rejected")
    assert (403, provider) == (rejected["status"], rejected["provider"])
    assert rejected["credential"] in [row.credential_env for row in REGISTRY]


# Twilio and SignalWire speak one protocol: each other's streams are theirs alike.
OTHER_FORMAT = {name: next(other for other in PROVIDERS[i + 1:] + PROVIDERS[:i]
                           if {name, other} != {"twilio", "signalwire"})
                for i, name in enumerate(PROVIDERS)}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_on_auto_the_credential_that_admitted_the_upgrade_fixes_the_provider(
        provider: str, server: StreamServer, tmp_path: Path, logs: LogEvents) -> None:
    """An upgrade signed as one provider that streams another's format is refused (1008,
    stream.provider_mismatch naming both): never parsed as the other provider, never given
    the other's correlation id or stored context."""
    url = f"ws://127.0.0.1:{server.port}/auto"
    headers = upgrade_headers(provider, url, signing(tmp_path))
    other = load_fixture(FIXTURES / BUNDLED[OTHER_FORMAT[provider]])
    async with connect(url, additional_headers=list(headers.items())) as connection:
        with contextlib.suppress(ConnectionClosed):
            for frame in other.frames:
                await connection.send(frame.binary if frame.binary is not None
                                      else frame.text)
            await asyncio.wait_for(connection.recv(), 5)
    assert 1008 == connection.close_code
    assert "provider_mismatch" in (connection.close_reason or "")
    [mismatch] = events(logs, "stream.provider_mismatch")
    told = OTHER_FORMAT[provider]
    shown = "twilio or signalwire" if told in ("twilio", "signalwire") else told
    assert (provider, shown) == (mismatch["admitted_as"], mismatch["stream_format"])
    assert [] == events(logs, "stream.started")
    assert 'streamsvc_streams_refused_total{reason="provider_mismatch"} 1.0' in (
        server.metrics.render().decode())


async def test_server_listening_names_each_routes_check(tmp_path: Path,
                                                        logs: LogEvents) -> None:
    running = StreamServer(Settings(port=0, routes=(
        Route("/t", (), provider="twilio"), Route("/x", (), provider="exotel"),
        Route("/a", (), provider="auto")), exotel_basic_auth="k:t"))
    await running.start()
    await running.stop()
    [listening] = events(logs, "server.listening")
    assert {"/t": None, "/x": "Authorization: Basic",
            "/a": "any of: Authorization: Basic"} == listening["auth"]
    assert listening["signed"] is True
