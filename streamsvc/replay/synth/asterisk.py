"""Asterisk-format sessions for ``streamsvc fixture synth --provider asterisk``: a plan's
audio as chan_websocket sends it (``MEDIA_START`` in JSON with the channel variables, or in
plain text; binary 20 ms frames of ulaw, or slin at the plan's rate; ``DTMF_END``; no stop:
Asterisk closes), one frame of audio before ``MEDIA_START`` as Asterisk may send it under
load, and the outcome the service must report."""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from streamsvc.audio import pcm16_to_mulaw
from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import SessionPlan, expected_outcome, sent_frames

__all__ = ["asterisk_expected", "synthesize_asterisk"]

FRAME_MS: Final = 20
_START_MS: Final = 20.0  # MEDIA_START comes just after the first frame of audio
CHANNEL: Final = "WebSocket/media_connection1-00000001"


def _format(sample_rate: int) -> str:
    return "ulaw" if sample_rate == 0 else "slin" if sample_rate == 8000 else (
        f"slin{sample_rate // 1000}")


def _media_start(plan: SessionPlan, sample_rate: int, json_control: bool) -> str:
    fmt = _format(sample_rate)
    frame_size = 160 if fmt == "ulaw" else sample_rate * 2 * FRAME_MS // 1000
    if not json_control:
        return (f"MEDIA_START connection_id:{plan.stream_sid} channel:{CHANNEL} "
                f"channel_id:{plan.call_sid} format:{fmt} optimal_frame_size:{frame_size} "
                f"ptime:{FRAME_MS}")
    return json.dumps({"event": "MEDIA_START", "connection_id": plan.stream_sid,
                       "channel": CHANNEL, "channel_id": plan.call_sid, "format": fmt,
                       "optimal_frame_size": frame_size, "ptime": FRAME_MS,
                       "channel_variables": dict(plan.custom_parameters or {})},
                      separators=(",", ":"))


def synthesize_asterisk(plan: SessionPlan, *, sample_rate: int = 0,
                        json_control: bool = True) -> list[FixtureFrame]:
    """``plan``'s session as Asterisk frames: ``sample_rate`` 0 sends ulaw (``plan.inbound``
    at 8 kHz), else slin at that rate; ``json_control`` False writes the plain-text control
    format (which carries no channel variables). Frame 0 goes before ``MEDIA_START``."""
    rate = sample_rate or 8000
    samples_per_frame = rate * FRAME_MS // 1000
    timeline: list[tuple[float, int, FixtureFrame]] = []
    for position, index in sent_frames(len(plan.inbound) // samples_per_frame, plan.drop,
                                       plan.swap):
        chunk = plan.inbound[index * samples_per_frame : (index + 1) * samples_per_frame]
        pcm = struct.pack(f"<{len(chunk)}h", *chunk)
        at_ms = position * FRAME_MS + (0.0 if position == 0 else _START_MS)
        timeline.append((at_ms, 0, FixtureFrame(
            at_ms, "", pcm16_to_mulaw(pcm) if sample_rate == 0 else pcm)))
    timeline.append((_START_MS - 10, 0, FixtureFrame(
        _START_MS - 10, _media_start(plan, sample_rate, json_control))))
    for digit, at_s in plan.dtmf:
        at_ms = _START_MS + at_s * 1000
        text = (json.dumps({"event": "DTMF_END", "channel_id": plan.call_sid, "digit": digit})
                if json_control else f"DTMF_END digit:{digit}")
        timeline.append((at_ms, 1, FixtureFrame(at_ms, text)))
    timeline.sort(key=lambda item: (item[0], item[1]))
    return [frame for _, _, frame in timeline]


def asterisk_expected(plan: SessionPlan, *, sample_rate: int = 0,
                      json_control: bool = True) -> dict[str, Any]:
    """What the service must report for ``plan`` sent as Asterisk frames: Asterisk's
    media carries no timestamp (a dropped frame is not seen as missing); the frame sent
    before ``MEDIA_START`` is counted like the others."""
    rate = sample_rate or 8000
    count = len(plan.inbound) // (rate * FRAME_MS // 1000)
    context = {**(dict(plan.custom_parameters or {}) if json_control else {}),
               "channel": CHANNEL}
    return expected_outcome(
        plan, frames={"inbound": count - len({i for i in plan.drop if i < count})},
        missing_frames={"inbound": 0}, out_of_order_frames={"inbound": 0},
        account_sid=None, custom_parameters=context, reason="stop")
