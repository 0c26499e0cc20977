"""Azure Communication Services (Call Automation) media streaming: ACS frames in, the common
events of :mod:`streamsvc.wire` out; audio and ``StopAudio`` out. Sans-I/O.

Follows Microsoft's audio streaming quickstart and concept pages
(learn.microsoft.com/azure/communication-services/how-tos/call-automation/audio-streaming-quickstart,
.../concepts/call-automation/audio-streaming-concept):

* ``{"kind":"AudioMetadata","audioMetadata":{"subscriptionId","encoding","sampleRate",
  "channels","length"}}`` opens the stream: a :class:`~streamsvc.wire.Start` whose
  ``stream_sid`` is the subscription id and whose ``call_sid`` is the upgrade's
  ``x-ms-call-connection-id`` header (the subscription id when it is missing), and whose
  ``custom_parameters`` are the context the IncomingCall webhook stored under the
  upgrade's ``x-ms-call-correlation-id`` (:mod:`streamsvc.web.acs_events`);
* ``{"kind":"AudioData","audioData":{"timestamp":ISO 8601,"participantRawID","data":
  base64 PCM16LE,"silent"}}`` is one 20 ms :class:`~streamsvc.wire.Media` frame; its
  timestamp becomes milliseconds since the Unix epoch, so gaps, reordering and duplicates
  are counted in 20 ms slots as for Twilio. Mixed audio is the track ``inbound``; on an
  unmixed stream each ``participantRawID`` is its own track;
* ``{"kind":"DtmfData","dtmfData":{"data":"3"}}`` is a :class:`~streamsvc.wire.Dtmf`;
* there is no stop message: a clean close ends the call (:attr:`AcsCodec.stops_on_close`).

Out (bidirectional streams; PascalCase, as ACS expects): ``{"Kind":"AudioData","AudioData":
{"Data":base64 PCM16},"StopAudio":null}`` and ``{"Kind":"StopAudio","AudioData":null,
"StopAudio":{}}`` (= clear). ACS has no marks: the service resolves them by the playback
clock of the audio it sent (:mod:`streamsvc.live`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError

__all__ = ["AcsCodec", "parse_timestamp_ms"]

CALL_CONNECTION_HEADER: Final = "x-ms-call-connection-id"
CORRELATION_HEADER: Final = "x-ms-call-correlation-id"
# Unmixed audio carries up to four dominant speakers; a few more ids over a call's life.
MAX_PARTICIPANT_TRACKS: Final = 8
_DIGIT: Final = re.compile(r"[0-9*#A-D]")


class _Metadata(msgspec.Struct, frozen=True, rename="camel"):
    subscription_id: str
    encoding: str
    sample_rate: common.WireInt
    channels: common.WireInt
    length: Any = None  # bytes a frame carries: never used, so never a reason to refuse


class _AudioMetadata(msgspec.Struct, frozen=True, tag="AudioMetadata", tag_field="kind",
                     rename="camel"):
    audio_metadata: _Metadata


class _Audio(msgspec.Struct, frozen=True):
    timestamp: str
    data: bytes  # base64 on the wire
    participantRawID: str | None = None  # the wire's own spelling
    silent: bool = False


class _AudioData(msgspec.Struct, frozen=True, tag="AudioData", tag_field="kind",
                 rename="camel"):
    audio_data: _Audio


class _Dtmf(msgspec.Struct, frozen=True):
    data: str


class _DtmfData(msgspec.Struct, frozen=True, tag="DtmfData", tag_field="kind",
                rename="camel"):
    dtmf_data: _Dtmf


_decoder: Final = msgspec.json.Decoder(_AudioMetadata | _AudioData | _DtmfData)


def parse_timestamp_ms(text: str) -> int:
    """An ISO 8601 timestamp (``2024-11-15T19:16:12.925Z``) as whole milliseconds since the
    Unix epoch. Raises ValueError."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    milliseconds = round(moment.timestamp() * 1000)
    if milliseconds < 0:
        raise ValueError("before 1970")
    return milliseconds


class AcsCodec(common.Codec):
    """One ACS media stream's codec: ``headers`` are the upgrade request's (lower-case
    names); ``unmixed`` says whether each participant is its own track."""

    provider: Final = "acs"
    sample_rates: Final = frozenset({16000, 24000})  # PCM 16 kHz or 24 kHz mono
    tracks: Final[frozenset[str] | None] = None  # participant ids: any, up to max_tracks
    max_tracks: Final = MAX_PARTICIPANT_TRACKS
    stops_on_close: Final = True
    has_marks: Final = False
    native_encoding: Final = "pcm16"

    # ACS carries no parameters on the wire: the call's context is the one its IncomingCall
    # stored under the correlation id (the call core reads it from the context store).
    context_on_wire: Final = False
    # AudioData timestamps are ISO 8601 wall-clock times.
    wall_clock_timestamps: Final = True

    def __init__(self, headers: Mapping[str, str], *, unmixed: bool = False) -> None:
        self.call_connection_id = headers.get(CALL_CONNECTION_HEADER) or None
        self._correlation_id = headers.get(CORRELATION_HEADER) or None
        self.unmixed = unmixed
        self.subscription_id = ""
        self.chunks = 0

    @property
    def correlation_id(self) -> str | None:
        return self._correlation_id

    def parse(self, frame: bytes | str) -> common.Event:
        """One inbound text frame as a common event; raises RemoteProtocolError."""
        try:
            message = _decoder.decode(frame)
        except msgspec.ValidationError as exc:
            return self._unknown_or_invalid(frame, exc)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RemoteProtocolError(f"not JSON: {exc}") from None
        if type(message) is _AudioData:
            return self._media(message.audio_data)
        if type(message) is _DtmfData:
            digit = message.dtmf_data.data
            if not _DIGIT.fullmatch(digit):
                raise RemoteProtocolError(f"invalid DtmfData: not a key: {digit[:20]!r}")
            return common.Dtmf(common._DtmfBody("inbound_track", digit),
                               self.subscription_id or None)
        assert type(message) is _AudioMetadata
        return self._start(message.audio_metadata)

    def _start(self, metadata: _Metadata) -> common.Start:
        self.subscription_id = self.subscription_id or metadata.subscription_id
        media_format = common.MediaFormat(f"audio/{metadata.encoding.lower()}",
                                          metadata.sample_rate, metadata.channels)
        body = common._StartBody(
            account_sid="", stream_sid=metadata.subscription_id,
            call_sid=self.call_connection_id or metadata.subscription_id,
            tracks=() if self.unmixed else ("inbound",), media_format=media_format)
        return common.Start(body, None, metadata.subscription_id)

    def _media(self, audio: _Audio) -> common.Media:
        try:
            timestamp_ms = parse_timestamp_ms(audio.timestamp)
        except ValueError:
            raise RemoteProtocolError(
                f"invalid AudioData: timestamp {audio.timestamp[:40]!r}") from None
        track = (audio.participantRawID or "inbound") if self.unmixed else "inbound"
        self.chunks += 1
        return common.Media(self.subscription_id,
                            common._MediaBody(track, self.chunks, timestamp_ms, audio.data))

    def _unknown_or_invalid(self, frame: bytes | str,
                            error: msgspec.ValidationError) -> common.Event:
        """A well-formed message of a kind this version does not know is ignored and
        counted; a known kind with a bad field is a bad frame."""
        _, kind = common.tagged_object(frame, "kind")
        if kind in ("AudioMetadata", "AudioData", "DtmfData"):
            raise RemoteProtocolError(f"invalid {kind}: {error}")
        return common.UnknownEvent(kind)

    # Outbound

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        """Audio to play: PCM16 little-endian at the stream's rate."""
        return _encoder.encode(_OutAudio(_OutAudioBody(payload)))

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        return None  # ACS has no marks

    def serialize_clear(self, stream_sid: str) -> bytes:
        return _STOP_AUDIO


class _OutAudioBody(msgspec.Struct, gc=False, rename="pascal"):
    data: bytes  # base64


class _OutAudio(msgspec.Struct, gc=False, tag="AudioData", tag_field="Kind",
                rename="pascal"):
    audio_data: _OutAudioBody
    stop_audio: None = None


_encoder: Final = msgspec.json.Encoder()
_STOP_AUDIO: Final = b'{"Kind":"StopAudio","AudioData":null,"StopAudio":{}}'
