"""Exotel-format sessions for ``streamsvc fixture synth --provider exotel``: a plan's audio
as Exotel sends it (snake_case, raw PCM16 at 8 kHz in 100 ms messages, ``stream_sid``,
``call_sid``, ``account_sid``) and the outcome the service must report."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, Final

from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, sent_frames

__all__ = ["EXOTEL_FRAME_MS", "exotel_expected", "synthesize_exotel"]

EXOTEL_FRAME_MS: Final = 100  # Exotel sends about 100 ms of audio a message
_SAMPLES: Final = 8000 * EXOTEL_FRAME_MS // 1000


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def synthesize_exotel(plan: SessionPlan) -> list[FixtureFrame]:
    """``plan``'s session as Exotel frames (``plan.inbound`` at 8 kHz; ``drop`` and ``swap``
    index 100 ms messages)."""
    sid = plan.stream_sid
    frames = [FixtureFrame(0.0, _dumps({"event": "connected"})), FixtureFrame(1.0, _dumps({
        "event": "start", "sequence_number": "1", "stream_sid": sid, "start": {
            "stream_sid": sid, "call_sid": plan.call_sid, "account_sid": plan.account_sid,
            "from": "+919876543210", "to": "+918047491899",
            "custom_parameters": dict(plan.custom_parameters or {}),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000",
                             "bit_rate": "16"}}}))]
    timeline: list[tuple[float, int, dict[str, Any]]] = []
    samples = plan.inbound
    for position, index in sent_frames(len(samples) // _SAMPLES, plan.drop, plan.swap):
        chunk = samples[index * _SAMPLES : (index + 1) * _SAMPLES]
        pcm = struct.pack(f"<{len(chunk)}h", *chunk)
        timeline.append((position * EXOTEL_FRAME_MS, 0, {"event": "media", "media": {
            "chunk": str(index + 1), "timestamp": str(index * EXOTEL_FRAME_MS),
            "payload": base64.b64encode(pcm).decode()}}))
    for digit, at_s in plan.dtmf:
        timeline.append((at_s * 1000, 1, {"event": "dtmf",
                                          "dtmf": {"digit": digit, "duration": "100"}}))
    for name, at_s in plan.marks:
        timeline.append((at_s * 1000, 1, {"event": "mark", "mark": {"name": name}}))
    timeline.sort(key=lambda item: (item[0], item[1]))
    sequence = 2
    for at_ms, _, message in timeline:
        event = message.pop("event")
        frames.append(FixtureFrame(40.0 + at_ms, _dumps({
            "event": event, "sequence_number": str(sequence), "stream_sid": sid, **message})))
        sequence += 1
    if plan.stop:
        frames.append(FixtureFrame(frames[-1].at_ms + EXOTEL_FRAME_MS, _dumps({
            "event": "stop", "sequence_number": str(sequence), "stream_sid": sid,
            "stop": {"call_sid": plan.call_sid, "account_sid": plan.account_sid,
                     "reason": "callended"}})))
    return frames


def exotel_expected(plan: SessionPlan) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Exotel frames."""
    count = len(plan.inbound) // _SAMPLES
    dropped = {i for i in plan.drop if i < count}
    return expected_outcome(
        plan, frames={"inbound": count - len(dropped)},
        missing_frames={"inbound": len({i for i in dropped if 0 < i < count - 1})},
        out_of_order_frames={"inbound": len([i for i in plan.swap if i + 1 < count])})
