"""Audio for Media Streams: G.711 (mu-law, A-law) <-> PCM16 and sample-rate conversion.

Twilio's audio is 8 kHz mono mu-law both ways (Twilio's Media Streams pages). Conversion uses the
standard library's ``audioop`` (``audioop-lts`` on Python 3.13+, installed by an environment
marker); resampling uses soxr with one stateful stream per call and direction, so that
consecutive 20 ms frames join without clicks at their edges.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Final

import numpy as np
import soxr

with warnings.catch_warnings():
    # audioop is deprecated in 3.11/3.12 (removed in 3.13, where audioop-lts provides it).
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "SAMPLE_BYTES",
    "TWILIO_SAMPLE_RATE",
    "Resampler",
    "alaw_to_pcm16",
    "byteswap16",
    "dbfs",
    "from_pcm16",
    "mulaw_to_pcm16",
    "pcm16_rms_peak",
    "pcm16_to_alaw",
    "pcm16_to_mulaw",
    "to_pcm16",
]

TWILIO_SAMPLE_RATE: Final = 8000
SAMPLE_WIDTH: Final = 2  # PCM16
FULL_SCALE: Final = 32768.0
SILENCE_DBFS: Final = -120.0  # what digital silence reports instead of -inf


def mulaw_to_pcm16(mulaw: bytes) -> bytes:
    """Decode G.711 mu-law bytes to little-endian PCM16 (one sample per byte)."""
    return audioop.ulaw2lin(mulaw, SAMPLE_WIDTH)


def pcm16_to_mulaw(pcm: bytes) -> bytes:
    """Encode little-endian PCM16 to G.711 mu-law (one byte per sample)."""
    return audioop.lin2ulaw(pcm, SAMPLE_WIDTH)


# What one sample takes in each native encoding a codec may have (Codec.native_encoding).
SAMPLE_BYTES: Final = {"mulaw": 1, "alaw": 1, "pcm16": 2}


def to_pcm16(payload: bytes, encoding: str) -> bytes:
    """``payload`` in a stream's native ``encoding`` (``mulaw``, ``alaw`` or ``pcm16``) as
    little-endian PCM16 (PCM16 as it is)."""
    if encoding == "mulaw":
        return mulaw_to_pcm16(payload)
    if encoding == "alaw":
        return alaw_to_pcm16(payload)
    return payload


def from_pcm16(pcm: bytes, encoding: str) -> bytes:
    """Little-endian PCM16 in a stream's native ``encoding`` (PCM16 as it is)."""
    if encoding == "mulaw":
        return pcm16_to_mulaw(pcm)
    if encoding == "alaw":
        return pcm16_to_alaw(pcm)
    return pcm


def alaw_to_pcm16(alaw: bytes) -> bytes:
    """Decode G.711 A-law bytes to little-endian PCM16 (one sample per byte)."""
    return audioop.alaw2lin(alaw, SAMPLE_WIDTH)


def pcm16_to_alaw(pcm: bytes) -> bytes:
    """Encode little-endian PCM16 to G.711 A-law (one byte per sample)."""
    return audioop.lin2alaw(pcm[: len(pcm) // 2 * 2], SAMPLE_WIDTH)


def byteswap16(pcm: bytes) -> bytes:
    """16-bit samples in the other byte order (L16's big-endian <-> little-endian); an odd
    trailing byte is dropped."""
    return audioop.byteswap(pcm[: len(pcm) // 2 * 2], SAMPLE_WIDTH)


def pcm16_rms_peak(pcm: bytes) -> tuple[int, int]:
    """RMS and peak absolute sample of PCM16 audio (0 for no audio)."""
    if not pcm:
        return 0, 0
    return audioop.rms(pcm, SAMPLE_WIDTH), audioop.max(pcm, SAMPLE_WIDTH)


def dbfs(value: float) -> float:
    """A sample magnitude in dBFS: 0 is full scale; silence gives -120, not -inf."""
    return 20 * math.log10(value / FULL_SCALE) if value > 0 else SILENCE_DBFS


class Resampler:
    """A stateful PCM16 mono rate converter for one call and one direction (for example
    16 kHz from a speech engine to Twilio's 8 kHz). Feed chunks in order with
    :meth:`process`; call :meth:`flush` at the end for the filter's tail."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream: Any = self._new_stream()

    def _new_stream(self) -> Any:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="int16", quality="HQ")

    def process(self, pcm: bytes) -> bytes:
        """Convert one chunk; the output may lag the input by the filter's delay."""
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        return bytes(self._stream.resample_chunk(samples, last=False).astype("<i2").tobytes())

    def flush(self) -> bytes:
        """The remaining output once the input has ended; the resampler then starts afresh
        (for the next utterance)."""
        if self._stream is None:
            return b""
        empty = np.zeros(0, dtype="<i2")
        tail = self._stream.resample_chunk(empty, last=True).astype("<i2").tobytes()
        self._stream = self._new_stream()
        return bytes(tail)

    def reset(self) -> None:
        """Drop what the filter holds (after a ``clear``) and start afresh."""
        self._stream = self._new_stream()
