"""streamsvc.audio against G.711's reference values, and the resampler's continuity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamsvc.audio import Resampler, dbfs, mulaw_to_pcm16, pcm16_rms_peak, pcm16_to_mulaw


def g711_ulaw_to_linear(code: int) -> int:
    """ITU-T G.711 mu-law expansion as in the reference g711.c (ulaw2linear)."""
    code = ~code & 0xFF
    magnitude = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return 0x84 - magnitude if code & 0x80 else magnitude - 0x84


def pcm(samples: list[int]) -> bytes:
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


def samples_of(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "little", signed=True)
            for i in range(0, len(data), 2)]


@pytest.mark.parametrize(("code", "linear"), [
    (0x00, -32124), (0x80, 32124), (0x7F, 0), (0xFF, 0), (0x0F, -16764), (0x8F, 16764),
    (0x70, -120), (0xF0, 120), (0x7E, -8), (0xFE, 8),
])
def test_mulaw_decoding_gives_g711_reference_values(code: int, linear: int) -> None:
    assert [linear] == samples_of(mulaw_to_pcm16(bytes([code])))


def test_mulaw_decoding_matches_the_reference_expansion_for_every_code() -> None:
    expected = [g711_ulaw_to_linear(code) for code in range(256)]
    assert expected == samples_of(mulaw_to_pcm16(bytes(range(256))))


def test_mulaw_encoding_inverts_decoding_for_every_code() -> None:
    codes = bytes(c for c in range(256) if c != 0x7F)  # 0x7F and 0xFF both decode to 0
    assert codes == pcm16_to_mulaw(mulaw_to_pcm16(codes))


def test_levels_in_dbfs() -> None:
    full_scale_square = pcm([32767, -32767] * 80)
    rms, peak = pcm16_rms_peak(full_scale_square)
    assert round(dbfs(rms), 1) == 0.0
    assert round(dbfs(peak), 1) == 0.0
    assert -120.0 == dbfs(pcm16_rms_peak(bytes(320))[0])


def sine(rate: int, seconds: float, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (10000 * np.sin(2 * math.pi * frequency * t)).astype("<i2")


@pytest.mark.parametrize(("in_rate", "out_rate"), [(16000, 8000), (24000, 8000),
                                                   (8000, 16000), (8000, 24000)])
def test_resampling_in_frames_equals_resampling_at_once(in_rate: int, out_rate: int) -> None:
    """One stateful stream per direction: 20 ms chunks join without edges (clicks)."""
    signal = sine(in_rate, 1.0)
    whole = Resampler(in_rate, out_rate)
    expected = np.frombuffer(whole.process(signal.tobytes()) + whole.flush(), "<i2")
    chunked = Resampler(in_rate, out_rate)
    step = in_rate // 50
    pieces = [chunked.process(signal[i : i + step].tobytes())
              for i in range(0, len(signal), step)]
    actual = np.frombuffer(b"".join(pieces) + chunked.flush(), "<i2")
    assert len(expected) == len(actual)
    # A few LSB of rounding (below -78 dBFS); an edge would be thousands.
    assert int(np.max(np.abs(expected.astype(int) - actual.astype(int)))) <= 4
    assert abs(len(actual) - out_rate) <= 1  # one second in, one second out
    # Without the state carried across chunks, every chunk edge would be a click.
    stateless = [Resampler(in_rate, out_rate) for _ in range(0, len(signal), step)]
    restarted = np.frombuffer(b"".join(
        r.process(signal[i : i + step].tobytes()) + r.flush()
        for r, i in zip(stateless, range(0, len(signal), step), strict=True)), "<i2")
    n = min(len(restarted), len(expected))
    assert int(np.max(np.abs(expected[:n].astype(int) - restarted[:n].astype(int)))) > 1000


def test_resampled_tone_keeps_its_frequency_and_level() -> None:
    resampler = Resampler(16000, 8000)
    out = np.frombuffer(resampler.process(sine(16000, 1.0).tobytes()) + resampler.flush(),
                        "<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(out))
    assert 440 == round(np.argmax(spectrum) * 8000 / len(out))
    steady = out[800:-800]
    assert abs(np.sqrt(np.mean(steady**2)) - 10000 / math.sqrt(2)) < 100


def test_same_rate_passes_through() -> None:
    resampler = Resampler(8000, 8000)
    assert b"\x01\x02" == resampler.process(b"\x01\x02")
    assert b"" == resampler.flush()
