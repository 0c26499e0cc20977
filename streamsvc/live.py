"""The session handlers get on a running server: the I/O-free :class:`Session` plus the verbs
for talking back on a bidirectional (``<Connect><Stream>``) route.

* :meth:`LiveSession.send_audio` plays audio: 8 kHz mu-law bytes as they are, or PCM16 at
  any sample rate (converted with one stateful resampler per rate, then encoded), sent in
  20 ms chunks. The resampler carries its state from call to call, so audio streamed in
  pieces has no clicks at their edges; its last few milliseconds are held back until the
  utterance ends: ``final=True``, or a :meth:`~LiveSession.mark`, releases them;
* :meth:`LiveSession.mark` sends a mark and returns a future that resolves to ``"played"``
  when Twilio echoes it after playback, or ``"cleared"`` when a ``clear`` flushed it (or the
  stream ended first);
* :meth:`LiveSession.clear` drops what Twilio has buffered; the pending marks come back
  ``"cleared"``.

Each verb only queues frames and wakes the connection's writer task: none blocks, none
waits for the network. On a unidirectional route each raises
:class:`~streamsvc.exceptions.LocalProtocolError` and nothing is sent.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

from streamsvc.audio import SAMPLE_BYTES, Resampler, from_pcm16, to_pcm16
from streamsvc.exceptions import LocalProtocolError
from streamsvc.session import Session, parameters_size

__all__ = ["DEFAULT_CONTEXT_MAX_BYTES", "HandOffResult", "LiveSession", "MarkResult",
           "PlaybackObserver"]

MarkResult: TypeAlias = Literal["played", "cleared"]

# Marks awaiting their echo; beyond this a handler is sending marks nobody can await.
MAX_PENDING_MARKS: Final = 1000
# The call's whole context, in bytes (UTF-8 names and values), unless configured
# (context_max_bytes).
DEFAULT_CONTEXT_MAX_BYTES: Final = 16384


@runtime_checkable
class PlaybackObserver(Protocol):
    """Told what the service plays to the caller (the recorder records it this way). A
    handler of a bidirectional route that has these two methods is registered as the stream
    starts, before any handler's ``on_start``, so it hears everything sent."""

    def audio_sent(self, pcm16: bytes, heard_ms: int) -> None:
        """Audio (PCM16 at the stream's rate) was queued to play after what was queued
        before, when
        ``heard_ms`` of the caller's audio had arrived (from its first media frame to the
        end of its latest, on the media timeline)."""

    def audio_cleared(self, heard_ms: int) -> None:
        """A ``clear`` dropped everything queued and not yet played, when ``heard_ms`` of
        the caller's audio had arrived."""


@dataclass(frozen=True, slots=True)
class HandOffResult:
    """How a hand-off went: the ``target``, the ``mechanism`` that carried it
    (``connect_action``: the ``<Connect action>`` request answered with the hand-off's
    TwiML), the names ``sent`` (name -> value as sent), ``dropped`` and ``truncated`` under
    the target's limits, ``ok``, and the ``error`` when not."""

    target: str
    mechanism: str
    sent: Mapping[str, str]
    dropped: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()
    ok: bool = True
    error: str | None = None


HandOff = Callable[[str, Mapping[str, str]], "asyncio.Future[HandOffResult]"]


@dataclass(slots=True)
class _PendingMark:
    name: str
    future: asyncio.Future[MarkResult]
    clears_before: int  # how many clears had been sent when the mark was


class LiveSession(Session):
    """A :class:`Session` wired to its connection. ``wake`` is called after frames are
    queued so the shell can hand them to the writer; other arguments are the Session's."""

    __slots__ = (
        "_clears_sent",
        "_context_updated",
        "_end_call",
        "_mark_timers",
        "_observers",
        "_pending_marks",
        "_playback_ends",
        "_resamplers",
        "_wake",
        "context_max_bytes",
    )

    def __init__(self, *, wake: Callable[[], None],
                 context_updated: Callable[[Sequence[str]], None] | None = None,
                 context_max_bytes: int = DEFAULT_CONTEXT_MAX_BYTES,
                 hand_off: HandOff | None = None,
                 end_call: Callable[[], None] | None = None,
                 **session_options: Any) -> None:
        super().__init__(**session_options)
        self._wake = wake
        # Told the names each update_context() set (the server logs, stores, publishes).
        self._context_updated = context_updated
        self.context_max_bytes = context_max_bytes
        self.context_updated_at: float | None = None  # Unix time of the last change
        self._hand_off = hand_off  # the server's way to hand the call to a person
        self._end_call = end_call  # the server's way to end the call (hang_up)
        self.hand_offs: list[dict[str, Any]] = []  # the call's hand-offs, in order
        self._pending_marks: collections.deque[_PendingMark] = collections.deque()
        self._clears_sent = 0
        self._resamplers: dict[int, Resampler] = {}
        self._observers: list[PlaybackObserver] = []
        # Providers without marks (ACS): when the audio queued so far ends playing, by the
        # loop's clock, and the timers that resolve marks then.
        self._playback_ends = 0.0
        self._mark_timers: dict[int, asyncio.TimerHandle] = {}

    def update_context(self, mapping: Mapping[str, str]) -> None:
        """Add to the call's :attr:`context` what a handler learned (an account number, an
        intent, a summary): text names and values, replacing those of the same name. The
        whole record stays within ``context_max_bytes`` (UTF-8, names and values):
        beyond, :class:`~streamsvc.exceptions.LocalProtocolError` and nothing changes. The
        update is logged (``call.context_updated``, names only), kept in the context store
        (in a fleet, for every instance) and goes along when the call is handed off."""
        for name, value in mapping.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"context names and values are text: {name!r}: "
                                f"{type(value).__name__}")
        merged = {**self.context, **mapping}
        size = parameters_size(merged)
        if size > self.context_max_bytes:
            raise LocalProtocolError(
                f"the call's context would take {size} bytes, over context_max_bytes "
                f"({self.context_max_bytes}): nothing was added")
        self.set_context(merged)
        self.context_updated_at = time.time()
        if self._context_updated is not None and mapping:
            self._context_updated(list(mapping))

    def hand_off(self, to: str, *,
                 parameters: Mapping[str, str] | None = None) -> asyncio.Future[HandOffResult]:
        """Hand the call to a person with its context: ``to`` is ``client:<identity>``,
        ``sip:<uri>``, ``tel:<E.164>`` or ``queue:<name>``; the call's id goes first, then
        ``parameters``, then what the route's ``[routes.handoff]`` picks of
        :attr:`context`, within the target's limits. The future resolves once the call is
        handed over (the stream then ends, ``stream.stopped`` reason ``handed_off``). On a
        Twilio or SignalWire ``<Connect>`` route the ``<Connect action>`` request is answered
        with the hand-off's TwiML. :class:`~streamsvc.exceptions.LocalProtocolError` where
        the call cannot be handed off (another provider, a ``<Start>`` route, a hand-off
        already made); ValueError for a target that is not one."""
        if self._hand_off is None:
            raise LocalProtocolError("this session is not on a running server: nothing can "
                                     "hand its call off")
        for name, value in (parameters or {}).items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"hand-off parameters are text: {name!r}")
        return self._hand_off(to, dict(parameters or {}))

    def release(self) -> None:
        """The call is over: drop the server's callbacks (which refer back to the call), so
        that the ended call is freed as soon as nothing refers to it, without waiting for
        the cycle collector. What a handler still asks of the session afterwards does
        nothing (talk-back, context) or raises (hand-off, hang-up)."""
        self._wake = _nothing
        self._context_updated = None
        self._hand_off = _ended_hand_off
        self._end_call = _ended_call

    def hang_up(self) -> None:
        """End the call: the platform's own message (Genesys's ``disconnect``, reason
        ``completed``), after which the platform closes the stream (the service closes it
        if the platform has not within 5 s). :class:`~streamsvc.exceptions.LocalProtocolError`
        where the provider has no such message (end those calls through the provider's
        API or flow)."""
        if self._end_call is None:
            raise LocalProtocolError("this session is not on a running server: nothing can "
                                     "end its call")
        self._end_call()

    def pause_audio(self) -> None:
        """Ask the platform to stop sending the call's audio (Genesys's ``pause``: while a
        caller reads out a card number); it answers ``paused``. On any route;
        :class:`~streamsvc.exceptions.LocalProtocolError` where the provider cannot."""
        self.send_pause(True)
        self._wake()

    def resume_audio(self) -> None:
        """Ask the platform to send the call's audio again (Genesys's ``resume``); it
        answers ``resumed`` with how much audio it left out."""
        self.send_pause(False)
        self._wake()

    def observe_playback(self, observer: PlaybackObserver) -> None:
        """Tell ``observer`` about every piece of audio sent and every ``clear``."""
        self._observers.append(observer)

    @property
    def _sample_bytes(self) -> int:
        """Bytes a sample takes in the stream's native encoding (G.711: 1, PCM16: 2)."""
        return SAMPLE_BYTES.get(self.codec.native_encoding, 2)

    @property
    def _chunk_bytes(self) -> int:
        """What one outbound message carries: 20 ms of the stream's native audio, or what
        the provider asks for (Exotel: 3,200 bytes)."""
        chunk = self.codec.chunk_bytes
        if chunk:
            return int(chunk)
        return self.sample_rate * self._sample_bytes // 50

    def send_media(self, payload: bytes) -> None:
        super().send_media(payload)
        if not self.codec.has_marks:
            loop_time = asyncio.get_running_loop().time()
            seconds = len(payload) / (self.sample_rate * self._sample_bytes)
            self._playback_ends = max(self._playback_ends, loop_time) + seconds
        if self._observers:
            pcm = to_pcm16(payload, self.codec.native_encoding)
            for observer in self._observers:
                observer.audio_sent(pcm, self.heard_ms())

    def send_clear(self) -> None:
        super().send_clear()
        for observer in self._observers:
            observer.audio_cleared(self.heard_ms())

    def heard_ms(self) -> int:
        """Media milliseconds of the caller's audio so far (first frame to the end of the
        latest, on the media timeline)."""
        stats = self.track_stats.get("inbound")
        if stats is None or stats.first_timestamp_ms < 0:
            return 0
        return stats.last_timestamp_ms + stats.frame_ms - stats.first_timestamp_ms

    def send_audio(self, audio: bytes, *, sample_rate: int | None = None,
                   final: bool = False) -> None:
        """Play ``audio``: the stream's native audio when ``sample_rate`` is None (Twilio:
        8 kHz mu-law; ACS: PCM16 at the stream's rate), else mono PCM16 (little-endian) at
        ``sample_rate`` Hz, converted to the stream's format. ``final`` ends the
        utterance: the resampler's held-back tail goes out too."""
        self._sendable_stream_sid()  # raises on a unidirectional or ended stream
        if sample_rate is not None:
            resampler = self._resampler(sample_rate)
            audio = self._native(resampler.process(audio)
                                 + (resampler.flush() if final else b""))
        self._send_chunked(audio)
        self._wake()

    def _native(self, pcm: bytes) -> bytes:
        return from_pcm16(pcm, self.codec.native_encoding)

    def _send_chunked(self, audio: bytes) -> None:
        chunk = self._chunk_bytes
        for start in range(0, len(audio), chunk):
            self.send_media(audio[start : start + chunk])

    def _flush_resamplers(self) -> None:
        for resampler in self._resamplers.values():
            self._send_chunked(self._native(resampler.flush()))

    def mark(self, name: str) -> asyncio.Future[MarkResult]:
        """Send a mark after the audio queued so far; the future tells how it came back."""
        if len(self._pending_marks) >= MAX_PENDING_MARKS:
            raise LocalProtocolError(f"{MAX_PENDING_MARKS} marks already await their echo")
        self._sendable_stream_sid()
        self._flush_resamplers()  # the mark goes after all of the audio before it
        self.send_mark(name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[MarkResult] = loop.create_future()
        entry = _PendingMark(name, future, self._clears_sent)
        self._pending_marks.append(entry)
        if not self.codec.has_marks:  # no echo will come: the playback clock resolves it
            delay = self._playback_ends - loop.time()
            if delay <= 0:  # everything before it has played already
                self._played(entry)
            else:
                self._mark_timers[id(entry)] = loop.call_later(delay, self._played, entry)
        self._wake()
        return future

    def _played(self, entry: _PendingMark) -> None:
        self._mark_timers.pop(id(entry), None)
        if entry in self._pending_marks:
            self._pending_marks.remove(entry)
            _resolve(entry.future, "played")

    def clear(self) -> None:
        """Drop the audio Twilio has buffered; pending marks will resolve ``"cleared"``."""
        self.send_clear()
        self._clears_sent += 1
        for resampler in self._resamplers.values():
            resampler.reset()
        if not self.codec.has_marks:  # what was queued is dropped
            self._playback_ends = 0.0
        if not self.codec.has_marks or not self.codec.echoes_marks_on_clear:
            self.abandon_marks()  # no echo will come for the marks pending (ACS, Vonage)
        self._wake()

    @property
    def pending_marks(self) -> int:
        return len(self._pending_marks)

    def mark_echoed(self, name: str) -> None:
        """Resolve the oldest pending mark called ``name`` (the server calls this when
        Twilio echoes one). An echo nobody is waiting for is ignored."""
        for entry in self._pending_marks:
            if entry.name == name:
                self._pending_marks.remove(entry)
                cleared = self._clears_sent > entry.clears_before
                _resolve(entry.future, "cleared" if cleared else "played")
                return

    def abandon_marks(self) -> None:
        """The stream ended: marks that never came back resolve ``"cleared"``."""
        for timer in self._mark_timers.values():
            timer.cancel()
        self._mark_timers.clear()
        while self._pending_marks:
            _resolve(self._pending_marks.popleft().future, "cleared")

    def _resampler(self, sample_rate: int) -> Resampler:
        resampler = self._resamplers.get(sample_rate)
        if resampler is None:
            resampler = self._resamplers[sample_rate] = Resampler(sample_rate, self.sample_rate)
        return resampler


def _resolve(future: asyncio.Future[MarkResult], result: MarkResult) -> None:
    if not future.done():
        future.set_result(result)


def _nothing() -> None:
    """A released session's wake: nothing listens any more."""


def _ended_hand_off(to: str, parameters: Mapping[str, str]) -> asyncio.Future[HandOffResult]:
    raise LocalProtocolError("the call has ended: nothing can hand it off")


def _ended_call() -> None:
    raise LocalProtocolError("the call has ended")
