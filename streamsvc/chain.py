"""The chain that feeds one call's handlers without ever blocking the receive loop.

Inline :class:`~streamsvc.handlers.Handler` methods are called in the receive loop; each
:class:`~streamsvc.handlers.AsyncHandler` runs in its own task behind a queue bounded in
items and bytes, where media frames are dropped (and counted) when it falls behind. A
handler that raises is disabled for the rest of that call, logged once and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import structlog

from streamsvc import wire
from streamsvc.handlers import AnyHandler, AsyncHandler, Handler, HandlerSpec, RawFrame
from streamsvc.live import LiveSession, PlaybackObserver
from streamsvc.session import CallSummary

__all__ = ["MEDIA_LATENCY_SAMPLING", "HandlerChain", "LatencyObserver"]

logger = structlog.get_logger("streamsvc.handlers")


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
            # The slot refers to this runner: let go of it, so that the ended call is freed
            # by reference counting. A finished runner takes nothing more.
            self.slot = _FINISHED


# What a finished runner has in place of its slot: a failed one, so put() drops everything.
_FINISHED: Final = _Slot("finished", Handler())
_FINISHED.failed = True


def _held_bytes(method: str, args: tuple[Any, ...]) -> int:
    """The bytes an item keeps alive while queued: audio, or a raw frame's text."""
    if method == "on_media":
        return len(args[0].payload)
    if method == "on_raw_frame":
        return len(args[0].text)
    return 0


def _overrides_media(handler: AnyHandler) -> bool:
    method = type(handler).on_media
    return method is not Handler.on_media and method is not AsyncHandler.on_media


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
        self._inline_media: list[_Slot] = []  # plain handlers taking media
        self._queued_media: list[_Slot] = []  # async handlers taking media
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
        media = [s for s in self._slots if _overrides_media(s.handler) and not s.failed]
        self._inline_media = [s for s in media if s.runner is None]
        self._queued_media = [s for s in media if s.runner is not None]
        self._raw = tuple(s for s in self._slots if _overrides_raw_frame(s.handler))
        self._call("on_start", (session,), droppable=False)

    @property
    def takes_media(self) -> bool:
        """Whether any handler of this call takes :meth:`on_media` (set by :meth:`start`)."""
        return bool(self._inline_media or self._queued_media)

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
        for slot in self._queued_media:
            runner = slot.runner
            if runner is not None:
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
