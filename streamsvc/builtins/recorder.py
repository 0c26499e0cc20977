"""Built-in ``recorder``: one WAV file per stream, written as the call goes.

Options (``[handlers.recorder]``): ``dir`` (default ``recordings``), ``window_ms`` (audio
held in memory, default 2000), ``max_duration_s`` (longest recording, default 14400).

The file is PCM16 at 8 kHz: mono for one track, stereo for two (left inbound, right
outbound). The timeline comes from ``media.timestamp``: sample 0 is the stream's first media
frame, a frame lands at ``(timestamp - first_timestamp) * 8``, slots that never arrived stay
silent, and a late frame lands in its slot if it is no more than half of ``window_ms`` late
(older ones are counted as ``late_frames``). Only that window is held in memory; older audio
goes to ``<dir>/<call_sid>/<stream_sid>.wav.partial``, whose header is kept valid as it
grows. When the call ends, however it ends, the file is renamed to ``.wav`` next to
``<stream_sid>.json`` (ids, tracks, media format, custom parameters, the call summary). File
work runs in a thread, in order, from one task; frames are placed in the window in the
receive loop. A disk error (ENOSPC, EIO) stops the recorder for that call only: it
is logged (``recorder.disk_error``) and counted in ``handler_errors``; the call goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import orjson
import structlog

from streamsvc import wire
from streamsvc.audio import TWILIO_SAMPLE_RATE, mulaw_to_pcm16
from streamsvc.builtins.capture import safe_path_component
from streamsvc.handlers import AsyncHandler
from streamsvc.live import LiveSession
from streamsvc.session import CallSummary

__all__ = ["RecorderHandler"]

logger = structlog.get_logger("streamsvc.builtins.recorder")

SAMPLES_PER_MS: Final = TWILIO_SAMPLE_RATE // 1000
WAV_HEADER_BYTES: Final = 44
SILENCE_CHUNK_SAMPLES: Final = TWILIO_SAMPLE_RATE * 60  # write long gaps a minute at a time


class RecorderHandler(AsyncHandler):
    """Records the stream to a WAV file (see the module docstring)."""

    queue_size = 1500  # 15 s of two tracks
    batch_ms = 100  # nothing waits on a recording: wake up ten times a second, not fifty

    def __init__(self, *, dir: str = "recordings", window_ms: int = 2000,
                 max_duration_s: float = 4 * 3600) -> None:
        if window_ms < 20 or max_duration_s <= 0:
            raise ValueError("window_ms must be >= 20 and max_duration_s > 0")
        self.root = Path(dir)
        self.window_samples = window_ms * SAMPLES_PER_MS
        self.max_samples = int(max_duration_s * TWILIO_SAMPLE_RATE)
        self.channel_of: dict[str, int] = {}
        self.window = np.zeros((0, 1), dtype="<i2")
        self.window_start = 0  # sample index of window[0]
        self.end_sample = 0  # one past the last sample any frame covered
        self.first_timestamp_ms: int | None = None
        self.late_frames = 0  # frames too late for the window, or past max_duration_s
        self.wav: _WavFile | None = None
        self.path: Path | None = None
        # Audio leaving the window, written in order by one task at a time.
        self.writes: collections.deque[tuple[bytes, int]] = collections.deque()
        self.writer: asyncio.Task[None] | None = None
        self.failure: OSError | None = None  # the disk error that stopped this recording

    async def on_start(self, session: LiveSession) -> None:
        tracks = [t for t in ("inbound", "outbound") if t in session.tracks] or ["inbound"]
        self.channel_of = {track: channel for channel, track in enumerate(tracks)}
        self.window = np.zeros((self.window_samples, len(tracks)), dtype="<i2")
        folder = self.root / safe_path_component(session.call_sid)
        self.path = folder / f"{safe_path_component(session.stream_sid)}.wav"
        partial = self.path.with_suffix(".wav.partial")
        self.wav = await self._disk(_WavFile.create, partial, len(tracks))

    def on_media(self, frame: wire.Media) -> None:
        # Synchronous, so the chain calls it in the receive loop once on_start is done
        # (no task wake-up per frame); only whole chunks of the window go to the disk task.
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure  # once: the chain disables this recorder and counts the error
        channel = self.channel_of.get(frame.track)
        if channel is None or self.wav is None:
            return
        if self.first_timestamp_ms is None:
            self.first_timestamp_ms = frame.timestamp_ms
        position = (frame.timestamp_ms - self.first_timestamp_ms) * SAMPLES_PER_MS
        samples = np.frombuffer(mulaw_to_pcm16(frame.payload), dtype="<i2")
        end = position + len(samples)
        if position < self.window_start or end > self.max_samples:
            self.late_frames += 1
            return
        self._make_room(end)
        offset = position - self.window_start
        self.window[offset : offset + len(samples), channel] = samples
        self.end_sample = max(self.end_sample, end)

    def report(self) -> Mapping[str, Any] | None:
        if self.path is None:
            return None
        return {"file": str(self.path), "channels": len(self.channel_of),
                "late_frames": self.late_frames}

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        if self.writer is not None:
            await self.writer
        if self.failure is not None:
            raise self.failure
        if self.wav is None or self.path is None:
            return
        tail = self.window[: max(0, self.end_sample - self.window_start)]
        wav, self.wav = self.wav, None
        await self._disk(wav.finish, tail.tobytes(), self.path)
        sidecar = _sidecar(session, summary, self.path, self.end_sample, len(self.channel_of))
        await self._disk(_write_json, self.path.with_suffix(".json"), sidecar)

    def _make_room(self, end: int) -> None:
        """Send the oldest audio to the disk task until ``end`` fits in the window."""
        overflow = end - (self.window_start + self.window_samples)
        if overflow <= 0 or self.wav is None:
            return
        # Write half a window at a time, not a frame at a time: one write per second or so.
        overflow = max(overflow, self.window_samples // 2)
        if overflow >= self.window_samples:  # a gap longer than the window: all of it goes
            silence = overflow - self.window_samples
            self._write_later(self.window.tobytes(), silence)
            self.window[:] = 0
        else:
            self._write_later(self.window[:overflow].tobytes(), 0)
            self.window[:-overflow] = self.window[overflow:]
            self.window[-overflow:] = 0
        self.window_start += overflow

    def _write_later(self, audio: bytes, silent_samples: int) -> None:
        self.writes.append((audio, silent_samples))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write_all())

    async def _write_all(self) -> None:
        while self.writes and self.wav is not None:
            audio, silent_samples = self.writes.popleft()
            try:
                await self._disk(self.wav.append, audio, silent_samples)
            except OSError as exc:
                self.failure = exc
                self.writes.clear()

    async def _disk(self, function: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args)
        except OSError as exc:
            wav, self.wav = self.wav, None
            if wav is not None:
                wav.abandon()
            logger.error("recorder.disk_error", error=errno.errorcode.get(exc.errno or 0, ""),
                         message=exc.strerror, path=str(self.path))
            raise


class _WavFile:
    """A PCM16 8 kHz WAV file written in order, its header updated as it grows."""

    def __init__(self, file: IO[bytes], path: Path, channels: int) -> None:
        self.file = file
        self.path = path
        self.channels = channels
        self.data_bytes = 0

    @classmethod
    def create(cls, path: Path, channels: int) -> _WavFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("wb")
        wav = cls(file, path, channels)
        file.write(wav._header())
        return wav

    def append(self, audio: bytes, silent_samples: int) -> None:
        self.file.write(audio)
        self.data_bytes += len(audio)
        frame_bytes = 2 * self.channels
        while silent_samples > 0:
            count = min(silent_samples, SILENCE_CHUNK_SAMPLES)
            self.file.write(bytes(count * frame_bytes))
            self.data_bytes += count * frame_bytes
            silent_samples -= count
        self._update_header()

    def finish(self, audio: bytes, final_path: Path) -> None:
        self.append(audio, 0)
        self.file.close()
        os.replace(self.path, final_path)

    def abandon(self) -> None:
        # The disk error that brought us here may strike again on close.
        with contextlib.suppress(OSError):
            self.file.close()

    def _update_header(self) -> None:
        self.file.flush()
        self.file.seek(0)
        self.file.write(self._header())
        self.file.seek(0, os.SEEK_END)

    def _header(self) -> bytes:
        block_align = 2 * self.channels
        return b"".join((
            b"RIFF", struct.pack("<I", 36 + self.data_bytes), b"WAVE",
            b"fmt ", struct.pack("<IHHIIHH", 16, 1, self.channels, TWILIO_SAMPLE_RATE,
                                 TWILIO_SAMPLE_RATE * block_align, block_align, 16),
            b"data", struct.pack("<I", self.data_bytes),
        ))


def _sidecar(session: LiveSession, summary: CallSummary, path: Path, samples: int,
             channels: int) -> dict[str, Any]:
    media_format = session.media_format
    return {
        "call_sid": session.call_sid,
        "stream_sid": session.stream_sid,
        "account_sid": session.account_sid,
        "path": session.path,
        "tracks": list(session.tracks),
        "media_format": {
            "encoding": media_format.encoding,
            "sample_rate": media_format.sample_rate,
            "channels": media_format.channels,
        } if media_format else None,
        "custom_parameters": dict(session.custom_parameters),
        "recording": {"file": path.name, "channels": channels,
                      "sample_rate": TWILIO_SAMPLE_RATE, "samples": samples},
        "summary": summary.log_fields(),
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    os.replace(temporary, path)
