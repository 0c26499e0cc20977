"""Exotel AgentStream (the Stream and Voicebot applets): Exotel frames in, the common events
of :mod:`streamsvc.wire` out; audio, marks and ``clear`` out. Sans-I/O.

Follows developer.exotel.com/docs/agentstream/websocket-protocol and
.../stream-voicebot-applet. JSON, snake_case, Twilio-shaped:

* ``{"event":"connected"}``;
* ``{"event":"start","sequence_number","stream_sid","start":{"stream_sid","call_sid",
  "account_sid","from","to","custom_parameters":{…},"media_format":{"encoding":
  "audio/x-raw","sample_rate":"8000","bit_rate":"16"}}}``: ids as named; the custom
  parameters are the start's plus the upgrade URL's query parameters (the applet appends
  up to three to the URL), the start's winning a clash. Every documented ``media_format``
  is taken: the current one above, the older ``"encoding":"base64","bit_rate":"128kbps"``
  (PCM16 too), and the extension guide's ``audio/x-mulaw;rate=8000`` (mu-law),
  ``audio/L16;rate=8000`` and ``audio/L16;rate=16000``; the rate as a string or a number,
  else from the encoding's ``rate=``, else the URL's ``?sample-rate=``, else 8 kHz.
  ``bit_rate`` is never used;
* ``{"event":"media","sequence_number","stream_sid","media":{"chunk","timestamp",
  "payload"}}``: raw PCM16 little-endian at the stream's rate (or mu-law, as above),
  about 100 ms a message; ``media.track`` (``inbound``/``outbound``) when the applet
  streams both tracks, else ``inbound``. The first message's length sets the frame length
  the session counts gaps in (:attr:`frame_ms`);
* ``dtmf`` (``dtmf.digit``) and ``mark`` (``mark.name``: audio we sent has played), on
  Voicebot streams; ``stop``.

Out (Voicebot): ``{"event":"media","stream_sid","media":{"payload"}}`` in chunks that are
multiples of 320 bytes (:attr:`chunk_bytes` a message, the last one padded with silence),
``{"event":"mark","stream_sid","mark":{"name"}}`` and ``{"event":"clear","stream_sid"}``.

Authentication: with ``exotel_basic_auth`` (``KEY:TOKEN``) set, the upgrade must carry
``Authorization: Basic base64(KEY:TOKEN)`` (a ``wss://KEY:TOKEN@host/path`` URL in the
applet), else 403. Exotel's IP allow-listing belongs in front of the service (firewall or
load balancer).
"""

from __future__ import annotations

import base64
import re
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["ExotelCodec"]

_KINDS: Final = ("connected", "start", "media", "dtmf", "mark", "stop")
# Outbound audio: Exotel wants multiples of 320 bytes, 3.2 kB to 100 kB a message.
OUT_MULTIPLE: Final = 320
OUT_CHUNK_BYTES: Final = 3200
# Query parameters taken as context: Exotel appends at most 3 (256 characters in all).
MAX_QUERY_PARAMETERS: Final = 8


class _Format(msgspec.Struct, frozen=True):
    # Every documented form: "8000" or 8000; "audio/x-raw" (PCM16), the older "base64"
    # (the payload's transport, the audio PCM16), the extension guide's
    # "audio/x-mulaw;rate=8000" and "audio/L16;rate=16000". bit_rate ("16", "128kbps") is
    # never used: not declared, so no form of it can refuse a start.
    sample_rate: Any = None
    encoding: Any = "audio/x-raw"


class _StartBody(msgspec.Struct, frozen=True):
    call_sid: str
    stream_sid: Any = None  # here or at the top: either will do
    account_sid: str | None = None
    custom_parameters: dict[str, Any] = {}
    media_format: _Format = _Format()


class _Connected(msgspec.Struct, frozen=True, tag="connected", tag_field="event"):
    pass


class _Start(msgspec.Struct, frozen=True, tag="start", tag_field="event"):
    start: _StartBody
    stream_sid: Any = None
    sequence_number: Any = None  # never used: any form is taken


class _MediaBody(msgspec.Struct, frozen=True):
    chunk: common.WireInt
    timestamp: common.WireInt
    payload: bytes  # base64 on the wire
    track: Any = None  # "inbound" or "outbound" when the applet streams both


class _Media(msgspec.Struct, frozen=True, tag="media", tag_field="event"):
    stream_sid: str
    media: _MediaBody
    sequence_number: common.WireInt | None = None


class _Dtmf(msgspec.Struct, frozen=True, tag="dtmf", tag_field="event"):
    dtmf: snake.DigitBody
    stream_sid: str | None = None


class _Mark(msgspec.Struct, frozen=True, tag="mark", tag_field="event"):
    mark: snake.NameBody
    stream_sid: str | None = None


class _Stop(msgspec.Struct, frozen=True, tag="stop", tag_field="event"):
    stream_sid: str | None = None


# Numbers come as strings (sample_rate, chunk, timestamp), as on Twilio's wire.
_decoder: Final = msgspec.json.Decoder(_Connected | _Start | _Media | _Dtmf | _Mark | _Stop,
                                       strict=False)


_TRACKS: Final = frozenset({"inbound", "outbound"})
# A rate inside the encoding: "audio/x-mulaw;rate=8000", "audio/L16;rate=16000".
_ENCODING_RATE: Final = re.compile(r"rate=(\d{4,6})")


def _rate(value: object) -> int | None:
    """A sample rate as Exotel may write it ("8000", 8000, a ``rate=`` match), or None."""
    if isinstance(value, re.Match):
        value = value.group(1)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


class ExotelCodec(common.Codec):
    """One Exotel stream's codec (see the module docstring); ``query`` is the upgrade
    request's query string (the stream URL's context parameters)."""

    provider: Final = "exotel"
    sample_rates: Final = frozenset({8000, 16000, 24000})
    tracks: Final[frozenset[str] | None] = _TRACKS
    max_tracks: Final = 2
    stops_on_close: Final = False
    has_marks: Final = True
    correlation_id: Final[str | None] = None
    chunk_bytes: Final = OUT_CHUNK_BYTES

    def __init__(self, query: str = "") -> None:
        pairs = parse_qsl(query, keep_blank_values=True)[:MAX_QUERY_PARAMETERS]
        self.query_parameters = {name: value for name, value in pairs
                                 if name != "sample-rate"}
        self.query_rate = _rate(dict(pairs).get("sample-rate"))
        self.sample_rate = 8000
        self.mulaw = False
        self._frame_ms = 100  # set from the first media message's length
        self._measured = False

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

    @property
    def native_encoding(self) -> str:
        """PCM16 (raw/slin, L16), or mu-law when the applet's MediaFormat asks for it."""
        return "mulaw" if self.mulaw else "pcm16"

    def parse(self, frame: bytes | str) -> common.Event:
        """One inbound text frame as a common event; raises RemoteProtocolError."""
        message = snake.decode(_decoder, frame, _KINDS)
        if isinstance(message, common.UnknownEvent):
            return message
        if isinstance(message, _Media):
            body = message.media
            if not self._measured:  # before the session counts the track's frames
                self._measured = True
                self._frame_length(len(body.payload))
            track = body.track if body.track in _TRACKS else "inbound"
            return common.Media(message.stream_sid, common._MediaBody(
                track, body.chunk, body.timestamp, body.payload), message.sequence_number)
        if isinstance(message, _Start):
            return self._start(message)
        if isinstance(message, _Dtmf):
            return snake.dtmf(message.dtmf, message.stream_sid)
        if isinstance(message, _Mark):
            return snake.mark(message.mark, message.stream_sid)
        if isinstance(message, _Stop):
            return common.Stop(message.stream_sid)
        return common.Connected(None, None)

    def _frame_length(self, payload_bytes: int) -> None:
        """The stream's frame length in ms (to the nearest 10 ms, at least 10), from a
        media message's payload (PCM16, or one byte a sample of mu-law)."""
        milliseconds = payload_bytes / (1 if self.mulaw else 2) / self.sample_rate * 1000
        self._frame_ms = max(10, round(milliseconds / 10) * 10)

    def _start(self, start: _Start) -> common.Start:
        body = start.start
        stream_sid = next((sid for sid in (start.stream_sid, body.stream_sid)
                           if isinstance(sid, str) and sid), None)
        if not stream_sid:
            raise RemoteProtocolError("invalid start: no stream_sid")
        media = body.media_format
        encoding = media.encoding if isinstance(media.encoding, str) else "audio/x-raw"
        if media.sample_rate is not None:  # given: it must be one Exotel streams at
            rate = _rate(media.sample_rate)
        else:
            rate = _rate(_ENCODING_RATE.search(encoding)) or self.query_rate or 8000
        if rate not in (8000, 16000, 24000):
            raise RemoteProtocolError(f"invalid start: sample_rate "
                                      f"{str(media.sample_rate)[:20]!r} (8000, 16000 or 24000)")
        self.sample_rate = rate
        self.mulaw = "mulaw" in encoding.lower() or "pcmu" in encoding.lower()
        parameters = {**self.query_parameters, **snake.parameters(body.custom_parameters)}
        media_format = common.MediaFormat(encoding[:100], self.sample_rate, 1)
        return common.Start(common._StartBody(
            account_sid=body.account_sid, stream_sid=stream_sid, call_sid=body.call_sid,
            tracks=("inbound",), media_format=media_format, custom_parameters=parameters),
            common.loose_int(start.sequence_number), stream_sid)

    # Outbound

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        """PCM16 at the stream's rate, padded with silence to a multiple of 320 bytes."""
        short = -len(payload) % OUT_MULTIPLE
        if short:
            payload += bytes(short)
        return _encoder.encode({"event": "media", "stream_sid": stream_sid,
                                "media": {"payload": msgspec.Raw(
                                    b'"' + base64.b64encode(payload) + b'"')}})

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return _encoder.encode({"event": "mark", "stream_sid": stream_sid,
                                "mark": {"name": name}})

    def serialize_clear(self, stream_sid: str) -> bytes:
        return _encoder.encode({"event": "clear", "stream_sid": stream_sid})


_encoder: Final = msgspec.json.Encoder()
