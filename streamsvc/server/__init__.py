"""The server side: :class:`StreamServer` (listening, admission, the HTTP front, probes and
metrics, the drain), what one stream connection does (:mod:`streamsvc.server.call`), the
narrow interface a connection needs from its host (:mod:`streamsvc.server.host`) and the
transports that carry the frames (:mod:`streamsvc.server.transports`)."""

from __future__ import annotations

from streamsvc.config import HEALTH_PATH, METRICS_PATH, READY_PATH
from streamsvc.server.stream_server import METRICS_SHARE_INTERVAL_S, StreamServer

__all__ = ["HEALTH_PATH", "METRICS_PATH", "METRICS_SHARE_INTERVAL_S", "READY_PATH",
           "StreamServer"]
