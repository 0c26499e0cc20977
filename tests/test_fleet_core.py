"""The fleet's I/O-free parts: TwiML with a <Connect action>, reading it back as the replay
client does, the settings, and how published audio is batched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamsvc.config import load_settings
from streamsvc.context.store import CallContext
from streamsvc.context.twiml import render_stream_twiml
from streamsvc.exceptions import ConfigError
from streamsvc.live import LiveSession
from streamsvc.replay.call import stream_verb
from streamsvc.server.call import AudioBatcher
from tests.test_session import media, start


def test_a_connect_with_an_action_reads_back_as_twilio_would_follow_it() -> None:
    action = "https://voice.example.com/twiml/connect?streamsvc_action=connect&x=<1>"
    document = render_stream_twiml("wss://voice.example.com/connect", {"customer": "c-7"},
                                   connect=True, action=action)
    verb = stream_verb(document)
    assert verb is not None
    assert (True, action, {"customer": "c-7"}) == (verb.connect, verb.action, verb.parameters)
    assert "wss://voice.example.com/connect" == verb.url


def test_a_start_stream_has_no_action() -> None:
    verb = stream_verb(render_stream_twiml("wss://h/stream", {}, connect=False))
    assert verb is not None
    assert (False, None) == (verb.connect, verb.action)
    assert stream_verb('<?xml version="1.0"?><Response><Hangup/></Response>') is None


@pytest.mark.parametrize("url", ["http://redis:6379", "redis-cluster:6379", "tcp://r:1"])
def test_a_redis_url_that_is_not_redis_is_refused_naming_the_key(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        load_settings(env={"STREAMSVC_REDIS_URL": url})


def test_fleet_settings_come_from_the_environment() -> None:
    settings = load_settings(env={"STREAMSVC_REDIS_URL": "redis://r:6379/2",
                                  "STREAMSVC_EVENTS_MAXLEN": "5000",
                                  "STREAMSVC_REDIS_TIMEOUT_MS": "20"})
    assert ("redis://r:6379/2", 5000, 20, "streamsvc:events", 3600.0) == (
        settings.redis_url, settings.events_maxlen, settings.redis_timeout_ms,
        settings.events_stream, settings.context_ttl_s)
    with pytest.raises(ConfigError, match="REDIS_TIMEOUT_MS: must be at most 1000"):
        load_settings(env={"STREAMSVC_REDIS_TIMEOUT_MS": "5000"})


def test_publish_audio_must_be_a_boolean(tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text('[[routes]]\npath = "/stream"\npublish_audio = "yes"\n')
    with pytest.raises(ConfigError, match=r"routes\[0\].publish_audio"):
        load_settings(config_path=str(config), env={})


class _Batches:
    """Takes what the batcher publishes (the fleet's interface), in order."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, ...]] = []

    def publish_audio(self, stream_sid: str, track: str, timestamp_ms: int,
                      sample_rate: int, audio: bytes, *, expire: bool = True) -> None:
        self.published.append((track, timestamp_ms, len(audio), expire))


def test_audio_is_published_in_batches_of_the_configured_length_per_track() -> None:
    session = LiveSession(wake=lambda: None)
    session.receive_message(start(tracks=("inbound", "outbound")))
    session.events_received()
    sink = _Batches()
    batcher = AudioBatcher(sink, session, 100)  # type: ignore[arg-type]
    for n in range(12):
        for track in ("inbound", "outbound"):
            session.receive_message(media(99 + 20 * n, track=track))
            [event] = session.events_received()
            batcher.add(event)
    batcher.flush()
    # 100 ms = 5 frames of 160 mu-law samples, as PCM16; the rest goes out at the end.
    assert [("inbound", 99, 1600, True), ("outbound", 99, 1600, False),
            ("inbound", 199, 1600, False), ("outbound", 199, 1600, False),
            ("inbound", 299, 640, True), ("outbound", 299, 640, True)] == sink.published


async def test_a_context_write_holds_the_answer_at_most_redis_timeout_ms() -> None:
    import time

    from streamsvc.config import Settings
    from streamsvc.fleet.node import FleetNode

    settings = Settings(redis_url="redis://127.0.0.1:9/0", redis_timeout_ms=50, bus_buffer=1)
    fleet = FleetNode(settings, {})  # not started: nothing drains the buffer
    done = fleet.put_context("CA1", CallContext({"a": "1"}))
    assert not done.done()  # waits for Redis
    began = time.monotonic()
    await fleet.written(done)  # a slow Redis costs the context, not the call
    assert 0.04 <= time.monotonic() - began < 1.0
    dropped = fleet.put_context("CA2", CallContext({"a": "1"}))  # the buffer is full
    assert dropped.done()
    assert 1 == fleet.dropped["context"]
    await fleet.redis.aclose()
    await fleet.subscriber.aclose()
