"""A latency handler written on the public handler API, for ``python -m bench capacity``:
``streamsvc serve`` loads it from a route (``handlers = ["bench.latency:LatencyHandler"]``)
as it would load a user's.

Each media frame's receive-to-handler latency is now minus the sender's
``time.monotonic_ns()`` in the payload's first 8 bytes (``bench/loadgen.c`` and
``bench/loadgen.py`` put it there). The call's report (``stream.stopped``'s ``handlers``)
carries a sparse histogram in 0.1 ms buckets, which the bench merges over every call."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from streamsvc import wire
from streamsvc.handlers import Handler

BUCKET_NS = 100_000  # 0.1 ms
LAST_BUCKET = 20_000  # 2 s and over share the last bucket


class LatencyHandler(Handler):
    """Counts each frame's latency into a bucket; reports the histogram."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}

    def on_media(self, frame: wire.Media) -> None:
        sent = int.from_bytes(frame.payload[:8], "little", signed=True)
        bucket = min((time.monotonic_ns() - sent) // BUCKET_NS, LAST_BUCKET)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def report(self) -> Mapping[str, Any]:
        return {"latency_0_1ms": {str(b): n for b, n in self.buckets.items()}}


def merge(reports: list[Mapping[str, Any]]) -> dict[int, int]:
    """The histograms of several calls' reports as one."""
    merged: dict[int, int] = {}
    for report in reports:
        for bucket, count in report.get("latency_0_1ms", {}).items():
            merged[int(bucket)] = merged.get(int(bucket), 0) + int(count)
    return merged


def percentiles(histogram: Mapping[int, int]) -> dict[str, float]:
    """p50, p99 and max in ms (each the upper edge of its 0.1 ms bucket)."""
    total = sum(histogram.values())
    if not total:
        return {}
    result: dict[str, float] = {}
    seen = 0
    wanted = [("p50", 0.5), ("p99", 0.99)]
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        while wanted and seen >= total * wanted[0][1]:
            result[wanted.pop(0)[0]] = round((bucket + 1) * BUCKET_NS / 1e6, 1)
    result["max"] = round((max(histogram) + 1) * BUCKET_NS / 1e6, 1)
    return result
