"""Vonage-format sessions for ``streamsvc fixture synth --provider vonage``: a plan's audio
as Vonage sends it (``websocket:connected`` with the NCCO headers, then binary 20 ms
frames of PCM16 little-endian, ``websocket:dtmf``, ``websocket:notify`` for marks, no stop)
and the outcome the service must report."""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from streamsvc.providers.vonage import CONNECTED, FRAME_MS, content_type
from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, sent_frames

__all__ = ["DTMF_DURATION_MS", "synthesize_vonage", "vonage_expected", "vonage_headers"]

DTMF_DURATION_MS: Final = 260  # what Vonage's page shows; fixed on most phone systems
_START_MS: Final = 40.0  # the first audio frame follows websocket:connected


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def vonage_headers(plan: SessionPlan) -> dict[str, str]:
    """The NCCO endpoint's ``headers`` of ``plan``: its custom parameters plus
    ``call_uuid`` (the call's uuid, as an answer webhook would put it there)."""
    return {**dict(plan.custom_parameters or {}), "call_uuid": plan.call_sid}


def synthesize_vonage(plan: SessionPlan, *, sample_rate: int = 16000) -> list[FixtureFrame]:
    """``plan``'s session as Vonage frames (``plan.inbound`` at ``sample_rate``; ``drop``
    and ``swap`` index 20 ms frames; ``plan.stop`` is ignored: Vonage closes)."""
    frames = [FixtureFrame(0.0, _dumps({"event": CONNECTED,
                                        "content-type": content_type(sample_rate),
                                        **vonage_headers(plan)}))]
    samples_per_frame = sample_rate * FRAME_MS // 1000
    timeline: list[tuple[float, int, FixtureFrame]] = []
    samples = plan.inbound
    for position, index in sent_frames(len(samples) // samples_per_frame, plan.drop,
                                       plan.swap):
        chunk = samples[index * samples_per_frame : (index + 1) * samples_per_frame]
        at_ms = _START_MS + position * FRAME_MS
        timeline.append((at_ms, 0, FixtureFrame(at_ms, "", struct.pack(f"<{len(chunk)}h",
                                                                         *chunk))))
    for digit, at_s in plan.dtmf:
        at_ms = _START_MS + at_s * 1000
        timeline.append((at_ms, 1, FixtureFrame(at_ms, _dumps({
            "event": "websocket:dtmf", "digit": digit, "duration": DTMF_DURATION_MS}))))
    for name, at_s in plan.marks:
        at_ms = _START_MS + at_s * 1000
        timeline.append((at_ms, 1, FixtureFrame(at_ms, _dumps({
            "event": "websocket:notify", "payload": {"name": name}}))))
    timeline.sort(key=lambda item: (item[0], item[1]))
    return frames + [frame for _, _, frame in timeline]


def vonage_expected(plan: SessionPlan, *, sample_rate: int = 16000) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Vonage frames. Vonage's frames
    carry no timestamp: a dropped one is not seen as missing, a late one not as out of
    order. The stream id is the service's own: not expected here."""
    count = len(plan.inbound) // (sample_rate * FRAME_MS // 1000)
    expected = expected_outcome(
        plan, frames={"inbound": count - len({i for i in plan.drop if i < count})},
        missing_frames={"inbound": 0}, out_of_order_frames={"inbound": 0},
        account_sid=None, custom_parameters=vonage_headers(plan), reason="stop")
    del expected["stream_sid"]
    return expected
