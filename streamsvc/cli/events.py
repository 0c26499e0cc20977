"""``streamsvc events``: a fleet's call events (Redis) as JSON lines, through a consumer
group (at least once)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from redis.exceptions import RedisError

from streamsvc.config import redis_url_problem
from streamsvc.fleet import EVENTS_STREAM, Consumer, Entry
from streamsvc.fleet.client import DEFAULT_CLAIM_IDLE_MS
from streamsvc.logs import configure_logging

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    events = commands.add_parser(
        "events", help="print a fleet's call events (Redis) as JSON lines",
        description="Read the fleet's events stream as a member of consumer group --group "
        "(created on first use, from new entries on unless --from-start) and print each "
        "entry as one JSON line {id, event, data}; each is acknowledged once printed. "
        "Entries a dead consumer of the group left pending for --claim-idle-ms are claimed "
        "and printed too: at least once.")
    events.add_argument("--group", required=True, help="the consumer group")
    events.add_argument("--consumer", help="this consumer's name in the group (default: "
                        "host-pid; reuse a name to take over its pending entries at once)")
    events.add_argument("--redis-url", default=os.environ.get("STREAMSVC_REDIS_URL"),
                        help="default: $STREAMSVC_REDIS_URL")
    events.add_argument("--stream", default=os.environ.get("STREAMSVC_EVENTS_STREAM",
                                                           EVENTS_STREAM),
                        help=f"the events stream (default: $STREAMSVC_EVENTS_STREAM or "
                        f"{EVENTS_STREAM})")
    events.add_argument("--claim-idle-ms", type=int, default=DEFAULT_CLAIM_IDLE_MS,
                        metavar="MS", help="claim entries pending this long with another "
                        f"consumer (default: {DEFAULT_CLAIM_IDLE_MS})")
    events.add_argument("--from-start", action="store_true",
                        help="a new group starts at the oldest entry kept, not at new ones")
    events.add_argument("--count", type=int, metavar="N",
                        help="exit after N entries (default: run until interrupted)")



def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if not args.redis_url:
        parser.error("events needs --redis-url or STREAMSVC_REDIS_URL")
    if problem := redis_url_problem(args.redis_url):
        print(f"streamsvc events: --redis-url {problem}", file=sys.stderr)
        return 2
    configure_logging(level="warning", log_format="json", stream=sys.stderr.buffer)

    def show(entry: Entry) -> None:
        sys.stdout.buffer.write(entry.to_json() + b"\n")
        sys.stdout.flush()

    async def run() -> None:
        async with Consumer(args.redis_url, args.group, args.consumer, stream=args.stream,
                            claim_idle_ms=args.claim_idle_ms,
                            start="0" if args.from_start else "$") as consumer:
            await consumer.run(show, limit=args.count)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except (RedisError, OSError) as exc:
        print(f"streamsvc events: {exc}", file=sys.stderr)
        return 1
    return 0
