"""The fleet's client side (:mod:`streamsvc.fleet` re-exports it): :class:`Consumer` reads
the call events through a consumer group, :class:`Fleet` talks back to a live stream on
whichever instance owns it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

import orjson
import redis.asyncio as redis
import structlog
from redis.exceptions import ResponseError

from streamsvc.fleet.keys import (
    EVENTS_STREAM,
    REPLIES_PREFIX,
    call_key,
    commands_channel,
    default_consumer_name,
    registry_key,
)
from streamsvc.live import HandOffResult

__all__ = ["Consumer", "Entry", "Fleet", "FleetError"]

logger = structlog.get_logger("streamsvc.fleet")

DEFAULT_CLAIM_IDLE_MS: Final = 30_000


class FleetError(Exception):
    """A talk-back command that could not be applied: the reason is the message."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of the events stream: its Redis id, ``event`` and ``data``."""

    id: str
    event: str
    data: dict[str, Any]

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.id, "event": self.event, "data": self.data})


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    event = fields.get(b"event", b"").decode("utf-8", "replace")
    try:
        data = orjson.loads(fields.get(b"data", b"{}"))
    except orjson.JSONDecodeError:
        data = {"undecodable": fields.get(b"data", b"").decode("utf-8", "replace")}
    return Entry(ident, event, data if isinstance(data, dict) else {"value": data})


Callback = Callable[[Entry], Awaitable[None] | None]


# How much longer than its longest blocking read a consumer waits for Redis to answer.
CONSUMER_TIMEOUT_MARGIN_S: Final = 5.0


class Consumer:
    """Reads ``stream`` (the events) as ``consumer`` of consumer group ``group``, which it
    creates on first use (reading from new entries on: ``start="$"``, or from the oldest
    kept: ``start="0"``). Each entry is given to the callback and acknowledged once the
    callback returns; an entry whose callback raised stays pending. Entries another
    consumer left pending for ``claim_idle_ms`` (it died) are claimed and given again, and
    this consumer's own pending ones first: at least once, so the callback should be
    idempotent (the entry id is a good key)."""

    def __init__(self, redis_url: str, group: str, consumer: str | None = None, *,
                 stream: str = EVENTS_STREAM, claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
                 start: str = "$", count: int = 100, block_ms: int = 1000) -> None:
        # A read never waits on a dead connection forever (a failover that drops it
        # silently): a little longer than the longest blocking read.
        self.redis = redis.Redis.from_url(
            redis_url, socket_timeout=block_ms / 1000 + CONSUMER_TIMEOUT_MARGIN_S,
            socket_connect_timeout=CONSUMER_TIMEOUT_MARGIN_S)
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.stream = stream
        self.claim_idle_ms = claim_idle_ms
        self.start = start
        self.count = count
        self.block_ms = block_ms
        self.handled = 0
        self.failed = 0
        self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return after the batch in hand (within ``block_ms``): a clean
        end that leaves nothing half-read, where cancelling the task may land mid-read."""
        self._stopping = True

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()

    async def ensure_group(self) -> None:
        """Create the group (and the stream) unless it exists."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start,
                                           mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, callback: Callback, *, limit: int | None = None) -> None:
        """Give entries to ``callback`` until :meth:`stop` (or cancelled, or ``limit``
        entries handled)."""
        await self.ensure_group()
        await self._pending_of_mine(callback)
        claimed_at = 0.0
        loop = asyncio.get_running_loop()
        while (limit is None or self.handled < limit) and not self._stopping:
            if loop.time() - claimed_at >= self.claim_idle_ms / 2000:
                claimed_at = loop.time()
                await self._claim(callback, limit)
                if limit is not None and self.handled >= limit:
                    return
            block = min(self.block_ms, max(1, self.claim_idle_ms // 2))
            batches: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=self._room(limit),
                block=block)
            for _, entries in batches or ():
                await self._handle(entries, callback)

    def _room(self, limit: int | None) -> int:
        return self.count if limit is None else max(1, min(self.count, limit - self.handled))

    async def _pending_of_mine(self, callback: Callback) -> None:
        """What this consumer (same name) read and did not acknowledge before a restart."""
        batches: Any = await self.redis.xreadgroup(self.group, self.consumer,
                                                   {self.stream: "0"}, count=self.count)
        for _, entries in batches or ():
            await self._handle(entries, callback)

    async def _claim(self, callback: Callback, limit: int | None) -> None:
        start = "0-0"
        while limit is None or self.handled < limit:
            reply: Any = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                self.claim_idle_ms, start_id=start,
                                                count=self._room(limit))
            start, entries = reply[0], reply[1]
            await self._handle(entries, callback)
            if start in (b"0-0", "0-0") or not entries:
                return

    async def _handle(self, entries: list[Any], callback: Callback) -> None:
        for entry_id, fields in entries:
            if fields is None:  # deleted by the trim while pending
                await self.redis.xack(self.stream, self.group, entry_id)
                continue
            entry = _entry(entry_id, fields)
            try:
                result = callback(entry)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.failed += 1
                logger.exception("fleet.consumer_callback_failed", entry_id=entry.id,
                                 event=entry.event)
                continue  # stays pending: claimed again after claim_idle_ms
            await self.redis.xack(self.stream, self.group, entry_id)
            self.handled += 1


MarkOutcome = Literal["played", "cleared"]


class Fleet:
    """Talk back to live bidirectional streams by ``stream_sid``, wherever they run::

        async with Fleet("redis://redis:6379/0") as fleet:
            await fleet.send_audio(stream_sid, pcm16, sample_rate=16000)
            outcome = await fleet.mark(stream_sid, "greeting")  # "played" or "cleared"
            await fleet.clear(stream_sid)

    The command goes to the instance that owns the stream (the live registry), which
    applies it as it applies a local handler's: refused on a unidirectional route, audio
    converted to the stream's format. :class:`FleetError` says why a command failed."""

    def __init__(self, redis_url: str, *, timeout_s: float = 5.0) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.timeout_s = timeout_s
        self.client_id = uuid.uuid4().hex
        self._replies = REPLIES_PREFIX + self.client_id
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Fleet:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self._replies)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self.redis.aclose()

    async def owner(self, stream_sid: str) -> dict[str, Any] | None:
        """The live registry's entry for ``stream_sid`` (instance, call_sid, path,
        started_at), or None when no instance has it live."""
        raw = await self.redis.get(registry_key(stream_sid))
        if raw is None:
            return None
        try:
            entry = orjson.loads(raw)
            instance = entry["instance"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            instance = None
        if not isinstance(instance, str) or not instance:
            raise FleetError(f"the registry's entry for {stream_sid!r} is not one streamsvc "
                             "wrote")
        return entry  # type: ignore[no-any-return]

    async def send_audio(self, stream_sid: str, audio: bytes, *,
                         sample_rate: int | None = None) -> None:
        """Play PCM16 ``audio`` (at ``sample_rate``, else the stream's own) to the caller."""
        await self._command(stream_sid, {"op": "send_audio",
                                         "audio": base64.b64encode(audio).decode(),
                                         "sample_rate": sample_rate}, self.timeout_s)

    async def mark(self, stream_sid: str, name: str, *,
                   timeout_s: float = 300.0) -> MarkOutcome:
        """Send a mark after the audio queued so far; return once it is ``played`` (the
        caller heard everything before it) or ``cleared``."""
        reply = await self._command(stream_sid, {"op": "mark", "name": name}, timeout_s)
        outcome = reply.get("result")
        if outcome not in ("played", "cleared"):
            raise FleetError(f"unexpected mark outcome {outcome!r}")
        return outcome  # type: ignore[no-any-return]

    async def hand_off(self, call_id: str, to: str, *,
                       parameters: Mapping[str, str] | None = None,
                       timeout_s: float | None = None) -> HandOffResult:
        """Hand the live call ``call_id`` (its sid; ACS: the correlation id) to a person,
        as its stream's :meth:`~streamsvc.live.LiveSession.hand_off` does, on whichever
        instance has it. :class:`FleetError` when no live stream has the call, or the
        hand-off was refused (the reason)."""
        raw = await self.redis.get(call_key(call_id))
        if raw is None:
            raise FleetError(f"no live call {call_id!r} in the registry")
        try:
            stream_sid = raw.decode() if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise FleetError(f"the registry's entry for call {call_id!r} is not one "
                             "streamsvc wrote") from None
        reply = await self._command(stream_sid, {"op": "hand_off", "to": to,
                                                 "parameters": dict(parameters or {})},
                                    self.timeout_s if timeout_s is None else timeout_s)
        result = reply.get("result")
        if not isinstance(result, dict):
            raise FleetError(f"unexpected hand-off result {result!r}")
        return HandOffResult(
            str(result.get("target")), str(result.get("mechanism")),
            dict(result.get("sent") or {}), tuple(result.get("dropped") or ()),
            tuple(result.get("truncated") or ()), bool(result.get("ok")),
            result.get("error"))

    async def clear(self, stream_sid: str) -> None:
        """Stop what is playing and drop what is queued (pending marks resolve
        ``cleared``)."""
        await self._command(stream_sid, {"op": "clear"}, self.timeout_s)

    async def _command(self, stream_sid: str, command: dict[str, Any],
                       timeout_s: float) -> dict[str, Any]:
        if self._reader is None:
            raise RuntimeError("use Fleet as `async with Fleet(url) as fleet:`")
        owner = await self.owner(stream_sid)
        if owner is None:
            raise FleetError(f"no live stream {stream_sid!r} in the registry")
        command_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        try:
            message = orjson.dumps({**command, "stream_sid": stream_sid, "id": command_id,
                                    "reply_to": self._replies})
            if not await self.redis.publish(commands_channel(owner["instance"]), message):
                raise FleetError(f"instance {owner['instance']!r} is not listening")
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(command_id, None)
        if not reply.get("ok"):
            raise FleetError(str(reply.get("error", "failed")))
        return reply

    async def _read(self) -> None:
        async for message in self._pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                reply = orjson.loads(message["data"])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
                continue  # not a reply to us
            future = self._waiting.get(reply["id"])
            if future is not None and not future.done():
                future.set_result(reply)
