"""Property tests of the parser: each states one invariant."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamsvc import wire
from streamsvc.exceptions import RemoteProtocolError

# Any text JSON can carry except lone surrogates (not valid in UTF-8, so not in a frame).
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
wire_ints = st.integers(min_value=0, max_value=2**53)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)


def as_wire_number(draw: st.DrawFn, value: int) -> Any:
    """Twilio sends numbers as strings; tolerate real numbers too."""
    return draw(st.sampled_from([str(value), value]))


def shuffled(draw: st.DrawFn, items: dict[str, Any]) -> dict[str, Any]:
    keys = draw(st.permutations(list(items)))
    return {key: items[key] for key in keys}


@st.composite
def media_messages(draw: st.DrawFn) -> tuple[bytes, wire.Media]:
    """A valid media message in any layout, with the event it must parse to."""
    track, stream_sid = draw(texts), draw(texts)
    chunk, timestamp = draw(wire_ints), draw(wire_ints)
    payload = draw(st.binary(max_size=400))
    sequence_number = draw(st.none() | wire_ints)
    body = {
        "track": track,
        "chunk": as_wire_number(draw, chunk),
        "timestamp": as_wire_number(draw, timestamp),
        "payload": base64.b64encode(payload).decode(),
    }
    body.update(draw(st.dictionaries(texts.filter(lambda k: k not in body), json_values,
                                     max_size=2)))
    message: dict[str, Any] = {"event": "media", "media": shuffled(draw, body),
                               "streamSid": stream_sid}
    if sequence_number is not None:
        message["sequenceNumber"] = as_wire_number(draw, sequence_number)
    # Extra keys are unknown ones: never a key of Media's own, even one left out above.
    known = {"event", "media", "streamSid", "sequenceNumber"}
    message.update(draw(st.dictionaries(texts.filter(lambda k: k not in known), json_values,
                                        max_size=2)))
    text = json.dumps(
        shuffled(draw, message),
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :  ")])),
    )
    if draw(st.booleans()):
        text = text.replace("/", "\\/")  # JSON allows escaping the solidus; base64 has many
    expected = wire.Media(
        stream_sid=stream_sid,
        media=wire._MediaBody(track=track, chunk=chunk, timestamp=timestamp, payload=payload),
        sequence_number=sequence_number,
    )
    return text.encode(), expected


def outcome(parser: Any, frame: bytes) -> object:
    try:
        return parser(frame)
    except RemoteProtocolError:
        return RemoteProtocolError


@settings(max_examples=400)
@given(media_messages())
def test_fast_path_and_general_parser_agree_on_every_valid_media_message(
    case: tuple[bytes, wire.Media],
) -> None:
    frame, expected = case
    assert expected == wire.parse_media(frame)
    assert expected == wire.parse(frame)


@st.composite
def damaged_media_messages(draw: st.DrawFn) -> bytes:
    """A valid media message with one edit: a byte changed, cut, or inserted, or one field
    replaced by any JSON value."""
    frame, _ = draw(media_messages())
    edit = draw(st.sampled_from(["byte", "cut", "insert", "field"]))
    if edit == "field":
        message = json.loads(frame)
        target = message["media"] if draw(st.booleans()) else message
        target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
        return json.dumps(message).encode()
    position = draw(st.integers(min_value=0, max_value=len(frame)))
    if edit == "cut":
        return frame[:position]
    byte = bytes([draw(st.integers(0, 255))])
    if edit == "insert":
        return frame[:position] + byte + frame[position:]
    return frame[:position] + byte + frame[position + 1 :]


@settings(max_examples=600)
@given(damaged_media_messages())
@example(b'{"event":"media","streamSid":"a","media":{"track":"t","chunk":"1","timestamp":"1",'
         b'"payload":"AA=="},"streamSid":"b"}')  # duplicate key: the last one wins in both
@example(b'{"event":"media","streamSid":"a","media":{"track":"t","chunk":1.0,"timestamp":"1e3",'
         b'"payload":""}}')
def test_fast_path_accepts_exactly_what_the_general_parser_accepts(frame: bytes) -> None:
    assert outcome(wire.parse, frame) == outcome(wire.parse_media, frame)


@settings(max_examples=400)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_input_parses_or_raises_the_documented_error(frame: bytes) -> None:
    for parser in (wire.parse, wire.parse_media):
        result = outcome(parser, frame)
        assert result is RemoteProtocolError or isinstance(result, wire.Event)
