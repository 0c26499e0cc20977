"""``provider = "auto"``: the provider told from the upgrade and the first message, as
pipecat's runner does, then that provider's codec for the rest of the stream. Sans-I/O.

From the upgrade's headers first: ``x-ms-call-connection-id`` (ACS), ``audiohook-*``
(Genesys), the ``audio.jambonz.org`` subprotocol (jambonz),
``x-telnyx-streaming-auth-token`` (Telnyx), ``x-plivo-signature-v3`` (Plivo),
``X-Twilio-Signature`` (Twilio). Else (``Authorization: Basic`` is Exotel's, Asterisk's and
jambonz's alike) from the first
message: ``{"kind":…}`` is ACS's; ``{"version","id","type":…}`` Genesys's;
``MEDIA_START`` (plain text or JSON) Asterisk's; ``callSid`` with ``sampleRate`` jambonz's;
``websocket:connected`` Vonage's; ``connected`` with a
``version`` and no ``protocol`` Telnyx's, with neither Exotel's; a ``start`` with
``start.callId`` Plivo's, with a top-level ``stream_id`` Telnyx's, ``stream_sid`` Exotel's.
``Authorization: Bearer`` is sent by SignalWire and Vonage alike: Twilio's protocol with it
is SignalWire's. Twilio's protocol without a credential that names the provider (Twilio and
SignalWire speak it alike) is ambiguous: refused with that reason (a bad frame; the stream
never starts), not guessed. Name the provider on the route to take such streams. A binary
frame before the provider is known is a bad frame.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError

__all__ = ["AutoCodec", "provider_from_headers", "provider_from_message"]

_any: Final = msgspec.json.Decoder()


def provider_from_headers(headers: Mapping[str, str]) -> str | None:
    """The provider the upgrade's headers (lower-case names) name, or None."""
    if headers.get("x-ms-call-connection-id"):
        return "acs"
    if headers.get("audiohook-organization-id") or headers.get("audiohook-session-id"):
        return "genesys"
    offered = headers.get("sec-websocket-protocol", "")
    if "audio.jambonz.org" in [name.strip() for name in offered.split(",")]:
        return "jambonz"
    if headers.get("x-telnyx-streaming-auth-token"):
        return "telnyx"
    if headers.get("x-plivo-signature-v3"):
        return "plivo"
    if headers.get("x-twilio-signature"):
        return "twilio"
    return None  # Basic (Exotel, Asterisk, jambonz alike): the first message tells


def provider_from_message(frame: bytes | str, *, bearer: bool = False) -> str:
    """The provider a first message is from (``bearer``: the upgrade carried a bearer
    token); RemoteProtocolError when it cannot be told."""
    head = frame[:12] if isinstance(frame, str) else frame[:12].decode("latin-1")
    if head.startswith("MEDIA_START"):
        return "asterisk"  # chan_websocket's plain-text control message
    try:
        message = _any.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise RemoteProtocolError("not a JSON object: cannot tell the provider")
    if "kind" in message:
        return "acs"
    if message.get("event") == "MEDIA_START":
        return "asterisk"
    if "callSid" in message and ("sampleRate" in message or "mixType" in message):
        return "jambonz"  # the listen verb's first message
    if isinstance(message.get("type"), str) and "version" in message and "id" in message:
        return "genesys"  # AudioHook's envelope
    event = message.get("event")
    if event == "websocket:connected":
        return "vonage"
    start = message.get("start")
    start = start if isinstance(start, dict) else {}
    if event == "connected" and "protocol" not in message:
        return "telnyx" if "version" in message else "exotel"
    if event == "start" and "callId" in start:
        return "plivo"
    if "stream_id" in message:
        return "telnyx"
    if "stream_sid" in message:
        return "exotel"
    if event in ("connected", "start") or "streamSid" in message:
        if bearer:
            return "signalwire"
        raise RemoteProtocolError(
            "ambiguous provider: Twilio's protocol (Twilio or SignalWire) and no "
            "X-Twilio-Signature or bearer token on the upgrade: name the route's provider")
    raise RemoteProtocolError(f"cannot tell the provider from a {str(event)[:40]!r} message")


class AutoCodec(common.Codec):
    """A stream whose provider is told from its upgrade and first message (see the
    module docstring); ``make`` builds the chosen provider's codec. Used only where no
    provider's credential is configured: otherwise the credential that admitted the upgrade
    names the provider."""

    def __init__(self, headers: Mapping[str, str],
                 make: Callable[[str], common.Codec]) -> None:
        self._make = make
        hint = provider_from_headers(headers)
        self.chosen: common.Codec | None = make(hint) if hint else None
        self._bearer = headers.get("authorization", "").partition(" ")[0].lower() == "bearer"

    def _codec(self) -> common.Codec:
        if self.chosen is None:
            raise RemoteProtocolError("the provider is not known yet")
        return self.chosen

    @property
    def provider(self) -> str:
        return self.chosen.provider if self.chosen else "auto"

    @property
    def tracks(self) -> frozenset[str] | None:
        return self.chosen.tracks if self.chosen else frozenset({"inbound", "outbound"})

    @property
    def max_tracks(self) -> int:
        return self.chosen.max_tracks if self.chosen else 2

    @property
    def stops_on_close(self) -> bool:
        return self.chosen.stops_on_close if self.chosen else False

    @property
    def has_marks(self) -> bool:
        return self.chosen.has_marks if self.chosen else True

    @property
    def native_encoding(self) -> str:
        return self.chosen.native_encoding if self.chosen else "mulaw"

    @property
    def correlation_id(self) -> str | None:
        return self.chosen.correlation_id if self.chosen else None

    @property
    def context_on_wire(self) -> bool:
        return self.chosen.context_on_wire if self.chosen else True

    @property
    def frame_ms(self) -> int:
        return self.chosen.frame_ms if self.chosen else common.FRAME_MS

    @property
    def sample_rates(self) -> frozenset[int]:
        return self.chosen.sample_rates if self.chosen else common.TWILIO_RATES

    @property
    def wall_clock_timestamps(self) -> bool:
        return self.chosen.wall_clock_timestamps if self.chosen else False

    @property
    def chunk_bytes(self) -> int | None:
        return self.chosen.chunk_bytes if self.chosen else None

    @property
    def echoes_marks_on_clear(self) -> bool:
        return self.chosen.echoes_marks_on_clear if self.chosen else True

    @property
    def is_probe(self) -> bool:
        return self.chosen.is_probe if self.chosen else False

    @property
    def refusal(self) -> str | None:
        return self.chosen.refusal if self.chosen else None

    @property
    def finished(self) -> bool:
        return self.chosen.finished if self.chosen else False

    def replies(self) -> list[bytes]:
        return self.chosen.replies() if self.chosen else []

    def report(self) -> dict[str, object] | None:
        return self.chosen.report() if self.chosen else None

    def serialize_end(self, reason: str, variables: Mapping[str, str] | None) -> bytes | None:
        return self._codec().serialize_end(reason, variables)

    def serialize_pause(self, paused: bool) -> bytes:
        return self._codec().serialize_pause(paused)

    def parse(self, frame: bytes | str) -> common.Event:
        if self.chosen is None:
            self.chosen = self._make(provider_from_message(frame, bearer=self._bearer))
        return self.chosen.parse(frame)

    def parse_binary(self, frame: bytes | str) -> common.Event:
        if self.chosen is None:
            raise RemoteProtocolError("binary frame before the provider is known")
        return self.chosen.parse_binary(frame)

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes | None:
        return self._codec().serialize_media(stream_sid, payload)

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return self._codec().serialize_mark(stream_sid, name)

    def serialize_clear(self, stream_sid: str) -> bytes:
        return self._codec().serialize_clear(stream_sid)
