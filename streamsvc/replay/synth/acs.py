"""Build Azure Communication Services media-streaming sessions from audio, in ACS's exact
frames (:mod:`streamsvc.providers.acs`): ``AudioMetadata``, then one ``AudioData`` per
participant every 20 ms (PCM16 at 16 or 24 kHz, ISO 8601 timestamps, ``silent`` set on
frames of silence), ``DtmfData`` at their times, and no stop message (the replay client
closes the socket). The fixture's header carries the upgrade headers ACS sends
(``x-ms-call-connection-id``, ``x-ms-call-correlation-id``) and the expected outcome.
"""

from __future__ import annotations

import base64
import datetime
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from streamsvc.providers.acs import CALL_CONNECTION_HEADER, CORRELATION_HEADER
from streamsvc.replay.fixture import FixtureFrame
from streamsvc.replay.synth.twilio import sent_frames

__all__ = ["AcsPlan", "acs_expected_outcome", "acs_header", "synthesize_acs"]

FRAME_MS: Final = 20
# Where synthesized timelines start (any instant would do; a fixed one keeps files stable).
EPOCH: Final = datetime.datetime(2026, 1, 5, 9, 0, 0, tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True)
class AcsPlan:
    """What to synthesize: each participant's audio (PCM16 samples at ``sample_rate``) by
    raw id. Mixed audio is one participant. Times are seconds from the first frame."""

    participants: Mapping[str, Sequence[int]]
    sample_rate: int = 16000
    unmixed: bool = False
    dtmf: Sequence[tuple[str, float]] = ()
    drop: frozenset[int] = frozenset()  # frame indexes (per participant) never sent
    swap: frozenset[int] = frozenset()  # frame i is sent after frame i + 1
    subscription_id: str = "6a1f2b3c-0000-4000-8000-000000000001"
    call_connection_id: str = "421f0b00-0000-4000-8000-000000000001"
    correlation_id: str = "e6f7a0c1-0000-4000-8000-000000000001"
    start_offset_ms: int = field(default=0)

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * FRAME_MS // 1000


def _stamp(offset_ms: int) -> str:
    moment = EPOCH + datetime.timedelta(milliseconds=offset_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def synthesize_acs(plan: AcsPlan) -> list[FixtureFrame]:
    """The frames of one ACS stream: metadata, audio (participants interleaved, drops and
    swaps applied), DTMF at its times. No stop: ACS just closes."""
    frames = [FixtureFrame(0.0, _dumps({"kind": "AudioMetadata", "audioMetadata": {
        "subscriptionId": plan.subscription_id, "encoding": "PCM",
        "sampleRate": plan.sample_rate, "channels": 1,
        "length": plan.frame_samples * 2}}))]
    timeline: list[tuple[float, int, str]] = []
    for number, (participant, samples) in enumerate(plan.participants.items()):
        for position, index in sent_frames(len(samples) // plan.frame_samples, plan.drop,
                                           plan.swap):
            chunk = samples[index * plan.frame_samples : (index + 1) * plan.frame_samples]
            timeline.append((position * FRAME_MS + number * 0.1, 0, _dumps({
                "kind": "AudioData", "audioData": {
                    "timestamp": _stamp(plan.start_offset_ms + index * FRAME_MS),
                    "participantRawID": participant,
                    "data": base64.b64encode(struct.pack(f"<{len(chunk)}h", *chunk)).decode(),
                    "silent": not any(chunk)}})))
    for digit, at_s in plan.dtmf:
        timeline.append((at_s * 1000, 1, _dumps({"kind": "DtmfData",
                                                 "dtmfData": {"data": digit}})))
    timeline.sort(key=lambda item: (item[0], item[1]))
    frames.extend(FixtureFrame(20.0 + at_ms, text) for at_ms, _, text in timeline)
    return frames


def acs_header(plan: AcsPlan, *, path: str = "/acs", description: str = "",
               custom_context: Mapping[str, Mapping[str, str]] | None = None,
               **expect: Any) -> dict[str, Any]:
    """The fixture header: provider, path, the upgrade headers ACS sends, the outcome; with
    ``custom_context`` (``{"sipHeaders": {...}, "voipHeaders": {...}}``) also the
    ``incoming_call`` event Event Grid delivers before the stream (``replay
    --acs-events``)."""
    header: dict[str, Any] = {
        "description": description, "provider": "acs", "path": path,
        "headers": {CALL_CONNECTION_HEADER: plan.call_connection_id,
                    CORRELATION_HEADER: plan.correlation_id},
        "expect": acs_expected_outcome(plan, **expect)}
    if custom_context is not None:
        header["incoming_call"] = {
            "id": plan.correlation_id, "eventType": "Microsoft.Communication.IncomingCall",
            "subject": "/phonenumber/15550100", "eventTime": _stamp(0), "dataVersion": "1.0",
            "data": {"to": {"kind": "phoneNumber", "rawId": "4:+15550100"},
                     "from": {"kind": "phoneNumber", "rawId": next(iter(plan.participants))},
                     "serverCallId": "server-" + plan.correlation_id,
                     "incomingCallContext": "synthesized." + plan.correlation_id,
                     "correlationId": plan.correlation_id,
                     "customContext": {key: dict(value)
                                       for key, value in custom_context.items()}}}
    return header


def acs_expected_outcome(plan: AcsPlan, **extra: Any) -> dict[str, Any]:
    """What the service must report for ``plan``, worked out from the plan alone."""
    frames: dict[str, int] = {}
    missing: dict[str, int] = {}
    out_of_order: dict[str, int] = {}
    for participant, samples in plan.participants.items():
        track = participant if plan.unmixed else "inbound"
        count = len(samples) // plan.frame_samples
        dropped = {i for i in plan.drop if i < count}
        frames[track] = frames.get(track, 0) + count - len(dropped)
        missing[track] = len({i for i in dropped if 0 < i < count - 1})
        out_of_order[track] = len([i for i in plan.swap if i + 1 < count])
    result: dict[str, Any] = {
        "call_sid": plan.call_connection_id, "stream_sid": plan.subscription_id,
        "account_sid": "", "tracks": [] if plan.unmixed else ["inbound"],
        "custom_parameters": {}, "frames": frames, "missing_frames": missing,
        "out_of_order_frames": out_of_order, "bad_frames": 0, "ignored_events": 0,
        "dtmf": "".join(digit for digit, _ in plan.dtmf), "reason": "stop",
    }
    result.update(extra)
    return result
