"""Telnyx media streaming: Telnyx frames in, the common events of :mod:`streamsvc.wire` out;
audio, marks and ``clear`` out. Sans-I/O.

Follows Telnyx's "Stream call media over WebSocket" AsyncAPI page
(developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket), the
Call Control ``streaming_start`` command. JSON, snake_case:

* ``{"event":"connected","version":"1.0.0"}``;
* ``{"event":"start","sequence_number":"1","stream_id":…,"start":{"call_control_id",
  "call_session_id","user_id","from","to","tags","client_state" (base64),
  "custom_parameters":{…},"media_format":{"encoding","sample_rate","channels"}}}``:
  ``call_sid`` is the call control id, ``stream_sid`` the stream id, ``account_sid`` null;
  ``custom_parameters`` are the start's, plus ``client_state`` base64-decoded when it is
  UTF-8 text (as sent otherwise);
* ``{"event":"media","sequence_number","stream_id","media":{"track","chunk","timestamp",
  "payload"}}``: order not guaranteed (the session counts late frames as out of order);
* ``dtmf`` (``dtmf.digit``), ``mark`` (the echo of ours: ``mark.name``), ``stop``;
* ``{"event":"error","payload":{"code","title","detail"}}``: a bad frame with Telnyx's
  reason (logged, counted; the stream goes on).

Encodings: ``PCMU`` is passed on as it is (mu-law, like Twilio's); ``PCMA`` and ``L16``
(16-bit big-endian, RFC 2586) become PCM16 little-endian at the stream's rate, and audio
sent back is converted to them. Other codecs Telnyx offers (G722, OPUS, AMR-WB) cannot be
decoded here: such a ``start`` is a bad frame naming the encoding.

Out: ``{"event":"media","media":{"payload":…}}``, ``{"event":"mark","mark":{"name":…}}``
(echoed when the audio before it has played) and ``{"event":"clear"}``.

Authentication: with ``telnyx_stream_token`` set, the upgrade's
``x-telnyx-streaming-auth-token`` header must equal it (:mod:`streamsvc.server`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import msgspec

from streamsvc import wire as common
from streamsvc.audio import alaw_to_pcm16, byteswap16, pcm16_to_alaw
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["TOKEN_HEADER", "TelnyxCodec"]

TOKEN_HEADER: Final = "x-telnyx-streaming-auth-token"
# What each encoding becomes for handlers (``native_encoding``).
_NATIVE: Final = {"PCMU": "mulaw", "PCMA": "pcm16", "L16": "pcm16"}
_KINDS: Final = ("connected", "start", "media", "dtmf", "mark", "stop", "error")


class _Format(msgspec.Struct, frozen=True):
    encoding: str
    sample_rate: common.WireInt
    channels: common.WireInt = 1


class _StartBody(msgspec.Struct, frozen=True):
    call_control_id: str
    media_format: _Format
    custom_parameters: dict[str, Any] | list[Any] = {}
    client_state: str | None = None


class _Connected(msgspec.Struct, frozen=True, tag="connected", tag_field="event"):
    version: str | None = None


class _Start(msgspec.Struct, frozen=True, tag="start", tag_field="event"):
    stream_id: str
    start: _StartBody
    sequence_number: Any = None  # never used: any form is taken


class _MediaBody(msgspec.Struct, frozen=True):
    track: str
    chunk: common.WireInt
    timestamp: common.WireInt
    payload: bytes  # base64 on the wire


class _Media(msgspec.Struct, frozen=True, tag="media", tag_field="event"):
    stream_id: str
    media: _MediaBody
    sequence_number: common.WireInt | None = None


class _Dtmf(msgspec.Struct, frozen=True, tag="dtmf", tag_field="event"):
    dtmf: snake.DigitBody
    stream_id: str | None = None


class _Mark(msgspec.Struct, frozen=True, tag="mark", tag_field="event"):
    mark: snake.NameBody
    stream_id: str | None = None


class _Stop(msgspec.Struct, frozen=True, tag="stop", tag_field="event"):
    stream_id: str | None = None


class _ErrorBody(msgspec.Struct, frozen=True):
    code: int | str | None = None
    title: str | None = None
    detail: str | None = None


class _Error(msgspec.Struct, frozen=True, tag="error", tag_field="event"):
    payload: _ErrorBody = _ErrorBody()
    stream_id: str | None = None


# Numbers come as strings (sequence_number, chunk, timestamp), as on Twilio's wire.
_decoder: Final = msgspec.json.Decoder(_Connected | _Start | _Media | _Dtmf | _Mark | _Stop
                                       | _Error, strict=False)


def client_state_text(value: str) -> str:
    """``client_state`` as the application set it: base64-decoded when that gives UTF-8
    text, else as sent."""
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return value
    return decoded if decoded.isprintable() else value


class TelnyxCodec(common.Codec):
    """One Telnyx media stream's codec (see the module docstring)."""

    provider: Final = "telnyx"
    sample_rates: Final = frozenset({8000, 16000})  # PCMU/PCMA at 8 kHz, L16 at 8 or 16 kHz
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = False
    has_marks: Final = True
    correlation_id: Final[str | None] = None

    def __init__(self) -> None:
        self.encoding = "PCMU"  # until start says otherwise

    @property
    def native_encoding(self) -> str:
        return _NATIVE[self.encoding]

    def parse(self, frame: bytes | str) -> common.Event:
        """One inbound text frame as a common event; raises RemoteProtocolError."""
        message = snake.decode(_decoder, frame, _KINDS)
        if isinstance(message, common.UnknownEvent):
            return message
        if isinstance(message, _Media):
            return self._media(message)
        if isinstance(message, _Start):
            return self._start(message)
        if isinstance(message, _Dtmf):
            return snake.dtmf(message.dtmf, message.stream_id)
        if isinstance(message, _Mark):
            return snake.mark(message.mark, message.stream_id)
        if isinstance(message, _Stop):
            return common.Stop(message.stream_id)
        if isinstance(message, _Error):
            error = message.payload
            raise RemoteProtocolError(
                f"Telnyx error {error.code}: {error.title or ''} {error.detail or ''}".strip())
        return common.Connected(None, message.version)

    def _start(self, start: _Start) -> common.Start:
        body = start.start
        encoding = body.media_format.encoding.upper()
        if encoding not in _NATIVE:
            raise RemoteProtocolError(f"invalid start: media_format.encoding {encoding!r} "
                                      f"cannot be decoded here (PCMU, PCMA, L16)")
        self.encoding = encoding
        parameters = snake.parameters(body.custom_parameters)
        if body.client_state:
            parameters["client_state"] = client_state_text(body.client_state)
        media_format = common.MediaFormat(encoding, body.media_format.sample_rate,
                                          body.media_format.channels)
        return common.Start(common._StartBody(
            account_sid=None, stream_sid=start.stream_id, call_sid=body.call_control_id,
            tracks=(), media_format=media_format, custom_parameters=parameters),
            common.loose_int(start.sequence_number), start.stream_id)

    def _media(self, media: _Media) -> common.Media:
        body = media.media
        payload = body.payload
        if self.encoding == "L16":
            payload = byteswap16(payload)
        elif self.encoding == "PCMA":
            payload = alaw_to_pcm16(payload)
        return common.Media(media.stream_id, common._MediaBody(
            body.track, body.chunk, body.timestamp, payload), media.sequence_number)

    # Outbound

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        """Audio to play, in the stream's native form (see :attr:`native_encoding`)."""
        if self.encoding == "L16":
            payload = byteswap16(payload)
        elif self.encoding == "PCMA":
            payload = pcm16_to_alaw(payload)
        return b'{"event":"media","media":{"payload":"' + base64.b64encode(payload) + b'"}}'

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return _encoder.encode({"event": "mark", "mark": {"name": name}})

    def serialize_clear(self, stream_sid: str) -> bytes:
        return b'{"event":"clear"}'


_encoder: Final = msgspec.json.Encoder()
