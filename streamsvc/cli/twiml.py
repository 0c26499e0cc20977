"""``streamsvc twiml``: print validated TwiML that streams a call to a URL."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamsvc.context.twiml import KEEP_CALL_UP_TWIML, parse_pairs, render_stream_twiml
from streamsvc.session import DEFAULT_PARAMETER_BUDGET_BYTES, parameters_size

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    twiml = commands.add_parser(
        "twiml", help="print TwiML that starts a stream (for TwiML Bins and static setups)",
        description="Print validated TwiML that streams a call to URL, with the given "
        "<Parameter>s (XML-escaped; 800 bytes in total is Twilio's guidance).",
    )
    twiml.add_argument("--url", required=True, help="wss://host/path, no query string")
    twiml.add_argument("--connect", action="store_true",
                       help="<Connect><Stream> (bidirectional) instead of <Start><Stream>")
    twiml.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a custom parameter (repeatable)")
    twiml.add_argument("--track", default="inbound_track",
                       choices=["inbound_track", "outbound_track", "both_tracks"],
                       help="for <Start><Stream>")
    twiml.add_argument("--status-callback", metavar="URL",
                       help="where Twilio sends stream-started/-stopped/-error")
    twiml.add_argument("--status-callback-method", choices=["POST", "GET"], default="POST",
                       help="how Twilio sends them (default POST)")
    twiml.add_argument("--after", default="", metavar="TWIML",
                       help="verbs after <Start>, e.g. '<Dial>+15550100</Dial>' (default: "
                       f"{KEEP_CALL_UP_TWIML}, which keeps the call up)")



def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        return _twiml(args)
    except ValueError as exc:
        parser.error(str(exc))


def _twiml(args: argparse.Namespace) -> int:
    parameters = parse_pairs(args.param)
    size = parameters_size(parameters)
    print(render_stream_twiml(args.url, parameters, connect=args.connect, track=args.track,
                              status_callback=args.status_callback,
                              status_callback_method=args.status_callback_method,
                              after=args.after))
    if not args.connect and not args.after.strip():
        print(f"note: nothing follows <Start><Stream>, so {KEEP_CALL_UP_TWIML} keeps the call "
              "up (Twilio hangs up when the TwiML runs out); --after sets what the call "
              "does meanwhile", file=sys.stderr)
    if size > DEFAULT_PARAMETER_BUDGET_BYTES:
        print(f"warning: parameters take {size} bytes, over Twilio's "
              f"{DEFAULT_PARAMETER_BUDGET_BYTES}-byte guidance", file=sys.stderr)
    return 0
