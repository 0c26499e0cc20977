"""Fixture sessions: recorded or synthesized streams that can be replayed at a server.

Two layouts are read (``docs/fixtures.md`` has the details):

* **streamsvc fixtures**, JSON Lines: a header ``{"streamsvc_fixture": 1, ...}`` (description,
  URL ``path``, ``expect``-ed outcome), then ``{"at_ms": <ms since the socket opened>,
  "frame": "<exact text frame>"}`` per frame, or ``{"at_ms": …, "binary": "<base64>"}`` for
  a binary frame (Vonage's audio), and optionally ``{"at_ms": …, "sent": "…"}`` (or
  ``"sent_binary"``) lines for what a server sent (kept for reading, not replayed).
* **raw captures**: one bare Twilio message per line, as many apps log them. Media are
  paced by ``media.timestamp``, other messages go in order; a line that is not JSON is still
  sent as a text frame (that is how garbage-in fixtures are written).

The frame text is kept byte for byte so replays exercise the parser on real layouts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from streamsvc import wire
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import codec_for

__all__ = ["FIXTURE_VERSION", "Fixture", "FixtureError", "FixtureFrame", "json_object",
           "load_fixture"]

FIXTURE_VERSION: Final = 1


class FixtureError(ValueError):
    """A fixture file cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class FixtureFrame:
    """One frame to send: ``at_ms`` after the socket opened, ``text`` exactly as recorded;
    a binary frame (Vonage's audio) has its bytes in ``binary`` and no text."""

    at_ms: float
    text: str
    binary: bytes | None = None


@dataclass(frozen=True, slots=True)
class Fixture:
    """A session to replay: its frames in order and the header's metadata."""

    name: str
    frames: tuple[FixtureFrame, ...]
    header: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str | None:
        """The URL path the fixture is meant for, if the header names one."""
        path = self.header.get("path")
        return path if isinstance(path, str) else None

    @property
    def expect(self) -> Mapping[str, Any]:
        """The expected outcome (ids, parameters, frame and gap counts), or {}."""
        expect = self.header.get("expect")
        return expect if isinstance(expect, dict) else {}

    @property
    def provider(self) -> str:
        """Whose frames these are: the header's ``provider`` (``twilio`` by default)."""
        provider = self.header.get("provider", "twilio")
        return provider if isinstance(provider, str) else "twilio"

    @property
    def headers(self) -> dict[str, str]:
        """Upgrade headers the provider sends with this stream (ACS's call ids), if any."""
        headers = self.header.get("headers")
        if not isinstance(headers, dict):
            return {}
        return {str(name): str(value) for name, value in headers.items()}

    def opening(self) -> tuple[wire.Codec, wire.Start] | None:
        """The first message that starts the stream, as the service's own codec for the
        fixture's provider reads it, and that codec (its encoding and rate); None when no
        message does (or the provider is not one the service knows)."""
        try:
            codec = codec_for(self.provider, wire.Upgrade.of("/", "", self.headers.items()))
        except ValueError:
            return None
        for frame in self.frames:
            if frame.binary is not None:
                continue  # audio: never the opening message
            try:
                event = codec.parse(frame.text)
            except (RemoteProtocolError, RecursionError):
                continue
            if isinstance(event, wire.Batch):  # a start with audio held before it
                event = event.events[0]
            if isinstance(event, wire.Start):
                return codec, event
        return None

    def _sent_id(self, read: Callable[[wire.Start], str | None]) -> str | None:
        """An id the opening message carries; None when there is none or the service makes
        one up (Vonage sends no stream id): an id two fresh reads disagree on is made up."""
        first, second = self.opening(), self.opening()
        if first is None or second is None:
            return None
        sent = read(first[1])
        return sent if sent == read(second[1]) else None

    def stream_sid(self) -> str | None:
        """The stream's id as its opening message gives it (Twilio's ``start.streamSid``,
        ACS's ``AudioMetadata.subscriptionId``, ...), if there is one (Vonage's: none)."""
        return self._sent_id(lambda start: start.started_stream_sid)

    def call_sid(self) -> str | None:
        """The call's id as its provider gives it (Twilio's ``start.callSid``, the ACS call
        connection id of the upgrade, Vonage's ``call_uuid`` header, ...), or None."""
        return self._sent_id(lambda start: start.call_sid)


def load_fixture(path: str | Path) -> Fixture:
    """Read a streamsvc fixture or a raw capture. Raises :class:`FixtureError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FixtureError(f"{path}: cannot read: {exc}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise FixtureError(f"{path}: empty")
    header = json_object(lines[0])
    if header is not None and "streamsvc_fixture" in header:
        return Fixture(path.name, _structured_frames(path, lines[1:]), header)
    if not any(_event_name(line) == "start" for line in lines):
        raise FixtureError(
            f"{path}: neither a streamsvc fixture (a first line like "
            '{"streamsvc_fixture": 1, ...}) nor a raw capture (one Twilio message per line, '
            'a {"event": "start", ...} among them)')
    return Fixture(path.name, tuple(_raw_frames(lines)), {})


def _event_name(line: str) -> object:
    message = json_object(line)
    return message.get("event") if message else None


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _structured_frames(path: Path, lines: list[str]) -> tuple[FixtureFrame, ...]:
    frames = []
    for number, line in enumerate(lines, start=2):
        entry = json_object(line)
        if entry is None or not isinstance(entry.get("at_ms"), int | float):
            raise FixtureError(f"{path}:{number}: expected {{\"at_ms\": ..., \"frame\": ...}}")
        if "sent" in entry or "sent_binary" in entry:
            continue
        if "binary" in entry:
            try:
                data = base64.b64decode(str(entry["binary"]), validate=True)
            except ValueError:
                raise FixtureError(f"{path}:{number}: `binary` must be base64") from None
            frames.append(FixtureFrame(float(entry["at_ms"]), "", data))
            continue
        if not isinstance(entry.get("frame"), str):
            raise FixtureError(f"{path}:{number}: `frame` must be the frame's text")
        frames.append(FixtureFrame(float(entry["at_ms"]), entry["frame"]))
    return tuple(frames)


def _raw_frames(lines: Iterable[str]) -> Iterable[FixtureFrame]:
    # Media are paced by their own timestamp (ms since the stream started); everything else
    # goes right after the frame before it.
    first_timestamp: float | None = None
    at_ms = 0.0
    for line in lines:
        timestamp = _media_timestamp(line)
        if timestamp is not None:
            if first_timestamp is None:
                first_timestamp = timestamp
            at_ms = max(at_ms, timestamp - first_timestamp)
        yield FixtureFrame(at_ms, line)


def _media_timestamp(line: str) -> float | None:
    message = json_object(line)
    if not message or message.get("event") != "media":
        return None
    media = message.get("media")
    try:
        return float(media["timestamp"]) if isinstance(media, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def dump_fixture(header: Mapping[str, Any], frames: Iterable[FixtureFrame]) -> str:
    """The streamsvc fixture text for ``header`` and ``frames`` (header gets the version)."""
    out = [json.dumps({"streamsvc_fixture": FIXTURE_VERSION, **header}, ensure_ascii=False)]
    out.extend(
        json.dumps({"at_ms": round(f.at_ms, 3), "binary": base64.b64encode(f.binary).decode()}
                   if f.binary is not None else {"at_ms": round(f.at_ms, 3), "frame": f.text},
                   ensure_ascii=False)
        for f in frames
    )
    return "\n".join(out) + "\n"
