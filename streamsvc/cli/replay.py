"""``streamsvc replay``: play fixture sessions at a running server as their provider would,
or whole calls through the voice webhook; ``--check`` compares each outcome with the
fixture's ``expect``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

from streamsvc.cli.fixture import split_pair
from streamsvc.replay import ReplayReport, SessionResult, Signing, replay
from streamsvc.replay.call import replay_call
from streamsvc.replay.fixture import Fixture, FixtureError, load_fixture

__all__ = ["add_parser", "run"]


# Each provider's stream credential, from the same environment the server reads.
_CREDENTIAL_FLAGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("--signalwire-token", ("STREAMSVC_SIGNALWIRE_TOKEN",),
     "SignalWire fixtures: Authorization: Bearer with this token"),
    ("--telnyx-token", ("STREAMSVC_TELNYX_STREAM_TOKEN",),
     "Telnyx fixtures: x-telnyx-streaming-auth-token"),
    ("--exotel-basic-auth", ("STREAMSVC_EXOTEL_BASIC_AUTH",),
     "Exotel fixtures: Authorization: Basic with KEY:TOKEN"),
    ("--plivo-auth-token", ("STREAMSVC_PLIVO_AUTH_TOKEN", "PLIVO_AUTH_TOKEN"),
     "Plivo fixtures: X-Plivo-Signature-V3 over --public-url (or --url) with a fresh nonce"),
    ("--vonage-token", ("STREAMSVC_VONAGE_TOKEN",),
     "Vonage fixtures: the custom Authorization value"),
    ("--vonage-signature-secret", ("STREAMSVC_VONAGE_SIGNATURE_SECRET",
                                   "VONAGE_SIGNATURE_SECRET"),
     "Vonage fixtures: a fresh HS256 JWT signed with it (preferred over --vonage-token)"),
    ("--vonage-application-id", ("STREAMSVC_VONAGE_APPLICATION_ID", "VONAGE_APPLICATION_ID"),
     "Vonage fixtures: the application_id the JWT carries (the server's "
     "vonage_application_id)"),
    ("--genesys-api-key", ("STREAMSVC_GENESYS_API_KEY",),
     "Genesys fixtures: the integration's API key (X-API-KEY and the signature's keyid)"),
    ("--genesys-client-secret", ("STREAMSVC_GENESYS_CLIENT_SECRET",),
     "Genesys fixtures: the client secret (base64) the RFC 9421 signature is made with"),
    ("--asterisk-basic-auth", ("STREAMSVC_ASTERISK_BASIC_AUTH",),
     "Asterisk fixtures: Authorization: Basic with USER:PASSWORD"),
    ("--jambonz-basic-auth", ("STREAMSVC_JAMBONZ_BASIC_AUTH",),
     "jambonz fixtures: Authorization: Basic with USER:PASSWORD"),
)


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def add_parser(commands: Any) -> None:
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
                      "call (a drain in a fleet) or hands it to a person (the summary's "
                      "hand-offs: target and what it carried); each stream is one session "
                      "of the summary")
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
    for flag, env, what in _CREDENTIAL_FLAGS:
        play.add_argument(flag, default=_env(env), metavar=flag.rsplit("-", 1)[-1].upper(),
                          help=f"{what} (env {' or '.join(env)})")
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



def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
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
        signing = Signing(
            public_url=args.public_url, auth_token=args.auth_token,
            signalwire_token=args.signalwire_token, telnyx_stream_token=args.telnyx_token,
            exotel_basic_auth=args.exotel_basic_auth, plivo_auth_token=args.plivo_auth_token,
            vonage_token=args.vonage_token,
            vonage_signature_secret=args.vonage_signature_secret,
            vonage_application_id=args.vonage_application_id,
            genesys_api_key=args.genesys_api_key,
            genesys_client_secret=args.genesys_client_secret,
            asterisk_basic_auth=args.asterisk_basic_auth,
            jambonz_basic_auth=args.jambonz_basic_auth,
            acs_key_pem=Path(args.acs_token).read_bytes() if args.acs_token else None,
            acs_audience=args.acs_audience, acs_kid=args.acs_kid)
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
            acs_events_url=args.acs_events, signing=signing,
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
    for hand_off in summary["hand_offs"]:  # type: ignore[attr-defined]
        names = ", ".join(hand_off["parameters"])
        print(f"hand-off: {hand_off['call_sid']} -> {hand_off['target']} ({names})")
    check = summary["check"]
    if isinstance(check, dict):
        print(f"check: matched {check['matched']}  mismatched {check['mismatched']}")
        for difference in check["differences"]:
            print(f"mismatch: {difference}")
