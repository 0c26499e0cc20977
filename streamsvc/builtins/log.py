"""Built-in ``log``: one log line per DTMF digit and per mark."""

from __future__ import annotations

import structlog

from streamsvc import wire
from streamsvc.handlers import Handler

__all__ = ["LogHandler"]

logger = structlog.get_logger("streamsvc.builtins.log")


class LogHandler(Handler):
    """Makes a call's key presses and playback progress visible without writing code:
    ``call.dtmf`` (``digit``, ``track``) and ``call.mark`` (``name``)."""

    def on_dtmf(self, event: wire.Dtmf) -> None:
        logger.info("call.dtmf", digit=event.digit, track=event.track)

    def on_mark(self, event: wire.Mark) -> None:
        logger.info("call.mark", name=event.name)
