"""Signed handshakes, failing closed, and secrets kept out of logs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from twilio.request_validator import RequestValidator

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings, load_settings
from streamsvc.exceptions import ConfigError
from streamsvc.handlers import HandlerSpec
from streamsvc.providers.signature import sign
from streamsvc.replay import replay_session, signature_headers
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, events

FIXTURES = Path(__file__).parent.parent / "fixtures"
PUBLIC = "wss://example.ngrok.app"
TOKEN, PREVIOUS = "12345", "rotated-out-token"


def test_signature_agrees_with_twilios_own_validator() -> None:
    url = f"{PUBLIC}/media"
    validator = RequestValidator(TOKEN)
    assert validator.compute_signature(url, {}) == sign(TOKEN, url)
    assert validator.validate(url, {}, sign(TOKEN, url))
    assert "qAJ3tVzuyieOXZQE3PxbZnXhiQ8=" == sign(TOKEN, url)


@pytest.fixture
async def signed_server(transport: str) -> AsyncIterator[StreamServer]:
    route = Route("/media", (HandlerSpec("log", LogHandler),))
    server = StreamServer(Settings(port=0, routes=(route,), public_url=PUBLIC,
                                   auth_token=TOKEN, auth_token_previous=PREVIOUS,
                                   transport=transport))
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(
    ("headers", "outcome"),
    [
        pytest.param(lambda port: signature_headers(f"ws://127.0.0.1:{port}/media", TOKEN,
                                                    PUBLIC), None, id="good"),
        pytest.param(lambda port: signature_headers(f"ws://127.0.0.1:{port}/media", PREVIOUS,
                                                    PUBLIC), None, id="rotated-token"),
        pytest.param(lambda port: {}, "missing_signature", id="missing"),
        pytest.param(lambda port: {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
                     "bad_signature", id="bad"),
        pytest.param(lambda port: signature_headers(f"ws://127.0.0.1:{port}/other", TOKEN,
                                                    PUBLIC), "bad_signature", id="wrong-path"),
        pytest.param(lambda port: signature_headers(f"ws://127.0.0.1:{port}/media", "nope",
                                                    PUBLIC), "bad_signature", id="wrong-token"),
        pytest.param(lambda port: signature_headers(f"ws://127.0.0.1:{port}/media", TOKEN),
                     "bad_signature", id="signed-over-the-host-header"),
    ],
)
async def test_handshake_signature_matrix(signed_server: StreamServer, logs: LogEvents,
                                          headers: object, outcome: str | None) -> None:
    assert callable(headers)
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")
    result = await replay_session(fixture, f"ws://127.0.0.1:{signed_server.port}/media",
                                  speed=0, headers=headers(signed_server.port))
    if outcome is None:
        assert (True, None) == (result.ok, result.error)
        assert [] == events(logs, "handshake.rejected")
    else:
        assert (False, "handshake rejected: HTTP 403") == (result.ok, (result.error or "")[:28])
        (rejected,) = events(logs, "handshake.rejected")
        assert (outcome, 403, "/media") == (rejected["reason"], rejected["status"],
                                            rejected["path"])
        assert [] == events(logs, "stream.started")  # no session ever existed
        assert {outcome: 1} == dict(signed_server.metrics.handshakes_rejected)


async def test_secrets_never_reach_the_logs(signed_server: StreamServer,
                                            logs: LogEvents) -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    url = f"ws://127.0.0.1:{signed_server.port}/media"
    await replay_session(fixture, url, speed=0, headers=signature_headers(url, TOKEN, PUBLIC))
    await replay_session(fixture, url, speed=0,
                         headers=signature_headers(url, "wrong-token", PUBLIC))
    text = json.dumps(logs)
    assert "stream.started" in text
    assert "handshake.rejected" in text
    for secret in (TOKEN, PREVIOUS, sign(TOKEN, f"{PUBLIC}/media")):
        assert secret not in text
    assert TOKEN not in repr(signed_server.settings)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        pytest.param({"STREAMSVC_HOST": "0.0.0.0"}, "host", id="public-host-no-token"),
        pytest.param({"STREAMSVC_HOST": "::"}, "host", id="public-ipv6-host-no-token"),
        pytest.param({"TWILIO_AUTH_TOKEN": TOKEN}, "public_url", id="token-no-public-url"),
        pytest.param({"TWILIO_AUTH_TOKEN": TOKEN, "STREAMSVC_PUBLIC_URL": "ftp://x/y"},
                     "public_url", id="public-url-not-an-origin"),
    ],
)
def test_unsafe_settings_refuse_to_start(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert key == caught.value.key


@pytest.mark.parametrize("env", [
    {"STREAMSVC_HOST": "0.0.0.0", "STREAMSVC_INSECURE": "true"},
    {"STREAMSVC_HOST": "0.0.0.0", "TWILIO_AUTH_TOKEN": TOKEN,
     "STREAMSVC_PUBLIC_URL": PUBLIC},
    {"STREAMSVC_HOST": "127.0.0.1"},
    {"STREAMSVC_HOST": "localhost"},
])
def test_safe_settings_start(env: dict[str, str]) -> None:
    load_settings(env=env)


def test_serve_refuses_a_public_host_without_a_token_with_a_clear_message() -> None:
    command = [sys.executable, "-m", "streamsvc", "serve", "--host", "0.0.0.0", "--port", "0"]
    env = {"PATH": "/usr/bin:/bin"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert 2 == completed.returncode
    assert "no auth token is set" in completed.stderr
    assert "--insecure" in completed.stderr


def test_a_malformed_secret_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nauth_token = 987654321\n")  # a number, not a string
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=str(config), env={})
    assert "server.auth_token" == caught.value.key
    assert "987654321" not in str(caught.value)


@pytest.mark.parametrize(("provider", "credential"), [
    ("telnyx", {"STREAMSVC_TELNYX_STREAM_TOKEN": "t"}),
    ("signalwire", {"STREAMSVC_SIGNALWIRE_TOKEN": "t"}),
    ("exotel", {"STREAMSVC_EXOTEL_BASIC_AUTH": "k:t"}),
    ("plivo", {"PLIVO_AUTH_TOKEN": "t", "STREAMSVC_PUBLIC_URL": PUBLIC}),
    ("vonage", {"VONAGE_SIGNATURE_SECRET": "s"}),
    ("auto", {"STREAMSVC_VONAGE_TOKEN": "t"})])
def test_a_public_host_needs_each_routes_provider_credential(
        tmp_path: Path, provider: str, credential: dict[str, str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[routes]]\npath = "/p"\nprovider = "{provider}"\n')
    env = {"STREAMSVC_CONFIG": str(config), "STREAMSVC_HOST": "0.0.0.0"}
    with pytest.raises(ConfigError, match="checks no credential"):
        load_settings(env=env)
    load_settings(env={**env, **credential})
    load_settings(env={**env, "STREAMSVC_INSECURE": "true"})


def test_a_public_vonage_route_with_a_custom_token_needs_the_signature_secret(
        tmp_path: Path) -> None:
    """The answer URL could not tell Vonage from a stranger asking for the token."""
    config = tmp_path / "c.toml"
    config.write_text('[[routes]]\npath = "/v"\nprovider = "vonage"\n')
    env = {"STREAMSVC_CONFIG": str(config), "STREAMSVC_HOST": "0.0.0.0",
           "STREAMSVC_VONAGE_TOKEN": "t"}
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert "vonage_signature_secret" == caught.value.key
    load_settings(env={**env, "VONAGE_SIGNATURE_SECRET": "s"})
    load_settings(env={**env, "STREAMSVC_INSECURE": "true"})


def test_a_public_host_that_answers_acs_calls_needs_the_events_secret() -> None:
    env = {"STREAMSVC_HOST": "0.0.0.0", "TWILIO_AUTH_TOKEN": TOKEN,
           "STREAMSVC_PUBLIC_URL": PUBLIC,
           "ACS_CONNECTION_STRING": "endpoint=https://x.communication.azure.com/;accesskey=a2V5"}
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert "acs_events_secret" == caught.value.key
    load_settings(env={**env, "STREAMSVC_ACS_EVENTS_SECRET": "s"})
