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
``{"type":"CloseStream"}``, as some services want to flush their last result),
``batch_ms`` (audio per binary message: 20, the default, sends each frame as it comes;
a multiple of 20 up to 1000, e.g. 100, gathers that much of a track into one message, for
services that accept larger ones: fewer messages, less CPU, that much more delay),
``client`` (``auto``, the default: picows' compiled client where it is installed, as it is
by default, else websockets; ``picows``; ``websockets``).

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
* each audio frame of the chosen tracks as one **binary** message (20 ms, or ``batch_ms``);
  with several tracks, each is preceded by a text ``{"event": "track", "track": ...}`` when
  it changes;
* ``{"event": "dtmf", "digit"}``, ``{"event": "mark", "name"}`` as they come;
* ``{"event": "stop", "reason"}`` when the call ends; the service may still answer (a last
  transcript) until it closes the connection, or ``linger_s`` has passed.

The call never waits for the service. With picows, audio is converted in the receive loop
itself, as it comes, and written with every call's other writes of that turn of the event
loop, back to back at its end: no queue, no task switch per frame (when the service reads
slower than the call speaks, up to ``max_queue_frames`` of audio waits in the socket's
buffer, then frames are dropped and counted). While the connection
is being made, and with websockets, frames wait in a bounded queue that one task per call
sends. When the queue is full, or when a connection is lost, audio is dropped and counted
(``dropped_frames`` in the call summary). A lost connection is retried with exponential
backoff (0.25 s doubling to ``reconnect_max_s``) until the call ends. What the service sends
back goes to :meth:`ForwardHandler.on_message` (subclass it: ``examples/stt_forward.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import string
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import quote, urlsplit

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from streamsvc import wire
from streamsvc.audio import SAMPLE_BYTES, alaw_to_pcm16, mulaw_to_pcm16
from streamsvc.handlers import AsyncHandler
from streamsvc.live import LiveSession
from streamsvc.session import CallSummary

if TYPE_CHECKING:
    from picows import WSFrame, WSMsgType, WSTransport

__all__ = ["ForwardHandler"]

logger = structlog.get_logger("streamsvc.builtins.forward")

FIRST_RETRY_S: Final = 0.25
CONNECT_TIMEOUT_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0  # a service that does not answer the close is dropped
# Largest message accepted from the service (transcripts, agent commands).
MAX_MESSAGE_BYTES: Final = 1 << 20
# Messages from the service waiting for on_message; beyond, they are dropped and counted.
MAX_PENDING_MESSAGES: Final = 256
FRAME_MS: Final = 20
_STOP: Final = object()  # the sender's last item
_PICOWS: Final = importlib.util.find_spec("picows") is not None
# A native encoding to PCM16 (PCM16 needs nothing).
_DECODERS: Final[dict[str, Callable[[bytes], bytes]]] = {
    "mulaw": mulaw_to_pcm16, "alaw": alaw_to_pcm16}


class _Link(Protocol):
    """One open connection to the service."""

    direct: bool  # send() may be called from the receive loop (picows)

    async def send(self, item: bytes | str) -> None: ...

    def send_now(self, item: bytes | str) -> None: ...

    def buffered(self) -> int: ...

    async def closed(self) -> None: ...

    async def close(self) -> None: ...


class ForwardHandler(AsyncHandler):
    """Forwards the call to ``url`` (see the module docstring)."""

    def __init__(self, *, url: str, audio: str = "pcm16",
                 tracks: list[str] | tuple[str, ...] = ("inbound",),
                 headers: Mapping[str, str] | None = None, max_queue_frames: int = 500,
                 reconnect_max_s: float = 10.0, linger_s: float = 2.0,
                 messages: str = "all", close_message: str | None = None,
                 batch_ms: int = FRAME_MS, client: str = "auto") -> None:
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
        if (not isinstance(batch_ms, int) or isinstance(batch_ms, bool)
                or not FRAME_MS <= batch_ms <= 1000 or batch_ms % FRAME_MS):
            raise ValueError(f"batch_ms must be a multiple of 20 from 20 to 1000, got "
                             f"{batch_ms!r}")
        if client not in ("auto", "picows", "websockets"):
            raise ValueError(f"client must be auto, picows or websockets, got {client!r}")
        if client == "picows" and not _PICOWS:
            raise ValueError("client = picows, but picows is not installed "
                             "(pip install picows, or client = auto)")
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
        # Not batch_ms: that name is AsyncHandler's (how long its queue gathers).
        self.frames_per_message = batch_ms // FRAME_MS
        self.client = "picows" if client == "auto" and _PICOWS else (
            "websockets" if client == "auto" else client)
        self.outbox: collections.deque[tuple[bytes | str | object, int]] = collections.deque()
        self.queued_frames = 0
        self.wakeup = asyncio.Event()
        self.start_message = ""
        self.last_track: str | None = None
        self.sender: asyncio.Task[None] | None = None
        self.session: LiveSession | None = None  # set by on_start, before any on_media
        self.encoding = "pcm16"  # the stream's own, set by on_start
        self.direct: _Link | None = None  # open, caught up, sends from the receive loop
        self.decode: Callable[[bytes], bytes] | None = None  # to PCM16, when it is needed
        self.track_messages = False  # a text message says which track the audio is
        self.max_buffered_bytes = 0  # what the socket may hold for the service (on_start)
        self.gathered: dict[str, tuple[bytearray, list[int]]] = {}  # batch_ms: per track
        self.away = False  # the latest connection attempt failed
        self.frames_sent = 0
        self.messages_sent = 0
        self.dropped_frames = 0
        self.reconnects = 0
        self.messages_received = 0
        self.messages_dropped = 0

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
        self.encoding = session.codec.native_encoding
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
        bytes_per_frame = sample_rate * FRAME_MS // 1000 * (
            2 if self.pcm16 else SAMPLE_BYTES.get(self.encoding, 2))
        self.max_buffered_bytes = self.max_queue_frames * bytes_per_frame
        if self.pcm16 and self.encoding in _DECODERS:
            self.decode = _DECODERS[self.encoding]
        self.track_messages = self.messages and len(self.tracks) > 1
        self.session = session
        self.sender = asyncio.get_running_loop().create_task(self._send_forever())

    def on_media(self, frame: wire.Media) -> None:
        # Plain def: called in the receive loop. With picows, sends from here.
        track = frame.track
        if track not in self.tracks:
            return
        if self.frames_per_message == 1:
            self._audio(track, frame.payload, 1)
            return
        gathered = self.gathered.get(track)
        if gathered is None:
            gathered = self.gathered[track] = (bytearray(), [0])
        audio, count = gathered
        audio += frame.payload
        count[0] += 1
        if count[0] >= self.frames_per_message:
            self._audio(track, bytes(audio), count[0])
            audio.clear()
            count[0] = 0

    async def on_dtmf(self, event: wire.Dtmf) -> None:
        if self.messages:
            self._put(orjson.dumps({"event": "dtmf", "digit": event.digit}).decode())

    async def on_mark(self, event: wire.Mark) -> None:
        if self.messages:
            self._put(orjson.dumps({"event": "mark", "name": event.name}).decode())

    async def before_report(self, summary: CallSummary) -> None:
        # Send what is gathered or queued and the stop, so that the summary counts them.
        if self.sender is None:
            return
        for track, (audio, count) in self.gathered.items():
            if count[0]:
                self._audio(track, bytes(audio), count[0])
        self.gathered.clear()
        if self.away:  # the last attempt failed: nothing more will reach the service
            self.sender.cancel()
            self._drop_audio()
            return
        if self.messages:
            self._put(orjson.dumps({"event": "stop", "reason": summary.reason}).decode())
        if self.close_message is not None:
            self._put(self.close_message)
        self.outbox.append((_STOP, 0))
        self.wakeup.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sender

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        if self.sender is not None:
            self.sender.cancel()  # before_report ran out of time

    def report(self) -> Mapping[str, Any]:
        return {"url": self.where, "frames_sent": self.frames_sent,
                "dropped_frames": self.dropped_frames, "reconnects": self.reconnects,
                "messages_received": self.messages_received, "client": self.client,
                "messages_sent": self.messages_sent, "messages_dropped": self.messages_dropped}

    # Audio and messages on their way.

    def _audio(self, track: str, payload: bytes, frames: int) -> None:
        """``frames`` frames of one track, gathered: converted once, sent as one message."""
        if self.track_messages and track != self.last_track:
            self.last_track = track
            self._put(orjson.dumps({"event": "track", "track": track}).decode())
        if self.decode is not None:
            payload = self.decode(payload)  # PCM16 whatever the provider sends
        self._put(payload, frames)

    def _put(self, item: bytes | str, frames: int = 0) -> None:
        """Send ``item`` now when the connection is open and caught up, else queue it;
        audio beyond what may wait is dropped and counted."""
        link = self.direct
        if link is not None and not self.outbox:
            if frames and link.buffered() > self.max_buffered_bytes:
                self.dropped_frames += frames  # the service reads slower than the call
                return
            link.send_now(item)
            self.messages_sent += 1
            self.frames_sent += frames
            return
        if frames:
            if self.queued_frames + frames > self.max_queue_frames:
                self.dropped_frames += frames
                return
            self.queued_frames += frames
        self.outbox.append((item, frames))
        self.wakeup.set()

    # The connection.

    async def _send_forever(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            try:
                link = await self._open()
            except _CONNECT_ERRORS as exc:
                self.away = True
                self._drop_audio()
                if self.outbox and self.outbox[-1][0] is _STOP:
                    return  # the call ended while the service was away
                self.reconnects += 1
                if self.reconnects == 1 or self.reconnects % 10 == 0:
                    logger.warning("forward.disconnected", url=self.where, error=str(exc),
                                   reconnects=self.reconnects, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            delay = FIRST_RETRY_S
            try:
                if await self._serve(link):
                    return
            except (OSError, ConnectionClosed):
                pass
            finally:
                self.direct = None
                await link.close()
            # The connection was lost mid-call: what was on its way is gone.
            self.away = True
            self._drop_audio()
            self.reconnects += 1
            if self.reconnects == 1 or self.reconnects % 10 == 0:
                logger.warning("forward.disconnected", url=self.where,
                               error="connection lost", reconnects=self.reconnects,
                               retry_in_s=delay)
            if self.outbox and self.outbox[-1][0] is _STOP:
                return

    async def _open(self) -> _Link:
        if self.client == "picows":
            return await _PicowsLink.open(self)
        connection = await connect(self.url, additional_headers=self.headers,
                                   open_timeout=CONNECT_TIMEOUT_S,
                                   close_timeout=CLOSE_TIMEOUT_S, compression=None,
                                   max_size=MAX_MESSAGE_BYTES)
        return _WebsocketsLink(self, connection)

    async def _serve(self, link: _Link) -> bool:
        """Send over one connection; True once the call's stop was sent, False when the
        connection was lost."""
        if self.messages:
            await link.send(self.start_message)
            self.messages_sent += 1
        self.away = False
        self.last_track = None
        lost = asyncio.ensure_future(link.closed())
        try:
            while True:
                while self.outbox:
                    item, frames = self.outbox.popleft()
                    if item is _STOP:
                        # Let the service answer what it still owes (the last transcript)
                        # and close first, for a moment; then close.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.shield(lost), self.linger_s)
                        return True
                    assert isinstance(item, bytes | str)
                    self.queued_frames -= frames
                    await link.send(item)
                    self.messages_sent += 1
                    self.frames_sent += frames
                if link.direct:
                    self.direct = link  # caught up: the receive loop sends from now on
                self.wakeup.clear()
                waking = asyncio.ensure_future(self.wakeup.wait())
                await asyncio.wait({waking, lost}, return_when=asyncio.FIRST_COMPLETED)
                waking.cancel()
                self.direct = None  # the outbox has something (the stop) or the link is gone
                if lost.done():
                    return False
        finally:
            lost.cancel()

    async def _received(self, message: str | bytes) -> None:
        self.messages_received += 1
        try:
            await self.on_message(message)
        except Exception:
            logger.exception("forward.on_message_failed", url=self.where)

    def _drop_audio(self) -> None:
        """The service is away: audio waiting for it is dropped (events are kept)."""
        kept = [entry for entry in self.outbox if not entry[1]]
        self.dropped_frames += self.queued_frames
        self.queued_frames = 0
        self.outbox = collections.deque(kept)


def _unconnected(kind: object, payload: bytes) -> None:
    raise ConnectionError("the connection to the service is not open")


def _picows_errors() -> tuple[type[Exception], ...]:
    if not _PICOWS:
        return ()
    from picows import WSError

    return (WSError,)


# What a failed attempt to connect raises, with either client.
_CONNECT_ERRORS: Final[tuple[type[Exception], ...]] = (
    OSError, InvalidHandshake, TimeoutError, ConnectionClosed, *_picows_errors())


class _WebsocketsLink:
    """A websockets client connection: sends are awaited by the handler's task."""

    direct = False

    def __init__(self, handler: ForwardHandler, connection: ClientConnection) -> None:
        self.connection = connection
        self.reader = asyncio.get_running_loop().create_task(self._read(handler))

    async def send(self, item: bytes | str) -> None:
        await self.connection.send(item)

    def send_now(self, item: bytes | str) -> None:
        raise RuntimeError("a websockets connection sends from its task")

    def buffered(self) -> int:
        return 0

    async def closed(self) -> None:
        await asyncio.shield(self.reader)

    async def close(self) -> None:
        await self.connection.close()
        self.reader.cancel()

    async def _read(self, handler: ForwardHandler) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.connection:
                await handler._received(message)


class _Writes:
    """The writes every call's ``forward`` makes during one turn of the event loop, made
    back to back at its end. A write wakes the service's side (on loopback, its process;
    on a network, the NIC's queue); writes in a row find it awake. The frames of many
    calls arrive together, so one turn gathers many: what it saves is a wake-up per frame
    for the delay of one turn of the loop (well under a millisecond)."""

    __slots__ = ("items", "loop", "scheduled")
    _by_loop: Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Writes]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[Callable[[Any, bytes], None], Any, bytes]] = []
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Writes:
        writes = cls._by_loop.get(loop)
        if writes is None:
            writes = cls._by_loop[loop] = cls(loop)
        return writes

    def add(self, write: Callable[[Any, bytes], None], kind: Any, payload: bytes) -> None:
        self.items.append((write, kind, payload))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        items, self.items = self.items, []
        self.scheduled = False
        for write, kind, payload in items:
            try:
                write(kind, payload)
            except Exception:  # the connection went away this turn: its handler counts it
                continue


class _PicowsLink:
    """A picows client connection: frames are written from the receive loop itself, what
    the service sends goes to ``on_message`` through a small queue and one task."""

    direct = True

    def __init__(self, handler: ForwardHandler) -> None:
        self.handler = handler
        self.transport: WSTransport | None = None
        self.pending: collections.deque[str | bytes] = collections.deque()
        self.fragments: list[bytes] = []
        self.fragment_bytes = 0
        self.fragments_binary = False
        self.arrived = asyncio.Event()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task[None] | None = None
        from picows import WSMsgType

        self.binary, self.text = WSMsgType.BINARY, WSMsgType.TEXT
        self.write: Callable[[WSMsgType, bytes], None] = _unconnected
        self.buffer_size: Callable[[], int] = lambda: 0
        self.writes = _Writes.of(asyncio.get_running_loop())

    @classmethod
    async def open(cls, handler: ForwardHandler) -> _PicowsLink:
        from picows import WSListener, ws_connect

        link = cls(handler)

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                link.transport = transport
                link.write = transport.send
                link.buffer_size = transport.underlying_transport.get_write_buffer_size

            def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
                link.frame(frame)

            def on_ws_disconnected(self, transport: WSTransport) -> None:
                if not link.gone.done():
                    link.gone.set_result(None)

        await asyncio.wait_for(ws_connect(
            Listener, handler.url, extra_headers=handler.headers,
            websocket_handshake_timeout=CONNECT_TIMEOUT_S, max_frame_size=MAX_MESSAGE_BYTES,
            enable_auto_pong=True), CONNECT_TIMEOUT_S)
        link.reader = asyncio.get_running_loop().create_task(link._read())
        return link

    def frame(self, frame: WSFrame) -> None:
        from picows import WSCloseCode, WSMsgType

        kind = frame.msg_type
        transport = self.transport
        assert transport is not None
        if kind is WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if kind not in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            return  # ping (answered by picows), pong
        if kind is not WSMsgType.CONTINUATION:
            self.fragments, self.fragment_bytes = [], 0
            self.fragments_binary = kind is WSMsgType.BINARY
        self.fragment_bytes += frame.payload_size
        if self.fragment_bytes > MAX_MESSAGE_BYTES:
            transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
            transport.disconnect()
            return
        self.fragments.append(frame.get_payload_as_bytes())
        if not frame.fin:
            return
        payload = b"".join(self.fragments)
        self.fragments, self.fragment_bytes = [], 0
        if len(self.pending) >= MAX_PENDING_MESSAGES:
            self.handler.messages_dropped += 1
            return
        if self.fragments_binary:
            self.pending.append(payload)
        else:
            try:
                self.pending.append(payload.decode())
            except UnicodeDecodeError:
                transport.send_close(WSCloseCode.INVALID_TEXT)
                transport.disconnect()
                return
        self.arrived.set()

    async def send(self, item: bytes | str) -> None:
        self.writes.flush()  # after what the receive loop gathered, in order
        if type(item) is bytes:
            self.write(self.binary, item)
        else:
            assert isinstance(item, str)
            self.write(self.text, item.encode())

    def send_now(self, item: bytes | str) -> None:
        # Per frame: gathered, written with the others' at the end of the loop's turn.
        if type(item) is bytes:
            self.writes.add(self.write, self.binary, item)
        else:
            assert isinstance(item, str)
            self.writes.add(self.write, self.text, item.encode())

    def buffered(self) -> int:
        return int(self.buffer_size())

    async def closed(self) -> None:
        await asyncio.shield(self.gone)

    async def close(self) -> None:
        self.writes.flush()
        transport = self.transport
        if transport is not None and not self.gone.done():
            from picows import WSCloseCode

            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.gone), CLOSE_TIMEOUT_S)
            transport.disconnect()
        if self.reader is not None:
            self.reader.cancel()
        # The transport refers to the listener, which refers to this link.
        self.transport, self.write = None, _unconnected
        self.buffer_size = lambda: 0

    async def _read(self) -> None:
        while True:
            while self.pending:
                await self.handler._received(self.pending.popleft())
            self.arrived.clear()
            await self.arrived.wait()


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
