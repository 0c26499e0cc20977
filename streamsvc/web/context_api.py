"""The call's context for the agent's app: ``GET /calls/<call id>/context``.

When a call reaches a person, the person's app asks here for what the service knows of it:
its whole context (what the call's ways in carried and what handlers added), its hand-offs
and when it last changed. The call id is the one the hand-off carries (``streamsvc_call``):
the call's sid (ACS: the correlation id; Vonage: the call's uuid).

Only with ``Authorization: Bearer <context_api_token>``: 401 without it or with another
token; the path answers 404 while no token is configured, so that the context of a call is
never handed to a stranger. A call in progress on this instance is answered from its live
session; any other from the context store (in a fleet, Redis: any instance answers).
"""

from __future__ import annotations

import datetime
import hmac
import http
from collections.abc import Awaitable, Callable, Iterable
from typing import Final
from urllib.parse import unquote

import orjson
import structlog

from streamsvc.config import Settings
from streamsvc.context.store import CallContext, ContextStore
from streamsvc.live import LiveSession
from streamsvc.web.webhooks import HttpRequest, HttpResponse

__all__ = ["CONTEXT_PATH_PREFIX", "ContextApi"]

logger = structlog.get_logger("streamsvc.web")

CONTEXT_PATH_PREFIX: Final = "/calls/"
CONTEXT_PATH_SUFFIX: Final = "/context"
# A call id longer than this is not one (Twilio's are 34 characters, ACS's 36).
MAX_CALL_ID_CHARS: Final = 256

Refuser = Callable[[http.HTTPStatus, str, HttpRequest], HttpResponse]


class ContextApi:
    """Answers ``GET /calls/<call id>/context`` (see the module docstring). ``live`` lists
    the sessions in progress on this instance."""

    def __init__(self, settings: Settings, store: ContextStore,
                 live: Callable[[], Iterable[LiveSession]], refuse: Refuser) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.refuse = refuse

    def handles(self, path: str) -> bool:
        """Whether ``path`` is a call's context (only while a token is configured)."""
        return bool(self.settings.context_api_token) and _call_id(path) is not None

    def respond(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        call_id = _call_id(self.settings.local_path(request.path))
        assert call_id is not None  # handles() said so
        if request.method not in ("GET", "HEAD"):
            return self.refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "method", request)
        if not self._authorized(request.headers.get("authorization")):
            refused = self.refuse(http.HTTPStatus.UNAUTHORIZED, "context_api_token", request)
            return HttpResponse(refused.status, refused.body, refused.content_type,
                                (("WWW-Authenticate", 'Bearer realm="streamsvc"'),))
        for session in self.live():
            if call_id in (session.call_sid, session.codec.correlation_id):
                return self._answer(call_id, CallContext(
                    dict(session.context), call_sid=session.call_sid,
                    updated_at=session.context_updated_at,
                    hand_offs=tuple(session.hand_offs)), request)
        found = self.store.read(call_id)
        if found is None or isinstance(found, CallContext):
            return self._answer(call_id, found, request)
        return self._answer_later(call_id, found, request)

    async def _answer_later(self, call_id: str, found: Awaitable[CallContext | None],
                            request: HttpRequest) -> HttpResponse:
        return self._answer(call_id, await found, request)

    def _answer(self, call_id: str, record: CallContext | None,
                request: HttpRequest) -> HttpResponse:
        if record is None:
            return self.refuse(http.HTTPStatus.NOT_FOUND, "unknown_call", request)
        updated = record.updated_at
        body = orjson.dumps({
            "call_sid": record.call_sid or call_id,
            "context": record.context or {},
            "hand_offs": list(record.hand_offs),
            "updated_at": None if updated is None else datetime.datetime.fromtimestamp(
                updated, datetime.UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
        }, default=str)
        logger.info("context_api.read", call_id=call_id, names=len(record.context or {}))
        return HttpResponse(http.HTTPStatus.OK, b"" if request.method == "HEAD" else body,
                            "application/json")

    def _authorized(self, authorization: str | None) -> bool:
        token = self.settings.context_api_token
        scheme, _, given = (authorization or "").strip().partition(" ")
        return (token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode(), token.encode()))


def _call_id(path: str) -> str | None:
    """The call id of ``/calls/<call id>/context``, or None for any other path."""
    if not (path.startswith(CONTEXT_PATH_PREFIX) and path.endswith(CONTEXT_PATH_SUFFIX)):
        return None
    call_id = unquote(path[len(CONTEXT_PATH_PREFIX):-len(CONTEXT_PATH_SUFFIX)])
    if not call_id or "/" in call_id or len(call_id) > MAX_CALL_ID_CHARS:
        return None
    return call_id
