"""``streamsvc replay --check``: does what the server reported for a replayed fixture match
the ``expect`` of the fixture's header?

What the client sees itself (the stream ended with a normal close, after a ``start`` the
service's own parser accepts) is always checked. Given the server's JSON log (``--log
FILE``, the lines ``streamsvc serve`` writes on stdout), the ``stream.started`` and
``stream.stopped`` lines of each replayed stream are compared field by field with
``expect``: ids, tracks, custom parameters, frame, gap and out-of-order counts, bad frames,
ignored events, DTMF digits and the stop reason; only lines written after the replay began
count, and a stream whose handlers failed (``handler_errors``) never matches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = ["CHECKED_FIELDS", "Outcome", "differences", "expect_for_copy", "log_size",
           "read_outcomes", "wait_for_outcomes"]

# Which log line reports each field of a fixture's `expect`.
CHECKED_FIELDS: Final[Mapping[str, str]] = {
    "call_sid": "stream.started",
    "stream_sid": "stream.started",
    "account_sid": "stream.started",
    "tracks": "stream.started",
    "custom_parameters": "stream.started",
    "frames": "stream.stopped",
    "missing_frames": "stream.stopped",
    "out_of_order_frames": "stream.stopped",
    "bad_frames": "stream.stopped",
    "ignored_events": "stream.stopped",
    "dtmf": "stream.stopped",
    "reason": "stream.stopped",
}
Outcome = dict[str, dict[str, Any]]  # log event name -> that line, for one stream


def expect_for_copy(expect: Mapping[str, Any],
                    replacements: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``expect`` with the ids a replayed copy was given in place of the recorded ones."""
    adjusted = dict(expect)
    for old, new in replacements:
        for key in ("call_sid", "stream_sid"):
            if adjusted.get(key) == old:
                adjusted[key] = new
        parameters = adjusted.get("custom_parameters")
        if isinstance(parameters, dict):  # a parameter carrying an id (Vonage's call_uuid)
            adjusted["custom_parameters"] = {name: new if value == old else value
                                             for name, value in parameters.items()}
    return adjusted


def log_size(log: Path) -> int:
    """Bytes ``log`` holds now (0 when it does not exist yet): where a replay's lines
    begin."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def read_outcomes(log: Path, key: str = "stream_sid", *,
                  since: int = 0) -> dict[str, Outcome]:
    """The ``stream.started`` and ``stream.stopped`` lines of a server log, by stream_sid
    (or by another field of theirs: ``call_sid``), written after its first ``since`` bytes
    (an earlier run's lines for the same ids never count). Lines that are not JSON objects
    are skipped (a log may mix in other output)."""
    outcomes: dict[str, Outcome] = {}
    try:
        with log.open("rb") as file:
            file.seek(since)
            text = file.read()
    except OSError:
        return outcomes
    for line in text.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or entry.get("event") not in CHECKED_FIELDS.values():
            continue
        name = entry.get(key)
        if isinstance(name, str):
            outcomes.setdefault(name, {})[entry["event"]] = entry
    return outcomes


async def wait_for_outcomes(log: Path, stream_sids: set[str], timeout_s: float = 10.0, *,
                            key: str = "stream_sid", since: int = 0) -> dict[str, Outcome]:
    """Read ``log`` (past its first ``since`` bytes) until every stream in ``stream_sids``
    (values of ``key``) has its ``stream.stopped`` line (the server writes it once the
    call's handlers have finished), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes = read_outcomes(log, key, since=since)
        done = {sid for sid in stream_sids if "stream.stopped" in outcomes.get(sid, {})}
        if done == stream_sids or time.monotonic() > deadline:
            return outcomes
        await asyncio.sleep(0.1)


def differences(expect: Mapping[str, Any], outcome: Outcome | None) -> list[str]:
    """Each field of ``expect`` the server reported otherwise, as ``field: expected X, server
    reported Y``; fields ``expect`` does not name are not checked."""
    if outcome is None or "stream.started" not in outcome:
        return ["the server log has no stream.started line for this stream"]
    found = []
    for key, expected in expect.items():
        event = CHECKED_FIELDS.get(key)
        if event is None:
            continue
        line = outcome.get(event)
        if line is None:
            found.append(f"the server log has no {event} line for this stream")
            continue
        reported = line.get(key)
        if reported != expected:
            found.append(f"{key}: expected {_show(expected)}, server reported {_show(reported)}")
    if "hand_off" in expect:
        found += _hand_off_differences(expect["hand_off"], outcome.get("stream.stopped"))
    failed = (outcome.get("stream.stopped") or {}).get("handler_errors")
    if failed:  # whatever the expect says: a handler that failed is a failed call
        found.append(f"handler_errors: the server reported {_show(failed)}")
    return found


def _hand_off_differences(expected: Any, stopped: Mapping[str, Any] | None) -> list[str]:
    """``expect``'s ``hand_off`` (null: none; else the fields it names, e.g. ``target`` and
    ``sent``) against ``stream.stopped``'s."""
    if stopped is None:
        return ["the server log has no stream.stopped line for this stream"]
    reported = stopped.get("hand_off")
    if expected is None or reported is None or not isinstance(expected, dict):
        return [] if expected == reported else [
            f"hand_off: expected {_show(expected)}, server reported {_show(reported)}"]
    return [f"hand_off.{key}: expected {_show(value)}, server reported "
            f"{_show(reported.get(key))}"
            for key, value in expected.items() if reported.get(key) != value]


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()
