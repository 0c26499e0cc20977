"""``forward`` fit for real speech-to-text services: URL and header templates filled from
the call, an audio-only service (``messages = "none"``) with its own closing message, and
a JSON-speaking one, each against a local stand-in of that style."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from streamsvc.builtins.forward import ForwardHandler
from streamsvc.config import ConfigError, Route, Settings
from streamsvc.handlers import resolve_handler
from streamsvc.replay import replay
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, SttStandIn, events, stt_stand_in, until

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture
async def service() -> AsyncIterator[SttStandIn]:
    async with stt_stand_in() as stand_in:
        yield stand_in


async def run_call(service: SttStandIn, options: dict[str, object], logs: LogEvents) -> None:
    forward = resolve_handler("forward", options, key="handlers")
    server = StreamServer(Settings(port=0, routes=(Route("/stream", (forward,)),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/stream", speed=0)
        assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: events(logs, "stream.stopped"))
    finally:
        await server.stop()


async def test_an_audio_only_service_gets_its_url_headers_audio_and_closing_message(
        service: SttStandIn, logs: LogEvents) -> None:
    await run_call(service, {
        "url": f"ws://127.0.0.1:{service.port}/v1/listen?encoding=linear16"
               "&sample_rate={sample_rate}&call={call_sid}&customer={customerId}"
               "&tag={provider}/{encoding}",
        "headers": {"Authorization": "Token key-for-{customerId}"},
        "messages": "none", "close_message": '{"type":"CloseStream"}', "linger_s": 0.2,
    }, logs)
    [(path, headers)] = service.requests
    [messages] = service.messages
    query = parse_qs(urlsplit(path).query)
    [started] = events(logs, "stream.started")
    assert ({"encoding": ["linear16"], "sample_rate": ["8000"],
             "call": [started["call_sid"]], "customer": ["cus_8812"],
             "tag": ["twilio/pcm16"]}, "Token key-for-cus_8812") == (
        query, headers["authorization"])
    [stopped] = events(logs, "stream.stopped")
    assert ([bytes] * stopped["frames"]["inbound"] + [str]) == [type(m) for m in messages]
    assert '{"type":"CloseStream"}' == messages[-1]
    assert f"ws://127.0.0.1:{service.port}/v1/listen" == stopped["handlers"]["forward"]["url"]


async def test_a_json_service_gets_the_start_events_and_stop_then_its_closing_message(
        service: SttStandIn, logs: LogEvents) -> None:
    await run_call(service, {"url": f"ws://127.0.0.1:{service.port}/stream/{{call_sid}}",
                             "close_message": '{"event":"flush"}', "linger_s": 0.2}, logs)
    [(path, _)] = service.requests
    [messages] = service.messages
    texts = [orjson.loads(m) for m in messages if isinstance(m, str)]
    [started] = events(logs, "stream.started")
    assert (f"/stream/{started['call_sid']}", ["start", "stop", "flush"]) == (
        path, [t.get("event") for t in texts][:1] + [t.get("event") for t in texts][-2:])
    assert {"event": "flush"} == texts[-1]


@pytest.mark.parametrize(("options", "said"), [
    ({"url": "ws://x/{call.sid}"}, "a template names"),
    ({"url": "ws://x/{call_sid!r}"}, "a template names"),
    ({"url": "ws://x/{"}, "not a template"),
    ({"url": "ws://x", "headers": {"A": 5}}, "must be text"),
    ({"url": "ws://x", "messages": "some"}, "messages must be all or none"),
    ({"url": "ws://x", "messages": "none", "tracks": ["inbound", "outbound"]}, "one track"),
    ({"url": "http://x/{call_sid}"}, "ws:// or wss://"),
    ({"url": "ws://x", "batch_ms": 30}, "batch_ms must be a multiple of 20"),
    ({"url": "ws://x", "batch_ms": 0}, "batch_ms must be a multiple of 20"),
    ({"url": "ws://x", "batch_ms": 1020}, "batch_ms must be a multiple of 20"),
    ({"url": "ws://x", "batch_ms": True}, "batch_ms must be a multiple of 20"),
    ({"url": "ws://x", "client": "aiohttp"}, "client must be auto, picows or websockets"),
])
def test_options_no_call_could_run_with_fail_at_start_up(options: dict[str, object],
                                                         said: str) -> None:
    with pytest.raises(ConfigError, match=said):
        resolve_handler("forward", options, key="handlers")
    with pytest.raises(ValueError, match=said):
        ForwardHandler(**options)  # type: ignore[arg-type]
