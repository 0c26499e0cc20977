"""The HTTP side of the service, on the stream port: the voice webhook that answers a call
with a stream to this service, in the route's provider's own form, and the stream status
callback.

* ``GET|POST {webhook_path}`` (default ``/twiml``) answers for the first route,
  ``{webhook_path}/<name>`` for the route at ``/<name>``, in the form the provider registry
  names for the route's provider:

  - Twilio: TwiML, ``<Connect><Stream>`` for a bidirectional route, ``<Start><Stream>``
    (then the route's follow-on TwiML) otherwise, with the call's context as
    ``<Parameter>``s chosen by the route's context mapping (:mod:`streamsvc.context.twiml`),
    the stream URL built from ``public_url`` and a status callback; signed requests
    (``X-Twilio-Signature``) when an auth token is set;
  - SignalWire: cXML, the same with ``authBearerToken`` when ``signalwire_token`` is set,
    answered only to requests signed with ``signalwire_signing_key``
    (``X-SignalWire-Signature``, Twilio's scheme), and refused when the token is set
    without the key (the cXML would hand the credential to anyone);
  - Telnyx: TeXML, the same verbs (``bidirectionalMode="rtp"`` on a bidirectional route);
    refused while ``telnyx_stream_token`` is set (a TeXML ``<Stream>`` cannot carry it:
    start such streams with Call Control's ``streaming_start``);
  - Plivo: ``<Stream>`` XML with the context as ``extraHeaders`` under Plivo's rules;
  - Exotel: the applet's dynamic endpoint, ``{"url": "wss://…/<route>?k=v"}``, at most 3
    context parameters and 256 characters; with ``exotel_basic_auth`` set only a request
    carrying that credential gets it back in the URL;
  - Vonage: the answer URL, answered with an NCCO ``connect`` (:mod:`streamsvc.web.ncco`);
  - ACS and ``auto`` routes: 404 with the reason (ACS answers through ``/acs/events``).
  (:mod:`streamsvc.web.answers` renders the Plivo and Exotel forms.)
* ``POST {status_callback_path}`` (default ``/stream-status``) takes Twilio's
  ``stream-started`` / ``stream-stopped`` / ``stream-error`` callbacks and logs them as
  ``stream.status`` with the stream's ids, so a failed handshake shows up next to its call.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlsplit

import orjson
import structlog

from streamsvc.context.handoff import BACK_TO_STREAM, MISSED
from streamsvc.context.store import CallContext, ContextStore, MemoryContextStore
from streamsvc.context.twiml import candidates, render_stream_twiml, select_parameters
from streamsvc.providers import provider
from streamsvc.providers.credentials import basic
from streamsvc.providers.signature import SIGNATURE_HEADER, signature_problem
from streamsvc.providers.vonage import jwt_problem as vonage_jwt_problem
from streamsvc.web.answers import exotel_endpoint, plivo_xml
from streamsvc.web.ncco import ANSWER_FIELDS, answer_fields, ncco
from streamsvc.web.ncco import MAX_HEADERS_BYTES as MAX_NCCO_HEADERS_BYTES

if TYPE_CHECKING:
    from streamsvc.config import Route, Settings
    from streamsvc.fleet.node import FleetNode
    from streamsvc.session import Session

__all__ = ["HttpRequest", "HttpResponse", "Webhooks", "answer_when_written"]

logger = structlog.get_logger("streamsvc.web.webhooks")

MAX_BODY_BYTES: Final = 64 * 1024  # Twilio's webhook bodies are a few kB
# <Connect> carries an action URL (on Twilio and SignalWire routes, and on every route in a
# fleet): the webhook URL with this query parameter.
ACTION_PARAMETER: Final = "streamsvc_action"
# The forms whose <Connect action> can answer a hand-off.
HAND_OFF_FORMS: Final = frozenset({"twiml", "cxml"})
# The other values of ACTION_PARAMETER: a hand-off's <Dial action> (the agent's leg ended)
# and its statusCallback (the agent's leg, as it goes).
DIAL_ACTION: Final = "dial"
HAND_OFF_STATUS: Final = "hand_off_status"
# Where a call updated through the REST API with url= fetches its hand-off's TwiML.
HAND_OFF_URL: Final = "hand_off"
DIAL_SIP_HEADER_PREFIX: Final = "DialSipHeader_X-"
# Reports of the agent's leg kept per hand-off (Twilio sends four).
MAX_HAND_OFF_PROGRESS: Final = 20
# Status callbacks whose log line waits for the registry at once (each bounded in time).
MAX_PENDING_STATUS: Final = 1000
# SignalWire signs its cXML requests as Twilio does, with the project's signing key.
SIGNALWIRE_SIGNATURE_HEADER: Final = "X-SignalWire-Signature"
# The answer request's own fields on Plivo and Exotel: not the call's context.
_PROVIDER_FIELDS: Final = frozenset({
    "CallUUID", "From", "To", "Direction", "CallStatus", "Event", "BillRate", "ParentAuthID",
    "RequestUUID", "CallSid", "CallFrom", "CallTo", "CallType", "DialWhomNumber",
    "CurrentTime", "StartTime", "flow_id", "tenant_id", "digits", ACTION_PARAMETER,
})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str  # path with its query, as requested
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: http.HTTPStatus
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()  # any beyond the content type and length

    def serialize(self) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        head = (f"HTTP/1.1 {self.status.value} {self.status.phrase}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
                f"{extra}Connection: close\r\n\r\n")
        return head.encode() + self.body


def answer_when_written(store: ContextStore, writes: list[asyncio.Future[None] | None],
                        response: HttpResponse) -> HttpResponse | Awaitable[HttpResponse]:
    """``response``, once the context store holds what ``writes`` wrote (in a fleet:
    bounded by ``redis_timeout_ms``), so that the stream the answer starts, on any
    instance, finds its context."""
    pending = [write for write in writes if write is not None]
    if not pending:
        return response

    async def answer() -> HttpResponse:
        await store.written(*pending)
        return response
    return answer()


class Webhooks:
    """The webhook endpoints of one server (see the module docstring)."""

    def __init__(self, settings: Settings, streams: Mapping[str, Session] | None = None,
                 store: ContextStore | None = None) -> None:
        self.settings = settings
        self.streams: Mapping[str, Session] = {} if streams is None else streams  # by sid
        # Where each answer leaves the call's context for its stream (the server's).
        self.store: ContextStore = store if store is not None else MemoryContextStore()
        self.status_callbacks: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()  # for the metrics
        self.fleet: FleetNode | None = None  # set by the server when redis_url is
        self._pending: set[asyncio.Task[None]] = set()

    def handles(self, path: str) -> bool:
        return self._route(path) is not None or path == self.settings.status_callback_path

    def _route(self, path: str) -> Route | None:
        prefix = self.settings.webhook_path
        if path == prefix:
            return self.settings.routes[0]
        if path.startswith(prefix + "/"):
            return self.settings.route_for(path[len(prefix):])
        return None

    def respond(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """Answer one request; never raises for bad input. A route's voice webhook answers
        in its provider's own form (the registry row's ``webhook``)."""
        if request.method not in ("GET", "POST"):
            return self.refuse(http.HTTPStatus.METHOD_NOT_ALLOWED, "method", request)
        route = self._route(request.path)
        form = provider(route.provider).webhook if route is not None else "twiml"
        if route is not None and form is None:
            # ACS answers through its Event Grid subscription; an auto route cannot know
            # whose form to answer in.
            reason = ("acs_answers_through_acs_events" if route.provider == "acs"
                      else "no_webhook_form_for_an_auto_route")
            return self.refuse(http.HTTPStatus.NOT_FOUND, reason, request)
        if route is not None and form == "ncco":
            return self._ncco(route, request)
        # Only what the signature covers is used: a POST's form fields, never a GET's body.
        body_fields = (parse_qsl(request.body.decode("utf-8", "replace"),
                                 keep_blank_values=True) if request.method == "POST" else [])
        query_fields = parse_qsl(request.query, keep_blank_values=True)
        problem = self._request_problem(form, request, body_fields)
        if problem is not None:
            return self.refuse(http.HTTPStatus.FORBIDDEN, problem, request)
        fields = dict(query_fields) | dict(body_fields)
        if route is None:
            return self._status(fields)  # handles() said so: the status callback
        query = dict(query_fields)
        if form in ("plivo", "exotel"):
            return self._answer(route, form, fields, query)
        action = query.get(ACTION_PARAMETER)
        if action == "connect":
            return self._connect_action(route, fields, form)
        if action == HAND_OFF_STATUS:
            return self._hand_off_status(fields)
        if action == DIAL_ACTION:
            return self._dial_ended(route, fields, form)
        if action == HAND_OFF_URL:
            return self._hand_off_url(fields)
        return self._twiml(route, fields, query, form)

    def _request_problem(self, form: str | None, request: HttpRequest,
                         body_fields: list[tuple[str, str]]) -> str | None:
        """Why the request is not the provider's own (its signature, or the credential the
        answer would carry), or None. Twilio's requests (and the status callbacks) are
        signed with the auth token; SignalWire's with the project's signing key, which is
        required for a cXML that carries ``signalwire_token``; Exotel's dynamic endpoint
        hands out ``exotel_basic_auth`` only to a request carrying it; a TeXML stream has no
        place for ``telnyx_stream_token``."""
        s = self.settings
        fields = body_fields if request.method == "POST" else ()
        if form == "twiml":
            return self._signature(request, SIGNATURE_HEADER, s.auth_tokens, fields)
        if form == "cxml":
            if s.signalwire_signing_key:
                return self._signature(request, SIGNALWIRE_SIGNATURE_HEADER,
                                       (s.signalwire_signing_key,), fields)
            return "no_signing_key_for_the_stream_token" if s.signalwire_token else None
        if form == "texml" and s.telnyx_stream_token:
            return "stream_token_not_in_texml"
        if form == "exotel" and s.exotel_basic_auth and not hmac.compare_digest(
                (basic(request.headers.get("authorization")) or "").encode(),
                s.exotel_basic_auth.encode()):
            return "missing_token" if not request.headers.get("authorization") else "bad_token"
        return None

    def _signature(self, request: HttpRequest, header: str, keys: tuple[str, ...],
                   fields: Iterable[tuple[str, str]]) -> str | None:
        """None when no key is set or the request is signed by one (Twilio's scheme, over
        the public URL with its query and the sorted POST fields); else the reason."""
        if not keys:
            return None
        base = self.settings.public_base("http")
        assert base is not None  # load_settings requires public_url with a token
        return signature_problem(request.headers.get(header.lower()), base + request.target,
                                 keys, fields)

    def _twiml(self, route: Route, fields: dict[str, str], query: dict[str, str],
               form: str | None = "twiml") -> HttpResponse | Awaitable[HttpResponse]:
        origin = self.settings.public_base("ws")
        http_origin = self.settings.public_base("http")
        if origin is None or http_origin is None:
            return self._no_public_url(route.provider)
        selection = select_parameters(fields, query, route.context)
        call_sid = fields.get("CallSid")
        written = None
        if call_sid:
            # The whole context, before the budget cut, for the stream (on any instance in
            # a fleet). Written before the answer goes out: the stream comes only after.
            written = self.store.put(call_sid, CallContext(
                dict(candidates(fields, query, route.context)), selection.parameters,
                selection.report()))
        self.outcomes["twiml_served"] += 1
        if selection.over_budget:
            self.outcomes["twiml_over_budget"] += 1
            logger.warning("twiml.parameters_over_budget", call_sid=call_sid,
                           **selection.report())
        document = self._render(route, selection.parameters, form)
        logger.info("twiml.served", call_sid=call_sid, path=route.path,
                    parameters=list(selection.parameters), form=form)
        return answer_when_written(self.store, [written], HttpResponse(
            http.HTTPStatus.OK, document.encode(), "application/xml"))

    def _no_public_url(self, provider: str) -> HttpResponse:
        self.outcomes["no_public_url"] += 1
        logger.error("twiml.no_public_url",
                     message=f"set STREAMSVC_PUBLIC_URL to the origin {provider} reaches")
        return HttpResponse(http.HTTPStatus.SERVICE_UNAVAILABLE, b"public_url is not set\n")

    def _answer(self, route: Route, form: str, fields: dict[str, str],
                query: dict[str, str]) -> HttpResponse | Awaitable[HttpResponse]:
        """Plivo's ``<Stream>`` XML or Exotel's dynamic endpoint (:mod:`streamsvc.web.answers`):
        the context is the answer URL's own query, then who called whom."""
        origin = self.settings.public_base("ws")
        if origin is None:
            return self._no_public_url(route.provider)
        own = sorted((k, v) for k, v in query.items() if k not in _PROVIDER_FIELDS)
        call_id = fields.get("CallUUID" if form == "plivo" else "CallSid")
        if form == "plivo":
            extra = [(k, fields[k]) for k in ("From", "To") if fields.get(k)]
            answer = plivo_xml(origin + route.path, dict([*own, *extra]),
                               bidirectional=route.bidirectional)
        else:
            answer = exotel_endpoint(origin + route.path, dict(own),
                                     credentials=self.settings.exotel_basic_auth)
        if answer.left_out:
            self.outcomes["twiml_over_budget"] += 1
            logger.warning("twiml.parameters_over_budget", call_sid=call_id, form=form,
                           dropped=list(answer.left_out))
        written = None
        if call_id:
            written = self.store.put(call_id, CallContext(dict(own), answer.parameters))
        self.outcomes["twiml_served"] += 1
        logger.info("twiml.served", call_sid=call_id, path=route.path,
                    parameters=list(answer.parameters), form=form)
        return answer_when_written(self.store, [written], HttpResponse(
            http.HTTPStatus.OK, answer.body, answer.content_type))

    def _render(self, route: Route, parameters: Mapping[str, str],
                form: str | None = "twiml") -> str:
        origin = self.settings.public_base("ws")
        http_origin = self.settings.public_base("http")
        assert origin is not None
        assert http_origin is not None
        action = None
        if route.bidirectional and (self.fleet is not None or form in HAND_OFF_FORMS):
            # Where Twilio goes when the <Connect> ends: a call handed off gets its
            # hand-off's TwiML there, a drained instance's call resumes (on any instance),
            # any other call gets the route's follow-on TwiML.
            action = (f"{http_origin}{self.settings.webhook_path}{route.path}"
                      f"?{ACTION_PARAMETER}=connect")
        extra: dict[str, str] = {}
        if form == "cxml" and self.settings.signalwire_token:
            extra["authBearerToken"] = self.settings.signalwire_token
        if form == "texml" and route.bidirectional:
            extra["bidirectionalMode"] = "rtp"
        return render_stream_twiml(
            origin + route.path, parameters, connect=route.bidirectional,
            track=route.stream_track, after=route.after_twiml,
            status_callback=http_origin + self.settings.status_callback_path,
            action=action, stream_attributes=extra,
        )

    async def _connect_action(self, route: Route, fields: dict[str, str],
                              form: str | None = "twiml") -> HttpResponse:
        """Twilio's request when a <Connect> ends: the hand-off's TwiML when the call was
        handed off; a fresh <Connect><Stream> with the same parameters when a draining
        instance handed the call over; else what follows."""
        call_sid = fields.get("CallSid")
        handed = await self._hand_off_answer(call_sid) if call_sid else None
        if handed is not None:
            return handed
        resume = (await self.fleet.resume_of(call_sid)
                  if call_sid and self.fleet is not None else None)
        if resume is None:
            self.outcomes["connect_action_ended"] += 1
            logger.info("twiml.connect_ended", call_sid=call_sid, path=route.path)
            after = route.after_twiml
            return HttpResponse(http.HTTPStatus.OK, (
                f'<?xml version="1.0" encoding="UTF-8"?><Response>{after}</Response>'
            ).encode(), "application/xml")
        self.outcomes["connect_resumed"] += 1
        document = self._render(route, resume.parameters, form)
        logger.info("twiml.resumed", call_sid=call_sid, path=route.path,
                    resumed_from=resume.resumed_from, parameters=list(resume.parameters))
        return HttpResponse(http.HTTPStatus.OK, document.encode(), "application/xml")

    async def _record(self, call_sid: str) -> CallContext | None:
        found = self.store.read(call_sid)
        return found if found is None or isinstance(found, CallContext) else await found

    async def _keep(self, call_sid: str, record: CallContext) -> None:
        written = self.store.put(call_sid, record)
        if written is not None:
            await self.store.written(written)

    async def _hand_off_status(self, fields: dict[str, str]) -> HttpResponse:
        """Twilio's report of the agent's leg (the hand-off's ``statusCallback``): logged as
        ``call.hand_off_progress``, published, and kept with the hand-off in the call's
        record (the context API lists it)."""
        call_sid = fields.get("ParentCallSid") or fields.get("CallSid") or ""
        progress = {"status": fields.get("CallStatus"), "agent_call_sid": fields.get("CallSid"),
                    "duration_s": fields.get("CallDuration"), "at": time.time()}
        line = {"call_sid": call_sid, "call_status": progress["status"],
                "agent_call_sid": progress["agent_call_sid"],
                "parent_call_sid": fields.get("ParentCallSid"),
                "call_duration": progress["duration_s"]}
        self.outcomes["hand_off_progress"] += 1
        logger.info("call.hand_off_progress", **line)
        if self.fleet is not None:
            self.fleet.publish("call.hand_off_progress", line)
        record = await self._record(call_sid) if call_sid else None
        if record is not None and record.hand_offs:
            *before, last = record.hand_offs
            kept = list(last.get("progress") or [])[-MAX_HAND_OFF_PROGRESS + 1:]
            last = {**last, "progress": [*kept, progress]}
            await self._keep(call_sid, dataclasses.replace(
                record, hand_offs=(*before, last)))
        return HttpResponse(http.HTTPStatus.NO_CONTENT)

    async def _dial_ended(self, route: Route, fields: dict[str, str],
                          form: str | None) -> HttpResponse:
        """The hand-off's ``<Dial action>``: the agent's leg ended. ``DialSipHeader_X-*``
        fields join the call's context; a missed agent (``no-answer``, ``busy``,
        ``failed``, ``canceled``) leaves what the route's ``on_no_answer`` says: back to
        the route's stream (the call's context, and ``hand_off_status``, go with it) or the
        route's own TwiML; else the call ends."""
        call_sid = fields.get("CallSid") or ""
        status = fields.get("DialCallStatus", "")
        record = await self._record(call_sid) if call_sid else None
        learned = {f"sip_{name[len(DIAL_SIP_HEADER_PREFIX):]}": value
                   for name, value in fields.items()
                   if name.startswith(DIAL_SIP_HEADER_PREFIX)}
        missed = status in MISSED
        after = route.handoff.on_no_answer
        goes = ("stream" if after == BACK_TO_STREAM else "twiml") if missed else "ends"
        if record is not None:
            context = {**(record.context or {}), **learned}
            if missed:
                context["hand_off_status"] = status
            hand_offs = record.hand_offs
            if hand_offs:
                *before, last = hand_offs
                hand_offs = (*before, {**last, "dial_status": status})
            await self._keep(call_sid, dataclasses.replace(
                record, context=context, hand_offs=hand_offs, updated_at=time.time()))
        self.outcomes[f"hand_off_{'missed' if missed else 'ended'}"] += 1
        logger.info("call.hand_off_ended", call_sid=call_sid, dial_status=status,
                    next=goes, learned=sorted(learned))
        if goes == "stream":
            parameters = dict(record.parameters or {}) if record is not None else {}
            parameters["hand_off_status"] = status
            document = self._render(route, parameters, form)
        else:
            verbs = after if goes == "twiml" else ""
            document = f'<?xml version="1.0" encoding="UTF-8"?><Response>{verbs}</Response>'
        return HttpResponse(http.HTTPStatus.OK, document.encode(), "application/xml")

    async def _hand_off_url(self, fields: dict[str, str]) -> HttpResponse:
        """The TwiML a call updated with ``url=`` fetches: its pending hand-off's (the call
        goes on with nothing when there is none: it was answered already)."""
        call_sid = fields.get("CallSid")
        handed = await self._hand_off_answer(call_sid) if call_sid else None
        return handed or HttpResponse(
            http.HTTPStatus.OK, b'<?xml version="1.0" encoding="UTF-8"?><Response/>',
            "application/xml")

    async def _hand_off_answer(self, call_sid: str) -> HttpResponse | None:
        """The TwiML of the call's pending hand-off (then marked answered), or None."""
        record = await self._record(call_sid)
        if record is None:
            return None
        pending = [entry for entry in record.hand_offs if entry.get("status") == "pending"]
        if not pending or not isinstance(pending[-1].get("twiml"), str):
            return None
        entry = pending[-1]
        answered = tuple({**e, "status": "answered"} if e is entry else e
                         for e in record.hand_offs)
        await self._keep(call_sid, dataclasses.replace(record, hand_offs=answered))
        self.outcomes["hand_off_served"] += 1
        logger.info("twiml.hand_off_served", call_sid=call_sid, target=entry.get("target"),
                    sent=list(dict(entry.get("sent") or {})))
        return HttpResponse(http.HTTPStatus.OK, str(entry["twiml"]).encode(),
                            "application/xml")

    def _ncco(self, route: Route,
              request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        """Vonage's answer URL: an NCCO connecting the call to the route
        (:mod:`streamsvc.web.ncco`)."""
        settings = self.settings
        secret = settings.vonage_signature_secret
        if secret and (problem := vonage_jwt_problem(
                secret, request.headers.get("authorization"),
                application_id=settings.vonage_application_id)):
            return self.refuse(http.HTTPStatus.FORBIDDEN, problem, request)
        if settings.vonage_token and not secret:
            # The NCCO would carry the stream credential to whoever asks: only a request
            # Vonage signed (vonage_signature_secret) may get one.
            return self.refuse(http.HTTPStatus.FORBIDDEN, "unsigned_answer_request", request)
        origin = settings.public_base("ws")
        if origin is None:
            return self._no_public_url("Vonage")
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        fields = answer_fields(query, request.body, request.method)
        # Vonage signs the upgrade with the same secret: no credential in the NCCO at all.
        authorization = {"type": "vonage"} if secret else None
        document, left_out = ncco(origin + route.path, fields, query,
                                  authorization=authorization)
        headers = document[0]["endpoint"][0]["headers"]
        call_uuid = fields.get("uuid")
        if left_out:
            self.outcomes["twiml_over_budget"] += 1
            logger.warning("ncco.headers_over_budget", call_sid=call_uuid, left_out=left_out,
                           budget_bytes=MAX_NCCO_HEADERS_BYTES)
        written = None
        if call_uuid:
            context = {k: v for k, v in query.items() if k not in ANSWER_FIELDS}
            written = self.store.put(call_uuid, CallContext({**context, **headers}, headers))
        self.outcomes["twiml_served"] += 1
        logger.info("ncco.served", call_sid=call_uuid, path=route.path,
                    parameters=list(headers))
        return answer_when_written(self.store, [written], HttpResponse(
            http.HTTPStatus.OK, orjson.dumps(document), "application/json"))

    def _status(self, fields: dict[str, str]) -> HttpResponse:
        event = fields.get("StreamEvent", "")
        known = event in ("stream-started", "stream-stopped", "stream-error")
        self.status_callbacks[event if known else "other"] += 1
        stream_sid = fields.get("StreamSid")
        session = self.streams.get(stream_sid) if stream_sid else None
        # The same call_sid/stream_sid (and path, while the stream is live) as the stream's
        # own lines, so a handshake Twilio could not complete shows up beside its call.
        line: dict[str, object] = {
            "stream_event": event, "stream_sid": stream_sid,
            "call_sid": fields.get("CallSid"), "stream_name": fields.get("StreamName"),
            "stream_error": fields.get("StreamError"),
            # "timestamp" is the log line's own: Twilio's is kept beside it.
            "twilio_timestamp": fields.get("Timestamp"),
            "live": session is not None,
            "path": session.path if session is not None else None}
        fleet = self.fleet
        if (session is None and stream_sid and fleet is not None
                and len(self._pending) < MAX_PENDING_STATUS):
            # Live on another instance? The answer goes out now; the line once the
            # registry has answered (within redis_timeout_ms).
            task = asyncio.get_running_loop().create_task(
                self._log_status_from_registry(line, stream_sid, fleet))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            self._log_status(line)
        return HttpResponse(http.HTTPStatus.NO_CONTENT)

    async def _log_status_from_registry(self, line: dict[str, object], stream_sid: str,
                                        fleet: FleetNode) -> None:
        entry = await fleet.live_stream(stream_sid)
        if entry is not None:
            line.update(live=True, path=entry.get("path"), instance=entry.get("instance"))
        self._log_status(line)

    def _log_status(self, line: dict[str, object]) -> None:
        log = logger.warning if line["stream_event"] == "stream-error" else logger.info
        log("stream.status", **line)
        if self.fleet is not None:
            self.fleet.publish("stream.status", line)

    def refuse(self, status: http.HTTPStatus, reason: str, request: HttpRequest) -> HttpResponse:
        """Answer ``status``, logged as ``webhook.rejected`` and counted by ``reason``."""
        self.outcomes[reason] += 1
        logger.warning("webhook.rejected", reason=reason, status=int(status), path=request.path)
        return HttpResponse(status, f"{status.phrase}: {reason}\n".encode())
