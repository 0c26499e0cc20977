"""The voice webhook's answer in each provider's own form (the registry row's ``webhook``),
I/O-free: what the provider fetches when a call comes in, starting a stream to the route.

* ``twiml`` (Twilio) and ``cxml`` (SignalWire): ``<Start><Stream>`` or ``<Connect><Stream>``
  with ``<Parameter>``s (:func:`streamsvc.context.twiml.render_stream_twiml`); cXML carries
  ``authBearerToken`` when ``signalwire_token`` is set (SignalWire's cXML ``<Stream>`` page);
* ``texml`` (Telnyx): the same verbs, which TeXML takes as TwiML does (Telnyx's TeXML/TwiML
  compatibility page), bidirectional streams with ``bidirectionalMode="rtp"``;
* ``plivo``: ``<Response><Stream bidirectional keepCallAlive contentType extraHeaders>``
  with the URL as its text; ``extraHeaders`` is ``k=v,k=v``, letters and digits only, at
  most 512 bytes (Plivo's Stream XML page);
* ``exotel``: the Voicebot/Stream applet's dynamic endpoint, ``{"url": "wss://…?k=v"}``: at
  most 3 query parameters and 256 characters of them reach the stream (Exotel's applet
  guide).

Each renderer takes the stream URL, the call's context (name -> value, in budget order)
and whether the route is bidirectional, and returns the document, its content type, and the
context names it had to leave out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape, quoteattr

import orjson

__all__ = [
    "EXOTEL_MAX_PARAMETERS",
    "EXOTEL_MAX_QUERY_CHARS",
    "PLIVO_MAX_EXTRA_HEADERS_BYTES",
    "Answer",
    "exotel_endpoint",
    "plivo_xml",
]

PLIVO_MAX_EXTRA_HEADERS_BYTES: Final = 512
EXOTEL_MAX_PARAMETERS: Final = 3
EXOTEL_MAX_QUERY_CHARS: Final = 256
_NOT_ALPHANUMERIC: Final = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True, slots=True)
class Answer:
    """A voice webhook's answer: the document, its content type, the context it carries
    and the names it left out (over the form's budget, or nothing left of them)."""

    body: bytes
    content_type: str
    parameters: dict[str, str]
    left_out: tuple[str, ...] = ()


def plivo_xml(url: str, context: Mapping[str, str], *, bidirectional: bool,
              sample_rate: int = 8000) -> Answer:
    """Plivo's ``<Stream>``: the context as ``extraHeaders`` (letters and digits only, names
    and values stripped of anything else; what would pass 512 bytes is left out)."""
    kept: dict[str, str] = {}
    left_out: list[str] = []
    for name, value in context.items():
        clean_name, clean_value = _NOT_ALPHANUMERIC.sub("", name), _NOT_ALPHANUMERIC.sub(
            "", value)
        trial = {**kept, clean_name: clean_value}
        if not clean_name or not clean_value or clean_name in kept or len(
                _extra_headers(trial).encode()) > PLIVO_MAX_EXTRA_HEADERS_BYTES:
            left_out.append(name)
            continue
        kept = trial
    content_type = f"audio/x-mulaw;rate={sample_rate}"
    attributes = (f"bidirectional={quoteattr(str(bidirectional).lower())}"
                  f" keepCallAlive=\"true\" contentType={quoteattr(content_type)}")
    if kept:
        attributes += f" extraHeaders={quoteattr(_extra_headers(kept))}"
    document = (f'<?xml version="1.0" encoding="UTF-8"?><Response>'
                f"<Stream {attributes}>{escape(url)}</Stream></Response>")
    return Answer(document.encode(), "application/xml", kept, tuple(left_out))


def _extra_headers(headers: Mapping[str, str]) -> str:
    return ",".join(f"{name}={value}" for name, value in headers.items())


def exotel_endpoint(url: str, context: Mapping[str, str], *,
                    credentials: str | None = None) -> Answer:
    """Exotel's dynamic endpoint: the stream URL with at most
    :data:`EXOTEL_MAX_PARAMETERS` context parameters in its query, within
    :data:`EXOTEL_MAX_QUERY_CHARS`; ``credentials`` (``KEY:TOKEN``) go in the URL's userinfo
    as the applet's own ``wss://KEY:TOKEN@host`` form has them."""
    kept: dict[str, str] = {}
    left_out: list[str] = []
    for name, value in context.items():
        trial = {**kept, name: value}
        if (len(trial) > EXOTEL_MAX_PARAMETERS
                or len(urlencode(trial)) > EXOTEL_MAX_QUERY_CHARS):
            left_out.append(name)
            continue
        kept = trial
    parts = urlsplit(url)
    netloc = parts.netloc
    if credentials:
        key, _, token = credentials.partition(":")
        netloc = f"{quote(key, safe='')}:{quote(token, safe='')}@{netloc}"
    target = urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), ""))
    return Answer(orjson.dumps({"url": target}), "application/json", kept, tuple(left_out))
