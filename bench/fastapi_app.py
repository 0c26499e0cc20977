"""The FastAPI baseline: a media-stream route written as Twilio's current Python sample
writes it (``websocket.iter_text()``, ``json.loads`` and ``base64.b64decode`` per frame),
served by uvicorn from :func:`bench.servers.run_fastapi`.

No ``from __future__ import annotations`` here: FastAPI reads the route's annotations at
run time to see that ``websocket`` is the connection.
"""

import base64
import json

from fastapi import FastAPI, WebSocket

app = FastAPI()
frames = 0


@app.websocket("/stream")
async def handle_media_stream(websocket: WebSocket) -> None:
    global frames
    await websocket.accept()
    async for message in websocket.iter_text():
        data = json.loads(message)
        if data["event"] == "media":
            base64.b64decode(data["media"]["payload"])
            frames += 1
