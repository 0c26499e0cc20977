"""Errors raised by streamsvc, named after who is at fault.

::

    StreamsvcError
     ├── ProtocolError
     │    ├── RemoteProtocolError   the peer (Twilio, a replay client) sent something wrong;
     │    │                         carries a close-code hint; counted and survived, never fatal
     │    └── LocalProtocolError    our caller misused the API (e.g. sending on a
     │                              unidirectional stream); a bug in the calling code
     └── ConfigError                bad settings, reported at start-up with the offending key

A broken invariant of streamsvc itself is not one of these: it is left to crash.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_POLICY_VIOLATION",
    "HANDED_OFF_REASON",
    "ConfigError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StreamsvcError",
]

# Close code for a policy violation (RFC 6455 section 7.4.1): the hint for bad peer input.
CLOSE_POLICY_VIOLATION = 1008
# The close reason (with 1000) of a stream the service ended to hand its call to a person.
HANDED_OFF_REASON = "handed off"


class StreamsvcError(Exception):
    """Base class of every error streamsvc raises on purpose."""


class ProtocolError(StreamsvcError):
    """A Media Streams protocol rule was broken, by the peer or by us."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a message that is malformed or not allowed in the session's state.

    ``reason`` is a short human-readable cause, safe to log. ``close_code`` is the WebSocket
    close code a server should use if it decides to end the connection over this error; the
    default server does not: it counts the bad frame and keeps the call.
    """

    def __init__(self, reason: str, *, close_code: int = CLOSE_POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


class LocalProtocolError(ProtocolError):
    """The caller used the API in a way the protocol forbids, such as sending audio back on a
    unidirectional (``<Start><Stream>``) stream or after the stream stopped."""


class ConfigError(StreamsvcError):
    """A setting is invalid. ``key`` names it as the user wrote it (TOML key, env var or
    CLI flag) so the message can point at the exact line to fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
