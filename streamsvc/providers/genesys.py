"""Genesys Cloud AudioHook (protocol version 2) and Audio Connector: Genesys's session
protocol in, the common events of :mod:`streamsvc.wire` out; the protocol's answers, audio,
``barge_in`` and ``disconnect`` out. Sans-I/O.

Follows developer.genesys.cloud/devapps/audiohook (the protocol pages: session lifecycle,
messages, audio, security) and the Audio Connector pages, as Genesys's reference
implementation (purecloudlabs/audiohook-reference-implementation) reads them.

* Text messages are JSON: ``version``, ``id`` (the session), ``type``, ``seq`` (per sender,
  from 1), ``parameters``; Genesys's also carry ``serverseq`` (the last of ours it saw)
  and ``position`` (an ISO 8601 duration of the audio so far). Ours carry ``clientseq``.
  A ``seq`` that is not the next, a ``serverseq`` above ours, or a ``position`` that is
  neither the audio received nor that plus the audio Genesys said it discarded is counted
  (the summary's ``protocol``), never fatal: a field we do not use never fails a call.
* ``open`` is answered ``opened`` choosing one of the offered formats: both channels
  (stereo) where the route asks for them (``channels``: the default on routes that record
  or read both tracks), else the external channel alone, PCMU before L16; the session
  starts then. ``conversationId`` is the call id, the session ``id`` the stream id,
  ``organizationId`` the account; ``participant.ani``/``aniName``/``dnis``, ``language``,
  ``customConfig`` and (Audio Connector) ``inputVariables`` are the call's context, in
  that order (a later name wins), values that are not text as compact JSON.
* A probe (all-zero conversation and participant ids, sent when an integration is
  activated) is answered ``opened`` at once and never started (:attr:`is_probe`); its
  ``close`` is answered ``closed``.
* Binary messages are audio at 8 kHz, PCMU or L16 (little-endian), the channels
  interleaved in the order ``open`` listed them: ``external`` (the customer) is the
  ``inbound`` track, ``internal`` (the agent or the IVR) the ``outbound`` one. A message's
  length sets the frame length the session counts in (:attr:`frame_ms`); each message is
  the next frame of each of its tracks (Genesys's audio has no gaps a receiver can see).
* ``ping`` is answered ``pong``, ``update`` ``updated``, ``close`` ``closed`` (the close is
  the stop). ``paused``, ``resumed`` and ``discarded`` are counted (the audio Genesys left
  out is the summary's ``protocol.discarded_ms``, never taken for lost frames); ``error``
  is logged. Audio Connector's ``dtmf`` is a key press; its ``playback_completed`` resolves
  every mark sent so far (the audio queued before them has played: marks are ours, kept
  in order, never sent).

Out: audio as binary messages in the chosen format; ``clear`` as the ``barge_in`` event;
``pause``/``resume`` (:meth:`serialize_pause`); ending the call (or handing it off) as
``disconnect`` with reason ``completed`` and the hand-off's ``outputVariables``.

Authentication (:mod:`streamsvc.providers.genesys_auth`): the upgrade's RFC 9421 signature,
and its ``audiohook-organization-id`` header must name the ``open``'s organization
(:attr:`refusal` then: ``disconnect`` reason ``unauthorized``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import LocalProtocolError, RemoteProtocolError
from streamsvc.providers import snake

__all__ = [
    "ORGANIZATION_HEADER",
    "PROBE_ID",
    "GenesysCodec",
    "duration_ms",
    "format_duration",
    "is_probe_open",
]

VERSION: Final = "2"
RATE: Final = 8000
PROBE_ID: Final = "00000000-0000-0000-0000-000000000000"
ORGANIZATION_HEADER: Final = "audiohook-organization-id"
SESSION_HEADER: Final = "audiohook-session-id"
# Names taken into the call's context from one open (participant, language, customConfig
# and inputVariables together), and the characters of one value.
MAX_CONTEXT_NAMES: Final = 128
MAX_VALUE_CHARS: Final = 4096
# How far a position may be from the audio received before it is counted (one 20 ms frame
# of rounding either way, Genesys writes positions to the hundredth of a second).
POSITION_SLACK_MS: Final = 20
# Channels to tracks (documented in docs/providers/genesys.md).
TRACK_OF: Final = {"external": "inbound", "internal": "outbound"}
# What a route may ask for: "both" channels, or the "external" one alone.
CHANNEL_CHOICES: Final = ("both", "external")
_FORMATS: Final = ("PCMU", "L16")
_encoder: Final = msgspec.json.Encoder()
_DURATION: Final = re.compile(
    r"P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?")


def duration_ms(value: object) -> float | None:
    """Milliseconds of an ISO 8601 duration as Genesys writes them (``PT12.34S``,
    ``PT1M2.5S``), or None for anything else."""
    if not isinstance(value, str) or len(value) > 64 or value in ("P", "PT"):
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        return None
    days, hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    return (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000


def format_duration(milliseconds: float) -> str:
    """``milliseconds`` as Genesys writes a position: ``PT12.34S``."""
    return f"PT{milliseconds / 1000:.2f}S"


def is_probe_open(parameters: Mapping[str, Any]) -> bool:
    """An ``open`` of the probe Genesys makes when an integration is activated."""
    participant = parameters.get("participant")
    participant_id = participant.get("id") if isinstance(participant, dict) else None
    return parameters.get("conversationId") == PROBE_ID and participant_id in (PROBE_ID, None)




def _value(value: object) -> str:
    return snake.context_value(value, MAX_VALUE_CHARS)


def _context(parameters: Mapping[str, Any]) -> dict[str, str]:
    """The call's context from an ``open``'s parameters (see the module docstring)."""
    context: dict[str, str] = {}
    participant = parameters.get("participant")
    if isinstance(participant, dict):
        for name in ("ani", "aniName", "dnis"):
            if isinstance(participant.get(name), str):
                context[name] = participant[name][:MAX_VALUE_CHARS]
    if isinstance(parameters.get("language"), str):
        context["language"] = parameters["language"][:MAX_VALUE_CHARS]
    for key in ("customConfig", "inputVariables"):
        table = parameters.get(key)
        if isinstance(table, dict):
            for name, value in table.items():
                if len(context) >= MAX_CONTEXT_NAMES and name not in context:
                    break
                context[str(name)[:256]] = _value(value)
    return context


def _offered(media: object) -> list[dict[str, Any]]:
    """The offered formats this service can take: audio at 8 kHz, PCMU or L16, channels
    ``external`` and/or ``internal`` each at most once."""
    usable = []
    for entry in media if isinstance(media, list) else []:
        if not isinstance(entry, dict) or entry.get("type") != "audio":
            continue
        channels = entry.get("channels")
        if (entry.get("format") in _FORMATS and entry.get("rate") == RATE
                and isinstance(channels, list) and 1 <= len(channels) <= 2
                and all(c in TRACK_OF for c in channels) and len(set(channels)) == len(channels)):
            usable.append(entry)
    return usable


def choose_media(media: object, channels: str) -> dict[str, Any] | None:
    """The offered format to answer ``opened`` with: ``channels`` ``both`` prefers the two
    channels, ``external`` the external one alone (then the other), PCMU before L16;
    None when nothing offered can be taken."""
    usable = _offered(media)

    def rank(entry: dict[str, Any]) -> tuple[int, int]:
        stereo = len(entry["channels"]) == 2
        external = "external" in entry["channels"]
        fit = (0 if stereo else 1 if external else 2) if channels == "both" else (
            0 if not stereo and external else 1 if stereo else 2)
        return fit, _FORMATS.index(entry["format"])

    return min(usable, key=rank) if usable else None


class GenesysCodec(common.Codec):
    """One AudioHook or Audio Connector session (see the module docstring); ``headers``
    are the upgrade's (the organization header is checked against ``open``), ``channels``
    the route's choice (``both`` or ``external``)."""

    provider: Final = "genesys"
    sample_rates: Final = frozenset({RATE})
    tracks: Final[frozenset[str] | None] = frozenset({"inbound", "outbound"})
    max_tracks: Final = 2
    stops_on_close: Final = False  # `close` is the stop
    has_marks: Final = True  # resolved by playback_completed
    echoes_marks_on_clear: Final = False
    correlation_id: Final[str | None] = None

    def __init__(self, headers: Mapping[str, str] | None = None,
                 channels: str = "both") -> None:
        self.organization_header = (headers or {}).get(ORGANIZATION_HEADER)
        self.channels = channels if channels in CHANNEL_CHOICES else "both"
        self.session_id = ""
        self.seq = 0  # ours
        self.clientseq = 0  # the last of Genesys's seen
        self.media: dict[str, Any] | None = None  # the chosen format
        self._tracks: tuple[str, ...] = ()
        self._bytes_per_sample = 1
        self._frame_ms = common.FRAME_MS
        self._measured = False
        self.frames = 0  # audio messages received
        self.samples = 0  # per channel
        self._replies: list[bytes] = []
        self._marks: list[str] = []  # sent, awaiting playback_completed
        self.probe = False
        self._refusal: str | None = None
        self._finished = False
        self.paused = False
        # The report.
        self.pauses = 0
        self.discarded_ms = 0.0
        self.seq_errors = 0
        self.position_mismatches = 0
        self.errors = 0
        self.close_reason: str | None = None
        self.playbacks = 0

    # -- the contract's facts ---------------------------------------------------------

    @property
    def native_encoding(self) -> str:
        return "pcm16" if self.media is not None and self.media["format"] == "L16" else "mulaw"

    @property
    def frame_ms(self) -> int:
        return self._frame_ms

    @property
    def is_probe(self) -> bool:
        return self.probe

    @property
    def refusal(self) -> str | None:
        return self._refusal

    @property
    def finished(self) -> bool:
        return self._finished

    def replies(self) -> list[bytes]:
        replies, self._replies = self._replies, []
        return replies

    def report(self) -> dict[str, object] | None:
        return {
            "media": (f"{self.media['format']} {'+'.join(self.media['channels'])}"
                      if self.media else None),
            "audio_ms": round(self.samples * 1000 / RATE),
            "pauses": self.pauses,
            "discarded_ms": round(self.discarded_ms),
            "seq_errors": self.seq_errors,
            "position_mismatches": self.position_mismatches,
            "errors": self.errors,
            "playbacks_completed": self.playbacks,
            "close_reason": self.close_reason,
        }

    # -- inbound ----------------------------------------------------------------------

    def parse(self, frame: bytes | str) -> common.Event:
        """One text message as a common event; raises RemoteProtocolError."""
        message, kind = common.tagged_object(frame, "type")
        parameters = message.get("parameters")
        parameters = parameters if isinstance(parameters, dict) else {}
        self._sequence(message)
        if kind == "open":
            return self._open(message, parameters)
        if self.session_id and message.get("id") not in (self.session_id, None):
            raise RemoteProtocolError(f"a {kind[:20]} message for another session")
        self._position(message.get("position"))
        if kind == "ping":
            self._reply("pong", {})
            return common.Noted("ping")
        if kind == "close":
            reason = parameters.get("reason")
            self.close_reason = str(reason)[:40] if reason is not None else None
            self._reply("closed", {})
            if self.media is None:  # a probe (or a refused session) ends here
                self._finished = True
                return common.Noted("close", {"reason": self.close_reason}, log=self.probe)
            return common.Stop(self.session_id)
        if kind == "update":
            self._reply("updated", {})
            language = parameters.get("language")
            return common.Noted("update", {"language": _value(language)}, log=True)
        if kind == "paused":
            self.paused = True
            self.pauses += 1
            return common.Noted("paused", {}, log=True)
        if kind in ("resumed", "discarded"):
            self.paused = self.paused and kind != "resumed"
            discarded = duration_ms(parameters.get("discarded")) or 0.0
            self.discarded_ms += discarded
            return common.Noted(kind, {"start": _value(parameters.get("start")),
                                       "discarded_ms": round(discarded)}, log=True)
        if kind == "error":
            self.errors += 1
            return common.Noted("error", {
                "code": parameters.get("code") if isinstance(parameters.get("code"), int)
                else None, "message": _value(parameters.get("message"))[:500],
                "retry_after": _value(parameters.get("retryAfter"))}, log=True,
                level="warning")
        if kind == "dtmf":
            digit = parameters.get("digit")
            if not isinstance(digit, str | int) or isinstance(digit, bool):
                raise RemoteProtocolError("invalid dtmf: no `digit`")
            return snake.dtmf(snake.DigitBody(str(digit)), None)
        if kind == "playback_completed":
            self.playbacks += 1
            marks, self._marks = self._marks, []
            if not marks:
                return common.Noted(kind)
            return common.Batch(tuple(common.Mark(common._MarkBody(name)) for name in marks))
        if kind == "playback_started":
            return common.Noted(kind)
        return common.UnknownEvent(kind[:64])

    def _sequence(self, message: Mapping[str, Any]) -> None:
        seq, serverseq = message.get("seq"), message.get("serverseq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != self.clientseq + 1:
            self.seq_errors += 1
        if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq <= 2**53:
            self.clientseq = seq
        if isinstance(serverseq, int) and not isinstance(serverseq, bool) and serverseq > self.seq:
            self.seq_errors += 1

    def _position(self, value: object) -> None:
        position = duration_ms(value)
        if position is None or self.media is None:
            return
        received = self.samples * 1000 / RATE
        if (abs(position - received) > POSITION_SLACK_MS
                and abs(position - received - self.discarded_ms) > POSITION_SLACK_MS):
            self.position_mismatches += 1

    def _open(self, message: Mapping[str, Any], parameters: dict[str, Any]) -> common.Event:
        if self.session_id:
            raise RemoteProtocolError("open while a session is open")
        session_id = message.get("id")
        if not isinstance(session_id, str) or not session_id or len(session_id) > 128:
            raise RemoteProtocolError("invalid open: no session `id`")
        self.session_id = session_id
        organization = parameters.get("organizationId")
        if self.organization_header is not None and organization != self.organization_header:
            self._refusal = "organization_mismatch"
            self._reply("disconnect", {"reason": "unauthorized",
                                       "info": "organizationId does not match the "
                                               "audiohook-organization-id header"})
            raise RemoteProtocolError("open names another organization than the upgrade's "
                                      "audiohook-organization-id header")
        chosen = choose_media(parameters.get("media"), self.channels)
        if chosen is None:
            self._reply("disconnect", {"reason": "error",
                                       "info": "no offered media format is supported "
                                               "(audio, PCMU or L16, 8000 Hz)"})
            raise RemoteProtocolError("invalid open: no offered format is audio at 8000 Hz "
                                      "in PCMU or L16")
        opened: dict[str, object] = {"media": [chosen]}
        if parameters.get("supportedLanguages") is True:
            opened["supportedLanguages"] = []  # the service offers no languages of its own
        self._reply("opened", opened)
        if is_probe_open(parameters):
            self.probe = True
            return common.Noted("probe", {"organization_id": _value(organization)},
                                log=True)
        conversation = parameters.get("conversationId")
        if not isinstance(conversation, str) or not conversation:
            raise RemoteProtocolError("invalid open: no `conversationId`")
        self.media = chosen
        self._tracks = tuple(TRACK_OF[c] for c in chosen["channels"])
        self._bytes_per_sample = (2 if chosen["format"] == "L16" else 1) * len(self._tracks)
        l16 = chosen["format"] == "L16"
        return common.Start(common._StartBody(
            account_sid=organization if isinstance(organization, str) else None,
            stream_sid=session_id, call_sid=conversation[:128], tracks=self._tracks,
            media_format=common.MediaFormat("audio/l16" if l16 else "audio/x-mulaw", RATE, 1),
            custom_parameters=_context(parameters)), None, session_id)

    def parse_binary(self, frame: bytes | str) -> common.Event:
        """One audio message: the next frame of each of the chosen channels."""
        if self.media is None:
            raise RemoteProtocolError("audio before the session was opened")
        payload = frame if isinstance(frame, bytes) else frame.encode()
        size = len(payload)
        if not size or size % self._bytes_per_sample:
            raise RemoteProtocolError(f"invalid audio: a binary message of {size} bytes "
                                      f"(whole samples of {len(self._tracks)} channels)")
        samples = size // self._bytes_per_sample
        if not self._measured:  # before the session counts the tracks' frames
            self._measured = True
            self._frame_ms = max(1, round(samples * 1000 / RATE))
        timestamp = self.frames * self._frame_ms
        self.frames += 1
        self.samples += samples
        if len(self._tracks) == 1:
            return common.Media(self.session_id, common._MediaBody(
                self._tracks[0], self.frames, timestamp, payload))
        if self._bytes_per_sample == 2:  # PCMU, two channels: one byte each
            first, second = payload[0::2], payload[1::2]
        else:  # L16, two channels: two bytes each
            words = memoryview(payload).cast("H")
            first, second = words[0::2].tobytes(), words[1::2].tobytes()
        return common.Batch((
            common.Media(self.session_id, common._MediaBody(
                self._tracks[0], self.frames, timestamp, first)),
            common.Media(self.session_id, common._MediaBody(
                self._tracks[1], self.frames, timestamp, second))))

    # -- outbound ---------------------------------------------------------------------

    def _message(self, kind: str, parameters: Mapping[str, object]) -> bytes:
        self.seq += 1
        return _encoder.encode({"version": VERSION, "type": kind, "seq": self.seq,
                                "clientseq": self.clientseq, "id": self.session_id,
                                "parameters": parameters})

    def _reply(self, kind: str, parameters: Mapping[str, object]) -> None:
        self._replies.append(self._message(kind, parameters))

    def serialize_media(self, stream_sid: str, payload: bytes) -> bytes:
        return common.BinaryFrame(payload)

    def serialize_mark(self, stream_sid: str, name: str) -> bytes | None:
        self._marks.append(name)  # resolved by the next playback_completed
        return None

    def serialize_clear(self, stream_sid: str) -> bytes:
        self._marks.clear()  # resolved "cleared" as the clear is sent
        return self._message("event", {"entities": [{"type": "barge_in", "data": {}}]})

    def serialize_end(self, reason: str, variables: Mapping[str, str] | None) -> bytes | None:
        parameters: dict[str, object] = {"reason": "completed"}
        if variables:
            parameters["outputVariables"] = dict(variables)
        return self._message("disconnect", parameters)

    def serialize_pause(self, paused: bool) -> bytes:
        if self.media is None:
            raise LocalProtocolError("the session is not open")
        return self._message("pause" if paused else "resume", {})
