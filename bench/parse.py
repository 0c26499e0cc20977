"""Per-message parse + payload decode of one Twilio media frame, four ways:

* streamsvc's hot path (``wire.parse_media``: typed msgspec decode, base64 in C);
* ``json.loads`` + ``base64.b64decode`` (what Twilio's samples do);
* ``orjson.loads`` + dict access + ``binascii.a2b_base64``;
* msgspec with the payload kept as text and decoded later in Python (the lazy variant
  streamsvc measured and did not pick).

Each figure is the median over rounds of the mean time per call; each ratio is the median of
the per-round ratios against streamsvc's path, all from the same run.
"""

from __future__ import annotations

import base64
import binascii
import json
import statistics
import timeit
from collections.abc import Callable

import msgspec
import orjson

from streamsvc import wire

FRAME = (
    b'{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"2",'
    b'"timestamp":"119","payload":"' + base64.b64encode(bytes(range(96, 256))) + b'"},'
    b'"streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"}'
)


class _LazyBody(msgspec.Struct, frozen=True, gc=False):
    track: str
    chunk: str
    timestamp: str
    payload: str


class _LazyMedia(msgspec.Struct, frozen=True, gc=False, rename="camel"):
    stream_sid: str
    media: _LazyBody


_lazy = msgspec.json.Decoder(_LazyMedia)


def streamsvc_hot_path() -> object:
    # The same three values through the same nesting as the dict baselines
    # (``event.track`` and friends are properties over these, ~65 ns each).
    media = wire.parse_media(FRAME).media  # type: ignore[union-attr]
    return media.track, media.timestamp, media.payload


def json_b64decode() -> object:
    message = json.loads(FRAME)
    media = message["media"]
    return media["track"], int(media["timestamp"]), base64.b64decode(media["payload"])


def orjson_a2b() -> object:
    message = orjson.loads(FRAME)
    media = message["media"]
    return media["track"], int(media["timestamp"]), binascii.a2b_base64(media["payload"])


def msgspec_lazy_payload() -> object:
    media = _lazy.decode(FRAME).media
    return media.track, int(media.timestamp), binascii.a2b_base64(media.payload)


CANDIDATES: dict[str, Callable[[], object]] = {
    "streamsvc wire.parse_media": streamsvc_hot_path,
    "json.loads + b64decode": json_b64decode,
    "orjson.loads + a2b_base64": orjson_a2b,
    "msgspec, payload decoded later": msgspec_lazy_payload,
}


def measure(fn: Callable[[], object], *, number: int) -> float:
    """Mean microseconds per call over ``number`` calls."""
    return timeit.timeit(fn, number=number) / number * 1e6


def main(*, quick: bool = False) -> None:
    rounds, number = (5, 20_000) if quick else (21, 50_000)
    ours_name = "streamsvc wire.parse_media"
    micros: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    ratios: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    # Each round measures every candidate back to back and the ratio is taken within the
    # round, so that drift in machine load hits the compared figures alike.
    for _ in range(rounds):
        this_round = {name: measure(fn, number=number) for name, fn in CANDIDATES.items()}
        for name, value in this_round.items():
            micros[name].append(value)
            ratios[name].append(value / this_round[ours_name])
    print(f"parse + payload decode, one 160-byte media frame: medians of {rounds} rounds "
          f"of {number} calls")
    print(f"{'path':34} {'us/msg':>8} {'x ours':>8}")
    for name in CANDIDATES:
        print(f"{name:34} {statistics.median(micros[name]):8.3f} "
              f"{statistics.median(ratios[name]):8.2f}")
