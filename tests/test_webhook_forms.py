"""The voice webhook answers in each provider's own form (the registry row's ``webhook``):
TwiML, cXML, TeXML, Plivo XML, Exotel's dynamic endpoint JSON, the NCCO; ACS and auto routes
say why they have none. The documents are parsed back, and the credential rules checked."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from xml.etree import ElementTree

import pytest

from streamsvc.config import Route, Settings
from streamsvc.providers import REGISTRY
from streamsvc.providers.signature import sign
from streamsvc.server import StreamServer
from streamsvc.web.answers import exotel_endpoint, plivo_xml

from .conftest import LogEvents, events

PUBLIC = "https://voice.example.com"
SIGNING_KEY = "PSK-signalwire"


def routes() -> tuple[Route, ...]:
    return (*(Route(f"/{row.name}", (), provider=row.name) for row in REGISTRY),
            Route("/plivo-talk", (), provider="plivo", bidirectional=True),
            Route("/telnyx-talk", (), provider="telnyx", bidirectional=True))


@pytest.fixture
async def server() -> AsyncIterator[StreamServer]:
    running = StreamServer(Settings(port=0, routes=routes(), public_url=PUBLIC))
    await running.start()
    yield running
    await running.stop()


def post(port: int, target: str, fields: dict[str, str],
         headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{target}", data=urllib.parse.urlencode(fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def answer(server: StreamServer, target: str, fields: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(post, server.port, target, fields or {}, headers)


def stream_of(document: bytes) -> ElementTree.Element:
    found = ElementTree.fromstring(document).find(".//Stream")
    assert found is not None
    return found


def test_every_provider_has_a_form_or_says_why_not() -> None:
    assert {"twilio": "twiml", "signalwire": "cxml", "telnyx": "texml", "plivo": "plivo",
            "exotel": "exotel", "vonage": "ncco", "acs": None, "genesys": None,
            "asterisk": None, "jambonz": None, "auto": None} == {
        row.name: row.webhook for row in REGISTRY}


async def test_twilio_and_telnyx_get_twiml_with_the_context_as_parameters(
        server: StreamServer) -> None:
    for provider in ("twilio", "telnyx", "signalwire"):
        status, kind, body = await answer(server, f"/twiml/{provider}?customerId=cus_1",
                                          {"CallSid": "CA1", "From": "+1555"})
        assert (200, "application/xml") == (status, kind)
        stream = stream_of(body)
        assert "wss://voice.example.com/" + provider == stream.get("url")
        assert {"customerId": "cus_1", "From": "+1555", "CallSid": "CA1"} == {
            p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        assert stream.get("authBearerToken") is None


async def test_a_bidirectional_telnyx_route_asks_for_rtp(server: StreamServer) -> None:
    _, _, body = await answer(server, "/twiml/telnyx-talk", {"CallSid": "v3:1"})
    assert "rtp" == stream_of(body).get("bidirectionalMode")


async def test_plivo_gets_its_stream_xml_with_extra_headers(server: StreamServer) -> None:
    status, kind, body = await answer(server, "/twiml/plivo-talk?userId=12345&tier=gold!",
                                      {"CallUUID": "c1", "From": "14155550100"})
    assert (200, "application/xml") == (status, kind)
    stream = stream_of(body)
    assert ("wss://voice.example.com/plivo-talk", "true", "true", "audio/x-mulaw;rate=8000",
            "tier=gold,userId=12345,From=14155550100") == (
        stream.text, stream.get("bidirectional"), stream.get("keepCallAlive"),
        stream.get("contentType"), stream.get("extraHeaders"))


async def test_exotel_gets_its_dynamic_endpoint(server: StreamServer) -> None:
    status, kind, body = await answer(
        server, "/twiml/exotel?a=1&b=2&c=3&d=4", {"CallSid": "CA9", "CallFrom": "0987"})
    assert (200, "application/json") == (status, kind)
    url = urllib.parse.urlsplit(json.loads(body)["url"])
    assert ("wss", "voice.example.com", "/exotel") == (url.scheme, url.netloc, url.path)
    assert {"a": ["1"], "b": ["2"], "c": ["3"]} == urllib.parse.parse_qs(url.query)


@pytest.mark.parametrize(("provider", "reason"), [
    ("acs", "acs_answers_through_acs_events"), ("auto", "no_webhook_form_for_an_auto_route")])
async def test_acs_and_auto_routes_have_no_webhook_and_say_why(
        server: StreamServer, logs: LogEvents, provider: str, reason: str) -> None:
    status, _, body = await answer(server, f"/twiml/{provider}", {"CallSid": "CA1"})
    assert 404 == status
    assert reason in body.decode()
    assert reason == events(logs, "webhook.rejected")[0]["reason"]


def test_plivo_extra_headers_keep_letters_and_digits_within_512_bytes() -> None:
    context = {"user-id": "12 345", "empty": "!!!", **{f"k{i}": "v" * 40 for i in range(20)}}
    result = plivo_xml("wss://h/p", context, bidirectional=False)
    headers = stream_of(result.body).get("extraHeaders") or ""
    assert len(headers.encode()) <= 512
    assert headers.startswith("userid=12345,k0=")
    assert "empty" in result.left_out
    assert all(part.replace("=", "").isalnum() for part in headers.split(","))


def test_exotel_keeps_three_parameters_within_256_characters() -> None:
    result = exotel_endpoint("wss://h/e", {"a": "x" * 260, "b": "1", "c": "2", "d": "3", "e": "4"},
                             credentials="key:to ken")
    url = json.loads(result.body)["url"]
    assert url.startswith("wss://key:to%20ken@h/e?")
    assert {"b": "1", "c": "2", "d": "3"} == result.parameters
    assert ("a", "e") == result.left_out


async def test_signalwire_cxml_carries_the_token_only_to_requests_signed_with_the_key(
        logs: LogEvents) -> None:
    settings = Settings(port=0, routes=routes(), public_url=PUBLIC,
                        signalwire_token="sw-stream-token")
    alone = StreamServer(settings)
    await alone.start()
    try:  # the token without the signing key: nobody gets it
        status, _, body = await answer(alone, "/twiml/signalwire", {"CallSid": "CA1"})
    finally:
        await alone.stop()
    assert (403, False) == (status, b"sw-stream-token" in body)
    keyed = StreamServer(Settings(port=0, routes=routes(), public_url=PUBLIC,
                                  signalwire_token="sw-stream-token",
                                  signalwire_signing_key=SIGNING_KEY))
    await keyed.start()
    try:
        fields = {"CallSid": "CA1", "From": "+1555"}
        unsigned = await answer(keyed, "/twiml/signalwire", fields)
        signature = sign(SIGNING_KEY, f"{PUBLIC}/twiml/signalwire", fields.items())
        signed = await answer(keyed, "/twiml/signalwire", fields,
                              {"X-SignalWire-Signature": signature})
    finally:
        await keyed.stop()
    assert (403, False) == (unsigned[0], b"sw-stream-token" in unsigned[2])
    assert 200 == signed[0]
    assert "sw-stream-token" == stream_of(signed[2]).get("authBearerToken")
    assert ["no_signing_key_for_the_stream_token", "missing_signature"] == [
        line["reason"] for line in events(logs, "webhook.rejected")]


async def test_texml_is_refused_while_the_telnyx_stream_token_is_set() -> None:
    running = StreamServer(Settings(port=0, routes=routes(), public_url=PUBLIC,
                                    telnyx_stream_token="t-token"))
    await running.start()
    try:
        status, _, body = await answer(running, "/twiml/telnyx", {"CallSid": "v3:1"})
    finally:
        await running.stop()
    assert (403, False) == (status, b"t-token" in body)


async def test_exotel_hands_its_credential_back_only_to_a_request_carrying_it() -> None:
    running = StreamServer(Settings(port=0, routes=routes(), public_url=PUBLIC,
                                    exotel_basic_auth="key:secret"))
    await running.start()
    basic = "Basic " + base64.b64encode(b"key:secret").decode()
    try:
        stranger: Any = await answer(running, "/twiml/exotel", {"CallSid": "CA1"})
        exotel: Any = await answer(running, "/twiml/exotel", {"CallSid": "CA1"},
                                   {"Authorization": basic})
    finally:
        await running.stop()
    assert (403, False) == (stranger[0], b"secret" in stranger[2])
    assert 200 == exotel[0]
    assert json.loads(exotel[2])["url"].startswith("wss://key:secret@voice.example.com/")
