"""streamsvc's own per-frame work, stage by stage, in one process with no sockets.

Real calls (a started :class:`~streamsvc.server.call.CallCore` each, as a transport makes them)
take their frames round-robin, one frame per call in turn, as a loaded server interleaves
them: each call's state is as cold between its frames as it is under load. Every stage
adds one step of the path a media frame takes from the transport's callback:

* ``parse``: the provider codec's parse (msgspec decode, base64 in C);
* ``session``: + the session's checks and per-track accounting (``Session.receive_media``);
* ``call, no handler``: + ``CallCore.receive`` (the whole path a transport calls, inside
  the connection's ``contextvars`` context, as the picows transport runs it);
* ``call + counter``: + a route with one inline handler counting frames;
* ``call + recorder``: + the recorder (WAV writing to a temporary directory).

The figures are medians of rounds; the differences between stages are each step's cost.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import statistics
import tempfile
import time
from collections.abc import Callable

from streamsvc import wire
from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.logs import configure_logging
from streamsvc.providers import TWILIO, provider
from streamsvc.server import StreamServer
from streamsvc.server.admission import Admitted
from streamsvc.server.call import CallCore
from streamsvc.session import Session
from streamsvc.wire import Upgrade


class _Call(CallCore):
    def outbound_full(self) -> bool:
        return False

    def send_now(self, frame: bytes) -> None:
        pass


class _Counter(Handler):
    frames = 0

    def on_media(self, frame: wire.Media) -> None:
        _Counter.frames += 1


def _frames(index: int, count: int) -> list[bytes]:
    sid = f"MZ{index:032x}"
    payload = base64.b64encode(bytes(range(96, 256))).decode()
    return [(
        f'{{"event":"media","sequenceNumber":"{n + 2}","media":{{"track":"inbound",'
        f'"chunk":"{n + 1}","timestamp":"{n * 20}","payload":"{payload}"}},'
        f'"streamSid":"{sid}"}}').encode() for n in range(count)]


def _start(index: int) -> bytes:
    sid = f"MZ{index:032x}"
    return (
        '{"event":"start","sequenceNumber":"1","streamSid":"' + sid + '","start":{'
        '"accountSid":"AC00000000000000000000000000000000","streamSid":"' + sid + '",'
        '"callSid":"CA' + f"{index:032x}" + '","tracks":["inbound"],"mediaFormat":{'
        '"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},'
        '"customParameters":{"customer":"c-42"}}}').encode()


def _run(runs: list[Callable[..., None]], messages: list[Callable[[bytes], None]],
         index: int, frame: bytes) -> None:
    runs[index](messages[index], frame)


def _time(calls: int, frames: list[list[bytes]], step: Callable[[int, bytes], None]) -> float:
    """Microseconds per frame of ``step(call_index, frame)`` over every frame, round-robin."""
    per_call = len(frames[0])
    begin = time.perf_counter()
    for n in range(per_call):
        for index in range(calls):
            step(index, frames[index][n])
    return (time.perf_counter() - begin) / (calls * per_call) * 1e6


async def _round(calls: int, per_call: int, recorder_dir: str) -> dict[str, float]:
    frames = [_frames(index, per_call) for index in range(calls)]
    results: dict[str, float] = {}

    parse = TWILIO.parse
    results["parse"] = _time(calls, frames, lambda _, frame: parse(frame) and None)

    sessions = [Session() for _ in range(calls)]
    for index, session in enumerate(sessions):
        session.receive_message(_start(index))
        session.events_received()
    results["session"] = _time(calls, frames,
                               lambda index, frame: sessions[index].receive_media(frame) and None)

    counter = HandlerSpec("counter", _Counter)
    recorder = resolve_handler("recorder", {"dir": recorder_dir}, key="bench")
    for name, handlers in (("call, no handler", ()), ("call + counter", (counter,)),
                           ("call + recorder", (recorder,))):
        server = StreamServer(Settings(routes=(Route("/stream", handlers),)))
        route = server.settings.routes[0]
        cores, contexts = [], []
        for index in range(calls):
            context = contextvars.copy_context()
            admitted = Admitted(route, Upgrade(route.path), provider(route.provider))
            core = context.run(_Call, server, admitted)
            context.run(core.receive, _start(index))
            cores.append(core)
            contexts.append(context)
        await _started(cores)
        runs = [context.run for context in contexts]
        messages = [core.receive for core in cores]
        results[name] = _time(calls, frames, functools.partial(_run, runs, messages))
        await asyncio.gather(*(core.finish("closed") for core in cores))
    return results


async def _started(cores: list[_Call]) -> None:
    """Wait until every queued handler's ``on_start`` (its own task) has run: until then
    its frames are queued, not handled in the receive loop as they are in a running call."""
    for _ in range(600):
        if all(slot.runner is None or slot.runner.started
               for core in cores for slot in core.chain._slots):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("handlers did not start within 30 s")


def main(*, quick: bool = False) -> None:
    configure_logging(level="error")
    calls, per_call, rounds = (500, 20, 3) if quick else (2000, 25, 7)
    with tempfile.TemporaryDirectory(prefix="streamsvc-bench-") as recorder_dir:
        runs = [asyncio.run(_round(calls, per_call, recorder_dir)) for _ in range(rounds)]
    print(f"\nstreamsvc's own work per media frame, no sockets: {calls} calls taking "
          f"{per_call} frames each round-robin, median of {rounds} rounds (min-max)")
    print(f"{'stage':22} {'us/frame':>9} {'added':>7} {'spread':>15}")
    previous = 0.0
    for stage in runs[0]:
        values = [run[stage] for run in runs]
        median = statistics.median(values)
        added = median - previous if stage != "call + recorder" else (
            median - statistics.median(run["call, no handler"] for run in runs))
        print(f"{stage:22} {median:9.3f} {added:+7.3f} {min(values):7.3f}-{max(values):.3f}")
        previous = median if stage != "call + recorder" else previous
