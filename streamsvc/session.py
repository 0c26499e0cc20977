"""The per-stream state machine: whole messages in, typed events out. No I/O, no clock.

Four verbs, as in websockets' ``Protocol`` one level up:

* :meth:`Session.receive_message` takes one inbound message (text; binary only carries
  audio, on Vonage);
* :meth:`Session.events_received` returns what it produced: wire events, plus a
  :class:`BadFrame` for anything malformed or out of place (counted, never fatal);
* :meth:`Session.send_media`, :meth:`Session.send_mark`, :meth:`Session.send_clear` queue
  outbound messages (bidirectional streams only);
* :meth:`Session.data_to_send` returns the queued frames for the shell to write.

:meth:`Session.close` ends the session and returns its :class:`CallSummary`.

States: ``AWAITING_START`` -> ``STREAMING`` (on ``start``) -> ``STOPPED`` (on ``stop`` or
:meth:`~Session.close`). One session is one stream: key sessions by ``stream_sid`` (several
streams may belong to one call, Twilio's Media Streams pages).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from streamsvc import wire
from streamsvc.audio import to_pcm16
from streamsvc.exceptions import LocalProtocolError, RemoteProtocolError
from streamsvc.providers.twilio import TWILIO

__all__ = [
    "DEFAULT_PARAMETER_BUDGET_BYTES",
    "BadFrame",
    "CallSummary",
    "Session",
    "SessionEvent",
    "State",
    "StopReason",
    "TrackStats",
]

# Twilio advises at most 800 bytes of custom parameters in total (Twilio's Media Streams pages).
DEFAULT_PARAMETER_BUDGET_BYTES: Final = 800
# The reason of a frame nested deeper than any provider's messages (the decoder's own
# recursion limit): a counted bad frame like any other, on every provider.
TOO_DEEP: Final = "nested too deeply to read"
# Media frames are 20 ms apart (Twilio's Media Streams pages); slots are counted in these.
FRAME_MS: Final = wire.FRAME_MS
# A track remembers which of its latest slots are missing (a late frame can still fill
# them) in a bitmap this wide: 82 s of 20 ms slots, about 0.5 kB per track however large a
# gap. A hole older than that is counted as missing for good.
HOLE_WINDOW_SLOTS: Final = 4096
MAX_REMEMBERED_HOLES: Final = HOLE_WINDOW_SLOTS - 1  # the newest slot is always a frame
_WINDOW_MASK: Final = (1 << HOLE_WINDOW_SLOTS) - 1
# DTMF digits a session keeps (a caller presses a few dozen keys); later ones are counted.
MAX_DTMF_DIGITS: Final = 256
# How much of a bad frame is kept for the log line.
BAD_FRAME_EXCERPT_CHARS: Final = 120

StopReason: TypeAlias = Literal["stop", "closed", "aborted", "error", "shutdown", "moved",
                              "handed_off"]


class State(enum.Enum):
    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame that was malformed or not allowed in the session's state. It was counted in
    ``bad_frames`` and otherwise ignored; ``count`` is its 1-based number in this session."""

    reason: str
    excerpt: str
    count: int


SessionEvent: TypeAlias = wire.Event | BadFrame


@dataclass(slots=True)
class TrackStats:
    """Counters for one track. ``missing`` counts the ``frame_ms`` slots (20 ms, or the
    provider's frame length: Exotel's 100 ms) between the track's
    earliest and latest timestamp that never arrived; a frame that arrives after a later one
    fills its slot and counts as ``out_of_order``, not missing; a second frame for a slot
    counts as ``duplicates``. Memory is bounded whatever the timestamps: holes are a bitmap
    of the latest :data:`HOLE_WINDOW_SLOTS` slots (bit ``i`` is slot ``highest_slot - i``)."""

    frames: int = 0
    bytes: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    first_timestamp_ms: int = -1
    lowest_slot: int = 0
    highest_slot: int = 0
    holes: int = 0
    forgotten_holes: int = 0
    frame_ms: int = FRAME_MS

    @property
    def missing(self) -> int:
        return self.holes.bit_count() + self.forgotten_holes

    @property
    def remembered_holes(self) -> int:
        return self.holes.bit_count()

    @property
    def last_timestamp_ms(self) -> int:
        return self.first_timestamp_ms + self.highest_slot * self.frame_ms

    def add_frame(self, timestamp_ms: int, payload_bytes: int) -> None:
        """Account one frame at ``timestamp_ms`` carrying ``payload_bytes`` of audio."""
        self.frames += 1
        self.bytes += payload_bytes
        if self.first_timestamp_ms < 0:
            self.first_timestamp_ms = timestamp_ms
            return
        # Round to the nearest slot: timestamps jitter by a millisecond or two.
        frame_ms = self.frame_ms
        slot = (timestamp_ms - self.first_timestamp_ms + frame_ms // 2) // frame_ms
        if slot == self.highest_slot + 1:  # the usual case: the next frame
            self.highest_slot = slot
            if self.holes:
                self._advance(1)
        elif slot > self.highest_slot:
            self._advance(slot - self.highest_slot)
            self.highest_slot = slot
        elif slot < self.lowest_slot:
            self._holes_below(slot)
            self.out_of_order += 1
        elif (back := self.highest_slot - slot) < HOLE_WINDOW_SLOTS and self.holes >> back & 1:
            self.holes &= ~(1 << back)
            self.out_of_order += 1
        else:
            self.duplicates += 1

    def _advance(self, step: int) -> None:
        """The newest slot moves ``step`` ahead; the ``step - 1`` slots skipped are holes."""
        skipped = step - 1
        if step >= HOLE_WINDOW_SLOTS:
            self.forgotten_holes += self.holes.bit_count() + skipped - MAX_REMEMBERED_HOLES
            self.holes = _WINDOW_MASK & ~1
            return
        holes = (self.holes << step) | (((1 << skipped) - 1) << 1)
        if holes > _WINDOW_MASK:
            self.forgotten_holes += (holes >> HOLE_WINDOW_SLOTS).bit_count()
            holes &= _WINDOW_MASK
        self.holes = holes

    def _holes_below(self, slot: int) -> None:
        """A frame before the earliest so far: the slots between are holes."""
        nearest = self.highest_slot - self.lowest_slot + 1  # bit of the slot below lowest
        farthest = self.highest_slot - slot - 1  # bit of the slot above this frame
        kept_to = min(farthest, HOLE_WINDOW_SLOTS - 1)
        if kept_to >= nearest:
            self.holes |= ((1 << (kept_to - nearest + 1)) - 1) << nearest
        self.forgotten_holes += max(0, farthest - max(kept_to, nearest - 1))
        self.lowest_slot = slot


@dataclass(frozen=True, slots=True)
class CallSummary:
    """What happened on one stream, produced once by :meth:`Session.close`. These fields
    are what the ``stream.stopped`` log line carries."""

    reason: StopReason
    frames: Mapping[str, int]
    missing_frames: Mapping[str, int]
    bytes: Mapping[str, int]
    out_of_order_frames: Mapping[str, int]
    duplicate_frames: Mapping[str, int]
    bad_frames: int
    ignored_events: int
    dtmf: str
    dtmf_dropped: int
    marks_sent: int
    marks_received: int
    duration_ms: int
    # What each handler reported about the call (Handler.report), by handler name.
    handlers: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # The voice webhook's parameter budget report for this call, when this service served
    # the TwiML that started the stream (streamsvc.context.twiml.ParameterSelection.report).
    context_budget: Mapping[str, object] | None = None
    # The call's hand-off, when a handler handed it to a person: target, mechanism, what
    # was sent, dropped and truncated, and the media time it happened (``media_ms``).
    hand_off: Mapping[str, object] | None = None
    # What the provider's session protocol did (Genesys: pauses, discarded audio, sequence
    # and position checks), when it has one (Codec.report).
    protocol: Mapping[str, object] | None = None

    def log_fields(self) -> dict[str, object]:
        """The summary as plain JSON-ready fields for ``stream.stopped``."""
        return {
            "reason": self.reason,
            "frames": dict(self.frames),
            "missing_frames": dict(self.missing_frames),
            "bytes": dict(self.bytes),
            "out_of_order_frames": dict(self.out_of_order_frames),
            "duplicate_frames": dict(self.duplicate_frames),
            "bad_frames": self.bad_frames,
            "ignored_events": self.ignored_events,
            "dtmf": self.dtmf,
            "dtmf_dropped": self.dtmf_dropped,
            "marks_sent": self.marks_sent,
            "marks_received": self.marks_received,
            "duration_ms": self.duration_ms,
            "handlers": {name: dict(report) for name, report in self.handlers.items()},
            "context_budget": (dict(self.context_budget) if self.context_budget is not None
                               else None),
            "hand_off": dict(self.hand_off) if self.hand_off is not None else None,
            "protocol": dict(self.protocol) if self.protocol is not None else None,
        }


_EMPTY_PARAMETERS: Final[Mapping[str, str]] = MappingProxyType({})


class Session:
    """One Media Streams stream, from its first frame to its summary.

    ``path`` is the URL path the stream connected to. ``bidirectional`` says whether the
    server may talk back (``<Connect><Stream>``); on a ``<Start><Stream>`` it must not.
    ``parameter_budget_bytes`` is the size of the custom parameters above which
    :attr:`parameters_over_budget` is set (they are kept whole either way). ``codec`` is the
    provider's (:mod:`streamsvc.providers`; Twilio's by default): whatever it is, the
    session, its counters and its events are the same.
    """

    # Slots keep a call's hot state in one allocation (cache misses are most of the
    # per-frame cost under load); ``__dict__`` keeps sessions open to extra attributes.
    __slots__ = (
        "__dict__",
        "_events",
        "_outgoing",
        "_parse",
        "_parse_binary",
        "account_sid",
        "bad_frames",
        "bidirectional",
        "call_sid",
        "codec",
        "context",
        "custom_parameters",
        "custom_parameters_bytes",
        "dtmf_digits",
        "dtmf_dropped",
        "ignored_events",
        "marks_received",
        "marks_sent",
        "media_format",
        "parameter_budget_bytes",
        "path",
        "protocol_version",
        "resumed_from",
        "state",
        "stream_sid",
        "summary",
        "track_stats",
        "tracks",
    )

    def __init__(
        self,
        *,
        path: str = "/",
        bidirectional: bool = False,
        parameter_budget_bytes: int = DEFAULT_PARAMETER_BUDGET_BYTES,
        codec: wire.Codec = TWILIO,
    ) -> None:
        self.codec = codec
        self._parse = codec.parse
        # Binary messages are media on providers that send audio so (Vonage); on the others
        # they are bad frames.
        self._parse_binary = codec.parse_binary
        self.path = path
        self.bidirectional = bidirectional
        self.parameter_budget_bytes = parameter_budget_bytes
        self.state = State.AWAITING_START
        self.protocol_version: str | None = None
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.account_sid: str | None = None
        self.tracks: tuple[str, ...] = ()
        self.media_format: wire.MediaFormat | None = None
        self.custom_parameters: Mapping[str, str] = _EMPTY_PARAMETERS
        self.custom_parameters_bytes = 0
        # Everything known about the call (read-only): what its ways in carried (the voice
        # webhook's whole context, the stream's parameters) and what handlers added; and, in
        # a fleet, the stream a drained instance closed for this one to resume.
        self.context: Mapping[str, str] = _EMPTY_PARAMETERS
        self.resumed_from: str | None = None
        self.track_stats: dict[str, TrackStats] = {}
        self.bad_frames = 0
        self.ignored_events = 0
        self.dtmf_digits: list[str] = []
        self.dtmf_dropped = 0  # presses beyond MAX_DTMF_DIGITS: counted, not kept
        self.marks_sent = 0
        self.marks_received = 0
        self.summary: CallSummary | None = None
        self._events: list[SessionEvent] = []
        self._outgoing: list[bytes] = []

    # Inbound

    def receive_message(self, frame: bytes | str, binary: bool = False) -> None:
        """Take one inbound message (``binary``: it came as a binary frame). Never raises for
        bad input: it becomes a :class:`BadFrame` event. Call :meth:`events_received`
        next."""
        try:
            event = self._parse_binary(frame) if binary else self._parse(frame)
        except RemoteProtocolError as exc:
            self._bad_frame(exc.reason, frame)
            self._outgoing += self.codec.replies()  # a refusal may carry its answer
            return
        except RecursionError:  # JSON nested deeper than the decoder can follow
            self._bad_frame(TOO_DEEP, frame)
            return
        self._take(event, frame)

    def receive_media(self, frame: bytes | str, binary: bool = False) -> wire.Media | None:
        """The hot path: as :meth:`receive_message`, but a valid media frame of this stream
        is accounted and returned instead of queued as an event. Anything else (another
        event, a bad frame) is queued as :meth:`receive_message` queues it and ``None`` is
        returned: call :meth:`events_received` then."""
        try:
            event = self._parse_binary(frame) if binary else self._parse(frame)
        except RemoteProtocolError as exc:
            self._bad_frame(exc.reason, frame)
            self._outgoing += self.codec.replies()  # a refusal may carry its answer
            return None
        except RecursionError:  # JSON nested deeper than the decoder can follow
            self._bad_frame(TOO_DEEP, frame)
            return None
        if (type(event) is wire.Media and self.state is State.STREAMING
                and event.stream_sid == self.stream_sid):
            body = event.media  # the nested struct: plain slots, cheaper than properties
            stats = self.track_stats.get(body.track)
            if stats is not None:
                stats.add_frame(body.timestamp, len(body.payload))
                return event
        self._take(event, frame)
        return None

    def _take(self, event: wire.Event, frame: bytes | str) -> None:
        if type(event) is wire.Batch:  # each as if it had come alone
            for each in event.events:
                self._take(each, frame)
            return
        try:
            if type(event) is wire.Media:
                self._on_media(event)
            else:
                self._on_other(event)
        except RemoteProtocolError as exc:
            self._bad_frame(exc.reason, frame)
            return
        finally:
            if type(event) is not wire.Media:
                # The codec's own answers (Genesys's opened, pong, closed) go out whatever
                # the route's direction.
                self._outgoing += self.codec.replies()
        self._events.append(event)

    def events_received(self) -> list[SessionEvent]:
        """Return the events produced since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _on_media(self, media: wire.Media) -> None:
        if self.state is not State.STREAMING:
            raise RemoteProtocolError(f"media while {self.state.value}")
        if media.stream_sid != self.stream_sid:
            raise RemoteProtocolError(f"media for another stream {media.stream_sid!r}")
        body = media.media  # the nested struct: plain slots, cheaper than the properties
        stats = self.track_stats.get(body.track)
        if stats is None:
            stats = self._new_track(body.track)
        stats.add_frame(body.timestamp, len(body.payload))

    def _new_track(self, track: str) -> TrackStats:
        allowed = self.codec.tracks
        if (track not in allowed) if allowed is not None else (
                len(self.track_stats) >= self.codec.max_tracks):
            raise RemoteProtocolError(f"media on unknown track {track!r}")
        # A provider whose frames are not 20 ms long says how long they are (Exotel).
        stats = self.track_stats[track] = TrackStats(
            frame_ms=self.codec.frame_ms)
        return stats

    def _on_other(self, event: wire.Event) -> None:
        if isinstance(event, wire.Noted):
            return  # the codec's own business (answered, counted in its report)
        if isinstance(event, wire.UnknownEvent):
            self.ignored_events += 1
        elif isinstance(event, wire.Connected):
            self.protocol_version = event.version
        elif isinstance(event, wire.Start):
            self._on_start(event)
        elif not isinstance(event, wire.Batch):  # a batch's events come one by one
            self._check_streaming(event)
            if isinstance(event, wire.Dtmf):
                if len(self.dtmf_digits) < MAX_DTMF_DIGITS:
                    self.dtmf_digits.append(event.digit)
                else:
                    self.dtmf_dropped += 1
            elif isinstance(event, wire.Mark):
                self.marks_received += 1
            elif isinstance(event, wire.Stop):
                self.state = State.STOPPED

    def _check_streaming(self, event: wire.Dtmf | wire.Mark | wire.Stop | wire.Media) -> None:
        name = type(event).__name__.lower()
        if self.state is not State.STREAMING:
            raise RemoteProtocolError(f"{name} while {self.state.value}")
        if event.stream_sid is not None and event.stream_sid != self.stream_sid:
            raise RemoteProtocolError(f"{name} for another stream {event.stream_sid!r}")

    def _on_start(self, start: wire.Start) -> None:
        if self.state is not State.AWAITING_START:
            raise RemoteProtocolError(f"start while {self.state.value}")
        # Only what the provider documents: every size a handler allocates (the recorder's
        # window, its silence) derives from these, so none can be made huge or zero.
        media_format = start.media_format
        rates = self.codec.sample_rates
        if media_format.sample_rate not in rates:
            raise RemoteProtocolError(
                f"invalid start: sample rate {media_format.sample_rate} (this provider "
                f"streams at {', '.join(str(rate) for rate in sorted(rates))} Hz)")
        if media_format.channels != 1:
            raise RemoteProtocolError(f"invalid start: {media_format.channels} channels "
                                      "(streams are mono)")
        self.state = State.STREAMING
        self.stream_sid = start.started_stream_sid
        self.call_sid = start.call_sid
        self.account_sid = start.account_sid
        # Only the provider's track names (Twilio: inbound, outbound): any other (a hostile
        # start may list thousands) is left out, so a stream's state stays bounded.
        allowed = self.codec.tracks or frozenset(start.tracks[: self.codec.max_tracks])
        self.tracks = tuple(dict.fromkeys(t for t in start.tracks if t in allowed))
        self.media_format = start.media_format
        unknown = [t for t in start.tracks if t not in allowed]
        if unknown:
            self.bad_frames += 1
            self._events.append(BadFrame(
                f"start lists {len(unknown)} unknown track names (ignored)",
                ", ".join(unknown)[:BAD_FRAME_EXCERPT_CHARS], self.bad_frames))
        self.set_custom_parameters(start.custom_parameters)

    def set_custom_parameters(self, parameters: Mapping[str, str]) -> None:
        """The stream's context (from ``start``; for ACS, from the IncomingCall)."""
        kept = dict(parameters)
        self.custom_parameters = MappingProxyType(kept)
        self.custom_parameters_bytes = parameters_size(kept)

    def set_context(self, context: Mapping[str, str]) -> None:
        """The call's whole context, as it is known now (kept read-only)."""
        self.context = MappingProxyType(dict(context))

    def _bad_frame(self, reason: str, frame: bytes | str) -> None:
        self.bad_frames += 1
        if isinstance(frame, str):  # may hold lone surrogates, which no log line can carry
            frame = frame[:BAD_FRAME_EXCERPT_CHARS].encode("utf-8", "replace")
        excerpt = frame[: BAD_FRAME_EXCERPT_CHARS * 4].decode("utf-8", "replace")
        self._events.append(BadFrame(reason, excerpt[:BAD_FRAME_EXCERPT_CHARS], self.bad_frames))

    @property
    def provider(self) -> str:
        """The stream's provider, as its route names it (``twilio``, ``genesys``, ...; on
        an ``auto`` route, the one it told)."""
        return self.codec.provider

    @property
    def encoding(self) -> str:
        """The canonical name of the stream's audio: ``mulaw`` or ``alaw`` (G.711) or
        ``pcm16`` (little-endian), whatever the provider calls it (:attr:`media_format`
        keeps the provider's own string)."""
        return self.codec.native_encoding

    @property
    def audio_format(self) -> str:
        """``<encoding>/<sample rate>``: ``mulaw/8000``, ``pcm16/16000``, ..."""
        return f"{self.encoding}/{self.sample_rate}"

    @property
    def sample_rate(self) -> int:
        """The stream's audio rate (8000 until ``start`` says otherwise)."""
        return self.media_format.sample_rate if self.media_format else 8000

    def pcm16(self, frame: wire.Media) -> bytes:
        """``frame``'s audio as PCM16 little-endian at :attr:`sample_rate`, whatever the
        provider sends (mu-law and A-law are decoded, PCM16 returned as it is)."""
        encoding = self.codec.native_encoding
        if encoding == "pcm16":
            return frame.payload
        return to_pcm16(frame.payload, encoding)

    @property
    def parameters_over_budget(self) -> bool:
        return self.custom_parameters_bytes > self.parameter_budget_bytes

    # Outbound

    def send_media(self, payload: bytes) -> None:
        """Queue audio to play: raw 8 kHz mu-law bytes, any length.

        Raises :class:`LocalProtocolError` on a unidirectional stream or when the stream is
        not streaming."""
        frame = self.codec.serialize_media(self._sendable_stream_sid(), payload)
        if frame is not None:  # None: the codec holds it (Asterisk's MEDIA_XOFF)
            self._outgoing.append(frame)

    def send_mark(self, name: str) -> None:
        """Queue a mark; Twilio echoes it when playback reaches it or ``clear`` flushes it."""
        frame = self.codec.serialize_mark(self._sendable_stream_sid(), name)
        if frame is not None:  # a provider without marks: resolved by the playback clock
            self._outgoing.append(frame)
        self.marks_sent += 1

    def send_clear(self) -> None:
        """Queue a ``clear``: Twilio drops its buffered audio and echoes pending marks."""
        self._outgoing.append(self.codec.serialize_clear(self._sendable_stream_sid()))

    def send_pause(self, paused: bool) -> None:
        """Queue the provider's request to stop (``paused``) or restart sending audio
        (Genesys's ``pause``/``resume``), on any route; :class:`LocalProtocolError` where
        the provider has none, or before the stream started."""
        if self.state is not State.STREAMING:
            raise LocalProtocolError(f"cannot pause while {self.state.value}")
        self._outgoing.append(self.codec.serialize_pause(paused))

    def send_end(self, reason: str, variables: Mapping[str, str] | None = None) -> bool:
        """Queue the provider's request to end the call (with ``variables`` for the
        platform's flow, Genesys's ``outputVariables``); False where it has none (the
        stream is closed instead)."""
        frame = self.codec.serialize_end(reason, variables)
        if frame is None:
            return False
        self._outgoing.append(frame)
        return True

    def has_data_to_send(self) -> bool:
        return bool(self._outgoing)

    def data_to_send(self) -> list[bytes]:
        """Return the frames queued since the last call, to be sent as text frames."""
        frames, self._outgoing = self._outgoing, []
        return frames

    def _sendable_stream_sid(self) -> str:
        if not self.bidirectional:
            raise LocalProtocolError("cannot send on a unidirectional stream (<Start><Stream>)")
        if self.state is not State.STREAMING or self.stream_sid is None:
            raise LocalProtocolError(f"cannot send while {self.state.value}")
        return self.stream_sid

    # End

    def close(self, reason: StopReason) -> CallSummary:
        """End the session and return its summary. The first call decides the summary;
        later calls return the same one. ``reason`` is ``stop`` when Twilio sent ``stop``."""
        if self.summary is None:
            self.state = State.STOPPED
            self.summary = self._summarize(reason)
        return self.summary

    def _summarize(self, reason: StopReason) -> CallSummary:
        stats = self.track_stats
        last_ms = max((s.last_timestamp_ms + s.frame_ms for s in stats.values()), default=0)
        if self.codec.wall_clock_timestamps and stats:  # a moment, not an offset
            last_ms -= min(s.first_timestamp_ms for s in stats.values())
        return CallSummary(
            reason=reason,
            frames={track: s.frames for track, s in stats.items()},
            missing_frames={track: s.missing for track, s in stats.items()},
            bytes={track: s.bytes for track, s in stats.items()},
            out_of_order_frames={track: s.out_of_order for track, s in stats.items()},
            duplicate_frames={track: s.duplicates for track, s in stats.items()},
            bad_frames=self.bad_frames,
            ignored_events=self.ignored_events,
            dtmf="".join(self.dtmf_digits),
            dtmf_dropped=self.dtmf_dropped,
            marks_sent=self.marks_sent,
            marks_received=self.marks_received,
            duration_ms=last_ms,
            protocol=self.codec.report(),
        )


def parameters_size(parameters: Mapping[str, str]) -> int:
    """Bytes the custom parameters take as UTF-8, names and values together (what Twilio's
    800-byte guidance counts)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in parameters.items())
