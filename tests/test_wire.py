"""The wire format, one table of cases: each inbound case is parsed three ways (bytes, str,
and re-laid out with other key order and spacing); each outbound case is serialized and
compared byte for byte with Twilio's shape."""

from __future__ import annotations

import base64
import json

import pytest

from streamsvc import wire
from streamsvc.exceptions import RemoteProtocolError

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
PAYLOAD = bytes(range(160))
B64 = base64.b64encode(PAYLOAD).decode()

START_BODY = {
    "accountSid": "AC0001", "streamSid": SID, "callSid": "CA0001",
    "tracks": ["inbound", "outbound"],
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
}

INBOUND_CASES = [
    pytest.param(
        '{"event":"connected","protocol":"Call","version":"1.0.0"}',
        wire.Connected(protocol="Call", version="1.0.0"),
        id="connected-1.0.0",
    ),
    pytest.param(
        '{"event":"connected","protocol":"Call","version":"0.2.0"}',
        wire.Connected(protocol="Call", version="0.2.0"),
        id="connected-0.2.0",
    ),
    pytest.param(
        json.dumps({"event": "start", "sequenceNumber": "1",
                    "start": {**START_BODY, "customParameters": {"FirstName": "Jane"}},
                    "streamSid": SID}),
        wire.Start(
            start=wire._StartBody(
                account_sid="AC0001", stream_sid=SID, call_sid="CA0001",
                tracks=("inbound", "outbound"),
                media_format=wire.MediaFormat("audio/x-mulaw", 8000, 1),
                custom_parameters={"FirstName": "Jane"},
            ),
            sequence_number=1, stream_sid=SID,
        ),
        id="start-with-parameters",
    ),
    pytest.param(
        json.dumps({"event": "start", "sequenceNumber": "1", "start": START_BODY,
                    "streamSid": SID}),
        wire.Start(
            start=wire._StartBody(
                account_sid="AC0001", stream_sid=SID, call_sid="CA0001",
                tracks=("inbound", "outbound"),
                media_format=wire.MediaFormat("audio/x-mulaw", 8000, 1),
            ),
            sequence_number=1, stream_sid=SID,
        ),
        id="start-without-customParameters",
    ),
    pytest.param(
        '{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1",'
        f'"timestamp":"99","payload":"{B64}"}},"streamSid":"{SID}"}}',
        wire.Media(stream_sid=SID, sequence_number=2,
                   media=wire._MediaBody(track="inbound", chunk=1, timestamp=99,
                                         payload=PAYLOAD)),
        id="media",
    ),
    pytest.param(
        f'{{"event":"dtmf","streamSid":"{SID}","sequenceNumber":"5",'
        '"dtmf":{"track":"inbound_track","digit":"1"}}',
        wire.Dtmf(dtmf=wire._DtmfBody(track="inbound_track", digit="1"), stream_sid=SID,
                  sequence_number=5),
        id="dtmf",
    ),
    pytest.param(
        f'{{"event":"mark","sequenceNumber":"4","streamSid":"{SID}",'
        '"mark":{"name":"greeting-end"}}',
        wire.Mark(mark=wire._MarkBody(name="greeting-end"), stream_sid=SID, sequence_number=4),
        id="mark",
    ),
    pytest.param(
        f'{{"event":"stop","sequenceNumber":"365","streamSid":"{SID}",'
        '"stop":{"accountSid":"AC0001","callSid":"CA0001"}}',
        wire.Stop(stream_sid=SID, sequence_number=365,
                  stop=wire._StopBody(account_sid="AC0001", call_sid="CA0001")),
        id="stop",
    ),
    pytest.param(
        '{"event":"transcription","text":"hello"}',
        wire.UnknownEvent("transcription"),
        id="unknown-event-is-kept-as-such",
    ),
]


def relayout(text: str) -> str:
    """The same message with keys reversed at every level and spaces everywhere."""

    def reverse(value: object) -> object:
        if isinstance(value, dict):
            return {k: reverse(v) for k, v in reversed(list(value.items()))}
        return value

    return json.dumps(reverse(json.loads(text)), indent=1, ensure_ascii=True)


@pytest.mark.parametrize(("text", "expected"), INBOUND_CASES)
@pytest.mark.parametrize("form", ["bytes", "str", "relaid"])
def test_inbound_messages_parse_to_typed_events(text: str, expected: wire.Event,
                                                form: str) -> None:
    frame: str | bytes = {"bytes": text.encode(), "str": text, "relaid": relayout(text)}[form]
    assert expected == wire.parse(frame)
    assert expected == wire.parse_media(frame)


def test_media_properties_flatten_the_nesting() -> None:
    media = wire.parse(INBOUND_CASES[4].values[0])
    assert isinstance(media, wire.Media)
    assert ("inbound", 1, 99, PAYLOAD) == (media.track, media.chunk, media.timestamp_ms,
                                          media.payload)


def test_start_properties_flatten_the_nesting() -> None:
    start = wire.parse(INBOUND_CASES[2].values[0])
    assert isinstance(start, wire.Start)
    assert ("CA0001", "AC0001", SID, ("inbound", "outbound")) == (
        start.call_sid, start.account_sid, start.started_stream_sid, start.tracks)
    assert {"FirstName": "Jane"} == dict(start.custom_parameters)
    assert 8000 == start.media_format.sample_rate


def test_events_are_immutable() -> None:
    media = wire.parse(INBOUND_CASES[4].values[0])
    with pytest.raises(AttributeError):
        media.stream_sid = "other"  # type: ignore[misc]


MEDIA_TEMPLATE = (
    '{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1",'
    '"timestamp":%s,"payload":%s},"streamSid":"MZ1"}'
)

MALFORMED_CASES = [
    pytest.param(b"", "not JSON", id="empty"),
    pytest.param(b"not json", "not JSON", id="text"),
    pytest.param(b'{"event":"media"', "not JSON", id="truncated"),
    pytest.param(b"\xff\xfe{}", "not JSON", id="invalid-utf8"),
    pytest.param(b"[1,2]", "not a JSON object", id="array"),
    pytest.param(b'"media"', "not a JSON object", id="string"),
    pytest.param(b"{}", "missing or non-string `event`", id="no-event"),
    pytest.param(b'{"event":7}', "missing or non-string `event`", id="numeric-event"),
    pytest.param(b'{"event":"media","streamSid":"MZ1"}', "invalid media", id="no-media-body"),
    pytest.param((MEDIA_TEMPLATE % ('"-1"', '"AAAA"')).encode(), "$.media.timestamp",
                 id="negative-timestamp"),
    pytest.param((MEDIA_TEMPLATE % ('"9a"', '"AAAA"')).encode(), "$.media.timestamp",
                 id="non-numeric-timestamp"),
    pytest.param((MEDIA_TEMPLATE % ("null", '"AAAA"')).encode(), "$.media.timestamp",
                 id="null-timestamp"),
    pytest.param((MEDIA_TEMPLATE % ('"1"', '"A"')).encode(), "$.media.payload",
                 id="bad-base64"),
    pytest.param((MEDIA_TEMPLATE % ('"1"', "12")).encode(), "$.media.payload",
                 id="numeric-payload"),
    pytest.param(b'{"event":"start","start":{}}', "invalid start", id="empty-start"),
    pytest.param(
        json.dumps({"event": "start", "start": {**START_BODY, "customParameters": {"a": 1}}})
        .encode(), "$.start.customParameters", id="non-string-parameter"),
    pytest.param(b'{"event":"dtmf","dtmf":{"track":"inbound_track"}}', "invalid dtmf",
                 id="dtmf-without-digit"),
    pytest.param(b'{"event":"mark","mark":"x"}', "invalid mark", id="mark-not-object"),
]


@pytest.mark.parametrize(("frame", "reason"), MALFORMED_CASES)
def test_malformed_frames_raise_remote_protocol_error_with_reason(frame: bytes,
                                                                  reason: str) -> None:
    for parser in (wire.parse, wire.parse_media):
        with pytest.raises(RemoteProtocolError) as caught:
            parser(frame)
        assert reason in caught.value.reason
        assert 1008 == caught.value.close_code


def test_numbers_may_be_strings_or_numbers() -> None:
    as_numbers = wire.parse(MEDIA_TEMPLATE % ("99", '"AAAA"'))
    as_strings = wire.parse(MEDIA_TEMPLATE % ('"99"', '"AAAA"'))
    assert as_strings == as_numbers


def test_unknown_keys_are_ignored() -> None:
    text = MEDIA_TEMPLATE % ('"99"', '"AAAA"')
    extended = text[:-1] + ',"future":{"x":[1,2]}}'
    assert wire.parse(text) == wire.parse(extended)


def test_escaped_payload_decodes_like_the_plain_one() -> None:
    plain = MEDIA_TEMPLATE % ('"99"', '"//8A"')
    escaped = MEDIA_TEMPLATE % ('"99"', '"\\/\\/8A"')
    assert wire.parse_media(plain) == wire.parse_media(escaped)
    assert b"\xff\xff\x00" == wire.parse_media(escaped).payload  # type: ignore[union-attr]


OUTBOUND_CASES = [
    pytest.param(
        lambda: wire.serialize_media(SID, b"\x7f\xff\x00"),
        f'{{"event":"media","streamSid":"{SID}","media":{{"payload":"f/8A"}}}}',
        id="media",
    ),
    pytest.param(
        lambda: wire.serialize_mark(SID, "greeting-end"),
        f'{{"event":"mark","streamSid":"{SID}","mark":{{"name":"greeting-end"}}}}',
        id="mark",
    ),
    pytest.param(
        lambda: wire.serialize_mark(SID, 'quote " and ü'),
        f'{{"event":"mark","streamSid":"{SID}","mark":{{"name":"quote \\" and ü"}}}}',
        id="mark-escaped",
    ),
    pytest.param(
        lambda: wire.serialize_clear(SID),
        f'{{"event":"clear","streamSid":"{SID}"}}',
        id="clear",
    ),
]


@pytest.mark.parametrize(("build", "expected"), OUTBOUND_CASES)
def test_outbound_messages_have_exactly_twilios_shape(build: object, expected: str) -> None:
    assert callable(build)
    frame = build()
    assert expected.encode() == frame
    assert json.loads(expected) == json.loads(frame)  # and it is JSON a reader accepts
