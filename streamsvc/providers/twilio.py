"""Twilio Media Streams: the codec of a ``provider = "twilio"`` route.

Twilio's frames are the service's common events in their JSON form (:mod:`streamsvc.wire`
parses and serializes them): ``connected``, ``start`` with ``customParameters``, ``media``
every 20 ms per track (8 kHz mu-law), ``dtmf``, ``mark``, ``stop``; out ``media``, ``mark``
and ``clear`` (Twilio's Media Streams WebSocket messages page). Stateless, so one codec is
shared by every stream. The upgrade is signed with ``X-Twilio-Signature``
(:func:`streamsvc.providers.credentials.twilio_problem`).
"""

from __future__ import annotations

from typing import Final

from streamsvc import wire

__all__ = ["TWILIO", "TwilioCodec"]


class TwilioCodec(wire.Codec):
    """Twilio Media Streams; stateless, so shared (:data:`TWILIO`)."""

    provider: Final = "twilio"

    parse = staticmethod(wire.parse_media)

    @staticmethod
    def serialize_media(stream_sid: str, payload: bytes) -> bytes:
        return wire.serialize_media(stream_sid, payload)

    @staticmethod
    def serialize_mark(stream_sid: str, name: str) -> bytes | None:
        return wire.serialize_mark(stream_sid, name)

    @staticmethod
    def serialize_clear(stream_sid: str) -> bytes:
        return wire.serialize_clear(stream_sid)


TWILIO: Final = TwilioCodec()
