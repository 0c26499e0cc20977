"""``streamsvc fixture synth``: fixture sessions from WAV audio, in any provider's format,
with the expected outcome in the header (:mod:`streamsvc.replay.synth`).
Also the small parsers of the command line's ``NAME=VALUE``, ``D@Ts`` and ``I-J`` lists."""

from __future__ import annotations

import argparse
import secrets
import sys
import uuid
import wave
from pathlib import Path
from typing import Any

from streamsvc.providers import PROVIDERS
from streamsvc.replay.fixture import FixtureFrame, dump_fixture
from streamsvc.replay.signing import DEFAULT_ACS_KID, write_acs_keys
from streamsvc.replay.synth import SessionPlan, expected_outcome, read_wav, synthesize
from streamsvc.replay.synth.acs import AcsPlan, acs_header, synthesize_acs
from streamsvc.replay.synth.asterisk import asterisk_expected, synthesize_asterisk
from streamsvc.replay.synth.exotel import exotel_expected, synthesize_exotel
from streamsvc.replay.synth.genesys import (
    genesys_expected,
    genesys_headers,
    synthesize_genesys,
)
from streamsvc.replay.synth.jambonz import jambonz_expected, synthesize_jambonz
from streamsvc.replay.synth.plivo import plivo_expected, synthesize_plivo
from streamsvc.replay.synth.telnyx import synthesize_telnyx, telnyx_expected
from streamsvc.replay.synth.vonage import synthesize_vonage, vonage_expected

__all__ = ["add_parser", "run", "split_pair", "synth"]


def add_parser(commands: Any) -> None:
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
                       "websocket:notify, no stop; genesys: AudioHook's open (--param as "
                       "customConfig), binary PCMU with the external channel (both, "
                       "interleaved, with --outbound), a ping, dtmf, close; the upgrade's "
                       "audiohook-* headers; asterisk: MEDIA_START (JSON with --param as "
                       "channel variables, or plain text), binary ulaw or slin frames, one "
                       "before MEDIA_START, DTMF_END, no stop; jambonz: the listen verb's "
                       "first message (--param as customerData), binary 16-bit PCM at "
                       "--sample-rate (both legs with --outbound), dtmf, no stop")
    synth.add_argument("--inbound", required=True, metavar="WAV", help="the caller's audio")
    synth.add_argument("--participant", action="append", default=[], metavar="ID=WAV",
                       help="acs: another participant's audio; makes the stream unmixed "
                       "(each participant a track; --inbound is 8:acs:caller)")
    synth.add_argument("--sample-rate", type=int, choices=[8000, 16000, 24000, 48000],
                       default=16000,
                       help="acs (16000 or 24000), vonage, jambonz, asterisk with --asterisk-"
                       "format slin: the stream's rate (default 16000)")
    synth.add_argument("--asterisk-format", choices=["ulaw", "slin"], default="ulaw",
                       help="asterisk: the channel's format (default ulaw; slin at "
                       "--sample-rate)")
    synth.add_argument("--asterisk-control", choices=["json", "plain-text"], default="json",
                       help="asterisk: the control message format (default json, which "
                       "carries --param as channel variables)")
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


    keys = fixture_commands.add_parser(
        "acs-keys", help="write a local ACS signing key and its JWKS",
        description="Write a fresh RSA signing key and its JWKS (key id --kid) to DIR, so an "
        "ACS route can be tried locally with its token check on: serve with "
        "STREAMSVC_ACS_JWKS_URL=file://DIR/acs-jwks.json and STREAMSVC_ACS_AUDIENCE=ID, "
        "replay with --acs-token DIR/acs-signing-key.pem --acs-audience ID.")
    keys.add_argument("--dir", required=True, type=Path, metavar="DIR")
    keys.add_argument("--kid", default=DEFAULT_ACS_KID, help="the key id (default: "
                      f"{DEFAULT_ACS_KID}, what replay's --acs-kid defaults to)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if args.fixture_command == "acs-keys":
        try:
            key, jwks = write_acs_keys(args.dir, args.kid)
        except OSError as exc:
            print(f"streamsvc fixture acs-keys: {exc}", file=sys.stderr)
            return 2
        print(f"signing key: {key}\njwks: {jwks}\n"
              f"serve with STREAMSVC_ACS_JWKS_URL={jwks.resolve().as_uri()}")
        return 0
    try:
        return synth(args)
    except ValueError as exc:
        print(f"streamsvc fixture synth: {exc}", file=sys.stderr)
        return 2


def synth(args: argparse.Namespace) -> int:
    if args.provider == "acs":
        return _synth_acs(args)
    if args.provider == "vonage" and args.outbound:
        raise ValueError("--outbound: Vonage streams carry one mixed track")
    parameters = None if args.no_custom_parameters else dict(
        split_pair(item, "=", "--param") for item in args.param
    )
    telnyx = args.provider == "telnyx"
    vonage = args.provider == "vonage"
    uuids = telnyx or vonage or args.provider in ("genesys", "asterisk", "jambonz")
    rate = args.sample_rate if vonage or args.provider == "jambonz" or (
        args.provider == "asterisk" and args.asterisk_format == "slin") else 8000
    if args.provider == "asterisk" and args.outbound:
        raise ValueError("--outbound: Asterisk streams carry the channel's audio only")
    plan = SessionPlan(
        inbound=_read_wav(args.inbound, "--inbound", rate),
        outbound=_read_wav(args.outbound, "--outbound", rate) if args.outbound else None,
        custom_parameters=parameters,
        dtmf=_timed(args.dtmf, "--dtmf"),
        marks=_timed(args.mark, "--mark"),
        drop=frozenset(_indexes(args.drop, "--drop")),
        swap=frozenset(_indexes(args.swap, "--swap")),
        stream_sid=args.stream_sid or (str(uuid.uuid4()) if uuids
                                       else "MZ" + secrets.token_hex(16)),
        call_sid=args.call_sid or ("v3:" + secrets.token_urlsafe(24) if telnyx
                                   else str(uuid.uuid4()) if uuids
                                   else "CA" + secrets.token_hex(16)),
        account_sid=args.account_sid or (str(uuid.uuid4()) if args.provider == "genesys"
                                         else "AC" + secrets.token_hex(16)),
    )
    extra: dict[str, Any] = {}  # header fields of the provider's own
    if args.provider == "asterisk":
        rate = 0 if args.asterisk_format == "ulaw" else args.sample_rate
        control = args.asterisk_control == "json"
        expect = asterisk_expected(plan, sample_rate=rate, json_control=control)
        frames = synthesize_asterisk(plan, sample_rate=rate, json_control=control)
    elif args.provider == "jambonz":
        expect = jambonz_expected(plan, sample_rate=args.sample_rate)
        frames = synthesize_jambonz(plan, sample_rate=args.sample_rate)
    elif args.provider == "genesys":
        extra["headers"] = genesys_headers(plan)
        expect, frames = genesys_expected(plan), synthesize_genesys(plan)
    elif vonage:
        expect = vonage_expected(plan, sample_rate=args.sample_rate)
        frames = synthesize_vonage(plan, sample_rate=args.sample_rate)
    elif args.provider == "plivo":
        expect, frames = plivo_expected(plan), synthesize_plivo(plan)
    elif args.provider == "exotel":
        expect, frames = exotel_expected(plan), synthesize_exotel(plan)
    elif telnyx:
        expect = telnyx_expected(plan, client_state=args.client_state)
        frames = synthesize_telnyx(plan, client_state=args.client_state)
    else:  # Twilio's frames (SignalWire speaks them too)
        expect, frames = expected_outcome(plan), synthesize(plan)
    header: dict[str, Any] = {"description": args.description, "path": args.path}
    if args.provider != "twilio":  # on its own route, unless --path says otherwise
        header["provider"] = args.provider
        header["path"] = args.path if args.path != "/stream" else f"/{args.provider}"
    header.update(extra, expect=expect)
    _write_fixture(args.output, header, frames)
    print(f"{args.output}: {len(frames)} frames, {header['expect']['frames']} media frames")
    return 0


def _synth_acs(args: argparse.Namespace) -> int:
    if args.sample_rate not in (16000, 24000):
        raise ValueError("--sample-rate: ACS streams are 16000 or 24000 Hz")
    participants = {"8:acs:caller": _read_wav(args.inbound, "--inbound", args.sample_rate)}
    for item in args.participant:
        identity, wav = split_pair(item, "=", "--participant")
        participants[identity] = _read_wav(wav, "--participant", args.sample_rate)
    plan = AcsPlan(
        participants=participants, sample_rate=args.sample_rate,
        unmixed=len(participants) > 1, dtmf=_timed(args.dtmf, "--dtmf"),
        drop=frozenset(_indexes(args.drop, "--drop")),
        swap=frozenset(_indexes(args.swap, "--swap")),
        subscription_id=args.stream_sid or str(uuid.uuid4()),
        call_connection_id=args.call_sid or str(uuid.uuid4()),
        correlation_id=args.correlation_id or str(uuid.uuid4()))
    path = args.path if args.path != "/stream" else "/acs"
    header = acs_header(plan, path=path, description=args.description)
    frames = synthesize_acs(plan)
    _write_fixture(args.output, header, frames)
    print(f"{args.output}: {len(frames)} frames, {header['expect']['frames']} media frames")
    return 0


def _write_fixture(output: str, header: dict[str, Any], frames: list[FixtureFrame]) -> None:
    try:
        Path(output).write_text(dump_fixture(header, frames), encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot write {output}: {exc.strerror}") from None


def _read_wav(path: str, flag: str, rate: int = 8000) -> list[int]:
    try:
        return read_wav(path, rate)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{flag}: {path} is not a PCM WAV file ({exc})") from None


def split_pair(item: str, separator: str, flag: str) -> tuple[str, str]:
    name, found, value = item.partition(separator)
    if not found or not name:
        raise ValueError(f"{flag}: expected NAME{separator}VALUE, got {item!r}")
    return name, value


def _timed(spec: str, flag: str) -> list[tuple[str, float]]:
    """``4@1.2s,5@2.0s`` -> [("4", 1.2), ("5", 2.0)]."""
    timed = []
    for item in filter(None, spec.split(",")):
        name, at = split_pair(item.strip(), "@", flag)
        try:
            timed.append((name, float(at.removesuffix("s"))))
        except ValueError:
            raise ValueError(f"{flag}: bad time in {item!r}") from None
    return timed


def _indexes(spec: str, flag: str) -> set[int]:
    """``50-52,90`` -> {50, 51, 52, 90}."""
    indexes: set[int] = set()
    for item in filter(None, spec.split(",")):
        first, _, last = item.strip().partition("-")
        try:
            indexes.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"{flag}: expected I or I-J, got {item!r}") from None
    return indexes
