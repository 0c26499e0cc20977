"""jambonz-format sessions for ``streamsvc fixture synth --provider jambonz``: a plan's audio
as the ``listen`` verb sends it (the call's attributes, ``sampleRate``, ``mixType``,
``customerData`` and ``metadata`` first; binary 20 ms frames of 16-bit PCM, the two legs
interleaved when the plan has outbound audio; ``dtmf`` events; no stop: jambonz closes),
and the outcome the service must report."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any, Final

from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, sent_frames

__all__ = ["jambonz_expected", "jambonz_first_message", "synthesize_jambonz"]

FRAME_MS: Final = 20
_START_MS: Final = 40.0
DTMF_DURATION_MS: Final = 250
METADATA: Final = {"bot": "order-status"}


def jambonz_first_message(plan: SessionPlan, sample_rate: int) -> dict[str, Any]:
    """The listen verb's first message for ``plan``: the call's attributes, the audio's
    rate and mix, ``customerData`` (the plan's parameters) and the verb's ``metadata``."""
    return {"callSid": plan.call_sid, "direction": "inbound", "from": "+15550100",
            "to": "+15550199", "callerName": "Pat Caller",
            "callId": str(uuid.uuid5(uuid.NAMESPACE_URL, plan.call_sid)),
            "accountSid": plan.account_sid, "applicationSid": "app-0001",
            "sampleRate": sample_rate,
            "mixType": "stereo" if plan.outbound is not None else "mono",
            "customerData": dict(plan.custom_parameters or {}), "metadata": METADATA}


def synthesize_jambonz(plan: SessionPlan, *, sample_rate: int = 8000) -> list[FixtureFrame]:
    """``plan``'s session as jambonz frames (``plan.inbound`` and ``plan.outbound`` at
    ``sample_rate``)."""
    frames = [FixtureFrame(0.0, json.dumps(jambonz_first_message(plan, sample_rate),
                                           separators=(",", ":")))]
    per_frame = sample_rate * FRAME_MS // 1000
    count = len(plan.inbound) // per_frame
    if plan.outbound is not None:
        count = min(count, len(plan.outbound) // per_frame)
    timeline: list[tuple[float, int, FixtureFrame]] = []
    for position, index in sent_frames(count, plan.drop, plan.swap):
        window = slice(index * per_frame, (index + 1) * per_frame)
        legs = [plan.inbound[window]] + ([plan.outbound[window]] if plan.outbound else [])
        samples = [sample for pair in zip(*legs, strict=True) for sample in pair]
        at_ms = _START_MS + position * FRAME_MS
        timeline.append((at_ms, 0, FixtureFrame(at_ms, "", struct.pack(
            f"<{len(samples)}h", *samples))))
    for digit, at_s in plan.dtmf:
        at_ms = _START_MS + at_s * 1000
        timeline.append((at_ms, 1, FixtureFrame(at_ms, json.dumps(
            {"event": "dtmf", "dtmf": digit, "duration": DTMF_DURATION_MS}))))
    timeline.sort(key=lambda item: (item[0], item[1]))
    return frames + [frame for _, _, frame in timeline]


def jambonz_expected(plan: SessionPlan, *, sample_rate: int = 8000) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as jambonz frames (no timestamps:
    a dropped frame is not missing; the stream id is the service's own)."""
    per_frame = sample_rate * FRAME_MS // 1000
    count = len(plan.inbound) // per_frame
    if plan.outbound is not None:
        count = min(count, len(plan.outbound) // per_frame)
    sent = count - len({i for i in plan.drop if i < count})
    tracks = ["inbound", "outbound"] if plan.outbound is not None else ["inbound"]
    first = jambonz_first_message(plan, sample_rate)
    context = {name: str(value) for name, value in first.items()
               if name not in ("sampleRate", "mixType", "customerData", "metadata")}
    context.update(first["customerData"])
    context.update(METADATA)
    expected = expected_outcome(
        plan, frames=dict.fromkeys(tracks, sent), missing_frames=dict.fromkeys(tracks, 0),
        out_of_order_frames=dict.fromkeys(tracks, 0), tracks=tracks,
        custom_parameters=context, reason="stop")
    del expected["stream_sid"]
    return expected
