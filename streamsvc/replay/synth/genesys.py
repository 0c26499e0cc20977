"""Genesys-format sessions for ``streamsvc fixture synth --provider genesys``: a plan's audio
as Genesys AudioHook sends it (``open`` offering one format: PCMU with the external channel,
or both channels when the plan has outbound audio; binary 20 ms frames, the channels
interleaved; a ``ping``; Audio Connector's ``dtmf``; ``close``), the upgrade's
``audiohook-*`` headers, and the outcome the service must report.

Each message's ``seq`` counts from 1 and its ``serverseq`` assumes the service's answers
(``opened``, then a ``pong`` per ping); ``position`` is the audio sent before it. The
replay client renumbers both as it plays (:mod:`streamsvc.replay.client`), so answers it
makes of its own (``paused``, ``playback_completed``) keep the sequence whole."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any, Final

from streamsvc.audio import pcm16_to_mulaw
from streamsvc.providers.genesys import format_duration
from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, sent_frames

__all__ = ["genesys_expected", "genesys_headers", "synthesize_genesys"]

RATE: Final = 8000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = RATE * FRAME_MS // 1000
_START_MS: Final = 40.0  # the first audio frame follows opened
PARTICIPANT: Final = {"ani": "tel:+15550100", "aniName": "Pat Caller", "dnis": "tel:+15550199"}


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def genesys_headers(plan: SessionPlan, correlation_id: str | None = None) -> dict[str, str]:
    """The ``audiohook-*`` headers Genesys sends with the upgrade (the signature, which
    covers them, is the replay's: :mod:`streamsvc.replay.signing`)."""
    return {"audiohook-organization-id": plan.account_sid,
            "audiohook-session-id": plan.stream_sid,
            "audiohook-correlation-id": correlation_id or str(uuid.uuid5(
                uuid.NAMESPACE_URL, plan.stream_sid))}


def _channels(plan: SessionPlan) -> list[str]:
    return ["external", "internal"] if plan.outbound is not None else ["external"]


def synthesize_genesys(plan: SessionPlan) -> list[FixtureFrame]:
    """``plan``'s session as Genesys frames (``drop`` and ``swap`` index 20 ms frames: a
    dropped one is never sent, a swapped pair goes out in the other order; ``marks`` are
    not Genesys's: ignored)."""
    channels = _channels(plan)
    count = len(plan.inbound) // FRAME_SAMPLES
    if plan.outbound is not None:
        count = min(count, len(plan.outbound) // FRAME_SAMPLES)
    # (time, order, message or audio)
    timeline: list[tuple[float, int, dict[str, Any] | bytes]] = []
    for position, index in sent_frames(count, plan.drop, plan.swap):
        window = slice(index * FRAME_SAMPLES, (index + 1) * FRAME_SAMPLES)
        tracks = [plan.inbound[window]] + ([plan.outbound[window]] if plan.outbound else [])
        interleaved = [sample for pair in zip(*tracks, strict=True) for sample in pair]
        pcm = struct.pack(f"<{len(interleaved)}h", *interleaved)
        timeline.append((_START_MS + position * FRAME_MS, 0, pcm16_to_mulaw(pcm)))
    for digit, at_s in plan.dtmf:
        timeline.append((_START_MS + at_s * 1000, 1,
                         {"type": "dtmf", "parameters": {"digit": digit}}))
    middle = _START_MS + count * FRAME_MS / 2
    timeline.append((middle, 1, {"type": "ping", "parameters": {"rtt": "PT0.05S"}}))
    timeline.sort(key=lambda item: (item[0], item[1]))
    opened = {"version": "2", "id": plan.stream_sid, "type": "open", "seq": 1,
              "serverseq": 0, "position": "PT0S", "parameters": {
                  "organizationId": plan.account_sid, "conversationId": plan.call_sid,
                  "participant": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, plan.call_sid)),
                                  **PARTICIPANT},
                  "media": [{"type": "audio", "format": "PCMU", "channels": channels,
                             "rate": RATE}],
                  "language": "en-US",
                  "customConfig": dict(plan.custom_parameters or {})}}
    frames = [FixtureFrame(0.0, _dumps(opened))]
    seq, serverseq, samples = 1, 1, 0
    for at_ms, _, item in timeline:
        if isinstance(item, bytes):
            frames.append(FixtureFrame(at_ms, "", item))
            samples += len(item) // len(channels)
            continue
        seq += 1
        frames.append(FixtureFrame(at_ms, _dumps({
            "version": "2", "id": plan.stream_sid, "type": item["type"], "seq": seq,
            "serverseq": serverseq, "position": format_duration(samples * 1000 / RATE),
            "parameters": item["parameters"]})))
        serverseq += item["type"] == "ping"
    last_ms = (frames[-1].at_ms if frames else 0.0) + FRAME_MS
    frames.append(FixtureFrame(last_ms, _dumps({
        "version": "2", "id": plan.stream_sid, "type": "close", "seq": seq + 1,
        "serverseq": serverseq, "position": format_duration(samples * 1000 / RATE),
        "parameters": {"reason": "end"}})))
    return frames


def genesys_expected(plan: SessionPlan) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Genesys frames. Genesys's audio
    carries no timestamp: a dropped frame is not seen as missing, a late one not as out of
    order."""
    count = len(plan.inbound) // FRAME_SAMPLES
    if plan.outbound is not None:
        count = min(count, len(plan.outbound) // FRAME_SAMPLES)
    sent = count - len({i for i in plan.drop if i < count})
    tracks = ["inbound", "outbound"] if plan.outbound is not None else ["inbound"]
    context = {**PARTICIPANT, "language": "en-US", **dict(plan.custom_parameters or {})}
    return expected_outcome(
        plan, frames=dict.fromkeys(tracks, sent), missing_frames=dict.fromkeys(tracks, 0),
        out_of_order_frames=dict.fromkeys(tracks, 0), tracks=tracks,
        custom_parameters=context, reason="stop")
