"""Logging set-up: structlog, one JSON object per line on stdout (or a console renderer),
with the ids bound per connection through contextvars.

* Lines never block the event loop: rendered lines go into a bounded queue that one writer
  thread empties into stdout. When the queue is full (a reader that cannot keep up, a
  pipe nobody reads) a line is dropped and counted; a write that fails (a full disk, a
  broken pipe) is counted and the service goes on. Once lines get through again, a
  ``log.dropped`` line says how many were lost. :func:`dropped_lines` feeds ``/metrics``.
* The standard library's ``logging`` (user handlers, their SDKs) goes through the same
  pipeline: JSON, the call's ids bound, the configured level honoured.
* Tracebacks are logged without local variables: a handler's secrets or a caller's data
  must not end up in the logs.

Event names are the public contract (README, "Log events"); fields are values, never
f-strings.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, Final

import orjson
import structlog

__all__ = ["LogSink", "PrintedLines", "capture_prints", "configure_logging", "dropped_lines",
           "flush_logging"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Lines waiting for the writer thread: about 5 MB of typical lines. Beyond, lines drop.
MAX_QUEUED_LINES: Final = 10_000
# Libraries whose INFO lines are per-connection chatter: their warnings still show.
_QUIET_LOGGERS: Final = ("websockets", "asyncio", "picows", "streamsvc.picows", "redis")


class LogSink:
    """A bounded queue of rendered lines and the thread that writes them to ``stream``.

    :meth:`put` never blocks and never raises: a full queue drops the line (counted in
    ``dropped``); a failed write (``OSError``) is counted in ``write_errors`` and dropped.
    :meth:`flush` waits (bounded) until what was put has been written."""

    def __init__(self, stream: IO[bytes], *, max_lines: int = MAX_QUEUED_LINES) -> None:
        self.stream = stream
        # Rendered lines, and Events that flush() waits on.
        self.lines: queue.Queue[bytes | threading.Event] = queue.Queue(max_lines)
        self.dropped = 0  # lines lost: the queue was full or the write failed
        self.write_errors = 0
        self._unreported = 0  # lost since the last log.dropped line
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._write_forever, name="streamsvc-log",
                                        daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self._lost()

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait up to ``timeout_s`` for the lines put so far to be written."""
        written = threading.Event()
        try:
            self.lines.put(written, timeout=timeout_s)
        except queue.Full:
            return
        written.wait(timeout_s)

    def _lost(self) -> None:
        with self._lock:
            self.dropped += 1
            self._unreported += 1

    def _write_forever(self) -> None:
        while True:
            line = self.lines.get()
            if isinstance(line, threading.Event):  # flush(): what came before is written
                if self._unreported:
                    self._report_losses()
                line.set()
                continue
            self._write(line)
            if self._unreported and self.lines.empty():
                self._report_losses()

    def _write(self, line: bytes) -> bool:
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):  # ENOSPC, EPIPE, EIO; ValueError: stream closed
            with self._lock:
                self.write_errors += 1
            self._lost()
            return False
        return True

    def _report_losses(self) -> None:
        with self._lock:
            lost, self._unreported = self._unreported, 0
        report = {"event": "log.dropped", "level": "warning", "dropped": lost,
                  "dropped_total": self.dropped, "write_errors": self.write_errors}
        if not self._write(orjson.dumps(report) + b"\n"):
            with self._lock:
                self._unreported += lost - 1  # still failing: report them next time


_sink: LogSink | None = None


def dropped_lines() -> int:
    """Log lines lost so far in this process (for ``/metrics``)."""
    return _sink.dropped if _sink is not None else 0


def flush_logging(timeout_s: float = 2.0) -> None:
    """Write out the lines still queued (call before the process exits)."""
    if _sink is not None:
        _sink.flush(timeout_s)


class _SinkLogger:
    """structlog's final logger: hands each rendered line to the sink."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        self._put = put

    def msg(self, message: str | bytes) -> None:
        self._put((message.encode() if isinstance(message, str) else message) + b"\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _SinkHandler(logging.Handler):
    """The standard library's records, rendered by structlog's pipeline into the sink."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        super().__init__()
        self._put = put

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._put(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


def _json_default(value: Any) -> Any:
    # Mappings such as the read-only custom_parameters, tuples of tracks, sets.
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def _dumps(event_dict: Any, **_: Any) -> bytes:
    return orjson.dumps(event_dict, default=_json_default)


def _wants_colour(stream: IO[bytes]) -> bool:
    """Colours only on a terminal, and never with ``NO_COLOR`` set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


# The characters of one printed line a log event carries.
MAX_PRINTED_CHARS: Final = 2000


class PrintedLines(io.TextIOBase):
    """What the process ``print``-s (a handler, an SDK), as log events (``stdout.print``,
    ``text``), one per line: stdout carries the JSON log only, and nothing printed can break
    a line of it. :func:`capture_prints` puts one in place of ``sys.stdout``."""

    def __init__(self) -> None:
        self._partial = ""
        self._logger = structlog.get_logger("streamsvc.print")

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        if len(self._partial) > MAX_PRINTED_CHARS:  # a line that never ends
            lines.append(self._partial)
            self._partial = ""
        for line in lines:
            if line:
                self._logger.info("stdout.print", text=line[:MAX_PRINTED_CHARS])
        return len(text)

    def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, ""
            self._logger.info("stdout.print", text=line[:MAX_PRINTED_CHARS])


def capture_prints() -> None:
    """Route what is printed to stdout into the log (:class:`PrintedLines`); call after
    :func:`configure_logging`, whose sink keeps writing to the real stdout."""
    sys.stdout = PrintedLines()


def configure_logging(*, log_format: str = "json", level: str = "info",
                      stream: IO[bytes] | None = None) -> LogSink:
    """Configure structlog and the standard library's logging for the process:
    ``log_format`` is ``json`` or ``console``, ``level`` one of debug, info, warning,
    error; lines go to ``stream`` (stdout) through a :class:`LogSink`, which is returned.
    Call once, at start-up."""
    global _sink
    stream = stream or sys.stdout.buffer
    sink = _sink = LogSink(stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    text_renderer: Any  # the standard library's formatter wants text, not bytes
    if log_format == "console":
        # The plain formatter: the default rich one prints every frame's locals.
        renderer = text_renderer = structlog.dev.ConsoleRenderer(
            colors=_wants_colour(stream), exception_formatter=structlog.dev.plain_traceback)
        tracebacks: list[Any] = []
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        text_renderer = structlog.processors.JSONRenderer(
            serializer=lambda event, **_: _dumps(event).decode())
        tracebacks = [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _SinkLogger(sink.put),
        cache_logger_on_first_use=True,
    )
    handler = _SinkHandler(sink.put)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *tracebacks, text_renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, _LEVELS[level]))
    return sink
