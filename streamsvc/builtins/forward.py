"""Built-in ``forward``: the call's audio and events to a WebSocket service (speech-to-text,
an agent, a recorder elsewhere), one connection per call.

Options (``[handlers.forward]``): ``url`` (``ws://`` or ``wss://``, required), ``audio``
(``pcm16``: 16-bit little-endian PCM at the stream's rate on every provider, the default,
decoded as :meth:`~streamsvc.session.Session.pcm16` decodes it; or ``native``: the
payload bytes as they came, e.g. mu-law), ``tracks`` (default ``["inbound"]``),
``headers`` (added to the handshake, e.g. ``{Authorization = "Bearer ..."}``),
``max_queue_frames`` (audio frames held while the service is slow or away, default 500:
10 s of one track), ``reconnect_max_s`` (the longest wait between attempts, default 10),
``linger_s`` (how long after ``stop`` the service may go on answering before the
connection is closed, default 2), ``messages`` (``all``, the default: the JSON messages
below; ``none``: audio only, for services that take nothing else; one track then),
``close_message`` (a text message sent last, before the close, e.g.
``{"type":"CloseStream"}``, as some services want to flush their last result).

``url`` and ``headers`` are templates: ``{call_sid}``, ``{stream_sid}``, ``{provider}``,
``{sample_rate}``, ``{encoding}`` (what is sent: ``pcm16``, or the native ``mulaw``,
``alaw``) and any name of the call's context (``{customerId}``) are filled in as the call
starts (in the URL, URL-quoted; a context name the call does not have is left empty), so
``url = "wss://stt.example.com/listen?encoding=linear16&sample_rate={sample_rate}"``.

What the service receives, in order:

* a text message ``{"event": "start", "call_sid", "stream_sid", "account_sid", "tracks",
  "media_format", "custom_parameters", "audio": {"encoding", "sample_rate",
  "native_encoding"}}`` (``sample_rate``: the stream's own; ``native_encoding``: what
  ``native`` sends, ``mulaw`` or ``pcm16``), again after
  every reconnection;
* each audio frame of the chosen tracks as one **binary** message (20 ms); with several
  tracks, each is preceded by a text ``{"event": "track", "track": ...}`` when it changes;
* ``{"event": "dtmf", "digit"}``, ``{"event": "mark", "name"}`` as they come;
* ``{"event": "stop", "reason"}`` when the call ends; the service may still answer (a last
  transcript) until it closes the connection, or ``linger_s`` has passed.

The call never waits for the service: frames go into a bounded queue that one task per
call sends (audio waits there while the connection is being made); when the queue is full,
or when a connection is lost, audio is dropped and counted (``dropped_frames`` in the call
summary). A lost connection is retried with exponential
backoff (0.25 s doubling to ``reconnect_max_s``) until the call ends. What the service sends
back goes to :meth:`ForwardHandler.on_message` (subclass it: ``examples/stt_forward.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import string
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, urlsplit

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from streamsvc import wire
from streamsvc.handlers import AsyncHandler
from streamsvc.live import LiveSession
from streamsvc.session import CallSummary

__all__ = ["ForwardHandler"]

logger = structlog.get_logger("streamsvc.builtins.forward")

FIRST_RETRY_S: Final = 0.25
CONNECT_TIMEOUT_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0  # a service that does not answer the close is dropped
# Largest message accepted from the service (transcripts, agent commands).
MAX_MESSAGE_BYTES: Final = 1 << 20
_STOP: Final = object()  # the sender's last item


class ForwardHandler(AsyncHandler):
    """Forwards the call to ``url`` (see the module docstring)."""

    def __init__(self, *, url: str, audio: str = "pcm16",
                 tracks: list[str] | tuple[str, ...] = ("inbound",),
                 headers: Mapping[str, str] | None = None, max_queue_frames: int = 500,
                 reconnect_max_s: float = 10.0, linger_s: float = 2.0,
                 messages: str = "all", close_message: str | None = None) -> None:
        for template in (url, *(headers or {}).values()):
            _check_template(template)
        parts = urlsplit(_fill(url, {}, quote_values=True))
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url must be ws:// or wss://HOST/PATH, got {url!r}")
        if audio not in ("pcm16", "native"):
            raise ValueError(f"audio must be pcm16 or native, got {audio!r}")
        if max_queue_frames < 1 or reconnect_max_s <= 0 or linger_s < 0:
            raise ValueError("max_queue_frames must be >= 1, reconnect_max_s > 0 and "
                             "linger_s >= 0")
        if messages not in ("all", "none"):
            raise ValueError(f"messages must be all or none, got {messages!r}")
        if messages == "none" and len(set(tracks)) > 1:
            raise ValueError("messages = none sends audio only: one track (nothing would "
                             "tell the tracks apart)")
        if close_message is not None and not isinstance(close_message, str):
            raise ValueError("close_message must be text")
        self.url_template = self.url = url
        self.header_templates = dict(headers or {})
        self.messages = messages == "all"
        self.close_message = close_message
        self.where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # no query: may hold keys
        self.pcm16 = audio == "pcm16"
        self.tracks = frozenset(tracks)
        self.headers = dict(headers or {})
        self.max_queue_frames = max_queue_frames
        self.reconnect_max_s = reconnect_max_s
        self.linger_s = linger_s
        self.outbox: collections.deque[bytes | str | object] = collections.deque()
        self.queued_frames = 0
        self.wakeup = asyncio.Event()
        self.start_message = ""
        self.last_track: str | None = None
        self.sender: asyncio.Task[None] | None = None
        self.session: LiveSession | None = None  # set by on_start, before any on_media
        self.away = False  # the latest connection attempt failed
        self.frames_sent = 0
        self.dropped_frames = 0
        self.reconnects = 0
        self.messages_received = 0

    # What the service sends back: override.

    async def on_message(self, message: str | bytes) -> None:
        """A message from the service (a transcript, an instruction). Runs in the
        connection's reader; the default only counts it."""

    # The handler API.

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """ValueError for options no call could run with (read at start-up)."""
        cls(**options)

    async def on_start(self, session: LiveSession) -> None:
        media_format = session.media_format
        sample_rate = media_format.sample_rate if media_format else 8000
        values = {**session.context, "call_sid": session.call_sid or "",
                  "stream_sid": session.stream_sid or "", "provider": session.provider,
                  "sample_rate": str(sample_rate),
                  "encoding": "pcm16" if self.pcm16 else session.encoding}
        self.url = _fill(self.url_template, values, quote_values=True)
        parts = urlsplit(self.url)
        self.where = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.headers = {name: _fill(value, values) for name, value in
                        self.header_templates.items()}
        self.start_message = orjson.dumps({
            "event": "start", "call_sid": session.call_sid, "stream_sid": session.stream_sid,
            "account_sid": session.account_sid, "tracks": list(session.tracks),
            "media_format": {"encoding": media_format.encoding, "sample_rate": sample_rate,
                             "channels": media_format.channels} if media_format else None,
            "custom_parameters": dict(session.custom_parameters),
            "audio": {"encoding": "pcm16" if self.pcm16 else "native",
                      "sample_rate": sample_rate,
                      "native_encoding": session.codec.native_encoding},
        }).decode()
        self.session = session
        self.sender = asyncio.get_running_loop().create_task(self._send_forever())

    def on_media(self, frame: wire.Media) -> None:
        # Plain def: called in the receive loop; only queues.
        if frame.track not in self.tracks:
            return
        if self.queued_frames >= self.max_queue_frames:
            self.dropped_frames += 1
            return
        if self.messages and len(self.tracks) > 1 and frame.track != self.last_track:
            self.last_track = frame.track
            self._queue(orjson.dumps({"event": "track", "track": frame.track}).decode())
        self.queued_frames += 1
        if self.pcm16:  # PCM16 at the stream's rate whatever the provider sends
            assert self.session is not None  # the chain runs on_start first
            self._queue(self.session.pcm16(frame))
        else:
            self._queue(frame.payload)

    async def on_dtmf(self, event: wire.Dtmf) -> None:
        if self.messages:
            self._queue(orjson.dumps({"event": "dtmf", "digit": event.digit}).decode())

    async def on_mark(self, event: wire.Mark) -> None:
        if self.messages:
            self._queue(orjson.dumps({"event": "mark", "name": event.name}).decode())

    async def before_report(self, summary: CallSummary) -> None:
        # Send what is queued and the stop, so that the call summary counts them.
        if self.sender is None:
            return
        if self.away:  # the last attempt failed: nothing more will reach the service
            self.sender.cancel()
            self._drop_audio()
            return
        if self.messages:
            self._queue(orjson.dumps({"event": "stop", "reason": summary.reason}).decode())
        if self.close_message is not None:
            self._queue(self.close_message)
        self._queue(_STOP)
        with contextlib.suppress(asyncio.CancelledError):
            await self.sender

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        if self.sender is not None:
            self.sender.cancel()  # before_report ran out of time

    def report(self) -> Mapping[str, Any]:
        return {"url": self.where, "frames_sent": self.frames_sent,
                "dropped_frames": self.dropped_frames, "reconnects": self.reconnects,
                "messages_received": self.messages_received}

    # The connection.

    def _queue(self, item: bytes | str | object) -> None:
        self.outbox.append(item)
        self.wakeup.set()

    async def _send_forever(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            try:
                async with connect(self.url, additional_headers=self.headers,
                                   open_timeout=CONNECT_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                                   compression=None,
                                   max_size=MAX_MESSAGE_BYTES) as connection:
                    delay = FIRST_RETRY_S
                    if await self._serve(connection):
                        return
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed) as exc:
                self.away = True
                self._drop_audio()
                if self.outbox and self.outbox[-1] is _STOP:
                    return  # the call ended while the service was away
                self.reconnects += 1
                if self.reconnects == 1 or self.reconnects % 10 == 0:
                    logger.warning("forward.disconnected", url=self.where, error=str(exc),
                                   reconnects=self.reconnects, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_s)

    async def _serve(self, connection: ClientConnection) -> bool:
        """Send the queue over one connection; True once the call's stop was sent."""
        reader = asyncio.get_running_loop().create_task(self._read(connection))
        try:
            if self.messages:
                await connection.send(self.start_message)
            self.away = False
            self.last_track = None
            while True:
                while not self.outbox:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                item = self.outbox.popleft()
                if item is _STOP:
                    # Let the service answer what it still owes (the last transcript)
                    # and close first, for a moment; then close.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), self.linger_s)
                    await connection.close()
                    return True
                if isinstance(item, bytes):
                    self.queued_frames -= 1
                    self.frames_sent += 1
                assert isinstance(item, bytes | str)
                await connection.send(item)
        finally:
            reader.cancel()

    async def _read(self, connection: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in connection:
                self.messages_received += 1
                try:
                    await self.on_message(message)
                except Exception:
                    logger.exception("forward.on_message_failed", url=self.where)

    def _drop_audio(self) -> None:
        """The service is away: audio waiting for it is dropped (events are kept)."""
        kept = [item for item in self.outbox if not isinstance(item, bytes)]
        self.dropped_frames += self.queued_frames
        self.queued_frames = 0
        self.outbox = collections.deque(kept)


_formatter: Final = string.Formatter()


def _check_template(template: object) -> None:
    """ValueError unless ``template`` is text whose ``{fields}`` are plain names."""
    if not isinstance(template, str):
        raise ValueError(f"url and header values must be text, got {template!r}")
    try:
        for _, field, spec, conversion in _formatter.parse(template):
            if field is not None and (not field.isidentifier() or spec or conversion):
                raise ValueError(f"{{{field}}} in {template!r}: a template names a call "
                                 "field or a context name, nothing more")
    except ValueError as exc:
        raise ValueError(f"not a template: {exc}") from None


def _fill(template: str, values: Mapping[str, str], *, quote_values: bool = False) -> str:
    """``template`` with its ``{fields}`` from ``values`` (missing: empty), URL-quoted."""
    parts = []
    for literal, field, _, _ in _formatter.parse(template):
        parts.append(literal)
        if field is not None:
            value = str(values.get(field, ""))
            parts.append(quote(value, safe="") if quote_values else value)
    return "".join(parts)
