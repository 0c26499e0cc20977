"""Exotel AgentStream (the Stream and Voicebot applets): Exotel frames in, the common events
of :mod:`streamsvc.wire` out; audio, marks and ``clear`` out. Sans-I/O.

Follows developer.exotel.com/docs/agentstream/websocket-protocol and
.../stream-voicebot-applet, and ``shared/providers.md``. JSON, snake_case, Twilio-shaped:

* ``{"event":"connected"}``;
* ``{"event":"start","sequence_number","stream_sid","start":{"stream_sid","call_sid",
  "account_sid","from","to","custom_parameters":{…},"media_format":{"encoding":
  "audio/x-raw","sample_rate":"8000","bit_rate":"16"}}}``: ids as named; the custom
  parameters are the start's plus the upgrade URL's query parameters (the applet appends
  up to three to the URL), the start's winning a clash;
* ``{"event":"media","sequence_number","stream_sid","media":{"chunk","timestamp",
  "payload"}}``: raw PCM16 little-endian at ``sample_rate`` (8 kHz by default, 16 or 24
  kHz with ``?sample-rate=``), about 100 ms a message, one track (``inbound``). The first
  message's length sets the frame length the session counts gaps in (:attr:`frame_ms`);
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
    sample_rate: common.WireInt = 8000
    encoding: str = "audio/x-raw"
    bit_rate: common.WireInt = 16


class _StartBody(msgspec.Struct, frozen=True):
    call_sid: str
    stream_sid: str | None = None
    account_sid: str | None = None
    custom_parameters: dict[str, Any] = {}
    media_format: _Format = _Format()


class _Connected(msgspec.Struct, frozen=True, tag="connected", tag_field="event"):
    pass


class _Start(msgspec.Struct, frozen=True, tag="start", tag_field="event"):
    start: _StartBody
    stream_sid: str | None = None
    sequence_number: common.WireInt | None = None


class _MediaBody(msgspec.Struct, frozen=True):
    chunk: common.WireInt
    timestamp: common.WireInt
    payload: bytes  # base64 on the wire


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


class ExotelCodec(common.Codec):
    """One Exotel stream's codec (see the module docstring); ``query`` is the upgrade
    request's query string (the stream URL's context parameters)."""

    provider: Final = "exotel"
    tracks: Final[frozenset[str] | None] = frozenset({"inbound"})
    max_tracks: Final = 1
    stops_on_close: Final = False
    has_marks: Final = True
    native_encoding: Final = "pcm16"
    correlation_id: Final[str | None] = None
    chunk_bytes: Final = OUT_CHUNK_BYTES

    def __init__(self, query: str = "") -> None:
        pairs = parse_qsl(query, keep_blank_values=True)[:MAX_QUERY_PARAMETERS]
        self.query_parameters = {name: value for name, value in pairs
                                 if name != "sample-rate"}
        self.sample_rate = 8000
        self._frame_ms = 100  # set from the first media message's length
        self._measured = False

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

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
            return common.Media(message.stream_sid, common._MediaBody(
                "inbound", body.chunk, body.timestamp, body.payload), message.sequence_number)
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
        media message's PCM16 payload."""
        milliseconds = payload_bytes / 2 / self.sample_rate * 1000
        self._frame_ms = max(10, round(milliseconds / 10) * 10)

    def _start(self, start: _Start) -> common.Start:
        body = start.start
        stream_sid = start.stream_sid or body.stream_sid
        if not stream_sid:
            raise RemoteProtocolError("invalid start: no stream_sid")
        if body.media_format.sample_rate not in (8000, 16000, 24000):
            raise RemoteProtocolError(f"invalid start: sample_rate "
                                      f"{body.media_format.sample_rate} (8000, 16000, 24000)")
        self.sample_rate = body.media_format.sample_rate
        parameters = {**self.query_parameters, **snake.parameters(body.custom_parameters)}
        media_format = common.MediaFormat(body.media_format.encoding, self.sample_rate, 1)
        return common.Start(common._StartBody(
            account_sid=body.account_sid, stream_sid=stream_sid, call_sid=body.call_sid,
            tracks=("inbound",), media_format=media_format, custom_parameters=parameters),
            start.sequence_number, stream_sid)

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
