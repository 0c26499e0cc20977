"""What one message can still do to a call, on every provider of the registry: nothing but
a counted bad frame."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from pathlib import Path

import orjson
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamsvc import wire
from streamsvc.config import Route, Settings
from streamsvc.fleet import Fleet, FleetError
from streamsvc.fleet.keys import context_key, registry_key, resume_key, resumed_key
from streamsvc.fleet.node import FleetNode
from streamsvc.handlers import resolve_handler
from streamsvc.live import LiveSession
from streamsvc.providers import REGISTRY, CodecOptions
from streamsvc.providers.credentials import NonceMemory
from streamsvc.replay import Signing, replay, replay_session, upgrade_headers
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer
from streamsvc.server.stream_server import PENDING_GRACE_S
from streamsvc.session import TOO_DEEP, Session, State

from .conftest import BUNDLED, LogEvents, events, until
from .fleet_support import RedisServer
from .test_session import start

FIXTURES = Path(__file__).parent.parent / "fixtures"
# About 2 kB: far past the decoder's recursion limit.
DEEP = [b"[" * 1000 + b"]" * 1000,
        b'{"event":"media","media":' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
        b'{"kind":"AudioData","audioData":' + b"[" * 1000 + b"]" * 1000 + b"}"]


@pytest.mark.parametrize("provider", sorted(BUNDLED))
def test_json_nested_past_any_limit_is_a_counted_bad_frame_and_the_call_goes_on(
        provider: str) -> None:
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    row = next(row for row in REGISTRY if row.name == provider)
    session = Session(codec=row.codec(wire.Upgrade.of("/", "", fixture.headers.items()),
                                      CodecOptions()))
    frames = list(fixture.frames)
    for frame in frames[:3]:  # the stream starts
        session.receive_message(frame.binary if frame.binary is not None else frame.text,
                                frame.binary is not None)
    assert State.STREAMING == session.state
    for deep in DEEP:
        session.receive_message(deep)
        assert session.receive_media(deep) is None
    reasons = [event.reason for event in session.events_received()
               if not isinstance(event, wire.Start | wire.Media | wire.Dtmf | wire.Mark)
               and hasattr(event, "reason")]
    assert 2 * len(DEEP) == session.bad_frames
    assert TOO_DEEP in reasons
    assert State.STREAMING == session.state


async def _play(url: str, fixture_name: str, headers: list[tuple[str, str]]) -> int | None:
    fixture = load_fixture(FIXTURES / fixture_name)
    try:
        async with connect(url, additional_headers=headers) as connection:
            for frame in fixture.frames:
                await connection.send(frame.text)
            await connection.close()
            return connection.close_code
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_a_repeated_header_is_harmless_and_a_repeated_credential_is_a_403(
        transport: str, logs: LogEvents) -> None:
    """Both transports alike: a proxy's second X-Forwarded-For changes nothing; a credential
    header sent twice is refused (which copy to check is not the service's to guess)."""
    server = StreamServer(Settings(port=0, transport=transport, telnyx_stream_token="tok",
                                   routes=(Route("/stream", ()),
                                           Route("/telnyx", (), provider="telnyx"))))
    await server.start()
    try:
        base = f"ws://127.0.0.1:{server.port}"
        proxied = await _play(f"{base}/stream", "inbound_params.jsonl",
                              [("X-Forwarded-For", "192.0.2.1"),
                               ("X-Forwarded-For", "198.51.100.7")])
        repeated = await _play(f"{base}/telnyx", "telnyx_params.jsonl",
                               [("x-telnyx-streaming-auth-token", "tok"),
                                ("x-telnyx-streaming-auth-token", "tok")])
    finally:
        await server.stop()
    assert (1000, 403) == (proxied, repeated)
    assert ["bad_token"] == [line["reason"] for line in events(logs, "handshake.rejected")]
    assert [] == [line for line in logs if line["log_level"] == "error"]


def _with_rate(message: object, rate: object) -> object:
    """``message`` with every sample rate it names set to ``rate`` (Vonage's is in its
    content type, Asterisk's in its format's name; Genesys offers formats with a ``rate``)."""
    if isinstance(message, dict):
        changed = {key: rate if key in ("sampleRate", "sample_rate", "rate")
                   else _with_rate(value, rate) for key, value in message.items()}
        if isinstance(changed.get("content-type"), str):
            changed["content-type"] = f"audio/l16;rate={rate}"
        if changed.get("event") == "MEDIA_START":  # Asterisk's format names the rate
            changed["format"] = f"slin{rate}"
        return changed
    if isinstance(message, list):
        return [_with_rate(item, rate) for item in message]
    return message


@pytest.mark.parametrize("rate", [0, 100, 100_000_000, 44100])
@pytest.mark.parametrize("provider", sorted(BUNDLED))
def test_a_start_at_a_rate_its_provider_does_not_stream_at_is_refused(
        provider: str, rate: int) -> None:
    """One start could otherwise size every buffer a handler allocates (the recorder's
    window and silence) or divide by zero."""
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    opening = fixture.opening()
    assert opening is not None
    row = next(row for row in REGISTRY if row.name == provider)
    session = Session(codec=row.codec(wire.Upgrade.of("/", "", fixture.headers.items()),
                                      CodecOptions()))
    for frame in fixture.frames:
        if frame.binary is not None:
            continue
        message = json.loads(frame.text)
        session.receive_message(json.dumps(_with_rate(message, rate)))
        if session.bad_frames:
            break
    assert State.AWAITING_START == session.state
    assert 1 <= session.bad_frames


async def test_a_second_live_stream_with_the_same_ids_is_refused_and_shares_no_file(
        tmp_path: Path, logs: LogEvents) -> None:
    """A second stream reusing a live call's stream id (a replay, an attacker) is closed
    (1008) before any handler sees it: the first keeps its recording and capture to itself."""
    recorder = resolve_handler("recorder", {"dir": str(tmp_path / "rec")}, key="handlers")
    capture = resolve_handler("capture", {"dir": str(tmp_path / "cap")}, key="handlers")
    server = StreamServer(Settings(port=0, routes=(Route("/stream", (recorder, capture)),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        url = f"ws://127.0.0.1:{server.port}/stream"
        first, second = await asyncio.gather(replay_session(fixture, url, speed=4),
                                             replay_session(fixture, url, speed=4))
        await until(lambda: events(logs, "stream.stopped"))
        await asyncio.sleep(0.1)
        metrics = server.metrics.render().decode()
    finally:
        await server.stop()
    assert [True, False] == sorted([first.ok, second.ok], reverse=True)
    [stopped] = events(logs, "stream.stopped")
    [duplicate] = events(logs, "stream.duplicate_stream_sid")
    assert ({}, "this instance", "claimant") == (
        stopped["handler_errors"], duplicate["owner"], duplicate["refused"])
    assert 'streamsvc_streams_refused_total{reason="duplicate_stream_sid"} 1.0' in metrics
    assert ["MZ00000000000000000000000000000101.wav"] == [
        path.name for path in (tmp_path / "rec").rglob("*.wav")]
    [captured] = list((tmp_path / "cap").rglob("*.jsonl"))
    assert len(fixture.frames) == len(load_fixture(captured).frames)


async def test_a_stream_id_live_on_one_instance_is_refused_on_another_and_keeps_its_talk_back(
        tmp_path: Path, transport: str, logs: LogEvents) -> None:
    """The fleet's registry: the first stream claims its id; another instance refuses a
    second stream with that id (both log stream.duplicate_stream_sid), a worker's talk-back
    still reaches the first, and the refused one's hang-up leaves the first reachable."""
    store = RedisServer(tmp_path)
    store.start()
    route = (Route("/connect", (), bidirectional=True),)
    a = StreamServer(Settings(port=0, routes=route, redis_url=store.url, instance_id="a",
                              transport=transport))
    b = StreamServer(Settings(port=0, routes=route, redis_url=store.url, instance_id="b",
                              transport=transport))
    await a.start()
    await b.start()
    opening = [frame.text for frame in
               load_fixture(FIXTURES / "inbound_params.jsonl").frames[:2]]
    try:
        async with connect(f"ws://127.0.0.1:{a.port}/connect") as victim:
            for text in opening:
                await victim.send(text)
            await until(lambda: events(logs, "stream.started"))
            sid = events(logs, "stream.started")[0]["stream_sid"]
            async with connect(f"ws://127.0.0.1:{b.port}/connect") as attacker:
                for text in opening:
                    await attacker.send(text)
                with contextlib.suppress(ConnectionClosed):
                    async for _ in attacker:
                        pass
            assert 1008 == attacker.close_code
            await until(lambda: len(events(logs, "stream.duplicate_stream_sid")) == 2)
            async with Fleet(store.url) as fleet:
                owner = await fleet.owner(sid)
                await fleet.send_audio(sid, bytes(320 * 5), sample_rate=8000)
            played = [json.loads(await asyncio.wait_for(victim.recv(), 5)) for _ in range(5)]
    finally:
        await b.stop()
        await a.stop()
        store.stop()
    assert owner is not None
    assert "a" == owner["instance"]
    assert ["media"] * 5 == [message["event"] for message in played]
    by_side = {line["refused"] + ":" + line["owner"]: line
               for line in events(logs, "stream.duplicate_stream_sid")}
    assert {"claimant:a"} == set(by_side)  # one key: both lines name a as the owner
    assert ["b", "b"] == [line["claimant"]
                          for line in events(logs, "stream.duplicate_stream_sid")]
    assert 1 == len(events(logs, "stream.started"))


async def test_every_poisoned_redis_value_is_ignored_with_a_warning(
        tmp_path: Path, logs: LogEvents) -> None:
    """Whatever another process wrote where the fleet keeps its values (not UTF-8, not
    JSON, the wrong shape, far too long) is ignored with bus.bad_value: the call starts as
    if it were not there, a stream claims its id over a registry entry that is not one, a
    status callback's lookup finds nothing, and the fleet client says what is wrong."""
    store = RedisServer(tmp_path)
    store.start()
    node = FleetNode(Settings(redis_url=store.url, redis_timeout_ms=1000, instance_id="a"),
                     {})
    session = LiveSession(wake=lambda: None)
    session.receive_message(start("MZ-poisoned"))
    session.events_received()
    try:
        poison = redis.Redis.from_url(store.url)
        poison.set(resumed_key("CA1"), b"\xff\xfe\xfd")
        poison.set(resumed_key("CA2"), b"M" * 100_000)
        records = [b"\xff", b"[1, 2]", b'{"context": "x"}', b'{"context": {}, "p": "' +
                   b"x" * 2_000_000 + b'"}']
        for n, record in enumerate(records):
            poison.set(context_key(f"CR{n}"), record)
        poison.set(registry_key("MZ-poisoned"), b'{"instance": ["a list"]}')
        poison.set(registry_key("MZ-garbage"), b"\x00garbage")
        poison.set(resume_key("CA9"), b"MZ-before")
        poison.set(context_key("CA9"), b"not json")
        resumed = [await node.look_up(call, call) for call in ("CA1", "CA2")]
        looked_up = [await node.look_up(f"CR{n}", f"CR{n}") for n in range(len(records))]
        claimed = await node.claim(session, 0.0)
        held = orjson.loads(poison.get(registry_key("MZ-poisoned")) or b"{}")
        live = await node.live_stream("MZ-garbage")
        resume = await node.resume_of("CA9")
        async with Fleet(store.url) as fleet:
            with pytest.raises(FleetError, match="not one streamsvc wrote"):
                await fleet.owner("MZ-garbage")
        poison.close()
    finally:
        await node.redis.aclose()
        await node.subscriber.aclose()
        store.stop()
    assert [None, None] == [lookup.resumed_from for lookup in resumed]
    assert [None] * len(records) == [lookup.context for lookup in looked_up]
    assert (None, "a", None) == (claimed, held.get("instance"), live)
    assert resume is not None
    assert ("MZ-before", {}) == (resume.resumed_from, resume.parameters)
    kinds = collections.Counter(line["kind"] for line in events(logs, "bus.bad_value"))
    assert {"stream id": 2, "call record": 5, "registry entry": 2} == kinds


def test_a_plivo_nonce_opens_one_stream_within_its_window() -> None:
    now = [0.0]
    nonces = NonceMemory(ttl_s=60, max_entries=3, clock=lambda: now[0])
    assert (True, False, True) == (nonces.first_use("n1"), nonces.first_use("n1"),
                                   nonces.first_use("n2"))
    now[0] = 61
    assert nonces.first_use("n1")  # forgotten after its window
    for name in ("a", "b", "c", "d"):
        nonces.first_use(name)
    assert nonces.first_use("n2")  # the oldest go first: memory stays bounded


async def test_a_captured_plivo_signature_is_refused_the_second_time(
        transport: str, logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, transport=transport, plivo_auth_token="ptoken",
                                   public_url="wss://voice.example.com",
                                   routes=(Route("/plivo", (), provider="plivo"),)))
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/plivo"
        captured = list(upgrade_headers("plivo", url, Signing(
            public_url="wss://voice.example.com", plivo_auth_token="ptoken")).items())
        first = await _play(url, "plivo_stream.jsonl", captured)
        again = await _play(url, "plivo_stream.jsonl", captured)
    finally:
        await server.stop()
    assert (1000, 403) == (first, again)
    assert ["replayed_signature"] == [line["reason"]
                                      for line in events(logs, "handshake.rejected")]


async def test_a_captured_plivo_signature_opens_one_stream_in_the_whole_fleet(
        tmp_path: Path, transport: str, logs: LogEvents) -> None:
    """In a fleet the nonces are remembered in Redis: the captured upgrade, replayed to
    another instance, is a 403 there too."""
    store = RedisServer(tmp_path)
    store.start()
    servers = [StreamServer(Settings(port=0, transport=transport, plivo_auth_token="ptoken",
                                     public_url="wss://voice.example.com",
                                     redis_url=store.url, instance_id=name,
                                     routes=(Route("/plivo", (), provider="plivo"),)))
               for name in ("a", "b")]
    for server in servers:
        await server.start()
    try:
        a, b = (f"ws://127.0.0.1:{server.port}/plivo" for server in servers)
        captured = list(upgrade_headers("plivo", a, Signing(
            public_url="wss://voice.example.com", plivo_auth_token="ptoken")).items())
        first = await _play(a, "plivo_stream.jsonl", captured)
        elsewhere = await _play(b, "plivo_stream.jsonl", captured)
        fresh = list(upgrade_headers("plivo", b, Signing(
            public_url="wss://voice.example.com", plivo_auth_token="ptoken")).items())
        honest = await _play(b, "plivo_stream.jsonl", fresh)
    finally:
        for server in servers:
            await server.stop()
        store.stop()
    assert (1000, 403, 1000) == (first, elsewhere, honest)
    [rejected] = events(logs, "handshake.rejected")
    assert ("replayed_signature", "plivo") == (rejected["reason"], rejected["provider"])


def test_a_flood_of_frame_rate_events_never_crowds_out_a_calls_lifecycle() -> None:
    """DTMF and marks fill at most half the bus's buffer while Redis is slow or away:
    every call's stream.started and stream.stopped still get in."""
    node = FleetNode(Settings(redis_url="redis://127.0.0.1:9/0", bus_buffer=100), {})
    for digit in range(10_000):
        node.publish("call.dtmf", {"digit": str(digit % 10)}, lifecycle=False)
    assert 50 == node.buffered
    for call in range(50):
        node.publish("stream.started", {"call_sid": f"CA{call}"})
    assert (100, 10_000 - 50) == (node.buffered, node.dropped["event"])


async def test_connections_that_never_start_cannot_keep_an_honest_call_out(
        transport: str, logs: LogEvents) -> None:
    """max_pending_starts: idle upgrades hold at most that many places; once they have waited
    PENDING_GRACE_S the oldest is closed (1008) to make room, so an honest call gets in."""
    server = StreamServer(Settings(port=0, transport=transport, max_pending_starts=2,
                                   routes=(Route("/stream", ()),)))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/stream"
    try:
        async with connect(url) as first, connect(url) as second:
            with pytest.raises(InvalidStatus) as refused:  # no idle one is old enough yet
                async with connect(url):
                    pass
            assert 503 == refused.value.response.status_code
            await asyncio.sleep(PENDING_GRACE_S + 0.2)
            result = await replay_session(load_fixture(FIXTURES / "inbound_params.jsonl"),
                                          url, speed=0)
            await until(lambda: first.close_code is not None)
            assert (True, 1008, None) == (result.ok, first.close_code, second.close_code)
    finally:
        await server.stop()
    assert 1 == len(events(logs, "stream.evicted"))
    assert 1 == server.metrics.pending_evicted
    assert ["too_many_pending_starts"] == [
        line["reason"] for line in events(logs, "handshake.rejected")]


async def test_one_address_may_hold_at_most_max_streams_per_address(
        transport: str, logs: LogEvents) -> None:
    server = StreamServer(Settings(port=0, transport=transport, max_streams_per_address=1,
                                   routes=(Route("/stream", ()),)))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/stream"
    try:
        async with connect(url):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
        await until(lambda: not server.streams_per_address)
        result = await replay_session(load_fixture(FIXTURES / "inbound_params.jsonl"), url,
                                      speed=0)
    finally:
        await server.stop()
    assert (429, True) == (refused.value.response.status_code, result.ok)
    assert ["address_limit"] == [line["reason"] for line in events(logs, "handshake.rejected")]


async def test_a_flood_of_oversized_frames_is_counted_not_logged_line_by_line(
        transport: str, logs: LogEvents, caplog: pytest.LogCaptureFixture) -> None:
    """40 connections each sending one frame over max_message_bytes: each is closed (1009),
    none is an error-level line, at most a line a second says so (the rest counted), and an
    honest call beside them is whole."""
    server = StreamServer(Settings(port=0, transport=transport, max_message_bytes=4096,
                                   routes=(Route("/stream", ()),)))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/stream"

    async def oversized() -> int | None:
        async with connect(url, max_size=None) as connection:
            with contextlib.suppress(ConnectionClosed):
                await connection.send("x" * 10_000)
                await asyncio.wait_for(connection.recv(), 5)
        return connection.close_code

    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
        honest, *codes = await asyncio.gather(replay_session(fixture, url, speed=4),
                                              *(oversized() for _ in range(40)))
        metrics = server.metrics.render().decode()
    finally:
        await server.stop()
    assert honest.ok, honest.error
    assert {1009} == set(codes)
    assert [] == [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [] == [line for line in logs if line["log_level"] in ("error", "critical")]
    if transport == "picows":
        faults = events(logs, "connection.peer_fault")
        assert 1 <= len(faults) <= 3
        assert 'streamsvc_peer_faults_total{kind="bad_frame"} 40.0' in metrics


@pytest.mark.parametrize("account", ["AC00000000000000000000000000000001",
                                     "AC00000000000000000000000000000999"])
async def test_a_twilio_start_for_another_account_is_refused_when_the_account_is_set(
        account: str, transport: str, logs: LogEvents) -> None:
    """A signature covers the URL, not the start: with twilio_account_sid set, a captured
    signed upgrade cannot carry a call of another account."""
    server = StreamServer(Settings(port=0, transport=transport, auth_token="token",
                                   public_url="wss://voice.example.com",
                                   twilio_account_sid=account,
                                   routes=(Route("/stream", ()),)))
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "inbound_params.jsonl")  # AC...0001's call
        [session] = (await replay([fixture], f"ws://127.0.0.1:{server.port}/stream", speed=0,
                                  auth_token="token",
                                  public_url="wss://voice.example.com")).sessions
    finally:
        await server.stop()
    if account.endswith("0001"):
        assert session.ok, session.error
        assert [] == events(logs, "stream.account_mismatch")
    else:
        assert not session.ok
        [mismatch] = events(logs, "stream.account_mismatch")
        assert (fixture.expect["account_sid"], account) == (mismatch["account_sid"],
                                                            mismatch["expected"])
        assert [] == events(logs, "stream.started")
