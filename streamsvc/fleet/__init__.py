"""Working with a fleet of streamsvc instances that share Redis (``redis_url``), from any
process that reaches the same Redis: read the call events, talk back to a live stream.

The keys, all public (documented in the README's "Running a fleet"):

* ``streamsvc:events`` (setting ``events_stream``): a Redis stream of every call's events,
  entries with fields ``event`` (``stream.started``, ``call.dtmf``, ``call.mark``,
  ``stream.stopped``, ``stream.status``, the ``acs.*`` callbacks) and ``data`` (a JSON
  object with the fields of that log line, ``call_sid`` and ``stream_sid`` included);
* ``streamsvc:audio:<stream_sid>``: the stream's audio on routes with ``publish_audio``,
  entries with ``track``, ``timestamp`` (media milliseconds of the batch's first frame),
  ``encoding`` (``pcm16``), ``sample_rate`` and ``audio`` (the bytes);
* ``streamsvc:context:<call_sid>`` (or the ACS correlation id): the call's record, JSON,
  for ``context_ttl_s``: its whole context (what the webhook saw, the stream's parameters,
  what handlers added), its hand-offs, when it last changed;
* ``streamsvc:stream:<stream_sid>``: the live registry (instance, call_sid, path,
  started_at), claimed once, kept alive by the owning instance and gone soon after it dies;
* ``streamsvc:call:<call_sid>``: a live call's stream id (what addresses a call by its own
  id: :meth:`Fleet.hand_off`);
* ``streamsvc:nonce:plivo:<sha256>``: Plivo signature nonces seen in the last hour;
* ``streamsvc:commands:<instance>`` and ``streamsvc:replies:<client>``: the pub/sub
  channels talk-back goes through.

:class:`Consumer` reads the events through a consumer group, at least once;
:class:`Fleet` sends audio, marks and ``clear`` to a stream on whichever instance owns it,
and hands a call to a person.
"""

from __future__ import annotations

from streamsvc.fleet.client import Consumer, Entry, Fleet, FleetError
from streamsvc.fleet.keys import (
    AUDIO_PREFIX,
    CALL_PREFIX,
    COMMANDS_PREFIX,
    CONTEXT_PREFIX,
    EVENTS_STREAM,
    REGISTRY_PREFIX,
    audio_key,
    call_key,
    commands_channel,
    context_key,
    registry_key,
)

__all__ = [
    "AUDIO_PREFIX",
    "CALL_PREFIX",
    "COMMANDS_PREFIX",
    "CONTEXT_PREFIX",
    "EVENTS_STREAM",
    "REGISTRY_PREFIX",
    "Consumer",
    "Entry",
    "Fleet",
    "FleetError",
    "audio_key",
    "call_key",
    "commands_channel",
    "context_key",
    "registry_key",
]
