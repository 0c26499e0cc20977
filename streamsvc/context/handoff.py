"""Handing a call to a person with its context: targets, what goes along, and the TwiML.

I/O-free. :func:`parse_target` reads a hand-off target (``client:<identity>``,
``sip:<uri>``, ``tel:<E.164>``, ``queue:<name>``); :func:`plan_twiml` picks what of the
call's context goes along under the target's limits and writes the TwiML that hands the
call over (``<Dial><Client>`` with ``<Parameter>``s, ``<Dial><Sip>`` with ``X-`` headers in
the URI, ``<Dial><Number>``, ``<Enqueue><Task>``).

What goes along (per route, ``[routes.handoff]``, the shape of ``[routes.context]``):

* ``include``: ``"*"`` (default) or the context names to pass;
* ``rename``: ``{name = "name at the agent"}``;
* ``priority``: names passed first when the target's limits do not take everything;
* the limits, each overridable: ``client_name_bytes`` (32), ``client_value_bytes`` (128),
  ``client_max_parameters`` (8), ``sip_value_bytes`` (256), ``sip_uri_bytes`` (1,024),
  ``twiml_chars`` (4,000: Twilio's limit for inline TwiML);
* ACS's custom calling context: ``acs_sip_headers`` (5 ``X-MS-Custom-`` headers to a
  phone number), ``acs_sip_value_chars`` (256), ``acs_voip_value_chars`` (1,024, to an ACS
  user); a header's name with its prefix at most 64 characters;
* ``workflow_sid``: the TaskRouter workflow a ``queue:`` hand-off's task goes to;
* ``on_no_answer``: what a missed agent (``DialCallStatus`` ``no-answer``, ``busy``,
  ``failed``, ``canceled``) leaves: ``"stream"`` (default: the caller goes back to the
  route's stream, the bot takes the call back) or TwiML verbs of the route's own (voicemail,
  a queue).

Deterministic policy: ``streamsvc_call`` (the call's id, so that the agent's app can fetch
the rest at ``/calls/<id>/context``) always goes first; then the hand-off's own
``parameters``; then ``priority`` names in their order; then the rest sorted by name. The
call's id goes whole or not at all. A
name over the target's name limit, or one SIP cannot carry, is dropped; a value over the
value limit is cut (never splitting a UTF-8 character) and reported as truncated; once the
target's count, URI or TwiML limit is reached every later name is dropped. What was dropped
or cut is reported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from streamsvc.context.twiml import names_of, rename_of, star_or_names, xml_safe
from streamsvc.exceptions import ConfigError

__all__ = [
    "ACS_OPERATION_PREFIX",
    "BACK_TO_STREAM",
    "CALL_ID_NAME",
    "MISSED",
    "HandOffMapping",
    "HandOffPlan",
    "HeaderPlan",
    "Target",
    "parse_target",
    "plan_acs_headers",
    "plan_output_variables",
    "plan_sip_headers",
    "plan_twiml",
]

# The name the call's id goes along as, first, on every hand-off.
CALL_ID_NAME: Final = "streamsvc_call"
# What Twilio reports of the agent's leg (statusCallbackEvent).
STATUS_CALLBACK_EVENTS: Final = "initiated ringing answered completed"
# What a missed agent leaves: the caller goes back to the route's stream (the bot), unless
# the route's [routes.handoff] on_no_answer is TwiML of its own.
BACK_TO_STREAM: Final = "stream"
# How Twilio says the agent did not take the call (DialCallStatus).
MISSED: Final = frozenset({"no-answer", "busy", "failed", "canceled"})
KINDS: Final = ("client", "sip", "tel", "queue", "acs")
# What a SIP header name may hold (RFC 3261 token characters).
_SIP_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_E164: Final = re.compile(r"\+[1-9][0-9]{6,14}")
_CLIENT: Final = re.compile(r"[A-Za-z0-9_.@\-]{1,121}")
_SIP_URI: Final = re.compile(r"sips?:[^\s<>\"]+")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call is handed: ``kind`` (``client``, ``sip``, ``tel``, ``queue``, ``acs``)
    and its address (an identity, a SIP URI, an E.164 number, a queue's name, an ACS id)."""

    kind: str
    address: str

    def __str__(self) -> str:
        return self.address if self.kind == "sip" else f"{self.kind}:{self.address}"


def parse_target(to: str) -> Target:
    """The target ``to`` names; ValueError saying why it is not one."""
    kind, found, address = to.partition(":")
    if not found or kind not in KINDS:
        raise ValueError(f"a hand-off target is client:<identity>, sip:<uri>, tel:<E.164>, "
                         f"queue:<name> or acs:<id>, not {to[:80]!r}")
    if kind == "sip":
        if not _SIP_URI.fullmatch(to) or len(to) > 1024:
            raise ValueError(f"not a SIP URI: {to[:80]!r}")
        return Target("sip", to)
    if kind == "tel" and not _E164.fullmatch(address):
        raise ValueError(f"tel: takes an E.164 number (+ and 7 to 15 digits): {address[:40]!r}")
    if kind == "client" and not _CLIENT.fullmatch(address):
        raise ValueError(f"client: takes an identity of letters, digits, _ . @ - (at most "
                         f"121): {address[:80]!r}")
    if kind in ("queue", "acs") and not (0 < len(address) <= 256 and address.isprintable()):
        raise ValueError(f"{kind}: takes a name of 1 to 256 printable characters")
    return Target(kind, address)


@dataclass(frozen=True, slots=True)
class HandOffMapping:
    """What of the call's context goes along on a hand-off, and the targets' limits
    (module docstring); ``on_no_answer``: what a missed agent leaves (``""``: the route's
    follow-on TwiML)."""

    include: str | tuple[str, ...] = "*"
    rename: Mapping[str, str] = field(default_factory=dict)
    priority: tuple[str, ...] = ()
    client_name_bytes: int = 32
    client_value_bytes: int = 128
    client_max_parameters: int = 8
    sip_value_bytes: int = 256
    sip_uri_bytes: int = 1024
    twiml_chars: int = 4000
    acs_sip_headers: int = 5
    acs_sip_value_chars: int = 256
    acs_voip_value_chars: int = 1024
    workflow_sid: str | None = None
    on_no_answer: str = BACK_TO_STREAM

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, key: str) -> HandOffMapping:
        """Build from a ``[routes.handoff]`` TOML table; :class:`ConfigError` names the
        key."""
        limits = ("client_name_bytes", "client_value_bytes", "client_max_parameters",
                  "sip_value_bytes", "sip_uri_bytes", "twiml_chars", "acs_sip_headers",
                  "acs_sip_value_chars", "acs_voip_value_chars")
        known = {"include", "rename", "priority", "workflow_sid", "on_no_answer", *limits}
        for name in table:
            if name not in known:
                raise ConfigError(f"{key}.{name}", f"unknown; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        if "include" in table:
            values["include"] = star_or_names(table["include"], f"{key}.include")
        if "priority" in table:
            values["priority"] = names_of(table["priority"], f"{key}.priority")
        if "rename" in table:
            values["rename"] = rename_of(table["rename"], f"{key}.rename")
        if "workflow_sid" in table:
            sid = table["workflow_sid"]
            if not isinstance(sid, str) or not re.fullmatch(r"WW[0-9a-fA-F]{32}", sid):
                raise ConfigError(f"{key}.workflow_sid", f"must be a TaskRouter workflow sid "
                                  f"(WW and 32 hex digits), got {sid!r}")
            values["workflow_sid"] = sid
        if "on_no_answer" in table:
            after = table["on_no_answer"]
            if not isinstance(after, str):
                raise ConfigError(f"{key}.on_no_answer", f'"stream" or TwiML verbs, got '
                                  f"{after!r}")
            if after != BACK_TO_STREAM:
                try:
                    ElementTree.fromstring(f"<Response>{after}</Response>")
                except ElementTree.ParseError as exc:
                    raise ConfigError(f"{key}.on_no_answer", f"not well-formed TwiML: "
                                      f"{exc}") from None
            values["on_no_answer"] = after
        for name in limits:
            if name in table:
                limit = table[name]
                if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                    raise ConfigError(f"{key}.{name}", f"must be a whole number >= 1, got "
                                      f"{limit!r}")
                values[name] = limit
        return cls(**values)


@dataclass(frozen=True, slots=True)
class HandOffPlan:
    """What a hand-off sends: the TwiML, and the names sent (name -> value as sent),
    dropped and truncated."""

    target: Target
    twiml: str
    sent: dict[str, str]
    dropped: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()


def ordered(call_id: str, context: Mapping[str, str], parameters: Mapping[str, str],
            mapping: HandOffMapping) -> list[tuple[str, str]]:
    """The (name, value) pairs a hand-off offers, in the policy's order (module
    docstring), renamed, without what XML cannot carry."""
    chosen = {name: value for name, value in context.items()
              if mapping.include == "*" or name in mapping.include}
    chosen.update(parameters)
    first = [CALL_ID_NAME, *parameters]
    order = [*first, *(n for n in mapping.priority if n in chosen and n not in first),
             *sorted(n for n in chosen if n not in first and n not in mapping.priority)]
    pairs: dict[str, str] = {}
    for name in order:
        value = call_id if name == CALL_ID_NAME else chosen.get(name)
        if value is None:
            continue
        renamed = xml_safe(mapping.rename.get(name, name))
        if renamed:
            pairs.setdefault(renamed, xml_safe(value))
    return list(pairs.items())


def _cut(value: str, limit: int) -> str:
    return value.encode()[:limit].decode("utf-8", "ignore")


def plan_twiml(target: Target, call_id: str, context: Mapping[str, str],
               mapping: HandOffMapping, *, parameters: Mapping[str, str] | None = None,
               dial_action: str | None = None, status_callback: str | None = None,
               ) -> HandOffPlan:
    """The TwiML handing the call to ``target`` with what of ``context`` (and the
    hand-off's own ``parameters``) fits the target's limits; ValueError for a target
    TwiML cannot dial (``acs:``). ``dial_action``: where Twilio asks what next when the
    agent's leg ends (``<Dial action>``); ``status_callback``: where it reports the agent's
    leg (``initiated ringing answered completed``)."""
    dial = f"<Dial action={quoteattr(dial_action)}>" if dial_action else "<Dial>"
    leg = (f" statusCallback={quoteattr(status_callback)}"
           f' statusCallbackEvent="{STATUS_CALLBACK_EVENTS}"' if status_callback else "")
    pairs = ordered(call_id, context, parameters or {}, mapping)
    sent: dict[str, str] = {}
    dropped: list[str] = []
    truncated: list[str] = []

    def render() -> str:
        if target.kind == "client":
            children = "".join(f"<Parameter name={quoteattr(n)} value={quoteattr(v)}/>"
                               for n, v in sent.items())
            verb = (f"{dial}<Client{leg}><Identity>{escape(target.address)}</Identity>"
                    f"{children}</Client></Dial>")
        elif target.kind == "sip":
            verb = f"{dial}<Sip{leg}>{escape(_sip_uri(target.address, sent))}</Sip></Dial>"
        elif target.kind == "tel":
            verb = f"{dial}<Number{leg}>{escape(target.address)}</Number></Dial>"
        else:
            workflow = (f" workflowSid={quoteattr(mapping.workflow_sid)}"
                        if mapping.workflow_sid else "")
            task = json.dumps(sent, ensure_ascii=False, separators=(",", ":"))
            # With a workflow the task's attributes carry the context (TaskRouter, Flex);
            # a plain queue carries nothing but its name.
            verb = (f"<Enqueue{workflow}><Task>{escape(task)}</Task></Enqueue>"
                    if mapping.workflow_sid else
                    f"<Enqueue>{escape(target.address)}</Enqueue>")
        return f'<?xml version="1.0" encoding="UTF-8"?><Response>{verb}</Response>'

    if target.kind == "acs":
        raise ValueError("acs: targets are reached through ACS's transfer, not TwiML")
    full = False
    for name, value in pairs:
        carried = _carried(target, mapping, name, value, len(sent))
        if name == CALL_ID_NAME and carried != value:
            carried = None  # the call's id goes whole or not at all: cut, it names nothing
        if full or carried is None:
            dropped.append(name)
            continue
        sent[name] = carried
        if len(render()) > mapping.twiml_chars or (
                target.kind == "sip" and len(_sip_uri(target.address, sent).encode())
                > mapping.sip_uri_bytes):
            del sent[name]
            dropped.append(name)
            full = True  # every later name is dropped: the order stays the policy's
            continue
        if carried != value:
            truncated.append(name)
    return HandOffPlan(target, render(), sent, tuple(dropped), tuple(truncated))


def _carried(target: Target, mapping: HandOffMapping, name: str, value: str,
             count: int) -> str | None:
    """The value ``name`` goes along with to ``target`` (cut to its limit), or None when
    the target cannot take it."""
    if target.kind == "tel" or (target.kind == "queue" and not mapping.workflow_sid):
        return None  # a number or a plain queue carries nothing
    if target.kind == "client":
        if len(name.encode()) > mapping.client_name_bytes or (
                count >= mapping.client_max_parameters):
            return None
        return _cut(value, mapping.client_value_bytes)
    if target.kind == "sip":
        if not _SIP_TOKEN.fullmatch(name):
            return None
        return _cut(value, mapping.sip_value_bytes)
    return value


# ACS: a custom header's name, with its prefix, is at most this long.
ACS_HEADER_NAME_CHARS: Final = 64
ACS_SIP_PREFIX: Final = "X-MS-Custom-"
ACS_MAX_VOIP_HEADERS: Final = 1000
# The operation context a hand-off's ACS transfer carries (then the call's id): its
# callbacks are told apart by it.
ACS_OPERATION_PREFIX: Final = "streamsvc-hand-off:"


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """What an ACS transfer carries: ``sip`` headers (named with their ``X-MS-Custom-``
    prefix, to a phone number) or ``voip`` headers (to an ACS user); ``sent`` by the
    context's names."""

    target: Target
    sip: dict[str, str]
    voip: dict[str, str]
    sent: dict[str, str]
    dropped: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()


def plan_acs_headers(target: Target, call_id: str, context: Mapping[str, str],
                     mapping: HandOffMapping, *,
                     parameters: Mapping[str, str] | None = None) -> HeaderPlan:
    """The custom calling context of an ACS transfer to ``target`` (``tel:``: SIP
    headers; ``acs:``: VoIP headers) under ACS's limits; ValueError for other targets."""
    if target.kind not in ("tel", "acs"):
        raise ValueError("an ACS call is transferred to tel:<E.164> or acs:<user id>")
    sip = target.kind == "tel"
    prefix = ACS_SIP_PREFIX if sip else ""
    most = mapping.acs_sip_headers if sip else ACS_MAX_VOIP_HEADERS
    value_chars = mapping.acs_sip_value_chars if sip else mapping.acs_voip_value_chars
    headers: dict[str, str] = {}
    sent: dict[str, str] = {}
    dropped: list[str] = []
    truncated: list[str] = []
    for name, value in ordered(call_id, context, parameters or {}, mapping):
        header = prefix + name
        carried = value[:value_chars]
        if (len(headers) >= most or len(header) > ACS_HEADER_NAME_CHARS
                or (sip and not _SIP_TOKEN.fullmatch(name))
                or (name == CALL_ID_NAME and carried != value)):
            dropped.append(name)
            continue
        headers[header] = carried
        sent[name] = carried
        if carried != value:
            truncated.append(name)
    return HeaderPlan(target, headers if sip else {}, {} if sip else headers, sent,
                      tuple(dropped), tuple(truncated))


def plan_sip_headers(target: Target, call_id: str, context: Mapping[str, str],
                     mapping: HandOffMapping, *,
                     parameters: Mapping[str, str] | None = None) -> HeaderPlan:
    """The ``X-`` headers of a SIP transfer to ``target`` (``sip:`` or ``tel:``; Telnyx's
    ``custom_headers``): values up to ``sip_value_bytes``, names and values together up to
    ``sip_uri_bytes``; ValueError for other targets."""
    if target.kind not in ("sip", "tel"):
        raise ValueError("a SIP transfer goes to sip:<uri> or tel:<E.164>")
    headers: dict[str, str] = {}
    sent: dict[str, str] = {}
    dropped: list[str] = []
    truncated: list[str] = []
    left = mapping.sip_uri_bytes
    full = False
    for name, value in ordered(call_id, context, parameters or {}, mapping):
        carried = _cut(value, mapping.sip_value_bytes)
        cost = len(f"X-{name}: {carried}".encode())
        if (full or not _SIP_TOKEN.fullmatch(name)
                or (name == CALL_ID_NAME and carried != value)):
            dropped.append(name)
            continue
        if cost > left:
            full = True
            dropped.append(name)
            continue
        left -= cost
        headers[f"X-{name}"] = carried
        sent[name] = carried
        if carried != value:
            truncated.append(name)
    return HeaderPlan(target, headers, {}, sent, tuple(dropped), tuple(truncated))


def _sip_uri(uri: str, headers: Mapping[str, str]) -> str:
    """``uri`` with ``headers`` as ``X-`` headers in its query (percent-encoded)."""
    if not headers:
        return uri
    query = "&".join(f"X-{name}={quote(value, safe='')}" for name, value in headers.items())
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


# Genesys's disconnect.outputVariables (Architect flow variables): how many a hand-off sets
# and the characters of one value (Genesys's text messages stay within 64 KiB).
OUTPUT_VARIABLES_MAX: Final = 64
OUTPUT_VALUE_CHARS: Final = 1024
TARGET_NAME: Final = "streamsvc_target"


def plan_output_variables(target: Target, call_id: str, context: Mapping[str, str],
                          mapping: HandOffMapping, *,
                          parameters: Mapping[str, str] | None = None) -> HeaderPlan:
    """The ``outputVariables`` of a Genesys ``disconnect`` handing the call to ``target``:
    the call's id, the target (``streamsvc_target``, for the Architect flow to route on),
    then the route's selection, at most :data:`OUTPUT_VARIABLES_MAX` names, values cut to
    :data:`OUTPUT_VALUE_CHARS`. Any target kind is taken: the flow decides."""
    sent: dict[str, str] = {}
    dropped: list[str] = []
    truncated: list[str] = []
    pairs = ordered(call_id, context, parameters or {}, mapping)
    pairs.insert(1, (TARGET_NAME, str(target)))
    for name, value in pairs:
        carried = value[:OUTPUT_VALUE_CHARS]
        if len(sent) >= OUTPUT_VARIABLES_MAX or name in sent or (
                name in (CALL_ID_NAME, TARGET_NAME) and carried != value):
            dropped.append(name)
            continue
        sent[name] = carried
        if carried != value:
            truncated.append(name)
    return HeaderPlan(target, {}, {}, sent, tuple(dropped), tuple(truncated))
