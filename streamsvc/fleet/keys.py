"""The fleet's Redis key and channel names, one place for each (all public: the README's
"Running a fleet" lists them). Read by the node (:mod:`streamsvc.fleet.node`) that writes
them and the client (:mod:`streamsvc.fleet.client`) that reads them."""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Final

__all__ = [
    "AUDIO_PREFIX",
    "CALL_PREFIX",
    "COMMANDS_PREFIX",
    "CONTEXT_PREFIX",
    "EVENTS_STREAM",
    "NONCE_PREFIX",
    "REGISTRY_PREFIX",
    "REPLIES_PREFIX",
    "RESUMED_PREFIX",
    "RESUME_PREFIX",
    "audio_key",
    "call_key",
    "commands_channel",
    "context_key",
    "default_consumer_name",
    "nonce_key",
    "registry_key",
    "resume_key",
    "resumed_key",
]

EVENTS_STREAM: Final = "streamsvc:events"
AUDIO_PREFIX: Final = "streamsvc:audio:"
CONTEXT_PREFIX: Final = "streamsvc:context:"
REGISTRY_PREFIX: Final = "streamsvc:stream:"
RESUME_PREFIX: Final = "streamsvc:resume:"
RESUMED_PREFIX: Final = "streamsvc:resumed:"
COMMANDS_PREFIX: Final = "streamsvc:commands:"
REPLIES_PREFIX: Final = "streamsvc:replies:"
NONCE_PREFIX: Final = "streamsvc:nonce:"
CALL_PREFIX: Final = "streamsvc:call:"


def audio_key(stream_sid: str) -> str:
    return AUDIO_PREFIX + stream_sid


def context_key(call_id: str) -> str:
    return CONTEXT_PREFIX + call_id


def call_key(call_id: str) -> str:
    """A live call's stream (its id), for what addresses the call by its own id."""
    return CALL_PREFIX + call_id


def registry_key(stream_sid: str) -> str:
    return REGISTRY_PREFIX + stream_sid


def resume_key(call_sid: str) -> str:
    return RESUME_PREFIX + call_sid


def resumed_key(call_sid: str) -> str:
    return RESUMED_PREFIX + call_sid


def nonce_key(provider: str, nonce: str) -> str:
    """A signature nonce seen in the fleet (its SHA-256: a key of bounded size)."""
    return f"{NONCE_PREFIX}{provider}:{hashlib.sha256(nonce.encode()).hexdigest()}"


def commands_channel(instance: str) -> str:
    return COMMANDS_PREFIX + instance


def default_consumer_name() -> str:
    """``host-pid``: unique per process, stable across nothing (a restarted process is a
    new consumer; what the old one left pending is claimed after ``claim_idle_ms``)."""
    return f"{socket.gethostname()}-{os.getpid()}"


