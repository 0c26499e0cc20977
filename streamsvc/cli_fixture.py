"""``streamsvc fixture synth``: fixture sessions from WAV audio, in any provider's format, with
the expected outcome in the header (:mod:`streamsvc.synth`, :mod:`streamsvc.synth_acs`).
Also the small parsers of the command line's ``NAME=VALUE``, ``D@Ts`` and ``I-J`` lists."""

from __future__ import annotations

import argparse
import secrets
import uuid
import wave
from pathlib import Path
from typing import Any

from .fixtures import FixtureFrame, dump_fixture
from .synth import SessionPlan, expected_outcome, read_wav, synthesize
from .synth_acs import AcsPlan, acs_header, synthesize_acs
from .synth_exotel import exotel_expected, synthesize_exotel
from .synth_plivo import plivo_expected, synthesize_plivo
from .synth_telnyx import synthesize_telnyx, telnyx_expected
from .synth_vonage import synthesize_vonage, vonage_expected

__all__ = ["split_pair", "synth"]


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
    plan = SessionPlan(
        inbound=_read_wav(args.inbound, "--inbound", args.sample_rate if vonage else 8000),
        outbound=_read_wav(args.outbound, "--outbound") if args.outbound else None,
        custom_parameters=parameters,
        dtmf=_timed(args.dtmf, "--dtmf"),
        marks=_timed(args.mark, "--mark"),
        drop=frozenset(_indexes(args.drop, "--drop")),
        swap=frozenset(_indexes(args.swap, "--swap")),
        stream_sid=args.stream_sid or (str(uuid.uuid4()) if telnyx or vonage
                                       else "MZ" + secrets.token_hex(16)),
        call_sid=args.call_sid or ("v3:" + secrets.token_urlsafe(24) if telnyx
                                   else str(uuid.uuid4()) if vonage
                                   else "CA" + secrets.token_hex(16)),
        account_sid=args.account_sid or "AC" + secrets.token_hex(16),
    )
    if vonage:
        path = args.path if args.path != "/stream" else "/vonage"
        header = {"description": args.description, "path": path, "provider": "vonage",
                  "expect": vonage_expected(plan, sample_rate=args.sample_rate)}
        frames = synthesize_vonage(plan, sample_rate=args.sample_rate)
    elif args.provider == "plivo":
        path = args.path if args.path != "/stream" else "/plivo"
        header = {"description": args.description, "path": path, "provider": "plivo",
                  "expect": plivo_expected(plan)}
        frames = synthesize_plivo(plan)
    elif args.provider == "exotel":
        path = args.path if args.path != "/stream" else "/exotel"
        header = {"description": args.description, "path": path, "provider": "exotel",
                  "expect": exotel_expected(plan)}
        frames = synthesize_exotel(plan)
    elif telnyx:
        path = args.path if args.path != "/stream" else "/telnyx"
        header = {"description": args.description, "path": path, "provider": "telnyx",
                  "expect": telnyx_expected(plan, client_state=args.client_state)}
        frames = synthesize_telnyx(plan, client_state=args.client_state)
    else:
        header = {"description": args.description, "path": args.path,
                  "expect": expected_outcome(plan)}
        if args.provider == "signalwire":  # Twilio's frames, from SignalWire
            header["provider"] = "signalwire"
            header["path"] = args.path if args.path != "/stream" else "/signalwire"
        frames = synthesize(plan)
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
