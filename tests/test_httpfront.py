"""The HTTP front: the first request of a connection, read with h11, decided once."""

from __future__ import annotations

import http

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsvc.server.front import Answer, HttpFront, Upgrade
from streamsvc.web.webhooks import HttpRequest, HttpResponse

UPGRADE = (b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
WEBHOOK = (b"POST /twiml?customerID=cus_8812 HTTP/1.1\r\nHost: voice.example.com\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\n"
           b"X-Twilio-Signature: abc=\r\nContent-Length: 13\r\n\r\nCallSid=CA123")


class Recorder:
    """A responder that keeps what it was asked."""

    def __init__(self) -> None:
        self.requests: list[HttpRequest] = []
        self.refusals: list[tuple[int, str]] = []

    def respond(self, request: HttpRequest) -> HttpResponse:
        self.requests.append(request)
        return HttpResponse(http.HTTPStatus.OK, b"answered")

    def refuse(self, status: http.HTTPStatus, reason: str, request: HttpRequest) -> HttpResponse:
        self.refusals.append((int(status), reason))
        return HttpResponse(status, reason.encode())


def front(recorder: Recorder, max_body_bytes: int = 64) -> HttpFront:
    return HttpFront(recorder.respond, recorder.refuse, max_body_bytes=max_body_bytes)


def feed_three_ways(data: bytes) -> list[Upgrade | Answer | None]:
    """The decision for ``data`` fed all at once, byte by byte, and with trailing bytes."""
    decisions = []
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))], [data + b"\x81\x80"]):
        reader = front(Recorder())
        decision = None
        for chunk in chunks:
            decision = reader.receive_data(chunk)
            if decision is not None:
                break
        decisions.append(decision)
    return decisions


def test_a_websocket_handshake_is_handed_over_with_every_byte_read() -> None:
    whole, piecewise, trailing = feed_three_ways(UPGRADE)
    assert isinstance(whole, Upgrade)
    assert (UPGRADE, "/stream") == (whole.data, whole.target)
    assert ("upgrade", "websocket") in whole.headers
    assert whole == piecewise
    assert isinstance(trailing, Upgrade)
    assert UPGRADE + b"\x81\x80" == trailing.data  # the first frame goes along


def test_a_form_post_is_read_whole_with_its_body() -> None:
    recorder = Recorder()
    reader = front(recorder)
    assert reader.receive_data(WEBHOOK[:60]) is None
    decision = reader.receive_data(WEBHOOK[60:])
    assert Answer(HttpResponse(http.HTTPStatus.OK, b"answered")) == decision
    [request] = recorder.requests
    assert ("POST", "/twiml?customerID=cus_8812", b"CallSid=CA123", "abc=") == (
        request.method, request.target, request.body, request.headers["x-twilio-signature"])


def test_every_way_of_feeding_a_request_gives_the_same_answer() -> None:
    whole, piecewise, trailing = feed_three_ways(WEBHOOK)
    assert whole == piecewise == trailing
    assert isinstance(whole, Answer)


def test_a_body_over_the_limit_is_refused_413_before_it_is_read() -> None:
    recorder = Recorder()
    decision = front(recorder, max_body_bytes=12).receive_data(WEBHOOK[:WEBHOOK.index(b"\r\n\r\n")
                                                                        + 4])
    assert isinstance(decision, Answer)
    assert [(413, "body_too_large")] == recorder.refusals


def test_a_chunked_body_over_the_limit_is_refused_413() -> None:
    recorder = Recorder()
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    reader = front(recorder, max_body_bytes=8)
    assert reader.receive_data(head) is None
    assert isinstance(reader.receive_data(b"10\r\n" + b"a" * 16 + b"\r\n"), Answer)
    assert [(413, "body_too_large")] == recorder.refusals


def test_a_head_over_the_limit_is_refused() -> None:
    recorder = Recorder()
    reader = HttpFront(recorder.respond, recorder.refuse, max_body_bytes=64, max_head_bytes=100)
    decision = reader.receive_data(b"GET /x HTTP/1.1\r\nX-Long: " + b"a" * 200)
    assert isinstance(decision, Answer)
    assert [(431, "bad_request")] == recorder.refusals


@pytest.mark.parametrize(("head", "status", "reason"), [
    (b"GET /stream HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 17_000 + b"\r\n\r\n", 431,
     "head_too_large"),
    (b"GET /stream?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "target_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: 1\r\n" % n for n in range(500)) + b"\r\n", 431, "head_too_large"),
])
def test_a_head_over_the_limits_that_comes_whole_in_one_read_is_refused(
        head: bytes, status: int, reason: str) -> None:
    """h11 bounds only a head still incomplete: one read of a whole head past the limits
    (a 17 KB field, a 20 KB request line, 500 fields) is refused all the same."""
    for chunks in ([head], [head[:len(head) // 2], head[len(head) // 2:]]):
        recorder = Recorder()
        reader = front(recorder)
        decision = None
        for chunk in chunks:
            decision = reader.receive_data(chunk)
            if decision is not None:
                break
        assert isinstance(decision, Answer)
        assert [(status, reason)] == recorder.refusals


def test_garbage_is_a_bad_request() -> None:
    recorder = Recorder()
    decision = front(recorder).receive_data(b"\x16\x03\x01 hello\r\n\r\n")
    assert isinstance(decision, Answer)
    assert [(400, "bad_request")] == recorder.refusals


def test_a_repeated_header_is_one_comma_joined_value() -> None:
    recorder = Recorder()
    front(recorder).receive_data(b"GET /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: a\r\n"
                                 b"X-Twilio-Signature: b\r\n\r\n")
    assert "a, b" == recorder.requests[0].headers["x-twilio-signature"]


def test_a_get_with_a_body_is_read_whole_and_answered_once() -> None:
    recorder = Recorder()
    decision = front(recorder).receive_data(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined: only the first is answered
    assert isinstance(decision, Answer)
    assert [b"hello"] == [request.body for request in recorder.requests]


@given(st.binary(max_size=400))
def test_any_bytes_give_a_decision_or_ask_for_more(data: bytes) -> None:
    recorder = Recorder()
    decision = front(recorder).receive_data(data)
    assert decision is None or isinstance(decision, Upgrade | Answer)
    assert len(recorder.requests) + len(recorder.refusals) == (
        1 if isinstance(decision, Answer) else 0)
