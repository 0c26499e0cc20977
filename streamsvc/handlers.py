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
and counted; the call and the other handlers go on. The chain that runs them is
:mod:`streamsvc.chain`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import structlog

from streamsvc import wire
from streamsvc.exceptions import ConfigError
from streamsvc.live import LiveSession
from streamsvc.session import CallSummary

__all__ = [
    "BUILTIN_HANDLERS",
    "AsyncHandler",
    "Handler",
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
    ``sent`` when the server sent it rather than received it, ``binary`` when it was a
    binary frame (Vonage's audio) rather than text."""

    at_ms: float
    text: bytes
    sent: bool = False
    binary: bool = False


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
    "handoff": "streamsvc.builtins.handoff:HandOffHandler",
}
# Built-ins that talk back, so only make sense on bidirectional routes.
BIDIRECTIONAL_ONLY: Final = frozenset({"echo"})


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A handler as configured for a route: its name (built-in name, import string, or a
    named instance's name: its report goes under it), the factory it resolves to, the
    options it is created with, and ``kind``: what a named instance ``use``-s (the built-in
    name or import string), else its name."""

    name: str
    factory: HandlerFactory
    options: Mapping[str, Any] = field(default_factory=dict)
    queue_size: int | None = None  # overrides a queued handler's own queue_size
    kind: str = ""  # set to ``name`` when empty

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", self.name)

    def create(self) -> AnyHandler:
        return self.factory(**self.options)


# An option every handler takes: the queue length of a queued (AsyncHandler) handler.
QUEUE_SIZE_OPTION: Final = "queue_size"


def resolve_handler(name: str, options: Mapping[str, Any], *, key: str,
                    instance: str | None = None) -> HandlerSpec:
    """Resolve a built-in name or ``"package.module:Factory"`` and check that ``options``
    fit the factory's signature (``queue_size`` is taken by the chain, for queued
    handlers), and its ``check_options(**options)`` when it has one. ``instance``: the
    named instance (``[handlers.<instance>] use = "<name>"``) it is made for, whose name the
    handler's report and any error carry. Raises :class:`ConfigError` naming ``key``
    otherwise."""
    label = instance or name
    factory = _import_factory(BUILTIN_HANDLERS.get(name, name), key=key)
    options = dict(options)
    queue_size = options.pop(QUEUE_SIZE_OPTION, None)
    if queue_size is not None and (not isinstance(queue_size, int) or queue_size < 1):
        raise ConfigError(f"handlers.{label}.{QUEUE_SIZE_OPTION}",
                          f"must be a whole number >= 1, got {queue_size!r}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        where = f"handlers.{label}" if instance else key
        raise ConfigError(where, f"options do not fit handler {name!r}"
                          + (f" (instance {instance!r})" if instance else "")
                          + f": {exc}") from None
    except ValueError:  # no signature to check (some builtins); creation will tell
        pass
    check = getattr(factory, "check_options", None)
    if callable(check):  # a factory that can tell a bad option before any call
        try:
            check(**options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"handlers.{label}", str(exc)) from None
    return HandlerSpec(label, factory, options, queue_size, kind=name)


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
