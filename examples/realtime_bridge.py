"""A bidirectional bridge between a call and a realtime speech model's WebSocket API: the
caller's audio goes to the model, the model's audio comes back to the caller, the caller
interrupting the model clears what is still queued, and marks say how much of each answer
the caller actually heard.

The API's shape is the common one of realtime speech models (JSON events, base64 PCM16 at
24 kHz, as OpenAI's Realtime API has them):

* to the model: ``session.update`` once, then ``input_audio_buffer.append`` (``audio``:
  the caller's audio, resampled to 24 kHz) for every frame;
* from the model: ``response.output_audio.delta`` (``delta``: audio to play; the older
  ``response.audio.delta`` too), ``response.output_audio.done`` / ``response.done`` (the
  answer is complete: a mark follows its audio), ``input_audio_buffer.speech_started`` (the
  caller started talking: barge-in).

On barge-in the bridge ``clear``-s the call (the provider drops what it has queued; the
pending marks come back ``cleared``) and tells the model ``response.cancel``. Each answer's
mark resolving ``played`` or ``cleared`` is how the bridge knows what was heard: logged as
``bridge.answer`` and counted in the report.

Route it on a bidirectional path (any provider)::

    [[routes]]
    path = "/bridge"
    bidirectional = true
    handlers = ["log", "examples.realtime_bridge:RealtimeBridge"]

    [handlers."examples.realtime_bridge:RealtimeBridge"]
    url = "wss://realtime.example.com/v1/realtime?model=speech-model"
    api_key = "..."
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamsvc import AsyncHandler, wire
from streamsvc.audio import Resampler
from streamsvc.live import LiveSession, MarkResult
from streamsvc.session import CallSummary

logger = structlog.get_logger("realtime_bridge")

MODEL_RATE = 24_000  # PCM16 both ways
AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
ANSWER_DONE = ("response.output_audio.done", "response.audio.done", "response.done")


class RealtimeBridge(AsyncHandler):
    """Bridges a call to a realtime speech model (see the module docstring)."""

    queue_size = 1000  # 20 s of the caller's audio while the model's socket is slow

    def __init__(self, *, url: str, api_key: str = "",
                 instructions: str = "You are a helpful voice assistant.") -> None:
        self.url = url
        self.api_key = api_key
        self.instructions = instructions
        self.session: LiveSession | None = None
        self.model: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.to_model: Resampler | None = None
        self.answers = 0
        self.answer_audio = False  # audio of the current answer was queued
        self.heard: dict[str, int] = {"played": 0, "cleared": 0}
        self.barge_ins = 0

    async def on_start(self, session: LiveSession) -> None:
        self.session = session
        self.to_model = Resampler(session.sample_rate, MODEL_RATE)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.model = await connect(self.url, additional_headers=headers)
        await self.model.send(json.dumps({"type": "session.update", "session": {
            "instructions": self.instructions,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": MODEL_RATE}},
                      "output": {"format": {"type": "audio/pcm", "rate": MODEL_RATE}}}}}))
        self.reader = asyncio.get_running_loop().create_task(self._read(self.model))

    async def on_media(self, frame: wire.Media) -> None:
        if self.model is None or self.session is None or self.to_model is None:
            return
        if frame.track != "inbound":
            return
        audio = self.to_model.process(self.session.pcm16(frame))
        with contextlib.suppress(ConnectionClosed):
            await self.model.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(audio).decode()}))

    async def _read(self, model: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in model:
                self._on_event(json.loads(message))

    def _on_event(self, event: dict[str, Any]) -> None:
        session = self.session
        if session is None:
            return
        kind = event.get("type")
        if kind in AUDIO_DELTAS:
            session.send_audio(base64.b64decode(event.get("delta", "")),
                               sample_rate=MODEL_RATE)
            self.answer_audio = True
        elif kind in ANSWER_DONE and self.answer_audio:
            self.answer_audio = False
            self.answers += 1
            name = f"answer-{self.answers}"
            session.mark(name).add_done_callback(functools.partial(self._heard, name))
        elif kind == "input_audio_buffer.speech_started":
            self.barge_ins += 1
            session.clear()  # the caller talks over the model: stop it at once
            self.answer_audio = False
            if self.model is not None:
                asyncio.get_running_loop().create_task(self._cancel(self.model))

    async def _cancel(self, model: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await model.send(json.dumps({"type": "response.cancel"}))

    def _heard(self, name: str, done: asyncio.Future[MarkResult]) -> None:
        result = done.result()
        self.heard[result] += 1
        logger.info("bridge.answer", name=name, heard=result)

    async def on_stop(self, session: LiveSession, summary: CallSummary) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.model is not None:
            await self.model.close()

    def report(self) -> dict[str, object]:
        return {"answers": self.answers, "answers_heard": self.heard["played"],
                "answers_cut": self.heard["cleared"], "barge_ins": self.barge_ins}
