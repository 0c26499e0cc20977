"""Built-in ``recorder``: one WAV file per stream, written as the call goes.

Options (``[handlers.recorder]``): ``dir`` (default ``recordings``), ``window_ms`` (audio
held in memory, default 2000), ``max_duration_s`` (longest recording, default 14400),
``max_gap_ms`` (the most silence one jump in the timestamps may write, default 60000),
``file_mode`` (default ``"0640"``).

The file is PCM16 at the stream's rate (Twilio: 8 kHz; ACS: 16 or 24 kHz): mono for
one track, stereo for two (left inbound, right outbound); unmixed ACS participants are
mixed down into one channel. On a bidirectional (``<Connect>``) route, where Twilio
streams only the caller, the right channel is what the service played back: each piece
of audio sent starts where the caller's timeline is when it is sent (or where the audio
before it ends), a ``clear`` drops what was not yet played. The timeline comes from
``media.timestamp``: sample 0 is the stream's first media frame
(``recording.first_timestamp_ms`` in the sidecar), a frame lands at ``(timestamp -
first_timestamp_ms) * rate / 1000``, slots that never arrived stay silent (one jump writes
at most ``max_gap_ms`` of silence: the rest of it is counted in ``gaps_capped`` and later
audio follows on), and a late frame lands in its slot if it is no more than half of
``window_ms`` late (older ones are counted as ``late_frames``; frames longer than half the
window as ``oversized_frames``). Only that window is held in memory; older audio
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

import msgspec
import numpy as np
import orjson
import structlog

from streamsvc import wire
from streamsvc.audio import SAMPLE_BYTES, TWILIO_SAMPLE_RATE, to_pcm16
from streamsvc.builtins.files import (
    DEFAULT_FILE_MODE,
    claim,
    create_file,
    file_mode,
    release,
    safe_path_component,
    write_atomically,
)
from streamsvc.handlers import AsyncHandler
from streamsvc.live import LiveSession
from streamsvc.session import CallSummary

__all__ = ["RecorderHandler"]

logger = structlog.get_logger("streamsvc.builtins.recorder")

WAV_HEADER_BYTES: Final = 44
SILENCE_CHUNK_SECONDS: Final = 60  # long gaps are written a minute at a time
# A WAV file's channels: Twilio's two tracks, or up to this many ACS participants.
MAX_CHANNELS: Final = 8
# Audio the service queued to play and the caller has not heard yet: Twilio's own buffer
# holds what was sent ahead; beyond five minutes of it, the rest is not recorded (counted).
MAX_PLAYBACK_SECONDS: Final = 300


class RecorderHandler(AsyncHandler):
    """Records the stream to a WAV file (see the module docstring)."""

    queue_size = 1500  # 15 s of two tracks
    batch_ms = 100  # nothing waits on a recording: wake up ten times a second, not fifty

    def __init__(self, *, dir: str = "recordings", window_ms: int = 2000,
                 max_duration_s: float = 4 * 3600, max_gap_ms: int = 60_000,
                 file_mode: int | str = DEFAULT_FILE_MODE) -> None:
        if window_ms < 20 or max_duration_s <= 0 or max_gap_ms < 20:
            raise ValueError("window_ms and max_gap_ms must be >= 20 and max_duration_s > 0")
        self.root = Path(dir)
        self.mode = _mode(file_mode)
        self.window_ms, self.max_duration_s, self.max_gap_ms = window_ms, max_duration_s, max_gap_ms
        self._timeline(TWILIO_SAMPLE_RATE)  # set again by on_start, at the stream's rate
        self.skipped_samples = 0  # silence not written: jumps over max_gap_ms
        self.gaps_capped = 0
        self.oversized_frames = 0
        # What the service plays (bidirectional routes): its channel, and the audio queued
        # and not yet in the window, as [start sample, samples] pieces in order.
        self.playback_channel: int | None = None
        self.playback: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self.playback_queued = 0  # samples in self.playback
        self.playback_end = 0  # where the audio queued so far ends
        self.playback_dropped_samples = 0
        self.channel_of: dict[str, int] = {}
        self.encoding = "mulaw"  # the stream's native audio (set again by on_start)
        self.bytes_per_sample = 1
        # The window: one PCM16 plane per channel (a slice assignment per frame, no array
        # objects), interleaved only when a chunk goes to the disk.
        self.planes: list[bytearray] = []
        self.window_start = 0  # sample index of the planes' first sample
        self.end_sample = 0  # one past the last sample any frame covered
        self.first_timestamp_ms: int | None = None
        self.late_frames = 0  # frames too late for the window, or past max_duration_s
        self.wav: _WavFile | None = None
        self.path: Path | None = None
        # Audio leaving the window, written in order by one task at a time.
        self.writes: collections.deque[tuple[bytes, int]] = collections.deque()
        self.writer: asyncio.Task[None] | None = None
        self.failure: OSError | None = None  # the disk error that stopped this recording

    def _timeline(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.samples_per_ms = sample_rate // 1000
        self.window_samples = self.window_ms * self.samples_per_ms
        self.max_samples = int(self.max_duration_s * sample_rate)
        self.max_gap_samples = self.max_gap_ms * self.samples_per_ms
        self.max_playback_samples = MAX_PLAYBACK_SECONDS * sample_rate

    async def on_start(self, session: LiveSession) -> None:
        self.session = session
        self._timeline(session.sample_rate)
        self.encoding = session.codec.native_encoding
        self.bytes_per_sample = SAMPLE_BYTES.get(self.encoding, 2)
        # Twilio's two tracks, or an ACS stream's (mixed: inbound; unmixed: the first
        # participants, in the order they speak, up to the channels a WAV file can take).
        tracks = sorted(session.tracks[:MAX_CHANNELS],
                        key=lambda track: ("inbound", "outbound", track).index(track))
        tracks = tracks or ["inbound"]
        # Unmixed ACS audio names its participants only as they speak: they are mixed
        # down into the one channel (each stays a track of its own in the counters).
        self.mix_down = not session.tracks
        self.channel_of = {track: channel for channel, track in enumerate(tracks)}
        channels = len(tracks)
        if session.bidirectional and "outbound" not in self.channel_of:
            self.playback_channel = channels  # right: what the service plays
            channels += 1
        self.planes = [bytearray(2 * self.window_samples) for _ in range(channels)]
        folder = self.root / safe_path_component(session.call_sid)
        self.path = claim(folder / f"{safe_path_component(session.stream_sid)}.wav")
        partial = self.path.with_suffix(".wav.partial")
        self.wav = await self._disk(_WavFile.create, partial, channels, self.sample_rate,
                                    self.mode)

    def on_media(self, frame: wire.Media) -> None:
        # Synchronous, so the chain calls it in the receive loop once on_start is done
        # (no task wake-up per frame); only whole chunks of the window go to the disk task.
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure  # once: the chain disables this recorder and counts the error
        body = frame.media  # the parsed fields: cheaper than the properties
        channel = 0 if self.mix_down else self.channel_of.get(body.track)
        if channel is None or self.wav is None:
            return
        samples = len(body.payload) // self.bytes_per_sample
        if samples > self.window_samples // 2:  # a 20 ms frame is 160 to 480 samples
            self.oversized_frames += 1
            return
        first = self.first_timestamp_ms
        if first is None:
            position = self._position(body.timestamp)
        else:  # the usual case of _position, inline
            position = (body.timestamp - first) * self.samples_per_ms - self.skipped_samples
            if position - self.end_sample > self.max_gap_samples:
                position = self._position(body.timestamp)
        end = position + samples
        if position < self.window_start or end > self.max_samples:
            self.late_frames += 1
            return
        if end > self.window_start + self.window_samples:
            self._make_room(end)
        start = 2 * (position - self.window_start)
        audio = to_pcm16(body.payload, self.encoding)
        plane = self.planes[channel]
        if self.mix_down and plane.count(0, start, start + len(audio)) != len(audio):
            # Another participant spoke in these samples: add, clipped.
            mixed = np.frombuffer(plane, dtype="<i2", count=samples, offset=start)
            audio = np.clip(mixed.astype("<i4") + np.frombuffer(audio, dtype="<i2"),
                            -32768, 32767).astype("<i2").tobytes()
        plane[start : start + len(audio)] = audio
        if end > self.end_sample:
            self.end_sample = end
        if self.playback_channel is not None:
            self._play_until(self.end_sample)

    def _position(self, timestamp_ms: int) -> int:
        """The sample a frame at ``timestamp_ms`` starts at; a jump past ``max_gap_ms``
        beyond the audio so far is shortened to it (the rest counted, not written)."""
        if self.first_timestamp_ms is None:
            self.first_timestamp_ms = timestamp_ms
        position = (timestamp_ms - self.first_timestamp_ms) * self.samples_per_ms
        position -= self.skipped_samples
        gap = position - self.end_sample
        if gap > self.max_gap_samples:
            self.gaps_capped += 1
            self.skipped_samples += gap - self.max_gap_samples
            position -= gap - self.max_gap_samples
        return position

    # What the service plays (PlaybackObserver), on bidirectional routes. The chain
    # registers the recorder before any on_start runs, so these may come before on_start;
    # and while the recorder's queue lags, so positions come from the session's own clock.

    def audio_sent(self, pcm16: bytes, heard_ms: int) -> None:
        """Queue ``pcm16`` on the playback channel after what was queued before, starting
        no earlier than where the caller's audio was when it was sent."""
        start = max(self.playback_end, self._timeline_position(heard_ms))
        room = self.max_playback_samples - self.playback_queued
        samples = np.frombuffer(pcm16, dtype="<i2")
        if room < len(samples):
            self.playback_dropped_samples += len(samples) - max(room, 0)
            samples = samples[: max(room, 0)]
        if len(samples):
            self.playback.append((start, samples))
            self.playback_queued += len(samples)
            self.playback_end = start + len(samples)

    def audio_cleared(self, heard_ms: int) -> None:
        """``clear``: what was queued and not yet heard when it came is never played."""
        cut = self._timeline_position(heard_ms)
        while self.playback and self.playback[-1][0] >= cut:
            self.playback_queued -= len(self.playback.pop()[1])
        if self.playback:
            start, samples = self.playback[-1]
            if start + len(samples) > cut:
                self.playback[-1] = (start, samples[: cut - start])
                self.playback_queued -= start + len(samples) - cut
        self.playback_end = cut

    def _timeline_position(self, heard_ms: int) -> int:
        return max(0, heard_ms * self.samples_per_ms - self.skipped_samples)

    def _play_until(self, end: int) -> None:
        """Move the queued playback that the caller's timeline has reached (up to ``end``)
        into the window."""
        assert self.playback_channel is not None
        while self.playback and self.playback[0][0] < end:
            start, samples = self.playback.popleft()
            count = min(len(samples), end - start)
            offset = 2 * (start - self.window_start)
            if offset >= 0:
                plane = self.planes[self.playback_channel]
                plane[offset : offset + 2 * count] = samples[:count].tobytes()
            if count < len(samples):
                self.playback.appendleft((start + count, samples[count:]))
            self.playback_queued -= count

    def report(self) -> Mapping[str, Any] | None:
        if self.path is None:
            return None
        report: dict[str, Any] = {
            "file": str(self.path), "channels": len(self.planes),
            "late_frames": self.late_frames, "oversized_frames": self.oversized_frames,
            "gaps_capped": self.gaps_capped}
        if self.playback_channel is not None:
            report["playback_dropped_ms"] = self.playback_dropped_samples // self.samples_per_ms
        return report

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        try:
            await self._finish(session, summary)
        finally:
            if self.path is not None:
                release(self.path)

    async def _finish(self, session: LiveSession, summary: CallSummary) -> None:
        if self.writer is not None:
            await self.writer
        if self.failure is not None:
            raise self.failure
        if self.wav is None or self.path is None:
            return
        tail = self._interleave(max(0, self.end_sample - self.window_start))
        wav, self.wav = self.wav, None
        await self._disk(wav.finish, tail, self.path)
        recording = {"file": self.path.name, "channels": len(self.planes),
                     "sample_rate": self.sample_rate, "samples": self.end_sample,
                     "first_timestamp_ms": self.first_timestamp_ms,
                     "skipped_ms": self.skipped_samples // self.samples_per_ms,
                     "channel_tracks": self._channel_tracks()}
        sidecar = orjson.dumps(_sidecar(session, summary, recording), option=orjson.OPT_INDENT_2)
        await self._disk(write_atomically, self.path.with_suffix(".json"), sidecar, self.mode)

    def _channel_tracks(self) -> list[str]:
        tracks = sorted(self.channel_of, key=self.channel_of.__getitem__)
        return tracks + (["playback"] if self.playback_channel is not None else [])

    def _make_room(self, end: int) -> None:
        """Send the oldest audio to the disk task until ``end`` fits in the window."""
        overflow = end - (self.window_start + self.window_samples)
        if overflow <= 0 or self.wav is None:
            return
        # Write half a window at a time, not a frame at a time: one write per second or so.
        overflow = max(overflow, self.window_samples // 2)
        if overflow >= self.window_samples:  # a gap longer than the window: all of it goes
            silence = overflow - self.window_samples
            self._write_later(self._interleave(self.window_samples), silence)
            for plane in self.planes:
                plane[:] = bytes(len(plane))
        else:
            self._write_later(self._interleave(overflow), 0)
            for plane in self.planes:
                del plane[: 2 * overflow]  # O(1): a bytearray drops its head in place
                plane.extend(bytes(2 * overflow))
        self.window_start += overflow

    def _interleave(self, samples: int) -> bytes:
        """The window's first ``samples`` samples of every channel, as WAV frames."""
        if len(self.planes) == 1:
            return bytes(self.planes[0][: 2 * samples])
        columns = [np.frombuffer(plane, dtype="<i2", count=samples) for plane in self.planes]
        return np.column_stack(columns).tobytes()

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
    """A PCM16 WAV file written in order, its header updated as it grows."""

    def __init__(self, file: IO[bytes], path: Path, channels: int, sample_rate: int) -> None:
        self.file = file
        self.path = path
        self.channels = channels
        self.sample_rate = sample_rate
        self.data_bytes = 0

    @classmethod
    def create(cls, path: Path, channels: int, sample_rate: int, mode: int) -> _WavFile:
        file = create_file(path, mode)
        wav = cls(file, path, channels, sample_rate)
        file.write(wav._header())
        return wav

    def append(self, audio: bytes, silent_samples: int) -> None:
        self.file.write(audio)
        self.data_bytes += len(audio)
        frame_bytes = 2 * self.channels
        while silent_samples > 0:
            count = min(silent_samples, SILENCE_CHUNK_SECONDS * self.sample_rate)
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
            b"fmt ", struct.pack("<IHHIIHH", 16, 1, self.channels, self.sample_rate,
                                 self.sample_rate * block_align, block_align, 16),
            b"data", struct.pack("<I", self.data_bytes),
        ))


def _mode(value: int | str) -> int:
    return file_mode(value, key="handlers.recorder.file_mode")


def _sidecar(session: LiveSession, summary: CallSummary,
             recording: dict[str, Any]) -> dict[str, Any]:
    media_format = session.media_format
    return {
        "call_sid": session.call_sid,
        "stream_sid": session.stream_sid,
        "account_sid": session.account_sid,
        "path": session.path,
        "tracks": list(session.tracks),
        "media_format": msgspec.structs.asdict(media_format) if media_format else None,
        "custom_parameters": dict(session.custom_parameters),
        "recording": recording,
        "summary": summary.log_fields(),
    }
