"""Built-in ``capture``: writes every call on its route as a streamsvc fixture, so that a
real call on a deployed service becomes a fixture with one route setting.

Options (``[handlers.capture]``): ``dir`` (default ``captures``), ``flush_lines`` (lines
buffered before a write, default 100), ``file_mode`` (default ``"0640"``).

Each stream goes to ``<dir>/<call_sid>/<stream_sid>.jsonl``: while the call runs, frames are
appended to ``<stream_sid>.jsonl.partial`` (memory stays bounded); when it ends, the final
file is written with a header carrying the call's outcome as the fixture's ``expect``, and
the partial file is removed. Frames are kept exactly as received (``frame`` lines) or sent
(``sent`` lines); bytes that are not UTF-8 are replaced; binary frames (Vonage's audio) are
kept as base64 in ``binary`` / ``sent_binary`` lines. File work runs in a thread. A disk
error disables the capture for that call only (``handler.failed``); the call goes on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
import shutil
from pathlib import Path
from typing import IO, Any

import orjson

from streamsvc.builtins.files import (
    DEFAULT_FILE_MODE,
    claim,
    create_file,
    release,
    safe_path_component,
)
from streamsvc.builtins.files import file_mode as parse_file_mode
from streamsvc.handlers import AsyncHandler, RawFrame
from streamsvc.replay.fixture import FIXTURE_VERSION
from streamsvc.session import CallSummary, Session

__all__ = ["CaptureHandler", "safe_path_component"]


class CaptureHandler(AsyncHandler):
    """Records the call's frames as a fixture (see the module docstring)."""

    queue_size = 2000  # raw frames, not media: a capture should not drop
    batch_ms = 100  # nothing waits on a capture: fewer task wake-ups

    def __init__(self, *, dir: str = "captures", flush_lines: int = 100,
                 file_mode: int | str = DEFAULT_FILE_MODE) -> None:
        self.root = Path(dir)
        self.mode = parse_file_mode(file_mode, key="handlers.capture.file_mode")
        self.flush_lines = max(1, flush_lines)
        self.lines: list[bytes] = []
        self.final: Path | None = None  # claimed: no other live stream writes it
        self.partial: Path | None = None
        self.file: IO[bytes] | None = None

    async def on_start(self, session: Session) -> None:
        folder = self.root / safe_path_component(session.call_sid)
        self.final = claim(folder / f"{safe_path_component(session.stream_sid)}.jsonl")
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.file = await asyncio.to_thread(create_file, self.partial, self.mode, append=True)

    async def on_raw_frame(self, frame: RawFrame) -> None:
        if frame.binary:  # Vonage's audio: base64 in a `binary` (or `sent_binary`) line
            key = "sent_binary" if frame.sent else "binary"
            text = base64.b64encode(frame.text).decode()
        else:
            key = "sent" if frame.sent else "frame"
            text = frame.text.decode("utf-8", "replace")
        self.lines.append(orjson.dumps({"at_ms": round(frame.at_ms, 3), key: text}) + b"\n")
        if len(self.lines) >= self.flush_lines:
            await self._flush()

    async def on_stop(self, session: Session, summary: CallSummary) -> None:
        try:
            await self._complete(session, summary)
        finally:
            if self.final is not None:
                release(self.final)

    async def _complete(self, session: Session, summary: CallSummary) -> None:
        if self.file is None or self.partial is None:
            return
        await self._flush()
        file, self.file = self.file, None
        header = _header(session, summary)
        await asyncio.to_thread(_finish, file, self.partial, header, self.mode)

    async def _flush(self) -> None:
        lines, self.lines = self.lines, []
        if self.file is not None and lines:
            await asyncio.to_thread(self.file.writelines, lines)


def _header(session: Session, summary: CallSummary) -> dict[str, Any]:
    captured_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {
        "streamsvc_fixture": FIXTURE_VERSION,
        "description": f"Captured on {session.path} at {captured_at}",
        "path": session.path,
        # Replayed as the provider that sent it (a fixture without one is Twilio's).
        "provider": session.codec.provider,
        "captured_at": captured_at,
        "expect": {
            "call_sid": session.call_sid,
            "stream_sid": session.stream_sid,
            "account_sid": session.account_sid,
            "tracks": list(session.tracks),
            "custom_parameters": dict(session.custom_parameters),
            "frames": dict(summary.frames),
            "missing_frames": dict(summary.missing_frames),
            "out_of_order_frames": dict(summary.out_of_order_frames),
            "bad_frames": summary.bad_frames,
            "ignored_events": summary.ignored_events,
            "dtmf": summary.dtmf,
            # A replay ends by closing the socket unless the call ended with `stop`.
            "reason": "stop" if summary.reason == "stop" else "closed",
        },
    }


def _finish(file: IO[bytes], partial: Path, header: dict[str, Any], mode: int) -> None:
    file.close()
    final = partial.with_suffix("")  # drop .partial
    temporary = final.with_suffix(".jsonl.tmp")
    try:
        with create_file(temporary, mode) as out, partial.open("rb") as frames:
            out.write(orjson.dumps(header) + b"\n")
            shutil.copyfileobj(frames, out)
        os.replace(temporary, final)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    partial.unlink()
