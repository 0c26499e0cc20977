"""Handing a call to a person with its context, end to end: a <Connect> call through the
voice webhook (its query as context), the caller presses 0 at a route with the ``handoff``
handler, the <Connect action> answers with <Dial><Client> carrying the context (the call id
first, within the limits), and the agent's app reads the rest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.server
import json
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from streamsvc.config import Route, Settings, load_settings
from streamsvc.context.handoff import CALL_ID_NAME, HandOffMapping
from streamsvc.exceptions import LocalProtocolError
from streamsvc.fleet import Fleet, FleetError
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers.signature import SIGNATURE_HEADER, sign
from streamsvc.replay import replay, write_acs_keys
from streamsvc.replay.call import replay_call, stream_verb
from streamsvc.replay.fixture import Fixture, FixtureFrame, dump_fixture, load_fixture
from streamsvc.server import StreamServer

from .conftest import BUNDLED, LogEvents, events, until
from .fleet_support import RedisServer
from .test_acs_events import AcsStandIn, self_signed
from .test_conformance import PROVIDERS, SECRETS, read_context, signing
from .test_replay_cli import Server, streamsvc

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "twilio-token"
PUBLIC = "https://voice.example.com"
CONTEXT_TOKEN = "context-api-token"


def pressing_zero() -> Fixture:
    """The bundled <Connect> session (keys 4, 2, #), with 0 pressed instead of #."""
    fixture = load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl")
    frames = []
    for frame in fixture.frames:
        text = frame.text
        if text is not None and '"dtmf"' in text:
            message = json.loads(text)
            if message.get("dtmf", {}).get("digit") == "#":
                message["dtmf"]["digit"] = "0"
                text = json.dumps(message)
        frames.append(FixtureFrame(frame.at_ms, text, frame.binary))
    return Fixture(**{**{f: getattr(fixture, f) for f in fixture.__slots__},
                      "frames": tuple(frames)})


@pytest.fixture
async def server(transport: str, tmp_path: Path) -> StreamServer:
    handoff = resolve_handler("handoff", {"to": "client:support", "on_dtmf": "0"},
                              key="handlers")
    dtmf = resolve_handler("dtmf", {}, key="handlers")
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="handlers")
    running = StreamServer(Settings(
        port=0, transport=transport, auth_token=TOKEN, public_url=PUBLIC,
        context_api_token=CONTEXT_TOKEN,
        routes=(Route("/connect", (dtmf, recorder, handoff), bidirectional=True,
                      handoff=HandOffMapping(priority=("intent",))),
                Route("/stream", (handoff,)))))
    await running.start()
    yield running  # type: ignore[misc]
    await running.stop()


async def test_pressing_0_hands_the_call_to_a_client_with_its_context(
        server: StreamServer, logs: LogEvents) -> None:
    notes = "n" * 300  # over a Client parameter's 128 bytes: cut
    legs = await replay_call(
        pressing_zero(),
        f"http://127.0.0.1:{server.port}/twiml/connect?customerID=cus_8812&intent=billing"
        f"&notes={notes}",
        speed=0, auth_token=TOKEN, public_url=PUBLIC,
        stream_url=f"ws://127.0.0.1:{server.port}/connect")
    [leg] = legs
    assert leg.result.ok, leg.result.error
    assert leg.hand_off is not None
    root = ElementTree.fromstring(leg.hand_off)
    assert "support" == root.findtext("./Dial/Client/Identity")
    parameters = [(p.attrib["name"], p.attrib["value"]) for p in root.iter("Parameter")]
    call_sid = leg.result.call_sid
    assert [(CALL_ID_NAME, call_sid), ("intent", "billing")] == parameters[:2]
    assert ("customerID", "cus_8812") in parameters
    assert ("notes", "n" * 128) in parameters
    await until(lambda: events(logs, "stream.stopped"))
    [stopped] = events(logs, "stream.stopped")
    [handed] = events(logs, "call.handed_off")
    assert ("handed_off", "client:support", "connect_action") == (
        stopped["reason"], handed["target"], handed["mechanism"])
    assert ["notes"] == handed["truncated"]
    hand_off = stopped["hand_off"]
    assert ("twiml" not in hand_off, CALL_ID_NAME) == (True, hand_off["sent"][0])
    assert 0 < hand_off["media_ms"]
    sidecar = json.loads(Path(stopped["handlers"]["recorder"]["file"]).with_suffix(
        ".json").read_text())
    assert hand_off == sidecar["summary"]["hand_off"]
    assert stopped["handlers"]["handoff"]["ok"] is True
    assert 0 < stopped["handlers"]["handoff"]["pressed_at_ms"]
    assert call_sid is not None
    status, answer = await asyncio.to_thread(read_context, server.port, call_sid,
                                             CONTEXT_TOKEN)
    assert 200 == status
    [entry] = answer["hand_offs"]
    assert ("client:support", "answered") == (entry["target"], entry["status"])
    assert notes == answer["context"]["notes"]  # whole for the agent's app
    assert 'streamsvc_hand_offs_total{mechanism="connect_action",outcome="ok",' \
           'provider="twilio"} 1.0' in server.metrics.render().decode()

    # Twilio reports the agent's leg, then asks what next: the agent did not answer, and
    # the caller goes back to the route's stream with the call's context.
    client = root.find("./Dial/Client")
    dial = root.find("./Dial")
    assert client is not None
    assert dial is not None
    assert "initiated ringing answered completed" == client.attrib["statusCallbackEvent"]
    for status in ("initiated", "ringing", "no-answer"):
        assert 204 == (await asyncio.to_thread(signed_post, server.port,
                                               client.attrib["statusCallback"], {
            "CallSid": "CA-agent-leg", "ParentCallSid": call_sid, "CallStatus": status}))[0]
    status, back = await asyncio.to_thread(signed_post, server.port, dial.attrib["action"], {
        "CallSid": call_sid, "DialCallStatus": "no-answer",
        "DialSipHeader_X-Reason": "agent away"})
    assert 200 == status
    verb = stream_verb(back)
    assert verb is not None
    assert verb.connect
    assert "no-answer" == verb.parameters["hand_off_status"]
    assert ["initiated", "ringing", "no-answer"] == [
        line["call_status"] for line in events(logs, "call.hand_off_progress")]
    [ended] = events(logs, "call.hand_off_ended")
    assert ("no-answer", "stream", ["sip_Reason"]) == (
        ended["dial_status"], ended["next"], ended["learned"])
    _, answer = await asyncio.to_thread(read_context, server.port, call_sid, CONTEXT_TOKEN)
    [entry] = answer["hand_offs"]
    assert ["initiated", "ringing", "no-answer"] == [p["status"] for p in entry["progress"]]
    assert ("no-answer", "agent away", "no-answer") == (
        entry["dial_status"], answer["context"]["sip_Reason"],
        answer["context"]["hand_off_status"])


def signed_post(port: int, url: str, fields: dict[str, str]) -> tuple[int, str]:
    """POST ``fields`` to the service's public ``url`` as Twilio does (signed)."""
    parts = urllib.parse.urlsplit(url)
    local = f"http://127.0.0.1:{port}{parts.path}?{parts.query}"
    request = urllib.request.Request(local, data=urllib.parse.urlencode(fields).encode(),
                                     method="POST", headers={
                                         "Content-Type": "application/x-www-form-urlencoded",
                                         SIGNATURE_HEADER: sign(TOKEN, url, fields.items())})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode()


async def test_a_start_route_says_why_it_cannot_hand_off_and_the_call_goes_on(
        server: StreamServer, logs: LogEvents) -> None:
    legs = await replay_call(
        pressing_zero(), f"http://127.0.0.1:{server.port}/twiml/stream?customerID=c1",
        speed=0, auth_token=TOKEN, public_url=PUBLIC,
        stream_url=f"ws://127.0.0.1:{server.port}/stream")
    [leg] = legs
    assert leg.result.ok, leg.result.error
    assert leg.hand_off is None
    await until(lambda: events(logs, "stream.stopped"))
    [failed] = events(logs, "call.hand_off_failed")
    assert "<Start>" in failed["reason"]
    [stopped] = events(logs, "stream.stopped")
    assert ("stop", False) == (stopped["reason"], stopped["handlers"]["handoff"]["ok"])


def test_a_session_off_a_server_cannot_hand_off() -> None:
    session = LiveSession(wake=lambda: None)
    with pytest.raises(LocalProtocolError, match="not on a running server"):
        session.hand_off("client:support")


def test_the_handoff_handler_refuses_a_bad_configuration() -> None:
    for options in ({"to": "support"}, {"to": "client:a", "on_dtmf": "00"},
                    {"to": "client:a", "include": "intent"}):
        with pytest.raises(Exception, match=r"to|on_dtmf|include|target"):
            resolve_handler("handoff", options, key="handlers")


def test_the_docs_handoff_configuration_loads(tmp_path: Path) -> None:
    page = (Path(__file__).parent.parent / "docs" / "context.md").read_text(encoding="utf-8")
    [text] = [block.split("```", 1)[0] for block in page.split("```toml\n")[1:]]
    config = tmp_path / "streamsvc.toml"
    config.write_text(text)
    settings = load_settings(config_path=str(config), env={})
    [route] = settings.routes
    assert (("customerID", "intent", "account"), ("account",), {"intent": "Intent"}) == (
        route.handoff.include, route.handoff.priority, dict(route.handoff.rename))
    assert ["handoff"] == [spec.name for spec in route.handlers]
    assert {"to": "client:support", "on_dtmf": "0"} == dict(route.handlers[0].options)


async def test_a_worker_hands_off_a_call_live_on_another_instance(
        tmp_path: Path, transport: str, logs: LogEvents) -> None:
    """Fleet.hand_off by the call's id, from any process: the instance with the stream hands
    it off, and the action request, reaching the other instance, is answered from Redis."""
    store = RedisServer(tmp_path)
    store.start()
    route = (Route("/connect", (), bidirectional=True),)
    servers = [StreamServer(Settings(port=0, transport=transport, auth_token=TOKEN,
                                     public_url=PUBLIC, redis_url=store.url, instance_id=name,
                                     routes=route)) for name in ("a", "b")]
    for running in servers:
        await running.start()
    a, b = servers
    try:
        call = asyncio.ensure_future(replay_call(
            load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl"),
            f"http://127.0.0.1:{b.port}/twiml/connect?customerID=cus_8812", speed=2,
            auth_token=TOKEN, public_url=PUBLIC,
            stream_url=f"ws://127.0.0.1:{a.port}/connect"))
        await until(lambda: events(logs, "stream.started"))
        call_sid = events(logs, "stream.started")[0]["call_sid"]
        async with Fleet(store.url) as fleet:
            with pytest.raises(FleetError, match="no live call"):
                await fleet.hand_off("CA-nobody", "client:x")
            for _ in range(100):  # the call's index reaches Redis through the buffer
                with contextlib.suppress(FleetError):
                    result = await fleet.hand_off(call_sid, "sip:agent@pbx.example.com")
                    break
                await asyncio.sleep(0.02)
        [leg] = await call
    finally:
        for running in servers:
            await running.stop()
        store.stop()
    assert result.ok, result.error
    assert (CALL_ID_NAME, call_sid) == next(iter(result.sent.items()))
    assert "customerID" in result.sent
    assert leg.hand_off is not None
    uri = ElementTree.fromstring(leg.hand_off).findtext("./Dial/Sip") or ""
    assert uri.startswith("sip:agent@pbx.example.com?X-streamsvc_call=" + call_sid)
    assert "X-customerID=cus_8812" in uri
    [served] = events(logs, "twiml.hand_off_served")
    assert call_sid == served["call_sid"]


async def test_a_missed_agent_can_leave_the_routes_own_twiml(transport: str,
                                                             logs: LogEvents) -> None:
    running = StreamServer(Settings(
        port=0, transport=transport, auth_token=TOKEN, public_url=PUBLIC,
        routes=(Route("/connect", (), bidirectional=True, handoff=HandOffMapping(
            on_no_answer="<Say>Please leave a message.</Say><Record/>")),)))
    await running.start()
    try:
        status, answer = await asyncio.to_thread(
            signed_post, running.port, f"{PUBLIC}/twiml/connect?streamsvc_action=dial",
            {"CallSid": "CA1", "DialCallStatus": "busy"})
        _, after_answered = await asyncio.to_thread(
            signed_post, running.port, f"{PUBLIC}/twiml/connect?streamsvc_action=dial",
            {"CallSid": "CA1", "DialCallStatus": "completed"})
    finally:
        await running.stop()
    assert 200 == status
    assert "<Response><Say>Please leave a message.</Say><Record/></Response>" in answer
    assert after_answered.endswith("<Response></Response>")  # the agent took it: it ends
    assert ["twiml", "ends"] == [line["next"] for line in events(logs, "call.hand_off_ended")]


ACCOUNT = "AC00000000000000000000000000000001"  # the bundled sessions' account


class JsonStandIn:
    """A platform's API on loopback: records each request (method, path, headers, body: a
    form's fields or JSON) and answers ``status`` with ``answer`` (JSON)."""

    def __init__(self, answer: object, status: int = 200, *,
                 tls_dir: Path | None = None) -> None:
        self.requests: list[dict[str, object]] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                form = "form-urlencoded" in self.headers.get("Content-Type", "")
                stand_in.requests.append({
                    "method": "POST", "path": self.path,
                    "headers": dict(self.headers.items()),
                    "body": dict(urllib.parse.parse_qsl(body.decode())) if form
                    else json.loads(body or b"null")})
                self.answer()

            def do_PUT(self) -> None:
                self.do_POST()
                stand_in.requests[-1]["method"] = "PUT"

            def answer(self) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        self.ca_file: Path | None = None
        if tls_dir is not None:  # served over TLS with a certificate of its own
            self.ca_file, key_file = self_signed(tls_dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.ca_file, key_file)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("variant", ["inline", "api_key", "by_url", "refused"])
async def test_a_start_route_hands_off_through_twilios_rest_api(
        variant: str, transport: str, logs: LogEvents) -> None:
    """The official SDK's real request reaches a stand-in: the call's update with the
    hand-off's TwiML inline, with an API key instead of the auth token, by url= when over
    the inline limit (the service then answers Twilio's fetch), or refused by Twilio."""
    stand_in = JsonStandIn(
        {"code": 20404, "message": "The requested resource was not found", "status": 404}
        if variant == "refused" else
        {"sid": "CA00000000000000000000000000000103", "account_sid": ACCOUNT,
         "status": "in-progress"}, 404 if variant == "refused" else 200)
    handoff = resolve_handler("handoff", {"to": "client:support", "on_dtmf": "0"},
                              key="handlers")
    keys = ({"twilio_api_key": "SK" + "1" * 32, "twilio_api_secret": "api-secret"}
            if variant == "api_key" else {})
    running = StreamServer(Settings(
        port=0, transport=transport, auth_token=TOKEN, public_url=PUBLIC,
        twilio_account_sid=ACCOUNT, twilio_api_base_url=stand_in.url, **keys,
        routes=(Route("/stream", (handoff,), handoff=HandOffMapping(
            twiml_chars=200 if variant == "by_url" else 4000)),)))
    await running.start()
    try:
        [leg] = await replay_call(
            pressing_zero(), f"http://127.0.0.1:{running.port}/twiml/stream?customerID=c1",
            speed=0, auth_token=TOKEN, public_url=PUBLIC,
            stream_url=f"ws://127.0.0.1:{running.port}/stream")
        await until(lambda: events(logs, "stream.stopped"))
        fetched = None
        if variant == "by_url":
            form = stand_in.requests[0]["body"]
            assert isinstance(form, dict)
            fetched = (await asyncio.to_thread(signed_post, running.port, form["Url"],
                                               {"CallSid": leg.result.call_sid or ""}))[1]
    finally:
        await running.stop()
        stand_in.close()
    assert leg.result.ok, leg.result.error
    call_sid = leg.result.call_sid
    [request] = stand_in.requests
    method, path, form = request["method"], request["path"], request["body"]
    assert isinstance(form, dict)
    authorization = request["headers"]["Authorization"]  # type: ignore[index]
    assert ("POST", f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{call_sid}.json") == (method, path)
    user = "SK" + "1" * 32 if variant == "api_key" else ACCOUNT
    secret = "api-secret" if variant == "api_key" else TOKEN
    assert authorization == "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
    [stopped] = events(logs, "stream.stopped")
    if variant == "refused":
        [failed] = events(logs, "call.hand_off_failed")
        assert "Twilio answered 404" in failed["reason"]
        assert (False, "failed") == (stopped["handlers"]["handoff"]["ok"],
                                     stopped["hand_off"]["status"])
        return
    twiml = fetched if variant == "by_url" else form["Twiml"]
    assert twiml is not None
    root = ElementTree.fromstring(twiml)
    assert "support" == root.findtext("./Dial/Client/Identity")
    parameters = {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}
    assert (call_sid, "c1") == (parameters[CALL_ID_NAME], parameters["customerID"])
    if variant == "by_url":
        assert form["Url"].endswith("/twiml/stream?streamsvc_action=hand_off")
        assert "POST" == form["Method"]
    [handed] = events(logs, "call.handed_off")
    assert ("call_update", "url" if variant == "by_url" else "inline") == (
        handed["mechanism"], handed["twiml"])
    assert "stop" == stopped["reason"]  # a <Start> stream goes on until the call ends


@pytest.mark.parametrize(("to", "headers"), [("tel:+15550100", "sipHeaders"),
                                             ("acs:8:acs:agent-0001", "voipHeaders")])
async def test_an_acs_call_is_transferred_with_its_context_as_custom_calling_context(
        to: str, headers: str, tmp_path: Path, transport: str, logs: LogEvents) -> None:
    """Call Automation's transfer, through the official SDK, reaches a stand-in that checks
    its signature: SIP X-MS-Custom- headers to a number, VoIP headers to an ACS user; ACS's
    CallTransferAccepted callback then marks the hand-off accepted."""
    stand_in = AcsStandIn(tmp_path, tls=False)
    handoff = resolve_handler("handoff", {"to": to, "on_dtmf": "2"}, key="handlers")
    running = StreamServer(Settings(
        port=0, transport=transport, public_url=PUBLIC, context_api_token=CONTEXT_TOKEN,
        acs_connection_string=stand_in.connection_string,
        routes=(Route("/acs", (handoff,), provider="acs"),)))
    await running.start()
    fixture = load_fixture(FIXTURES / "acs_dtmf_gap.jsonl")  # keys 1, 2, #
    correlation = fixture.headers["x-ms-call-correlation-id"]
    try:
        report = await replay([fixture], f"ws://127.0.0.1:{running.port}/acs", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: events(logs, "stream.stopped"))
        accepted = {"type": "Microsoft.Communication.CallTransferAccepted", "data": {
            "callConnectionId": fixture.headers["x-ms-call-connection-id"],
            "correlationId": correlation,
            "operationContext": f"streamsvc-hand-off:{correlation}"}}
        status, _ = await asyncio.to_thread(post_json, running.port, "/acs/callbacks",
                                            [accepted])
        await until(lambda: events(logs, "call.hand_off_progress"))
        await asyncio.sleep(0.05)
        _, answer = await asyncio.to_thread(read_context, running.port, correlation,
                                            CONTEXT_TOKEN)
    finally:
        await running.stop()
        stand_in.http.shutdown()
        stand_in.http.server_close()
    [request] = stand_in.requests
    connection = fixture.headers["x-ms-call-connection-id"]
    assert request["path"].startswith(
        f"/calling/callConnections/{connection}:transferToParticipant?api-version=")
    assert request["signed"]
    body = request["body"]
    assert f"streamsvc-hand-off:{correlation}" == body["operationContext"]
    sent = body["customCallingContext"][headers]
    name = "X-MS-Custom-streamsvc_call" if headers == "sipHeaders" else "streamsvc_call"
    assert correlation == sent[name]
    assert 200 <= status < 300
    [handed] = events(logs, "call.handed_off")
    assert ("acs_transfer", to) == (handed["mechanism"], handed["target"])
    [entry] = answer["hand_offs"]
    assert "accepted" == entry["status"]


def post_json(port: int, path: str, body: object) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode()


CONFIG = """
[[routes]]
path = "/connect"
bidirectional = true
handlers = ["handoff"]

[handlers.handoff]
to = "client:support"
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Server]:
    config = tmp_path / "streamsvc.toml"
    config.write_text(CONFIG)
    running = Server(tmp_path / "server.log", {
        "STREAMSVC_CONFIG": str(config), "TWILIO_AUTH_TOKEN": TOKEN,
        "STREAMSVC_PUBLIC_URL": PUBLIC})
    yield running
    running.stop()


def test_replay_webhook_reports_the_hand_off_and_what_it_carried(
        served: Server, tmp_path: Path) -> None:
    fixture = tmp_path / "zero.jsonl"
    zero = pressing_zero()
    fixture.write_text(dump_fixture(zero.header, zero.frames))
    done = streamsvc("replay", str(fixture), "--webhook",
                     f"http://127.0.0.1:{served.port}/twiml/connect?customerID=cus_8812",
                     "--url", served.url("/connect"), "--speed", "0", "--auth-token", TOKEN,
                     "--public-url", PUBLIC, "--json")
    assert 0 == done.returncode, done.stdout + done.stderr
    [hand_off] = json.loads(done.stdout)["hand_offs"]
    assert "client:support" == hand_off["target"]
    assert [CALL_ID_NAME, hand_off["call_sid"]] == list(next(iter(
        hand_off["parameters"].items())))
    assert "cus_8812" == hand_off["parameters"]["customerID"]
    text = streamsvc("replay", str(fixture), "--webhook",
                     f"http://127.0.0.1:{served.port}/twiml/connect", "--url",
                     served.url("/connect"), "--speed", "0", "--auth-token", TOKEN,
                     "--public-url", PUBLIC)
    assert "hand-off: " in text.stdout
    assert "-> client:support (streamsvc_call" in text.stdout


def test_replay_check_compares_an_expected_hand_off(served: Server, tmp_path: Path) -> None:
    zero = pressing_zero()
    fixture = tmp_path / "expects-a-hand-off.jsonl"
    expected = {"call_sid": zero.expect["call_sid"], "reason": "handed_off",
                "hand_off": {"target": "client:support", "mechanism": "connect_action"}}
    fixture.write_text(dump_fixture({**zero.header, "expect": expected}, zero.frames))
    signed = ("--auth-token", TOKEN, "--public-url", PUBLIC)
    done = streamsvc("replay", str(fixture), "--url", served.url("/connect"), "--speed", "0",
                     "--check", "--log", str(served.log), *signed)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "matched 1" in done.stdout
    wrong = tmp_path / "expects-another.jsonl"
    wrong.write_text(dump_fixture({**zero.header, "expect": {
        **expected, "hand_off": {"target": "client:sales"}}}, zero.frames))
    done = streamsvc("replay", str(wrong), "--url", served.url("/connect"), "--speed", "0",
                     "--check", "--log", str(served.log), *signed)
    assert 1 == done.returncode
    assert 'hand_off.target: expected "client:sales"' in done.stdout


async def play_whole_call(running: StreamServer, fixture_name: str, path: str,
                          logs: LogEvents, stand_in: JsonStandIn) -> Fixture:
    """Start ``running``, replay a bundled session at ``path`` to its end (its summary
    logged), then stop the server and the platform's stand-in; the fixture played."""
    await running.start()
    fixture = load_fixture(FIXTURES / fixture_name)
    try:
        report = await replay([fixture], f"ws://127.0.0.1:{running.port}{path}", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await running.stop()
        stand_in.close()
    return fixture


@pytest.mark.parametrize("status", [200, 422])
async def test_a_telnyx_call_is_transferred_with_its_context_as_sip_headers(
        status: int, transport: str, logs: LogEvents) -> None:
    """Call Control's transfer through the official SDK, checked by a stand-in: the call
    control id, the API key, the X- headers (the call's id first) and client_state."""
    answer = ({"data": {"result": "ok"}} if status == 200 else
              {"errors": [{"code": "90018", "title": "Call has already ended"}]})
    stand_in = JsonStandIn(answer, status)
    handoff = resolve_handler("handoff", {"to": "sip:agent@pbx.example.com", "on_dtmf": "2"},
                              key="handlers")
    running = StreamServer(Settings(
        port=0, transport=transport, telnyx_api_key="KEY-telnyx",
        telnyx_api_base_url=stand_in.url + "/v2",
        routes=(Route("/telnyx", (handoff,), provider="telnyx"),)))
    fixture = await play_whole_call(running, "telnyx_params.jsonl", "/telnyx", logs,
                                    stand_in)  # keys 1, 2
    control_id = fixture.expect["call_sid"]
    request = stand_in.requests[0]
    assert f"/v2/calls/{control_id}/actions/transfer" == request["path"]
    assert "Bearer KEY-telnyx" == request["headers"]["Authorization"]  # type: ignore[index]
    body = request["body"]
    assert isinstance(body, dict)
    assert "sip:agent@pbx.example.com" == body["to"]
    assert {"name": f"X-{CALL_ID_NAME}", "value": control_id} == body["custom_headers"][0]
    assert control_id == json.loads(base64.b64decode(body["client_state"]))[CALL_ID_NAME]
    if status == 200:
        [handed] = events(logs, "call.handed_off")
        assert "telnyx_transfer" == handed["mechanism"]
    else:
        [failed] = events(logs, "call.hand_off_failed")
        assert "Call has already ended" in failed["reason"]


@pytest.mark.parametrize("to", ["sip:agent@pbx.example.com", "tel:+15550100"])
async def test_a_vonage_call_is_transferred_to_an_ncco_that_connects_the_agent(
        to: str, tmp_path: Path, transport: str, logs: LogEvents,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Voice API's transfer through the official SDK, checked by a stand-in over TLS:
    the call's uuid, the application's JWT (signed with its private key), an NCCO connect
    with the context as SIP headers (or a number)."""
    stand_in = JsonStandIn(None, 204, tls_dir=tmp_path)
    assert stand_in.ca_file is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(stand_in.ca_file))  # trust the stand-in
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    key_file = tmp_path / "vonage-private.key"
    key_file.write_text(pem)
    handoff = resolve_handler("handoff", {"to": to, "on_dtmf": "7"}, key="handlers")
    application = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    running = StreamServer(Settings(
        port=0, transport=transport, vonage_application_id=application,
        vonage_private_key=str(key_file), vonage_api_base_url=stand_in.url,
        routes=(Route("/vonage", (handoff,), provider="vonage"),)))
    fixture = await play_whole_call(running, "vonage_connect.jsonl", "/vonage", logs,
                                    stand_in)  # keys 7, #
    call_uuid = fixture.expect["call_sid"]
    [request] = stand_in.requests
    assert ("PUT", f"/v1/calls/{call_uuid}") == (request["method"], request["path"])
    headers = request["headers"]
    assert isinstance(headers, dict)
    claims = jwt.decode(headers["Authorization"].removeprefix("Bearer "),
                        private.public_key(), algorithms=["RS256"])
    assert application == claims["application_id"]
    body = request["body"]
    assert isinstance(body, dict)
    [connect] = body["destination"]["ncco"]
    [endpoint] = connect["endpoint"]
    if to.startswith("sip:"):
        assert ("sip", to) == (endpoint["type"], endpoint["uri"])
        assert call_uuid == endpoint["headers"][CALL_ID_NAME]
    else:
        assert ("phone", "15550100") == (endpoint["type"], endpoint["number"])
    [handed] = events(logs, "call.handed_off")
    assert "vonage_transfer" == handed["mechanism"]


class _HandsOffAtStart(Handler):
    """Hands the call off as soon as it starts (the conformance run of every provider)."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.outcome: dict[str, object] = {}

    def on_start(self, session: LiveSession) -> None:
        try:
            session.hand_off(self.to).add_done_callback(
                lambda done: self.outcome.update(ok=done.result().ok,
                                                 mechanism=done.result().mechanism))
        except LocalProtocolError as exc:
            self.outcome.update(ok=False, refused=str(exc))

    def report(self) -> dict[str, object]:
        return self.outcome


# What each provider hands off with, and to what.
HAND_OFF_BY_PROVIDER = {
    "twilio": ("connect_action", "client:support"),
    "signalwire": ("connect_action", "client:support"),
    "acs": ("acs_transfer", "tel:+15550100"),
    "telnyx": ("telnyx_transfer", "sip:agent@pbx.example.com"),
    "vonage": ("vonage_transfer", "sip:agent@pbx.example.com"),
    "plivo": (None, "sip:agent@pbx.example.com"),
    "exotel": (None, "tel:+15550100"),
    "genesys": ("genesys_disconnect", "queue:disputes"),
    "asterisk": (None, "sip:agent@pbx.example.com"),
    "jambonz": (None, "sip:agent@pbx.example.com"),
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_every_provider_hands_off_its_own_way_or_says_why_it_cannot(
        provider: str, tmp_path: Path, logs: LogEvents,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's conformance for hand-offs: every provider's bundled session, on a
    bidirectional route, is handed off by its own mechanism (at local stand-ins for the
    REST APIs), or refused with the reason where the provider carries no context on a
    transfer; the call itself never fails."""
    mechanism, to = HAND_OFF_BY_PROVIDER[provider]
    _, jwks = write_acs_keys(tmp_path / "keys")
    acs = AcsStandIn(tmp_path, tls=False)
    apis = JsonStandIn({"data": {"result": "ok"}})
    (tmp_path / "vonage").mkdir()
    vonage_api = JsonStandIn(None, 204, tls_dir=tmp_path / "vonage")
    assert vonage_api.ca_file is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(vonage_api.ca_file))
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "vonage.key"
    key_file.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    spec = HandlerSpec("hands_off", _HandsOffAtStart, {"to": to})
    running = StreamServer(Settings(
        port=0, public_url="wss://voice.example.com", acs_audience="acs-resource-0001",
        acs_jwks_url=jwks.as_uri(), acs_connection_string=acs.connection_string,
        telnyx_api_key="KEY-telnyx", telnyx_api_base_url=apis.url + "/v2",
        vonage_private_key=str(key_file), vonage_api_base_url=vonage_api.url,
        vonage_application_id="app-1", **SECRETS,
        routes=(Route(f"/{provider}", (spec,), bidirectional=True, provider=provider),)))
    await running.start()
    try:
        fixture = load_fixture(FIXTURES / BUNDLED[provider])
        report = await replay([fixture], f"ws://127.0.0.1:{running.port}/{provider}",
                              speed=0, signing=dataclasses.replace(
                                  signing(tmp_path), vonage_application_id="app-1"))
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await running.stop()
        for stand_in in (apis, vonage_api):
            stand_in.close()
        acs.http.shutdown()
        acs.http.server_close()
    [session] = report.sessions
    assert session.ok, session.error
    [stopped] = events(logs, "stream.stopped")
    outcome = stopped["handlers"]["hands_off"]
    assert {} == stopped["handler_errors"]
    if mechanism is None:
        assert outcome["ok"] is False
        assert "carries no context on a transfer" in str(outcome["refused"])
        return
    assert (True, mechanism) == (outcome["ok"], outcome["mechanism"])
    [handed] = events(logs, "call.handed_off")
    assert (mechanism, CALL_ID_NAME) == (handed["mechanism"], handed["sent"][0])
    if provider == "genesys":  # the disconnect's outputVariables, seen by Genesys's side
        assert session.hand_off is not None
        assert (to, "handed_off") == (session.hand_off["target"], stopped["reason"])
