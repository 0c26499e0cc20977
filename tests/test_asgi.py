"""streamsvc mounted in a FastAPI app under uvicorn: the same streams (a Twilio fixture, a
Genesys session with its protocol answers, jambonz's subprotocol), webhooks, probes,
metrics and signature checks as the standalone server, under the mount's prefix."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamsvc.asgi import StreamsvcApp
from streamsvc.config import Route, Settings
from streamsvc.handlers import resolve_handler
from streamsvc.replay import Signing, replay
from streamsvc.replay.check import differences
from streamsvc.replay.fixture import load_fixture

from .conftest import LogEvents, events, outcome_of, until

FIXTURES = Path(__file__).parent.parent / "fixtures"
GENESYS_KEY, GENESYS_SECRET = "genesys-api-key", "c2VjcmV0LW9mLXRoZS1pbnRlZ3JhdGlvbg=="


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def mounted() -> AsyncIterator[tuple[int, StreamsvcApp]]:
    log = resolve_handler("log", {}, key="handlers")
    voice = StreamsvcApp(Settings(routes=(
        Route("/stream", (log,)), Route("/connect", (log,), bidirectional=True),
        Route("/genesys", (log,), provider="genesys"),
        Route("/jambonz", (log,), provider="jambonz")),
        genesys_api_key=GENESYS_KEY, genesys_client_secret=GENESYS_SECRET,
        public_url="http://127.0.0.1/voice"))
    app = FastAPI(lifespan=voice.lifespan)

    @app.get("/")
    def home() -> dict[str, str]:
        return {"app": "the host's own"}

    app.mount("/voice", voice)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on", ws="auto"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    await started(server, serving)
    try:
        yield port, voice
    finally:
        server.should_exit = True
        await serving


async def started(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    """Wait until uvicorn listens (or say why it stopped)."""
    await until(lambda: server.started or serving.done())
    if serving.done():
        serving.result()
    assert server.started


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_a_fixture_replays_through_the_mounted_service_to_its_expected_outcome(
        mounted: tuple[int, StreamsvcApp], logs: LogEvents) -> None:
    port, _ = mounted
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    report = await replay([fixture], f"ws://127.0.0.1:{port}/voice/stream", speed=0)
    [session] = report.sessions
    assert session.ok, session.error
    await until(lambda: events(logs, "stream.stopped"))
    assert [] == differences(fixture.expect, outcome_of(logs, session.stream_sid))


async def test_webhooks_probes_and_metrics_answer_under_the_prefix(
        mounted: tuple[int, StreamsvcApp]) -> None:
    port, _ = mounted
    answers = await asyncio.gather(*(asyncio.to_thread(get, port, path) for path in (
        "/voice/healthz", "/voice/metrics", "/voice/nowhere", "/")))
    (health, _), (metrics, body), (missing, _), (home, own) = answers
    assert (200, 200, 404, 200) == (health, metrics, missing, home)
    assert b"streamsvc_" in body
    assert b"the host's own" in own
    twiml = await asyncio.to_thread(post, port, "/voice/twiml/stream", b"CallSid=CA1")
    assert 'url="ws://127.0.0.1/voice/stream"' in twiml


def post(port: int, path: str, body: bytes) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


async def test_genesys_is_answered_and_its_signature_checked_through_the_mount(
        mounted: tuple[int, StreamsvcApp], logs: LogEvents) -> None:
    port, _ = mounted
    fixture = load_fixture(FIXTURES / "genesys_audiohook.jsonl")
    url = f"ws://127.0.0.1:{port}/voice/genesys"
    signed = await replay([fixture], url, speed=0, signing=Signing(
        public_url="http://127.0.0.1/voice", genesys_api_key=GENESYS_KEY,
        genesys_client_secret=GENESYS_SECRET))
    assert signed.sessions[0].ok, signed.sessions[0].error
    await until(lambda: events(logs, "stream.stopped"))
    assert [] == differences(fixture.expect, outcome_of(logs, signed.sessions[0].stream_sid))
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert 403 == refused.value.response.status_code


async def test_the_jambonz_subprotocol_is_named_through_the_mount(
        mounted: tuple[int, StreamsvcApp]) -> None:
    port, _ = mounted
    async with connect(f"ws://127.0.0.1:{port}/voice/jambonz",
                       subprotocols=["audio.jambonz.org"]) as connection:  # type: ignore[list-item]
        assert "audio.jambonz.org" == connection.subprotocol


async def test_the_hosts_shutdown_closes_the_calls_in_progress(logs: LogEvents) -> None:
    voice = StreamsvcApp(Settings(routes=(Route("/stream", ()),)))
    app = FastAPI(lifespan=voice.lifespan)
    app.mount("/voice", voice)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on", ws="auto"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    await started(server, serving)
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    async with connect(f"ws://127.0.0.1:{port}/voice/stream") as connection:
        for frame in fixture.frames[:20]:
            await connection.send(frame.text)
        await until(lambda: events(logs, "stream.started"))
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(connection.recv(), 10)
    await serving
    [stopped] = events(logs, "stream.stopped")
    assert "shutdown" == stopped["reason"]


async def test_the_docs_example_mounts_and_serves(logs: LogEvents) -> None:
    page = (Path(__file__).parent.parent / "docs" / "asgi.md").read_text(encoding="utf-8")
    [code] = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/asgi.md", "exec"), namespace)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(namespace["app"], host="127.0.0.1", port=port,
                                           log_config=None, lifespan="on", ws="auto"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    await started(server, serving)
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        report = await replay([fixture], f"ws://127.0.0.1:{port}/voice/stream", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
    finally:
        server.should_exit = True
        await serving
    assert 1 == len(events(logs, "stream.stopped"))
