"""Logging set-up: structlog, one JSON object per line on stdout (or a console renderer),
with the ids bound per connection through contextvars.

Event names are the public contract (README, "Log events"); fields are values, never
f-strings.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import orjson
import structlog

__all__ = ["configure_logging"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _json_default(value: Any) -> Any:
    # Mappings such as the read-only custom_parameters, tuples of tracks, sets.
    if hasattr(value, "items"):
        return dict(value.items())
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def _dumps(event_dict: Any, **_: Any) -> bytes:
    return orjson.dumps(event_dict, default=_json_default)


def configure_logging(*, log_format: str = "json", level: str = "info") -> None:
    """Configure structlog for the process: ``log_format`` is ``json`` or ``console``,
    ``level`` one of debug, info, warning, error. Call once, at start-up."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "console":
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # websockets and asyncio log through the standard library: keep their warnings and
    # errors, on stderr, without per-connection chatter.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
