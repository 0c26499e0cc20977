"""Plivo-format sessions for ``streamsvc fixture synth --provider plivo``: the frames of a
plan (:mod:`streamsvc.replay.synth`) as Plivo sends them (camelCase, ``callId``/``streamId``/
``accountId``, the context in ``extra_headers``, checkpoints reached as ``playedStream``, no
stop message) and the outcome the service must report."""

from __future__ import annotations

import json
from typing import Any

from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, synthesize

__all__ = ["plivo_expected", "synthesize_plivo"]


def synthesize_plivo(plan: SessionPlan) -> list[FixtureFrame]:
    """``plan``'s session as Plivo frames (``plan.stop`` is ignored: Plivo closes)."""
    frames = []
    for frame in synthesize(plan):
        message = json.loads(frame.text)
        converted = _plivo(message, plan)
        if converted is not None:
            frames.append(FixtureFrame(frame.at_ms, json.dumps(
                converted, separators=(",", ":"), ensure_ascii=False)))
    return frames


def _plivo(message: dict[str, Any], plan: SessionPlan) -> dict[str, Any] | None:
    event = message["event"]
    sequence = int(message.get("sequenceNumber") or 0)
    sid = plan.stream_sid
    if event == "start":
        headers = ";".join(f"{k}={v}" for k, v in (plan.custom_parameters or {}).items())
        return {"event": "start", "sequenceNumber": sequence, "start": {
            "callId": plan.call_sid, "streamId": sid, "accountId": plan.account_sid,
            "tracks": message["start"]["tracks"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
            "extra_headers": headers}
    if event == "media":
        return {"event": "media", "sequenceNumber": sequence, "streamId": sid,
                "media": message["media"]}
    if event == "dtmf":
        return {"event": "dtmf", "sequenceNumber": sequence, "streamId": sid,
                "dtmf": {"track": "inbound", "digit": message["dtmf"]["digit"]}}
    if event == "mark":
        return {"event": "playedStream", "sequenceNumber": sequence, "streamId": sid,
                "name": message["mark"]["name"]}
    return None  # connected and stop: Plivo sends neither


def plivo_expected(plan: SessionPlan) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Plivo frames (a clean close is
    the stop)."""
    return expected_outcome(plan, reason="stop")
