"""Built-in ``dtmf``: key presses with their times, and digits collected up to a terminator.

Options (``[handlers.dtmf]``): ``terminator`` (default ``#``), ``on_collect`` (optional
``"package.module:function"`` called as ``function(session, digits)`` each time the
terminator is pressed, with the digits since the last one), ``max_presses`` (default 1000;
later presses are counted, not listed).

Each press is timed on the stream's media timeline (the latest inbound media timestamp when
it arrived). Reported in the call summary (``handlers.dtmf``): ``digits``, ``presses``
(``{"digit", "at_ms"}``), ``collected``; each collection is also logged as
``call.digits_collected``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from streamsvc import wire
from streamsvc.handlers import Handler
from streamsvc.live import LiveSession

__all__ = ["DtmfHandler"]

logger = structlog.get_logger("streamsvc.builtins.dtmf")


class DtmfHandler(Handler):
    """Times key presses and collects digits (see the module docstring)."""

    def __init__(self, *, terminator: str = "#", on_collect: str | None = None,
                 max_presses: int = 1000) -> None:
        self.terminator = terminator
        self.callback = _import(on_collect) if on_collect else None
        self.max_presses = max_presses
        self.session: LiveSession | None = None
        self.media_ms = 0
        self.presses: list[dict[str, Any]] = []
        self.presses_dropped = 0
        self.digits: list[str] = []
        self.pending: list[str] = []
        self.collected: list[str] = []

    def on_start(self, session: LiveSession) -> None:
        self.session = session

    def on_media(self, frame: wire.Media) -> None:
        if frame.track == "inbound":
            self.media_ms = max(self.media_ms, frame.timestamp_ms)

    def on_dtmf(self, event: wire.Dtmf) -> None:
        self.digits.append(event.digit)
        if len(self.presses) < self.max_presses:
            self.presses.append({"digit": event.digit, "at_ms": self.media_ms})
        else:
            self.presses_dropped += 1
        if event.digit != self.terminator:
            self.pending.append(event.digit)
            del self.pending[: -self.max_presses]  # bounded
            return
        digits, self.pending = "".join(self.pending), []
        self.collected.append(digits)
        del self.collected[: -self.max_presses]
        logger.info("call.digits_collected", digits=digits)
        if self.callback is not None and self.session is not None:
            self.callback(self.session, digits)

    def report(self) -> Mapping[str, Any]:
        return {"digits": "".join(self.digits), "presses": self.presses,
                "presses_dropped": self.presses_dropped, "collected": self.collected}


def _import(name: str) -> Callable[[LiveSession, str], object]:
    module_name, _, attribute = name.partition(":")
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise ValueError(f"on_collect: {name!r} is not a callable")
    return function  # type: ignore[no-any-return]
