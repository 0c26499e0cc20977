"""Replay a fixture as a whole Twilio call, the way Twilio drives one: request the voice
webhook, connect the ``<Stream>`` its TwiML names (with its ``<Parameter>``s), and when
the service closes a ``<Connect>`` stream early (a drain hands the call over, 1001),
request the ``<Connect action>`` URL and go on with the rest of the fixture on the stream
that TwiML names: ``streamsvc replay FIXTURE --webhook URL``.

Each stream is one leg (its own :class:`~streamsvc.replay.SessionResult`, a fresh
StreamSid, the same CallSid); together they carry every frame of the fixture once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from xml.etree import ElementTree

from streamsvc.exceptions import HANDED_OFF_REASON
from streamsvc.providers.signature import SIGNATURE_HEADER, sign
from streamsvc.replay.client import SessionResult, replay_session, signature_headers
from streamsvc.replay.fixture import Fixture, FixtureFrame

__all__ = ["CallLeg", "StreamVerb", "hand_off_of", "replay_call", "stream_verb"]

# A call moved this many times in one replay is a loop, not a deploy.
MAX_LEGS: Final = 8
GOING_AWAY: Final = 1001
NORMAL_CLOSURE: Final = 1000


@dataclass(frozen=True, slots=True)
class StreamVerb:
    """The ``<Stream>`` a TwiML document starts: its URL, parameters and (for
    ``<Connect>``) the action URL."""

    url: str
    parameters: dict[str, str]
    connect: bool
    action: str | None


@dataclass(slots=True)
class CallLeg:
    """One stream of a replayed call."""

    result: SessionResult
    stream: StreamVerb
    moved: bool  # the service closed it (1001) and the call went on through the action
    # The service handed the call off (closed the stream, 1000 "handed off"): what the
    # <Connect action> answered (the hand-off's TwiML), else None.
    hand_off: str | None = None


def stream_verb(document: str) -> StreamVerb | None:
    """The ``<Stream>`` of a TwiML document, or None when it starts none."""
    root = ElementTree.fromstring(document)
    for verb in root:
        if verb.tag not in ("Connect", "Start"):
            continue
        stream = verb.find("Stream")
        if stream is None:
            continue
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return StreamVerb(stream.get("url", ""), parameters, verb.tag == "Connect",
                          verb.get("action") if verb.tag == "Connect" else None)
    return None


def _request_twiml(url: str, fields: Mapping[str, str], auth_token: str | None,
                   public_url: str | None) -> str:
    """POST the call's fields to ``url`` as Twilio does (signed with ``auth_token``, over
    ``url`` as ``public_url`` names it)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth_token:
        headers[SIGNATURE_HEADER] = sign(auth_token, _public(url, public_url), fields.items())
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                     method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def hand_off_of(document: str) -> dict[str, Any] | None:
    """What a hand-off's TwiML hands the call to, and what it carries: ``target``
    (``client:<identity>``, the SIP URI, ``tel:<number>``, ``queue:<name>``) and
    ``parameters`` (``<Client>``'s ``<Parameter>``s, the SIP URI's ``X-`` headers, the
    task's attributes); None for TwiML that dials nobody."""
    root = ElementTree.fromstring(document)
    client, sip = root.find("./Dial/Client"), root.find("./Dial/Sip")
    number, enqueue = root.find("./Dial/Number"), root.find("./Enqueue")
    if client is not None:
        return {"target": f"client:{client.findtext('Identity') or ''}",
                "parameters": {p.get("name", ""): p.get("value", "")
                               for p in client.findall("Parameter")}}
    if sip is not None:
        uri = urllib.parse.urlsplit((sip.text or "").strip())
        headers = dict(urllib.parse.parse_qsl(uri.query))
        return {"target": urllib.parse.urlunsplit(uri._replace(query="")),
                "parameters": {k[2:]: v for k, v in headers.items() if k.startswith("X-")}}
    if number is not None:
        return {"target": f"tel:{(number.text or '').strip()}", "parameters": {}}
    if enqueue is not None:
        task = enqueue.findtext("Task")
        attributes = json.loads(task) if task else {}
        return {"target": f"queue:{(enqueue.text or '').strip()}" if not task else "queue",
                "parameters": attributes if isinstance(attributes, dict) else {}}
    return None


def _reached(action: str, webhook_url: str) -> str:
    """The action URL as this replay reaches the service: on the webhook URL's origin (the
    action names the public origin, which signatures cover)."""
    parts, webhook = urllib.parse.urlsplit(action), urllib.parse.urlsplit(webhook_url)
    return urllib.parse.urlunsplit((webhook.scheme, webhook.netloc, parts.path, parts.query,
                                    ""))


def _public(url: str, public_url: str | None) -> str:
    """``url`` as Twilio requested it: on ``public_url``'s origin (and path prefix)."""
    if not public_url:
        return url
    parts, public = urllib.parse.urlsplit(url), urllib.parse.urlsplit(public_url)
    scheme = {"wss": "https", "ws": "http"}.get(public.scheme, public.scheme)
    prefix = public.path.rstrip("/")
    path = parts.path if parts.path.startswith(prefix + "/") or not prefix else prefix + parts.path
    return urllib.parse.urlunsplit((scheme, public.netloc, path, parts.query, ""))


def _leg_fixture(fixture: Fixture, body: list[FixtureFrame], opening: list[dict[str, Any]],
                 stream: StreamVerb, stream_sid: str, call_sid: str, leg: int) -> Fixture:
    """``connected`` and ``start`` for this leg (its StreamSid, the TwiML's parameters),
    then ``body`` with the leg's StreamSid, rebased to start at once."""
    frames = []
    for message in opening:
        message = json.loads(json.dumps(message))
        if message.get("event") == "start":
            start = message.setdefault("start", {})
            start.update(streamSid=stream_sid, callSid=call_sid,
                         customParameters=stream.parameters)
            message["streamSid"] = stream_sid
        frames.append(FixtureFrame(0.0, json.dumps(message)))
    first_at = body[0].at_ms if body else 0.0
    for frame in body:
        try:
            message = json.loads(frame.text)
        except ValueError:
            frames.append(FixtureFrame(frame.at_ms - first_at, frame.text))
            continue
        if isinstance(message, dict) and "streamSid" in message:
            message["streamSid"] = stream_sid
        frames.append(FixtureFrame(frame.at_ms - first_at, json.dumps(message)))
    return dataclasses.replace(fixture, name=f"{fixture.name}#{leg}", frames=tuple(frames),
                               header={**fixture.header, "expect": {}})


def _split(fixture: Fixture) -> tuple[list[dict[str, Any]], list[FixtureFrame]]:
    """The fixture's opening messages (``connected``, ``start``) and the rest."""
    opening: list[dict[str, Any]] = []
    for index, frame in enumerate(fixture.frames):
        try:
            message = json.loads(frame.text)
        except ValueError:
            message = None
        if isinstance(message, dict) and message.get("event") in ("connected", "start"):
            opening.append(message)
            if message["event"] == "start":
                return opening, list(fixture.frames[index + 1:])
    raise ValueError(f"{fixture.name}: no start message: a call needs a Twilio fixture")


async def replay_call(fixture: Fixture, webhook_url: str, *, speed: float = 1.0,
                      auth_token: str | None = None, public_url: str | None = None,
                      fields: Mapping[str, str] | None = None,
                      stream_url: str | None = None) -> list[CallLeg]:
    """Play ``fixture`` as one call through the voice webhook at ``webhook_url``; follow
    ``<Connect action>`` when the service moves the stream. ``fields`` are added to the
    webhook's form (Twilio's own are filled in from the fixture); ``stream_url`` connects
    there instead of the TwiML's URL (signatures still cover the TwiML's)."""
    opening, body = _split(fixture)
    start = next(m for m in opening if m.get("event") == "start").get("start", {})
    call_sid = str(start.get("callSid") or "CA" + secrets.token_hex(16))
    form = {"CallSid": call_sid, "AccountSid": str(start.get("accountSid", "AC" + "0" * 32)),
            "From": "+15550100", "To": "+15550199", "CallStatus": "in-progress",
            "Direction": "inbound", "ApiVersion": "2010-04-01", **(fields or {})}
    legs: list[CallLeg] = []
    document = await asyncio.to_thread(_request_twiml, webhook_url, form, auth_token,
                                       public_url)
    while len(legs) < MAX_LEGS:
        stream = stream_verb(document)
        if stream is None:
            break
        stream_sid = "MZ" + secrets.token_hex(16)
        leg_fixture = _leg_fixture(fixture, body, opening, stream, stream_sid, call_sid,
                                   len(legs))
        target = stream_url or stream.url
        headers = signature_headers(stream.url, auth_token)
        result = await replay_session(leg_fixture, target, speed=speed, headers=headers)
        moved = result.close_code == GOING_AWAY and stream.action is not None
        handed_off = (result.close_code == NORMAL_CLOSURE and stream.action is not None
                      and result.close_reason == HANDED_OFF_REASON)
        if moved or handed_off:  # the call went on elsewhere: this leg ended as it should
            result.ok, result.error = True, None
        legs.append(CallLeg(result, stream, moved))
        if handed_off:  # Twilio requests the action: its answer hands the call over
            assert stream.action is not None
            legs[-1].hand_off = await asyncio.to_thread(
                _request_twiml, _reached(stream.action, webhook_url), form, auth_token,
                public_url)
            result.hand_off = hand_off_of(legs[-1].hand_off)
        if not moved:
            break
        sent_of_body = max(0, result.frames_sent - len(opening))
        body = body[sent_of_body:]
        assert stream.action is not None
        document = await asyncio.to_thread(_request_twiml, _reached(stream.action, webhook_url),
                                           form, auth_token, public_url)
    return legs
