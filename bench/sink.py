"""A local stand-in for a speech-to-text service, for ``python -m bench forward``: a picows
WebSocket server that takes any path, reads everything and keeps only counts.

    python -m bench.sink --port PORT

Prints ``{"ready": true}``, then on SIGTERM one JSON line: connections, binary messages
and bytes, text messages."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

counts = {"connections": 0, "binary_messages": 0, "binary_bytes": 0, "text_messages": 0}


class Sink(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        counts["connections"] += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.BINARY:
            counts["binary_messages"] += 1
            counts["binary_bytes"] += frame.payload_size
        elif kind is WSMsgType.TEXT:
            counts["text_messages"] += 1
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def serve(port: int) -> dict[str, Any]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await ws_create_server(lambda _: Sink(), "127.0.0.1", port,
                                    max_frame_size=1 << 20)
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    server.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(serve(args.port))
    except ImportError:
        result = asyncio.run(serve(args.port))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
