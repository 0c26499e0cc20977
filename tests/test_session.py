"""The session state machine, fed one message at a time."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc import wire
from streamsvc.exceptions import LocalProtocolError
from streamsvc.session import (
    MAX_DTMF_DIGITS,
    MAX_REMEMBERED_HOLES,
    BadFrame,
    Session,
    State,
    TrackStats,
    parameters_size,
)

SID = "MZ0001"


def start(sid: str = SID, *, parameters: dict[str, str] | None = None,
          tracks: tuple[str, ...] = ("inbound",)) -> str:
    body: dict[str, Any] = {
        "accountSid": "AC0001", "streamSid": sid, "callSid": "CA0001", "tracks": list(tracks),
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    if parameters is not None:
        body["customParameters"] = parameters
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": sid})


def media(timestamp: int, *, track: str = "inbound", sid: str = SID, size: int = 160) -> str:
    payload = base64.b64encode(bytes(size)).decode()
    return json.dumps({"event": "media", "sequenceNumber": "2", "media": {
        "track": track, "chunk": "1", "timestamp": str(timestamp), "payload": payload,
    }, "streamSid": sid})


def other(event: str, body: dict[str, Any] | None = None, *, sid: str = SID) -> str:
    message: dict[str, Any] = {"event": event, "streamSid": sid}
    if body is not None:
        message[event] = body
    return json.dumps(message)


def feed(session: Session, *frames: str) -> list[Any]:
    events = []
    for frame in frames:
        session.receive_message(frame.encode())
        events.extend(session.events_received())
    return events


def streaming(**kwargs: Any) -> Session:
    session = Session(**kwargs)
    feed(session, '{"event":"connected","protocol":"Call","version":"1.0.0"}', start())
    return session


def test_start_moves_the_session_to_streaming_with_the_calls_context() -> None:
    session = Session(path="/stream")
    assert State.AWAITING_START == session.state
    events = feed(session, start(parameters={"FirstName": "Jane", "intent": "billing"}))
    assert [wire.Start] == [type(e) for e in events]
    assert State.STREAMING == session.state
    assert (SID, "CA0001", "AC0001", ("inbound",)) == (
        session.stream_sid, session.call_sid, session.account_sid, session.tracks)
    assert {"FirstName": "Jane", "intent": "billing"} == dict(session.custom_parameters)
    assert 8000 == session.media_format.sample_rate  # type: ignore[union-attr]


def test_custom_parameters_are_read_only() -> None:
    session = Session()
    feed(session, start(parameters={"a": "b"}))
    with pytest.raises(TypeError):
        session.custom_parameters["a"] = "c"  # type: ignore[index]


def test_absent_custom_parameters_give_an_empty_mapping() -> None:
    session = Session()
    feed(session, start(parameters=None))
    assert {} == dict(session.custom_parameters)
    assert 0 == session.custom_parameters_bytes


def test_parameter_size_counts_utf8_bytes_of_names_and_values() -> None:
    assert len(b"name") + len("Zoë 山".encode()) == parameters_size({"name": "Zoë 山"})
    session = Session(parameter_budget_bytes=10)
    feed(session, start(parameters={"name": "Zoë 山"}))
    assert 4 + 8 == session.custom_parameters_bytes  # ë is 2 bytes, 山 is 3
    assert session.parameters_over_budget
    assert {"name": "Zoë 山"} == dict(session.custom_parameters)  # kept whole


def test_media_frames_are_counted_per_track() -> None:
    session = streaming()
    feed(session, media(99), media(99, track="outbound"), media(119), media(139, size=80))
    summary = session.close("closed")
    assert {"inbound": 3, "outbound": 1} == summary.frames
    assert {"inbound": 400, "outbound": 160} == summary.bytes
    assert {"inbound": 0, "outbound": 0} == summary.missing_frames


@pytest.mark.parametrize(
    ("timestamps", "missing", "out_of_order", "duplicates"),
    [
        pytest.param([99, 119, 139], 0, 0, 0, id="in-order"),
        pytest.param([99, 119, 179, 199], 2, 0, 0, id="gap-of-two"),
        pytest.param([99, 139, 119, 159], 0, 1, 0, id="late-frame-is-not-missing"),
        pytest.param([99, 119, 119, 139], 0, 0, 1, id="duplicate"),
        pytest.param([119, 99, 139], 0, 1, 0, id="first-frame-late"),
        pytest.param([139, 99], 1, 1, 0, id="late-below-first-leaves-a-hole"),
        pytest.param([99, 120, 138, 161], 0, 0, 0, id="jitter-rounds-to-slots"),
        pytest.param([99, 199, 139], 3, 1, 0, id="late-fill-inside-a-gap"),
    ],
)
def test_missing_frames_are_slots_that_never_arrived(
    timestamps: list[int], missing: int, out_of_order: int, duplicates: int,
) -> None:
    session = streaming()
    feed(session, *(media(t) for t in timestamps))
    summary = session.close("stop")
    assert ({"inbound": missing}, {"inbound": out_of_order}, {"inbound": duplicates}) == (
        summary.missing_frames, summary.out_of_order_frames, summary.duplicate_frames)


def test_remembered_holes_are_bounded_and_the_rest_still_counted() -> None:
    stats = TrackStats()
    stats.add_frame(0, 160)
    stats.add_frame((MAX_REMEMBERED_HOLES + 11) * 20, 160)
    assert MAX_REMEMBERED_HOLES == stats.remembered_holes
    assert MAX_REMEMBERED_HOLES + 10 == stats.missing


@pytest.mark.parametrize("jump_ms", [10**6, 4 * 3600 * 1000, 2**53 - 1])
def test_a_jump_of_any_size_keeps_a_tracks_memory_bounded(jump_ms: int) -> None:
    stats = TrackStats()
    stats.add_frame(0, 160)
    stats.add_frame(jump_ms, 160)
    stats.add_frame(0, 160)  # a duplicate of the first, long forgotten as a neighbour
    assert (jump_ms + 10) // 20 - 1 == stats.missing
    assert sys.getsizeof(stats.holes) < 1024


def test_a_start_listing_unknown_tracks_keeps_only_twilios() -> None:
    session = Session()
    tracks = ("inbound", *(f"t{i}" for i in range(8000)), "outbound", "inbound")
    events = feed(session, start(tracks=tracks))
    assert ("inbound", "outbound") == session.tracks
    [bad] = [e for e in events if isinstance(e, BadFrame)]
    assert "start lists 8000 unknown track names (ignored)" == bad.reason
    feed(session, media(99, track="t1"))
    assert 2 == session.bad_frames  # media on a track the start could not add


@pytest.mark.parametrize("digit", ["x" * 60_000, "", "10", "e", "\u0000"])
def test_a_dtmf_digit_that_is_no_key_is_a_bad_frame(digit: str) -> None:
    session = streaming(bidirectional=True)
    feed(session, other("dtmf", {"track": "inbound_track", "digit": digit}))
    summary = session.close("stop")
    assert ("", 1) == (summary.dtmf, summary.bad_frames)


def test_kept_dtmf_digits_are_capped_and_the_rest_counted() -> None:
    session = streaming(bidirectional=True)
    presses = [other("dtmf", {"track": "inbound_track", "digit": "5"})] * (MAX_DTMF_DIGITS + 7)
    feed(session, *presses)
    summary = session.close("stop")
    assert (MAX_DTMF_DIGITS, 7) == (len(summary.dtmf), summary.dtmf_dropped)


@given(st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=60))
@settings(max_examples=300)
def test_frames_split_into_distinct_slots_and_duplicates(slots: list[int]) -> None:
    """Invariant: every slot in range is either received or missing, whatever the order."""
    stats = TrackStats()
    for slot in slots:
        stats.add_frame(1000 + slot * 20, 160)
    distinct = set(slots)
    span = max(slots) - min(slots) + 1
    assert len(slots) == stats.frames
    assert len(slots) - len(distinct) == stats.duplicates
    assert span - len(distinct) == stats.missing


def test_duration_comes_from_the_media_timeline() -> None:
    session = streaming()
    feed(session, media(99), media(119), media(139))
    assert 159 == session.close("stop").duration_ms


def test_dtmf_digits_and_marks_are_collected() -> None:
    session = streaming(bidirectional=True)
    feed(
        session,
        other("dtmf", {"track": "inbound_track", "digit": "4"}),
        other("mark", {"name": "greeting"}),
        other("dtmf", {"track": "inbound_track", "digit": "#"}),
    )
    summary = session.close("stop")
    assert ("4#", 1) == (summary.dtmf, summary.marks_received)


def test_stop_moves_to_stopped_and_close_reports_reason() -> None:
    session = streaming()
    events = feed(session, other("stop", {"accountSid": "AC0001", "callSid": "CA0001"}))
    assert [wire.Stop] == [type(e) for e in events]
    assert State.STOPPED == session.state
    assert "stop" == session.close("stop").reason


def test_close_is_idempotent_and_the_first_reason_wins() -> None:
    session = streaming()
    first = session.close("aborted")
    assert first is session.close("shutdown")
    assert "aborted" == first.reason


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        pytest.param([media(99)], "media while awaiting_start", id="media-before-start"),
        pytest.param([start(), start()], "start while streaming", id="second-start"),
        pytest.param([start(), media(99, sid="MZ-other")], "media for another stream",
                     id="media-for-another-stream"),
        pytest.param([start(), media(99, track="sideways")], "unknown track",
                     id="unknown-track"),
        pytest.param([start(), other("dtmf", {"track": "inbound_track", "digit": "1"},
                                     sid="MZ-x")], "dtmf for another stream",
                     id="dtmf-for-another-stream"),
        pytest.param([other("stop", {})], "stop while awaiting_start", id="stop-before-start"),
        pytest.param([start(), other("stop", {}), media(99)], "media while stopped",
                     id="media-after-stop"),
        pytest.param([start(), "garbage"], "not JSON", id="garbage"),
    ],
)
def test_misplaced_or_malformed_frames_become_counted_bad_frames(
    frames: list[str], reason: str,
) -> None:
    session = Session()
    events = feed(session, *frames)
    bad = [e for e in events if isinstance(e, BadFrame)]
    assert 1 == len(bad)
    assert reason in bad[0].reason
    assert 1 == session.bad_frames


def test_a_bad_frame_does_not_disturb_the_stream() -> None:
    session = streaming()
    feed(session, media(99), "{not json", media(119), '{"event":"media"}', media(139))
    summary = session.close("stop")
    assert ({"inbound": 3}, {"inbound": 0}, 2) == (
        summary.frames, summary.missing_frames, summary.bad_frames)


def test_bad_frame_excerpt_is_short_and_printable() -> None:
    session = Session()
    session.receive_message(b"\xff" * 1000)
    (bad,) = session.events_received()
    assert isinstance(bad, BadFrame)
    assert len(bad.excerpt) <= 120
    bad.excerpt.encode("utf-8")  # no lone surrogates: safe for any log line


def test_unknown_events_are_ignored_and_counted() -> None:
    session = streaming()
    events = feed(session, '{"event":"transcription","text":"hi"}')
    assert [wire.UnknownEvent("transcription")] == events
    assert 1 == session.close("stop").ignored_events


def test_outbound_messages_are_queued_in_twilios_shape() -> None:
    session = streaming(bidirectional=True)
    session.send_media(b"\x7f\xff")
    session.send_mark("m1")
    session.send_clear()
    assert [
        b'{"event":"media","streamSid":"MZ0001","media":{"payload":"f/8="}}',
        b'{"event":"mark","streamSid":"MZ0001","mark":{"name":"m1"}}',
        b'{"event":"clear","streamSid":"MZ0001"}',
    ] == session.data_to_send()
    assert [] == session.data_to_send()
    assert 1 == session.close("stop").marks_sent


def test_sending_on_a_unidirectional_stream_is_a_local_error() -> None:
    session = streaming(bidirectional=False)
    for send in (lambda: session.send_media(b"\xff"), lambda: session.send_mark("m"),
                 session.send_clear):
        with pytest.raises(LocalProtocolError, match="unidirectional"):
            send()
    assert [] == session.data_to_send()


@pytest.mark.parametrize("when", ["before-start", "after-stop"])
def test_sending_outside_streaming_is_a_local_error(when: str) -> None:
    session = Session(bidirectional=True)
    if when == "after-stop":
        feed(session, start())
        session.close("stop")
    with pytest.raises(LocalProtocolError, match="cannot send while"):
        session.send_media(b"\xff")


@given(st.lists(st.sampled_from([
    start(), start("MZ-other"), media(99), media(119), media(99, track="outbound"),
    media(139, sid="MZ-other"), other("dtmf", {"track": "inbound_track", "digit": "5"}),
    other("mark", {"name": "m"}), other("stop", {}), "garbage", '{"event":"future"}',
    '{"event":"connected","protocol":"Call","version":"1.0.0"}',
]), max_size=30))
@settings(max_examples=300)
def test_any_order_of_messages_keeps_the_session_consistent(frames: list[str]) -> None:
    """Invariant: every frame yields exactly one event; bad frames are counted; the state
    only moves forward; accepted media frames add up."""
    session = Session()
    order = [State.AWAITING_START, State.STREAMING, State.STOPPED]
    rank = 0
    bad = 0
    for frame in frames:
        session.receive_message(frame)
        events = session.events_received()
        assert 1 == len(events)
        bad += isinstance(events[0], BadFrame)
        assert order.index(session.state) >= rank
        rank = order.index(session.state)
    summary = session.close("closed")
    assert bad == summary.bad_frames
    assert sum(summary.bytes.values()) == 160 * sum(summary.frames.values())


@given(st.lists(st.sampled_from([
    start(), start("MZ-other"), media(99), media(119), media(139), media(99, track="outbound"),
    media(139, sid="MZ-other"), other("dtmf", {"track": "inbound_track", "digit": "5"}),
    other("mark", {"name": "m"}), other("stop", {}), "garbage", '{"event":"future"}',
]), max_size=30))
@settings(max_examples=300)
def test_the_media_fast_path_gives_what_the_event_path_gives(frames: list[str]) -> None:
    """``receive_media`` (the servers' hot path) returns a media frame exactly when
    ``receive_message`` would queue it as the only event, queues everything else the same
    way, and leaves the session with the same counters."""
    fast, general = Session(), Session()
    for frame in frames:
        general.receive_message(frame)
        expected = general.events_received()
        returned = fast.receive_media(frame)
        queued = fast.events_received()
        if returned is not None:
            assert [] == queued
            assert [returned] == expected
        else:
            assert expected == queued
    assert general.close("closed") == fast.close("closed")


def test_the_session_names_its_provider_and_its_audio_canonically() -> None:
    session = Session()
    session.receive_message(start())
    assert ("twilio", "mulaw", "mulaw/8000", "audio/x-mulaw") == (
        session.provider, session.encoding, session.audio_format,
        session.media_format.encoding if session.media_format else None)
