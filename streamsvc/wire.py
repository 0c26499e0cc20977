"""The common typed events every provider's frames become, and Twilio's wire format (the
default provider). Defined in :mod:`streamsvc.providers.twilio`; kept here as the name
handlers and tests import (``from streamsvc import wire``; ``wire.Media``)."""

from __future__ import annotations

from .providers.twilio import (
    EVENT_NAMES,
    BinaryFrame,
    Connected,
    Dtmf,
    Event,
    Mark,
    Media,
    MediaFormat,
    Start,
    Stop,
    UnknownEvent,
    _DtmfBody,
    _MarkBody,
    _MediaBody,
    _StartBody,
    _StopBody,
    parse,
    parse_media,
    serialize_clear,
    serialize_mark,
    serialize_media,
    text_only,
)

__all__ = [
    "EVENT_NAMES",
    "BinaryFrame",
    "Connected",
    "Dtmf",
    "Event",
    "Mark",
    "Media",
    "MediaFormat",
    "Start",
    "Stop",
    "UnknownEvent",
    "parse",
    "parse_media",
    "serialize_clear",
    "serialize_mark",
    "serialize_media",
    "text_only",
]
# The nested bodies, for codecs and tests that build events: not part of the public API.
_BODIES = (_DtmfBody, _MarkBody, _MediaBody, _StartBody, _StopBody)
