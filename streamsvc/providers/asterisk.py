"""Asterisk's WebSocket channel (``chan_websocket``, Asterisk 20.16+, 21.11+, 22.6+): its
control messages and binary media in, the common events of :mod:`streamsvc.wire` out;
media, ``MARK_MEDIA``, ``FLUSH_MEDIA`` and ``HANGUP`` out. Sans-I/O.

Follows docs.asterisk.org, "WebSocket" channel driver (Configuration / Channel Drivers):

* Control messages are TEXT frames, in either of Asterisk's formats: plain text (the
  default: ``MEDIA_START connection_id:… channel:… channel_id:… format:ulaw
  optimal_frame_size:160 ptime:20``) or JSON (``chan_websocket.conf`` or the dial string's
  ``f(json)``, Asterisk 20.18+, 22.8+, 23.2+: ``{"event":"MEDIA_START",…,
  "channel_variables":{…}}``). Both are read; commands go out in the format the
  ``MEDIA_START`` came in.
* ``MEDIA_START`` starts the stream: ``channel_id`` is the call id (the channel name on
  Asterisk versions that send no ``channel_id``), ``connection_id`` the stream id, the
  ``channel_variables`` (JSON only) and the upgrade URL's query parameters (the dial
  string's ``v(…)``) the call's context (the variables win a clash). ``format`` sets the
  audio: ``ulaw``, ``alaw`` (G.711, 8 kHz) or ``slin`` / ``slin12`` … ``slin48`` (16-bit
  signed linear, little-endian, at 8 to 48 kHz); ``optimal_frame_size`` the size of what is
  sent back (else ``ptime``'s worth, 20 ms by default).
* BINARY frames are media, one track (``inbound``: what the channel hears), each the next
  frame of the stream (Asterisk's media carries no timestamp), the first one's length (in
  the format's samples) the frame length the session counts in. Audio that arrives before
  ``MEDIA_START`` (Asterisk may send it first under load) is held, at most
  :data:`MAX_EARLY_FRAMES` frames, and given to the session right after the start; more
  is dropped and counted (``protocol.early_frames_dropped``).
* ``DTMF_END`` is a key press; ``MEDIA_MARK_PROCESSED`` the echo of a mark (its
  ``correlation_id``); ``MEDIA_XOFF`` stops what the service sends until ``MEDIA_XON``
  (held here, at most :data:`MAX_HELD_OUT_BYTES`; more is dropped and counted); ``ERROR``
  (``error_text``) is logged; ``STATUS``, ``QUEUE_DRAINED`` and
  ``MEDIA_BUFFERING_COMPLETED`` are read and logged. There is no stop message: the
  connection's close ends the call (:attr:`AsteriskCodec.stops_on_close`).

Out: media as BINARY frames in the channel's format, in ``optimal_frame_size`` chunks
(never a message over 65,500 bytes: Asterisk hangs up on one), ``MARK_MEDIA`` with a
``correlation_id`` of the codec's own (one token in either format, mapped back to the mark's
name when Asterisk answers ``MEDIA_MARK_PROCESSED`` once the audio before it played),
``FLUSH_MEDIA`` (the clear: what waits is dropped, pending marks resolve ``cleared``) and
``HANGUP`` (ending the call).

Authentication: HTTP Basic (``asterisk_basic_auth``, ``user:password``: the
``websocket_client.conf`` connection's ``username`` and ``password``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["FORMATS", "MAX_MESSAGE_BYTES", "AsteriskCodec", "format_of", "plain_fields"]

# Asterisk's formats: (native encoding, sample rate).
FORMATS: Final = {
    "ulaw": ("mulaw", 8000), "alaw": ("alaw", 8000), "slin": ("pcm16", 8000),
    "slin12": ("pcm16", 12000), "slin16": ("pcm16", 16000), "slin24": ("pcm16", 24000),
    "slin32": ("pcm16", 32000), "slin44": ("pcm16", 44100), "slin48": ("pcm16", 48000),
}
# Asterisk closes the connection and hangs up on a bigger message.
MAX_MESSAGE_BYTES: Final = 65_500
# Audio held before MEDIA_START (2 s of 20 ms frames), and outbound audio held while
# Asterisk said MEDIA_XOFF (20 s of 16 kHz slin: Asterisk's own queue holds about 20 s).
MAX_EARLY_FRAMES: Final = 100
MAX_PENDING_MARKS: Final = 1000
MAX_HELD_OUT_BYTES: Final = 640_000
# Context names taken from one MEDIA_START (channel variables and query parameters).
MAX_CONTEXT_NAMES: Final = 128
MAX_VALUE_CHARS: Final = 4096
_encoder: Final = msgspec.json.Encoder()
_KNOWN: Final = frozenset({"MEDIA_START", "DTMF_END", "MEDIA_XOFF", "MEDIA_XON",
                           "MEDIA_MARK_PROCESSED", "STATUS", "ERROR", "QUEUE_DRAINED",
                           "MEDIA_BUFFERING_COMPLETED"})


def _value(value: object) -> str:
    return snake.context_value(value, MAX_VALUE_CHARS)


def format_of(name: object) -> tuple[str, int]:
    """(native encoding, sample rate) of an Asterisk format name; RemoteProtocolError for
    one the service cannot take."""
    found = FORMATS.get(str(name).lower()) if isinstance(name, str) else None
    if found is None:
        raise RemoteProtocolError(f"invalid MEDIA_START: format {str(name)[:20]!r} (ulaw, "
                                  "alaw, slin, slin12 to slin48)")
    return found


def plain_fields(text: str) -> tuple[str, dict[str, str], str]:
    """A plain-text control message: its name, its ``key:value`` fields and what else
    follows the name (``MEDIA_BUFFERING_COMPLETED <id>``)."""
    name, _, rest = text.strip().partition(" ")
    fields: dict[str, str] = {}
    bare: list[str] = []
    for token in rest.split():
        key, found, value = token.partition(":")
        if found and key and len(fields) < 64:
            fields[key] = value
        else:
            bare.append(token)
    return name, fields, " ".join(bare)




def _positive(value: object, default: int, most: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most:
        return value
    return default


class AsteriskCodec(common.Codec):
    """One chan_websocket connection (see the module docstring); ``query`` is the upgrade
    URL's query string (the dial string's ``v(…)`` parameters)."""

    provider: Final = "asterisk"
    sample_rates: Final = frozenset(rate for _, rate in FORMATS.values())
    tracks: Final[frozenset[str] | None] = frozenset({"inbound"})
    max_tracks: Final = 1
    stops_on_close: Final = True
    has_marks: Final = True
    echoes_marks_on_clear: Final = False
    correlation_id: Final[str | None] = None

    def __init__(self, query: str = "") -> None:
        pairs = parse_qsl(query, keep_blank_values=True)[:MAX_CONTEXT_NAMES]
        self.query_parameters = {name: value[:MAX_VALUE_CHARS] for name, value in pairs}
        self.json = False  # the control format Asterisk speaks on this connection
        self.stream_sid = ""
        self.encoding = "mulaw"
        self.sample_rate = 8000
        self._frame_ms = common.FRAME_MS
        self.optimal_frame_size = 160
        self.frames = 0
        self._early: list[bytes] = []
        self.early_frames_dropped = 0
        # Flow control: while Asterisk said MEDIA_XOFF, what the service sends waits here.
        self.xoff = False
        self._held_out: list[bytes] = []
        self._held_out_bytes = 0
        self._replies: list[bytes] = []
        self.xoffs = 0
        self.held_out_dropped = 0
        self.errors = 0
        self.last_status: dict[str, str] | None = None
        self._marks: dict[str, str] = {}  # correlation id -> the mark's name
        self._mark_count = 0

    @property
    def native_encoding(self) -> str:
        return self.encoding

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

    @property
    def chunk_bytes(self) -> int | None:
        """What one media message back carries: ``optimal_frame_size`` (20 ms)."""
        return self.optimal_frame_size

    def replies(self) -> list[bytes]:
        replies, self._replies = self._replies, []
        return replies

    def report(self) -> dict[str, object] | None:
        return {"format": next((name for name, value in FORMATS.items()
                                if value == (self.encoding, self.sample_rate)), None),
                "control": "json" if self.json else "plain-text",
                "early_frames_dropped": self.early_frames_dropped,
                "xoffs": self.xoffs, "held_out_dropped": self.held_out_dropped,
                "errors": self.errors, "last_status": self.last_status}

    # -- inbound ----------------------------------------------------------------------

    def parse(self, frame: bytes | str) -> common.Event:
        """One control message (plain text or JSON) as a common event; raises
        RemoteProtocolError."""
        try:
            text = frame.decode("utf-8", "strict") if isinstance(frame, bytes) else frame
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"not text: {exc}") from None
        fields: Mapping[str, Any]
        json_format = text.lstrip().startswith("{")
        if json_format:
            fields, name = common.tagged_object(text, "event")
            bare = ""
        else:
            name, fields, bare = plain_fields(text)
        if name not in _KNOWN:
            if not name.isupper() or len(name) > 40:
                raise RemoteProtocolError(f"not an Asterisk event: {name[:40]!r}")
            return common.UnknownEvent(name)
        if name == "MEDIA_START":
            self.json = json_format
            return self._start(fields)
        return self._event(name, fields, bare)

    def _event(self, name: str, fields: Mapping[str, Any], bare: str) -> common.Event:
        if name == "DTMF_END":
            digit = fields.get("digit")
            if not isinstance(digit, str | int) or isinstance(digit, bool):
                raise RemoteProtocolError("invalid DTMF_END: no `digit`")
            return snake.dtmf(snake.DigitBody(str(digit)), None)
        if name == "MEDIA_MARK_PROCESSED":
            correlation = _value(fields.get("correlation_id", bare))
            return common.Mark(common._MarkBody(self._marks.pop(correlation, correlation)))
        if name == "MEDIA_XOFF":
            self.xoff = True
            self.xoffs += 1
            return common.Noted("media_xoff", {}, log=True)
        if name == "MEDIA_XON":
            self.xoff = False
            held = len(self._held_out)
            self._replies += self._held_out
            self._held_out, self._held_out_bytes = [], 0
            return common.Noted("media_xon", {"released": held}, log=True)
        if name == "ERROR":
            self.errors += 1
            return common.Noted("error", {"error_text": _value(
                fields.get("error_text", bare))[:500]}, log=True, level="warning")
        if name == "STATUS":
            self.last_status = {str(k)[:40]: _value(v)[:100] for k, v in fields.items()
                                if k != "event"}
            return common.Noted("status", dict(self.last_status), log=True)
        return common.Noted(name.lower(), {"correlation_id": _value(
            fields.get("correlation_id", bare))[:200]}, log=True)

    def _start(self, fields: Mapping[str, Any]) -> common.Event:
        if self.stream_sid:
            raise RemoteProtocolError("MEDIA_START while streaming")
        encoding, rate = format_of(fields.get("format"))
        connection = fields.get("connection_id")
        if not isinstance(connection, str) or not connection or len(connection) > 128:
            raise RemoteProtocolError("invalid MEDIA_START: no `connection_id`")
        call = fields.get("channel_id") or fields.get("channel")
        if not isinstance(call, str) or not call:
            raise RemoteProtocolError("invalid MEDIA_START: no `channel_id` or `channel`")
        self.encoding, self.sample_rate = encoding, rate
        self._frame_ms = _positive(fields.get("ptime"), common.FRAME_MS, 200)
        sample_bytes = 1 if encoding != "pcm16" else 2
        default_size = rate * sample_bytes * self._frame_ms // 1000
        self.optimal_frame_size = _positive(fields.get("optimal_frame_size"), default_size,
                                            MAX_MESSAGE_BYTES)
        self.stream_sid = connection
        context = dict(self.query_parameters)
        variables = fields.get("channel_variables")
        if isinstance(variables, dict):
            for name, value in list(variables.items())[:MAX_CONTEXT_NAMES]:
                context[str(name)[:256]] = _value(value)
        if isinstance(fields.get("channel"), str):
            context.setdefault("channel", fields["channel"][:256])
        start = common.Start(common._StartBody(
            account_sid=None, stream_sid=connection, call_sid=call[:128],
            tracks=("inbound",), media_format=common.MediaFormat(
                {"mulaw": "audio/x-mulaw", "alaw": "audio/x-alaw"}.get(encoding, "audio/l16"),
                rate, 1),
            custom_parameters=dict(list(context.items())[:MAX_CONTEXT_NAMES])),
            None, connection)
        early, self._early = self._early, []
        if not early:
            return start
        return common.Batch((start, *(self._media(frame) for frame in early)))

    def parse_binary(self, frame: bytes | str) -> common.Event:
        """One media message: the next frame of the channel's audio (held until
        ``MEDIA_START`` when it comes first)."""
        payload = frame if isinstance(frame, bytes) else frame.encode()
        if not payload:
            raise RemoteProtocolError("invalid media: an empty binary frame")
        if not self.stream_sid:
            if len(self._early) >= MAX_EARLY_FRAMES:
                self.early_frames_dropped += 1
                return common.Noted("early_audio_dropped")
            self._early.append(payload)
            return common.Noted("early_audio_held")
        if self.encoding == "pcm16" and len(payload) % 2:
            raise RemoteProtocolError(f"invalid media: {len(payload)} bytes of slin "
                                      "(16-bit samples)")
        return self._media(payload)

    def _media(self, payload: bytes) -> common.Media:
        if not self.frames:  # the first frame's length is the stream's frame length
            sample_bytes = 2 if self.encoding == "pcm16" else 1
            self._frame_ms = max(1, round(len(payload) * 1000
                                          / (self.sample_rate * sample_bytes)))
        timestamp = self.frames * self._frame_ms
        self.frames += 1
        return common.Media(self.stream_sid, common._MediaBody(
            "inbound", self.frames, timestamp, payload))

    # -- outbound ---------------------------------------------------------------------

    def _command(self, name: str, **parameters: str) -> bytes:
        if self.json:
            return _encoder.encode({"command": name, **parameters})
        return " ".join((name, *parameters.values())).encode()

    def _send_or_hold(self, frame: bytes) -> bytes | None:
        """``frame`` to send now, or None: held while Asterisk said MEDIA_XOFF."""
        if not self.xoff:
            return frame
        if self._held_out_bytes + len(frame) > MAX_HELD_OUT_BYTES:
            self.held_out_dropped += 1
            return None
        self._held_out.append(frame)
        self._held_out_bytes += len(frame)
        return None

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes | None:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"a media message of {len(payload)} bytes: Asterisk hangs up "
                             f"on one over {MAX_MESSAGE_BYTES}")
        return self._send_or_hold(common.BinaryFrame(payload))

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        # Our own correlation ids (one token, whatever the mark's name), mapped back on
        # MEDIA_MARK_PROCESSED.
        self._mark_count += 1
        correlation = f"mark-{self._mark_count}"
        if len(self._marks) < MAX_PENDING_MARKS:
            self._marks[correlation] = name
        return self._send_or_hold(self._command("MARK_MEDIA", correlation_id=correlation))

    def serialize_clear(self, stream_sid: str) -> bytes:
        self._held_out, self._held_out_bytes = [], 0  # what waited is dropped too
        self._marks.clear()  # resolved "cleared" as the flush is sent
        return self._command("FLUSH_MEDIA")

    def serialize_end(self, reason: str, variables: Mapping[str, str] | None) -> bytes | None:
        return self._command("HANGUP")
