"""Vonage Voice API WebSockets (an NCCO ``connect`` action with a ``websocket`` endpoint):
Vonage's frames in, the common events of :mod:`streamsvc.wire` out; binary audio,
``notify`` and ``clear`` out. Sans-I/O.

Follows developer.vonage.com/en/voice/voice-api/concepts/websockets, the Voice SDK's
``WebsocketEndpoint``/``WebsocketAuthorization`` types:

* the first message is text, ``{"event":"websocket:connected","content-type":
  "audio/l16;rate=16000", ...}``, with the NCCO endpoint's ``headers`` at its top level:
  the stream starts. Those headers are the custom parameters (values that are numbers or
  booleans as text, objects and lists as compact JSON); ``call_sid`` is the ``call_uuid``
  or ``uuid`` header when the NCCO put one there (Vonage sends no call id of its own),
  else generated; ``stream_sid`` is generated; ``account_sid`` is null. One track,
  ``inbound``: Vonage sends the call's mixed audio only;
* then **binary** messages: 20 ms of 16-bit little-endian PCM, mono, at the rate the
  content type names (8, 16 or 24 kHz: 320, 640 or 960 bytes). They carry no timestamp
  and no sequence number: the n-th is taken to start at n x 20 ms, so a frame Vonage
  never sent cannot be seen (``missing_frames`` stays 0). An empty or odd-length one is a
  bad frame;
* ``websocket:dtmf`` (``digit``, ``duration``) is a key press; ``websocket:notify``
  (``payload``) is the echo of a ``notify`` of ours, sent when the audio queued before it
  has played: the mark's echo (its ``payload.name``); ``websocket:cleared`` confirms a
  ``clear`` (ignored and counted: the marks pending then were already resolved
  ``cleared`` when it was sent, :attr:`VonageCodec.echoes_marks_on_clear`);
* there is no stop message: a clean close ends the call (:attr:`VonageCodec.stops_on_close`).

Out: audio as binary messages of 20 ms (the last one of an utterance padded with
silence: Vonage takes whole frames only), ``{"action":"notify","payload":{"name":…}}``
(= mark) and ``{"action":"clear"}``.

Authentication (the endpoint's ``authorization``): ``{"type":"vonage"}`` makes Vonage send
``Authorization: Bearer <JWT>``, the JWT of its signed webhooks, HS256 with the account's
signature secret (``vonage_signature_secret``: :func:`jwt_problem`); ``{"type":"custom",
"value":…}`` sends the value verbatim (``vonage_token``: :func:`token_matches`).
"""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Any, Final

import jwt
import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["CONNECTED", "VonageCodec", "content_type", "jwt_problem", "rate_of",
           "token_matches"]

CONNECTED: Final = "websocket:connected"
RATES: Final = (8000, 16000, 24000)
FRAME_MS: Final = 20
# Headers taken from websocket:connected (Vonage allows 512 bytes of them).
MAX_HEADERS: Final = 64
# How old a signed JWT may be (its `iat`), and how far ahead of our clock, in seconds.
MAX_JWT_AGE_S: Final = 300
JWT_LEEWAY_S: Final = 60
_any: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()
_CLEAR: Final = b'{"action":"clear"}'


def content_type(rate: int) -> str:
    """The ``content-type`` of the NCCO endpoint (and of ``websocket:connected``)."""
    return f"audio/l16;rate={rate}"


def rate_of(value: object) -> int:
    """The sample rate an ``audio/l16;rate=N`` content type names; RemoteProtocolError."""
    text = str(value).replace(" ", "").lower() if isinstance(value, str) else ""
    kind, _, parameters = text.partition(";")
    options = dict(p.partition("=")[::2] for p in parameters.split(";") if p)
    if kind == "audio/l16" and options.get("rate", "").isdigit():
        rate = int(options["rate"])
        if rate in RATES:
            return rate
    raise RemoteProtocolError(f"invalid {CONNECTED}: content-type {str(value)[:60]!r} "
                              "(audio/l16;rate=8000, 16000 or 24000)")


def _header_text(value: object) -> str:
    if isinstance(value, str | int | float | bool):
        return snake.text(value)
    return _encoder.encode(value).decode()  # an object or a list: as compact JSON


class VonageCodec(common.Codec):
    """One Vonage stream's codec (see the module docstring)."""

    provider: Final = "vonage"
    sample_rates: Final = frozenset({8000, 16000, 24000})  # audio/l16;rate=...
    tracks: Final[frozenset[str] | None] = frozenset({"inbound"})
    max_tracks: Final = 1
    stops_on_close: Final = True
    has_marks: Final = True
    echoes_marks_on_clear: Final = False
    native_encoding: Final = "pcm16"
    correlation_id: Final[str | None] = None

    def __init__(self) -> None:
        self.sample_rate = 16000
        self.stream_sid = ""
        self.frames = 0

    @property
    def frame_bytes(self) -> int:
        """One 20 ms frame of the stream's audio."""
        return self.sample_rate * 2 * FRAME_MS // 1000

    def parse(self, frame: bytes | str) -> common.Event:
        """One inbound text message as a common event; raises RemoteProtocolError."""
        try:
            message = _any.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"not JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            raise RemoteProtocolError("not a Vonage event: no `event` name")
        event = message["event"]
        if event == CONNECTED:
            return self._start(message)
        if event == "websocket:dtmf":
            digit = message.get("digit")
            if not isinstance(digit, str | int) or isinstance(digit, bool):
                raise RemoteProtocolError("invalid websocket:dtmf: no `digit`")
            return snake.dtmf(snake.DigitBody(str(digit)), None)
        if event == "websocket:notify":
            payload = message.get("payload")
            name = payload.get("name") if isinstance(payload, dict) else None
            if isinstance(name, str):
                return common.Mark(common._MarkBody(name))
        if not event.startswith("websocket:"):
            raise RemoteProtocolError(f"not a Vonage event: {event[:40]!r}")
        return common.UnknownEvent(event[:64])  # websocket:cleared, a notify not of ours

    def _start(self, message: dict[str, Any]) -> common.Start:
        rate = rate_of(message.get("content-type"))
        if self.stream_sid:  # the stream's format stays the one it started with
            raise RemoteProtocolError(f"{CONNECTED} while streaming")
        self.sample_rate = rate
        headers = {str(name): _header_text(value) for name, value in message.items()
                   if name not in ("event", "content-type")}
        headers = dict(list(headers.items())[:MAX_HEADERS])
        call_sid = headers.get("call_uuid") or headers.get("uuid") or str(uuid.uuid4())
        self.stream_sid = str(uuid.uuid4())
        return common.Start(common._StartBody(
            account_sid=None, stream_sid=self.stream_sid, call_sid=call_sid,
            tracks=("inbound",), media_format=common.MediaFormat("audio/l16",
                                                                 self.sample_rate, 1),
            custom_parameters=headers), None, self.stream_sid)

    def parse_binary(self, frame: bytes | str) -> common.Event:
        """One inbound binary message: 20 ms of the call's audio."""
        size = len(frame)
        if not size or size % 2:
            raise RemoteProtocolError(f"invalid audio: a binary frame of {size} bytes "
                                      "(PCM16 comes in whole samples)")
        if not self.stream_sid:
            raise RemoteProtocolError(f"media before {CONNECTED}")
        timestamp = self.frames * FRAME_MS
        self.frames += 1
        payload = frame if isinstance(frame, bytes) else frame.encode()
        return common.Media(self.stream_sid, common._MediaBody(
            "inbound", self.frames, timestamp, payload))

    # Outbound

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        missing = -len(payload) % self.frame_bytes
        return common.BinaryFrame(payload + bytes(missing) if missing else payload)

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return _encoder.encode({"action": "notify", "payload": {"name": name}})

    def serialize_clear(self, stream_sid: str) -> bytes:
        return _CLEAR


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether the ``Authorization`` header is ``expected`` (the custom value, verbatim)
    or ``Bearer <expected>``."""
    if not authorization:
        return False
    given = authorization.strip().encode()
    return (hmac.compare_digest(given, expected.encode())
            | hmac.compare_digest(given, b"Bearer " + expected.encode()))


def jwt_problem(secret: str, authorization: str | None, *,
                now: float | None = None, application_id: str | None = None) -> str | None:
    """Why ``Authorization: Bearer <JWT>`` is not one Vonage signed with ``secret`` (HS256,
    issued within :data:`MAX_JWT_AGE_S`, not expired, for ``application_id`` when that is
    given: ``wrong_application``), or None when it is."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "missing_token"
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=["HS256"],
                            options={"require": ["iat"], "verify_iat": False},
                            leeway=JWT_LEEWAY_S)
    except jwt.InvalidTokenError:
        return "bad_token"
    issued = claims.get("iat")
    moment = time.time() if now is None else now
    if (not isinstance(issued, int | float) or issued > moment + JWT_LEEWAY_S
            or moment - issued > MAX_JWT_AGE_S):
        return "bad_token"
    if application_id is not None and claims.get("application_id") != application_id:
        return "wrong_application"
    return None
