"""The ``streamsvc`` command: one module per subcommand (``add_parser`` + ``run``):
:mod:`~streamsvc.cli.serve`, :mod:`~streamsvc.cli.replay`, :mod:`~streamsvc.cli.twiml`,
:mod:`~streamsvc.cli.events`, :mod:`~streamsvc.cli.fixture`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from streamsvc import __version__
from streamsvc.cli import events, fixture, replay, serve, twiml

__all__ = ["main"]

DESCRIPTION = """\
A media-stream consumer (Twilio, ACS, Telnyx, SignalWire, Exotel, Plivo, Vonage). Point Twilio's
<Start><Stream url="wss://HOST/stream"> or <Connect><Stream> at it (or another provider's
stream at a route that names it); each stream becomes a session whose ids and custom
parameters are bound into every log line, and whose frames reach the route's handlers.
"""


# Each subcommand's module, in --help's order.
COMMANDS = {"serve": serve, "replay": replay, "twiml": twiml, "events": events,
            "fixture": fixture}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsvc", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"streamsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Handlers named "myapp:Handler" import from the current directory, as they do under
    # `python -m streamsvc` (which puts it first on the path); the console script does not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = parser.parse_args(argv)
    try:
        code: int = COMMANDS[args.command].run(args, parser, argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`streamsvc replay ... | head`): what is left unwritten goes
        # nowhere, quietly, instead of a traceback at the interpreter's last flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code
