"""Built-in ``echo`` (bidirectional routes): plays the caller's audio back after a delay.

Options (``[handlers.echo]``): ``delay_ms`` (default 500, in whole frames of the stream:
20 ms, or Exotel's 100 ms), ``mark_every_ms`` (a mark ``echo-N`` after each this much
echoed audio, default 1000; 0 for none). The end-to-end check of the outbound path: audio,
marks and their echoes. Reported in the call summary (``handlers.echo``): frames echoed,
frames dropped (a peer that stopped reading: counted, never a handler failure), marks
sent, played and cleared.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from typing import Any

from streamsvc import wire
from streamsvc.exceptions import LocalProtocolError
from streamsvc.handlers import Handler
from streamsvc.live import LiveSession, MarkResult

__all__ = ["EchoHandler"]

class EchoHandler(Handler):
    """Echoes inbound audio (see the module docstring)."""

    def __init__(self, *, delay_ms: int = 500, mark_every_ms: int = 1000) -> None:
        if delay_ms < 0 or mark_every_ms < 0:
            raise ValueError("delay_ms and mark_every_ms must be >= 0")
        self.delay_ms, self.mark_every_ms = delay_ms, mark_every_ms
        self.delay_frames = 0  # both in the stream's frames, set by on_start
        self.mark_every = 0
        self.session: LiveSession | None = None
        self.held: collections.deque[bytes] = collections.deque()
        self.frames_echoed = 0
        self.frames_dropped = 0  # refused while the peer was not reading
        self.marks: collections.Counter[str] = collections.Counter()

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        frame_ms = session.codec.frame_ms
        self.delay_frames = self.delay_ms // frame_ms
        self.mark_every = max(1, self.mark_every_ms // frame_ms) if self.mark_every_ms else 0

    def on_media(self, frame: wire.Media) -> None:
        if frame.track != "inbound" or self.session is None:
            return
        self.held.append(frame.payload)
        while len(self.held) > self.delay_frames:
            try:
                self.session.send_audio(self.held.popleft())
                self.frames_echoed += 1
                if self.mark_every and self.frames_echoed % self.mark_every == 0:
                    mark = self.session.mark(f"echo-{self.frames_echoed // self.mark_every}")
                    self.marks["sent"] += 1
                    mark.add_done_callback(self._mark_done)
            except LocalProtocolError:
                # The peer stopped reading (or too many marks wait): what it would not
                # take is dropped and counted, the call goes on.
                self.frames_dropped += 1

    def _mark_done(self, future: asyncio.Future[MarkResult]) -> None:
        self.marks[future.result()] += 1

    def report(self) -> Mapping[str, Any]:
        return {"frames_echoed": self.frames_echoed, "frames_dropped": self.frames_dropped,
                "marks_sent": self.marks["sent"],
                "marks_played": self.marks["played"], "marks_cleared": self.marks["cleared"]}
