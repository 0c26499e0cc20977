"""The event loop's lag: how late the loop runs a callback that was due, sampled every
:data:`INTERVAL_S`. A steady cost shows as a lag of a millisecond or so; a periodic stall
(a long callback, a garbage collection over many objects, a blocking call in a handler)
shows as a lag as long as the stall. What p99 latency under load is made of.

Exposed in ``/metrics`` as ``streamsvc_event_loop_lag_seconds`` (a histogram of every
sample) and ``streamsvc_event_loop_lag_max_seconds`` (the longest in the last
:data:`WINDOW_S` seconds); a lag of :data:`STALL_LOG_S` or more is logged
(``server.loop_stall``, at most once per :data:`STALL_LOG_EVERY_S`)."""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections.abc import Callable
from typing import Final

import structlog

__all__ = ["BUCKETS_S", "INTERVAL_S", "LoopLag"]

logger = structlog.get_logger("streamsvc.server")

INTERVAL_S: Final = 0.005
BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5,
                    1.0)
WINDOW_S: Final = 60
STALL_LOG_S: Final = 0.1
STALL_LOG_EVERY_S: Final = 10.0


class LoopLag:
    """The samples; :meth:`run` takes them on the running loop."""

    __slots__ = ("clock", "counts", "last_logged", "not_logged", "seconds", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)
        self.total = 0.0
        # The longest lag of each whole second, for the last WINDOW_S seconds.
        self.seconds: collections.deque[tuple[int, float]] = collections.deque()
        self.last_logged = float("-inf")
        self.not_logged = 0
        self.clock: Callable[[], float] = time.monotonic  # the loop's, once it runs

    def observe(self, lag: float, now: float) -> None:
        """One sample: the loop ran a callback due at ``now - lag`` at ``now``."""
        self.counts[bisect.bisect_left(BUCKETS_S, lag)] += 1
        self.total += lag
        second = int(now)
        if self.seconds and self.seconds[-1][0] == second:
            if lag > self.seconds[-1][1]:
                self.seconds[-1] = (second, lag)
        else:
            self.seconds.append((second, lag))
            while self.seconds[0][0] <= second - WINDOW_S:
                self.seconds.popleft()
        if lag >= STALL_LOG_S:
            if now - self.last_logged >= STALL_LOG_EVERY_S:
                logger.warning("server.loop_stall", lag_ms=round(lag * 1000, 1),
                               not_logged=self.not_logged)
                self.last_logged, self.not_logged = now, 0
            else:
                self.not_logged += 1

    def recent_max(self) -> float:
        """The longest lag in the last WINDOW_S seconds."""
        now = self.clock()
        return max((lag for second, lag in self.seconds if second > now - WINDOW_S),
                   default=0.0)

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = asyncio.get_running_loop()
        self.clock = loop.time
        while True:
            due = loop.time() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            now = loop.time()
            self.observe(max(0.0, now - due), now)
