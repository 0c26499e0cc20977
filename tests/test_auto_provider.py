"""``provider = "auto"``: every provider's bundled session at one route, told apart by its
upgrade and first message; Twilio's protocol without a credential naming the provider is
refused with the reason, and an auto route never lets an upgrade skip a configured check."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.handlers import HandlerSpec
from streamsvc.providers.auto import provider_from_message
from streamsvc.providers.plivo import NONCE_HEADER, SIGNATURE_V3_HEADER, sign_v3
from streamsvc.replay import replay, signature_headers
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
PUBLIC = "wss://voice.example.com"
TWILIO_TOKEN, TELNYX, SIGNALWIRE, EXOTEL, PLIVO = "tw", "tx", "sw", "key:secret", "pl"
VONAGE = "vg"


@pytest.mark.parametrize(("message", "provider"), [
    (b'{"kind":"AudioMetadata","audioMetadata":{}}', "acs"),
    (b'{"event":"connected","version":"1.0.0"}', "telnyx"),
    (b'{"event":"connected"}', "exotel"),
    (b'{"event":"start","start":{"callId":"c","streamId":"s"}}', "plivo"),
    (b'{"event":"media","stream_id":"s"}', "telnyx"),
    (b'{"event":"start","stream_sid":"s","start":{}}', "exotel"),
])
def test_the_first_message_names_its_provider(message: bytes, provider: str) -> None:
    assert provider == provider_from_message(message)


@pytest.mark.parametrize("message", [b'{"event":"connected","protocol":"Call"}',
                                     b'{"event":"start","streamSid":"MZ","start":{}}'])
def test_twilios_protocol_alone_is_ambiguous(message: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="ambiguous provider"):
        provider_from_message(message)


@pytest.fixture
async def guarded(transport: str) -> AsyncIterator[StreamServer]:
    """An auto route with every provider's credential configured."""
    server = StreamServer(Settings(
        port=0, transport=transport, public_url=PUBLIC, auth_token=TWILIO_TOKEN,
        telnyx_stream_token=TELNYX, signalwire_token=SIGNALWIRE, exotel_basic_auth=EXOTEL,
        plivo_auth_token=PLIVO, vonage_token=VONAGE,
        routes=(Route("/any", (HandlerSpec("log", LogHandler),), bidirectional=True,
                      provider="auto"),)))
    await server.start()
    yield server
    await server.stop()


def credentials(provider: str, url: str) -> dict[str, str]:
    if provider == "telnyx":
        return {"x-telnyx-streaming-auth-token": TELNYX}
    if provider == "signalwire":
        return {"Authorization": f"Bearer {SIGNALWIRE}"}
    if provider == "exotel":
        return {"Authorization": "Basic " + base64.b64encode(EXOTEL.encode()).decode()}
    if provider == "plivo":
        return {SIGNATURE_V3_HEADER: sign_v3(PLIVO, f"{PUBLIC}/any", "n"), NONCE_HEADER: "n"}
    if provider == "vonage":
        return {"Authorization": f"Bearer {VONAGE}"}
    return signature_headers(url, TWILIO_TOKEN, PUBLIC)


@pytest.mark.parametrize("name", ["inbound_params.jsonl", "telnyx_params.jsonl",
                                  "signalwire_params.jsonl", "exotel_voicebot.jsonl",
                                  "plivo_stream.jsonl", "vonage_connect.jsonl"])
async def test_each_providers_session_is_told_apart_at_one_route(
        guarded: StreamServer, logs: LogEvents, name: str) -> None:
    fixture = load_fixture(FIXTURES / name)
    url = f"ws://127.0.0.1:{guarded.port}/any"
    report = await replay([fixture], url, speed=0,
                          headers=credentials(fixture.provider, url))
    assert 0 == report.failed, report.sessions[0].error
    await until(lambda: events(logs, "stream.stopped"))
    outcome = {event: events(logs, event)[0] for event in ("stream.started", "stream.stopped")}
    assert fixture.provider == outcome["stream.started"]["provider"]
    assert [] == differences(report.sessions[0].expect, outcome)


async def test_an_upgrade_without_any_credential_is_refused_on_a_guarded_auto_route(
        guarded: StreamServer, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "telnyx_params.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{guarded.port}/any", speed=0)
    assert "HTTP 403" in (report.sessions[0].error or "")
    assert "missing_token" == events(logs, "handshake.rejected")[0]["reason"]


@pytest.fixture
async def open_route(transport: str) -> AsyncIterator[StreamServer]:
    """An auto route on a server with no credential configured (loopback, tests)."""
    server = StreamServer(Settings(
        port=0, transport=transport, start_timeout_s=0.5,
        routes=(Route("/any", (HandlerSpec("log", LogHandler),), provider="auto"),)))
    await server.start()
    yield server
    await server.stop()


async def test_acs_is_told_from_its_upgrade_headers(open_route: StreamServer,
                                                    logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "acs_mixed.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{open_route.port}/any", speed=0)
    assert 0 == report.failed, report.sessions[0].error
    await until(lambda: events(logs, "stream.stopped"))
    assert "acs" == events(logs, "stream.started")[0]["provider"]


async def test_twilios_protocol_unsigned_is_refused_with_the_reason(
        open_route: StreamServer, logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")
    await replay([fixture], f"ws://127.0.0.1:{open_route.port}/any", speed=0)
    await until(lambda: events(logs, "stream.bad_frame"))
    assert "ambiguous provider" in events(logs, "stream.bad_frame")[0]["reason"]
    assert [] == events(logs, "stream.started")


async def test_a_credential_of_a_provider_with_no_check_configured_is_refused(
        transport: str, logs: LogEvents) -> None:
    # Only Exotel's credential is configured: a stray bearer token (SignalWire's or
    # Vonage's, neither checked here) must not open the auto route.
    server = StreamServer(Settings(
        port=0, transport=transport, exotel_basic_auth=EXOTEL,
        routes=(Route("/any", (HandlerSpec("log", LogHandler),), provider="auto"),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "vonage_connect.jsonl")
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/any", speed=0,
                              headers={"Authorization": "Bearer anything"})
    finally:
        await server.stop()
    assert "HTTP 403" in (report.sessions[0].error or "")
    assert "missing_token" == events(logs, "handshake.rejected")[0]["reason"]
