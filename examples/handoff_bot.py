"""A ``<Connect><Stream>`` bot that hands the caller to a person with what it learned.

* The first key chooses what the call is about (``1`` billing, ``2`` a technical problem,
  anything else: other): the call's context gains ``intent``.
* The keys after it, up to ``#``, are the account number: the context gains ``account``.
* Then the call goes to ``client:support`` (a Twilio Voice SDK client; ``to`` changes it)
  with both, the call's id first, as ``<Client><Parameter>``s; the agent's app reads the rest
  of the call's context at ``GET /calls/<call id>/context``. ``bot.handed_off`` logs how it
  went.

Route it on a bidirectional path (from this folder, so that ``handoff_bot`` imports)::

    [[routes]]
    path = "/connect"
    handlers = ["log", "handoff_bot:HandOffBot"]
    bidirectional = true

    [routes.handoff]
    priority = ["intent", "account"]
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog

from streamsvc import Handler, wire
from streamsvc.live import HandOffResult, LiveSession

logger = structlog.get_logger("handoff_bot")

INTENTS = {"1": "billing", "2": "technical"}


class HandOffBot(Handler):
    """Learns an intent and an account number by DTMF, then hands the call off."""

    def __init__(self, to: str = "client:support") -> None:
        self.to = to
        self.session: LiveSession | None = None
        self.account = ""
        self.result: HandOffResult | None = None

    def on_start(self, session: LiveSession) -> None:
        self.session = session

    def on_dtmf(self, event: wire.Dtmf) -> None:
        session = self.session
        if session is None or self.result is not None:
            return
        if "intent" not in session.context:
            session.update_context({"intent": INTENTS.get(event.digit, "other")})
        elif event.digit != "#":
            self.account += event.digit
        else:
            session.update_context({"account": self.account})
            session.hand_off(self.to).add_done_callback(self._handed_off)

    def _handed_off(self, done: asyncio.Future[HandOffResult]) -> None:
        if done.cancelled():
            return
        self.result = done.result()
        logger.info("bot.handed_off", target=self.result.target, ok=self.result.ok,
                    sent=list(self.result.sent), error=self.result.error)

    def report(self) -> Mapping[str, Any]:
        result = self.result
        return {"account_digits": len(self.account),
                "handed_off": result.ok if result is not None else False}
