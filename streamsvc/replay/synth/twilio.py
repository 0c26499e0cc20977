"""Build Twilio-faithful fixture sessions from audio.

Frames look like Twilio's own (Twilio's Media Streams pages): numbers as strings, the first media
timestamp not 0, 160-byte mu-law payloads every 20 ms per track, both tracks interleaved,
Twilio's key order. Audio comes from any WAV the standard library reads (converted to 8 kHz
mono) or from PCM16 samples.
"""

from __future__ import annotations

import array
import base64
import json
import wave
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from streamsvc.audio import pcm16_to_mulaw
from streamsvc.replay.fixture import FixtureFrame

__all__ = ["SessionPlan", "expected_outcome", "mulaw_encode", "read_wav", "sent_frames",
           "synthesize"]

SAMPLE_RATE: Final = 8000
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = SAMPLE_RATE * FRAME_MS // 1000  # 160 bytes of mu-law per frame


def mulaw_encode(samples: Iterable[int]) -> bytes:
    """Encode PCM16 samples (ints in -32768..32767) as G.711 mu-law bytes."""
    return pcm16_to_mulaw(array.array("h", samples).tobytes())


def read_wav(path: str | Path, rate: int = SAMPLE_RATE) -> list[int]:
    """Read a PCM WAV (8/16/24/32-bit, any rate, any channels) as mono PCM16 samples at
    ``rate`` (8 kHz by default): channels are averaged, the rate converted by linear
    interpolation."""
    with wave.open(str(path), "rb") as wav:
        width, channels, source_rate = (wav.getsampwidth(), wav.getnchannels(),
                                        wav.getframerate())
        raw = wav.readframes(wav.getnframes())
    frames = [
        sum(_sample(raw, (i * channels + c) * width, width) for c in range(channels)) // channels
        for i in range(len(raw) // (width * channels))
    ]
    return _resample(frames, source_rate, rate)


def _sample(raw: bytes, offset: int, width: int) -> int:
    if width == 1:  # 8-bit WAV is unsigned
        return (raw[offset] - 128) << 8
    value = int.from_bytes(raw[offset : offset + width], "little", signed=True)
    return value >> (8 * (width - 2))


def _resample(samples: Sequence[int], rate: int, target: int) -> list[int]:
    if rate == target or not samples:
        return list(samples)
    count = len(samples) * target // rate
    out = []
    for i in range(count):
        position = i * rate / target
        left = int(position)
        right = min(left + 1, len(samples) - 1)
        fraction = position - left
        out.append(round(samples[left] * (1 - fraction) + samples[right] * fraction))
    return out


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """What to synthesize. Times are seconds from the first media frame."""

    inbound: Sequence[int]
    outbound: Sequence[int] | None = None
    custom_parameters: Mapping[str, str] | None = field(default_factory=dict)
    dtmf: Sequence[tuple[str, float]] = ()
    marks: Sequence[tuple[str, float]] = ()
    drop: frozenset[int] = frozenset()  # frame indexes (per track) never sent
    swap: frozenset[int] = frozenset()  # frame index i is sent after frame i + 1
    stream_sid: str = "MZ00000000000000000000000000000001"
    call_sid: str = "CA00000000000000000000000000000001"
    account_sid: str = "AC00000000000000000000000000000001"
    protocol_version: str = "1.0.0"
    first_timestamp_ms: int = 99
    stop: bool = True


def synthesize(plan: SessionPlan) -> list[FixtureFrame]:
    """The frames of a session: ``connected``, ``start``, media (tracks interleaved, with
    drops and swaps applied), ``dtmf`` and ``mark`` at their times, then ``stop``."""
    sid = plan.stream_sid
    tracks = ["inbound"] + (["outbound"] if plan.outbound is not None else [])
    frames = [
        FixtureFrame(0.0, _dumps({"event": "connected", "protocol": "Call",
                                  "version": plan.protocol_version})),
        FixtureFrame(1.0, _dumps(_start_message(plan, tracks))),
    ]
    # (time, order, message): media first when a dtmf or mark shares its time.
    timeline: list[tuple[float, int, dict[str, object]]] = [
        (at_ms, 0, {"event": "media", **body}) for at_ms, body in _media_schedule(plan, tracks)
    ]
    for digit, at_s in plan.dtmf:
        timeline.append((at_s * 1000, 1, {"event": "dtmf", "streamSid": sid,
                                          "dtmf": {"track": "inbound_track", "digit": digit}}))
    for name, at_s in plan.marks:
        timeline.append((at_s * 1000, 1, {"event": "mark", "streamSid": sid,
                                          "mark": {"name": name}}))
    timeline.sort(key=lambda item: (item[0], item[1]))
    start_ms = 40.0  # media begins shortly after start, as in captures
    for sequence, (at_ms, _, message) in enumerate(timeline, start=2):
        event = message.pop("event")
        if event == "dtmf":  # Twilio's order differs per event (Twilio's Media Streams pages)
            message = {"event": event, "streamSid": message.pop("streamSid"),
                       "sequenceNumber": str(sequence), **message}
        else:
            message = {"event": event, "sequenceNumber": str(sequence), **message}
        if event == "media":
            message["streamSid"] = sid  # Twilio puts it last on media
        frames.append(FixtureFrame(start_ms + at_ms, _dumps(message)))
    sequence = len(timeline) + 2
    if plan.stop:
        last_ms = frames[-1].at_ms + FRAME_MS
        frames.append(FixtureFrame(last_ms, _dumps({
            "event": "stop", "sequenceNumber": str(sequence), "streamSid": sid,
            "stop": {"accountSid": plan.account_sid, "callSid": plan.call_sid},
        })))
    return frames


def _start_message(plan: SessionPlan, tracks: list[str]) -> dict[str, object]:
    start: dict[str, object] = {
        "accountSid": plan.account_sid, "streamSid": plan.stream_sid,
        "callSid": plan.call_sid, "tracks": tracks,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
    }
    if plan.custom_parameters is not None:
        start["customParameters"] = dict(plan.custom_parameters)
    return {"event": "start", "sequenceNumber": "1", "start": start,
            "streamSid": plan.stream_sid}


def _media_schedule(plan: SessionPlan, tracks: list[str]) -> list[tuple[float, dict[str, object]]]:
    sources = {"inbound": plan.inbound, "outbound": plan.outbound or ()}
    schedule: list[tuple[float, dict[str, object]]] = []
    for track in tracks:
        samples = sources[track]
        for position, index in sent_frames(len(samples) // FRAME_SAMPLES, plan.drop,
                                           plan.swap):
            chunk = samples[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES]
            body = {"track": track, "chunk": str(index + 1),
                    "timestamp": str(plan.first_timestamp_ms + index * FRAME_MS),
                    "payload": base64.b64encode(mulaw_encode(chunk)).decode()}
            schedule.append((position * FRAME_MS + (0.1 if track == "outbound" else 0.0),
                             {"media": body}))
    return schedule


def sent_frames(count: int, drop: frozenset[int],
                swap: frozenset[int]) -> list[tuple[int, int]]:
    """(position sent, frame index) of ``count`` frames: frame ``i`` in ``swap`` goes after
    frame ``i + 1``, frames in ``drop`` are never sent."""
    order = list(range(count))
    for i in sorted(swap):
        if i + 1 < count:
            order[i], order[i + 1] = order[i + 1], order[i]
    return [(position, index) for position, index in enumerate(order) if index not in drop]


def _dumps(message: Mapping[str, object]) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def expected_outcome(plan: SessionPlan, **extra: Any) -> dict[str, Any]:
    """What a server must report for ``plan`` (the ``expect`` of a fixture header), worked
    out from the plan alone: frames sent per track, interior drops as missing frames, swaps
    as out-of-order frames, the DTMF digits, the ids and parameters. ``extra`` overrides."""
    tracks = {"inbound": plan.inbound}
    if plan.outbound is not None:
        tracks["outbound"] = plan.outbound
    frames, missing, out_of_order = {}, {}, {}
    for track, samples in tracks.items():
        count = len(samples) // FRAME_SAMPLES
        dropped = {i for i in plan.drop if i < count}
        frames[track] = count - len(dropped)
        missing[track] = len({i for i in dropped if 0 < i < count - 1})
        out_of_order[track] = len([i for i in plan.swap if i + 1 < count])
    result: dict[str, Any] = {
        "call_sid": plan.call_sid,
        "stream_sid": plan.stream_sid,
        "account_sid": plan.account_sid,
        "tracks": list(tracks),
        "custom_parameters": dict(plan.custom_parameters or {}),
        "frames": frames,
        "missing_frames": missing,
        "out_of_order_frames": out_of_order,
        "bad_frames": 0,
        "ignored_events": 0,
        "dtmf": "".join(digit for digit, _ in plan.dtmf),
        "reason": "stop" if plan.stop else "closed",
    }
    result.update(extra)
    return result
