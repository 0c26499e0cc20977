"""The providers: one Sans-I/O codec each, turning a provider's frames into the service's
common events (:mod:`streamsvc.wire`) and its outbound commands (audio, mark, clear) into
the provider's frames.

A route names its provider (``provider = "twilio"`` by default, ``"acs"``, ``"telnyx"``,
``"signalwire"``, ``"exotel"``, ``"plivo"``, ``"vonage"`` or ``"auto"``); each stream
connection gets a new codec from
:func:`codec_for`, built from the upgrade request's headers. What a codec offers
(:class:`Codec`): ``parse`` (one frame in, one event out, or
:class:`~streamsvc.exceptions.RemoteProtocolError`), the ``serialize_*`` verbs, the track
names it accepts, whether a clean close means the call ended, whether it has marks, and
its native audio encoding (``mulaw`` or ``pcm16``). A codec whose provider sends audio in
binary frames (Vonage) also has ``parse_binary``; on the others a binary frame is a bad
frame. An outbound message to go as a binary frame is a :class:`~streamsvc.wire.BinaryFrame`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Protocol

from . import twilio
from .acs import AcsCodec
from .auto import AutoCodec
from .exotel import ExotelCodec
from .plivo import PlivoCodec
from .signalwire import SignalWireCodec
from .telnyx import TelnyxCodec
from .vonage import VonageCodec

__all__ = ["PROVIDERS", "Codec", "TwilioCodec", "codec_for"]


class Codec(Protocol):
    """One stream's codec (see the module docstring)."""

    @property
    def provider(self) -> str: ...

    @property
    def tracks(self) -> frozenset[str] | None:
        """The only track names accepted; None: any, up to :attr:`max_tracks`."""

    @property
    def max_tracks(self) -> int: ...

    @property
    def stops_on_close(self) -> bool:
        """No stop message exists: a clean close ends the call with reason ``stop``."""

    @property
    def has_marks(self) -> bool:
        """False: marks are resolved by the playback clock of the audio sent."""

    @property
    def native_encoding(self) -> str:
        """``mulaw`` (8 kHz G.711) or ``pcm16`` (little-endian, at the stream's rate)."""

    @property
    def correlation_id(self) -> str | None:
        """The provider's id that ties the stream to its call's webhook (ACS), or None."""

    def parse(self, frame: bytes | str) -> twilio.Event: ...

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes: ...

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None: ...

    def serialize_clear(self, stream_sid: str) -> bytes: ...


class TwilioCodec:
    """Twilio Media Streams (:mod:`streamsvc.providers.twilio`); stateless, so shared."""

    provider: Final = "twilio"
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = False
    has_marks: Final = True
    native_encoding: Final = "mulaw"
    correlation_id: Final[str | None] = None

    parse = staticmethod(twilio.parse_media)

    @staticmethod
    def serialize_media(stream_sid: str, payload: bytes) -> bytes:
        return twilio.serialize_media(stream_sid, payload)

    @staticmethod
    def serialize_mark(stream_sid: str, name: str) -> bytes | None:
        return twilio.serialize_mark(stream_sid, name)

    @staticmethod
    def serialize_clear(stream_sid: str) -> bytes:
        return twilio.serialize_clear(stream_sid)


TWILIO: Final = TwilioCodec()
PROVIDERS: Final = ("twilio", "acs", "telnyx", "signalwire", "exotel", "plivo", "vonage",
                     "auto")


def codec_for(provider: str, headers: Mapping[str, str], *, unmixed: bool = False,
              context: Callable[[str], Mapping[str, str] | None] | None = None,
              l16_little_endian: bool = False) -> Codec:
    """A codec for one stream of ``provider``, given its upgrade request's headers
    (lower-case names); ``context`` looks a call's stored context up by the id the
    provider's upgrade carries (ACS: the correlation id)."""
    if provider == "auto":
        return AutoCodec(headers, lambda name: codec_for(
            name, headers, unmixed=unmixed, context=context,
            l16_little_endian=l16_little_endian))
    if provider == "acs":
        return AcsCodec(headers, unmixed=unmixed, context=context)
    if provider == "twilio":
        return TWILIO
    if provider == "telnyx":
        return TelnyxCodec()
    if provider == "plivo":
        return PlivoCodec()
    if provider == "exotel":
        return ExotelCodec(headers)
    if provider == "vonage":
        return VonageCodec()
    if provider == "signalwire":
        return SignalWireCodec(l16_little_endian=l16_little_endian)
    raise ValueError(f"unknown provider {provider!r}")
