"""The ``streamsvc`` command: ``serve`` runs the service, ``replay`` plays fixtures at one,
``fixture synth`` makes fixtures from audio, ``twiml`` prints TwiML that streams a call."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit
from xml.etree import ElementTree

import structlog
from redis.exceptions import RedisError

from . import __version__
from .cli_fixture import split_pair, synth
from .config import SETTINGS, Settings, load_settings
from .context.twiml import KEEP_CALL_UP_TWIML, parse_pairs, render_stream_twiml
from .exceptions import ConfigError
from .fixtures import Fixture, FixtureError, load_fixture
from .fleet import DEFAULT_CLAIM_IDLE_MS, EVENTS_STREAM, Consumer, Entry
from .logs import configure_logging, flush_logging
from .providers import PROVIDERS
from .replay import ReplayReport, SessionResult, acs_token, replay
from .replay_call import replay_call
from .server import StreamServer
from .session import DEFAULT_PARAMETER_BUDGET_BYTES, parameters_size

__all__ = ["main"]

# Set by `serve --workers N` for its workers: the directory where they share metrics.
SHARED_METRICS_ENV = "STREAMSVC_SHARED_METRICS_DIR"
# How `serve --workers N` watches its workers: how often, how many deaths it replaces in
# all, and the longest pause before a replacement.
WORKER_POLL_S = 0.5
WORKER_RESTARTS = 10
WORKER_RESTART_MAX_S = 30.0

DESCRIPTION = """\
A media-stream consumer (Twilio, ACS, Telnyx, SignalWire, Exotel, Plivo, Vonage). Point Twilio's
<Start><Stream url="wss://HOST/stream"> or <Connect><Stream> at it (or another provider's
stream at a route that names it); each stream becomes a session whose ids and custom
parameters are bound into every log line, and whose frames reach the route's handlers.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsvc", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"streamsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the stream server",
        description="Run the stream server. SIGTERM or SIGINT drains it (no new calls, those "
        "in progress go on for up to --drain-timeout-s), a second one stops it at once. "
        "Settings come from defaults < TOML file < environment < these flags.",
    )
    serve.add_argument("--config", metavar="FILE",
                       help="TOML file with [server], [[routes]], [handlers.NAME] "
                       "(env STREAMSVC_CONFIG); handlers named 'module:Factory' are "
                       "imported from the current directory too")
    for setting in SETTINGS:
        help_text = f"{setting.help} (env {' or '.join(setting.env)}"
        if setting.secret:
            help_text += "; prefer the environment: flags show in process lists)"
        else:
            help_text += f"; default {setting.default})"
        if setting.type is bool:
            serve.add_argument(setting.flag, dest=setting.key, action="store_true",
                               default=None, help=help_text)
        else:
            serve.add_argument(setting.flag, dest=setting.key, choices=setting.choices or None,
                               metavar=setting.key.split("_")[-1].upper(), help=help_text)

    play = commands.add_parser(
        "replay", help="play fixture sessions at a running server",
        description="Play fixture sessions (streamsvc JSONL fixtures or raw captures, one "
        "Twilio message per line) at a server, as their provider would (a fixture's header "
        "names it: Twilio by default; Vonage's audio goes as binary frames), answering "
        "marks and clears in the provider's shape. Exits 1 if any session failed.",
    )
    play.add_argument("fixtures", nargs="+", metavar="FIXTURE")
    play.add_argument("--url", help="ws://host:port/path of the stream route (with "
                      "--webhook: where to connect instead of the TwiML's stream URL)")
    play.add_argument("--webhook", metavar="URL",
                      help="play each fixture as a whole call: POST the voice webhook at URL "
                      "as Twilio does, stream to the <Stream> its TwiML names with its "
                      "<Parameter>s, and follow <Connect action> when the service moves the "
                      "call (a drain in a fleet); each stream is one session of the summary")
    play.add_argument("--speed", type=float, default=1.0,
                      help="1 = real time (default), 2 = twice as fast, 0 = as fast as possible")
    play.add_argument("--concurrency", type=int, default=1, metavar="N",
                      help="play each fixture N times at once, as distinct calls")
    play.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"),
                      help="sign each handshake with X-Twilio-Signature as Twilio does "
                      "(env TWILIO_AUTH_TOKEN)")
    play.add_argument("--public-url", default=os.environ.get("STREAMSVC_PUBLIC_URL"),
                      help="origin Twilio was given, e.g. wss://voice.example.com: the signed "
                      "URL is this plus --url's path (env STREAMSVC_PUBLIC_URL; default: "
                      "--url itself)")
    play.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                      help="a header to add to each upgrade (repeatable); a fixture's own "
                      "provider headers (ACS's call ids) are sent anyway")
    play.add_argument("--acs-token", metavar="KEY.pem",
                      help="sign each upgrade with an ACS-style bearer JWT (RS256) made with "
                      "this private key, for --acs-audience")
    play.add_argument("--acs-audience", metavar="ID",
                      help="the audience of --acs-token's JWT: the server's acs_audience")
    play.add_argument("--acs-kid", default="streamsvc-replay", metavar="KID",
                      help="the key id in --acs-token's JWT header (default streamsvc-replay)")
    play.add_argument("--acs-events", metavar="URL",
                      help="deliver an ACS fixture's IncomingCall event to this URL first, as "
                      "Event Grid does (e.g. http://127.0.0.1:8080/acs/events?secret=...), so "
                      "that its context reaches the stream")
    play.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    play.add_argument("--check", action="store_true",
                      help="compare each session's outcome with its fixture's expect and exit "
                      "1 on any difference: the close the client sees, and with --log every "
                      "count the server reported")
    play.add_argument("--log", metavar="FILE", type=Path,
                      help="the server's JSON log (what streamsvc serve writes on stdout), "
                      "read by --check for each stream's stream.started/stream.stopped lines")

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

    fixture = commands.add_parser("fixture", help="make fixture sessions")
    fixture_commands = fixture.add_subparsers(dest="fixture_command", required=True,
                                              metavar="COMMAND")
    synth = fixture_commands.add_parser(
        "synth", help="build a Twilio-faithful session from WAV audio",
        description="Build a fixture from audio: any WAV the standard library reads, converted "
        "to 8 kHz mu-law in 20 ms frames, first timestamp not 0, numbers as strings, both "
        "tracks interleaved when --outbound is given. The header carries the expected outcome.",
    )
    synth.add_argument("--provider",
                       choices=[name for name in PROVIDERS if name != "auto"],
                       default="twilio",
                       help="whose frames to write (default twilio); acs: AudioMetadata, "
                       "AudioData in PCM16, DtmfData, no stop; telnyx: snake_case frames "
                       "with stream_id and the call control id (--call-sid, --stream-sid); "
                       "signalwire: Twilio's frames (PCMU), marked as SignalWire's; exotel: "
                       "raw PCM16 8 kHz in 100 ms messages, snake_case; plivo: camelCase, "
                       "--param as extra_headers, marks as playedStream, no stop; "
                       "vonage: websocket:connected with --param and call_uuid (--call-sid) "
                       "as the NCCO headers, binary PCM16 at --sample-rate, marks as "
                       "websocket:notify, no stop")
    synth.add_argument("--inbound", required=True, metavar="WAV", help="the caller's audio")
    synth.add_argument("--participant", action="append", default=[], metavar="ID=WAV",
                       help="acs: another participant's audio; makes the stream unmixed "
                       "(each participant a track; --inbound is 8:acs:caller)")
    synth.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000],
                       default=16000,
                       help="acs (16000 or 24000), vonage: the stream's rate (default 16000)")
    synth.add_argument("--client-state", metavar="TEXT",
                       help="telnyx: the client_state the start carries (sent base64)")
    synth.add_argument("--correlation-id", metavar="ID",
                       help="acs: the x-ms-call-correlation-id upgrade header "
                       "(default: random)")
    synth.add_argument("--outbound", metavar="WAV", help="the other party's audio "
                       "(makes a both_tracks stream)")
    synth.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a custom parameter (repeatable)")
    synth.add_argument("--no-custom-parameters", action="store_true",
                       help="leave the customParameters key out of start altogether")
    synth.add_argument("--dtmf", default="", metavar="D@Ts,...",
                       help="key presses and their times, e.g. 4@1.2s,5@2.0s")
    synth.add_argument("--mark", default="", metavar="NAME@Ts,...",
                       help="mark echoes and their times, e.g. greeting@0.8s")
    synth.add_argument("--drop", default="", metavar="I-J,...",
                       help="frame indexes never sent, e.g. 50-52,90")
    synth.add_argument("--swap", default="", metavar="I,...",
                       help="frame I is sent after frame I+1, e.g. 120")
    synth.add_argument("--call-sid", metavar="SID",
                       help="the call's CallSid, e.g. the one a voice webhook was given; "
                       "acs: the call connection id (default: random)")
    synth.add_argument("--stream-sid", metavar="SID",
                       help="the StreamSid; acs: the subscription id (default: random)")
    synth.add_argument("--account-sid", metavar="SID", help="the AccountSid (default: random)")
    synth.add_argument("--path", default="/stream", help="URL path recorded in the header")
    synth.add_argument("--description", default="", help="free text for the header")
    synth.add_argument("-o", "--output", required=True, metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Handlers named "myapp:Handler" import from the current directory, as they do under
    # `python -m streamsvc` (which puts it first on the path); the console script does not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv)
    if args.command == "fixture":
        try:
            return synth(args)
        except ValueError as exc:
            print(f"streamsvc fixture synth: {exc}", file=sys.stderr)
            return 2
    if args.command == "events":
        return _events(parser, args)
    if args.command == "twiml":
        try:
            return _twiml(args)
        except ValueError as exc:
            parser.error(str(exc))
    return _replay(args)


def _events(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.redis_url:
        parser.error("events needs --redis-url or STREAMSVC_REDIS_URL")
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


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        settings = load_settings(
            config_path=args.config, cli={s.key: getattr(args, s.key) for s in SETTINGS}
        )
        loop_factory = _loop_factory(settings.event_loop)
        if SHARED_METRICS_ENV in os.environ and settings.workers == 1:
            settings = dataclasses.replace(settings,
                                           shared_metrics_dir=os.environ[SHARED_METRICS_ENV])
        if settings.transport == "picows" and importlib.util.find_spec("picows") is None:
            raise ConfigError("transport", "picows is not installed "
                              "(pip install 'streamsvc[fast]')")
    except ConfigError as exc:
        print(f"streamsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    if settings.workers > 1:
        return _run_workers(settings.workers, argv)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run_server(settings))
    except OSError as exc:  # e.g. address in use
        structlog.get_logger("streamsvc").error("server.failed", error=str(exc))
        return 1
    finally:
        flush_logging()
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for or (``auto``) installed; None for asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop", "uvloop is not installed "
                              "(pip install 'streamsvc[fast]')") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_workers(workers: int, argv: list[str]) -> int:
    """Run ``workers`` copies of this server sharing the port through SO_REUSEPORT (the
    kernel spreads connections over them); forward SIGTERM and SIGINT. A worker that dies
    while the service runs is replaced, after a pause that doubles on each death (1 s to
    30 s); its metrics leave the sums at once. Exits 0 when every worker ended cleanly on a
    signal, else 1 (a worker died and could not be replaced, or ended badly)."""
    command = [sys.executable, "-m", "streamsvc", *argv, "--workers", "1", "--reuse-port"]
    share = tempfile.TemporaryDirectory(prefix="streamsvc-metrics-")
    env = {**os.environ, SHARED_METRICS_ENV: share.name}
    logger = structlog.get_logger("streamsvc")
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    logger.info("server.workers", pids=[child.pid for child in children])
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    failed = False
    deaths = 0
    with share:
        while not stopping and any(child.poll() is None for child in children):
            for index, child in enumerate(children):
                code = child.poll()
                if code is None or stopping:
                    continue
                Path(share.name, f"{child.pid}.json").unlink(missing_ok=True)
                deaths += 1
                pause = min(WORKER_RESTART_MAX_S, 2 ** (deaths - 1))
                logger.error("server.worker_died", pid=child.pid, exit_code=code,
                             restart_in_s=pause)
                if deaths > WORKER_RESTARTS:
                    failed = True
                    logger.error("server.worker_not_replaced", deaths=deaths)
                    forward(signal.SIGTERM, None)
                    break
                time.sleep(pause)
                if not stopping:
                    children[index] = subprocess.Popen(command, env=env)
                    logger.info("server.worker_restarted", pid=children[index].pid)
            time.sleep(WORKER_POLL_S)
        codes = [child.wait() for child in children]
    return 1 if failed or any(code != 0 for code in codes) else 0


async def _run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain: calls in progress go on for up to
    ``drain_timeout_s``; a second signal ends them at once."""
    drain, abort = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (abort if drain.is_set() else drain).set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    server = StreamServer(settings)
    await server.start()
    try:
        await drain.wait()
    finally:
        await server.drain(settings.drain_timeout_s, abort=abort)


def _replay(args: argparse.Namespace) -> int:
    problem = _replay_problem(args)
    if problem:
        print(f"streamsvc replay: {problem}", file=sys.stderr)
        return 2
    try:
        fixtures = [load_fixture(path) for path in args.fixtures]
    except FixtureError as exc:
        print(f"streamsvc replay: {exc}", file=sys.stderr)
        return 2
    try:
        headers = dict(split_pair(item, ":", "--header") for item in args.header)
        if args.acs_token:
            headers["Authorization"] = "Bearer " + acs_token(
                Path(args.acs_token).read_bytes(), args.acs_audience or "", kid=args.acs_kid)
    except (ValueError, OSError) as exc:
        print(f"streamsvc replay: {exc}", file=sys.stderr)
        return 2
    if args.webhook:
        report = asyncio.run(_replay_calls(fixtures, args))
    else:
        report = asyncio.run(replay(
            fixtures, args.url, speed=args.speed, concurrency=args.concurrency,
            auth_token=args.auth_token, public_url=args.public_url,
            check=args.check, server_log=args.log, headers=headers,
            acs_events_url=args.acs_events,
        ))
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        _print_summary(summary)
        if args.check and args.log is None:
            print("check: only the close was checked; --log FILE (the server's JSON log) "
                  "compares every count")
    return 1 if report.failed or report.mismatched else 0


async def _replay_calls(fixtures: list[Fixture], args: argparse.Namespace) -> ReplayReport:
    started = time.monotonic()
    sessions = []
    for fixture in fixtures:
        for _ in range(args.concurrency):
            try:
                legs = await replay_call(fixture, args.webhook, speed=args.speed,
                                         auth_token=args.auth_token,
                                         public_url=args.public_url, stream_url=args.url)
            except (OSError, ValueError, ElementTree.ParseError) as exc:
                failed = SessionResult(fixture.name, None)
                failed.error = f"voice webhook: {exc}"
                sessions.append(failed)
                continue
            sessions += [leg.result for leg in legs]
    return ReplayReport(sessions, time.monotonic() - started)


def _replay_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the replay command's arguments, in one line, or None."""
    if args.speed < 0 or args.concurrency < 1:
        return "--speed must be >= 0 and --concurrency >= 1"
    if args.webhook is not None:
        if urlsplit(args.webhook).scheme not in ("http", "https"):
            return f"--webhook must be http(s)://HOST[:PORT]/PATH, got {args.webhook!r}"
        if args.check:
            return "--check compares one session with its fixture: not with --webhook"
    elif args.url is None:
        return "give --url (the stream route) or --webhook (the voice webhook)"
    url = urlsplit(args.url or "ws://default.invalid/")
    if url.scheme not in ("ws", "wss") or not url.hostname:
        return f"--url must be ws://HOST[:PORT]/PATH or wss://..., got {args.url!r}"
    if args.log is not None and not args.check:
        return "--log is read by --check: give both"
    if args.acs_token and not args.acs_audience:
        return "--acs-token needs --acs-audience (the server's acs_audience)"
    if args.public_url and urlsplit(args.public_url).scheme not in ("ws", "wss",
                                                                   "http", "https"):
        return f"--public-url must be like wss://voice.example.com, got {args.public_url!r}"
    return None


def _print_summary(summary: dict[str, object]) -> None:
    lateness = summary["lateness_ms"]
    assert isinstance(lateness, dict)
    print(f"sessions: {summary['sessions']}  ok: {summary['ok']}  failed: {summary['failed']}")
    print(f"frames sent: {summary['frames_sent']}  received back: {summary['frames_received']}"
          f"  marks played: {summary['marks_played']}  cleared: {summary['marks_cleared']}")
    print(f"pacing lateness ms: p50 {lateness['p50']}  p99 {lateness['p99']}  "
          f"max {lateness['max']}")
    print(f"wall time: {summary['wall_s']} s")
    for error in summary["errors"]:  # type: ignore[attr-defined]
        print(f"error: {error}")
    check = summary["check"]
    if isinstance(check, dict):
        print(f"check: matched {check['matched']}  mismatched {check['mismatched']}")
        for difference in check["differences"]:
            print(f"mismatch: {difference}")


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
