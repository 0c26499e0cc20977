"""An Audio Connector bot (Genesys Cloud) that takes a card number with the caller's audio
paused, then hands the call back to the Architect flow with what it learned.

* ``*`` starts the card number: the service asks Genesys to ``pause`` the caller's audio
  (nothing of what follows is streamed, recorded or transcribed) and the keys are
  collected as DTMF;
* ``#`` ends it: the audio is resumed, the context gains ``card_last4``, and the call goes
  to ``queue:disputes`` (``disconnect`` with the call's id, the target and the context as
  ``outputVariables``, for the flow to route on).

Route it on a bidirectional ``genesys`` path (``docs/providers/genesys.md``)::

    [[routes]]
    path = "/genesys-bot"
    provider = "genesys"
    bidirectional = true
    handlers = ["log", "examples.genesys_bot:CardBot"]
"""

from __future__ import annotations

from streamsvc import Handler, wire
from streamsvc.live import LiveSession


class CardBot(Handler):
    """Collects a card number between ``*`` and ``#`` with the audio paused."""

    def on_start(self, session: LiveSession) -> None:
        self.session = session
        self.digits: list[str] | None = None  # collecting while not None
        session.update_context({"intent": "card-dispute"})

    def on_dtmf(self, event: wire.Dtmf) -> None:
        if event.digit == "*" and self.digits is None:
            self.digits = []
            self.session.pause_audio()
        elif event.digit == "#" and self.digits is not None:
            self.session.resume_audio()
            self.session.update_context({"card_last4": "".join(self.digits[-4:])})
            self.session.hand_off("queue:disputes", parameters={"verified": "yes"})
        elif self.digits is not None:
            self.digits.append(event.digit)
