"""A virtual clock for :mod:`streamsvc.testing`: an asyncio loop whose time jumps to the
next timer whenever nothing is ready to run, so a call of minutes plays in milliseconds
with every timer (a frame's time, a mark's playback, a handler's sleep) in order.

The loop is asyncio's own selector loop; only its clock and its wait change: ``time()``
is the virtual time, and a wait for I/O with a timeout polls (no real wait) and moves the
virtual time on by that timeout. Real sockets still work, but a reply the loop does not see
at once is not waited for: handlers that do network I/O want ``clock="real"``.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualClockLoop", "run_virtual"]

T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        ready: list[tuple[Any, int]] = super().select(0)
        if not ready and timeout and timeout > 0 and self.loop is not None:
            self.loop.virtual_time += timeout  # nothing to do until the next timer
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """asyncio's loop on a virtual clock (see the module docstring)."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.virtual_time = 0.0

    def time(self) -> float:
        return self.virtual_time


def run_virtual(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on a fresh :class:`VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(coroutine)
