"""Forward the caller's audio to a speech-to-text WebSocket service and log its transcripts.

The built-in ``forward`` handler does the streaming (one connection per call, bounded queue,
reconnects, drops counted); this subclass only reads what the service sends back. It
expects JSON messages like ``{"type": "transcript", "text": "...", "is_final": true}``
(adapt :meth:`TranscriptLogger.on_message` to your service's format) and logs each final
one as ``stt.transcript``, with the call's ids bound like every other line of the call.

Run it (from this folder, so that ``stt_forward`` imports)::

    [[routes]]
    path = "/stream"
    handlers = ["log", "stt_forward:TranscriptLogger"]

    [handlers."stt_forward:TranscriptLogger"]
    url = "wss://stt.example.com/v1/listen?encoding=linear16&sample_rate=8000"
    headers = { Authorization = "Token ..." }
"""

from __future__ import annotations

import json

import structlog

from streamsvc.builtins.forward import ForwardHandler

logger = structlog.get_logger("stt_forward")


class TranscriptLogger(ForwardHandler):
    """``forward`` plus a log line per final transcript the service sends back."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.transcripts: list[str] = []

    async def on_message(self, message: str | bytes) -> None:
        try:
            result = json.loads(message)
        except ValueError:
            return
        if (isinstance(result, dict) and result.get("type") == "transcript"
                and result.get("is_final")):
            text = str(result.get("text", ""))
            self.transcripts.append(text)
            logger.info("stt.transcript", text=text)

    def report(self) -> dict[str, object]:
        return {**super().report(), "transcripts": len(self.transcripts)}
