"""Shared fixtures: captured log events, and a way to wait for what the server does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve

LogEvents = list[dict[str, Any]]

# Each provider of the registry's bundled fixture: the suites that run every provider
# (conformance, liberal codecs, reliability) take them from here.
BUNDLED = {
    "twilio": "inbound_params.jsonl",
    "signalwire": "signalwire_params.jsonl",
    "telnyx": "telnyx_params.jsonl",
    "exotel": "exotel_voicebot.jsonl",
    "plivo": "plivo_stream.jsonl",
    "vonage": "vonage_connect.jsonl",
    "acs": "acs_mixed.jsonl",
    "genesys": "genesys_audiohook.jsonl",
    "asterisk": "asterisk_json.jsonl",
    "jambonz": "jambonz_listen.jsonl",
}


@pytest.fixture
def logs() -> Iterator[LogEvents]:
    """Every structlog event emitted during the test, as dicts."""
    with capture_logs() as captured:
        yield captured  # type: ignore[misc]


def events(logs: LogEvents, name: str) -> LogEvents:
    """The captured events called ``name``, in order."""
    return [entry for entry in logs if entry["event"] == name]


def outcome_of(logs: LogEvents, stream_sid: str | None) -> dict[str, dict[str, Any]]:
    """One stream's ``stream.started`` and ``stream.stopped`` lines, by event name (what
    :func:`streamsvc.replay.check.differences` compares with a fixture's ``expect``)."""
    return {event: line for event in ("stream.started", "stream.stopped")
            for line in events(logs, event) if line["stream_sid"] == stream_sid}


async def until(predicate: Callable[[], object]) -> None:
    """Wait until ``predicate()`` holds (what the server logs or records), for up to 5 s."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met within 5 s")


@pytest.fixture(params=["websockets", "picows"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport the server can run on: the tests that take this run on both."""
    return str(request.param)


class SttStandIn:
    """A speech-to-text service's stand-in for ``forward``: each connection's request
    (path, headers) and the messages it received."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.messages: list[list[str | bytes]] = []

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    async def handle(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        self.requests.append((connection.request.path, dict(connection.request.headers)))
        received: list[str | bytes] = []
        self.messages.append(received)
        with contextlib.suppress(Exception):
            async for message in connection:
                received.append(message)


@contextlib.asynccontextmanager
async def stt_stand_in() -> AsyncIterator[SttStandIn]:
    """A :class:`SttStandIn` listening on a free loopback port."""
    stand_in = SttStandIn()
    async with serve(stand_in.handle, "127.0.0.1", 0) as listening:
        stand_in.port = listening.sockets[0].getsockname()[1]
        yield stand_in
