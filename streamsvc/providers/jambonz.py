"""jambonz's ``listen`` verb: its WebSocket (subprotocol ``audio.jambonz.org``) in, the common
events of :mod:`streamsvc.wire` out; ``playAudio`` or streamed audio, ``killAudio`` and
``disconnect`` out. Sans-I/O.

Follows docs.jambonz.org, the ``listen`` verb and "Bidirectional audio":

* The first message is text: the call's attributes as jambonz sends them on its webhooks
  (``callSid``, ``direction``, ``from``, ``to``, ``callId``, ``accountSid``,
  ``applicationSid``, ``callerName``, …), plus ``sampleRate`` and ``mixType`` (``mono``,
  ``mixed``: one track; ``stereo``: the two legs of a bridge), ``customerData`` and the
  verb's ``metadata`` object. The stream starts: ``callSid`` is the call id, ``accountSid``
  the account, the stream id is the service's own (jambonz sends none); the attributes,
  then ``customerData``'s and ``metadata``'s entries (a later name wins) are the call's
  context, values that are not text as compact JSON.
* Then BINARY messages: 16-bit little-endian PCM at ``sampleRate`` (8, 16, 24, 48 or
  64 kHz). ``mono``/``mixed``: the ``inbound`` track; ``stereo``: the two channels
  interleaved, the caller's leg the ``inbound`` track and the other leg ``outbound``. No
  timestamp: each message is the next frame, its length (the first message's) the frame
  length the session counts in.
* With the verb's ``passDtmf``, ``{"event":"dtmf","dtmf":"5","duration":…}`` is a key press.
  ``{"type":"playDone"}`` says jambonz finished playing one ``playAudio`` of ours.

Out (the verb's ``bidirectionalAudio``): audio as ``{"type":"playAudio","data":
{"audioContentType":"raw","sampleRate":…,"audioContent":"<base64 PCM16>","queuePlay":true}}``
in pieces of at most :data:`PLAY_CHUNK_MS`, a mark resolving on the ``playDone`` of the
last ``playAudio`` before it; or, on routes whose verb sets ``bidirectionalAudio.streaming``
(``bidirectional_streaming = true``), binary PCM16 at the stream's rate, marks resolved by
the playback clock (marks over ``listen`` are not a dependable acknowledgement). ``clear``
is ``{"type":"killAudio"}``, ending the call ``{"type":"disconnect"}``.

Authentication: HTTP Basic (``jambonz_basic_auth``, ``user:password`` in the verb's
``wsAuth``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import snake

__all__ = ["RATES", "SUBPROTOCOL", "JambonzCodec"]

SUBPROTOCOL: Final = "audio.jambonz.org"
RATES: Final = frozenset({8000, 16000, 24000, 48000, 64000})
MIX_TYPES: Final = ("mono", "mixed", "stereo")
# One playAudio carries at most this much audio (a message stays well inside jambonz's
# limits; a mark then waits for at most this much more than the audio before it).
PLAY_CHUNK_MS: Final = 1000
MAX_CONTEXT_NAMES: Final = 128
MAX_VALUE_CHARS: Final = 4096
MAX_PENDING_PLAYS: Final = 1000
_any: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()
_KILL: Final = b'{"type":"killAudio"}'
_DISCONNECT: Final = b'{"type":"disconnect"}'
_NOT_CONTEXT: Final = frozenset({"sampleRate", "mixType", "customerData", "metadata"})




def _value(value: object) -> str:
    return snake.context_value(value, MAX_VALUE_CHARS)


def _context(message: Mapping[str, Any]) -> dict[str, str]:
    context: dict[str, str] = {}
    tables = [{k: v for k, v in message.items() if k not in _NOT_CONTEXT}]
    tables += [message[key] for key in ("customerData", "metadata")
               if isinstance(message.get(key), dict)]
    for table in tables:
        for name, value in table.items():
            if len(context) >= MAX_CONTEXT_NAMES and name not in context:
                break
            context[str(name)[:256]] = _value(value)
    return context


class JambonzCodec(common.Codec):
    """One ``listen`` stream (see the module docstring); ``streaming``: the verb sets
    ``bidirectionalAudio.streaming`` (audio back as binary frames)."""

    provider: Final = "jambonz"
    sample_rates: Final = RATES
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = True
    echoes_marks_on_clear: Final = False
    native_encoding: Final = "pcm16"
    correlation_id: Final[str | None] = None

    def __init__(self, streaming: bool = False) -> None:
        self.streaming = streaming
        self.stream_sid = ""
        self.sample_rate = 8000
        self.stereo = False
        self._frame_ms = common.FRAME_MS
        self._measured = False
        self.frames = 0
        # playAudio mode: the plays sent, those jambonz finished, the marks after each.
        self.plays_sent = 0
        self.plays_done = 0
        self._marks: dict[int, list[str]] = {}

    @property
    def has_marks(self) -> bool:
        """playAudio: a mark resolves on the playDone of the audio before it; streaming:
        by the playback clock."""
        return not self.streaming

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

    @property
    def chunk_bytes(self) -> int | None:
        if self.streaming:
            return None  # 20 ms binary frames
        return self.sample_rate * 2 * PLAY_CHUNK_MS // 1000

    def report(self) -> dict[str, object] | None:
        return {"mix_type": "stereo" if self.stereo else "mono",
                "audio_back": "streaming" if self.streaming else "playAudio",
                "plays_sent": self.plays_sent, "plays_done": self.plays_done}

    # -- inbound ----------------------------------------------------------------------

    def parse(self, frame: bytes | str) -> common.Event:
        """One text message as a common event; raises RemoteProtocolError."""
        try:
            message = _any.decode(frame)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise RemoteProtocolError("not a JSON object")
        if not self.stream_sid:
            return self._start(message)
        if message.get("event") == "dtmf":
            digit = message.get("dtmf")
            if not isinstance(digit, str | int) or isinstance(digit, bool):
                raise RemoteProtocolError("invalid dtmf: no `dtmf` digit")
            return snake.dtmf(snake.DigitBody(str(digit)), None)
        if message.get("type") == "playDone":
            return self._play_done()
        name = message.get("event") or message.get("type")
        return common.UnknownEvent(str(name)[:64] if name is not None else "unnamed")

    def _start(self, message: Mapping[str, Any]) -> common.Start:
        call = message.get("callSid")
        if not isinstance(call, str) or not call or len(call) > 128:
            raise RemoteProtocolError("invalid first message: no `callSid`")
        rate = message.get("sampleRate", 8000)
        if isinstance(rate, str) and rate.isdigit():
            rate = int(rate)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate not in RATES:
            raise RemoteProtocolError(f"invalid first message: sampleRate {str(rate)[:12]} "
                                      "(8000, 16000, 24000, 48000 or 64000)")
        mix = message.get("mixType", "mono")
        self.stereo = mix == "stereo"
        self.sample_rate = rate
        self.stream_sid = str(uuid.uuid4())
        account = message.get("accountSid")
        tracks = ("inbound", "outbound") if self.stereo else ("inbound",)
        return common.Start(common._StartBody(
            account_sid=account if isinstance(account, str) else None,
            stream_sid=self.stream_sid, call_sid=call, tracks=tracks,
            media_format=common.MediaFormat("audio/l16", rate, 1),
            custom_parameters=_context(message)), None, self.stream_sid)

    def _play_done(self) -> common.Event:
        self.plays_done += 1
        done = [self._marks.pop(play) for play in sorted(self._marks)
                if play <= self.plays_done]
        names = [name for marks in done for name in marks]
        if not names:
            return common.Noted("play_done")
        return common.Batch(tuple(common.Mark(common._MarkBody(name)) for name in names))

    def parse_binary(self, frame: bytes | str) -> common.Event:
        """One audio message: the next frame of each track."""
        if not self.stream_sid:
            raise RemoteProtocolError("audio before the first (text) message")
        payload = frame if isinstance(frame, bytes) else frame.encode()
        width = 4 if self.stereo else 2
        if not payload or len(payload) % width:
            raise RemoteProtocolError(f"invalid audio: {len(payload)} bytes (whole 16-bit "
                                      f"samples of {width // 2} channel(s))")
        if not self._measured:
            self._measured = True
            self._frame_ms = max(1, round(len(payload) // width * 1000 / self.sample_rate))
        timestamp = self.frames * self._frame_ms
        self.frames += 1
        if not self.stereo:
            return common.Media(self.stream_sid, common._MediaBody(
                "inbound", self.frames, timestamp, payload))
        words = memoryview(payload).cast("H")
        return common.Batch((
            common.Media(self.stream_sid, common._MediaBody(
                "inbound", self.frames, timestamp, words[0::2].tobytes())),
            common.Media(self.stream_sid, common._MediaBody(
                "outbound", self.frames, timestamp, words[1::2].tobytes()))))

    # -- outbound ---------------------------------------------------------------------

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        if self.streaming:
            return common.BinaryFrame(payload)
        self.plays_sent += 1
        return _encoder.encode({"type": "playAudio", "data": {
            "audioContentType": "raw", "sampleRate": self.sample_rate,
            "audioContent": base64.b64encode(payload).decode(), "queuePlay": True}})

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        if not self.streaming and len(self._marks) < MAX_PENDING_PLAYS:
            self._marks.setdefault(self.plays_sent, []).append(name)
        return None  # jambonz has no mark of its own that can be relied on

    def serialize_clear(self, stream_sid: str) -> bytes:
        self._marks.clear()  # resolved "cleared" as the kill is sent
        self.plays_done = self.plays_sent  # what was queued will not play
        return _KILL

    def serialize_end(self, reason: str, variables: Mapping[str, str] | None) -> bytes | None:
        return _DISCONNECT
