"""The context store of a fleet (:class:`streamsvc.context.store.ContextStore` over Redis):
a call's record under ``streamsvc:context:<call id>`` for ``context_ttl_s``, written through
the node's bounded buffer and read once by the stream, on whichever instance it lands,
within ``redis_timeout_ms``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from streamsvc.context.store import CallContext
from streamsvc.fleet.node import FleetNode

__all__ = ["RedisContextStore"]


class RedisContextStore:
    """The fleet's store: every instance reads what any instance's webhook wrote."""

    def __init__(self, node: FleetNode) -> None:
        self.node = node

    def put(self, call_id: str, record: CallContext) -> asyncio.Future[None]:
        return self.node.put_context(call_id, record)

    async def written(self, *done: asyncio.Future[None]) -> None:
        await self.node.written(*done)

    def look_up(self, call_id: str | None, call_sid: str | None) -> Awaitable[CallContext]:
        return self.node.look_up(call_id, call_sid)

    def read(self, call_id: str) -> Awaitable[CallContext | None]:
        return self.node.read_context(call_id)
