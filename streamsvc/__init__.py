"""streamsvc: a Twilio Media Streams consumer.

The I/O-free core is :mod:`streamsvc.wire` (one message in, one typed event out) and
:mod:`streamsvc.session` (the per-stream state machine); :mod:`streamsvc.server` is the
asyncio shell; :mod:`streamsvc.handlers` holds the handler API.
"""

from streamsvc.exceptions import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    StreamsvcError,
)
from streamsvc.handlers import AsyncHandler, Handler
from streamsvc.session import CallSummary, Session

__all__ = [
    "AsyncHandler",
    "CallSummary",
    "ConfigError",
    "Handler",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Session",
    "StreamsvcError",
    "__version__",
]

__version__ = "0.1.0"
