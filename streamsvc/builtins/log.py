"""Built-in ``log``: one log line per DTMF digit and per mark, for the first ``max_lines``
of each per call (default 50); the rest are counted in the call summary, so that a client
sending thousands of them cannot flood the log."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from streamsvc import wire
from streamsvc.handlers import Handler

__all__ = ["LogHandler"]

logger = structlog.get_logger("streamsvc.builtins.log")


class LogHandler(Handler):
    """Makes a call's key presses and playback progress visible without writing code:
    ``call.dtmf`` (``digit``, ``track``) and ``call.mark`` (``name``)."""

    def __init__(self, *, max_lines: int = 50) -> None:
        self.max_lines = max_lines
        self.dtmf_lines = 0
        self.mark_lines = 0

    def on_dtmf(self, event: wire.Dtmf) -> None:
        self.dtmf_lines += 1
        if self.dtmf_lines <= self.max_lines:
            logger.info("call.dtmf", digit=event.digit, track=event.track)

    def on_mark(self, event: wire.Mark) -> None:
        self.mark_lines += 1
        if self.mark_lines <= self.max_lines:
            logger.info("call.mark", name=event.name[:200])

    def report(self) -> Mapping[str, int] | None:
        suppressed = (max(0, self.dtmf_lines - self.max_lines)
                      + max(0, self.mark_lines - self.max_lines))
        return {"lines_not_logged": suppressed} if suppressed else None
