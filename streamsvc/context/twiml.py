"""Passing call context into the stream: from the voice webhook's fields to ``<Parameter>``s.

Twilio strips query strings from stream URLs (Twilio's Media Streams pages), so the only road for
a call's context into the stream is ``<Parameter>`` in the TwiML the app returns. This module
is I/O-free: :func:`select_parameters` maps a webhook request's fields to parameters under a
byte budget, :func:`render_stream_twiml` writes the TwiML.

Which fields become parameters (per route, ``[routes.context]``):

* ``query``: the webhook URL's own query parameters that are not Twilio's fields (the REST
  API's ``Url=https://host/twiml?customerID=42``); ``"*"`` for all (default) or a list;
* ``sip_headers``: ``SipHeader_X-*`` fields, named without the ``SipHeader_X-`` prefix;
  ``"*"`` (default) or a list of names as they will be called;
* ``custom_fields``: other fields that are not Twilio's (Voice SDK connect params);
  ``"*"`` (default) or a list;
* ``webhook_fields``: Twilio's own fields to pass, default ``["From", "To", "CallSid"]``;
* ``rename``: ``{field = "parameter name"}``;
* ``priority``: parameter names kept first when over budget;
* ``budget_bytes``: the budget (default 800, Twilio's guidance).

Names and values lose the characters XML cannot carry (control characters, lone
surrogates) before they are counted; a name with nothing left is skipped.

Budget policy, deterministic: parameters are taken in order (``priority`` names first, in
their order; then query parameters, SIP headers and custom fields, each sorted by name; then
``webhook_fields`` in their order). Each costs the UTF-8 bytes of its name and value. A
parameter that fits is kept whole; the first one that does not is truncated to the bytes
left, never splitting a UTF-8 character, if at least its name and one character fit;
every parameter after that, and one that cannot be truncated, is dropped. Before that,
Twilio's own rule for each parameter applies: name and value together under 500 characters
(:data:`MAX_PARAMETER_CHARS`), a longer value cut to fit, a name that long dropped. What
was dropped or truncated is reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from streamsvc.exceptions import ConfigError

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "TWILIO_VOICE_FIELDS",
    "ContextMapping",
    "ParameterSelection",
    "render_stream_twiml",
    "select_parameters",
]

DEFAULT_BUDGET_BYTES: Final = 800
# Twilio: each <Parameter>'s name and value together must be under 500 characters.
MAX_PARAMETER_CHARS: Final = 499
SIP_HEADER_PREFIX: Final = "SipHeader_X-"

# Fields Twilio itself puts in a voice webhook request (its "request parameters"); anything
# else in the query or the body is the application's own context.
TWILIO_VOICE_FIELDS: Final = frozenset({
    "AccountSid", "AddOns", "ApiVersion", "CallSid", "CallStatus", "CallToken", "Called",
    "CalledCity", "CalledCountry", "CalledState", "CalledZip", "Caller", "CallerCity",
    "CallerCountry", "CallerName", "CallerState", "CallerZip", "Digits", "Direction",
    "FinishedOnKey", "ForwardedFrom", "From", "FromCity", "FromCountry", "FromState",
    "FromZip", "Msg", "ParentCallSid", "RecordingSid", "RecordingUrl", "SipCallId",
    "SipDomain", "SipDomainSid", "SipSourceIp", "SpeechResult", "Confidence",
    "StirPassportToken", "StirVerstat", "To", "ToCity", "ToCountry", "ToState", "ToZip",
    "DialCallStatus", "DialCallSid", "DialCallDuration", "QueueResult", "QueueSid",
    "QueueTime", "Timestamp", "CallbackSource", "SequenceNumber", "StreamSid",
    "StreamName", "StreamEvent", "StreamError",
})


@dataclass(frozen=True, slots=True)
class ContextMapping:
    """Which webhook fields become stream parameters, and the budget (module docstring)."""

    query: str | tuple[str, ...] = "*"
    sip_headers: str | tuple[str, ...] = "*"
    custom_fields: str | tuple[str, ...] = "*"
    webhook_fields: tuple[str, ...] = ("From", "To", "CallSid")
    rename: Mapping[str, str] = field(default_factory=dict)
    priority: tuple[str, ...] = ()
    budget_bytes: int = DEFAULT_BUDGET_BYTES

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, key: str) -> ContextMapping:
        """Build from a ``[routes.context]`` TOML table; :class:`ConfigError` names the key."""
        known = {"query", "sip_headers", "custom_fields", "webhook_fields", "rename",
                 "priority", "budget_bytes"}
        for name in table:
            if name not in known:
                raise ConfigError(f"{key}.{name}", f"unknown; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name in ("query", "sip_headers", "custom_fields"):
            if name in table:
                values[name] = star_or_names(table[name], f"{key}.{name}")
        for name in ("webhook_fields", "priority"):
            if name in table:
                values[name] = names_of(table[name], f"{key}.{name}")
        if "rename" in table:
            values["rename"] = rename_of(table["rename"], f"{key}.rename")
        if "budget_bytes" in table:
            budget = table["budget_bytes"]
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                raise ConfigError(f"{key}.budget_bytes", f"must be a whole number >= 0, "
                                  f"got {budget!r}")
            values["budget_bytes"] = budget
        return cls(**values)


def star_or_names(value: Any, key: str) -> str | tuple[str, ...]:
    if value == "*":
        return "*"
    return names_of(value, key)


def rename_of(value: Any, key: str) -> dict[str, str]:
    """A ``rename`` table (``{name = "new name"}``); :class:`ConfigError` naming ``key``."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
        raise ConfigError(key, 'must be a table of name = "new name"')
    return dict(value)


def names_of(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f'must be "*" or an array of names, got {value!r}')
    return tuple(value)


@dataclass(frozen=True, slots=True)
class ParameterSelection:
    """The parameters chosen for the stream, in order, and what the budget cost."""

    parameters: dict[str, str]
    budget_bytes: int
    used_bytes: int
    dropped: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()

    @property
    def over_budget(self) -> bool:
        return bool(self.dropped or self.truncated)

    def report(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes,
                "dropped": list(self.dropped), "truncated": list(self.truncated)}


def _size(name: str, value: str) -> int:
    return len(name.encode()) + len(value.encode())


def candidates(fields: Mapping[str, str], query: Mapping[str, str],
               mapping: ContextMapping) -> list[tuple[str, str]]:
    """The (parameter name, value) pairs the mapping asks for, in budget order."""
    def wanted(selector: str | tuple[str, ...], name: str) -> bool:
        return selector == "*" or name in selector

    def named(source: str) -> str:
        return mapping.rename.get(source, source)

    from_query = sorted((named(k), v) for k, v in query.items()
                        if k not in TWILIO_VOICE_FIELDS and not k.startswith(SIP_HEADER_PREFIX)
                        and wanted(mapping.query, k))
    sip = sorted((named(k[len(SIP_HEADER_PREFIX):]), v) for k, v in fields.items()
                 if k.startswith(SIP_HEADER_PREFIX) and k != SIP_HEADER_PREFIX
                 and wanted(mapping.sip_headers, k[len(SIP_HEADER_PREFIX):]))
    custom = sorted((named(k), v) for k, v in fields.items()
                    if k not in TWILIO_VOICE_FIELDS and not k.startswith("SipHeader_")
                    and k not in query and wanted(mapping.custom_fields, k))
    twilio = [(named(k), fields[k]) for k in mapping.webhook_fields if k in fields]
    ordered: dict[str, str] = {}
    for name, value in [*from_query, *sip, *custom, *twilio]:
        # Counted as written: without what XML cannot carry; a name with nothing left
        # is no parameter. The first source of a name wins.
        name = xml_safe(name)
        if name:
            ordered.setdefault(name, xml_safe(value))
    first = [(n, ordered[n]) for n in mapping.priority if n in ordered]
    rest = [(n, v) for n, v in ordered.items() if n not in mapping.priority]
    return [*first, *rest]


def select_parameters(fields: Mapping[str, str], query: Mapping[str, str],
                      mapping: ContextMapping) -> ParameterSelection:
    """Apply ``mapping`` and its budget to a webhook request: ``fields`` are all of its
    fields (body and query), ``query`` the URL's query parameters."""
    kept: dict[str, str] = {}
    dropped: list[str] = []
    truncated: list[str] = []
    left = mapping.budget_bytes
    full = False
    for name, whole in candidates(fields, query, mapping):
        value = whole[: max(0, MAX_PARAMETER_CHARS - len(name))]
        if (not value and whole) or len(name) >= MAX_PARAMETER_CHARS:
            dropped.append(name)  # Twilio's per-parameter limit leaves nothing of it
            continue
        cut = value != whole
        cost = _size(name, value)
        if not full and cost <= left:
            kept[name] = value
            left -= cost
            if cut:
                truncated.append(name)
            continue
        if not full:
            full = True
            room = left - len(name.encode())
            shortened = value.encode()[: max(0, room)].decode("utf-8", "ignore")
            if shortened:
                kept[name] = shortened
                left -= _size(name, shortened)
                truncated.append(name)
                continue
        dropped.append(name)
    return ParameterSelection(kept, mapping.budget_bytes, mapping.budget_bytes - left,
                              tuple(dropped), tuple(truncated))


_TRACKS: Final = ("inbound_track", "outbound_track", "both_tracks")
# Twilio ends a call when its TwiML runs out, and <Start><Stream> goes on at once: with no
# follow-on verbs the caller would be cut as the stream starts. This keeps the call (and its
# stream) up until the caller hangs up, or for Twilio's default 4-hour call limit.
KEEP_CALL_UP_TWIML: Final = '<Pause length="14400"/>'
# Characters XML 1.0 cannot carry at all, even escaped.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """``text`` without the characters XML cannot carry (control characters, lone
    surrogates); everything else is kept and escaped when written."""
    return _NOT_XML.sub("", text)


def render_stream_twiml(url: str, parameters: Mapping[str, str], *, connect: bool,
                        track: str = "inbound_track", status_callback: str | None = None,
                        status_callback_method: str = "POST", after: str = "",
                        action: str | None = None,
                        stream_attributes: Mapping[str, str] | None = None) -> str:
    """TwiML that starts a stream to ``url`` carrying ``parameters``: ``<Connect><Stream>``
    (bidirectional; Twilio streams only the inbound track there) or ``<Start><Stream>``
    followed by ``after`` (TwiML verbs, e.g. ``<Dial>+15550100</Dial>``; without any,
    :data:`KEEP_CALL_UP_TWIML`, so that the call is not hung up at once). Everything is
    XML-escaped, without the characters XML cannot carry. Raises ValueError for a URL with a
    query string (Twilio would strip it), a URL that is not ws(s)://, an unknown track, a
    parameter name with nothing left or two that become one, or an ``after`` that is not
    TwiML. ``stream_attributes`` are added to ``<Stream>`` as they are (escaped): the
    dialects' own (cXML's ``authBearerToken``, TeXML's ``bidirectionalMode``)."""
    if not re.match(r"wss?://[^/?#\s]+(/[^?#\s]*)?$", url):
        raise ValueError(f"stream url must be ws:// or wss:// with no query string: {url!r}")
    if track not in _TRACKS:
        raise ValueError(f"track must be one of {', '.join(_TRACKS)}: {track!r}")
    attributes = f"url={quoteattr(url)}"
    if not connect:
        attributes += f" track={quoteattr(track)}"
    if status_callback:
        if status_callback_method not in ("GET", "POST"):
            raise ValueError(f"statusCallbackMethod must be GET or POST: "
                             f"{status_callback_method!r}")
        attributes += (f" statusCallback={quoteattr(status_callback)}"
                       f" statusCallbackMethod={quoteattr(status_callback_method)}")
    for name, value in (stream_attributes or {}).items():
        attributes += f" {name}={quoteattr(xml_safe(value))}"
    cleaned = {xml_safe(name): xml_safe(value) for name, value in parameters.items()}
    if "" in cleaned or len(cleaned) < len(parameters):
        raise ValueError("parameter names must keep at least one character XML can carry and "
                         f"stay distinct without the others: {list(parameters)!r}")
    children = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>"
        for name, value in cleaned.items())
    stream = f"<Stream {attributes}>{children}</Stream>"
    if not connect and not after.strip():
        after = KEEP_CALL_UP_TWIML
    connect_attributes = f" action={quoteattr(action)}" if action else ""
    verb = (f"<Connect{connect_attributes}>{stream}</Connect>" if connect
            else f"<Start>{stream}</Start>{after}")
    document = f'<?xml version="1.0" encoding="UTF-8"?><Response>{verb}</Response>'
    try:
        ElementTree.fromstring(document.encode())
    except ElementTree.ParseError as exc:
        raise ValueError(f"follow-on TwiML is not well-formed XML: {exc}") from None
    return document


def parameters_from_twiml(document: str) -> dict[str, str]:
    """The ``<Parameter>`` name/value pairs of a TwiML document, in order (for tests and
    for checking a TwiML Bin)."""
    root = ElementTree.fromstring(document.encode())
    return {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}


def parse_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` from the command line -> ``{"k": "v"}``; ValueError otherwise."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, found, value = pair.partition("=")
        if not found or not name:
            raise ValueError(f"expected NAME=VALUE, got {pair!r}")
        result[name] = value
    return result

