"""Plivo Audio Streaming (``<Stream bidirectional ...>`` in Plivo XML, or the Stream API):
Plivo frames in, the common events of :mod:`streamsvc.wire` out; ``playAudio``,
``checkpoint`` and ``clearAudio`` out. Sans-I/O.

Follows plivo.com/docs/voice/audio-streaming and docs.plivo.com/docs/voice/xml/audiostream.
JSON, camelCase:

* ``{"event":"start","sequenceNumber","start":{"callId","streamId","accountId","tracks",
  "mediaFormat":{"encoding","sampleRate"}},"extra_headers":"k=v;k2=v2"}``: ids as named
  (``call_sid`` = ``callId``, ``stream_sid`` = ``streamId``, ``account_sid`` =
  ``accountId``); the custom parameters are the parsed ``extra_headers`` (the
  ``<Stream extraHeaders>`` attribute);
* ``{"event":"media","sequenceNumber","streamId","media":{"track","timestamp","chunk",
  "payload"}}``: mu-law 8 kHz (``audio/x-mulaw``) or PCM16 (``audio/x-l16``) at 8 or 16 kHz;
* ``dtmf`` (``dtmf.digit``); ``playedStream`` (``name``: a checkpoint of ours was reached:
  the mark's echo); ``clearedAudio`` (our ``clearAudio`` was applied; ignored and counted);
* there is no stop message: a clean close ends the call (:attr:`PlivoCodec.stops_on_close`).

Out: ``{"event":"playAudio","streamId","media":{"contentType","sampleRate","payload"}}``
in the stream's encoding, ``{"event":"checkpoint","streamId","name"}`` (= mark) and
``{"event":"clearAudio","streamId"}``.

Authentication: with ``plivo_auth_token`` set, the upgrade must carry a valid
``X-Plivo-Signature-V3`` (HMAC-SHA256 with the account's auth token over the public URL,
its query sorted, ``.`` and ``X-Plivo-Signature-V3-Nonce``), else 403 (:func:`signature_ok`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit, urlunsplit

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["NONCE_HEADER", "SIGNATURE_V3_HEADER", "PlivoCodec", "sign_v3", "signature_ok"]

SIGNATURE_V3_HEADER: Final = "x-plivo-signature-v3"
NONCE_HEADER: Final = "x-plivo-signature-v3-nonce"
_KINDS: Final = ("start", "media", "dtmf", "playedStream", "clearedAudio")
_NATIVE: Final = {"audio/x-mulaw": "mulaw", "audio/x-l16": "pcm16"}
# Parameters taken from extra_headers (Plivo allows 512 bytes of them).
MAX_EXTRA_HEADERS: Final = 32


class _Format(msgspec.Struct, frozen=True):
    encoding: str = "audio/x-mulaw"
    sampleRate: common.WireInt = 8000


class _StartBody(msgspec.Struct, frozen=True):
    callId: str
    streamId: str
    accountId: str | None = None
    tracks: list[str] = []
    mediaFormat: _Format = _Format()


class _Start(msgspec.Struct, frozen=True, tag="start", tag_field="event"):
    start: _StartBody
    sequenceNumber: Any = None  # never used: any form is taken
    extra_headers: str | dict[str, Any] = ""


class _MediaBody(msgspec.Struct, frozen=True):
    payload: bytes  # base64 on the wire
    timestamp: common.WireInt
    chunk: common.WireInt = 0
    track: str = "inbound"


class _Media(msgspec.Struct, frozen=True, tag="media", tag_field="event"):
    streamId: str
    media: _MediaBody
    sequenceNumber: common.WireInt | None = None


class _Dtmf(msgspec.Struct, frozen=True, tag="dtmf", tag_field="event"):
    dtmf: snake.DigitBody
    streamId: str | None = None


class _Played(msgspec.Struct, frozen=True, tag="playedStream", tag_field="event"):
    name: str
    streamId: str | None = None


class _Cleared(msgspec.Struct, frozen=True, tag="clearedAudio", tag_field="event"):
    streamId: str | None = None


_decoder: Final = msgspec.json.Decoder(_Start | _Media | _Dtmf | _Played | _Cleared,
                                       strict=False)
_encoder: Final = msgspec.json.Encoder()


def extra_headers(text: str) -> dict[str, str]:
    """``k=v;k2=v2`` as a mapping (empty or malformed pieces skipped)."""
    parameters: dict[str, str] = {}
    for piece in text.split(";")[:MAX_EXTRA_HEADERS]:
        name, sep, value = piece.partition("=")
        if sep and name.strip():
            parameters[name.strip()] = value.strip()
    return parameters


def sign_v3(auth_token: str, url: str, nonce: str) -> str:
    """Plivo's V3 signature of a GET to ``url`` (as Plivo's SDKs compute it): the URL
    without its query, then ``?`` and the query sorted by name and value, then ``.`` and
    the nonce; HMAC-SHA256 with the auth token, base64."""
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    query = parse_qs(parts.query, keep_blank_values=True)
    pairs = "&".join(f"{name}={value}" for name in sorted(query)
                     for value in sorted(query[name]))
    data = base + ("?" + pairs if pairs else "") + "." + nonce
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signature_ok(auth_token: str, url: str, signature: str | None, nonce: str | None) -> bool:
    """Whether ``signature`` (Plivo may send several, comma-separated) signs ``url``."""
    if not signature or not nonce:
        return False
    expected = sign_v3(auth_token, url, nonce).encode()
    return any(hmac.compare_digest(expected, given.strip().encode())
               for given in signature.split(","))


class PlivoCodec(common.Codec):
    """One Plivo stream's codec (see the module docstring)."""

    provider: Final = "plivo"
    sample_rates: Final = frozenset({8000, 16000})  # its contentType's sampleRate
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = True
    has_marks: Final = True
    correlation_id: Final[str | None] = None

    def __init__(self) -> None:
        self.encoding = "audio/x-mulaw"
        self.sample_rate = 8000

    @property
    def native_encoding(self) -> str:
        return _NATIVE[self.encoding]

    def parse(self, frame: bytes | str) -> common.Event:
        """One inbound text frame as a common event; raises RemoteProtocolError."""
        message: Any = snake.decode(_decoder, frame, _KINDS)
        if isinstance(message, common.UnknownEvent):
            return message
        if isinstance(message, _Media):
            body = message.media
            return common.Media(message.streamId, common._MediaBody(
                body.track, body.chunk, body.timestamp, body.payload), message.sequenceNumber)
        if isinstance(message, _Start):
            return self._start(message)
        if isinstance(message, _Dtmf):
            return snake.dtmf(message.dtmf, message.streamId)
        if isinstance(message, _Played):
            return common.Mark(common._MarkBody(message.name), message.streamId)
        return common.UnknownEvent("clearedAudio")

    def _start(self, start: _Start) -> common.Start:
        body = start.start
        encoding = body.mediaFormat.encoding.lower()
        if encoding not in _NATIVE:
            raise RemoteProtocolError(f"invalid start: mediaFormat.encoding {encoding[:40]!r}"
                                      " (audio/x-mulaw or audio/x-l16)")
        self.encoding, self.sample_rate = encoding, body.mediaFormat.sampleRate
        media_format = common.MediaFormat(encoding, self.sample_rate, 1)
        return common.Start(common._StartBody(
            account_sid=body.accountId, stream_sid=body.streamId, call_sid=body.callId,
            tracks=tuple(body.tracks), media_format=media_format,
            custom_parameters=extra_headers(start.extra_headers)
            if isinstance(start.extra_headers, str) else snake.parameters(start.extra_headers)),
            common.loose_int(start.sequenceNumber), body.streamId)

    # Outbound

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        return _encoder.encode({"event": "playAudio", "streamId": stream_sid, "media": {
            "contentType": self.encoding, "sampleRate": self.sample_rate,
            "payload": msgspec.Raw(b'"' + base64.b64encode(payload) + b'"')}})

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return _encoder.encode({"event": "checkpoint", "streamId": stream_sid, "name": name})

    def serialize_clear(self, stream_sid: str) -> bytes:
        return _encoder.encode({"event": "clearAudio", "streamId": stream_sid})
