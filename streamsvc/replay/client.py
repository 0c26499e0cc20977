"""The replay client: plays fixture sessions at a server the way Twilio would.

Each copy of a fixture is one WebSocket; frames go out at their recorded time (scaled by
``speed``; 0 sends as fast as possible) exactly as recorded. With ``concurrency`` > 1 every
copy gets its own streamSid and callSid (same length, so frame layouts stay identical).

What the server sends back is answered like Twilio does (Twilio's Media Streams pages): outbound
``media`` is queued for playback at 8000 bytes of mu-law per second, a ``mark`` is echoed
when playback reaches it, and a ``clear`` drops the queued audio and echoes every pending
mark at once. Other providers' sessions are answered in their own shapes (Plivo's
``playedStream``; Vonage's binary audio played at its rate, ``websocket:notify``, and
``websocket:cleared`` for a clear, its pending notifies dropped; Genesys's whole session
protocol, :class:`_GenesysPeer`). With an auth token the handshake carries
``X-Twilio-Signature``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from streamsvc.audio import SAMPLE_BYTES
from streamsvc.exceptions import CLOSE_POLICY_VIOLATION, HANDED_OFF_REASON
from streamsvc.providers import provider
from streamsvc.providers.jambonz import SUBPROTOCOL as JAMBONZ_SUBPROTOCOL
from streamsvc.replay.check import (
    Outcome,
    differences,
    expect_for_copy,
    log_size,
    wait_for_outcomes,
)
from streamsvc.replay.fixture import Fixture, json_object
from streamsvc.replay.signing import SIGNERS, Signing, acs_token, upgrade_headers

__all__ = ["PeerConnection", "ReplayReport", "SessionResult", "acs_token", "play_as_platform",
           "replay", "replay_session"]

# Twilio's own frames are small; be generous with what the server may send back.
CLIENT_MAX_MESSAGE_BYTES = 1 << 20
# Outbound audio is 8 kHz mu-law: one byte per sample.
PLAYBACK_BYTES_PER_SECOND = 8000
# Plivo's and Vonage's outbound commands, as the common ones.
_PLIVO_OUT = {"playAudio": "media", "checkpoint": "mark", "clearAudio": "clear"}
_VONAGE_OUT = {"notify": "mark", "clear": "clear"}


@dataclass(slots=True)
class SessionResult:
    """What one replayed session did."""

    fixture: str
    stream_sid: str | None
    call_sid: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)  # the header's, with this copy's ids
    provider: str = "twilio"
    ok: bool = False
    error: str | None = None
    frames_sent: int = 0
    frames_received: int = 0
    close_code: int | None = None
    close_reason: str | None = None  # what the server said when it closed the stream
    # When the call was handed to a person and this replay followed it (--webhook): the
    # hand-off's target and what it carried (parameters, or X- headers), from the TwiML.
    hand_off: dict[str, Any] | None = None
    lateness_ms: list[float] = field(default_factory=list)
    audio_bytes_received: int = 0
    marks_played: list[str] = field(default_factory=list)
    marks_cleared: list[str] = field(default_factory=list)
    clears_received: int = 0
    # With --check: how the outcome differs from the fixture's expect (empty: it matched).
    differences: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ReplayReport:
    """All sessions of one replay run, with the summary the CLI prints."""

    sessions: list[SessionResult]
    wall_s: float
    checked: bool = False

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.sessions)

    @property
    def mismatched(self) -> int:
        """Sessions whose outcome differs from their fixture's expect (with --check)."""
        return sum(bool(s.differences) for s in self.sessions)

    def summary(self) -> dict[str, Any]:
        lateness = sorted(x for s in self.sessions for x in s.lateness_ms)
        return {
            "sessions": len(self.sessions),
            "ok": len(self.sessions) - self.failed,
            "failed": self.failed,
            "frames_sent": sum(s.frames_sent for s in self.sessions),
            "frames_received": sum(s.frames_received for s in self.sessions),
            "audio_bytes_received": sum(s.audio_bytes_received for s in self.sessions),
            "marks_played": sum(len(s.marks_played) for s in self.sessions),
            "marks_cleared": sum(len(s.marks_cleared) for s in self.sessions),
            "lateness_ms": {
                "p50": _percentile(lateness, 0.50),
                "p99": _percentile(lateness, 0.99),
                "max": round(lateness[-1], 3) if lateness else 0.0,
            },
            "wall_s": round(self.wall_s, 3),
            "errors": sorted({s.error for s in self.sessions if s.error}),
            "hand_offs": [{"fixture": s.fixture, "call_sid": s.call_sid, **s.hand_off}
                          for s in self.sessions if s.hand_off is not None],
            "check": {
                "matched": len(self.sessions) - self.mismatched,
                "mismatched": self.mismatched,
                "differences": [f"{s.fixture} ({s.stream_sid}): {difference}"
                                for s in self.sessions for difference in s.differences],
            } if self.checked else None,
        }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 3)


def _copy_ids(fixture: Fixture, copy: int) -> list[tuple[str, str]]:
    """Replacements giving copy ``copy`` its own ids (the last 8 characters of each id
    replaced by a hash of the id and the copy number, so lengths stay the same); copy 0
    keeps the recorded ones."""
    if copy == 0:
        return []
    pairs = []
    for sid in (fixture.stream_sid(), fixture.call_sid()):
        if sid and len(sid) > 8:
            suffix = hashlib.sha256(f"{sid}/{copy}".encode()).hexdigest()[:8]
            pairs.append((sid, sid[:-8] + suffix))
    return pairs


def signature_headers(url: str, auth_token: str | None,
                      public_url: str | None = None) -> dict[str, str]:
    """The ``X-Twilio-Signature`` header Twilio would send when connecting to ``url``: it
    signs the stream URL Twilio was given, ``public_url`` (its ``wss``/``ws`` form, path
    prefix included) plus ``url``'s path, if one is given, else ``url`` itself. Empty
    without a token. (Every provider's: :func:`streamsvc.replay.signing.upgrade_headers`.)"""
    return upgrade_headers("twilio", url, Signing(public_url=public_url, auth_token=auth_token))


async def replay_session(
    fixture: Fixture, url: str, *, speed: float = 1.0, copy: int = 0,
    headers: dict[str, str] | None = None, acs_events_url: str | None = None,
    signing: Signing | None = None,
) -> SessionResult:
    """Play one copy of ``fixture`` at ``url`` and return what happened. Never raises for
    a failing server: the result says ``ok=False`` with the error. ``headers`` are added to
    the handshake (see :func:`signature_headers`); ``signing``: the upgrade is signed as
    the fixture's provider signs it, over this copy's headers. With ``acs_events_url``, an
    ACS fixture's ``incoming_call`` event is delivered there first, as Event Grid would."""
    replacements = _copy_ids(fixture, copy)
    stream_sid, call_sid = fixture.stream_sid(), fixture.call_sid()
    for old, new in replacements:
        stream_sid = new if stream_sid == old else stream_sid
        call_sid = new if call_sid == old else call_sid
    result = SessionResult(fixture.name, stream_sid, call_sid,
                           expect_for_copy(fixture.expect, replacements), fixture.provider)
    upgrade = {**_replaced(fixture.headers, replacements), **(headers or {})}
    if signing is not None:
        upgrade.update(upgrade_headers(fixture.provider, url, signing, upgrade))
    incoming_call = fixture.header.get("incoming_call")
    if acs_events_url and isinstance(incoming_call, dict):
        try:
            await asyncio.to_thread(_deliver, acs_events_url, [incoming_call])
        except (OSError, ValueError) as exc:
            result.error = f"cannot deliver the fixture's IncomingCall event: {exc}"
            return result
    offered = provider(fixture.provider).subprotocol([JAMBONZ_SUBPROTOCOL])
    try:
        async with connect(
            url, compression=None, max_size=CLIENT_MAX_MESSAGE_BYTES,
            additional_headers=upgrade, open_timeout=10,
            subprotocols=[Subprotocol(offered)] if offered else None,
        ) as connection:
            await play_as_platform(connection, fixture, result, speed=speed,
                                   replacements=replacements)
            result.close_code = connection.close_code
            result.close_reason = connection.close_reason
            result.ok = connection.close_code in (1000, None)
            if not result.ok:
                result.error = (f"server closed with {connection.close_code}"
                                + _no_start(connection.close_code, connection.close_reason,
                                            fixture.provider))
            elif fixture.opening() is None:  # read as the service's own codec reads it
                result.ok = False
                result.error = "no start message the service accepts: no session began"
    except InvalidStatus as exc:
        result.error = _rejected(exc.response.status_code, url, upgrade, fixture.provider)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        result.error = f"cannot connect: {exc}"
    except ConnectionClosed as exc:
        result.close_code = exc.rcvd.code if exc.rcvd else None
        result.close_reason = exc.rcvd.reason if exc.rcvd else None
        if result.close_code == 1000 and result.close_reason == HANDED_OFF_REASON:
            result.ok = True  # the service handed the call to a person: it ended as it should
            return result
        result.error = (f"server closed the stream early ({result.close_code})"
                        + _no_start(result.close_code, exc.rcvd.reason if exc.rcvd else None,
                                    fixture.provider))
    return result


class PeerConnection(Protocol):
    """What the platform's side of a replay uses of a WebSocket connection (websockets'
    client connection, or :mod:`streamsvc.testing`'s in-memory one)."""

    async def send(self, message: str | bytes) -> None: ...

    async def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...


async def play_as_platform(connection: PeerConnection, fixture: Fixture,
                           result: SessionResult, *, speed: float = 1.0,
                           replacements: list[tuple[str, str]] | None = None) -> None:
    """Play ``fixture`` over ``connection`` as its provider would: its frames at their
    times (``speed``), what the service sends answered by the provider's peer (marks,
    playback, its session protocol), then the close; counts go into ``result``."""
    kind = provider(fixture.provider).peer
    peer = _PEERS.get(kind, _Peer)(connection, result, result.stream_sid, kind,
                                   _playback_rate(fixture))
    reader = asyncio.create_task(peer.read())
    try:
        await _send_frames(connection, fixture, speed, replacements or [], result, peer)
        await peer.finished()
        await connection.close()
    finally:
        await reader
        peer.stop()


def _playback_rate(fixture: Fixture) -> int:
    """Bytes of outbound audio the provider plays per second: the stream's rate times the
    bytes a sample of its encoding takes (8 kHz mu-law on Twilio: 8,000; Exotel's 8 kHz
    PCM16: 16,000; Vonage's 16 kHz L16: 32,000), as the service's own codec reads the
    fixture's opening message."""
    opening = fixture.opening()
    if opening is None:
        return PLAYBACK_BYTES_PER_SECOND
    codec, start = opening
    return start.media_format.sample_rate * SAMPLE_BYTES.get(codec.native_encoding, 2)


def _deliver(url: str, events: list[object]) -> None:
    """POST Event Grid events (a JSON array) to ``url``; raises OSError on a refusal."""
    request = urllib.request.Request(url, data=json.dumps(events).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "aeg-event-type": "Notification"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _replaced(headers: dict[str, str], replacements: list[tuple[str, str]]) -> dict[str, str]:
    for old, new in replacements:
        headers = {name: new if value == old else value for name, value in headers.items()}
    return headers


def _no_start(code: int | None, reason: str | None, provider: str) -> str:
    """When the server closed because it could read no start: its reason, and the likely
    cause (a route of another provider); else nothing."""
    if code != CLOSE_POLICY_VIOLATION or not (reason or "").startswith("no start message"):
        return ""
    return f': {reason} (a {provider} session: is --url a route with provider = "{provider}"?)'



def _rejected(status: int, url: str, headers: dict[str, str], provider: str) -> str:
    """Why a handshake was refused, with what to do about a refused credential: the
    replay flags of the fixture's provider."""
    error = f"handshake rejected: HTTP {status}"
    if status != 403:
        return error
    signer = SIGNERS.get(provider)
    if signer is None:
        return f"{error}: the route checks a credential {provider} streams do not carry"
    if not signer.headers & {name.lower() for name in headers}:
        return (f"{error}: the route checks a credential this {provider} session did not "
                f"carry; give {signer.needs} (and check that --url is a route with "
                f'provider = "{provider}" or "auto")')
    if provider == "twilio":
        return (f"{error}: the signature did not match; it was computed over the URL "
                f"{url!r} unless --public-url names the origin the server's public_url has")
    return (f"{error}: the route refused the {provider} credential given; check "
            f"{signer.needs}")


async def _send_frames(
    connection: PeerConnection, fixture: Fixture, speed: float,
    replacements: list[tuple[str, str]], result: SessionResult, peer: _Peer,
) -> None:
    started = _now()
    for frame in fixture.frames:
        data: str | bytes | None
        if frame.binary is not None:
            data = frame.binary  # sent as a binary frame (Vonage's audio)
        else:
            data = frame.text
            for old, new in replacements:
                data = data.replace(old, new)
        if speed > 0:
            due = started + frame.at_ms / 1000 / speed
            delay = due - _now()
            if delay > 0:
                await asyncio.sleep(delay)
            result.lateness_ms.append(max(0.0, (_now() - due) * 1000))
        await peer.before(data)
        data = await peer.outgoing(data)
        if data is None:  # the peer's protocol says not to (paused; the session ended)
            if peer.done_sending:
                break
            continue
        await connection.send(data)
        result.frames_sent += 1


def _now() -> float:
    """The running loop's clock: the peer and the pacing follow it (a virtual clock in
    :mod:`streamsvc.testing`; the monotonic clock otherwise)."""
    return asyncio.get_running_loop().time()


class _Peer:
    """Answers what the server sends, as the provider does: plays outbound audio in real
    time, answers marks when playback reaches them in the provider's own shape (``peer``,
    the provider registry row's), flushes on ``clear``."""

    def __init__(self, connection: PeerConnection, result: SessionResult,
                 stream_sid: str | None, peer: str = "mark",
                 bytes_per_second: int = PLAYBACK_BYTES_PER_SECOND) -> None:
        self.connection = connection
        self.peer = peer
        self.bytes_per_second = bytes_per_second  # of outbound audio played
        self.result = result
        self.stream_sid = stream_sid
        self.playback_ends = 0.0  # monotonic time the queued audio finishes playing
        self.pending: collections.deque[tuple[float, str]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.sequence_number = 1_000_000  # apart from the fixture's own numbers
        self.outbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.player = asyncio.create_task(self._play())
        self.sender = asyncio.create_task(self._send())

    async def read(self) -> None:
        try:
            async for message in self.connection:
                self.result.frames_received += 1
                self._answer(message)
        except ConnectionClosed:
            pass

    def stop(self) -> None:
        self.player.cancel()
        self.sender.cancel()

    # The hooks of a provider with a session protocol of its own (_GenesysPeer).
    done_sending = False

    async def outgoing(self, data: str | bytes) -> str | bytes | None:
        """A fixture frame as it goes out now, or None: not sent by the caller (left out,
        or sent by the peer itself; nothing once the platform ended the call)."""
        return None if self.done_sending else data

    def _dropped_by_platform(self, now: float) -> None:
        """The platform flushed what it was to play: its pending marks never come back."""
        self.result.clears_received += 1
        self.playback_ends = now
        while self.pending:
            self.result.marks_cleared.append(self.pending.popleft()[1])

    def _platform_hangs_up(self) -> None:
        """The platform ends the call: nothing more is sent, and it closes the socket."""
        self.done_sending = True
        self.outbox.put_nowait(None)

    async def before(self, data: str | bytes) -> None:
        """Wait, if the provider would, before sending ``data``."""

    async def finished(self) -> None:
        """Every fixture frame is sent: what the provider does before it closes."""

    def _answer(self, message: str | bytes) -> None:
        now = _now()
        if isinstance(message, bytes):  # audio in binary frames (Vonage's)
            self._queue_audio(len(message), now)
            return
        event = json_object(message)
        if event is None:
            return
        kind = event.get("event") or {"AudioData": "media", "StopAudio": "clear"}.get(
            str(event.get("Kind")))  # ACS's outbound frames
        kind = _PLIVO_OUT.get(str(kind), kind)
        kind = _VONAGE_OUT.get(str(event.get("action")), kind)
        if kind == "media":
            body = event.get("media") or event.get("AudioData") or {}
            payload = str(body.get("payload") or body.get("Data") or "")
            self._queue_audio(len(payload) * 3 // 4 - payload.count("="), now)
        elif kind == "mark":
            # Plivo: a top-level name; Vonage: the notify's payload carries it.
            body = event.get("mark") or event.get("payload") or event
            name = str(body.get("name", "")) if isinstance(body, dict) else ""
            self.pending.append((max(self.playback_ends, now), name))
            self.wakeup.set()
        elif kind == "clear":
            self.result.clears_received += 1
            self.playback_ends = now
            while self.pending:
                name = self.pending.popleft()[1]
                self.result.marks_cleared.append(name)
                if self.peer != "notify":  # Vonage confirms the clear instead
                    self._echo(name)
            if self.peer == "notify":
                self.outbox.put_nowait(json.dumps({"event": "websocket:cleared"}))

    def _queue_audio(self, size: int, now: float) -> None:
        self.result.audio_bytes_received += size
        self.playback_ends = max(self.playback_ends, now) + size / self.bytes_per_second

    async def _play(self) -> None:
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            due, name = self.pending[0]
            delay = due - _now()
            if delay > 1e-6:  # (a microsecond early is on time: clocks are floats)
                self.wakeup.clear()
                # A clear or a new mark may change what is due first.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), delay)
                continue
            self.pending.popleft()
            self.result.marks_played.append(name)
            self._echo(name)

    def _echo(self, name: str) -> None:
        self.sequence_number += 1
        if self.peer == "checkpoint":  # a checkpoint reached
            echo = json.dumps({"event": "playedStream", "streamId": self.stream_sid,
                               "name": name})
        elif self.peer == "notify":  # the audio queued before the notify has played
            echo = json.dumps({"event": "websocket:notify", "payload": {"name": name}})
        elif self.peer.startswith("mark:"):  # snake_case, the stream's id under its key
            echo = json.dumps({"event": "mark", "sequence_number": str(self.sequence_number),
                               self.peer[5:]: self.stream_sid, "mark": {"name": name}})
        else:
            echo = json.dumps({"event": "mark", "sequenceNumber": str(self.sequence_number),
                               "streamSid": self.stream_sid, "mark": {"name": name}})
        self.outbox.put_nowait(echo)

    async def _send(self) -> None:
        # One sender keeps the echoes in order; a closed socket just ends it.
        with contextlib.suppress(ConnectionClosed):
            while True:
                item = await self.outbox.get()
                try:
                    if item is None:  # the platform ends the call: it closes the socket
                        await self.connection.close()
                        return
                    await self.connection.send(item)
                finally:
                    self.outbox.task_done()


class _GenesysPeer(_Peer):
    """Genesys's side of an AudioHook / Audio Connector session: audio only once
    ``opened`` came, every message renumbered (``seq``, ``serverseq``, ``position``),
    ``pause`` answered ``paused`` (audio left out and counted until ``resume``, answered
    ``resumed`` with the discarded duration), ``disconnect`` answered ``close`` (nothing
    more of the fixture is sent), the audio sent back played in real time with
    ``playback_started`` and ``playback_completed`` (each completion is a ``marks_played``
    entry), ``barge_in`` taken as a clear, and ``closed`` awaited before the socket ends."""

    # How long Genesys waits for opened, for what it plays to finish before the fixture's
    # close, and for the closed that answers it.
    OPEN_TIMEOUT_S = 5.0
    PLAYBACK_WAIT_S = 5.0
    CLOSE_TIMEOUT_S = 5.0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.seq = 0
        self.serverseq = 0
        self.channels = 1
        self.samples = 0  # per channel, sent
        self.paused_at: float | None = None  # position (ms) of a pause
        self.discarded_samples = 0
        self.playing = False
        self.completion: asyncio.TimerHandle | None = None
        self.close_sent = False
        self.opening = False  # the open went out: wait for opened before what follows
        self.played = asyncio.Event()  # set while nothing plays
        self.played.set()

    def _position(self) -> str:
        return f"PT{self.samples / 8000:.2f}S"

    def _message(self, kind: str, parameters: dict[str, Any]) -> str:
        self.seq += 1
        return json.dumps({"version": "2", "id": self.stream_sid, "type": kind,
                           "seq": self.seq, "serverseq": self.serverseq,
                           "position": self._position(), "parameters": parameters})

    async def outgoing(self, data: str | bytes) -> str | bytes | None:
        # Everything goes through the one sender, after what the peer answered itself:
        # the sequence numbers and positions stay in the order they are written.
        if self.opening:  # audio only once the session is opened
            self.opening = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.opened.wait(), self.OPEN_TIMEOUT_S)
            if not self.opened.is_set():
                self.close_sent = True
        if self.close_sent:
            self.done_sending = True
            return None
        self._enqueue(data)
        return None

    def _enqueue(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            if self.paused_at is not None:
                self.discarded_samples += len(data) // self.channels
                return
            self.samples += len(data) // self.channels
            self._out(data)
            return
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if not isinstance(message, dict) or "type" not in message:
            self._out(data)  # a garbage-in fixture: sent as it is
            return
        self.opening = message["type"] == "open"
        if message["type"] == "close":
            self.close_sent = True
        message.update(seq=self.seq + 1, serverseq=self.serverseq, position=self._position())
        self.seq += 1
        self._out(json.dumps(message))

    def _out(self, data: str | bytes) -> None:
        self.outbox.put_nowait(data)
        self.result.frames_sent += 1

    async def before(self, data: str | bytes) -> None:
        """Before the fixture's close: what Genesys plays is let finish (bounded)."""
        if isinstance(data, str) and '"close"' in data and self.playing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.played.wait(), self.PLAYBACK_WAIT_S)

    async def finished(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.CLOSE_TIMEOUT_S):
                await self.outbox.join()
                if self.close_sent:
                    await self.closed.wait()

    def _answer(self, message: str | bytes) -> None:
        now = _now()
        if isinstance(message, bytes):
            self._queue_audio(len(message), now)
            if not self.playing:
                self.playing = True
                self.played.clear()
                self.outbox.put_nowait(self._message("playback_started", {}))
            if self.completion is not None:
                self.completion.cancel()
            self.completion = asyncio.get_running_loop().call_later(
                self.playback_ends - now, self._completed)
            return
        event = json_object(message)
        if event is None:
            return
        if isinstance(event.get("seq"), int):
            self.serverseq = event["seq"]
        kind = event.get("type")
        given = event.get("parameters")
        parameters: dict[str, Any] = given if isinstance(given, dict) else {}
        if kind == "opened":
            media = parameters.get("media") or [{}]
            self.channels = len(media[0].get("channels") or ["external"])
            self.opened.set()
        elif kind == "closed":
            self.closed.set()
        elif kind == "pause":
            if self.paused_at is None:
                self.paused_at = self.samples * 1000 / 8000
            self.outbox.put_nowait(self._message("paused", {}))
        elif kind == "resume" and self.paused_at is not None:
            start, self.paused_at = self.paused_at, None
            discarded, self.discarded_samples = self.discarded_samples, 0
            self.outbox.put_nowait(self._message("resumed", {
                "start": f"PT{start / 1000:.2f}S", "discarded": f"PT{discarded / 8000:.2f}S"}))
        elif kind == "disconnect":
            variables = parameters.get("outputVariables")
            if isinstance(variables, dict):
                self.result.hand_off = {"target": variables.get("streamsvc_target"),
                                        "parameters": variables}
            if not self.close_sent:
                self.close_sent = True
                self.outbox.put_nowait(self._message("close", {"reason": "disconnect"}))
        elif kind == "event":
            entities = parameters.get("entities") or []
            if any(isinstance(e, dict) and e.get("type") == "barge_in" for e in entities):
                self.result.clears_received += 1
                self.playback_ends = now
                if self.completion is not None:
                    self.completion.cancel()
                if self.playing:
                    self._completed()

    def _completed(self) -> None:
        self.playing = False
        self.played.set()
        self.completion = None
        self.result.marks_played.append("playback_completed")
        self.outbox.put_nowait(self._message("playback_completed", {}))


class _AsteriskPeer(_Peer):
    """Asterisk's side of a chan_websocket connection: media played in real time,
    ``MARK_MEDIA`` answered ``MEDIA_MARK_PROCESSED`` (same correlation id, in the control
    format the command came in) once the media before it has played, ``FLUSH_MEDIA``
    dropping what waits (its marks never answered), ``HANGUP`` ending the connection."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.json = True

    def _answer(self, message: str | bytes) -> None:
        now = _now()
        if isinstance(message, bytes):
            self._queue_audio(len(message), now)
            return
        event = json_object(message) if message.lstrip().startswith("{") else None
        self.json = event is not None
        name, _, rest = message.strip().partition(" ")
        command = str(event.get("command")) if event is not None else name
        if command == "MARK_MEDIA":
            correlation = str(event.get("correlation_id", "")) if event is not None else rest
            self.pending.append((max(self.playback_ends, now), correlation))
            self.wakeup.set()
        elif command == "FLUSH_MEDIA":
            self._dropped_by_platform(now)
        elif command == "HANGUP":
            self._platform_hangs_up()

    def _echo(self, name: str) -> None:
        if self.json:
            self.outbox.put_nowait(json.dumps({"event": "MEDIA_MARK_PROCESSED",
                                               "correlation_id": name}))
        else:
            self.outbox.put_nowait(f"MEDIA_MARK_PROCESSED correlation_id:{name}")


class _JambonzPeer(_Peer):
    """jambonz's side of a ``listen`` stream: ``playAudio`` played in real time and
    answered ``playDone`` once played (each a ``marks_played`` entry), streamed binary
    audio played, ``killAudio`` dropping what waits, ``disconnect`` ending the stream."""

    plays = 0

    def _answer(self, message: str | bytes) -> None:
        now = _now()
        if isinstance(message, bytes):
            self._queue_audio(len(message), now)
            return
        event = json_object(message)
        if event is None:
            return
        kind = event.get("type")
        given = event.get("data")
        data: dict[str, Any] = given if isinstance(given, dict) else {}
        if kind == "playAudio":
            content = str(data.get("audioContent") or "")
            rate = data.get("sampleRate")
            size = len(content) * 3 // 4 - content.count("=")
            self.result.audio_bytes_received += size
            per_second = rate * 2 if isinstance(rate, int) and rate > 0 else (
                self.bytes_per_second)
            self.playback_ends = max(self.playback_ends, now) + size / per_second
            self.plays += 1
            self.pending.append((self.playback_ends, f"play-{self.plays}"))
            self.wakeup.set()
        elif kind == "killAudio":
            self._dropped_by_platform(now)
        elif kind == "disconnect":
            self._platform_hangs_up()

    def _echo(self, name: str) -> None:
        self.outbox.put_nowait(json.dumps({"type": "playDone", "id": name}))


_PEERS: dict[str, type[_Peer]] = {"genesys": _GenesysPeer, "asterisk": _AsteriskPeer,
                                  "jambonz": _JambonzPeer}


async def replay(
    fixtures: Sequence[Fixture], url: str, *, speed: float = 1.0, concurrency: int = 1,
    auth_token: str | None = None, public_url: str | None = None,
    check: bool = False, server_log: Path | None = None,
    headers: dict[str, str] | None = None, acs_events_url: str | None = None,
    signing: Signing | None = None,
) -> ReplayReport:
    """Play every fixture ``concurrency`` times at once at ``url``; a fixture's own ``path``
    is not used: ``url`` names the route. Each upgrade is signed as the fixture's provider
    signs it, with the secrets in ``signing`` (``auth_token`` and ``public_url`` are
    Twilio's, kept for callers that only sign for Twilio). With ``check`` each session's
    outcome is compared with its fixture's ``expect`` (:mod:`streamsvc.replay.check`),
    through the server's JSON log when ``server_log`` is given."""
    started = time.monotonic()
    since = log_size(server_log) if server_log is not None else 0
    signing = signing or Signing()
    signing = dataclasses.replace(signing, auth_token=auth_token or signing.auth_token,
                                  public_url=public_url or signing.public_url)
    sessions = list(await asyncio.gather(*(
        replay_session(fixture, url, speed=speed, copy=copy, acs_events_url=acs_events_url,
                       headers=headers, signing=signing)
        for fixture in fixtures
        for copy in range(concurrency)
    )))
    if check:
        await _check(sessions, server_log, since)
    return ReplayReport(sessions, time.monotonic() - started, checked=check)


async def _check(sessions: list[SessionResult], server_log: Path | None, since: int) -> None:
    outcomes: dict[str, Outcome] = {}
    if server_log is not None:
        # A stream is found by its stream_sid, or (Vonage sends none: the service makes
        # it) by its call's id.
        sids = {s.stream_sid for s in sessions if s.ok and s.stream_sid}
        calls = {s.call_sid for s in sessions if s.ok and not s.stream_sid and s.call_sid}
        outcomes = await wait_for_outcomes(server_log, sids, since=since)
        if calls:
            outcomes.update(await wait_for_outcomes(server_log, calls, key="call_sid",
                                                    since=since))
    for session in sessions:
        if not session.expect:
            session.differences.append("the fixture's header has no expect to check against")
        elif not session.ok:
            session.differences.append(f"the session failed: {session.error}")
        elif server_log is not None:
            found = differences(session.expect, outcomes.get(
                session.stream_sid or session.call_sid or ""))
            if found and session.provider != "twilio" and "stream.started" in found[0]:
                found[0] += f" (a {session.provider} session: is --url a route with " \
                            f"provider = \"{session.provider}\"?)"
            session.differences += found
