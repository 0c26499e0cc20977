"""Built-in ``levels``: who spoke when, and how loud, per track.

Options (``[handlers.levels]``): ``detector`` (``auto``: WebRTC's voice activity detector
when ``webrtcvad-wheels`` is installed, else ``energy``; or name one), ``aggressiveness``
(WebRTC, 0-3, default 2), ``energy_threshold_dbfs`` (energy detector, default -40),
``hangover_ms`` (non-speech that still continues a segment, default 200), ``max_segments``
(per track, default 500; later ones are counted, not listed).

Reported in the call summary (``handlers.levels``) and the recorder's sidecar, per track:
``segments`` (``[start_ms, end_ms]`` on the stream's media timeline), ``talk_ms``,
``rms_dbfs`` and ``peak_dbfs`` over the whole call, and the detector used.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from streamsvc import wire
from streamsvc.audio import TWILIO_SAMPLE_RATE, dbfs, mulaw_to_pcm16, pcm16_rms_peak
from streamsvc.handlers import Handler
from streamsvc.live import LiveSession

__all__ = ["LevelsHandler"]

DETECTORS: Final = ("auto", "webrtc", "energy")
# WebRTC's VAD takes 10, 20 or 30 ms of audio at a time.
_VAD_FRAME_BYTES: Final = {160 * 2, 240 * 2, 80 * 2}


@dataclass(slots=True)
class _Track:
    segments: list[list[int]] = field(default_factory=list)
    segments_dropped: int = 0
    talk_ms: int = 0
    open_start_ms: int | None = None  # start of the segment in progress
    last_speech_end_ms: int = 0
    sum_squares: float = 0.0
    samples: int = 0
    peak: int = 0


class LevelsHandler(Handler):
    """Speech segments, talk time and levels per track (see the module docstring)."""

    def __init__(self, *, detector: str = "auto", aggressiveness: int = 2,
                 energy_threshold_dbfs: float = -40.0, hangover_ms: int = 200,
                 max_segments: int = 500) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}")
        self.vad = _webrtc_vad(aggressiveness) if detector in ("auto", "webrtc") else None
        if detector == "webrtc" and self.vad is None:
            raise ValueError("detector 'webrtc' needs webrtcvad-wheels installed")
        self.detector = "webrtc" if self.vad is not None else "energy"
        self.threshold_dbfs = energy_threshold_dbfs
        self.hangover_ms = hangover_ms
        self.max_segments = max_segments
        self.tracks: dict[str, _Track] = {}
        self.session: LiveSession | None = None
        self.sample_rate = TWILIO_SAMPLE_RATE

    def on_start(self, session: LiveSession) -> None:
        # Audio the same way on every provider: PCM16 at the stream's rate.
        self.session = session
        self.sample_rate = session.sample_rate

    def on_media(self, frame: wire.Media) -> None:
        track = self.tracks.get(frame.track)
        if track is None:
            track = self.tracks[frame.track] = _Track()
        pcm = (self.session.pcm16(frame) if self.session is not None
               else mulaw_to_pcm16(frame.payload))
        rms, peak = pcm16_rms_peak(pcm)
        samples = len(pcm) // 2
        track.samples += samples
        track.sum_squares += samples * rms * rms
        track.peak = max(track.peak, peak)
        start_ms = frame.timestamp_ms
        end_ms = start_ms + samples * 1000 // self.sample_rate
        if self._is_speech(pcm, rms):
            self._speech(track, start_ms, end_ms)
        elif self._hangover_over(track, start_ms):
            self._close(track)

    def _is_speech(self, pcm: bytes, rms: int) -> bool:
        if self.vad is not None and len(pcm) * 8000 // self.sample_rate in _VAD_FRAME_BYTES \
                and self.sample_rate in (8000, 16000, 32000, 48000):  # WebRTC VAD's rates
            return bool(self.vad.is_speech(pcm, self.sample_rate))
        return dbfs(rms) > self.threshold_dbfs

    def _hangover_over(self, track: _Track, now_ms: int) -> bool:
        """A segment is open and has heard no speech for longer than the hangover."""
        return (track.open_start_ms is not None
                and now_ms - track.last_speech_end_ms > self.hangover_ms)

    def _speech(self, track: _Track, start_ms: int, end_ms: int) -> None:
        if track.open_start_ms is None:
            track.open_start_ms = start_ms
        track.last_speech_end_ms = max(track.last_speech_end_ms, end_ms)

    def _close(self, track: _Track) -> None:
        assert track.open_start_ms is not None
        start, end = track.open_start_ms, track.last_speech_end_ms
        track.talk_ms += end - start
        if len(track.segments) < self.max_segments:
            track.segments.append([start, end])
        else:
            track.segments_dropped += 1
        track.open_start_ms = None

    def report(self) -> Mapping[str, Any]:
        for track in self.tracks.values():
            if track.open_start_ms is not None:
                self._close(track)
        return {name: self._track_report(track) for name, track in self.tracks.items()}

    def _track_report(self, track: _Track) -> dict[str, Any]:
        rms = math.sqrt(track.sum_squares / track.samples) if track.samples else 0.0
        return {
            "detector": self.detector,
            "segments": track.segments,
            "segments_dropped": track.segments_dropped,
            "talk_ms": track.talk_ms,
            "rms_dbfs": round(dbfs(rms), 2),
            "peak_dbfs": round(dbfs(track.peak), 2),
        }


def _webrtc_vad(aggressiveness: int) -> Any:
    try:
        webrtcvad = importlib.import_module("webrtcvad")
    except ImportError:
        return None
    return webrtcvad.Vad(aggressiveness)
