"""SignalWire (Compatibility API, cXML ``<Start>``/``<Connect><Stream>``): Twilio's Media
Streams protocol by design, plus linear PCM codecs. Sans-I/O.

Follows developer.signalwire.com/compatibility-api/cxml/voice/stream and the REST
create-stream page: the frames are Twilio's (``connected``,
``start`` with ``customParameters`` from the ``<Parameter>``s, ``media``, ``dtmf``,
``mark``, ``stop``; ``media``, ``mark``, ``clear`` back), parsed by Twilio's codec. The
``<Stream codec>`` attribute picks ``PCMU@8000h`` (the default: mu-law, as Twilio) or
``L16@16000h`` / ``L16@24000h``: 16-bit linear PCM, which the start's ``mediaFormat``
names (an encoding containing ``l16``). L16 is network byte order (big-endian, RFC 2586)
unless ``signalwire_l16_little_endian`` says the account sends little-endian: handlers
always get PCM16 little-endian, and audio sent back is converted to the stream's order.

Authentication: with ``signalwire_token`` set, the upgrade must carry ``Authorization:
Bearer <token>`` (the ``<Stream authBearerToken>`` attribute), else 403.
"""

from __future__ import annotations

from typing import Final

import msgspec

from streamsvc import wire
from streamsvc.audio import byteswap16
from streamsvc.exceptions import RemoteProtocolError

__all__ = ["SignalWireCodec"]


class SignalWireCodec(wire.Codec):
    """One SignalWire stream's codec (see the module docstring)."""

    provider: Final = "signalwire"
    sample_rates: Final = frozenset({8000, 16000, 24000})  # PCMU@8000h, L16@16000h/24000h
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = False
    has_marks: Final = True
    correlation_id: Final[str | None] = None

    def __init__(self, *, l16_little_endian: bool = False) -> None:
        self.l16 = False  # set by start
        self.swap = not l16_little_endian

    @property
    def native_encoding(self) -> str:
        return "pcm16" if self.l16 else "mulaw"

    def parse(self, frame: bytes | str) -> wire.Event:
        event = wire.parse_media(frame)
        if type(event) is wire.Media:
            if self.l16 and self.swap:
                body = event.media
                return msgspec.structs.replace(event, media=msgspec.structs.replace(
                    body, payload=byteswap16(body.payload)))
            return event
        if type(event) is wire.Start:
            encoding = event.start.media_format.encoding.lower()
            if "l16" in encoding:
                self.l16 = True
            elif "mulaw" not in encoding and "pcmu" not in encoding:
                raise RemoteProtocolError(f"invalid start: mediaFormat.encoding "
                                          f"{encoding[:40]!r} (PCMU or L16 expected)")
        return event

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        if self.l16 and self.swap:
            payload = byteswap16(payload)
        return wire.serialize_media(stream_sid, payload)

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return wire.serialize_mark(stream_sid, name)

    def serialize_clear(self, stream_sid: str) -> bytes:
        return wire.serialize_clear(stream_sid)
