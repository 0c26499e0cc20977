"""Context goes with the call: one record of everything known about it, enriched by
handlers, read by the agent's app (``GET /calls/<call id>/context``), on one instance and
across a fleet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streamsvc.config import Route, Settings
from streamsvc.exceptions import LocalProtocolError
from streamsvc.handlers import Handler, HandlerSpec
from streamsvc.live import LiveSession
from streamsvc.replay import replay
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import CallSummary

from .conftest import LogEvents, events, until
from .fleet_support import RedisServer
from .test_conformance import read_context
from .test_session import start

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "context-api-token"


def started_session(*, max_bytes: int = 16384) -> tuple[LiveSession, list[list[str]]]:
    told: list[list[str]] = []
    session = LiveSession(wake=lambda: None, context_updated=lambda names: told.append(
        list(names)), context_max_bytes=max_bytes)
    session.receive_message(start(parameters={"customerId": "cus_8812"}))
    session.events_received()
    session.set_context(session.custom_parameters)
    return session, told


def test_a_handler_adds_to_the_calls_context_and_the_server_is_told_the_names() -> None:
    session, told = started_session()
    session.update_context({"account": "12345678", "intent": "billing"})
    session.update_context({"intent": "cancel"})
    assert {"customerId": "cus_8812", "account": "12345678", "intent": "cancel"} == dict(
        session.context)
    assert [["account", "intent"], ["intent"]] == told
    assert session.context_updated_at is not None
    with pytest.raises(TypeError):
        session.context["account"] = "x"  # type: ignore[index]


def test_an_update_past_context_max_bytes_raises_and_changes_nothing() -> None:
    session, told = started_session(max_bytes=256)
    before = dict(session.context)
    with pytest.raises(LocalProtocolError, match="context_max_bytes"):
        session.update_context({"notes": "n" * 300})
    assert (before, []) == (dict(session.context), told)


@pytest.mark.parametrize("value", [3, None, b"bytes"])
def test_context_values_are_text(value: object) -> None:
    session, _ = started_session()
    with pytest.raises(TypeError, match="text"):
        session.update_context({"n": value})  # type: ignore[dict-item]


class _Digits(Handler):
    """Collects the caller's digits into the call's context."""

    def on_start(self, session: LiveSession) -> None:
        self.session = session

    def on_dtmf(self, event: object) -> None:
        digits = self.session.context.get("account", "") + str(getattr(event, "digit", ""))
        self.session.update_context({"account": digits})

    def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        session.update_context({"intent": "billing"})


async def test_without_a_token_configured_the_context_path_is_not_there(
        logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, routes=(Route("/stream", ()),)))
    await server.start()
    try:
        await replay([load_fixture(FIXTURES / "inbound_params.jsonl")],
                     f"ws://127.0.0.1:{server.port}/stream", speed=0)
        status, _ = await asyncio.to_thread(read_context, server.port,
                                            "CA00000000000000000000000000000101")
    finally:
        await server.stop()
    assert 404 == status
    assert ["not_found"] == [line["reason"] for line in events(logs, "http.rejected")]


async def test_in_a_fleet_any_instance_answers_with_what_another_ones_handlers_added(
        tmp_path: Path, transport: str, logs: LogEvents) -> None:
    store = RedisServer(tmp_path)
    store.start()
    route = (Route("/stream", (HandlerSpec("digits", _Digits),)),)
    servers = [StreamServer(Settings(port=0, routes=route, redis_url=store.url,
                                     instance_id=name, transport=transport,
                                     context_api_token=TOKEN)) for name in ("a", "b")]
    for server in servers:
        await server.start()
    a, b = servers
    try:
        fixture = load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl")  # keys 42#
        report = await replay([fixture], f"ws://127.0.0.1:{a.port}/stream", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: events(logs, "stream.stopped"))
        assert a.fleet is not None
        await a.fleet.flush(within_s=2)
        status, answer = await asyncio.to_thread(read_context, b.port,
                                                 fixture.expect["call_sid"], TOKEN)
    finally:
        for server in servers:
            await server.stop()
        store.stop()
    assert 200 == status
    assert {**fixture.expect["custom_parameters"], "account": "42#",
            "intent": "billing"} == answer["context"]


def docs_handler(name: str) -> type[Handler]:
    """A handler class the docs page defines, from its ``python`` block as it is written."""
    page = (Path(__file__).parent.parent / "docs" / "context.md").read_text(encoding="utf-8")
    namespace: dict[str, object] = {}
    for block in page.split("```python\n")[1:]:
        exec(compile(block.split("```", 1)[0], "docs/context.md", "exec"), namespace)
    handler = namespace[name]
    assert isinstance(handler, type)
    return handler


async def test_the_docs_account_collector_runs_and_the_agent_reads_what_it_learned(
        transport: str, logs: LogEvents) -> None:
    collector = docs_handler("AccountCollector")
    server = StreamServer(Settings(port=0, transport=transport, context_api_token=TOKEN,
                                   routes=(Route("/stream", (HandlerSpec("accounts",
                                                                         collector),)),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "bidirectional_dtmf_marks.jsonl")  # keys 42#
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/stream", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: events(logs, "stream.stopped"))
        status, answer = await asyncio.to_thread(read_context, server.port,
                                                 fixture.expect["call_sid"], TOKEN)
    finally:
        await server.stop()
    assert 200 == status
    assert ("42", "3") == (answer["context"]["account"], answer["context"]["pressed"])
