"""Pluggable per-call handlers, and the chain that feeds them without ever blocking.

A handler is created per call by a factory (a class or any callable), configured by the
route's ``[handlers.NAME]`` options, and receives, in order: ``on_start(session)``, then
``on_media(frame)``, ``on_dtmf(event)`` and ``on_mark(event)`` as frames arrive, then
``on_stop(session, summary)`` exactly once, however the call ends.

Two kinds:

* :class:`Handler`: synchronous methods called inline by the receive loop. For cheap work
  only (counting, a level meter): whatever it spends, every call on the process waits for.
* :class:`AsyncHandler`: coroutine methods run by the handler's own task behind a bounded
  queue (``queue_size``). When the queue is full, media frames are dropped and counted for
  that handler alone; start and stop always get through. For anything that does I/O.

A handler that raises is disabled for the rest of that call, logged once with the traceback
and counted; the call and the other handlers go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import structlog

from . import wire
from .exceptions import ConfigError
from .live import LiveSession, PlaybackObserver
from .session import CallSummary

__all__ = [
    "BUILTIN_HANDLERS",
    "AsyncHandler",
    "Handler",
    "HandlerChain",
    "HandlerFactory",
    "HandlerSpec",
    "RawFrame",
    "resolve_handler",
]

logger = structlog.get_logger("streamsvc.handlers")

DEFAULT_QUEUE_SIZE: Final = 500  # 10 s of one track at 50 frames/s
DEFAULT_QUEUE_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One frame exactly as it crossed the wire: ``at_ms`` after the socket opened,
    ``sent`` when the server sent it rather than received it."""

    at_ms: float
    text: bytes
    sent: bool = False


class Handler:
    """Base class of inline handlers; override the methods you need. Each runs in the
    receive loop and must return quickly."""

    def on_start(self, session: LiveSession) -> None:
        """The stream started: ids, tracks, media format and ``custom_parameters`` are set.
        On a bidirectional route ``session.send_audio``, ``session.mark`` and
        ``session.clear`` talk back (see :mod:`streamsvc.live`)."""

    def on_media(self, frame: wire.Media) -> None:
        """One audio frame (``frame.track``, ``frame.timestamp_ms``, ``frame.payload``)."""

    def on_dtmf(self, event: wire.Dtmf) -> None:
        """A key press (bidirectional streams only)."""

    def on_mark(self, event: wire.Mark) -> None:
        """A mark the server sent was played or cleared."""

    def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        """The stream ended; called exactly once."""

    def on_raw_frame(self, frame: RawFrame) -> None:
        """Every frame received (bad ones too, and those before ``start``, delivered right
        after ``on_start``) and sent. Only called on handlers that override it."""

    def report(self) -> Mapping[str, Any] | None:
        """What this handler adds to the call summary (``stream.stopped``'s ``handlers``
        field, the summary ``on_stop`` gets), or None. Called once, just before
        ``on_stop``; JSON-ready values only."""
        return None


class AsyncHandler:
    """Base class of queued handlers; override the coroutines you need. They run in the
    handler's own task, one at a time and in order, so they may await I/O."""

    queue_size: int = DEFAULT_QUEUE_SIZE
    # The same queue bounded in bytes of audio and raw frames: a peer sending 64 KiB frames
    # cannot make queue_size of them pile up. Beyond, frames are dropped and counted.
    max_queue_bytes: int = DEFAULT_QUEUE_BYTES
    # Gather events for up to this many milliseconds before the handler's task wakes (0:
    # wake for each). A handler that needs no low latency (a recorder, a writer) saves a
    # task wake-up per frame; order and the queue limit are unchanged.
    batch_ms: int = 0

    async def on_start(self, session: LiveSession) -> None:
        """As :meth:`Handler.on_start`."""

    def on_media(self, frame: wire.Media) -> Awaitable[None] | None:
        """As :meth:`Handler.on_media`, as a coroutine (``async def``); may be skipped (and
        counted) when the queue is full.

        Defined as a plain method instead (``def on_media``), it is called in the receive
        loop like an inline handler's once ``on_start`` has returned and nothing waits in
        this handler's queue: no task wake-up per frame. It must then return quickly, and
        may run while another of this handler's coroutines is suspended."""
        return None

    async def on_dtmf(self, event: wire.Dtmf) -> None:
        """As :meth:`Handler.on_dtmf`."""

    async def on_mark(self, event: wire.Mark) -> None:
        """As :meth:`Handler.on_mark`."""

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        """As :meth:`Handler.on_stop`; called exactly once."""

    async def before_report(self, summary: CallSummary) -> None:
        """The call ended and this handler's queue is empty: finish what :meth:`report`
        should count (send what is still buffered, wait for a last answer). ``summary`` has
        no handler reports yet. Runs once, before ``report`` and ``on_stop``, within the
        handlers' stop timeout."""

    async def on_raw_frame(self, frame: RawFrame) -> None:
        """As :meth:`Handler.on_raw_frame`; may be skipped (and counted) when the queue is
        full."""

    def report(self) -> Mapping[str, Any] | None:
        """As :meth:`Handler.report` (synchronous: it may run before the queue is drained)."""
        return None


AnyHandler: TypeAlias = Handler | AsyncHandler
HandlerFactory: TypeAlias = Callable[..., AnyHandler]


# Built-in handlers by name, imported only when a route uses them.
BUILTIN_HANDLERS: Final[Mapping[str, str]] = {
    "log": "streamsvc.builtins.log:LogHandler",
    "capture": "streamsvc.builtins.capture:CaptureHandler",
    "recorder": "streamsvc.builtins.recorder:RecorderHandler",
    "levels": "streamsvc.builtins.levels:LevelsHandler",
    "dtmf": "streamsvc.builtins.dtmf:DtmfHandler",
    "echo": "streamsvc.builtins.echo:EchoHandler",
    "forward": "streamsvc.builtins.forward:ForwardHandler",
}
# Built-ins that talk back, so only make sense on bidirectional routes.
BIDIRECTIONAL_ONLY: Final = frozenset({"echo"})


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A handler as configured for a route: its name (built-in name or import string), the
    factory it resolves to and the options it is created with."""

    name: str
    factory: HandlerFactory
    options: Mapping[str, Any] = field(default_factory=dict)
    queue_size: int | None = None  # overrides a queued handler's own queue_size

    def create(self) -> AnyHandler:
        return self.factory(**self.options)


# An option every handler takes: the queue length of a queued (AsyncHandler) handler.
QUEUE_SIZE_OPTION: Final = "queue_size"


def resolve_handler(name: str, options: Mapping[str, Any], *, key: str) -> HandlerSpec:
    """Resolve a built-in name or ``"package.module:Factory"`` and check that ``options``
    fit the factory's signature (``queue_size`` is taken by the chain, for queued
    handlers). Raises :class:`ConfigError` naming ``key`` otherwise."""
    factory = _import_factory(BUILTIN_HANDLERS.get(name, name), key=key)
    options = dict(options)
    queue_size = options.pop(QUEUE_SIZE_OPTION, None)
    if queue_size is not None and (not isinstance(queue_size, int) or queue_size < 1):
        raise ConfigError(f"handlers.{name}.{QUEUE_SIZE_OPTION}",
                          f"must be a whole number >= 1, got {queue_size!r}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise ConfigError(key, f"options do not fit handler {name!r}: {exc}") from None
    except ValueError:  # no signature to check (some builtins); creation will tell
        pass
    return HandlerSpec(name, factory, options, queue_size)


def _import_factory(name: str, *, key: str) -> HandlerFactory:
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        known = ", ".join(sorted(BUILTIN_HANDLERS))
        raise ConfigError(key, f"unknown handler {name!r}: use one of {known} or 'pkg.mod:Factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(key, f"{module_name!r} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]


LatencyObserver: TypeAlias = Callable[[str, float], None]
# Media handler latency is measured on one frame in this many (timing costs ~100 ns a call).
MEDIA_LATENCY_SAMPLING: Final = 8


def _ignore_latency(handler: str, seconds: float) -> None:
    pass


class _Slot:
    """One handler in a call's chain, with its counters."""

    __slots__ = ("dropped", "failed", "handler", "name", "runner")

    def __init__(self, name: str, handler: AnyHandler) -> None:
        self.name = name
        self.handler = handler
        self.failed = False
        self.dropped = 0
        self.runner: _QueueRunner | None = None

    def fail(self, method: str) -> None:
        self.failed = True
        logger.exception("handler.failed", handler=self.name, method=method)


_Item: TypeAlias = tuple[str, tuple[Any, ...], int]  # method, arguments, bytes held


class _QueueRunner:
    """Feeds one :class:`AsyncHandler` from a bounded queue in its own task.

    Per frame this is the costliest part of a queued handler, so it uses bare futures
    rather than :class:`asyncio.Event` (one future per wake-up, none while the task is
    busy) and times one media item in ``MEDIA_LATENCY_SAMPLING``."""

    def __init__(self, slot: _Slot, handler: AsyncHandler, observe: LatencyObserver) -> None:
        self.slot = slot
        self.observe = observe
        self.handler = handler
        self.limit = max(1, handler.queue_size)
        self.byte_limit = max(1, handler.max_queue_bytes)
        self.queued_bytes = 0
        self.items: collections.deque[_Item] = collections.deque()
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None  # set while the task waits for items
        self.drained: list[asyncio.Future[None]] = []  # resolved when the queue empties
        self.media_count = 0
        self.batch_s = max(0, handler.batch_ms) / 1000
        # A plain (not async) on_media is called in the receive loop once on_start is done
        # and nothing waits in the queue, so order holds and no task wakes per frame.
        self.media_inline = not inspect.iscoroutinefunction(type(handler).on_media)
        self.started = False
        self.task = self.loop.create_task(self._run(), name=f"handler:{slot.name}")

    def put(self, method: str, args: tuple[Any, ...], *, droppable: bool) -> None:
        # Control items get twice the room so that a media flood cannot starve them, and
        # on_start/on_stop (not droppable) always get in.
        if self.slot.failed and method != "on_stop":
            return
        limit = self.limit if method == "on_media" else 2 * self.limit
        size = _held_bytes(method, args)
        if droppable and (len(self.items) >= limit
                          or self.queued_bytes + size > self.byte_limit):
            self.slot.dropped += 1
            return
        self.queued_bytes += size
        self.items.append((method, args, size))
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait_drained(self) -> None:
        """Return once every item given so far has been handled (or the task ended)."""
        if self.waiter is not None or self.task.done():
            return  # waiting for items: nothing is queued or running
        drained: asyncio.Future[None] = self.loop.create_future()
        self.drained.append(drained)
        await drained

    def _notify_drained(self) -> None:
        drained, self.drained = self.drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    async def _run(self) -> None:
        items, handler, slot = self.items, self.handler, self.slot
        try:
            while True:
                if not items:
                    if self.drained:
                        self._notify_drained()
                    self.waiter = self.loop.create_future()
                    await self.waiter
                    if self.batch_s and not self.drained:
                        await asyncio.sleep(self.batch_s)  # let a batch gather
                    continue
                method, args, size = items.popleft()
                self.queued_bytes -= size
                if slot.failed:
                    if method == "on_stop":
                        return
                    continue
                timed = True
                if method == "on_media":
                    self.media_count += 1
                    timed = self.media_count % MEDIA_LATENCY_SAMPLING == 0
                started = time.perf_counter() if timed else 0.0
                try:
                    result = getattr(handler, method)(*args)
                    if result is not None:  # a coroutine; a plain on_media returns None
                        await result
                except Exception:
                    slot.fail(method)
                if timed:
                    self.observe(slot.name, time.perf_counter() - started)
                if method == "on_start":
                    self.started = True
                elif method == "on_stop":
                    return
        finally:
            self._notify_drained()


def _held_bytes(method: str, args: tuple[Any, ...]) -> int:
    """The bytes an item keeps alive while queued: audio, or a raw frame's text."""
    if method == "on_media":
        return len(args[0].payload)
    if method == "on_raw_frame":
        return len(args[0].text)
    return 0


def _overrides_raw_frame(handler: AnyHandler) -> bool:
    method = type(handler).on_raw_frame
    return method is not Handler.on_raw_frame and method is not AsyncHandler.on_raw_frame


class HandlerChain:
    """The handlers of one call, in route order. The server calls :meth:`start` once,
    :meth:`dispatch` per event, :meth:`stop` once, then awaits :meth:`wait_stopped`."""

    def __init__(self, specs: tuple[HandlerSpec, ...], *,
                 observe: LatencyObserver | None = None) -> None:
        self._specs = specs
        self._observe = observe or _ignore_latency
        self._slots: list[_Slot] = []
        self._inline_media: list[_Slot] = []
        self._raw: tuple[_Slot, ...] = ()
        self._stopped = False
        self._media_count = 0

    def start(self, session: LiveSession) -> None:
        """Create every handler for this call and give each ``on_start``. A factory that
        raises leaves that handler out of the call (logged, counted as failed)."""
        for spec in self._specs:
            try:
                handler = spec.create()
            except Exception:
                slot = _Slot(spec.name, Handler())
                slot.fail("create")
            else:
                slot = _Slot(spec.name, handler)
                if isinstance(handler, AsyncHandler):
                    if spec.queue_size is not None:
                        handler.queue_size = spec.queue_size
                    slot.runner = _QueueRunner(slot, handler, self._observe)
            self._slots.append(slot)
            if session.bidirectional and isinstance(slot.handler, PlaybackObserver):
                session.observe_playback(slot.handler)
        self._inline_media = [s for s in self._slots if s.runner is None and not s.failed]
        self._raw = tuple(s for s in self._slots if _overrides_raw_frame(s.handler))
        self._call("on_start", (session,), droppable=False)

    @property
    def wants_raw_frames(self) -> bool:
        """Whether any handler of this call takes :meth:`on_raw_frame`."""
        return bool(self._raw)

    def on_raw_frame(self, frame: RawFrame) -> None:
        """Hand one wire frame to the handlers that asked for them."""
        self._call("on_raw_frame", (frame,), droppable=True, slots=self._raw)

    def on_media(self, frame: wire.Media) -> None:
        """Hand one media frame to every live handler (the hot path)."""
        self._media_count += 1
        if self._media_count % MEDIA_LATENCY_SAMPLING == 0:
            self._call("on_media", (frame,), droppable=True, slots=self._inline_media)
        else:
            for slot in self._inline_media:
                if not slot.failed:
                    try:
                        slot.handler.on_media(frame)
                    except Exception:
                        slot.fail("on_media")
        if len(self._inline_media) != len(self._slots):
            for slot in self._slots:
                runner = slot.runner
                if runner is None:
                    continue
                if (runner.media_inline and runner.started and not runner.items
                        and not slot.failed):
                    try:
                        slot.handler.on_media(frame)
                    except Exception:
                        slot.fail("on_media")
                else:
                    runner.put("on_media", (frame,), droppable=True)

    def dispatch(self, event: wire.Event) -> None:
        """Hand one event to the handlers: media, dtmf and mark go on; others are the
        session's business."""
        if type(event) is wire.Media:
            self.on_media(event)
        elif isinstance(event, wire.Dtmf):
            self._call("on_dtmf", (event,), droppable=True)
        elif isinstance(event, wire.Mark):
            self._call("on_mark", (event,), droppable=True)

    def stop(self, session: LiveSession, summary: CallSummary) -> None:
        """Give every handler ``on_stop``; only the first call does anything."""
        if not self._stopped:
            self._stopped = True
            self._call("on_stop", (session, summary), droppable=False)

    async def finish(self, session: LiveSession, summary: CallSummary,
                     grace_s: float) -> CallSummary:
        """End the call for the handlers: let queued handlers catch up with what they were
        given, collect every handler's report into the summary, give each ``on_stop`` with
        it, and wait for them; all within ``grace_s`` seconds. Returns the summary."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        drained = [slot.runner.wait_drained() for slot in self._slots
                   if slot.runner is not None]
        if drained:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*drained), grace_s)
        await self._before_report(summary, max(0.0, deadline - loop.time()))
        summary = dataclasses.replace(summary, handlers=self.reports())
        self.stop(session, summary)
        await self.wait_stopped(max(0.0, deadline - loop.time()))
        return summary

    async def _before_report(self, summary: CallSummary, grace_s: float) -> None:
        slots = [slot for slot in self._slots if not slot.failed
                 and isinstance(slot.handler, AsyncHandler)
                 and type(slot.handler).before_report is not AsyncHandler.before_report]
        if not slots:
            return

        async def run(slot: _Slot) -> None:
            assert isinstance(slot.handler, AsyncHandler)
            try:
                await slot.handler.before_report(summary)
            except Exception:
                slot.fail("before_report")

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(run(slot) for slot in slots)), grace_s)

    async def wait_stopped(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` seconds for queued handlers to finish ``on_stop``, then
        cancel the stragglers (logged)."""
        tasks = [slot.runner.task for slot in self._slots if slot.runner is not None]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            logger.warning("handler.stop_timeout", handler=task.get_name(), timeout_s=grace_s)
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _call(self, method: str, args: tuple[Any, ...], *, droppable: bool,
              slots: Sequence[_Slot] | None = None) -> None:
        for slot in self._slots if slots is None else slots:
            if slot.runner is not None:
                slot.runner.put(method, args, droppable=droppable)
            elif not slot.failed:
                started = time.perf_counter()
                try:
                    getattr(slot.handler, method)(*args)
                except Exception:
                    slot.fail(method)
                self._observe(slot.name, time.perf_counter() - started)

    def reports(self) -> dict[str, Mapping[str, Any]]:
        """Each live handler's :meth:`Handler.report`, by name; a handler whose report
        raises is left out (logged)."""
        reports: dict[str, Mapping[str, Any]] = {}
        for slot in self._slots:
            if slot.failed:
                continue
            try:
                report = slot.handler.report()
            except Exception:
                logger.exception("handler.report_failed", handler=slot.name)
                continue
            if report is not None:
                reports[slot.name] = report
        return reports

    def errors(self) -> dict[str, int]:
        """Handlers disabled by an exception in this call, by name (1 each)."""
        return {slot.name: 1 for slot in self._slots if slot.failed}

    def drops(self) -> dict[str, int]:
        """Events dropped because a queued handler fell behind, by handler name."""
        return {slot.name: slot.dropped for slot in self._slots if slot.dropped}
