"""A fleet on Redis, end to end: real redis-server and nginx, streamsvc instances in their
own processes, the real replay client (and its webhook-driven call mode)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from streamsvc.config import Route, Settings
from streamsvc.fleet import Consumer, Entry, Fleet, FleetError, audio_key
from streamsvc.handlers import Handler, HandlerSpec, RawFrame
from streamsvc.providers.signature import SIGNATURE_HEADER, sign
from streamsvc.replay import replay
from streamsvc.replay.call import CallLeg, replay_call
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.session import CallSummary, Session

from .fleet_support import Nginx, RedisServer, Service, free_port, metric

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOKEN = "fleet-test-token"
PUBLIC = "http://voice.example.test"
CONFIG = """
[[routes]]
path = "/stream"
handlers = ["log"]
publish_audio = true

[[routes]]
path = "/connect"
handlers = ["log"]
bidirectional = true

[[routes]]
path = "/acs"
handlers = ["log"]
provider = "acs"
"""
NOTES = "n" * 1500  # far over the 800-byte budget of the <Parameter>s


def environment(redis_url: str, public_url: str = PUBLIC, **extra: str) -> dict[str, str]:
    return {"STREAMSVC_REDIS_URL": redis_url, "STREAMSVC_PUBLIC_URL": public_url,
            "TWILIO_AUTH_TOKEN": TOKEN, "STREAMSVC_DRAIN_TIMEOUT_S": "8", **extra}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """Two instances sharing one Redis (no load balancer: tests pick the instance)."""
    directory = tmp_path_factory.mktemp("pair")
    a = Service(directory, "a", port=free_port(), config=CONFIG,
                env=environment(redis_server.url))
    b = Service(directory, "b", port=free_port(), config=CONFIG,
                env=environment(redis_server.url))
    yield a, b
    a.stop()
    b.stop()


def call_in_thread(coroutine: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``coroutine`` (a replay) on its own loop in a thread; its result lands in the
    returned list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(coroutine)), daemon=True)
    thread.start()
    return thread, out


def post_status(port: int, fields: dict[str, str]) -> int:
    url = f"http://127.0.0.1:{port}/stream-status"
    signature = sign(TOKEN, PUBLIC + "/stream-status", fields.items())
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                     method="POST", headers={SIGNATURE_HEADER: signature})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


def entries(redis_url: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [(i.decode(), {k.decode(): v for k, v in fields.items()})
                for i, fields in client.xrange(key)]
    finally:
        client.close()


def test_a_webhook_on_one_instance_gives_the_whole_context_to_the_stream_on_another(
        pair: tuple[Service, Service], redis_server: RedisServer) -> None:
    a, b = pair
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    thread, out = call_in_thread(replay_call(
        fixture, f"http://127.0.0.1:{a.port}/twiml", speed=1.0, auth_token=TOKEN,
        public_url=PUBLIC, fields={"customer": "c-42", "notes": NOTES},
        stream_url=f"ws://127.0.0.1:{b.port}/stream"))
    served = a.wait_for("twiml.served")
    started = b.wait_for("stream.started", lambda e: e["call_sid"] == served["call_sid"])

    # The TwiML kept its <Parameter>s within budget; the stream got the whole context.
    assert NOTES == started["context"]["notes"]
    assert "c-42" == started["context"]["customer"]
    assert len(started["custom_parameters"].get("notes", "")) < len(NOTES)
    assert started["resumed_from"] is None

    # A status callback on A for the stream live on B says it is live, and where.
    assert 204 == post_status(a.port, {"StreamSid": started["stream_sid"],
                                       "CallSid": started["call_sid"],
                                       "StreamEvent": "stream-started"})
    status = a.wait_for("stream.status", lambda e: e["stream_sid"] == started["stream_sid"])
    assert (True, "/stream", "b") == (status["live"], status["path"], status["instance"])

    thread.join(timeout=30)
    [leg] = out[0]
    assert leg.result.ok, leg.result.error
    stopped = b.wait_for("stream.stopped", lambda e: e["stream_sid"] == started["stream_sid"])
    assert {"inbound": 204} == stopped["frames"]
    budget = stopped["context_budget"]  # the webhook's report, from A through Redis
    assert budget is not None
    assert "notes" in budget["dropped"] + budget["truncated"]

    # The events stream has the call's events with the log lines' fields.
    mine = [(fields["event"].decode(), json.loads(fields["data"]))
            for _, fields in entries(redis_server.url, "streamsvc:events")
            if json.loads(fields["data"]).get("call_sid") == started["call_sid"]]
    kinds = [kind for kind, _ in mine]
    assert {"stream.started", "stream.status", "stream.stopped"} <= set(kinds)
    data = dict(mine)["stream.started"]
    assert (started["stream_sid"], NOTES) == (data["stream_sid"], data["context"]["notes"])
    assert {"inbound": 204} == dict(mine)["stream.stopped"]["frames"]

    # publish_audio: the call's audio as PCM16 batches of 200 ms.
    audio = entries(redis_server.url, audio_key(started["stream_sid"]))
    assert 204 * 160 * 2 == sum(len(fields["audio"]) for _, fields in audio)
    first = audio[0][1]
    assert (b"inbound", b"pcm16", b"8000") == (first["track"], first["encoding"],
                                                first["sample_rate"])
    assert 10 * 160 * 2 == len(first["audio"])  # 200 ms


def test_an_acs_incoming_call_on_one_instance_gives_its_context_to_the_media_on_another(
        pair: tuple[Service, Service]) -> None:
    a, b = pair
    fixture = load_fixture(FIXTURES / "acs_mixed.jsonl")
    report = asyncio.run(replay([fixture], f"ws://127.0.0.1:{b.port}/acs", speed=0,
                                acs_events_url=f"http://127.0.0.1:{a.port}/acs/events"))
    assert 0 == report.failed, report.sessions[0].error
    a.wait_for("acs.incoming_call")
    started = b.wait_for("stream.started", lambda e: e["provider"] == "acs")
    expected = fixture.expect["custom_parameters"]
    assert expected == started["custom_parameters"]  # from A's IncomingCall, via Redis
    assert expected.items() <= started["context"].items()
    assert fixture.expect["call_sid"] == started["call_sid"]


def test_a_worker_anywhere_marks_a_stream_and_learns_it_was_played(
        pair: tuple[Service, Service], redis_server: RedisServer) -> None:
    _, b = pair
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    thread, out = call_in_thread(replay_call(
        fixture, f"http://127.0.0.1:{b.port}/twiml/connect", speed=1.0, auth_token=TOKEN,
        public_url=PUBLIC, stream_url=f"ws://127.0.0.1:{b.port}/connect"))
    started = b.wait_for("stream.started", lambda e: e["path"] == "/connect")

    async def worker() -> tuple[str, str]:
        async with Fleet(redis_server.url) as fleet:
            owner = await fleet.owner(started["stream_sid"])
            assert owner is not None
            await fleet.send_audio(started["stream_sid"], bytes(3200), sample_rate=8000)
            outcome = await fleet.mark(started["stream_sid"], "remote-mark", timeout_s=10)
            with pytest.raises(FleetError, match="no live stream"):
                await fleet.mark("MZ-nobody", "x")
            return owner["instance"], outcome

    instance, outcome = asyncio.run(worker())
    assert ("b", "played") == (instance, outcome)
    thread.join(timeout=30)
    [leg] = out[0]
    assert "remote-mark" in leg.result.marks_played
    assert leg.result.audio_bytes_received >= 1600  # 200 ms of 8 kHz mu-law


def test_talk_back_is_refused_on_a_unidirectional_stream(
        pair: tuple[Service, Service], redis_server: RedisServer) -> None:
    a, _ = pair
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    thread, _ = call_in_thread(replay_call(
        fixture, f"http://127.0.0.1:{a.port}/twiml", speed=1.0, auth_token=TOKEN,
        public_url=PUBLIC, stream_url=f"ws://127.0.0.1:{a.port}/stream"))
    started = a.wait_for("stream.started",
                         lambda e: e["path"] == "/stream" and e["stream_sid"] not in {
                             x["stream_sid"] for x in a.events("stream.stopped")})

    async def worker() -> None:
        async with Fleet(redis_server.url) as fleet:
            with pytest.raises(FleetError, match="unidirectional"):
                await fleet.mark(started["stream_sid"], "nope")

    asyncio.run(worker())
    thread.join(timeout=30)


def test_a_consumer_group_gets_every_event_once_and_claims_a_dead_consumers(
        pair: tuple[Service, Service], redis_server: RedisServer) -> None:
    a, _ = pair
    url = redis_server.url
    group = f"workers-{time.monotonic_ns()}"
    fixture = load_fixture(FIXTURES / "no_custom_parameters.jsonl")

    async def scenario() -> tuple[list[Entry], list[Entry], list[Entry], set[str]]:
        first = Consumer(url, group, "one", claim_idle_ms=60_000, block_ms=100)
        second = Consumer(url, group, "two", claim_idle_ms=60_000, block_ms=100)
        await first.ensure_group()
        seen_one: list[Entry] = []
        seen_two: list[Entry] = []
        tasks = [asyncio.create_task(first.run(seen_one.append)),
                 asyncio.create_task(second.run(seen_two.append))]
        report = await replay([fixture], f"ws://127.0.0.1:{a.port}/stream", speed=0,
                              concurrency=4, auth_token=TOKEN, public_url=PUBLIC)
        assert 0 == report.failed
        sids = {session.stream_sid for session in report.sessions}
        for _ in range(500):
            ours = [e for e in seen_one + seen_two if e.data.get("stream_sid") in sids]
            if len(ours) >= 8:
                break
            await asyncio.sleep(0.02)
        first.stop()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

        # A consumer that dies holding entries: the group hands them to another.
        doomed = Consumer(url, group, "doomed", claim_idle_ms=60_000, block_ms=100)
        holding = asyncio.Event()

        async def hang(entry: Entry) -> None:
            holding.set()
            await asyncio.Event().wait()

        dying = asyncio.create_task(doomed.run(hang))
        await replay([fixture], f"ws://127.0.0.1:{a.port}/stream", speed=0,
                     auth_token=TOKEN, public_url=PUBLIC)
        await asyncio.wait_for(holding.wait(), 10)
        dying.cancel()  # it dies holding the entry: its callback never returns
        await asyncio.wait_for(asyncio.gather(dying, return_exceptions=True), 10)
        pending = await doomed.redis.xpending(doomed.stream, group)
        held = {e["message_id"].decode() for e in await doomed.redis.xpending_range(
            doomed.stream, group, min="-", max="+", count=100, consumername="doomed")}
        assert pending["pending"] >= 1
        assert held
        survivor = Consumer(url, group, "survivor", claim_idle_ms=200, block_ms=100)
        rescued: list[Entry] = []
        rescuing = asyncio.create_task(survivor.run(rescued.append))
        for _ in range(500):
            if held <= {e.id for e in rescued}:
                break
            await asyncio.sleep(0.02)
        survivor.stop()
        await asyncio.wait_for(rescuing, 10)
        for consumer in (first, second, doomed, survivor):
            await asyncio.wait_for(consumer.close(), 10)
        return seen_one, seen_two, rescued, held

    seen_one, seen_two, rescued, held = asyncio.run(scenario())
    ids = [e.id for e in seen_one + seen_two]
    assert len(ids) == len(set(ids))  # every entry once across the two consumers
    calls = [(e.event, e.data["stream_sid"]) for e in seen_one + seen_two
             if e.event in ("stream.started", "stream.stopped")]
    assert 8 == len(calls) == len(set(calls))
    assert held <= {e.id for e in rescued}


def test_the_events_command_prints_entries_as_json_lines(redis_server: RedisServer,
                                                         pair: tuple[Service, Service]) -> None:
    a, _ = pair
    asyncio.run(replay([load_fixture(FIXTURES / "no_custom_parameters.jsonl")],
                       f"ws://127.0.0.1:{a.port}/stream", speed=0, auth_token=TOKEN,
                       public_url=PUBLIC))
    done = subprocess.run(
        [sys.executable, "-m", "streamsvc", "events", "--group", f"cli-{time.monotonic_ns()}",
         "--from-start", "--count", "3", "--redis-url", redis_server.url],
        capture_output=True, text=True, timeout=30, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert 3 == len(lines)
    assert all({"id", "event", "data"} == set(line) for line in lines)
    assert all("call_sid" in line["data"] or line["event"].startswith("acs.")
               for line in lines)


def test_redis_going_away_loses_no_call_and_publishing_resumes(tmp_path: Path) -> None:
    store = RedisServer(tmp_path)
    store.start()
    service = Service(tmp_path, "solo", port=free_port(), config=CONFIG,
                      env=environment(store.url, STREAMSVC_BUS_BUFFER="40"))
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        url = f"ws://127.0.0.1:{service.port}/stream"
        thread, out = call_in_thread(replay([fixture], url, speed=1.0, concurrency=3,
                                            auth_token=TOKEN, public_url=PUBLIC))
        for _ in range(500):
            if len(service.events("stream.started")) >= 3:
                break
            time.sleep(0.01)
        store.stop()
        # A call that starts while Redis is away starts at once, with no context.
        late = asyncio.run(replay([load_fixture(FIXTURES / "no_custom_parameters.jsonl")],
                                  url, speed=0, auth_token=TOKEN, public_url=PUBLIC))
        assert 0 == late.failed
        thread.join(timeout=30)
        assert 0 == out[0].failed  # every call ended normally
        for _ in range(500):
            if len(service.events("stream.stopped")) >= 4:
                break
            time.sleep(0.01)
        assert 4 == len(service.events("stream.stopped"))
        assert 1 == len(service.events("bus.unavailable"))  # once per outage, not per frame
        metrics = service.metrics()
        dropped = sum(metric(metrics, f'streamsvc_bus_dropped_total{{kind="{kind}"}}')
                      for kind in ("audio", "event", "registry"))
        assert dropped > 0
        assert 0 == metric(metrics, "streamsvc_bus_up")

        store.start()  # back on the same port, empty
        service.wait_for("bus.recovered", timeout_s=15)
        after = asyncio.run(replay([load_fixture(FIXTURES / "no_custom_parameters.jsonl")],
                                   url, speed=0, auth_token=TOKEN, public_url=PUBLIC))
        sid = after.sessions[0].stream_sid
        for _ in range(500):
            events = [json.loads(f["data"]) for _, f in entries(store.url, "streamsvc:events")]
            if any(e.get("stream_sid") == sid for e in events):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("no event of the call after Redis came back")
        assert 1 == metric(service.metrics(), "streamsvc_bus_up")
    finally:
        assert 0 == service.stop()
        store.stop()


def test_an_unreachable_redis_is_said_at_start_and_its_return_without_any_call(
        tmp_path: Path) -> None:
    """A PING at start: no Redis yet means bus.unavailable and streamsvc_bus_up 0 before
    any call; Redis coming up is noticed without a write (bus.recovered, bus_up 1)."""
    store = RedisServer(tmp_path)
    service = Service(tmp_path, "early", port=free_port(), config=CONFIG,
                      env=environment(store.url))
    try:
        service.wait_for("bus.unavailable")
        assert 0 == metric(service.metrics(), "streamsvc_bus_up")
        store.start()
        service.wait_for("bus.recovered", timeout_s=15)
        assert 1 == metric(service.metrics(), "streamsvc_bus_up")
    finally:
        assert 0 == service.stop()
        store.stop()


@pytest.mark.parametrize("command", [["serve"], ["events", "--group", "g"]])
def test_a_malformed_redis_url_is_one_line_and_exit_2(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "streamsvc", *command, "--redis-url",
                           "redis:/bad"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert 2 == done.returncode
    assert 1 == len(done.stderr.strip().splitlines()), done.stderr
    assert "redis" in done.stderr


def test_a_drained_connect_call_moves_to_the_other_instance(redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    balancer_port = free_port()
    public = f"http://127.0.0.1:{balancer_port}"
    services = [Service(tmp_path, name, port=port, config=CONFIG,
                        env=environment(redis_server.url, public))
                for name, port in zip(("x", "y"), ports, strict=True)]
    balancer = Nginx(tmp_path, ports, port=balancer_port)
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        thread, out = call_in_thread(replay_call(
            fixture, f"{public}/twiml/connect", speed=1.0, auth_token=TOKEN,
            public_url=public, fields={"customer": "c-7"}))
        owner = None
        for _ in range(1000):
            owner = next((s for s in services if s.events("stream.started")), None)
            if owner is not None:
                break
            time.sleep(0.01)
        assert owner is not None
        first = owner.events("stream.started")[0]
        time.sleep(0.5)  # some audio on the first instance
        owner.terminate()  # a deploy: drain
        other = next(s for s in services if s is not owner)
        resumed = other.wait_for("stream.started", timeout_s=15)
        thread.join(timeout=30)
        legs: list[CallLeg] = out[0]
        assert 0 == owner.stop()
    finally:
        for service in services:
            service.stop()
        balancer.stop()
    assert [True, False] == [leg.moved for leg in legs]
    assert all(leg.result.ok for leg in legs), [leg.result.error for leg in legs]
    assert (first["call_sid"], first["stream_sid"]) == (resumed["call_sid"],
                                                         resumed["resumed_from"])
    assert "c-7" == resumed["context"]["customer"] == resumed["custom_parameters"]["customer"]
    moved = owner.wait_for("stream.stopped")
    assert "moved" == moved["reason"]
    finished = other.wait_for("stream.stopped")
    assert 204 == moved["frames"]["inbound"] + finished["frames"]["inbound"]
    assert 1 == len(owner.events("server.handing_over"))


class _RawCounter(Handler):
    received: ClassVar[list[int]] = []

    def on_start(self, session: Session) -> None:
        self.count = 0

    def on_raw_frame(self, frame: RawFrame) -> None:
        self.count += not frame.sent

    def on_stop(self, session: Session, summary: CallSummary) -> None:
        _RawCounter.received.append(self.count)


async def test_frames_that_arrive_while_the_context_is_looked_up_reach_every_handler(
        redis_server: RedisServer, transport: str) -> None:
    """Handlers start once the fleet's lookup is done; what came meanwhile waits for them
    (media for media handlers, the raw frames for raw-frame handlers), none is lost."""
    _RawCounter.received = []
    specs = (HandlerSpec("raw", _RawCounter),)
    server = StreamServer(Settings(port=0, routes=(Route("/stream", specs),),
                                   redis_url=redis_server.url, transport=transport))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        report = await replay([fixture], f"ws://127.0.0.1:{server.port}/stream", speed=0,
                              concurrency=5)
        assert 0 == report.failed
        for _ in range(500):
            if len(_RawCounter.received) == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop()
    assert [len(fixture.frames)] * 5 == _RawCounter.received
