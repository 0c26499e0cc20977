"""Test your handlers in-process: a fixture (a file, or a session built in code with the
synthesizer) played through a route's handlers with no sockets, on a virtual clock, and
what came of it.

    from streamsvc.testing import play

    def test_my_bot_hears_the_account_number() -> None:
        result = play("fixtures/bidirectional_dtmf_marks.jsonl", ["mypkg.bots:Bot"],
                      bidirectional=True)
        assert "stop" == result.summary.reason
        assert result.marks == {"greeting": "played"}

:func:`play` runs the call the way the server runs it (the same session, call core,
handler chain, context store and log lines), with the platform's side played by the replay
client's peer for the fixture's provider: what handlers send back is played in simulated
real time (a mark resolves when the playback reaches it, a ``clear`` drops what waits and
returns the pending marks), DTMF and every frame come at their recorded time. The clock is
virtual: a two-minute call plays in milliseconds, and timers (a mark, a debounce, a
handler's ``asyncio.sleep``) fire in order as they would. A handler that does real network
I/O (``forward``) needs ``clock="real"``.

:func:`play_async` is the same inside a running event loop (its clock is that loop's). The
pytest plugin (``streamsvc.testing.pytest_plugin``, registered as a ``pytest11`` entry
point) gives :func:`play` as the ``streamsvc_play`` fixture.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from websockets.exceptions import ConnectionClosed

from streamsvc import wire
from streamsvc.audio import to_pcm16
from streamsvc.config import Route, Settings
from streamsvc.handlers import AnyHandler, HandlerSpec, resolve_handler
from streamsvc.replay.client import SessionResult, play_as_platform
from streamsvc.replay.fixture import Fixture, json_object, load_fixture
from streamsvc.replay.synth import SessionPlan, expected_outcome, synthesize
from streamsvc.server.admission import Admitted
from streamsvc.server.call import CallCore
from streamsvc.server.stream_server import StreamServer
from streamsvc.session import CallSummary, State, StopReason
from streamsvc.testing.clock import run_virtual

__all__ = ["CallResult", "SessionPlan", "from_plan", "play", "play_async"]

# How long a call may take on the clock it runs on before the kit gives up on it.
DEFAULT_TIMEOUT_S: Final = 600.0
_CLOSE: Final = object()


@dataclass
class CallResult:
    """What one played call did."""

    summary: CallSummary | None  # None: the stream never started (refused, no start)
    started: dict[str, Any] | None  # the stream.started log line's fields
    stopped: dict[str, Any] | None  # the stream.stopped log line's fields
    logs: list[dict[str, Any]]  # every log event of the call, in order
    # What the handlers sent, as the platform received it: the audio (PCM16 at the
    # stream's rate), each mark's fate, the clears, the hand-off a platform saw.
    audio: bytes = b""
    # name -> "played" | "cleared", as the platform's side saw it (where its acknowledgement
    # names no mark, Genesys's playback_completed and jambonz's playDone, those instead).
    marks: dict[str, str] = field(default_factory=dict)
    clears: int = 0
    hand_off: dict[str, Any] | None = None
    close_code: int | None = None
    close_reason: str | None = None
    replay: SessionResult | None = None

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log events called ``name``, in order."""
        return [line for line in self.logs if line.get("event") == name]


def from_plan(plan: SessionPlan, *, path: str = "/test") -> Fixture:
    """A Twilio-format session built in code (:class:`SessionPlan`: audio samples, DTMF
    and marks at their times, drops, parameters), with its expected outcome, to
    :func:`play` (``streamsvc fixture synth --provider ...`` writes other providers')."""
    return Fixture("plan", tuple(synthesize(plan)),
                   {"path": path, "expect": expected_outcome(plan)})


def play(fixture: Fixture | str | Path, handlers: Sequence[Any] = (), *,
         route: Route | None = None, bidirectional: bool = False,
         settings: Settings | None = None, options: Mapping[str, Mapping[str, Any]] | None = None,
         clock: str = "virtual", timeout_s: float = DEFAULT_TIMEOUT_S) -> CallResult:
    """Play ``fixture`` (a path or a loaded :class:`~streamsvc.replay.fixture.Fixture`)
    through ``handlers`` (handler instances, :class:`~streamsvc.handlers.HandlerSpec` s,
    built-in names or ``"pkg.mod:Factory"`` strings with their ``options``) on a route of
    the fixture's provider (or ``route``, whole), and return the :class:`CallResult`.
    ``clock``: ``virtual`` (the default) or ``real``."""
    if clock not in ("virtual", "real"):
        raise ValueError(f"clock must be virtual or real, got {clock!r}")
    call = play_async(fixture, handlers, route=route, bidirectional=bidirectional,
                      settings=settings, options=options, timeout_s=timeout_s)
    if clock == "real":
        return asyncio.run(call)
    return run_virtual(call)


async def play_async(fixture: Fixture | str | Path,
                     handlers: Sequence[Any] = (), *, route: Route | None = None,
                     bidirectional: bool = False, settings: Settings | None = None,
                     options: Mapping[str, Mapping[str, Any]] | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> CallResult:
    """:func:`play` in the running event loop (on its clock)."""
    loaded = fixture if isinstance(fixture, Fixture) else load_fixture(str(fixture))
    if route is None:
        route = Route(loaded.path or "/test", _specs(handlers, options or {}),
                      bidirectional=bidirectional, provider=loaded.provider)
    base = settings or Settings()
    server = StreamServer(Settings(**{**_fields(base), "routes": (route,), "port": 0}))
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(timeout_s):
            result = await _play(server, route, loaded)
    result.logs = [dict(line) for line in logs]
    result.started = next(iter(result.events("stream.started")), None)
    result.stopped = next(iter(result.events("stream.stopped")), None)
    return result


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def _specs(handlers: Sequence[Any], options: Mapping[str, Mapping[str, Any]]
           ) -> tuple[HandlerSpec, ...]:
    specs = []
    for index, handler in enumerate(handlers):
        if isinstance(handler, HandlerSpec):
            specs.append(handler)
        elif isinstance(handler, str):
            specs.append(resolve_handler(handler, options.get(handler, {}),
                                         key=f"handlers[{index}]"))
        else:
            specs.append(HandlerSpec(type(handler).__name__, _given(handler)))
    return tuple(specs)


def _given(handler: AnyHandler) -> Any:
    """A factory that gives the one instance (a test keeps it, to look at it after)."""
    return lambda: handler


async def _play(server: StreamServer, route: Route, fixture: Fixture) -> CallResult:
    upgrade_headers = list(fixture.headers.items())
    answer = server.admit(route.path, "", upgrade_headers, "127.0.0.1")
    if not isinstance(answer, Admitted):
        return CallResult(None, None, None, [], close_code=answer.status,
                          close_reason=answer.body.decode(errors="replace"))
    call = _MemoryCall(server, answer)
    connection = _MemoryConnection(call)
    result = SessionResult(fixture.name, fixture.stream_sid(), fixture.call_sid(),
                           dict(fixture.expect), fixture.provider)
    await play_as_platform(connection, fixture, result)
    await call.done()
    session = call.session
    audio = b"".join(to_pcm16(frame, session.encoding) for frame in connection.audio)
    marks = {**dict.fromkeys(result.marks_cleared, "cleared"),
             **dict.fromkeys(result.marks_played, "played")}
    return CallResult(session.summary, None, None, [], audio=audio, marks=marks,
                      clears=result.clears_received, hand_off=result.hand_off,
                      close_code=connection.close_code, close_reason=connection.close_reason,
                      replay=result)


class _MemoryCall(CallCore):
    """The call core of a connection that is a pair of queues (no socket): what the call
    sends goes to the platform's peer, its closes end the connection."""

    __slots__ = ("connection", "finishing", "reason")

    def __init__(self, server: StreamServer, admitted: Admitted) -> None:
        super().__init__(server, admitted)
        self.connection: _MemoryConnection | None = None
        self.reason: StopReason | None = None
        self.finishing: asyncio.Task[None] | None = None

    def outbound_full(self) -> bool:
        return False

    def send_now(self, frame: bytes) -> None:
        assert self.connection is not None
        self.connection.to_peer(frame)

    def close_with(self, code: int, reason: str, why: StopReason) -> None:
        self.reason = self.reason or why
        if self.connection is not None:
            self.connection.closed_by_service(code, reason)

    def disconnected(self, peer_closed: bool) -> None:
        """The connection is over: summarize the stream if it started."""
        if self.finishing is not None:
            return
        session = self.session
        reason: StopReason = ("stop" if session.state is State.STOPPED
                              else self.reason or ("closed" if peer_closed else "aborted"))
        if session.state is State.AWAITING_START:
            self.log_closed_before_start(reason)
        self.finishing = asyncio.get_running_loop().create_task(self._finish(reason))

    async def _finish(self, reason: StopReason) -> None:
        if self.session.stream_sid is not None:
            await self.finish(reason)
        self.closed()

    async def done(self) -> None:
        if self.finishing is None:
            self.disconnected(peer_closed=True)
        assert self.finishing is not None
        await self.finishing


class _MemoryConnection:
    """The platform's end of the connection, as the replay client's peer uses a
    WebSocket: ``send`` hands a frame to the call, iterating gives what the call sent."""

    def __init__(self, call: _MemoryCall) -> None:
        self.call = call
        call.connection = self
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.audio: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None

    def to_peer(self, frame: bytes) -> None:
        if self.close_code is not None:
            return
        if type(frame) is wire.BinaryFrame:
            self.audio.append(bytes(frame))
            self.queue.put_nowait(bytes(frame))
            return
        text = frame.decode()
        self.audio += _audio_in(text)
        self.queue.put_nowait(text)

    def closed_by_service(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.queue.put_nowait(_CLOSE)
            self.call.disconnected(peer_closed=False)

    async def send(self, data: str | bytes) -> None:
        if self.close_code is not None:
            raise ConnectionClosed(None, None)
        self.call.frames_received += 1
        if isinstance(data, bytes):
            self.call.receive(data, True)
        else:
            self.call.receive(data.encode(), False)
        if self.call.session.state is State.STOPPED:
            self.closed_by_service(1000, "")
        await asyncio.sleep(0)

    async def close(self) -> None:
        if self.close_code is None:
            self.close_code = 1000
            self.queue.put_nowait(_CLOSE)
            self.call.disconnected(peer_closed=True)

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            item = await self.queue.get()
            if item is _CLOSE:
                return
            assert isinstance(item, str | bytes)
            yield item


def _audio_in(text: str) -> list[bytes]:
    """The audio a text message of the service's carries (Twilio-shaped ``media``, ACS's
    ``AudioData``, Plivo's ``playAudio``, jambonz's ``playAudio``), as native bytes."""
    message = json_object(text)
    if message is None:
        return []
    body = message.get("media") or message.get("AudioData") or message.get("data") or {}
    payload = body.get("payload") or body.get("Data") or body.get("audioContent") if (
        isinstance(body, dict)) else None
    if not isinstance(payload, str):
        return []
    with contextlib.suppress(ValueError):
        return [base64.b64decode(payload)]
    return []
