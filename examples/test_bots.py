"""The example bots tested with streamsvc's testing kit, as a user tests their own handlers:
no server, no sockets, a virtual clock (``streamsvc_play`` is the kit's pytest fixture).

Run with ``pytest examples``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dtmf_bot import DtmfBot
from genesys_bot import CardBot

from streamsvc.testing import CallResult, SessionPlan, from_plan

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_the_dtmf_bot_greets_and_a_key_press_barges_in(
        streamsvc_play: Callable[..., CallResult]) -> None:
    bot = DtmfBot()
    # Two seconds of a caller who presses 4 at 0.5 s, while the greeting still plays.
    plan = SessionPlan(inbound=[0] * 16_000, dtmf=[("4", 0.5)])
    result = streamsvc_play(from_plan(plan), [bot], bidirectional=True)
    assert result.summary is not None
    assert ("stop", "4") == (result.summary.reason, result.summary.dtmf)
    assert {"greeting": "cleared", "digit-4": "played"} == result.marks
    assert 1 == result.clears
    assert {"digits": "4", "marks_played": 1, "marks_cleared": 1} == bot.report()
    assert [("greeting", "cleared"), ("digit-4", "played")] == [
        (line["name"], line["result"]) for line in result.events("bot.mark")]


def test_the_card_bot_pauses_the_audio_and_hands_the_call_back_to_genesys(
        streamsvc_play: Callable[..., CallResult]) -> None:
    result = streamsvc_play(FIXTURES / "genesys_connector.jsonl", [CardBot()],
                            bidirectional=True)
    assert result.summary is not None
    # The bundled call presses 4 and #, without a *: no card number, no hand-off.
    assert ("stop", "4#", None) == (result.summary.reason, result.summary.dtmf,
                                    result.hand_off)
