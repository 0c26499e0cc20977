"""One instance's part in a fleet sharing Redis (``redis_url``): the context store, the live
registry, the event bus, published audio, and talk-back commands from other processes.

Redis is never a reason to lose a call. Writes (events, audio, the registry, contexts) go
through one bounded buffer (``bus_buffer`` entries) drained by one task in pipelines; while
Redis is down or slow the buffer holds them and the task retries with backoff, and what
does not fit is dropped and counted (``streamsvc_bus_dropped_total``), logged once per
outage (``bus.unavailable``, then ``bus.recovered`` with the count). Reads a call waits
for (its context at ``start``, a status callback's registry lookup) give up after
``redis_timeout_ms`` and the call goes on with what the wire carried.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from streamsvc.context.store import CallContext
from streamsvc.exceptions import LocalProtocolError
from streamsvc.fleet.keys import (
    audio_key,
    call_key,
    commands_channel,
    context_key,
    default_consumer_name,
    nonce_key,
    registry_key,
    resume_key,
    resumed_key,
)

if TYPE_CHECKING:
    from streamsvc.config import Settings
    from streamsvc.live import LiveSession

__all__ = ["FleetNode", "Lookup"]

logger = structlog.get_logger("streamsvc.bus")

# The live registry: each entry lives this long unless its instance refreshes it, which it
# does every REGISTRY_REFRESH_S; a dead instance's streams leave the registry within it.
REGISTRY_TTL_S: Final = 30
REGISTRY_REFRESH_S: Final = 10.0
# Entries written to Redis per pipeline.
PIPELINE_OPS: Final = 500
# Retry backoff while Redis is away.
RETRY_FIRST_S: Final = 0.1
RETRY_MAX_S: Final = 2.0
# How long a draining instance gives the buffer to reach Redis before it stops.
FLUSH_AT_STOP_S: Final = 2.0
# A published audio stream keeps about this many entries (~10 minutes of one track at
# 200 ms batches) and expires context_ttl_s after its last batch.
AUDIO_MAXLEN: Final = 3000
# How long after a drain the call may come back (Twilio requests <Connect action> at once).
RESUME_TTL_S: Final = 120
# Talk-back replies in flight at once (a flood of commands cannot pile up tasks).
MAX_REPLIES_IN_FLIGHT: Final = 1000
MAX_COMMAND_BYTES: Final = 4 * 1024 * 1024
# The part of the write buffer that events which are not a call's lifecycle may fill.
FRAME_RATE_SHARE: Final = 0.5
# A stream id kept in Redis (resume markers) longer than this is not one.
MAX_STREAM_ID_BYTES: Final = 256
# A call's record (context, parameters, budget report) read back larger than this is not
# one streamsvc wrote (a context is bounded by the webhook's body limit, 64 KiB).
MAX_RECORD_BYTES: Final = 1024 * 1024
# The registry's entries are claimed, refreshed and given back only by the instance that
# holds them: set when absent or still ours, deleted only while ours.
KEEP_IF_OURS: Final = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""
GIVE_BACK_IF_OURS: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# What the fleet knows of a call at its stream's start: the context store's record.
Lookup = CallContext


@dataclass(frozen=True, slots=True)
class Resume:
    """A call a draining instance handed over: the stream it closed and the
    ``<Parameter>``s the call's stream had."""

    resumed_from: str
    parameters: dict[str, str]


_Op = tuple[Any, ...]


class FleetNode:
    """This instance's link to the fleet; :meth:`start` once, :meth:`stop` once."""

    def __init__(self, settings: Settings, streams: Mapping[str, LiveSession]) -> None:
        assert settings.redis_url is not None
        self.settings = settings
        self.streams = streams
        self.instance = settings.instance_id or default_consumer_name()
        # Commands and writes: fail fast (a dead Redis must not hold a call).
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0,
                                          socket_connect_timeout=0.5)
        # The command subscription blocks on its socket between messages: no read timeout.
        self.subscriber = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5,
                                               health_check_interval=10)
        self.timeout_s = settings.redis_timeout_ms / 1000
        self.buffer: collections.deque[_Op] = collections.deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._replies: set[asyncio.Task[Any]] = set()
        # Metrics (streamsvc_bus_*).
        self.published = 0  # events written
        self.audio_published = 0  # audio batches written
        self.dropped: collections.Counter[str] = collections.Counter()  # by kind
        self.errors = 0  # failed attempts to reach Redis
        self.lookups: collections.Counter[str] = collections.Counter()  # by outcome
        self.commands: collections.Counter[str] = collections.Counter()  # op:outcome
        self.outage_since: float | None = None
        self._dropped_in_outage = 0
        # The registry entries this instance holds (stream id -> entry as written): a
        # stream id is claimed once in the fleet; only its holder refreshes or removes it.
        self.claims: dict[str, bytes] = {}
        self.calls: dict[str, str] = {}  # stream id -> the call's own id, while claimed
        self.duplicates = 0  # streams refused: their id was live on another instance

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Ask Redis once (a PING, bounded by ``redis_timeout_ms``): unreachable, the
        instance serves calls without the fleet, says so (``bus.unavailable``,
        ``streamsvc_bus_up 0``) and keeps asking until Redis answers."""
        try:
            await asyncio.wait_for(self.redis.ping(), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._drain(), name="bus:drain"),
                       loop.create_task(self._refresh_registry(), name="bus:registry"),
                       loop.create_task(self._listen(), name="bus:commands")]
        logger.info("bus.started", instance=self.instance,
                    events_stream=self.settings.events_stream)

    async def stop(self) -> None:
        """Give what is buffered a moment to reach Redis, then close."""
        deadline = asyncio.get_running_loop().time() + FLUSH_AT_STOP_S
        while self.buffer and self.outage_since is None and (
                asyncio.get_running_loop().time() < deadline):
            self._wake.set()
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        if self.buffer:
            self._drop_buffer("stopped")
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self.subscriber.aclose()

    async def flush(self, *, within_s: float) -> bool:
        """Wait (at most ``within_s``) until what is buffered is in Redis."""
        deadline = asyncio.get_running_loop().time() + within_s
        while self.buffer and asyncio.get_running_loop().time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.005)
        return not self.buffer

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    # -- writes (buffered) ----------------------------------------------------------------

    def _put(self, op: _Op, kind: str, *, share: float = 1.0) -> bool:
        """Queue one write while the buffer is below ``share`` of its size; False when it is
        not and the write is dropped (counted)."""
        if len(self.buffer) >= self.settings.bus_buffer * share:
            self.dropped[kind] += 1
            self._dropped_in_outage += 1
            return False
        self.buffer.append(op)
        self._wake.set()
        return True

    def publish(self, event: str, data: Mapping[str, Any], *, lifecycle: bool = True) -> None:
        """Add one entry to the events stream: ``event`` and ``data`` (JSON). Entries that
        are not a call's lifecycle (``lifecycle=False``: DTMF, marks) take at most
        :data:`FRAME_RATE_SHARE` of the buffer, so a flood of them never costs another
        call its ``stream.started``/``stream.stopped``."""
        fields = {"event": event, "data": orjson.dumps(data, default=str)}
        self._put(("xadd", self.settings.events_stream, fields, self.settings.events_maxlen,
                   None), "event", share=1.0 if lifecycle else FRAME_RATE_SHARE)

    def publish_audio(self, stream_sid: str, track: str, timestamp_ms: int, sample_rate: int,
                      audio: bytes, *, expire: bool = True) -> None:
        """One batch of audio; ``expire`` (re)sets the key's expiry (``context_ttl_s``):
        the batcher asks for it now and then, not per batch."""
        fields = {"track": track, "timestamp": timestamp_ms, "encoding": "pcm16",
                  "sample_rate": sample_rate, "audio": audio}
        self._put(("xadd", audio_key(stream_sid), fields, AUDIO_MAXLEN,
                   int(self.settings.context_ttl_s) if expire else None), "audio")

    def put_context(self, call_id: str, record: CallContext) -> asyncio.Future[None]:
        """Keep the call's record (its whole context, the ``<Parameter>``s it sent, the
        webhook's budget report, its hand-offs) for the stream and the context API, on
        whichever instance they are asked. The future is done once Redis has it: answer the
        provider after :meth:`written` of it, so that the stream's lookup, on any instance,
        comes after the write."""
        value = orjson.dumps({"context": dict(record.context or {}), "budget": record.budget,
                              "parameters": dict(record.parameters or {}),
                              "call_sid": record.call_sid, "updated_at": record.updated_at,
                              "hand_offs": list(record.hand_offs)}, default=str)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._put(("set", context_key(call_id), value,
                          int(self.settings.context_ttl_s), done), "context"):
            done.set_result(None)  # dropped (the buffer is full): nothing to wait for
        return done

    async def written(self, *done: asyncio.Future[None]) -> None:
        """Wait for :meth:`put_context` writes, at most ``redis_timeout_ms`` (an answer to
        the provider is never held longer: a slow Redis costs the context, not the
        call)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*done)), self.timeout_s)

    async def claim(self, session: LiveSession, started_at: float) -> str | None:
        """Claim the stream's id in the live registry (``streamsvc:stream:<sid>``): None
        when this instance now holds it, else the instance whose live stream holds it (the
        new stream must be refused; that instance is told, and logs it too). Bounded by
        ``redis_timeout_ms``: when Redis does not answer the claim is queued (written when
        it comes back, unless another instance's stream has the id by then) and the call
        goes on."""
        sid = session.stream_sid
        assert sid is not None
        entry = self._registry_entry(session, started_at)
        key = registry_key(sid)
        self.claims[sid] = entry
        if session.call_sid:
            self.calls[sid] = session.call_sid
        try:
            if self.outage_since is not None:
                raise TimeoutError("redis is unavailable")
            claimed = await asyncio.wait_for(
                self.redis.set(key, entry, nx=True, ex=REGISTRY_TTL_S), self.timeout_s)
            if claimed:
                self._index_call(sid)
                return None
            held = await asyncio.wait_for(self.redis.get(key), self.timeout_s)
        except (TimeoutError, RedisError, OSError):
            self._put(("eval", key, KEEP_IF_OURS, entry, REGISTRY_TTL_S), "registry")
            self._index_call(sid)
            return None
        owner = _registry_owner(held)
        if held is not None and owner in (None, self.instance):
            # Not an entry streamsvc wrote, or one this instance left before a restart
            # (no live stream of ours holds the id: this one is the only one): replace it.
            with contextlib.suppress(TimeoutError, RedisError, OSError):
                await asyncio.wait_for(self.redis.set(key, entry, ex=REGISTRY_TTL_S),
                                       self.timeout_s)
            self._index_call(sid)
            return None
        if held is None and await self._keep_if_ours(key, entry):
            self._index_call(sid)
            return None  # given back meanwhile: claimed now
        del self.claims[sid]
        self.calls.pop(sid, None)
        self.duplicates += 1
        if owner is None:
            return "unknown"
        self._notify(owner, {"op": "duplicate_stream_sid", "stream_sid": sid,
                             "claimant": self.instance, "call_sid": session.call_sid})
        return owner

    async def _keep_if_ours(self, key: str, entry: bytes) -> bool:
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            return bool(await asyncio.wait_for(
                self.redis.eval(KEEP_IF_OURS, 1, key, entry, REGISTRY_TTL_S),  # type: ignore[no-untyped-call, unused-ignore]
                self.timeout_s))
        return True

    def _index_call(self, sid: str) -> None:
        """Let what addresses the call by its own id find its stream
        (``streamsvc:call:<call id>``)."""
        call_id = self.calls.get(sid)
        if call_id:
            self._put(("set", call_key(call_id), sid.encode(), REGISTRY_TTL_S), "registry")

    def unregister(self, stream_sid: str) -> None:
        """Give the stream's id back (only if this instance holds it)."""
        entry = self.claims.pop(stream_sid, None)
        if entry is not None:
            self._put(("eval", registry_key(stream_sid), GIVE_BACK_IF_OURS, entry), "registry")
        call_id = self.calls.pop(stream_sid, None)
        if call_id:
            self._put(("eval", call_key(call_id), GIVE_BACK_IF_OURS, stream_sid.encode()),
                      "registry")

    def mark_resumable(self, call_sid: str, stream_sid: str) -> None:
        """A drain closes this call's <Connect> stream: the next instance it reaches
        through the <Connect action> resumes it."""
        self._put(("set", resume_key(call_sid), stream_sid.encode(), RESUME_TTL_S), "registry")

    def _registry_entry(self, session: LiveSession, started_at: float) -> bytes:
        return orjson.dumps({"instance": self.instance, "call_sid": session.call_sid,
                             "stream_sid": session.stream_sid, "path": session.path,
                             "bidirectional": session.bidirectional,
                             "started_at": started_at})

    def _drop_buffer(self, why: str) -> None:
        for op in self.buffer:
            self.dropped["event" if op[0] == "xadd" and op[1] == self.settings.events_stream
                         else "other"] += 1
        logger.warning("bus.dropped_at_stop", entries=len(self.buffer), reason=why)
        self.buffer.clear()

    def _went_down(self, exc: BaseException) -> None:
        self.errors += 1
        if self.outage_since is None:
            self.outage_since = time.time()
            self._dropped_in_outage = 0
            logger.warning("bus.unavailable", error=str(exc) or type(exc).__name__,
                           buffered=len(self.buffer), buffer_limit=self.settings.bus_buffer)

    def _came_back(self) -> None:
        if self.outage_since is not None:
            logger.info("bus.recovered", outage_s=round(time.time() - self.outage_since, 3),
                        dropped=self._dropped_in_outage, buffered=len(self.buffer))
            self.outage_since = None

    async def _drain(self) -> None:
        backoff = RETRY_FIRST_S
        while True:
            if not self.buffer and self.outage_since is not None:
                # Down with nothing to write: ask until Redis answers, so that the
                # metrics say the truth before the next write does.
                try:
                    await asyncio.wait_for(self.redis.ping(), 5.0)
                except (RedisError, OSError, TimeoutError) as exc:
                    self._went_down(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                backoff = RETRY_FIRST_S
                self._came_back()
                continue
            if not self.buffer:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self.buffer[i] for i in range(min(PIPELINE_OPS, len(self.buffer)))]
            try:
                results = await asyncio.wait_for(self._write(batch), 5.0)
            except (RedisError, OSError, TimeoutError) as exc:
                self._went_down(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            backoff = RETRY_FIRST_S
            for op, result in zip(batch, results, strict=True):
                self.buffer.popleft()
                if op[0] == "set" and len(op) > 4 and not op[4].done():
                    op[4].set_result(None)  # a context written (or refused): answer now
                if isinstance(result, Exception):  # the command itself was refused
                    self.dropped["refused"] += 1
                    logger.warning("bus.write_refused", key=op[1], error=str(result))
                elif op[0] == "xadd":
                    if op[1] == self.settings.events_stream:
                        self.published += 1
                    else:
                        self.audio_published += 1
            self._came_back()

    async def _write(self, batch: list[_Op]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for op in batch:
                kind = op[0]
                if kind == "xadd":
                    _, key, fields, maxlen, expire_s = op
                    pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
                    if expire_s is not None:
                        pipe.expire(key, expire_s)
                elif kind == "set":
                    pipe.set(op[1], op[2], ex=op[3])
                elif kind == "eval":
                    pipe.eval(op[2], 1, op[1], *op[3:])  # type: ignore[no-untyped-call, unused-ignore]
                else:
                    pipe.delete(op[1])
            results = await pipe.execute(raise_on_error=False)
        # One result per op: an xadd with an expire is two commands.
        merged, index = [], 0
        for op in batch:
            merged.append(results[index])
            index += 2 if op[0] == "xadd" and op[4] is not None else 1
        for result in results:
            if isinstance(result, (ConnectionError, OSError, TimeoutError)):
                raise result
            if isinstance(result, RedisError) and not isinstance(
                    result, redis.ResponseError):
                raise result
        return merged

    async def _refresh_registry(self) -> None:
        """Keep the entries this instance holds in the registry (they expire when it dies);
        an entry another instance's stream took meanwhile (the key had expired while Redis
        was away) is not taken back: that stream holds it now."""
        while True:
            await asyncio.sleep(REGISTRY_REFRESH_S)
            claims = list(self.claims.items())
            if not claims or self.outage_since is not None:
                continue
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for sid, entry in claims:
                        pipe.eval(KEEP_IF_OURS, 1, registry_key(sid), entry,  # type: ignore[no-untyped-call, unused-ignore]
                                  REGISTRY_TTL_S)
                    for sid, call_id in list(self.calls.items()):
                        pipe.set(call_key(call_id), sid.encode(), ex=REGISTRY_TTL_S)
                    kept = (await asyncio.wait_for(pipe.execute(),
                                                   self.timeout_s * 10))[:len(claims)]
                for (sid, entry), ours in zip(claims, kept, strict=True):
                    if not ours and self.claims.get(sid) == entry:
                        del self.claims[sid]
                        logger.warning("bus.registry_lost", stream_sid=sid)

    # -- reads (bounded in time) ----------------------------------------------------------

    async def look_up(self, call_id: str | None, call_sid: str | None) -> Lookup:
        """The webhook's context for this call, and whether a drained instance handed it
        over; gives up after ``redis_timeout_ms`` (counted as ``timeout``)."""
        if not call_id:
            return Lookup()
        try:
            stored, resumed = await asyncio.wait_for(
                self._get_and_take(context_key(call_id), resumed_key(call_sid or call_id)),
                self.timeout_s)
        except TimeoutError:
            self.lookups["timeout"] += 1
            return Lookup()
        except (RedisError, OSError) as exc:
            self.lookups["error"] += 1
            logger.debug("bus.lookup_failed", error=str(exc))
            return Lookup()
        resumed_from = _stream_id(resumed)
        if stored is None:
            self.lookups["missing"] += 1
            return Lookup(resumed_from=resumed_from)
        self.lookups["found"] += 1
        record = _call_record(stored)
        if record is None:
            self.lookups["undecodable"] += 1
            return Lookup(resumed_from=resumed_from)
        return dataclasses.replace(record, resumed_from=resumed_from)

    async def read_context(self, call_id: str) -> CallContext | None:
        """The call's record as it is (None when there is none, or when Redis does not
        answer within ``redis_timeout_ms``)."""
        stored = await self._get(context_key(call_id), "read_unavailable")
        return None if stored is None else _call_record(stored)

    async def _get(self, key: str, unavailable: str) -> bytes | None:
        """``GET key`` within ``redis_timeout_ms``; None (counted as ``unavailable``) when
        Redis does not answer."""
        try:
            value = await asyncio.wait_for(self.redis.get(key), self.timeout_s)
        except (TimeoutError, RedisError, OSError):
            self.lookups[unavailable] += 1
            return None
        return value if isinstance(value, bytes) else None

    async def _get_and_take(self, key: str, once_key: str) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.getdel(once_key)
            return list(await pipe.execute())

    async def resume_of(self, call_sid: str) -> Resume | None:
        """The hand-over a drained instance left for this call, taken once (a later
        <Connect> of the same call that ends on its own is not resumed); the stream that
        comes next learns it resumes. None when there is none or Redis does not answer
        within ``redis_timeout_ms`` (the call then goes on with the follow-on TwiML)."""
        try:
            stored, handed = await asyncio.wait_for(
                self._get_and_take(context_key(call_sid), resume_key(call_sid)),
                self.timeout_s * 4)
            if handed is None:
                return None
            resumed_from = _stream_id(handed)
            if resumed_from is None:
                return None
            await asyncio.wait_for(self.redis.set(resumed_key(call_sid), handed,
                                                  ex=RESUME_TTL_S), self.timeout_s * 4)
        except (TimeoutError, RedisError, OSError) as exc:
            self.lookups["resume_unavailable"] += 1
            logger.warning("bus.resume_unavailable", call_sid=call_sid,
                           error=str(exc) or type(exc).__name__)
            return None
        record = _call_record(stored) if stored is not None else None
        return Resume(resumed_from, dict(record.parameters or {}) if record is not None
                      else {})

    async def first_use(self, provider: str, nonce: str, ttl_s: float) -> bool:
        """True unless an instance of the fleet has seen ``provider``'s signature ``nonce``
        in the last ``ttl_s`` (and remember it); True when Redis does not answer within
        ``redis_timeout_ms`` (each instance still remembers its own)."""
        try:
            first = await asyncio.wait_for(
                self.redis.set(nonce_key(provider, nonce), b"1", nx=True, ex=int(ttl_s)),
                self.timeout_s)
        except (TimeoutError, RedisError, OSError):
            self.lookups["nonce_unavailable"] += 1
            return True
        return bool(first)

    async def live_stream(self, stream_sid: str) -> dict[str, Any] | None:
        """The registry's entry for a stream live on any instance (None when not live, or
        when Redis does not answer within ``redis_timeout_ms``)."""
        raw = await self._get(registry_key(stream_sid), "registry_unavailable")
        if raw is None or _registry_owner(raw) is None:
            return None
        entry = orjson.loads(raw)
        path = entry.get("path")
        return {"instance": entry["instance"],
                "path": path[:MAX_STREAM_ID_BYTES] if isinstance(path, str) else None}

    # -- talk-back ----------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = RETRY_FIRST_S
        channel = commands_channel(self.instance)
        while True:
            pubsub = self.subscriber.pubsub()
            try:
                await pubsub.subscribe(channel)
                backoff = RETRY_FIRST_S
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._command(message["data"])
            except (RedisError, OSError) as exc:
                logger.debug("bus.commands_disconnected", error=str(exc))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX_S)

    def _command(self, raw: bytes) -> None:
        try:
            if len(raw) > MAX_COMMAND_BYTES:
                raise ValueError("command too large")
            command = orjson.loads(raw)
            if command["op"] == "duplicate_stream_sid":
                self._duplicate_noticed(command)
                return
            op, stream_sid, reply_to = command["op"], command["stream_sid"], command["reply_to"]
            if not isinstance(reply_to, str) or not reply_to.startswith("streamsvc:replies:"):
                raise ValueError("reply_to is not a reply channel")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.commands["bad:refused"] += 1
            logger.warning("bus.bad_command", reason=str(exc))
            return
        command_id = command.get("id")
        session = self.streams.get(stream_sid) if isinstance(stream_sid, str) else None
        if session is None:
            self._reply(reply_to, command_id, op, error=f"stream {stream_sid!r} is not live "
                        f"on {self.instance}")
            return
        try:
            if op == "send_audio":
                audio = base64.b64decode(command["audio"])
                rate = command.get("sample_rate")
                session.send_audio(audio, sample_rate=int(rate) if rate else None)
                self._reply(reply_to, command_id, op)
            elif op == "clear":
                session.clear()
                self._reply(reply_to, command_id, op)
            elif op == "hand_off":
                parameters = command.get("parameters") or {}
                if not isinstance(parameters, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in parameters.items()):
                    raise ValueError("parameters: an object of text values")
                handed = session.hand_off(str(command["to"]), parameters=parameters)
                handed.add_done_callback(
                    lambda done: self._reply(reply_to, command_id, op,
                                             result=dataclasses.asdict(done.result()))
                    if not done.cancelled() else self._reply(reply_to, command_id, op,
                                                             error="the stream ended"))
            elif op == "mark":
                future = session.mark(str(command["name"]))
                future.add_done_callback(
                    lambda done: self._reply(reply_to, command_id, op, result=done.result())
                    if not done.cancelled() else self._reply(reply_to, command_id, op,
                                                             error="the stream ended"))
            else:
                self._reply(reply_to, command_id, op, error=f"unknown op {op!r}")
        except (LocalProtocolError, ValueError, KeyError, TypeError) as exc:
            self._reply(reply_to, command_id, op, error=str(exc))

    def _reply(self, reply_to: str, command_id: object, op: str, *, result: object = None,
               error: str | None = None) -> None:
        self.commands[f"{op}:{'refused' if error else 'applied'}"] += 1
        if len(self._replies) >= MAX_REPLIES_IN_FLIGHT:
            return
        body = orjson.dumps({"id": command_id, "ok": error is None, "result": result,
                             "error": error})
        task = asyncio.get_running_loop().create_task(self._send_reply(reply_to, body))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    def _duplicate_noticed(self, notice: dict[str, Any]) -> None:
        """Another instance refused a stream with the id of one of ours (it logs it too)."""
        sid = notice["stream_sid"]
        session = self.streams.get(sid) if isinstance(sid, str) else None
        if session is None:
            return  # ended meanwhile
        self.commands["duplicate_stream_sid:noted"] += 1
        logger.warning("stream.duplicate_stream_sid", stream_sid=session.stream_sid,
                       call_sid=session.call_sid, owner=self.instance,
                       claimant=str(notice.get("claimant"))[:200],
                       claimant_call_sid=str(notice.get("call_sid"))[:200], refused="claimant")

    def _notify(self, instance: str, notice: dict[str, Any]) -> None:
        if len(self._replies) >= MAX_REPLIES_IN_FLIGHT:
            return
        task = asyncio.get_running_loop().create_task(
            self._send_reply(commands_channel(instance), orjson.dumps(notice)))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _send_reply(self, reply_to: str, body: bytes) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.publish(reply_to, body), 1.0)


def _length(value: object) -> int:
    return len(value) if isinstance(value, bytes | str) else -1


def _call_record(value: object) -> CallContext | None:
    """A call's record read back from Redis, or None when the value is not a record
    streamsvc wrote (logged, ignored)."""
    try:
        if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES:
            raise TypeError("not a record")
        record = orjson.loads(value)
        context = {str(k): str(v) for k, v in record["context"].items()}
        parameters = {str(k): str(v) for k, v in (record.get("parameters") or {}).items()}
        budget = record.get("budget")
        call_sid = record.get("call_sid")
        updated_at = record.get("updated_at")
        hand_offs = tuple(entry for entry in record.get("hand_offs") or ()
                          if isinstance(entry, dict))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        logger.warning("bus.bad_value", kind="call record", length=_length(value))
        return None
    return CallContext(context, parameters, budget if isinstance(budget, dict) else None,
                       call_sid=call_sid if isinstance(call_sid, str) else None,
                       updated_at=float(updated_at)
                       if isinstance(updated_at, int | float) else None,
                       hand_offs=hand_offs)


def _registry_owner(value: object) -> str | None:
    """The instance a registry entry read back from Redis names, or None when the value is
    not an entry streamsvc wrote (logged)."""
    if value is None:
        return None
    try:
        entry = orjson.loads(value)  # type: ignore[arg-type]
        instance = entry["instance"]
        if not isinstance(instance, str) or not 0 < len(instance) <= MAX_STREAM_ID_BYTES:
            raise TypeError(instance)
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        logger.warning("bus.bad_value", kind="registry entry", length=_length(value))
        return None
    return instance


def _stream_id(value: object) -> str | None:
    """A stream id read back from Redis: text of a sane length, else None (a value another
    process could have poisoned is never a reason to fail a call)."""
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_STREAM_ID_BYTES:
        if value is not None:
            logger.warning("bus.bad_value", kind="stream id", length=_length(value))
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("bus.bad_value", kind="stream id", length=len(value))
        return None
