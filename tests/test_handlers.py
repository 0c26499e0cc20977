"""The handler chain: order, containment of failures, bounded queues, on_stop once."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from streamsvc import wire
from streamsvc.builtins.log import LogHandler
from streamsvc.chain import HandlerChain
from streamsvc.exceptions import ConfigError
from streamsvc.handlers import (
    AsyncHandler,
    Handler,
    HandlerSpec,
    resolve_handler,
)
from streamsvc.session import CallSummary, Session

START = json.dumps({"event": "start", "start": {
    "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
}})


def media(timestamp: int) -> wire.Media:
    event = wire.parse(json.dumps({"event": "media", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": str(timestamp),
        "payload": base64.b64encode(bytes(160)).decode()}}))
    assert isinstance(event, wire.Media)
    return event


DTMF = wire.parse('{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"7"}}')


def started_session() -> Session:
    session = Session()
    session.receive_message(START)
    session.events_received()
    return session


class Recording(Handler):
    """Inline handler that records what it was given."""

    def __init__(self, calls: list[str], *, fail_on: str | None = None) -> None:
        self.calls = calls
        self.fail_on = fail_on

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_on:
            raise RuntimeError(f"boom in {name}")

    def on_start(self, session: Session) -> None:
        self._record("start")

    def on_media(self, frame: wire.Media) -> None:
        self._record("media")

    def on_dtmf(self, event: wire.Dtmf) -> None:
        self._record("dtmf")

    def on_stop(self, session: Session, summary: CallSummary) -> None:
        self._record("stop")


class SlowQueued(AsyncHandler):
    queue_size = 3

    def __init__(self, calls: list[str], release: asyncio.Event) -> None:
        self.calls = calls
        self.release = release

    async def on_start(self, session: Session) -> None:
        self.calls.append("start")
        await self.release.wait()

    async def on_media(self, frame: wire.Media) -> None:
        self.calls.append(f"media:{frame.timestamp_ms}")

    async def on_stop(self, session: Session, summary: CallSummary) -> None:
        self.calls.append("stop")


def spec(name: str, factory: Any, **options: Any) -> HandlerSpec:
    return HandlerSpec(name, factory, options)


def run_call(chain: HandlerChain, *events: wire.Event) -> Session:
    session = started_session()
    chain.start(session)
    for event in events:
        chain.dispatch(event)
    chain.stop(session, session.close("stop"))
    return session


def test_inline_handlers_get_every_event_in_order() -> None:
    calls: list[str] = []
    chain = HandlerChain((spec("rec", Recording, calls=calls),))
    run_call(chain, media(99), DTMF, media(119))
    assert ["start", "media", "dtmf", "media", "stop"] == calls


def test_a_raising_handler_is_disabled_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken: list[str] = []
    healthy: list[str] = []
    chain = HandlerChain((
        spec("broken", Recording, calls=broken, fail_on="media"),
        spec("healthy", Recording, calls=healthy),
    ))
    run_call(chain, media(99), media(119), DTMF)
    assert ["start", "media"] == broken  # disabled after its first failure, no on_stop
    assert ["start", "media", "media", "dtmf", "stop"] == healthy
    assert {"broken": 1} == chain.errors()


def test_a_failing_factory_leaves_only_that_handler_out() -> None:
    def explode() -> Handler:
        raise ValueError("cannot open")

    calls: list[str] = []
    chain = HandlerChain((spec("bad", explode), spec("rec", Recording, calls=calls)))
    run_call(chain, media(99))
    assert ["start", "media", "stop"] == calls
    assert {"bad": 1} == chain.errors()


def test_on_stop_runs_once_however_often_stop_is_called() -> None:
    calls: list[str] = []
    chain = HandlerChain((spec("rec", Recording, calls=calls),))
    session = run_call(chain)
    chain.stop(session, session.close("closed"))
    assert 1 == calls.count("stop")


async def test_queued_handler_drops_media_when_behind_and_never_blocks() -> None:
    calls: list[str] = []
    fast: list[str] = []
    release = asyncio.Event()
    chain = HandlerChain((
        spec("slow", SlowQueued, calls=calls, release=release),
        spec("fast", Recording, calls=fast),
    ))
    session = started_session()
    chain.start(session)
    await asyncio.sleep(0)  # the slow handler is now stuck in on_start
    for i in range(10):
        chain.dispatch(media(99 + 20 * i))  # returns at once: the queue takes or drops
    chain.stop(session, session.close("stop"))
    assert 10 == fast.count("media")
    assert {"slow": 7} == chain.drops()  # start is consumed; 3 media fit, 7 dropped
    release.set()
    await chain.wait_stopped(grace_s=5)
    assert ["start", "media:99", "media:119", "media:139", "stop"] == calls


async def test_a_queued_handlers_queue_is_bounded_in_bytes_too() -> None:
    class BigQueue(SlowQueued):
        queue_size = 10_000
        max_queue_bytes = 160 * 4  # four frames' audio

    calls: list[str] = []
    release = asyncio.Event()
    chain = HandlerChain((spec("slow", BigQueue, calls=calls, release=release),))
    session = started_session()
    chain.start(session)
    await asyncio.sleep(0)  # stuck in on_start
    for i in range(100):
        chain.dispatch(media(99 + 20 * i))
    assert {"slow": 96} == chain.drops()
    chain.stop(session, session.close("stop"))
    release.set()
    await chain.wait_stopped(grace_s=5)
    assert 4 == sum(call.startswith("media") for call in calls)


async def test_queued_handler_that_hangs_in_on_stop_is_cancelled_after_the_grace() -> None:
    class Hangs(AsyncHandler):
        async def on_stop(self, session: Session, summary: CallSummary) -> None:
            await asyncio.Event().wait()

    chain = HandlerChain((spec("hangs", Hangs),))
    run_call(chain)
    await chain.wait_stopped(grace_s=0.05)
    assert all(task.done() for task in asyncio.all_tasks() if task.get_name() == "handler:hangs")


async def test_queued_handler_that_raises_is_disabled_but_stops_cleanly() -> None:
    class Raises(AsyncHandler):
        async def on_media(self, frame: wire.Media) -> None:
            raise OSError("disk full")

    chain = HandlerChain((spec("raises", Raises),))
    run_call(chain, media(99), media(119))
    await chain.wait_stopped(grace_s=5)
    assert {"raises": 1} == chain.errors()


class InlineMediaQueued(SlowQueued):
    """A queued handler whose on_media is plain: called inline once on_start is done."""

    def on_media(self, frame: wire.Media) -> None:  # type: ignore[override]
        self.calls.append(f"media:{frame.timestamp_ms}")

    async def on_dtmf(self, event: wire.Dtmf) -> None:
        self.calls.append("dtmf")
        await asyncio.sleep(0.01)


async def test_a_plain_on_media_of_a_queued_handler_runs_inline_after_on_start_in_order(
) -> None:
    calls: list[str] = []
    release = asyncio.Event()
    chain = HandlerChain((spec("q", InlineMediaQueued, calls=calls, release=release),))
    session = started_session()
    chain.start(session)
    await asyncio.sleep(0)  # stuck in on_start: media waits in the queue, in order
    chain.dispatch(media(99))
    chain.dispatch(media(119))
    assert ["start"] == calls
    release.set()
    await asyncio.sleep(0.01)
    assert ["start", "media:99", "media:119"] == calls
    chain.dispatch(media(139))  # queue empty, on_start done: called right here
    assert "media:139" == calls[-1]
    chain.dispatch(DTMF)  # queued; media after it must wait its turn
    chain.dispatch(media(159))
    assert "media:159" not in calls
    summary = await chain.finish(session, session.close("stop"), grace_s=5)
    assert ["start", "media:99", "media:119", "media:139", "dtmf", "media:159", "stop"] == calls
    assert {} == chain.errors() == summary.handlers


async def test_a_raising_inline_on_media_of_a_queued_handler_disables_it() -> None:
    class Raises(AsyncHandler):
        stopped = False

        def on_media(self, frame: wire.Media) -> None:
            raise OSError("disk full")

        async def on_stop(self, session: Session, summary: CallSummary) -> None:
            Raises.stopped = True

    chain = HandlerChain((spec("raises", Raises),))
    session = started_session()
    chain.start(session)
    await asyncio.sleep(0)
    chain.dispatch(media(99))
    chain.dispatch(media(119))
    await chain.finish(session, session.close("stop"), grace_s=5)
    assert ({"raises": 1}, False) == (chain.errors(), Raises.stopped)


async def test_a_batching_handler_gets_everything_in_order_and_finishes_promptly() -> None:
    seen: list[int] = []

    class Batching(AsyncHandler):
        batch_ms = 50

        async def on_media(self, frame: wire.Media) -> None:
            seen.append(frame.timestamp_ms)

    chain = HandlerChain((spec("b", Batching),))
    session = started_session()
    chain.start(session)
    for i in range(20):
        chain.dispatch(media(99 + 20 * i))
        await asyncio.sleep(0.001)
    assert len(seen) < 20  # gathered, not handled one wake-up at a time
    loop = asyncio.get_running_loop()
    began = loop.time()
    await chain.finish(session, session.close("stop"), grace_s=5)
    assert [99 + 20 * i for i in range(20)] == seen
    assert loop.time() - began < 1.0


def test_builtin_and_import_string_handlers_resolve() -> None:
    assert LogHandler is resolve_handler("log", {}, key="k").factory
    resolved = resolve_handler("tests.test_handlers:Recording", {"calls": []}, key="k")
    assert Recording is resolved.factory


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        pytest.param("nope", {}, "unknown handler 'nope'", id="unknown-name"),
        pytest.param("no_such_module_xyz:H", {}, "cannot import", id="missing-module"),
        pytest.param("tests.test_handlers:Missing", {}, "no callable 'Missing'",
                     id="missing-attribute"),
        pytest.param("log", {"colour": "red"}, "options do not fit handler 'log'",
                     id="unexpected-option"),
        pytest.param("tests.test_handlers:Recording", {}, "options do not fit",
                     id="missing-option"),
    ],
)
def test_bad_handler_config_names_the_key(name: str, options: dict[str, Any],
                                          message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_handler(name, options, key="routes[0].handlers")
    assert "routes[0].handlers" == caught.value.key
    assert message in caught.value.message


async def test_queue_size_option_bounds_a_queued_handler() -> None:
    calls: list[str] = []
    release = asyncio.Event()
    resolved = resolve_handler("tests.test_handlers:SlowQueued",
                               {"calls": calls, "release": release, "queue_size": 5}, key="k")
    assert ({"calls": calls, "release": release}, 5) == (resolved.options, resolved.queue_size)
    chain = HandlerChain((resolved,))
    session = started_session()
    chain.start(session)
    await asyncio.sleep(0)
    for i in range(10):
        chain.dispatch(media(99 + 20 * i))
    assert {resolved.name: 5} == chain.drops()
    release.set()
    chain.stop(session, session.close("stop"))
    await chain.wait_stopped(grace_s=5)


def test_queue_size_must_be_a_positive_whole_number() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_handler("log", {"queue_size": 0}, key="k")
    assert "handlers.log.queue_size" == caught.value.key
