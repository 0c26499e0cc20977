"""How ``streamsvc serve`` collects garbage, so that collections do not stall calls.

CPython's collector runs a full collection whenever a quarter more objects have reached its
oldest generation since the last one: on a server whose calls come and go, that is every
time a quarter of the calls have been replaced, and a full collection walks every object of
every live call (about 0.7 us each on a small cloud core: 100 ms and more at 2,000 calls), a
stall every call in the process feels. The service's own objects form no reference cycles
once a call has ended (tests/test_gc.py), so they are freed as they go without one.

With ``gc_full_interval_s`` above 0 (the default, 600), the served process:

* moves what start-up made (modules, settings, the server) out of the collector's sight
  (``gc.freeze()``): no collection walks it again;
* keeps CPython's young collections as they are (they walk recent objects only: a few
  thousand) and turns off its own full collections;
* runs a full collection itself every ``gc_full_interval_s`` seconds while calls are in
  progress, or sooner once twice as many calls as are in progress (at least 1,000) have
  begun since the last one (what a handler's reference cycles left is freed then), and
  once as soon as no call is: ``server.gc`` says what each took and freed.

On the picows transport (the default) only: websockets' connection objects refer to one
another (the library's design), so on that transport every ended connection is garbage for
the collector and CPython's own collector stays. ``gc_full_interval_s = 0`` leaves it as
it is on any transport."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Final

import structlog

from streamsvc.config import Settings

__all__ = ["GcPolicy", "calls_between", "interval_for"]

logger = structlog.get_logger("streamsvc.server")

# CPython counts young collections towards a full one; this many never come.
NO_AUTOMATIC_FULL: Final = 1 << 30
CHECK_EVERY_S: Final = 1.0
SLOW_COLLECTION_S: Final = 0.05  # a full collection this long is logged at info
MIN_CALLS_BETWEEN: Final = 1000


class GcPolicy:
    """Applied once the server has started (:meth:`apply`); :meth:`run` collects."""

    def __init__(self, full_interval_s: float, active_calls: Callable[[], int],
                 calls_begun: Callable[[], int] = lambda: 0) -> None:
        self.full_interval_s = full_interval_s
        self.active_calls = active_calls
        self.calls_begun = calls_begun  # how many connections the server has taken
        self.previous_threshold: tuple[int, int, int] | None = None
        self.collections = 0

    @property
    def enabled(self) -> bool:
        return self.full_interval_s > 0

    def apply(self) -> None:
        """Freeze what start-up made; CPython's full collections off."""
        if not self.enabled or self.previous_threshold is not None:
            return
        gc.collect()
        gc.freeze()
        young, middle, old = gc.get_threshold()
        self.previous_threshold = (young, middle, old)
        gc.set_threshold(young, middle, NO_AUTOMATIC_FULL)

    def restore(self) -> None:
        """CPython's collector as it was."""
        if self.previous_threshold is not None:
            gc.set_threshold(*self.previous_threshold)
            gc.unfreeze()
            self.previous_threshold = None

    def collect(self, reason: str) -> None:
        started = time.perf_counter()
        collected = gc.collect()
        took = time.perf_counter() - started
        self.collections += 1
        log = logger.info if took >= SLOW_COLLECTION_S else logger.debug
        log("server.gc", reason=reason, duration_ms=round(took * 1000, 1),
            collected=collected, active_calls=self.active_calls())

    async def run(self) -> None:
        """Collect every ``full_interval_s`` while calls are in progress, sooner when as
        many calls have come and gone as :meth:`calls_between` says, and once each time
        none is; until cancelled."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        last = loop.time()
        begun = collected_at = self.calls_begun()
        calls_since = False  # start-up just collected
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            now = loop.time()
            active = self.active_calls()
            if active or self.calls_begun() != begun:
                calls_since, begun = True, self.calls_begun()
            reason = None
            if active == 0:
                if calls_since:  # calls came and went since the last collection
                    reason = "idle"
            elif now - last >= self.full_interval_s:
                reason = "interval"
            elif begun - collected_at >= calls_between(active):
                reason = "calls"
            if reason is not None:
                self.collect(reason)
                calls_since, last, collected_at = False, now, begun


def interval_for(settings: Settings) -> float:
    """The policy's interval for a server with ``settings``: 0 (CPython's collector) on the
    websockets transport, whose connections are reference cycles of the library's own."""
    return settings.gc_full_interval_s if settings.effective_transport == "picows" else 0.0


def calls_between(active: int) -> int:
    """How many calls may begin between two full collections while ``active`` are in
    progress: twice as many, at least :data:`MIN_CALLS_BETWEEN`. What a handler's cycles
    leave per call waits for at most that many calls (CPython's own rule collects each
    time a quarter of the objects are new: calls replacing a quarter of the live ones)."""
    return max(MIN_CALLS_BETWEEN, 2 * active)
