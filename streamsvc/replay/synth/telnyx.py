"""Telnyx-format sessions for ``streamsvc fixture synth --provider telnyx``: the frames of a
Twilio-shaped plan (:mod:`streamsvc.replay.synth`) as Telnyx sends them (snake_case, ``stream_id``,
the call control id, ``client_state`` base64) and the outcome the service must report."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, synthesize

__all__ = ["synthesize_telnyx", "telnyx_expected"]


def synthesize_telnyx(plan: SessionPlan, *, client_state: str | None = None) -> list[FixtureFrame]:
    """``plan``'s session as Telnyx frames; ``plan.call_sid`` is the call control id and
    ``plan.stream_sid`` the stream id."""
    frames = []
    for frame in synthesize(plan):
        message = json.loads(frame.text)
        frames.append(FixtureFrame(frame.at_ms, json.dumps(
            _telnyx(message, plan, client_state), separators=(",", ":"), ensure_ascii=False)))
    return frames


def _telnyx(message: dict[str, Any], plan: SessionPlan,
            client_state: str | None) -> dict[str, Any]:
    event = message["event"]
    sequence = message.get("sequenceNumber")
    if event == "connected":
        return {"event": "connected", "version": "1.0.0"}
    if event == "start":
        start: dict[str, Any] = {
            "user_id": str(uuid.UUID(int=1)), "call_control_id": plan.call_sid,
            "call_session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, plan.call_sid)),
            "from": "+15550100", "to": "+15550199", "tags": []}
        if client_state is not None:
            start["client_state"] = base64.b64encode(client_state.encode()).decode()
        start["custom_parameters"] = dict(plan.custom_parameters or {})
        start["media_format"] = {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}
        return {"event": "start", "sequence_number": sequence, "stream_id": plan.stream_sid,
                "start": start}
    out: dict[str, Any] = {"event": event, "sequence_number": sequence}
    if event == "media":
        out["media"] = message["media"]
    elif event == "dtmf":
        out["occurred_at"] = "2026-11-24T00:00:00.000000Z"
        out["dtmf"] = {"digit": message["dtmf"]["digit"]}
    elif event == "mark":
        out["mark"] = message["mark"]
    elif event == "stop":
        out["stop"] = {"user_id": str(uuid.UUID(int=1)), "call_control_id": plan.call_sid}
    out["stream_id"] = plan.stream_sid
    return out


def telnyx_expected(plan: SessionPlan, *, client_state: str | None = None) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Telnyx frames."""
    parameters = dict(plan.custom_parameters or {})
    if client_state is not None:
        parameters["client_state"] = client_state
    return expected_outcome(plan, account_sid=None, tracks=[], custom_parameters=parameters)
