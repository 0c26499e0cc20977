"""Contextual calling: the voice webhook's fields become ``<Parameter>``s under a byte
budget, the TwiML carries them into a stream, and the stream session ends up with exactly
the promised ``custom_parameters``. Plus the stream status callback and ``streamsvc twiml``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from streamsvc.builtins.log import LogHandler
from streamsvc.config import Route, Settings, load_settings
from streamsvc.context.twiml import (
    TWILIO_VOICE_FIELDS,
    ContextMapping,
    parameters_from_twiml,
    render_stream_twiml,
    select_parameters,
    xml_safe,
)
from streamsvc.exceptions import ConfigError
from streamsvc.handlers import HandlerSpec, resolve_handler
from streamsvc.providers.signature import sign as twilio_signature
from streamsvc.replay import replay_session, signature_headers
from streamsvc.replay.fixture import Fixture
from streamsvc.replay.synth import SessionPlan, synthesize
from streamsvc.server import StreamServer

from .conftest import LogEvents, events, until

PUBLIC = "wss://example.ngrok.app"
TOKEN = "12345"
CALL_SID = "CA0123456789abcdef0123456789abcdef"

# A voice webhook request as Twilio posts it for a SIP call whose REST API `Url` carried
# a query string: Twilio's own fields, two SIP X- headers, one app field (Voice SDK param).
TWILIO_FIELDS = {
    "AccountSid": "AC0123456789abcdef0123456789abcdef",
    "ApiVersion": "2010-04-01",
    "CallSid": CALL_SID,
    "CallStatus": "ringing",
    "Called": "sip:support@example.sip.twilio.com",
    "Caller": "sip:alice@example.com",
    "Direction": "inbound",
    "From": "sip:alice@example.com",
    "To": "sip:support@example.sip.twilio.com",
    "SipCallId": "a84b4c76e66710@pc33.example.com",
    "SipHeader_X-CustomerID": "cus_8812",
    "SipHeader_X-DisplayName": "Zoë Ærøskøbing 山田",
    "agentQueue": "billing & <priority>",
}
QUERY = {"customerID": "cus_8812", "intent": "order-status"}


# -- the mapping and its budget (I/O-free) -----------------------------------------------

def test_the_default_mapping_takes_app_context_and_three_twilio_fields() -> None:
    selection = select_parameters(TWILIO_FIELDS | QUERY, QUERY, ContextMapping())
    assert {
        # the query, sorted by name
        "customerID": "cus_8812",
        "intent": "order-status",
        # SIP X- headers, prefix stripped, sorted
        "CustomerID": "cus_8812",
        "DisplayName": "Zoë Ærøskøbing 山田",
        # fields that are not Twilio's (Voice SDK params)
        "agentQueue": "billing & <priority>",
        # then Twilio's own, in the mapping's order
        "From": "sip:alice@example.com",
        "To": "sip:support@example.sip.twilio.com",
        "CallSid": CALL_SID,
    } == selection.parameters
    assert ["customerID", "intent", "CustomerID", "DisplayName", "agentQueue", "From", "To",
            "CallSid"] == list(selection.parameters)
    assert (False, (), ()) == (selection.over_budget, selection.dropped, selection.truncated)
    assert sum(len(k.encode()) + len(v.encode())
               for k, v in selection.parameters.items()) == selection.used_bytes


def test_a_mapping_can_pick_rename_and_prioritise() -> None:
    mapping = ContextMapping(query=("intent",), sip_headers=("CustomerID",), custom_fields=(),
                             webhook_fields=("Direction",), rename={"intent": "Intent"},
                             priority=("Direction",))
    selection = select_parameters(TWILIO_FIELDS | QUERY, QUERY, mapping)
    assert [("Direction", "inbound"), ("Intent", "order-status"),
            ("CustomerID", "cus_8812")] == list(selection.parameters.items())


def test_the_first_source_of_a_name_wins() -> None:
    fields = {"SipHeader_X-intent": "from-sip", "intent": "from-query"}
    selection = select_parameters(fields, {"intent": "from-query"}, ContextMapping())
    assert {"intent": "from-query"} == selection.parameters


def test_over_budget_truncates_one_parameter_on_a_character_boundary_and_drops_the_rest(
) -> None:
    mapping = ContextMapping(budget_bytes=40, priority=("CustomerID",), webhook_fields=())
    fields = {"SipHeader_X-CustomerID": "cus_8812", "note": "ééééééééééé", "zeta": "z"}
    selection = select_parameters(fields, {}, mapping)
    # CustomerID (10 + 8 = 18 bytes) first; then `note` (4 + 22) does not fit in the 22
    # left: its value gets 18 bytes, 9 whole "é"s; `zeta` is dropped.
    assert {"CustomerID": "cus_8812", "note": "é" * 9} == selection.parameters
    assert (("zeta",), ("note",), 40) == (selection.dropped, selection.truncated,
                                          selection.used_bytes)
    assert {"budget_bytes": 40, "used_bytes": 40, "dropped": ["zeta"],
            "truncated": ["note"]} == selection.report()


def test_a_parameter_whose_name_alone_does_not_fit_is_dropped_not_truncated() -> None:
    mapping = ContextMapping(budget_bytes=12, webhook_fields=())
    selection = select_parameters({"a": "1234567890", "longname": "x", "b": "y"}, {}, mapping)
    # "a"+10 = 11 bytes kept; "b"+"y" = 2 > 1 left: b cannot even be truncated (name +
    # one character), so it is dropped, and so is everything after it.
    assert ({"a": "1234567890"}, ("b", "longname"), ()) == (
        selection.parameters, selection.dropped, selection.truncated)


def test_each_parameter_is_cut_to_twilios_500_character_limit_and_reported() -> None:
    """Twilio: a <Parameter>'s name and value together under 500 characters, whatever the
    byte budget; a name that long leaves no room and is dropped."""
    mapping = ContextMapping(budget_bytes=10_000, webhook_fields=())
    fields = {"note": "n" * 600, "x" * 499: "v", "ok": "fine"}
    selection = select_parameters(fields, {}, mapping)
    assert {"note": "n" * 495, "ok": "fine"} == selection.parameters
    assert (("x" * 499,), ("note",)) == (selection.dropped, selection.truncated)
    assert all(len(name) + len(value) < 500 for name, value in selection.parameters.items())


@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=60), max_size=12),
       st.integers(min_value=0, max_value=300))
def test_the_budget_is_never_exceeded_and_everything_is_accounted_for(
        fields: dict[str, str], budget: int) -> None:
    fields = {k: v for k, v in fields.items() if not k.startswith("SipHeader_")}
    selection = select_parameters(fields, {}, ContextMapping(budget_bytes=budget,
                                                             webhook_fields=()))
    used = sum(len(k.encode()) + len(v.encode()) for k, v in selection.parameters.items())
    assert used == selection.used_bytes <= budget
    cleaned = {xml_safe(k): xml_safe(v) for k, v in sorted(fields.items(), reverse=True)
               if k not in TWILIO_VOICE_FIELDS and xml_safe(k)}  # first name in order wins
    assert sorted(cleaned) == sorted([*selection.parameters, *selection.dropped])
    assert len(selection.truncated) <= 1
    for name, value in selection.parameters.items():
        if name in selection.truncated:
            assert cleaned[name].startswith(value)
            assert value != cleaned[name]
        else:
            assert cleaned[name] == value


# -- TwiML ------------------------------------------------------------------------------

def test_start_stream_twiml_escapes_everything_and_adds_the_follow_on() -> None:
    document = render_stream_twiml(
        "wss://voice.example.com/stream", {"a&b": "<\"x\" & 'y'>", "name": "Zoë"},
        connect=False, track="both_tracks",
        status_callback="https://voice.example.com/stream-status",
        after='<Pause length="3600"/>')
    assert document == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Start>'
        '<Stream url="wss://voice.example.com/stream" track="both_tracks"'
        ' statusCallback="https://voice.example.com/stream-status"'
        ' statusCallbackMethod="POST">'
        '<Parameter name="a&amp;b" value="&lt;&quot;x&quot; &amp; \'y\'&gt;"/>'
        '<Parameter name="name" value="Zoë"/>'
        '</Stream></Start><Pause length="3600"/></Response>')
    assert {"a&b": "<\"x\" & 'y'>", "name": "Zoë"} == parameters_from_twiml(document)


def test_connect_stream_twiml_has_no_track_and_nothing_after() -> None:
    document = render_stream_twiml("wss://voice.example.com/connect", {}, connect=True,
                                   after="<Say>never</Say>")
    assert document == ('<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
                        '<Stream url="wss://voice.example.com/connect"></Stream>'
                        '</Connect></Response>')


@pytest.mark.parametrize(("url", "track", "after", "reason"), [
    ("wss://voice.example.com/stream?customerID=1", "inbound_track", "", "no query string"),
    ("https://voice.example.com/stream", "inbound_track", "", "ws:// or wss://"),
    ("wss://voice.example.com/stream", "inbound", "", "track must be one of"),
    ("wss://voice.example.com/stream", "inbound_track", "<Pause>", "not well-formed"),
])
def test_twiml_that_twilio_would_mangle_is_refused(url: str, track: str, after: str,
                                                   reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        render_stream_twiml(url, {}, connect=False, track=track, after=after)


@given(st.dictionaries(st.text(min_size=1), st.text()))
def test_any_parameters_survive_the_twiml_round_trip(parameters: dict[str, str]) -> None:
    names = [xml_safe(name) for name in parameters]
    if "" in names or len(set(names)) < len(names):
        with pytest.raises(ValueError, match="parameter names"):  # empty, or two become one
            render_stream_twiml("wss://h/s", parameters, connect=False)
        return
    document = render_stream_twiml("wss://h/s", parameters, connect=False)
    assert {xml_safe(k): xml_safe(v) for k, v in parameters.items()} == \
        parameters_from_twiml(document)


def test_the_mapping_cleans_names_before_it_counts_them() -> None:
    fields = {"SipHeader_X-\x01": "gone", "bell\x07": "ring\x07", "bell": "second"}
    selection = select_parameters(fields, {}, ContextMapping(webhook_fields=()))
    assert {"bell": "second"} == selection.parameters  # sorted: "bell" comes first
    assert 10 == selection.used_bytes


def test_the_webhook_signature_agrees_with_twilios_own_validator() -> None:
    url = "https://example.ngrok.app/twiml?customerID=cus_8812&intent=order-status"
    expected = RequestValidator(TOKEN).compute_signature(url, TWILIO_FIELDS)
    assert expected == twilio_signature(TOKEN, url, list(TWILIO_FIELDS.items()))
    # A fixed vector (what the official package computes), so a change to either shows.
    example = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030",
               "Digits": "1234", "From": "+12349013030", "To": "+18005551212"}
    assert "0/KCTR6DLpKmkAf8muzZqo1nDgQ=" == twilio_signature(
        TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=2", list(example.items()))


# -- configuration ----------------------------------------------------------------------

def test_routes_take_a_context_mapping_and_twiml_from_toml(tmp_path: object) -> None:
    from pathlib import Path
    assert isinstance(tmp_path, Path)
    config = tmp_path / "streamsvc.toml"
    config.write_text("""
[[routes]]
path = "/media"
handlers = ["log"]
[routes.context]
query = ["customerID"]
sip_headers = "*"
custom_fields = []
webhook_fields = ["From", "Direction"]
rename = { customerID = "customer" }
priority = ["customer"]
budget_bytes = 400
[routes.twiml]
track = "both_tracks"
after = '<Pause length="3600"/>'
""", encoding="utf-8")
    (route,) = load_settings(config_path=str(config), env={}).routes
    assert ContextMapping(query=("customerID",), sip_headers="*", custom_fields=(),
                          webhook_fields=("From", "Direction"),
                          rename={"customerID": "customer"}, priority=("customer",),
                          budget_bytes=400) == route.context
    assert ("both_tracks", '<Pause length="3600"/>') == (route.stream_track, route.after_twiml)


@pytest.mark.parametrize(("table", "key"), [
    ("[routes.context]\nbudget_bytes = -1", "routes[0].context.budget_bytes"),
    ("[routes.context]\nquery = 3", "routes[0].context.query"),
    ("[routes.context]\nheaders = []", "routes[0].context.headers"),
    ("[routes.twiml]\ntrack = \"left\"", "routes[0].twiml"),
    ("[routes.twiml]\nafter = \"<Say>\"", "routes[0].twiml"),
])
def test_a_bad_context_or_twiml_table_names_its_key(tmp_path: object, table: str,
                                                      key: str) -> None:
    from pathlib import Path
    assert isinstance(tmp_path, Path)
    config = tmp_path / "streamsvc.toml"
    config.write_text(f'[[routes]]\npath = "/media"\n{table}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_settings(config_path=str(config), env={})
    assert error.value.key == key


def test_the_webhook_paths_cannot_shadow_a_stream_route() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(env={"STREAMSVC_WEBHOOK_PATH": "/stream"})
    assert "webhook_path" == error.value.key


# -- end to end: a signed webhook, its TwiML, the stream it starts ---------------------

@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[StreamServer]:
    recorder = resolve_handler("recorder", {"dir": str(tmp_path)}, key="test")
    routes = (
        Route("/media", (HandlerSpec("log", LogHandler), recorder)),
        Route("/small", (HandlerSpec("log", LogHandler),),
              context=ContextMapping(budget_bytes=64, priority=("CustomerID",))),
        Route("/talk", (HandlerSpec("log", LogHandler),), bidirectional=True),
    )
    server = StreamServer(Settings(port=0, routes=routes, public_url=PUBLIC,
                                   auth_token=TOKEN))
    await server.start()
    yield server
    await server.stop()


def _request(port: int, method: str, target: str, fields: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """One HTTP request with the standard library's client: (status, content type, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = urlencode(fields).encode() if fields is not None else None
        all_headers = {"User-Agent": "TwilioProxy/1.1", **(headers or {})}
        if body is not None:
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, target, body=body, headers=all_headers)
        response = connection.getresponse()
        return (response.status, response.getheader("Content-Type", ""),
                response.read().decode())
    finally:
        connection.close()


def _twilio_post(port: int, target: str, fields: dict[str, str],
                 token: str = TOKEN) -> tuple[int, str, str]:
    """POST ``fields`` to ``target`` signed as Twilio signs a webhook."""
    signature = RequestValidator(token).compute_signature(
        "https://example.ngrok.app" + target, fields)
    return _request(port, "POST", target, fields, {"X-Twilio-Signature": signature})


def _twilio_get(port: int, target: str) -> tuple[int, str, str]:
    """GET ``target`` signed as Twilio signs a GET webhook (over the URL and its query)."""
    signature = RequestValidator(TOKEN).compute_signature(
        "https://example.ngrok.app" + target, {})
    return _request(port, "GET", target, None, {"X-Twilio-Signature": signature})


async def _stream_from_twiml(server: StreamServer, document: str, path: str) -> None:
    """Start the stream that TwiML asks for, as Twilio would, carrying its parameters."""
    plan = SessionPlan(inbound=[0] * 800, custom_parameters=parameters_from_twiml(document),
                       call_sid=CALL_SID)
    fixture = Fixture("from-twiml", tuple(synthesize(plan)))
    url = f"ws://127.0.0.1:{server.port}{path}"
    result = await replay_session(fixture, url, speed=0,
                                  headers=signature_headers(url, TOKEN, PUBLIC))
    assert (True, None) == (result.ok, result.error)
    await until(lambda: server.active_calls == 0)  # its handlers have finished


async def test_a_signed_webhook_carries_the_calls_context_into_the_stream(
        server: StreamServer, logs: LogEvents) -> None:
    target = "/twiml/media?" + urlencode(QUERY)
    status, content_type, document = await asyncio.to_thread(
        _twilio_post, server.port, target, TWILIO_FIELDS)
    assert (200, "application/xml") == (status, content_type)
    assert '<Start><Stream url="wss://example.ngrok.app/media" track="inbound_track"' \
           ' statusCallback="https://example.ngrok.app/stream-status"' in document
    promised = {
        "customerID": "cus_8812", "intent": "order-status", "CustomerID": "cus_8812",
        "DisplayName": "Zoë Ærøskøbing 山田", "agentQueue": "billing & <priority>",
        "From": "sip:alice@example.com", "To": "sip:support@example.sip.twilio.com",
        "CallSid": CALL_SID,
    }
    assert promised == parameters_from_twiml(document)

    await _stream_from_twiml(server, document, "/media")

    (started,) = events(logs, "stream.started")
    assert promised == started["custom_parameters"]
    assert list(promised) == list(started["custom_parameters"])  # order kept too
    # One context store, in one process as in a fleet: the stream read the webhook's
    # record (its whole context) once at start.
    assert promised == started["context"]
    (stopped,) = events(logs, "stream.stopped")
    used = sum(len(k.encode()) + len(v.encode()) for k, v in promised.items())
    report = {"budget_bytes": 800, "used_bytes": used, "dropped": [], "truncated": []}
    assert report == stopped["context_budget"]
    # The report is part of the call summary: the recorder's sidecar carries it too.
    sidecar = json.loads(Path(stopped["handlers"]["recorder"]["file"])
                         .with_suffix(".json").read_text(encoding="utf-8"))
    assert (promised, report) == (sidecar["custom_parameters"],
                                  sidecar["summary"]["context_budget"])
    assert [] == events(logs, "twiml.parameters_over_budget")
    (served,) = events(logs, "twiml.served")
    assert (CALL_SID, "/media") == (served["call_sid"], served["path"])
    metrics = (await asyncio.to_thread(_request, server.port, "GET", "/metrics"))[2]
    assert 'streamsvc_webhooks_total{outcome="twiml_served"} 1.0' in metrics


async def test_over_budget_context_is_cut_exactly_as_the_policy_says(
        server: StreamServer, logs: LogEvents) -> None:
    # Budget 64 on /small, CustomerID first: CustomerID (18), customerID (18), intent (18)
    # leave 10 bytes; DisplayName (11 bytes of name) cannot even be truncated: dropped,
    # and everything after it.
    target = "/twiml/small?" + urlencode(QUERY)
    status, _, document = await asyncio.to_thread(
        _twilio_post, server.port, target, TWILIO_FIELDS)
    assert 200 == status
    promised = {"CustomerID": "cus_8812", "customerID": "cus_8812",
                "intent": "order-status"}
    assert promised == parameters_from_twiml(document)
    (warning,) = events(logs, "twiml.parameters_over_budget")
    assert (CALL_SID, 64, 54, ["DisplayName", "agentQueue", "From", "To", "CallSid"], []) == (
        warning["call_sid"], warning["budget_bytes"], warning["used_bytes"],
        warning["dropped"], warning["truncated"])
    assert "warning" == warning["log_level"]

    await _stream_from_twiml(server, document, "/small")

    (started,) = events(logs, "stream.started")
    assert promised == started["custom_parameters"]
    (stopped,) = events(logs, "stream.stopped")
    assert warning["dropped"] == stopped["context_budget"]["dropped"]


async def test_a_truncated_unicode_value_reaches_the_stream_whole_characters_only(
        server: StreamServer, logs: LogEvents) -> None:
    # CustomerID (18) and customerID (18) leave 28 of the 64 bytes; `intent` (6) gets 22
    # bytes of value, and its 22nd byte is the first half of an "é": the cut falls before it.
    query = {"customerID": "cus_8812", "intent": "réclamation-facturéété"}
    target = "/twiml/small?" + urlencode(query)
    status, _, document = await asyncio.to_thread(
        _twilio_post, server.port, target, TWILIO_FIELDS)
    assert 200 == status
    parameters = parameters_from_twiml(document)
    assert {"CustomerID": "cus_8812", "customerID": "cus_8812",
            "intent": "réclamation-facturé"} == parameters
    await _stream_from_twiml(server, document, "/small")
    (started,) = events(logs, "stream.started")
    assert parameters == started["custom_parameters"]
    (stopped,) = events(logs, "stream.stopped")
    assert (63, ["intent"]) == (stopped["context_budget"]["used_bytes"],
                                stopped["context_budget"]["truncated"])


async def test_a_bidirectional_route_answers_connect_stream(server: StreamServer) -> None:
    status, _, document = await asyncio.to_thread(
        _twilio_post, server.port, "/twiml/talk", {"CallSid": CALL_SID, "From": "+15550100"})
    assert 200 == status
    # The action comes back here when the <Connect> ends: a hand-off answers it.
    assert ('<Connect action="https://example.ngrok.app/twiml/talk?streamsvc_action=connect">'
            '<Stream url="wss://example.ngrok.app/talk"') in document
    assert {"From": "+15550100", "CallSid": CALL_SID} == parameters_from_twiml(document)
    status, _, after = await asyncio.to_thread(
        _twilio_post, server.port, "/twiml/talk?streamsvc_action=connect",
        {"CallSid": CALL_SID})
    assert (200, '<?xml version="1.0" encoding="UTF-8"?><Response></Response>') == (
        status, after)  # no hand-off pending: the route's follow-on TwiML (none)


async def test_the_bare_webhook_path_serves_the_first_route_and_get_is_signed_over_the_url(
        server: StreamServer) -> None:
    target = "/twiml?" + urlencode({"CallSid": CALL_SID, "From": "+15550100",
                                    "customerID": "cus_1"})
    status, _, document = await asyncio.to_thread(_twilio_get, server.port, target)
    assert 200 == status
    assert 'url="wss://example.ngrok.app/media"' in document
    assert {"customerID": "cus_1", "From": "+15550100", "CallSid": CALL_SID} == \
        parameters_from_twiml(document)


@pytest.mark.parametrize("tamper", ["unsigned", "wrong-token", "changed-field", "changed-query"])
async def test_a_webhook_without_a_valid_signature_gets_403(
        server: StreamServer, logs: LogEvents, tamper: str) -> None:
    target = "/twiml/media?" + urlencode(QUERY)
    signature = RequestValidator("wrong" if tamper == "wrong-token" else TOKEN) \
        .compute_signature("https://example.ngrok.app" + target, TWILIO_FIELDS)
    headers = {} if tamper == "unsigned" else {"X-Twilio-Signature": signature}
    fields = TWILIO_FIELDS | ({"From": "+15550199"} if tamper == "changed-field" else {})
    if tamper == "changed-query":
        target += "&vip=1"
    status, _, body = await asyncio.to_thread(
        _request, server.port, "POST", target, fields, headers)
    reason = "missing_signature" if tamper == "unsigned" else "bad_signature"
    assert (403, f"Forbidden: {reason}\n") == (status, body)
    (rejected,) = events(logs, "webhook.rejected")
    assert (reason, 403, "/twiml/media") == (rejected["reason"], rejected["status"],
                                             rejected["path"])
    assert [] == events(logs, "twiml.served")


async def test_http_the_webhook_does_not_serve_is_refused_and_streams_still_work(
        server: StreamServer, logs: LogEvents) -> None:
    status, _, _ = await asyncio.to_thread(_request, server.port, "PUT", "/twiml/media", {})
    assert 405 == status
    big = {"Body": "x" * 70_000}
    status, _, _ = await asyncio.to_thread(_twilio_post, server.port, "/twiml/media", big)
    assert 413 == status
    assert [("method", 405), ("body_too_large", 413)] == [
        (e["reason"], e["status"]) for e in events(logs, "webhook.rejected")]
    status, _, _ = await asyncio.to_thread(_request, server.port, "GET", "/twiml/nowhere")
    assert 404 == status  # not a route: websockets' own handshake refuses it
    await _stream_from_twiml(server, render_stream_twiml(PUBLIC + "/media", {"k": "v"},
                                                         connect=False), "/media")
    (started,) = events(logs, "stream.started")
    assert {"k": "v"} == started["custom_parameters"]


async def test_a_status_callback_is_logged_and_counted_beside_its_call(
        server: StreamServer, logs: LogEvents) -> None:
    base = {"AccountSid": TWILIO_FIELDS["AccountSid"], "CallSid": CALL_SID,
            "StreamSid": "MZ0123456789abcdef0123456789abcdef", "StreamName": "support",
            "Timestamp": "Mon, 23 Nov 2026 09:00:00 +0000"}
    for event, extra in [("stream-started", {}), ("stream-error",
                         {"StreamError": "31920 Stream - WebSocket - Handshake Error"}),
                         ("stream-stopped", {})]:
        status, _, _ = await asyncio.to_thread(
            _twilio_post, server.port, "/stream-status", base | {"StreamEvent": event} | extra)
        assert 204 == status
    logged = events(logs, "stream.status")
    assert [("stream-started", "info"), ("stream-error", "warning"),
            ("stream-stopped", "info")] == [(e["stream_event"], e["log_level"]) for e in logged]
    error = logged[1]
    assert (CALL_SID, base["StreamSid"], "31920 Stream - WebSocket - Handshake Error") == (
        error["call_sid"], error["stream_sid"], error["stream_error"])
    metrics = await asyncio.to_thread(_request, server.port, "GET", "/metrics")
    assert 'streamsvc_stream_status_callbacks_total{event="stream-error"} 1.0' in metrics[2]


async def test_a_status_callback_for_a_live_stream_names_its_path(
        server: StreamServer, logs: LogEvents) -> None:
    plan = SessionPlan(inbound=[0] * 8000, call_sid=CALL_SID)  # one second, real time
    url = f"ws://127.0.0.1:{server.port}/media"
    call = asyncio.create_task(replay_session(
        Fixture("live", tuple(synthesize(plan))), url, speed=1,
        headers=signature_headers(url, TOKEN, PUBLIC)))
    await until(lambda: events(logs, "stream.started"))
    fields = {"CallSid": CALL_SID, "StreamSid": plan.stream_sid,
              "StreamEvent": "stream-started"}
    status, _, _ = await asyncio.to_thread(_twilio_post, server.port, "/stream-status", fields)
    assert 204 == status
    assert (True, None) == ((await call).ok, (await call).error)
    (logged,) = events(logs, "stream.status")
    assert (True, "/media", plan.stream_sid) == (logged["live"], logged["path"],
                                                 logged["stream_sid"])


async def test_without_a_public_url_the_webhook_says_what_is_missing(
        logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/media", ()),)))
    await server.start()
    try:
        status, _, body = await asyncio.to_thread(_request, server.port, "POST", "/twiml", {})
    finally:
        await server.stop()
    assert (503, "public_url is not set\n") == (status, body)
    assert 1 == len(events(logs, "twiml.no_public_url"))


async def test_a_webhook_request_leaves_no_task_or_connection_behind(
        server: StreamServer) -> None:
    before = len(asyncio.all_tasks())
    for _ in range(20):
        status, _, _ = await asyncio.to_thread(
            _twilio_post, server.port, "/twiml/media", {"CallSid": CALL_SID})
        assert 200 == status
    for _ in range(200):
        if len(asyncio.all_tasks()) <= before:
            break
        await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) <= before
    assert 0 == server.metrics.active_calls


async def test_on_picows_the_webhook_and_status_callbacks_work_over_get_and_post(
        logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/media", ()),), public_url=PUBLIC,
                                   auth_token=TOKEN, transport="picows"))
    await server.start()
    try:
        target = "/twiml/media?" + urlencode({**QUERY, "CallSid": CALL_SID,
                                              "SipHeader_X-CustomerID": "cus_8812"})
        status, _, document = await asyncio.to_thread(_twilio_get, server.port, target)
        assert 200 == status
        assert 'statusCallbackMethod="POST"' in document
        promised = {"customerID": "cus_8812", "intent": "order-status",
                    "CustomerID": "cus_8812", "CallSid": CALL_SID}
        assert promised == parameters_from_twiml(document)
        await _stream_from_twiml(server, document, "/media")
        (started,) = events(logs, "stream.started")
        assert promised == started["custom_parameters"]

        callback = "/stream-status?" + urlencode({
            "CallSid": CALL_SID, "StreamSid": "MZ1", "StreamEvent": "stream-error",
            "StreamError": "31920 Stream - WebSocket - Handshake Error"})
        status, _, _ = await asyncio.to_thread(_twilio_get, server.port, callback)
        assert 204 == status
        (logged,) = events(logs, "stream.status")
        assert ("stream-error", CALL_SID) == (logged["stream_event"], logged["call_sid"])
        status, _, document = await asyncio.to_thread(_twilio_post, server.port,
                                                      "/twiml/media", {"CallSid": CALL_SID})
        assert 200 == status  # the HTTP front reads form POSTs on every transport
        assert {"CallSid": CALL_SID} == parameters_from_twiml(document)
    finally:
        await server.stop()


# -- the command line -------------------------------------------------------------------

def test_streamsvc_twiml_prints_validated_twiml() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "twiml", "--url", "wss://voice.example.com/connect",
         "--connect", "--param", "customerId=cus_8812", "--param", "name=Zoë & Co"],
        capture_output=True, text=True, check=True)
    assert {"customerId": "cus_8812", "name": "Zoë & Co"} == parameters_from_twiml(done.stdout)
    assert "<Connect><Stream url=\"wss://voice.example.com/connect\">" in done.stdout


@pytest.mark.parametrize("args", [
    ["--url", "wss://voice.example.com/stream?customerId=1"],
    ["--url", "wss://voice.example.com/stream", "--param", "novalue"],
])
def test_streamsvc_twiml_refuses_what_twilio_would_mangle(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "streamsvc", "twiml", *args],
                          capture_output=True, text=True)
    assert 2 == done.returncode
    assert "streamsvc: error: " in done.stderr
    assert "" == done.stdout


def test_streamsvc_twiml_never_prints_twiml_that_hangs_up_at_once() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "twiml", "--url", "wss://voice.example.com/stream"],
        capture_output=True, text=True, check=True)
    root = ElementTree.fromstring(done.stdout)
    assert ["Start", "Pause"] == [verb.tag for verb in root]
    assert "keeps the call up" in done.stderr


# -- the default configuration, as a new user runs it ----------------------------------

async def test_the_default_webhook_answers_twiml_that_keeps_the_call_up(
        logs: LogEvents) -> None:
    server = StreamServer(load_settings(env={"STREAMSVC_PUBLIC_URL": PUBLIC,
                                             "STREAMSVC_PORT": "0"}))
    await server.start()
    try:
        status, _, document = await asyncio.to_thread(
            _request, server.port, "POST", "/twiml", {"CallSid": CALL_SID})
    finally:
        await server.stop()
    assert 200 == status
    verbs = [verb.tag for verb in ElementTree.fromstring(document)]
    assert ["Start", "Pause"] == verbs  # Twilio hangs up when the TwiML runs out
    # The embedded default means it: a new user's first start carries no warning.
    assert [] == [line for line in logs if line["log_level"] != "info"]


async def test_a_configured_start_route_without_after_is_warned_about(
        logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/listen", ()),)))
    await server.start()
    await server.stop()
    (warning,) = events(logs, "twiml.default_after")
    assert ["/listen"] == warning["routes"]
