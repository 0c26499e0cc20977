"""The servers the benchmarks compare, each run as its own process:

    python -m bench.servers VARIANT --port PORT

* ``service``: streamsvc with no handler; ``service-latency``: with a handler that measures
  receive-to-handler latency from the sender's timestamp in each payload;
  ``service-recorder``: with the recorder;
* ``bare``: the websockets receive loop and nothing else (the floor for any websockets
  server);
* ``naive``: websockets on stock asyncio, ``json.loads`` and ``base64.b64decode`` on every
  frame, as Twilio's samples do;
* ``floor``: a picows listener that counts frames and parses nothing: what any server on
  the default transport pays per frame (kernel, event loop, WebSocket framing) before doing
  anything with it;
* ``naive-forward``: the naive server forwarding each call to ``--sink``, as a forwarder
  written from Twilio's samples does: ``json.loads``, ``base64.b64decode``,
  ``audioop.ulaw2lin`` on every frame, one websockets client per call sending each 20 ms
  frame as it comes;
* ``fastapi``: the same work in a FastAPI WebSocket route served by uvicorn, as Twilio's
  current Python sample is written (``websocket.iter_text()``, ``json.loads``,
  ``base64.b64decode``); uvicorn's own WebSocket implementation choice (``ws="auto"``).

``--loop uvloop`` runs the variant on uvloop (when installed); ``--transport picows`` runs
the service variants on the optional picows transport. On SIGTERM the process
prints one JSON line (frames received, latency percentiles where measured) and exits.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from streamsvc import wire
from streamsvc.config import Route, Settings
from streamsvc.handlers import Handler, HandlerSpec, resolve_handler
from streamsvc.logs import configure_logging
from streamsvc.server import StreamServer


class LatencyHandler(Handler):
    """Receive-to-handler latency: now minus the sender's monotonic_ns in the payload."""

    samples = array.array("q")
    frames = 0

    def on_media(self, frame: wire.Media) -> None:
        sent = int.from_bytes(frame.payload[:8], "little", signed=True)
        LatencyHandler.samples.append(time.monotonic_ns() - sent)


class Counter(Handler):
    frames = 0

    def on_media(self, frame: wire.Media) -> None:
        Counter.frames += 1


def percentiles(samples: array.array[int]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1e6, 3)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1] / 1e6, 3)}


async def run_service(port: int, handlers: tuple[HandlerSpec, ...], stop: asyncio.Event,
                      transport: str, redis_url: str | None = None,
                      publish_audio: bool = False) -> dict[str, Any]:
    settings = Settings(port=port, ping_interval_s=0, max_connections=100_000,
                        routes=(Route("/stream", handlers, publish_audio=publish_audio),),
                        idle_timeout_s=60, transport=transport, redis_url=redis_url)
    server = StreamServer(settings)
    await server.start()
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    await server.stop()
    return {"frames": server.metrics.frames["inbound"] + server.metrics.frames["outbound"]}


async def run_bare(port: int, stop: asyncio.Event, naive: bool) -> dict[str, Any]:
    frames = 0

    async def handler(connection: ServerConnection) -> None:
        nonlocal frames
        async for message in connection:
            if naive:
                event = json.loads(message)
                if event.get("event") == "media":
                    base64.b64decode(event["media"]["payload"])
                    frames += 1
            elif b'"media"' in message if isinstance(message, bytes) else '"media"' in message:
                frames += 1

    async with serve(handler, "127.0.0.1", port, ping_interval=None, compression=None,
                     max_size=65536):
        print(json.dumps({"ready": True}), flush=True)
        await stop.wait()
    return {"frames": frames}


async def run_naive_forward(port: int, stop: asyncio.Event, sink: str) -> dict[str, Any]:
    import audioop

    from websockets.asyncio.client import connect

    frames = 0

    async def handler(connection: ServerConnection) -> None:
        nonlocal frames
        async with connect(sink, compression=None) as forward:
            async for message in connection:
                event = json.loads(message)
                if event.get("event") == "media":
                    mulaw = base64.b64decode(event["media"]["payload"])
                    await forward.send(audioop.ulaw2lin(mulaw, 2))
                    frames += 1
                elif event.get("event") == "start":
                    await forward.send(json.dumps({"event": "start", "call_sid":
                                                   event["start"]["callSid"]}))

    async with serve(handler, "127.0.0.1", port, ping_interval=None, compression=None,
                     max_size=65536):
        print(json.dumps({"ready": True}), flush=True)
        await stop.wait()
    return {"frames": frames}


async def run_floor(port: int, stop: asyncio.Event) -> dict[str, Any]:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    frames = 0

    class Listener(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            nonlocal frames
            if frame.msg_type is WSMsgType.TEXT:
                # Counts media frames (as the others do) by the load generator's prefix.
                frames += frame.get_payload_as_memoryview()[:16] == b'{"event":"media"'

            elif frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    server = await ws_create_server(lambda _: Listener(), "127.0.0.1", port,
                                    max_frame_size=65536)
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    server.close()
    return {"frames": frames}


async def run_fastapi(port: int, stop: asyncio.Event) -> dict[str, Any]:
    import uvicorn

    from . import fastapi_app

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
            return contextlib.nullcontext()  # SIGTERM is this process's "print and exit"

    server = Server(uvicorn.Config(fastapi_app.app, host="127.0.0.1", port=port, log_level="error",
                                   lifespan="off"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    server.should_exit = True
    await serving
    return {"frames": fastapi_app.frames}


async def run_asgi(port: int, stop: asyncio.Event) -> dict[str, Any]:
    """streamsvc mounted in a FastAPI app (streamsvc.asgi), served by uvicorn."""
    import uvicorn
    from fastapi import FastAPI

    from streamsvc.asgi import StreamsvcApp

    voice = StreamsvcApp(Settings(ping_interval_s=0, max_connections=100_000,
                                  routes=(Route("/stream", ()),), idle_timeout_s=60))
    app = FastAPI(lifespan=voice.lifespan)
    app.mount("", voice)

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
            return contextlib.nullcontext()  # SIGTERM is this process's "print and exit"

    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                   lifespan="on", ws="auto"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    frames = 0
    if voice.server is not None:
        metrics = voice.server.metrics
        frames = metrics.frames["inbound"] + metrics.frames["outbound"]
    server.should_exit = True
    await serving
    return {"frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["service", "service-latency", "service-recorder",
                                            "bare", "naive", "naive-forward", "fastapi",
                                            "floor", "asgi"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--transport", choices=["auto", "websockets", "picows"],
                        default="websockets",
                        help="for the service variants")
    parser.add_argument("--redis-url", help="service variants: run as a fleet member")
    parser.add_argument("--publish-audio", action="store_true",
                        help="with --redis-url: the route publishes its audio")
    parser.add_argument("--sink", help="naive-forward: the WebSocket URL to forward to")
    args = parser.parse_args()
    configure_logging(level="error")  # keep stdout for the result line

    async def main_task() -> dict[str, Any]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        coroutine: Coroutine[Any, Any, dict[str, Any]]
        if args.variant == "service":
            coroutine = run_service(args.port, (), stop, args.transport, args.redis_url,
                                    args.publish_audio)
        elif args.variant == "service-latency":
            coroutine = run_service(args.port, (HandlerSpec("latency", LatencyHandler),), stop,
                                    args.transport)
        elif args.variant == "service-recorder":
            directory = tempfile.mkdtemp(prefix="streamsvc-bench-")
            recorder = resolve_handler("recorder", {"dir": directory}, key="bench")
            coroutine = run_service(args.port, (recorder,), stop, args.transport)
        elif args.variant == "naive-forward":
            coroutine = run_naive_forward(args.port, stop, args.sink)
        elif args.variant == "floor":
            coroutine = run_floor(args.port, stop)
        elif args.variant == "fastapi":
            coroutine = run_fastapi(args.port, stop)
        elif args.variant == "asgi":
            coroutine = run_asgi(args.port, stop)
        else:
            coroutine = run_bare(args.port, stop, naive=args.variant == "naive")
        return await coroutine

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(main_task())
    result["latency_ms"] = percentiles(LatencyHandler.samples)
    result["latency_samples"] = len(LatencyHandler.samples)
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
