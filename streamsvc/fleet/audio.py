"""A stream's audio published to the fleet (routes with ``publish_audio``): PCM16 batches
per track to ``streamsvc:audio:<stream_sid>`` (:func:`streamsvc.fleet.keys.audio_key`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from streamsvc import wire
from streamsvc.fleet.node import FleetNode
from streamsvc.live import LiveSession
from streamsvc.session import FRAME_MS

__all__ = ["AudioBatcher"]

# Published audio batches between two refreshes of the audio key's expiry.
AUDIO_EXPIRY_EVERY: Final = 300


class AudioBatcher:
    """Publishes a stream's audio (routes with ``publish_audio``) as PCM16 batches of
    ``batch_ms`` per track to ``streamsvc:audio:<stream_sid>``."""

    __slots__ = ("batch_ms", "batches", "fleet", "pending", "session")

    def __init__(self, fleet: FleetNode, session: LiveSession, batch_ms: int) -> None:
        self.fleet = fleet
        self.session = session
        self.batch_ms = batch_ms
        self.pending: dict[str, tuple[int, int, list[bytes]]] = {}  # track: first, last, audio
        self.batches = 0

    def wrap(self, on_media: Callable[[wire.Media], None]) -> Callable[[wire.Media], None]:
        def both(media: wire.Media) -> None:
            on_media(media)
            self.add(media)
        return both

    def add(self, media: wire.Media) -> None:
        body = media.media
        track, timestamp = body.track, body.timestamp
        entry = self.pending.get(track)
        if entry is None:
            self.pending[track] = (timestamp, timestamp, [self.session.pcm16(media)])
            return
        first, _, pieces = entry
        pieces.append(self.session.pcm16(media))
        if timestamp + FRAME_MS - first >= self.batch_ms or timestamp < first:
            del self.pending[track]
            self._send(track, first, pieces)
        else:
            self.pending[track] = (first, timestamp, pieces)

    def flush(self) -> None:
        for track, (first, _, pieces) in self.pending.items():
            self._send(track, first, pieces, expire=True)
        self.pending.clear()

    def _send(self, track: str, first: int, pieces: list[bytes], *,
              expire: bool = False) -> None:
        session = self.session
        assert session.stream_sid is not None
        # The key's expiry is set with the first batch, then about once a minute.
        expire = expire or self.batches % AUDIO_EXPIRY_EVERY == 0
        self.batches += 1
        self.fleet.publish_audio(session.stream_sid, track, first, session.sample_rate,
                                 b"".join(pieces), expire=expire)
