"""The service's common events and the codec contract every provider implements.

Every provider's codec (:mod:`streamsvc.providers`) turns its own frames into the events
below, and handlers see only these (``from streamsvc import wire``; ``wire.Media``). They
keep Twilio's shapes (Twilio's frames decode straight into them, the fast path): immutable
structs with Twilio's nesting (``start.start.call_sid``) and flat read-only properties
(``start.call_sid``). Numeric strings on the wire (``"sequenceNumber":"12"``) become
``int``; a well-formed message with an event this version does not know is an
:class:`UnknownEvent` that the session ignores and counts.

:class:`Codec` is the whole contract between a provider's wire format and the rest of the
service: what it parses, what it sends, and the facts about its streams that the session,
the live session and the summary need (optional parts declared with their defaults).
:class:`Upgrade` is what a codec and a credential check see of the WebSocket upgrade.
:func:`parse` turns any frame of the events' JSON form (Twilio's) into one event or raises
:class:`~streamsvc.exceptions.RemoteProtocolError` with a reason; :func:`parse_media` is its
hot path for ``media`` frames (~97% of traffic): a typed decode of the raw bytes straight
into a :class:`Media` struct, base64 payload included, with no dicts built; whenever a frame
is not a valid media message it falls back to :func:`parse`, so both always give the same
answer (``tests/test_wire_properties.py``). The payload is decoded from base64 in the same C
pass that parses the frame: measured cheaper than decoding it later (``python -m bench
parse``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol, TypeAlias

import msgspec

from streamsvc.exceptions import LocalProtocolError, RemoteProtocolError

__all__ = [
    "EVENT_NAMES",
    "FRAME_MS",
    "Batch",
    "BinaryFrame",
    "Codec",
    "Connected",
    "Dtmf",
    "Event",
    "Mark",
    "Media",
    "MediaFormat",
    "Noted",
    "Start",
    "Stop",
    "UnknownEvent",
    "Upgrade",
    "loose_int",
    "parse",
    "parse_media",
    "serialize_clear",
    "serialize_mark",
    "serialize_media",
    "tagged_object",
    "text_only",
]

# Audio frames are 20 ms on every provider unless its codec says otherwise (Exotel: 100).
FRAME_MS: Final = 20
# The tracks a stream has unless its codec says otherwise.
TWO_TRACKS: Final = frozenset({"inbound", "outbound"})
# Twilio streams 8 kHz mu-law, nothing else.
TWILIO_RATES: Final = frozenset({8000})

# Twilio sends numbers as strings ("sequenceNumber": "12"); non-strict decoding turns them
# into ints. Bounds keep them exact in every JSON reader (2**53) and reject negatives.
WireInt = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class _Struct(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    """Base of the wire structs: immutable, slotted, not tracked by the cycle collector
    (they hold no cycles), field names in camelCase on the wire."""


class MediaFormat(_Struct, frozen=True):
    """``start.mediaFormat``: in practice ``audio/x-mulaw``, 8000 Hz, 1 channel. Unlike the
    other numbers these two are JSON numbers on the wire (Twilio's Media Streams pages)."""

    encoding: str
    sample_rate: WireInt
    channels: WireInt


class Connected(_Struct, frozen=True, tag="connected", tag_field="event"):
    """First message of a stream: ``{"event":"connected","protocol":"Call","version":…}``.
    Both fields are optional: captures show ``1.0.0`` and the older ``0.2.0``."""

    protocol: str | None = None
    version: str | None = None


class _StartBody(_Struct, frozen=True):
    account_sid: str | None  # null on providers without accounts in the stream (Telnyx)
    stream_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    media_format: MediaFormat
    # May be {} or absent altogether (Twilio's Media Streams pages); values are strings.
    custom_parameters: dict[str, str] = {}


class Start(_Struct, frozen=True, tag="start", tag_field="event"):
    """The stream's metadata; the session is built from it."""

    start: _StartBody
    sequence_number: WireInt | None = None
    stream_sid: str | None = None

    @property
    def call_sid(self) -> str:
        return self.start.call_sid

    @property
    def account_sid(self) -> str | None:
        return self.start.account_sid

    @property
    def started_stream_sid(self) -> str:
        """The stream's id as ``start.streamSid`` gives it (authoritative over the
        top-level ``streamSid``, which Twilio repeats)."""
        return self.start.stream_sid

    @property
    def tracks(self) -> tuple[str, ...]:
        return self.start.tracks

    @property
    def media_format(self) -> MediaFormat:
        return self.start.media_format

    @property
    def custom_parameters(self) -> Mapping[str, str]:
        return self.start.custom_parameters


# Media structs forbid unknown keys so that the fast path only takes frames in exactly
# Twilio's layout (every byte of which it then checks); parse() drops unknown keys first.
class _MediaBody(_Struct, frozen=True, forbid_unknown_fields=True):
    track: str
    chunk: WireInt
    timestamp: WireInt
    payload: bytes  # base64 on the wire, decoded while parsing


class Media(_Struct, frozen=True, tag="media", tag_field="event", forbid_unknown_fields=True):
    """One audio frame of one track: 20 ms, 160 bytes of mu-law in practice."""

    stream_sid: str
    media: _MediaBody
    sequence_number: WireInt | None = None

    @property
    def track(self) -> str:
        """``inbound`` or ``outbound``."""
        return self.media.track

    @property
    def chunk(self) -> int:
        return self.media.chunk

    @property
    def timestamp_ms(self) -> int:
        """Milliseconds since the stream started; the first frame's is not 0."""
        return self.media.timestamp

    @property
    def payload(self) -> bytes:
        """The audio, decoded from base64 (already done while parsing)."""
        return self.media.payload


# A key press is one key of the telephone keypad (RFC 4733's events 0-15).
DtmfDigit = Annotated[str, msgspec.Meta(pattern="^[0-9*#A-D]$")]


class _DtmfBody(_Struct, frozen=True):
    track: str
    digit: DtmfDigit


class Dtmf(_Struct, frozen=True, tag="dtmf", tag_field="event"):
    """A key press; only on bidirectional streams. ``track`` is ``inbound_track``."""

    dtmf: _DtmfBody
    stream_sid: str | None = None
    sequence_number: WireInt | None = None

    @property
    def digit(self) -> str:
        return self.dtmf.digit

    @property
    def track(self) -> str:
        return self.dtmf.track


class _MarkBody(_Struct, frozen=True):
    name: str


class Mark(_Struct, frozen=True, tag="mark", tag_field="event"):
    """Playback reached a mark the server sent, or a ``clear`` flushed it."""

    mark: _MarkBody
    stream_sid: str | None = None
    sequence_number: WireInt | None = None

    @property
    def name(self) -> str:
        return self.mark.name


class _StopBody(_Struct, frozen=True):
    account_sid: str | None = None
    call_sid: str | None = None


class Stop(_Struct, frozen=True, tag="stop", tag_field="event"):
    """The stream ended on Twilio's side. Never sent when the server closes first."""

    stream_sid: str | None = None
    sequence_number: WireInt | None = None
    stop: _StopBody = _StopBody()


class BinaryFrame(bytes):
    """An outbound message to send as a binary WebSocket frame (Vonage's audio); every
    other outbound message is text."""

    __slots__ = ()


def text_only(frame: bytes | str) -> Event:
    """``parse_binary`` of the providers that send text frames only: every binary frame
    is a bad frame."""
    raise RemoteProtocolError("binary frame: this provider sends text frames only")


class UnknownEvent(msgspec.Struct, frozen=True, gc=False):
    """A well-formed message whose ``event`` this version does not know; ignore it."""

    name: str


class Noted(msgspec.Struct, frozen=True, gc=False):
    """A message the codec answered itself (session housekeeping: Genesys's ``ping``,
    ``paused``, ``error``; Asterisk's ``STATUS``): not the handlers' business, never
    counted as ignored. With ``log`` set the server logs it as ``<provider>.<name>`` with
    ``fields`` (``level``: ``info`` or ``warning``)."""

    name: str
    fields: dict[str, object] = {}
    log: bool = False
    level: str = "info"


class Batch(msgspec.Struct, frozen=True, gc=False):
    """Several events from one message: the two channels of a stereo audio frame (Genesys,
    jambonz), the marks one playback acknowledgement resolves. The session takes them in
    order, as if each had come alone."""

    events: tuple[Event, ...]


Event: TypeAlias = (Connected | Start | Media | Dtmf | Mark | Stop | UnknownEvent | Noted
                    | Batch)

_EVENT_TYPES: Final[dict[str, type[Connected | Start | Media | Dtmf | Mark | Stop]]] = {
    "connected": Connected,
    "start": Start,
    "media": Media,
    "dtmf": Dtmf,
    "mark": Mark,
    "stop": Stop,
}
EVENT_NAMES: Final = frozenset(_EVENT_TYPES)

_any_decoder: Final = msgspec.json.Decoder()


def tagged_object(frame: bytes | str, tag: str) -> tuple[dict[str, object], str]:
    """``frame`` as a JSON object and the string under its ``tag`` key (Twilio's ``event``,
    ACS's ``kind``). Raises :class:`RemoteProtocolError` when it is not JSON, not an object,
    or has no string ``tag``."""
    try:
        message = _any_decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise RemoteProtocolError(f"not a JSON object: {type(message).__name__}")
    name = message.get(tag)
    if not isinstance(name, str):
        raise RemoteProtocolError(f"missing or non-string `{tag}`")
    return message, name


# The events' JSON form: Twilio's, which SignalWire speaks too (Twilio's Media Streams pages).


class _NoEvent(msgspec.Struct, tag="", tag_field="event"):
    """Never matches a real frame. Decoding ``Media | _NoEvent`` makes the ``event`` tag
    required: decoding a lone tagged struct would accept a frame without one."""


_media_decoder: Final = msgspec.json.Decoder(Media | _NoEvent, strict=False)
_DECODERS: Final[dict[type[Any], msgspec.json.Decoder[Any]]] = {
    event_type: msgspec.json.Decoder(event_type, strict=False)
    for event_type in _EVENT_TYPES.values()}


def loose_int(value: object) -> int | None:
    """A number a message carries in a field the service does not use (a start's
    sequence number): the number when it is one (``12``, ``"12"``), else None, never an
    error."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 16:
        return int(value)
    return None


def _lenient_start(message: dict[str, object]) -> dict[str, object]:
    """A ``start`` without the top-level fields the service does not use when they hold
    what the event cannot (the sequence number, the repeated stream id)."""
    if "sequenceNumber" in message:
        message = {**message, "sequenceNumber": loose_int(message["sequenceNumber"])}
    if not isinstance(message.get("streamSid"), str | None):
        message = {key: value for key, value in message.items() if key != "streamSid"}
    return message


def parse(frame: bytes | str) -> Event:
    """Parse one inbound text frame (raw bytes or str) into a typed event.

    Raises :class:`RemoteProtocolError` when the frame is not JSON, not an object, has no
    string ``event``, or when a known event misses a field or has one of the wrong type; the
    reason names the offending path (``$.media.timestamp``).
    """
    message, name = tagged_object(frame, "event")
    event_type = _EVENT_TYPES.get(name)
    if event_type is None:
        return UnknownEvent(name)
    if event_type is Media:
        message = _known_media_keys(message)
    elif event_type is Start:
        message = _lenient_start(message)
    try:
        # Not msgspec.convert: it works out the type's fields on every call, and leaves
        # reference cycles for the garbage collector; a decoder per type does it once.
        event: Event = _DECODERS[event_type].decode(msgspec.json.encode(message))
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(f"invalid {name}: {exc}") from None
    return event


_MEDIA_KEYS: Final = frozenset({"event", "streamSid", "sequenceNumber", "media"})
_MEDIA_BODY_KEYS: Final = frozenset({"track", "chunk", "timestamp", "payload"})


def _known_media_keys(message: dict[str, object]) -> dict[str, object]:
    """``message`` without the keys :class:`Media` does not know (unknown keys are ignored,
    as for every other event)."""
    known = {key: value for key, value in message.items() if key in _MEDIA_KEYS}
    body = known.get("media")
    if isinstance(body, dict):
        known["media"] = {key: value for key, value in body.items() if key in _MEDIA_BODY_KEYS}
    return known


def parse_media(frame: bytes | str) -> Event:
    """Parse one inbound frame, fast when it is a valid ``media`` message.

    Same result and same errors as :func:`parse` for every input: the typed decoder is tried
    first and any frame it does not accept as media goes through :func:`parse`.
    """
    # Media forbids unknown keys: a typed decoder would skip them without checking their
    # UTF-8, so any frame with more than Twilio's keys goes through parse() instead.
    try:
        event = _media_decoder.decode(frame)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return parse(frame)
    if type(event) is Media:
        return event
    return parse(frame)


# Outbound: exactly Twilio's three shapes, keys in the documented order (Twilio's Media
# Streams pages).


class _OutMediaBody(msgspec.Struct, gc=False):
    payload: bytes  # encoded as base64


class _OutMedia(msgspec.Struct, gc=False, tag="media", tag_field="event", rename="camel"):
    stream_sid: str
    media: _OutMediaBody


class _OutMarkBody(msgspec.Struct, gc=False):
    name: str


class _OutMark(msgspec.Struct, gc=False, tag="mark", tag_field="event", rename="camel"):
    stream_sid: str
    mark: _OutMarkBody


class _OutClear(msgspec.Struct, gc=False, tag="clear", tag_field="event", rename="camel"):
    stream_sid: str


_encoder: Final = msgspec.json.Encoder()


def serialize_media(stream_sid: str, payload: bytes) -> bytes:
    """``{"event":"media","streamSid":…,"media":{"payload":<base64>}}``: audio to play,
    raw 8 kHz mu-law with no file header, any length."""
    return _encoder.encode(_OutMedia(stream_sid, _OutMediaBody(payload)))


def serialize_mark(stream_sid: str, name: str) -> bytes:
    """``{"event":"mark","streamSid":…,"mark":{"name":…}}``: Twilio echoes it back when
    playback reaches it or a ``clear`` flushes it."""
    return _encoder.encode(_OutMark(stream_sid, _OutMarkBody(name)))


def serialize_clear(stream_sid: str) -> bytes:
    """``{"event":"clear","streamSid":…}``: drop the audio Twilio has buffered."""
    return _encoder.encode(_OutClear(stream_sid))


class Codec(Protocol):
    """One stream's codec: one provider's wire format, Sans-I/O. A codec class subclasses
    this explicitly and overrides what differs from the defaults below."""

    @property
    def provider(self) -> str:
        """The registry name of the provider (:data:`streamsvc.providers.PROVIDERS`)."""
        raise NotImplementedError

    @property
    def tracks(self) -> frozenset[str] | None:
        """The only track names accepted; None: any, up to :attr:`max_tracks`."""
        return TWO_TRACKS

    @property
    def max_tracks(self) -> int:
        return 2

    @property
    def stops_on_close(self) -> bool:
        """No stop message exists: a clean close ends the call with reason ``stop``."""
        return False

    @property
    def has_marks(self) -> bool:
        """False: marks are resolved by the playback clock of the audio sent."""
        return True

    @property
    def echoes_marks_on_clear(self) -> bool:
        """A ``clear`` makes the provider echo every pending mark (Twilio does); False:
        they resolve ``cleared`` when the clear is sent."""
        return True

    @property
    def native_encoding(self) -> str:
        """``mulaw`` or ``alaw`` (8 kHz G.711) or ``pcm16`` (little-endian, at the stream's
        rate): what :attr:`Media.payload` holds on this stream."""
        return "mulaw"

    @property
    def correlation_id(self) -> str | None:
        """The provider's id that ties the stream to its call's webhook (ACS), or None."""
        return None

    @property
    def context_on_wire(self) -> bool:
        """The stream itself carries the call's context (custom parameters); False: it
        comes from the context store, written by the call's webhook (ACS)."""
        return True

    @property
    def frame_ms(self) -> int:
        """Milliseconds of audio per media message."""
        return FRAME_MS

    @property
    def sample_rates(self) -> frozenset[int]:
        """The rates the provider documents for its streams: a start at any other is
        refused (Twilio: 8 kHz mu-law only)."""
        return TWILIO_RATES

    @property
    def wall_clock_timestamps(self) -> bool:
        """Media timestamps are wall-clock time (ACS: milliseconds since the Unix epoch),
        not milliseconds since the stream started: a call's duration is then measured from
        its earliest frame."""
        return False

    @property
    def chunk_bytes(self) -> int | None:
        """Outbound audio is sent in multiples of this many bytes, or None: any length."""
        return None

    @property
    def is_probe(self) -> bool:
        """The connection is the platform checking that the service answers (Genesys's
        probe on activating an integration), not a call: it is answered, never started."""
        return False

    @property
    def refusal(self) -> str | None:
        """Why the stream must be refused although its upgrade was admitted (Genesys: the
        organization header and the ``open`` disagree), once the codec knows; None."""
        return None

    @property
    def finished(self) -> bool:
        """The peer ended the session's protocol (a probe's ``close`` was answered):
        nothing more will come, the connection may close."""
        return False

    def replies(self) -> list[bytes]:
        """What the codec must send of its own accord (Genesys's ``opened``, ``pong``,
        ``closed``), taken once: the session queues it whatever the route's direction."""
        return []

    def report(self) -> dict[str, object] | None:
        """What the provider's session protocol did (pauses, discarded audio, sequence
        errors), for the summary's ``protocol`` field; None where there is nothing."""
        return None

    def serialize_end(self, reason: str, variables: Mapping[str, str] | None) -> bytes | None:
        """The message that asks the platform to end the call (Genesys's ``disconnect``
        with ``variables`` as its ``outputVariables``, Asterisk's ``HANGUP``, jambonz's
        ``disconnect``), or None: the service ends a call by closing its stream."""
        return None

    def serialize_pause(self, paused: bool) -> bytes:
        """Ask the platform to stop (``paused``) or restart sending audio (Genesys's
        ``pause``/``resume``); :class:`~streamsvc.exceptions.LocalProtocolError` where
        the platform has no such message."""
        raise LocalProtocolError(f"{self.provider} streams cannot be paused by the service")

    def parse(self, frame: bytes | str) -> Event:
        """One text frame in, one event out, or :class:`RemoteProtocolError`."""
        raise NotImplementedError

    def parse_binary(self, frame: bytes | str) -> Event:
        """One binary frame in (audio, on providers that send it so): by default every
        binary frame is a bad frame."""
        return text_only(frame)

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes | None:
        """Audio to play, in the stream's native form (:attr:`native_encoding`); None:
        the codec holds it and sends it later through :meth:`replies` (Asterisk's flow
        control)."""
        raise NotImplementedError

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        """A mark to echo when playback reaches it, or None where marks do not exist."""
        raise NotImplementedError

    def serialize_clear(self, stream_sid: str) -> bytes:
        """Drop the audio the provider has buffered."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Upgrade:
    """A stream's WebSocket upgrade request: its path (without the public prefix), its
    query string and its headers as they came (lower-case names, repeats kept)."""

    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, path: str, query: str, headers: Iterable[tuple[str, str]]) -> Upgrade:
        """From a transport's request: header names in any case."""
        return cls(path, query, tuple((name.lower(), value) for name, value in headers))

    def all(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower-case)."""
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        return next((value for key, value in self.headers if key == name), None)

    def first_values(self) -> dict[str, str]:
        """Each header's first value, by lower-case name."""
        values: dict[str, str] = {}
        for key, value in self.headers:
            values.setdefault(key, value)
        return values
