"""Built-in ``handoff``: a key the caller presses hands the call to a person, with its
context.

Options (``[handlers.handoff]``): ``to`` (the target: ``client:<identity>``,
``sip:<uri>``, ``tel:<E.164>`` or ``queue:<name>``; required), ``on_dtmf`` (the key,
default ``"0"``: a caller pressing 0 for an agent), ``include`` (context names passed as the
hand-off's own parameters, right after the call's id, whatever the route's
``[routes.handoff]`` picks; default none).

The route's provider must be able to hand off (Twilio or SignalWire ``<Connect>`` routes):
elsewhere the key press is logged as ``call.hand_off_failed`` with the reason and the call
goes on. Reported in the call summary (``handlers.handoff``): ``pressed_at_ms`` (on the
media timeline), ``target``, ``ok``, ``sent``, ``dropped``, ``truncated``, ``error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from streamsvc import wire
from streamsvc.context.handoff import parse_target
from streamsvc.exceptions import LocalProtocolError
from streamsvc.handlers import Handler
from streamsvc.live import HandOffResult, LiveSession

__all__ = ["HandOffHandler"]

logger = structlog.get_logger("streamsvc.builtins.handoff")


class HandOffHandler(Handler):
    """Hands the call off when the caller presses ``on_dtmf`` (module docstring)."""

    def __init__(self, *, to: str, on_dtmf: str = "0",
                 include: Sequence[str] = ()) -> None:
        parse_target(to)  # a bad target fails the configuration, not a call
        if len(on_dtmf) != 1 or on_dtmf not in "0123456789*#ABCD":
            raise ValueError(f"on_dtmf: one DTMF key (0-9, *, #, A-D), got {on_dtmf!r}")
        if isinstance(include, str) or not all(isinstance(n, str) for n in include):
            raise ValueError("include: an array of context names")
        self.to = to
        self.key = on_dtmf
        self.include = tuple(include)
        self.session: LiveSession | None = None
        self.pressed_at_ms: int | None = None
        self.result: HandOffResult | None = None
        self.error: str | None = None
        self._pending: asyncio.Future[HandOffResult] | None = None

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """ValueError for options no call could run with (read at start-up)."""
        cls(**options)

    def on_start(self, session: LiveSession) -> None:
        self.session = session

    def on_dtmf(self, event: wire.Dtmf) -> None:
        session = self.session
        if event.digit != self.key or session is None or self.pressed_at_ms is not None:
            return
        self.pressed_at_ms = session.heard_ms()
        parameters = {name: session.context[name] for name in self.include
                      if name in session.context}
        try:
            self._pending = session.hand_off(self.to, parameters=parameters)
        except LocalProtocolError as exc:
            self.error = str(exc)
            logger.warning("call.hand_off_failed", target=self.to, reason=self.error)
            return
        self._pending.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[HandOffResult]) -> None:
        if not future.cancelled():
            self.result = future.result()
            self.error = self.result.error

    def report(self) -> Mapping[str, Any]:
        result = self.result
        return {"pressed_at_ms": self.pressed_at_ms, "target": self.to,
                "ok": result.ok if result is not None else False,
                "sent": list(result.sent) if result is not None else [],
                "dropped": list(result.dropped) if result is not None else [],
                "truncated": list(result.truncated) if result is not None else [],
                "error": self.error}
