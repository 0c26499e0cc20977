"""streamsvc: a media-stream consumer for voice platforms (Twilio, Azure Communication
Services, Telnyx, SignalWire, Exotel, Plivo, Vonage, Genesys Cloud AudioHook and Audio
Connector, Asterisk's WebSocket channel, jambonz's listen verb).

The I/O-free core is :mod:`streamsvc.wire` (the common events and the codec contract),
:mod:`streamsvc.providers` (one codec per provider and the provider registry) and
:mod:`streamsvc.session` (the per-stream state machine); :mod:`streamsvc.server` is the
asyncio shell; :mod:`streamsvc.handlers` holds the handler API. ``docs/architecture.md``
draws the rest.
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
