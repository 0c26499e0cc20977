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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeAlias, runtime_checkable

from .audio import TWILIO_SAMPLE_RATE, Resampler, pcm16_to_mulaw
from .exceptions import LocalProtocolError
from .session import FRAME_MS, Session

__all__ = ["LiveSession", "MarkResult", "PlaybackObserver"]

MarkResult: TypeAlias = Literal["played", "cleared"]

# 20 ms of 8 kHz mu-law: the size Twilio itself uses for media frames.
CHUNK_BYTES: Final = 160
# Marks awaiting their echo; beyond this a handler is sending marks nobody can await.
MAX_PENDING_MARKS: Final = 1000


@runtime_checkable
class PlaybackObserver(Protocol):
    """Told what the service plays to the caller (the recorder records it this way). A
    handler of a bidirectional route that has these two methods is registered as the stream
    starts, before any handler's ``on_start``, so it hears everything sent."""

    def audio_sent(self, mulaw: bytes, heard_ms: int) -> None:
        """8 kHz mu-law audio was queued to play after what was queued before, when
        ``heard_ms`` of the caller's audio had arrived (from its first media frame to the
        end of its latest, on the media timeline)."""

    def audio_cleared(self, heard_ms: int) -> None:
        """A ``clear`` dropped everything queued and not yet played, when ``heard_ms`` of
        the caller's audio had arrived."""


@dataclass(slots=True)
class _PendingMark:
    name: str
    future: asyncio.Future[MarkResult]
    clears_before: int  # how many clears had been sent when the mark was


class LiveSession(Session):
    """A :class:`Session` wired to its connection. ``wake`` is called after frames are
    queued so the shell can hand them to the writer; other arguments are the Session's."""

    def __init__(self, *, wake: Callable[[], None], **session_options: Any) -> None:
        super().__init__(**session_options)
        self._wake = wake
        self._pending_marks: collections.deque[_PendingMark] = collections.deque()
        self._clears_sent = 0
        self._resamplers: dict[int, Resampler] = {}
        self._observers: list[PlaybackObserver] = []

    def observe_playback(self, observer: PlaybackObserver) -> None:
        """Tell ``observer`` about every piece of audio sent and every ``clear``."""
        self._observers.append(observer)

    def send_media(self, payload: bytes) -> None:
        super().send_media(payload)
        for observer in self._observers:
            observer.audio_sent(payload, self._heard_ms())

    def send_clear(self) -> None:
        super().send_clear()
        for observer in self._observers:
            observer.audio_cleared(self._heard_ms())

    def _heard_ms(self) -> int:
        stats = self.track_stats.get("inbound")
        if stats is None or stats.first_timestamp_ms < 0:
            return 0
        return stats.last_timestamp_ms + FRAME_MS - stats.first_timestamp_ms

    def send_audio(self, audio: bytes, *, sample_rate: int | None = None,
                   final: bool = False) -> None:
        """Play ``audio``: 8 kHz mu-law bytes when ``sample_rate`` is None, else mono PCM16
        (little-endian) at ``sample_rate`` Hz, converted to 8 kHz mu-law. ``final`` ends
        the utterance: the resampler's held-back tail goes out too."""
        self._sendable_stream_sid()  # raises on a unidirectional or ended stream
        if sample_rate is not None:
            resampler = self._resampler(sample_rate)
            pcm = resampler.process(audio) + (resampler.flush() if final else b"")
            audio = pcm16_to_mulaw(pcm)
        self._send_chunked(audio)
        self._wake()

    def _send_chunked(self, audio: bytes) -> None:
        for start in range(0, len(audio), CHUNK_BYTES):
            self.send_media(audio[start : start + CHUNK_BYTES])

    def _flush_resamplers(self) -> None:
        for resampler in self._resamplers.values():
            self._send_chunked(pcm16_to_mulaw(resampler.flush()))

    def mark(self, name: str) -> asyncio.Future[MarkResult]:
        """Send a mark after the audio queued so far; the future tells how it came back."""
        if len(self._pending_marks) >= MAX_PENDING_MARKS:
            raise LocalProtocolError(f"{MAX_PENDING_MARKS} marks already await their echo")
        self._sendable_stream_sid()
        self._flush_resamplers()  # the mark goes after all of the audio before it
        self.send_mark(name)
        future: asyncio.Future[MarkResult] = asyncio.get_running_loop().create_future()
        self._pending_marks.append(_PendingMark(name, future, self._clears_sent))
        self._wake()
        return future

    def clear(self) -> None:
        """Drop the audio Twilio has buffered; pending marks will resolve ``"cleared"``."""
        self.send_clear()
        self._clears_sent += 1
        for resampler in self._resamplers.values():
            resampler.reset()
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
        while self._pending_marks:
            _resolve(self._pending_marks.popleft().future, "cleared")

    def _resampler(self, sample_rate: int) -> Resampler:
        resampler = self._resamplers.get(sample_rate)
        if resampler is None:
            resampler = self._resamplers[sample_rate] = Resampler(sample_rate, TWILIO_SAMPLE_RATE)
        return resampler


def _resolve(future: asyncio.Future[MarkResult], result: MarkResult) -> None:
    if not future.done():
        future.set_result(result)
