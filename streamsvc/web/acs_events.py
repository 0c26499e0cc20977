"""The ACS side of contextual calling, on the stream port: Event Grid's IncomingCall in,
the call answered with media streaming to this service, its callbacks logged.

* ``POST {acs_events_path}`` (default ``/acs/events``) takes Event Grid deliveries (a JSON
  array). ``Microsoft.EventGrid.SubscriptionValidationEvent`` is answered with
  ``{"validationResponse": <validationCode>}``. ``Microsoft.Communication.IncomingCall``:
  its ``customContext`` (SIP ``X-MS-Custom-<Name>`` headers become ``<Name>``,
  ``User-To-User`` and VoIP headers keep their names), the caller's and callee's raw ids
  (``From``, ``To``) and ``CorrelationId`` go through the route's ``[routes.context]``
  mapping and budget, as the Twilio webhook's fields do; the result is stored under the
  call's correlation id, and the call is answered with the official SDK
  (``CallAutomationClient.answer_call``) with media streaming to ``public_url`` + the
  route's path. The media socket, arriving with ``x-ms-call-correlation-id``, gets that
  context as its ``custom_parameters``.
* ``POST {acs_callback_path}`` (default ``/acs/callbacks``) takes Call Automation's
  callbacks (``CallConnected``, ``MediaStreamingStarted/Stopped/Failed``,
  ``CallDisconnected``, ...), logged as ``acs.callback`` with the call's ids (failures as
  warnings) and counted.

Both paths are authenticated by a secret that the Event Grid subscription URL (and the
callback URL the service gives ACS) carries as ``?secret=...`` (``acs_events_secret``),
compared in constant time: wrong or missing, 403 and ``webhook.rejected``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, quote

import orjson
import structlog

from streamsvc.context.handoff import ACS_OPERATION_PREFIX
from streamsvc.context.store import CallContext, ContextStore
from streamsvc.context.twiml import SIP_HEADER_PREFIX, candidates, select_parameters
from streamsvc.providers.credentials import parse_connection_string
from streamsvc.web.webhooks import HttpRequest, HttpResponse, answer_when_written

if TYPE_CHECKING:
    from streamsvc.config import Route, Settings
    from streamsvc.fleet.node import FleetNode

__all__ = ["AcsEvents"]

logger = structlog.get_logger("streamsvc.acs")

VALIDATION_EVENT: Final = "Microsoft.EventGrid.SubscriptionValidationEvent"
INCOMING_CALL_EVENT: Final = "Microsoft.Communication.IncomingCall"
ACS_CUSTOM_PREFIX: Final = "X-MS-Custom-"
# A hand-off's transfer: its callbacks, and the hand-off's status they set.
TRANSFER_CALLBACKS: Final = {"CallTransferAccepted": "accepted", "CallTransferFailed": "failed"}
FAILED_CALLBACKS: Final = frozenset({"MediaStreamingFailed", "AnswerFailed", "CreateCallFailed",
                                     "PlayFailed", "RecognizeFailed"})
# Answers in flight at once (each a request to ACS in a thread); more are refused 503.
MAX_ANSWERS_IN_FLIGHT: Final = 64
# Event Grid's validation codes are GUIDs: anything longer is not one, and is not echoed.
MAX_VALIDATION_CODE: Final = 100


def _json(value: object, status: http.HTTPStatus = http.HTTPStatus.OK) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(value), "application/json")


class AcsEvents:
    """The ACS endpoints of one server (see the module docstring)."""

    def __init__(self, settings: Settings, store: ContextStore) -> None:
        self.settings = settings
        self.store = store
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.callbacks: collections.Counter[str] = collections.Counter()
        self.answers: set[asyncio.Future[None]] = set()
        self.fleet: FleetNode | None = None  # set by the server when redis_url is

    @property
    def paths(self) -> tuple[str, str]:
        return self.settings.acs_events_path, self.settings.acs_callback_path

    def respond(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """Answer one request on either path; never raises for bad input. In a fleet an
        IncomingCall is answered once its context is in Redis (bounded by
        ``redis_timeout_ms``)."""
        if request.method != "POST":
            return self._refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "method", request)
        if not self._secret_matches(request):
            return self._refuse(http.HTTPStatus.FORBIDDEN, "bad_secret", request)
        try:
            events = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self._refuse(http.HTTPStatus.BAD_REQUEST, "not_json", request)
        if isinstance(events, dict):
            events = [events]  # callbacks may come one at a time
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return self._refuse(http.HTTPStatus.BAD_REQUEST, "not_events", request)
        if request.path == self.settings.acs_callback_path:
            for event in events:
                self._callback(event)
            return HttpResponse(http.HTTPStatus.OK)
        writes: list[asyncio.Future[None] | None] = []
        validation: HttpResponse | None = None
        for event in events:
            kind = event.get("eventType")
            data = _object(event.get("data"))
            if kind == VALIDATION_EVENT and validation is None:
                code = data.get("validationCode")
                if not isinstance(code, str) or not 0 < len(code) <= MAX_VALIDATION_CODE:
                    return self._refuse(http.HTTPStatus.BAD_REQUEST, "bad_validation_code",
                                        request)
                self.outcomes["validated"] += 1
                logger.info("acs.subscription_validated")
                validation = _json({"validationResponse": code})
            elif kind == INCOMING_CALL_EVENT:  # every one of a delivery, after one too
                refused = self._incoming_call(data, request, writes)
                if refused is not None:
                    return refused
        return answer_when_written(self.store, writes,
                                   validation or HttpResponse(http.HTTPStatus.OK))

    def _secret_matches(self, request: HttpRequest) -> bool:
        expected = self.settings.acs_events_secret
        if not expected:
            return True
        given = dict(parse_qsl(request.query)).get("secret", "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def _refuse(self, status: http.HTTPStatus, reason: str,
                request: HttpRequest) -> HttpResponse:
        self.outcomes[reason] += 1
        logger.warning("webhook.rejected", reason=reason, status=int(status), path=request.path)
        return HttpResponse(status, f"{status.phrase}: {reason}\n".encode())

    # IncomingCall

    def _incoming_call(self, data: dict[str, Any], request: HttpRequest,
                       writes: list[asyncio.Future[None] | None]) -> HttpResponse | None:
        route = self.settings.acs_answer_route
        correlation_id = data.get("correlationId")
        incoming = data.get("incomingCallContext")
        if route is None or not isinstance(correlation_id, str) or not isinstance(incoming, str):
            return self._refuse(http.HTTPStatus.BAD_REQUEST, "not_an_incoming_call", request)
        fields = _context_fields(data)
        selection = select_parameters(fields, {}, route.context)
        # For the media socket, on whichever instance it lands (ACS carries no context on
        # the stream: it is looked up by the correlation id).
        written = self.store.put(correlation_id, CallContext(
            dict(candidates(fields, {}, route.context)), selection.parameters,
            selection.report()))
        writes.append(written)
        self.outcomes["incoming_call"] += 1
        self._emit(logger.info, "acs.incoming_call", correlation_id=correlation_id,
                   parameters=list(selection.parameters), path=route.path)
        if selection.over_budget:
            logger.warning("acs.parameters_over_budget", correlation_id=correlation_id,
                           **selection.report())
        if len(self.answers) >= MAX_ANSWERS_IN_FLIGHT:
            return self._refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, "busy", request)
        answer = asyncio.ensure_future(self._answer_after(written, incoming, route,
                                                          correlation_id))
        self.answers.add(answer)
        answer.add_done_callback(self.answers.discard)
        return None

    async def _answer_after(self, written: asyncio.Future[None] | None,
                            incoming_call_context: str, route: Route,
                            correlation_id: str) -> None:
        """Answer once the context store holds the call's context (in a fleet: bounded by
        ``redis_timeout_ms``): the media socket the answer brings, on any instance, then
        finds it."""
        if written is not None:
            await self.store.written(written)
        await asyncio.to_thread(self._answer, incoming_call_context, route, correlation_id)

    def _answer(self, incoming_call_context: str, route: Route, correlation_id: str) -> None:
        """Answer the call with media streaming to this service (runs in a thread: the SDK
        is synchronous). The SDK is imported here, on the first call: it is slow to import
        and only ACS deployments need it."""
        from azure.communication.callautomation import (
            CallAutomationClient,
            MediaStreamingOptions,
        )
        from azure.core.credentials import AzureKeyCredential
        from azure.core.exceptions import AzureError

        settings = self.settings
        ws_base, http_base = settings.public_base("ws"), settings.public_base("http")
        connection_string = settings.acs_connection_string
        if ws_base is None or http_base is None or not connection_string:
            logger.error("acs.answer_failed", correlation_id=correlation_id,
                         error="set STREAMSVC_PUBLIC_URL and ACS_CONNECTION_STRING to answer")
            return
        callback = http_base + settings.acs_callback_path
        if settings.acs_events_secret:
            callback += "?secret=" + quote(settings.acs_events_secret, safe="")
        options = MediaStreamingOptions(
            transport_url=ws_base + route.path, transport_type="websocket",
            content_type="audio", audio_channel_type="unmixed" if route.unmixed else "mixed",
            start_media_streaming=True, enable_bidirectional=route.bidirectional,
            audio_format="Pcm16KMono", enable_dtmf_tones=True)
        try:
            endpoint, access_key = parse_connection_string(connection_string)
            # The endpoint as written: the SDK's own parser would force https on it.
            client = CallAutomationClient(endpoint, AzureKeyCredential(access_key))
            answered = client.answer_call(incoming_call_context, callback,
                                          media_streaming=options)
        except (AzureError, ValueError) as exc:
            self.outcomes["answer_failed"] += 1
            logger.error("acs.answer_failed", correlation_id=correlation_id, error=str(exc))
            return
        self.outcomes["answered"] += 1
        logger.info("acs.answered", correlation_id=correlation_id,
                    call_connection_id=answered.call_connection_id)

    # Callbacks

    def _callback(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type") or event.get("eventType") or "")
        name = kind.rsplit(".", 1)[-1]
        data = _object(event.get("data"))
        self.callbacks[name if name else "other"] += 1
        failed = name in FAILED_CALLBACKS
        result = _object(data.get("resultInformation")) or None
        self._emit(logger.warning if failed else logger.info,
                   "acs.callback", callback=name, call_sid=data.get("callConnectionId"),
                   correlation_id=data.get("correlationId"),
                   server_call_id=data.get("serverCallId"), result=result)
        operation = data.get("operationContext")
        if (name in TRANSFER_CALLBACKS and isinstance(operation, str)
                and operation.startswith(ACS_OPERATION_PREFIX)
                and len(self.answers) < MAX_ANSWERS_IN_FLIGHT):
            # A hand-off's transfer: how it went joins the hand-off in the call's record.
            outcome = asyncio.ensure_future(self._transfer_outcome(
                operation[len(ACS_OPERATION_PREFIX):], TRANSFER_CALLBACKS[name], result))
            self.answers.add(outcome)
            outcome.add_done_callback(self.answers.discard)

    async def _transfer_outcome(self, call_id: str, status: str,
                                result: dict[str, Any] | None) -> None:
        """ACS said how a hand-off's transfer went: logged (``call.hand_off_progress``),
        published, and kept with the hand-off in the call's record."""
        self._emit(logger.info if status == "accepted" else logger.warning,
                   "call.hand_off_progress", call_sid=call_id, call_status=status,
                   result=result)
        found = self.store.read(call_id)
        record = found if found is None or isinstance(found, CallContext) else await found
        if record is None or not record.hand_offs:
            return
        *before, last = record.hand_offs
        progress = [*list(last.get("progress") or [])[-19:],
                    {"status": status, "at": time.time()}]
        written = self.store.put(call_id, dataclasses.replace(
            record, hand_offs=(*before, {**last, "status": status, "progress": progress})))
        if written is not None:
            await self.store.written(written)

    def _emit(self, log: Any, event: str, **fields: Any) -> None:
        """Log one line, and in a fleet put it on the events stream too."""
        log(event, **fields)
        if self.fleet is not None:
            self.fleet.publish(event, {"call_sid": None, "stream_sid": None} | fields)


def _context_fields(data: Mapping[str, Any]) -> dict[str, str]:
    """An IncomingCall's context as webhook fields the route's mapping understands: SIP
    ``X-MS-Custom-<Name>`` as the SIP header ``<Name>``, the rest under their own names."""
    fields: dict[str, str] = {}
    custom = _object(data.get("customContext"))
    sip, voip = _object(custom.get("sipHeaders")), _object(custom.get("voipHeaders"))
    for name, value in sip.items():
        name = str(name)
        if name.lower().startswith(ACS_CUSTOM_PREFIX.lower()):
            fields[SIP_HEADER_PREFIX + name[len(ACS_CUSTOM_PREFIX):]] = str(value)
        else:  # User-To-User, and whatever else an SBC passes
            fields[name] = str(value)
    for name, value in voip.items():
        fields[str(name)] = str(value)
    for field, key in (("From", "from"), ("To", "to")):
        party = data.get(key)
        if isinstance(party, dict) and isinstance(party.get("rawId"), str):
            fields[field] = party["rawId"]
    if isinstance(data.get("correlationId"), str):
        fields["CorrelationId"] = data["correlationId"]
    return fields


def _object(value: object) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (untrusted input)."""
    return value if isinstance(value, dict) else {}
