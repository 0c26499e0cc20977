"""Process metrics for ``GET /metrics`` in the Prometheus text format.

Nothing here runs per frame: calls add their totals when they end, frame counts of calls in
progress are read from their sessions at scrape time, and handler latency is kept in plain
bucket counters. No label carries a per-call value (ids, parameters): track labels are
``inbound``, ``outbound`` or ``other``, handler labels are configured names, reasons are a
fixed set.
"""

from __future__ import annotations

import bisect
import collections
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamsvc.logs import dropped_lines
from streamsvc.server.loop_lag import BUCKETS_S as LOOP_LAG_BUCKETS_S
from streamsvc.server.loop_lag import LoopLag

if TYPE_CHECKING:
    from streamsvc.fleet.node import FleetNode
from streamsvc.session import CallSummary, Session

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "Metrics", "WorkerShare"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Handler latency buckets in seconds: most of the interesting ones below a millisecond.
LATENCY_BUCKETS_S: Final = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                            0.01, 0.025, 0.1, 0.5, 2.5)
_TRACK_LABELS: Final = frozenset({"inbound", "outbound"})


def track_label(track: str) -> str:
    """A bounded label for a track name (the peer chooses track names)."""
    return track if track in _TRACK_LABELS else "other"


class LatencyHistogram:
    """Bucket counts and a sum, in seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds


class Metrics(Collector):
    """The service's metrics. ``live_sessions`` lists the sessions in progress."""

    def __init__(self, live_sessions: Callable[[], Iterable[Session]]) -> None:
        self.live_sessions = live_sessions
        self.active_calls = 0
        self.calls_started = 0
        self.calls_ended: collections.Counter[str] = collections.Counter()
        self.frames: collections.Counter[str] = collections.Counter()
        self.missing_frames: collections.Counter[str] = collections.Counter()
        self.bad_frames = 0
        self.handler_drops: collections.Counter[str] = collections.Counter()
        self.handler_errors: collections.Counter[str] = collections.Counter()
        self.handshakes_rejected: collections.Counter[str] = collections.Counter()
        # Plain HTTP requests on the stream port refused (not_found, method, ...), by reason.
        self.http_rejected: collections.Counter[str] = collections.Counter()
        self.outbound_dropped = 0  # frames for peers that stopped reading
        self.unread_closes = 0  # connections closed: the peer did not read what it caused
        self.pending_evicted = 0  # connections awaiting a start closed to make room
        # Hand-offs by (provider, mechanism, outcome).
        self.hand_offs: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # Faults of peers the transport reported (picows: bad_frame, not_reading), by kind.
        self.peer_faults: collections.Counter[str] = collections.Counter()
        # Streams closed (1008) after their start, before any handler saw them, by reason.
        self.streams_refused: collections.Counter[str] = collections.Counter()
        self.bus: FleetNode | None = None  # a fleet's link to Redis (redis_url)
        self.stream_status_callbacks: collections.Counter[str] = collections.Counter()
        # Voice webhook answers by outcome: served, over_budget, or a rejection reason.
        self.webhooks: collections.Counter[str] = collections.Counter()
        # ACS: Event Grid deliveries by outcome, Call Automation callbacks by type.
        self.acs_events: collections.Counter[str] = collections.Counter()
        self.acs_callbacks: collections.Counter[str] = collections.Counter()
        self.handler_latency: dict[str, LatencyHistogram] = collections.defaultdict(
            LatencyHistogram)
        self.loop_lag = LoopLag()  # sampled while the server runs
        self.share: WorkerShare | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # RSS, CPU, open file descriptors

    def observe_latency(self, handler: str, seconds: float) -> None:
        self.handler_latency[handler].observe(seconds)

    def call_ended(self, summary: CallSummary, errors: dict[str, int],
                   drops: dict[str, int]) -> None:
        self.calls_ended[summary.reason] += 1
        for track, count in summary.frames.items():
            self.frames[track_label(track)] += count
        for track, count in summary.missing_frames.items():
            self.missing_frames[track_label(track)] += count
        self.bad_frames += summary.bad_frames
        self.handler_errors.update(errors)
        self.handler_drops.update(drops)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format; with :meth:`share_with_workers`,
        the service's own metrics are the sums over every worker's latest snapshot."""
        if self.share is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self.share.merged(list(self.collect()))))
        ProcessCollector(registry=registry)  # this process's own
        return generate_latest(registry)

    def share_with_workers(self, directory: str) -> WorkerShare:
        """Publish this process's metrics in ``directory`` beside its sibling workers'
        (``streamsvc serve --workers N``) and sum theirs into :meth:`render`."""
        self.share = WorkerShare(Path(directory), self)
        return self.share

    def collect(self) -> Iterator[Metric]:
        frames = collections.Counter(self.frames)
        missing = collections.Counter(self.missing_frames)
        bad_frames = self.bad_frames
        for session in self.live_sessions():
            for track, stats in session.track_stats.items():
                frames[track_label(track)] += stats.frames
                missing[track_label(track)] += stats.missing
            bad_frames += session.bad_frames
        yield _gauge("streamsvc_active_calls", "Streams in progress.", self.active_calls)
        yield _counter("streamsvc_calls_started", "Streams that sent start.",
                       self.calls_started)
        yield _labelled("streamsvc_calls_ended", "Streams ended, by reason.", "reason",
                        self.calls_ended)
        yield _labelled("streamsvc_frames", "Media frames received, by track.", "track",
                        frames)
        yield _labelled("streamsvc_missing_frames",
                        "20 ms slots that never arrived, by track.", "track", missing)
        yield _counter("streamsvc_bad_frames", "Malformed or misplaced frames.", bad_frames)
        yield _counter("streamsvc_outbound_frames_dropped",
                       "Frames to send dropped: the peer had stopped reading.",
                       self.outbound_dropped)
        yield _counter("streamsvc_unread_closes",
                       "Connections closed (1008) because the peer did not read what it "
                       "asked for (pongs to a ping flood).", self.unread_closes)
        yield _counter("streamsvc_pending_evicted",
                       "Connections that had not sent their start, closed (1008) to make room "
                       "for a newer one (max_pending_starts).", self.pending_evicted)
        yield _labelled("streamsvc_streams_refused",
                        "Streams closed (1008) after their start before any handler saw them, "
                        "by reason (duplicate_stream_sid, provider_mismatch, account_mismatch).",
                        "reason",
                        self.streams_refused)
        hand_offs = CounterMetricFamily(
            "streamsvc_hand_offs", "Calls handed to a person, by provider, mechanism and "
            "outcome (ok, failed).", labels=["provider", "mechanism", "outcome"])
        for labels, count in sorted(self.hand_offs.items()):
            hand_offs.add_metric(list(labels), count)
        yield hand_offs
        yield _labelled("streamsvc_peer_faults",
                        "Faults of peers the transport closed connections for (a malformed or "
                        "oversized frame), or saw (a peer that stopped reading), by kind.",
                        "kind", self.peer_faults)
        yield _counter("streamsvc_log_lines_dropped",
                       "Log lines lost: the log reader fell behind or a write failed.",
                       dropped_lines())
        yield _labelled("streamsvc_handler_drops",
                        "Events a queued handler fell too far behind to take.", "handler",
                        self.handler_drops)
        yield _labelled("streamsvc_handler_errors",
                        "Handlers disabled for a call by an exception.", "handler",
                        self.handler_errors)
        yield _labelled("streamsvc_handshakes_rejected",
                        "Connections refused before a session existed, by reason.",
                        "reason", self.handshakes_rejected)
        yield _labelled("streamsvc_http_rejected",
                        "Plain HTTP requests refused (unknown path, method, size), by reason.",
                        "reason", self.http_rejected)
        yield _labelled("streamsvc_stream_status_callbacks",
                        "Stream status callbacks from Twilio, by event.", "event",
                        self.stream_status_callbacks)
        yield _labelled("streamsvc_acs_events", "ACS Event Grid deliveries, by outcome.",
                        "outcome", self.acs_events)
        yield _labelled("streamsvc_acs_callbacks", "ACS Call Automation callbacks, by type.",
                        "callback", self.acs_callbacks)
        yield _labelled("streamsvc_webhooks",
                        "Voice webhook and status callback requests, by outcome.", "outcome",
                        self.webhooks)
        if self.bus is not None:
            yield from _bus_families(self.bus)
        latency = HistogramMetricFamily(
            "streamsvc_handler_latency_seconds",
            "Time a handler spent on one event (media sampled 1 in 8).", labels=["handler"])
        for handler, histogram in sorted(self.handler_latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), histogram.counts,
                                    strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([handler], buckets, histogram.total)
        yield latency
        lag = self.loop_lag
        cumulative, buckets = 0, []
        for bound, count in zip((*LOOP_LAG_BUCKETS_S, float("inf")), lag.counts, strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        loop_lag = HistogramMetricFamily(
            "streamsvc_event_loop_lag_seconds",
            "How late the event loop ran a callback that was due (sampled every 5 ms): "
            "periodic stalls show here.")
        loop_lag.add_metric([], buckets, lag.total)
        yield loop_lag
        yield _gauge("streamsvc_event_loop_lag_max_seconds",
                     "The longest event-loop lag in the last 60 s.", lag.recent_max())


def _bus_families(bus: FleetNode) -> Iterator[Metric]:
    yield _counter("streamsvc_bus_published", "Call events written to the events stream.",
                   bus.published)
    yield _counter("streamsvc_bus_audio_published",
                   "Audio batches written (routes with publish_audio).", bus.audio_published)
    yield _labelled("streamsvc_bus_dropped",
                    "Writes to Redis dropped (buffer full while Redis was away, refused, or "
                    "left at stop), by kind.", "kind", bus.dropped)
    yield _gauge("streamsvc_bus_buffered", "Writes waiting for Redis.", bus.buffered)
    yield _counter("streamsvc_bus_errors", "Failed attempts to write to Redis.", bus.errors)
    yield _gauge("streamsvc_bus_up", "1 while Redis takes this instance's writes.",
                 0 if bus.outage_since is not None else 1)
    yield _labelled("streamsvc_bus_lookups", "Reads a call waited for, by outcome.",
                    "outcome", bus.lookups)
    yield _labelled("streamsvc_bus_commands", "Talk-back commands from other processes, "
                    "by op and outcome.", "command", bus.commands)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(name: str, documentation: str, label: str,
              values: collections.Counter[str]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


# A worker publishes about once a second; a snapshot this old is a dead worker's.
STALE_SNAPSHOT_S = 10.0


class WorkerShare:
    """The metrics of the worker processes of one ``streamsvc serve --workers N``, which
    share a port: whichever worker a scrape reaches answers for all of them. Each worker
    writes a snapshot of its samples to ``<directory>/<pid>.json`` (:meth:`publish`, about
    once a second and when it stops); :meth:`merged` sums its own live samples with the
    others' snapshots. Counters and histogram buckets add up across processes, and so
    does the active-calls gauge."""

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory
        self.metrics = metrics
        self.own = directory / f"{os.getpid()}.json"

    def publish(self) -> None:
        """Write this process's samples (atomically: readers never see half a file)."""
        snapshot = [_family_to_json(family) for family in self.metrics.collect()]
        partial = self.own.with_suffix(".partial")
        partial.write_bytes(orjson.dumps(snapshot))
        os.replace(partial, self.own)

    def merged(self, own: list[Metric]) -> list[Metric]:
        """``own`` families with every other worker's snapshot added in."""
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        snapshots = [[_family_to_json(family) for family in own]]
        now = time.time()
        for path in sorted(self.directory.glob("*.json")):
            if path == self.own:
                continue
            try:
                if now - path.stat().st_mtime > STALE_SNAPSHOT_S:
                    continue  # a worker that stopped publishing is gone: its calls too
                snapshots.append(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue  # a worker that is gone, or one writing: skip it this time
        for snapshot in snapshots:
            for name, documentation, kind, samples in snapshot:
                families.setdefault(name, Metric(name, documentation, kind))
                family_values = values.setdefault(name, {})
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(sorted(labels.items())))
                    if name.endswith("_max_seconds"):  # the worst worker's, not a sum
                        family_values[key] = max(family_values.get(key, 0.0), value)
                    else:
                        family_values[key] = family_values.get(key, 0.0) + value
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
        workers = _gauge("streamsvc_workers", "Worker processes whose metrics this answer "
                         "sums (serve --workers N).", len(snapshots))
        return [*families.values(), workers]


def _family_to_json(family: Metric) -> list[Any]:
    return [family.name, family.documentation, family.type,
            [[s.name, dict(s.labels), s.value] for s in family.samples]]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
