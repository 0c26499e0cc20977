"""A ``<Connect><Stream>`` bot: greets the caller, answers each key press with audio, and
lets a key press barge in on what it is saying.

* On start it plays a greeting (here a short two-tone chime, in a real bot TTS audio at any
  sample rate) followed by the mark ``greeting``.
* On each DTMF digit it first ``clear``\\ s whatever is still playing (barge-in: the
  greeting's mark comes back ``cleared``), then plays one beep per unit of the digit
  (``0`` plays ten) and the mark ``digit-<d>``.
* Each mark's outcome (``played`` or ``cleared``) is logged as ``bot.mark`` and counted in
  the call summary.

Route it on a bidirectional path (from this folder, so that ``dtmf_bot`` imports)::

    [[routes]]
    path = "/connect"
    handlers = ["log", "dtmf_bot:DtmfBot"]
    bidirectional = true
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import struct

import structlog

from streamsvc import Handler, wire
from streamsvc.live import LiveSession, MarkResult

logger = structlog.get_logger("dtmf_bot")

SAMPLE_RATE = 16_000  # the bot's audio rate; the session converts it to 8 kHz mu-law


def tone(frequency: float, seconds: float, amplitude: int = 8000) -> bytes:
    """Mono PCM16 little-endian samples of a sine tone."""
    count = int(SAMPLE_RATE * seconds)
    return struct.pack(f"<{count}h", *(
        int(amplitude * math.sin(2 * math.pi * frequency * i / SAMPLE_RATE))
        for i in range(count)))


GREETING = tone(660, 0.4) + tone(880, 0.6)
BEEP = tone(1000, 0.15) + bytes(int(SAMPLE_RATE * 0.1) * 2)


class DtmfBot(Handler):
    """Greets, answers key presses, barges in (see the module docstring)."""

    def __init__(self) -> None:
        self.session: LiveSession | None = None
        self.marks: collections.Counter[str] = collections.Counter()
        self.digits = ""

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        session.send_audio(GREETING, sample_rate=SAMPLE_RATE, final=True)
        self._mark("greeting")

    def on_dtmf(self, event: wire.Dtmf) -> None:
        if self.session is None:
            return
        self.digits += event.digit
        self.session.clear()  # barge-in: stop talking at once
        beeps = (int(event.digit) or 10) if event.digit.isdigit() else 1
        self.session.send_audio(BEEP * beeps, sample_rate=SAMPLE_RATE, final=True)
        self._mark(f"digit-{event.digit}")

    def _mark(self, name: str) -> None:
        assert self.session is not None
        self.session.mark(name).add_done_callback(functools.partial(self._mark_done, name))

    def _mark_done(self, name: str, done: asyncio.Future[MarkResult]) -> None:
        result = done.result()
        self.marks[result] += 1
        logger.info("bot.mark", name=name, result=result)

    def report(self) -> dict[str, object]:
        return {"digits": self.digits, "marks_played": self.marks["played"],
                "marks_cleared": self.marks["cleared"]}
