"""What one stream connection does, whatever transport carries its frames.

:class:`CallCore` feeds each message to the stream's :class:`~streamsvc.live.LiveSession`
and the route's handler chain, logs the start and the summary, and hands what the session
queues to the transport. A transport shell (:mod:`streamsvc.server.transports`) subclasses it with
its own ``send_now``, ``outbound_full`` and timers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final
from urllib.parse import quote

import msgspec
import structlog

from streamsvc import wire
from streamsvc.chain import HandlerChain
from streamsvc.context.handoff import (
    HandOffPlan,
    HeaderPlan,
    parse_target,
    plan_acs_headers,
    plan_output_variables,
    plan_sip_headers,
    plan_twiml,
)
from streamsvc.context.store import CallContext
from streamsvc.exceptions import (
    CLOSE_POLICY_VIOLATION,
    HANDED_OFF_REASON,
    LocalProtocolError,
    RemoteProtocolError,
)
from streamsvc.fleet.audio import AudioBatcher
from streamsvc.handlers import RawFrame
from streamsvc.live import HandOffResult, LiveSession
from streamsvc.providers import AUTO, CodecOptions
from streamsvc.providers.acs import AcsCodec
from streamsvc.providers.auto import provider_from_message
from streamsvc.server.admission import Admitted
from streamsvc.server.host import CallHost
from streamsvc.session import BadFrame, State, StopReason, parameters_size
from streamsvc.transfer import TransferError
from streamsvc.transfer import acs as acs_transfer
from streamsvc.transfer import telnyx as telnyx_transfer
from streamsvc.transfer import twilio as twilio_rest
from streamsvc.transfer import vonage as vonage_transfer
from streamsvc.web.webhooks import ACTION_PARAMETER, DIAL_ACTION, HAND_OFF_STATUS, HAND_OFF_URL

__all__ = ["CLOSE_GRACE_S", "CallCore"]

logger = structlog.get_logger("streamsvc.server")

# Events held for the handlers while a fleet looks up the call's context (bounded by
# redis_timeout_ms: 1 s at most, 100 frames of two tracks).
MAX_HELD_EVENTS: Final = 1000
# DTMF and mark entries one call may put on the fleet's events stream (as the log handler
# caps its lines): a flood of digits costs its own call entries, never another call's.
MAX_CALL_EVENTS_PUBLISHED: Final = 1000
# Providers whose transfers carry no context: their agents read it from the context API.
NO_HAND_OFF_CHANNEL: Final = frozenset({"plivo", "exotel", "asterisk", "jambonz"})
# How a hand-off is carried: the <Connect action>'s answer, or the call's update through
# the REST API (<Start> routes), inline up to twiml_chars, else by url= (fetched whole).
CONNECT_ACTION: Final = "connect_action"
CALL_UPDATE: Final = "call_update"
ACS_TRANSFER: Final = "acs_transfer"
TELNYX_TRANSFER: Final = "telnyx_transfer"
VONAGE_TRANSFER: Final = "vonage_transfer"
TRANSFERS: Final = frozenset({ACS_TRANSFER, TELNYX_TRANSFER, VONAGE_TRANSFER})
# Genesys: the disconnect's outputVariables carry the hand-off to the Architect flow.
GENESYS_DISCONNECT: Final = "genesys_disconnect"
# Hand-offs that end the stream when carried (the summary's reason is then handed_off).
ENDS_STREAM: Final = frozenset({CONNECT_ACTION, GENESYS_DISCONNECT})
# After asking the platform to end the call (Genesys's disconnect), how long it has to
# close the session before the service closes the connection itself.
END_GRACE_S: Final = 5.0
# How long a probe (Genesys's check that the service answers) may stay open once answered.
PROBE_GRACE_S: Final = 2.0
# Protocol messages a codec answered itself logged per call (Genesys's paused, error...).
NOTED_LOGGED: Final = 100
MAX_FETCHED_TWIML_CHARS: Final = 64 * 1024
# Context updates logged per call (the rest counted in stream.stopped's context_updates),
# and how often a call's record is written to the context store at most.
CONTEXT_UPDATES_LOGGED: Final = 100
CONTEXT_WRITE_INTERVAL_S: Final = 0.2
# Bad frames logged individually per call; the rest are only counted.
BAD_FRAMES_LOGGED: Final = 5
# Frames before `start` kept for handlers that record raw frames (connected, start, a few
# bad ones); later ones are not kept: the start timeout bounds how many can come.
EARLY_FRAMES_KEPT: Final = 16
# Bad frames before a valid start after which none is expected any more (a provider sends
# its start first, or after one or two greetings): the stream is closed (1008) instead of
# waiting for start_timeout_s, so that its sender learns at once (replay --check).
MAX_BAD_FRAMES_BEFORE_START: Final = 20
# How long a connection the service closes gets (to flush, to answer the close handshake)
# before the TCP connection is dropped.
CLOSE_GRACE_S: Final = 1.0
# What is left of a drain's time at the very end, for the summaries to be logged.
SHUTDOWN_CLOSE_S: Final = 0.25


class CallCore:
    """What one stream connection does whatever carries its frames: feeds them to the
    session and the route's handler chain, logs the start and the summary. A transport
    shell calls :meth:`receive` per message, sends what :meth:`take_outbound` yields (after
    :meth:`wake`), and awaits :meth:`finish` once when the connection ends."""

    __slots__ = (
        "__weakref__",
        "_admitted_as",
        "_audio",
        "_context_write",
        "_context_written_at",
        "_end_timer",
        "_handing_off",
        "_held",
        "_idle_seen",
        "_noted",
        "_on_media",
        "_quiet_since",
        "_raw_wanted",
        "_starting",
        "address",
        "awaiting_start",
        "chain",
        "connected_at",
        "context_budget",
        "context_updates",
        "early_frames",
        "events_not_published",
        "events_published",
        "frames_received",
        "hand_off_entry",
        "idle_closed",
        "moved",
        "outbound_dropped",
        "refused",
        "route",
        "server",
        "session",
    )

    def __init__(self, server: CallHost, admitted: Admitted) -> None:
        self.server = server
        self.route = route = admitted.route
        settings = server.settings
        options = CodecOptions(unmixed=route.unmixed,
                               l16_little_endian=settings.signalwire_l16_little_endian,
                               channels=route.channels_for(),
                               streaming=route.bidirectional_streaming)
        self.session = LiveSession(
            wake=self._flush,
            context_updated=self._context_updated,
            context_max_bytes=settings.context_max_bytes,
            hand_off=self._hand_off,
            end_call=self._end_call,
            path=route.path,
            bidirectional=route.bidirectional,
            parameter_budget_bytes=settings.parameter_budget_bytes,
            codec=admitted.provider.codec(admitted.upgrade, options),
        )
        self.chain = HandlerChain(route.handlers, observe=server.metrics.observe_latency)
        # On an auto route, the provider whose credential admitted the upgrade: a stream in
        # another provider's format is refused (stream.provider_mismatch).
        self._admitted_as = (admitted.provider.name if route.provider == AUTO.name
                             and admitted.provider is not AUTO else None)
        # Counted apart from calls until its start comes (max_pending_starts), and per
        # client address (max_streams_per_address); :meth:`closed` gives both back.
        self.address = admitted.address
        self.awaiting_start = True
        server.pending[self] = time.monotonic()
        if self.address is not None:
            server.streams_per_address[self.address] += 1
        self.connected_at = time.monotonic()
        self.early_frames: list[RawFrame] = []
        self.frames_received = 0  # read by the idle watchdog
        self.outbound_dropped = 0  # frames for a peer that stopped reading
        self.events_published = 0  # DTMF and mark entries put on the fleet's bus
        self.events_not_published = 0  # past MAX_CALL_EVENTS_PUBLISHED
        self.idle_closed = False
        self._idle_seen = -1  # frames_received at the watchdog's last look
        self._quiet_since = self.connected_at
        # The budget report of the webhook that started this call's stream, if it was ours.
        self.context_budget: dict[str, object] | None = None
        self._raw_wanted = False  # set at start: whether a handler takes raw frames
        self._on_media: Callable[[wire.Media], None] = _ignore  # set at start
        # In a fleet: what waits for the context lookup, the lookup, published audio.
        self._held: list[wire.Event] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._audio: AudioBatcher | None = None
        self.moved = False  # closed by a drain for another instance to resume
        # Handlers' context updates: how many, and the store write that keeps them.
        self.context_updates = 0
        self.hand_off_entry: dict[str, object] | None = None  # this call's hand-off
        self._handing_off: asyncio.Task[None] | None = None
        self._context_write: asyncio.TimerHandle | None = None
        self._context_written_at = -CONTEXT_WRITE_INTERVAL_S
        self.refused: str | None = None  # why a stream that sent start was closed at once
        self._noted = 0  # protocol messages logged (NOTED_LOGGED)
        self._end_timer: asyncio.TimerHandle | None = None  # hang_up's fallback close

    def outbound_full(self) -> bool:
        """True when the peer has stopped reading: frames to send are refused."""
        raise NotImplementedError

    @property
    def idle_check_s(self) -> float:
        """How often a shell's watchdog should call :meth:`went_idle`."""
        return min(self.server.settings.idle_timeout_s / 4, 1.0)

    def went_idle(self) -> bool:
        """True (and logged) once no frame has come for ``idle_timeout_s``: a half-open
        peer, since Twilio sends a frame every 20 ms. Compares a counter; costs nothing per
        frame."""
        now = time.monotonic()
        if self.frames_received != self._idle_seen:
            self._idle_seen, self._quiet_since = self.frames_received, now
            return False
        limit = self.server.settings.idle_timeout_s
        if now - self._quiet_since < limit:
            return False
        self.idle_closed = True
        logger.warning("stream.idle_timeout", timeout_s=limit)
        return True

    def log_start_timeout(self) -> None:
        logger.warning("stream.start_timeout", timeout_s=self.server.settings.start_timeout_s,
                       bad_frames=self.session.bad_frames)

    def no_start_coming(self) -> str | None:
        """The close reason when :data:`MAX_BAD_FRAMES_BEFORE_START` frames came and none
        was a start this route's provider can read (logged as ``stream.no_start``), or
        None."""
        session = self.session
        if self.refused == "provider_mismatch" and session.state is State.AWAITING_START:
            return (f"provider_mismatch: a {self._admitted_as} credential admitted a stream "
                    "in another provider's format")
        if (session.state is not State.AWAITING_START
                or session.bad_frames < MAX_BAD_FRAMES_BEFORE_START):
            return None
        provider = self.route.provider
        logger.warning("stream.no_start", bad_frames=session.bad_frames, provider=provider)
        return f"no start message: {session.bad_frames} frames a {provider} route cannot read"

    def _check_format(self, frame: bytes) -> None:
        """On an auto route: a frame this stream's codec cannot read, in the format of a
        provider other than the one whose credential admitted the upgrade, refuses the
        stream (:meth:`no_start_coming` says so)."""
        admitted = self._admitted_as
        try:
            told = provider_from_message(frame, bearer=True)
        except RemoteProtocolError:
            return
        if told == "signalwire" and admitted in ("twilio", "signalwire"):
            return  # Twilio's protocol, which both speak
        if told != admitted:
            self.refused = "provider_mismatch"
            self.server.metrics.streams_refused[self.refused] += 1
            logger.warning("stream.provider_mismatch", admitted_as=admitted,
                           stream_format="twilio or signalwire" if told == "signalwire"
                           else told, route_provider=self.route.provider)

    def log_closed_before_start(self, reason: StopReason) -> None:
        codec = self.session.codec
        if codec.is_probe:  # the platform's check that the service answers: not a call
            logger.info(f"{codec.provider}.probe_closed", reason=reason)
            return
        logger.info("stream.closed_before_start", reason=reason,
                    bad_frames=self.session.bad_frames)

    def send_now(self, frame: bytes) -> None:
        """Hand one outbound message to the transport without blocking: a binary frame when
        it is a :class:`~streamsvc.wire.BinaryFrame`, else a text frame."""
        raise NotImplementedError

    def _now_ms(self) -> float:
        return (time.monotonic() - self.connected_at) * 1000

    def receive(self, frame: bytes, binary: bool = False) -> None:
        """Take one inbound message (the transport's callback calls this per message;
        ``binary``: it came as a binary frame)."""
        session = self.session
        if session.state is State.STREAMING and not self._raw_wanted and self._held is None:
            # The hot path: one media frame from parse to handlers, no event list.
            media = session.receive_media(frame, binary)
            if media is not None:
                self._on_media(media)
                if session.bidirectional:
                    self._flush_quietly()
                return
        else:
            if session.state is State.AWAITING_START:
                if len(self.early_frames) < EARLY_FRAMES_KEPT:
                    self.early_frames.append(RawFrame(self._now_ms(), frame, binary=binary))
            elif self._held is not None:  # a fleet looks up the context: frames wait
                if len(self.early_frames) < EARLY_FRAMES_KEPT + MAX_HELD_EVENTS:
                    self.early_frames.append(RawFrame(self._now_ms(), frame, binary=binary))
            elif self._raw_wanted:
                self.chain.on_raw_frame(RawFrame(self._now_ms(), frame, binary=binary))
            session.receive_message(frame, binary)
        for event in session.events_received():
            if type(event) is wire.Media:
                self._on_media(event)
            elif isinstance(event, BadFrame):
                self._log_bad_frame(event)
                if self._admitted_as is not None and self.refused is None:
                    self._check_format(frame)
            elif isinstance(event, wire.Start):
                self._begin()
            elif type(event) is wire.Noted:
                if event.log:
                    self._log_noted(event)
            else:
                if isinstance(event, wire.Mark):
                    session.mark_echoed(event.name)
                    self._publish_frame_rate("call.mark", name=event.name[:200])
                elif isinstance(event, wire.Dtmf):
                    self._publish_frame_rate("call.dtmf", digit=event.digit, track=event.track)
                if self._held is None:
                    self.chain.dispatch(event)
                elif len(self._held) < MAX_HELD_EVENTS:
                    self._held.append(event)
        if session.has_data_to_send():
            self._flush_quietly()
        if session.state is State.AWAITING_START:
            self._before_start()

    def _log_noted(self, event: wire.Noted) -> None:
        """A protocol message the codec answered, logged as ``<provider>.<name>`` (the
        first :data:`NOTED_LOGGED` a call)."""
        self._noted += 1
        if self._noted <= NOTED_LOGGED:
            log = logger.warning if event.level == "warning" else logger.info
            log(f"{self.session.codec.provider}.{event.name}", **event.fields)

    def _before_start(self) -> None:
        """What a codec decided before any start: a refusal (its answer already sent), or
        a probe whose protocol is over (the connection closes normally)."""
        codec = self.session.codec
        refusal = codec.refusal
        if refusal is not None and self.refused is None:
            self.refused = refusal
            self.server.metrics.streams_refused[refusal] += 1
            logger.warning("stream.refused", reason=refusal, provider=codec.provider)
            self.close_for_policy(f"{refusal}: refused before its start")
        elif codec.finished and self.refused is None:
            self.refused = "probe" if codec.is_probe else "ended"
            self._no_longer_pending()
            self.end_stream("session closed", "closed")
        elif codec.is_probe and self._end_timer is None:
            # Answered; a platform that does not close its probe has it closed for it.
            self._no_longer_pending()
            self._end_timer = asyncio.get_running_loop().call_later(
                PROBE_GRACE_S, self.end_stream, "probe answered", "closed")

    def _end_call(self) -> None:
        """:meth:`LiveSession.hang_up`: ask the platform to end the call (Genesys's
        ``disconnect``, reason ``completed``); the platform then closes the stream, or the
        service does after :data:`END_GRACE_S`."""
        session = self.session
        if session.state is not State.STREAMING:
            raise LocalProtocolError(f"cannot hang up while {session.state.value}")
        if not session.send_end("completed", None):
            raise LocalProtocolError(
                f"{session.codec.provider} streams have no message that ends the call: end "
                "it through the provider's API or its flow")
        self._flush()
        self._close_later()

    def _close_later(self) -> None:
        if self._end_timer is None:
            self._end_timer = asyncio.get_running_loop().call_later(
                END_GRACE_S, self.end_stream, "call ended", "closed")

    def _begin(self) -> None:
        """``start`` came: bind the call's ids into this connection's log lines, then start
        the handlers, at once or (in a fleet) once the call's context is looked up and its
        stream id claimed. A stream whose id a live stream already has (here or on another
        instance of the fleet) is refused: the first keeps it, and its talk-back."""
        session = self.session
        structlog.contextvars.bind_contextvars(
            call_sid=session.call_sid, stream_sid=session.stream_sid
        )
        self._no_longer_pending()
        assert session.stream_sid is not None  # set by start
        if self.refused is not None:  # a frame in another provider's format came first
            self._held, self._on_media = [], _ignore
            self.close_for_policy(f"{self.refused}: refused before its start")
            return
        expected = self.server.settings.twilio_account_sid
        if (expected and session.codec.provider == "twilio"
                and session.account_sid != expected):
            # A signature covers the URL, not the start: a captured upgrade must not carry
            # another account's call.
            logger.warning("stream.account_mismatch", account_sid=session.account_sid,
                           expected=expected)
            self._refuse("account_mismatch", "the start names another account")
            return
        if session.stream_sid in self.server.streams:
            self._refuse_duplicate("this instance")
            return
        self.server.streams[session.stream_sid] = session
        found = self.server.contexts.look_up(session.codec.correlation_id or session.call_sid,
                                             session.call_sid)
        fleet = self.server.fleet
        if fleet is None and isinstance(found, CallContext):  # this process's store
            self._started(found)
            return
        # A shared store: until it answers (within redis_timeout_ms) what handlers would
        # get waits.
        self._held = []
        self._on_media = self._hold_media
        self._starting = asyncio.get_running_loop().create_task(self._look_up(found))

    async def _look_up(self, found: Awaitable[CallContext] | CallContext) -> None:
        session = self.session
        fleet = self.server.fleet
        if fleet is not None:
            owner, lookup = await asyncio.gather(fleet.claim(session, time.time()),
                                                 _ready(found))
            if owner is not None:
                self._refuse_duplicate(owner)
                return
        else:
            lookup = await _ready(found)
        self._started(lookup)
        held, self._held = self._held or [], None
        for event in held:
            if type(event) is wire.Media:
                self._on_media(event)
            else:
                self.chain.dispatch(event)
        if session.bidirectional:
            self._flush_quietly()

    def _refuse_duplicate(self, owner: str) -> None:
        """A live stream (on ``owner``) has this stream's id: refused, logged
        ``stream.duplicate_stream_sid``."""
        fleet = self.server.fleet
        logger.warning("stream.duplicate_stream_sid", owner=owner,
                       claimant=fleet.instance if fleet is not None else "this instance",
                       refused="claimant")
        self._refuse("duplicate_stream_sid", "a live stream has this stream id")

    def _refuse(self, reason: str, why: str) -> None:
        """Close a stream that sent its start (1008, ``reason: why``) before any handler
        sees it, counted by ``reason``."""
        self.refused = reason
        self._held = []  # what still comes is dropped (bounded), never dispatched
        self._on_media = _ignore
        self.server.metrics.streams_refused[reason] += 1
        self.close_for_policy(f"{reason}: {why}")

    def _no_longer_pending(self) -> None:
        if self.awaiting_start:
            self.awaiting_start = False
            self.server.pending.pop(self, None)

    def evict(self, reason: str) -> None:
        """Close a connection that has not started (1008 with ``reason``), logged as
        ``stream.evicted``: its place is needed (``max_pending_starts``)."""
        logger.warning("stream.evicted", reason=reason, bad_frames=self.session.bad_frames)
        self.close_for_policy(reason)

    def close_with(self, code: int, reason: str, why: StopReason) -> None:
        """Close the connection with ``code`` and ``reason``; ``why`` is the summary's
        reason. A shell that closes every way alike implements this and inherits the four
        below; the others override those."""
        raise NotImplementedError

    def close_for_policy(self, reason: str) -> None:
        """Close the connection with 1008 and ``reason`` (the transport's own way)."""
        self.close_with(CLOSE_POLICY_VIOLATION, reason, "error")

    def close_for_shutdown(self) -> None:
        """Close the connection with 1001: the server is stopping."""
        self.close_with(1001, "server shutting down", "shutdown")

    def closed(self) -> None:
        """The connection is over (the transport calls this once, started or not)."""
        self._no_longer_pending()
        if self._end_timer is not None:
            self._end_timer.cancel()
        address = self.address
        if address is not None:
            self.address = None
            counts = self.server.streams_per_address
            counts[address] -= 1
            if counts[address] <= 0:
                del counts[address]
        # The session's callbacks are this call's methods: without them the ended call is
        # freed by reference counting, not left for a full collection (a loop stall).
        self.session.release()

    def _hold_media(self, media: wire.Media) -> None:
        if self._held is not None and len(self._held) < MAX_HELD_EVENTS:
            self._held.append(media)

    def _context_updated(self, names: Sequence[str]) -> None:
        """A handler added to the call's context: logged (names only; the first
        :data:`CONTEXT_UPDATES_LOGGED` a call), published, and kept in the context store
        (at most one write each :data:`CONTEXT_WRITE_INTERVAL_S`: a handler updating on
        every frame costs the store nothing more)."""
        self.context_updates += 1
        if self.context_updates <= CONTEXT_UPDATES_LOGGED:
            logger.info("call.context_updated", names=sorted(names)[:50],
                        context_bytes=parameters_size(self.session.context),
                        last_logged=self.context_updates == CONTEXT_UPDATES_LOGGED)
        self._publish_frame_rate("call.context_updated", names=sorted(names)[:50])
        if self._context_write is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._context_written_at + CONTEXT_WRITE_INTERVAL_S - loop.time())
            self._context_write = loop.call_later(delay, self._store_context)

    def _store_context(self) -> asyncio.Future[None] | None:
        """Write the call's record as it is now to the context store (the future: done once
        every instance can read it)."""
        if self._context_write is not None:
            self._context_write.cancel()
            self._context_write = None
        self._context_written_at = asyncio.get_running_loop().time()
        session = self.session
        call_id = session.codec.correlation_id or session.call_sid
        if call_id is None:
            return None
        return self.server.contexts.put(call_id, CallContext(
            dict(session.context), dict(session.custom_parameters), self.context_budget,
            call_sid=session.call_sid, updated_at=session.context_updated_at,
            hand_offs=tuple(session.hand_offs)))

    def _hand_off(self, to: str,
                  parameters: Mapping[str, str]) -> asyncio.Future[HandOffResult]:
        """:meth:`LiveSession.hand_off`: on a Twilio or SignalWire ``<Connect>`` route the
        hand-off's TwiML is kept in the call's record, the stream closes, and the
        ``<Connect action>`` request (on any instance) is answered with it."""
        session = self.session
        provider = session.codec.provider
        if self.hand_off_entry is not None:
            raise LocalProtocolError("the call is already handed off")
        if provider in NO_HAND_OFF_CHANNEL:
            raise LocalProtocolError(
                f"{provider} carries no context on a transfer: hand the call off in the "
                "provider's own flow, and let the agent's app read the context at "
                "GET /calls/<call id>/context")
        settings = self.server.settings
        if session.bidirectional and provider in ("twilio", "signalwire"):
            mechanism = CONNECT_ACTION
        elif provider == "twilio":
            mechanism = CALL_UPDATE
            missing = twilio_rest.configured(settings)
            if missing is not None:
                raise LocalProtocolError(
                    "a hand-off on a <Start> route updates the call through Twilio's REST "
                    f"API: set {missing}")
        elif provider == "telnyx":
            mechanism = TELNYX_TRANSFER
            if not settings.telnyx_api_key:
                raise LocalProtocolError("a Telnyx call is transferred through Call Control: "
                                         "set telnyx_api_key")
        elif provider == "vonage":
            mechanism = VONAGE_TRANSFER
            missing = vonage_transfer.configured(settings)
            if missing is not None:
                raise LocalProtocolError("a Vonage call is transferred through the Voice API: "
                                         f"set {missing}")
        elif provider == "genesys":
            mechanism = GENESYS_DISCONNECT
            if not session.bidirectional:
                raise LocalProtocolError(
                    "a Genesys hand-off ends an Audio Connector session (a bidirectional "
                    "route): an AudioHook stream only listens to its call")
        elif provider == "acs":
            mechanism = ACS_TRANSFER
            if not settings.acs_connection_string:
                raise LocalProtocolError("an ACS call is transferred through Call Automation: "
                                         "set acs_connection_string")
            if not isinstance(session.codec, AcsCodec) or not session.codec.call_connection_id:
                raise LocalProtocolError("the ACS stream's upgrade named no call connection "
                                         "(x-ms-call-connection-id): nothing to transfer")
        else:
            raise LocalProtocolError(
                f"a hand-off is made on Twilio routes and SignalWire <Connect> routes; this "
                f"{provider} {'bidirectional' if session.bidirectional else '<Start>'} "
                "route has no way to make one yet")
        target = parse_target(to)
        assert session.call_sid is not None  # started
        origin = settings.public_base("http")
        back = f"{origin}{settings.webhook_path}{self.route.path}" if origin else None
        mapping = self.route.handoff
        if mechanism == CALL_UPDATE:  # over the inline limit it goes by url=, whole
            mapping = dataclasses.replace(mapping, twiml_chars=MAX_FETCHED_TWIML_CHARS)
        plan: HandOffPlan | HeaderPlan
        if mechanism == GENESYS_DISCONNECT:
            plan = plan_output_variables(target, self._call_id(), session.context, mapping,
                                         parameters=parameters)
        elif mechanism in TRANSFERS:
            headers = plan_acs_headers if mechanism == ACS_TRANSFER else plan_sip_headers
            try:
                plan = headers(target, self._call_id(), session.context, mapping,
                               parameters=parameters)
            except ValueError as exc:
                raise LocalProtocolError(str(exc)) from None
        else:
            plan = plan_twiml(
                target, session.call_sid, session.context, mapping, parameters=parameters,
                dial_action=f"{back}?{ACTION_PARAMETER}={DIAL_ACTION}" if back else None,
                status_callback=(f"{back}?{ACTION_PARAMETER}={HAND_OFF_STATUS}" if back
                                 else None))
        entry: dict[str, object] = {
            "target": str(target), "mechanism": mechanism, "sent": plan.sent,
            "dropped": list(plan.dropped), "truncated": list(plan.truncated),
            "status": "pending", "media_ms": session.heard_ms(), "at": time.time()}
        if isinstance(plan, HandOffPlan):
            entry["twiml"] = plan.twiml
        self.hand_off_entry = entry
        session.hand_offs.append(entry)
        future: asyncio.Future[HandOffResult] = asyncio.get_running_loop().create_future()
        # Kept here while it runs (the loop holds tasks weakly).
        self._handing_off = asyncio.get_running_loop().create_task(
            self._hand_over_to(plan, entry, future))
        return future

    def _call_id(self) -> str:
        """The id the call's record is kept under (ACS: the correlation id)."""
        session = self.session
        call_id = session.codec.correlation_id or session.call_sid
        assert call_id is not None  # started
        return call_id

    async def _hand_over_to(self, plan: HandOffPlan | HeaderPlan, entry: dict[str, object],
                            future: asyncio.Future[HandOffResult]) -> None:
        """Keep the hand-off where the platform's request will look (bounded by
        ``redis_timeout_ms`` in a fleet), then carry it: end the stream (``<Connect>``, the
        action answers), or update the call through the REST API (``<Start>``)."""
        mechanism = str(entry["mechanism"])
        result = HandOffResult(str(plan.target), mechanism, dict(plan.sent), plan.dropped,
                               plan.truncated)
        error = None
        inline = isinstance(plan, HandOffPlan) and (
            len(plan.twiml) <= self.route.handoff.twiml_chars)
        if mechanism == CALL_UPDATE and inline:
            entry["status"] = "sent"  # run at once: nothing will fetch it
        elif mechanism in TRANSFERS:
            entry["status"] = "requested"  # the platform's callback says how it went
        written = self._store_context()
        if written is not None:
            await self.server.contexts.written(written)
            if not written.done():
                error = "the context store did not take the hand-off in time"
        if error is None and isinstance(plan, HandOffPlan) and mechanism == CALL_UPDATE:
            try:
                error = await self._update_call(plan, inline)
            except Exception as exc:  # an SDK's own failure: the hand-off fails, not the call
                logger.exception("call.hand_off_error", mechanism=mechanism)
                error = f"{type(exc).__name__}: {exc}"
        elif error is None and mechanism == GENESYS_DISCONNECT:
            entry["status"] = "sent"
            if self.session.state is not State.STREAMING:
                error = "the session ended before the hand-off"
            else:
                self.session.send_end("completed", plan.sent)
                self._flush_quietly()
                self._close_later()
        elif error is None and isinstance(plan, HeaderPlan):
            try:
                error = await self._transfer(mechanism, plan)
            except Exception as exc:  # an SDK's own failure: the hand-off fails, not the call
                logger.exception("call.hand_off_error", mechanism=mechanism)
                error = f"{type(exc).__name__}: {exc}"
        provider = self.session.codec.provider
        if error is not None:
            entry["status"] = "failed"
            result = dataclasses.replace(result, ok=False, error=error)
            self.server.metrics.hand_offs[(provider, mechanism, "failed")] += 1
            logger.warning("call.hand_off_failed", target=result.target, mechanism=mechanism,
                           reason=error)
            self._store_context()
        else:
            self.server.metrics.hand_offs[(provider, mechanism, "ok")] += 1
            fields = {"target": result.target, "mechanism": mechanism,
                      "sent": list(plan.sent), "dropped": list(plan.dropped),
                      "truncated": list(plan.truncated)}
            if mechanism == CALL_UPDATE:
                fields["twiml"] = "inline" if inline else "url"
            logger.info("call.handed_off", **fields)
            self._publish("call.handed_off", fields)
            if mechanism == CONNECT_ACTION:
                self.end_stream(HANDED_OFF_REASON)
        if not future.done():
            future.set_result(result)

    async def _transfer_acs(self, plan: HeaderPlan) -> None:
        """Ask ACS to transfer the call with the plan's custom calling context (the outcome
        comes later, as a callback); TransferError says why not."""
        settings = self.server.settings
        codec = self.session.codec
        assert isinstance(codec, AcsCodec)
        assert codec.call_connection_id
        assert settings.acs_connection_string is not None
        http_base = settings.public_base("http")
        callback = None
        if http_base is not None:
            callback = http_base + settings.acs_callback_path
            if settings.acs_events_secret:
                callback += "?secret=" + quote(settings.acs_events_secret, safe="")
        await acs_transfer.transfer(settings.acs_connection_string, codec.call_connection_id,
                                    plan, call_id=self._call_id(), callback_url=callback)

    async def _transfer(self, mechanism: str, plan: HeaderPlan) -> str | None:
        """Ask the platform (ACS, Telnyx, Vonage) to transfer the call with the plan's
        headers; the error, or None (a callback may say how it went later)."""
        settings = self.server.settings
        call_sid = self.session.call_sid  # Telnyx: the call control id; Vonage: the uuid
        assert call_sid is not None
        try:
            if mechanism == ACS_TRANSFER:
                await self._transfer_acs(plan)
            elif mechanism == TELNYX_TRANSFER:
                await telnyx_transfer.transfer(settings, call_sid, plan,
                                               call_id=self._call_id())
            else:
                await vonage_transfer.transfer(settings, call_sid, plan)
        except TransferError as exc:
            return str(exc)
        return None

    async def _update_call(self, plan: HandOffPlan, inline: bool) -> str | None:
        """Run the hand-off's TwiML on the call through Twilio's REST API (by ``url=`` to
        the service's own endpoint when it is over the inline limit); the error, or None."""
        settings = self.server.settings
        call_sid = self.session.call_sid
        assert call_sid is not None
        origin = settings.public_base("http")
        if not inline and origin is None:
            return "the hand-off's TwiML is over the inline limit and public_url is not set"
        url = f"{origin}{settings.webhook_path}{self.route.path}?{ACTION_PARAMETER}={HAND_OFF_URL}"
        try:
            await twilio_rest.TwilioCalls(settings).update(
                call_sid, twiml=plan.twiml if inline else None, url=None if inline else url)
        except TransferError as exc:
            return str(exc)
        return None

    def end_stream(self, reason: str, why: StopReason = "handed_off") -> None:
        """Close the stream normally (1000 with ``reason``): the call goes on elsewhere
        (``why``: the summary's reason, where the transport does not learn it)."""
        self.close_with(1000, reason, why)

    def _publish_frame_rate(self, event: str, **fields: object) -> None:
        """A DTMF or mark entry for the bus: at most :data:`MAX_CALL_EVENTS_PUBLISHED` a
        call (the rest counted in ``stream.stopped``'s ``events_not_published``)."""
        if self.server.fleet is None:
            return
        if self.events_published >= MAX_CALL_EVENTS_PUBLISHED:
            self.events_not_published += 1
            return
        self.events_published += 1
        self._publish(event, fields, lifecycle=False)

    def _publish(self, event: str, fields: Mapping[str, object], *,
                 lifecycle: bool = True) -> None:
        """Put one call event on the fleet's bus (nothing without a fleet)."""
        fleet = self.server.fleet
        if fleet is not None:
            session = self.session
            fleet.publish(event, {"call_sid": session.call_sid,
                                  "stream_sid": session.stream_sid, "path": session.path,
                                  **fields}, lifecycle=lifecycle)

    def _started(self, lookup: CallContext) -> None:
        session = self.session
        session.resumed_from = lookup.resumed_from
        if (lookup.parameters and not session.custom_parameters
                and not session.codec.context_on_wire):
            # The stream carries no parameters: those its webhook stored (which may have
            # reached another instance) are the stream's.
            session.set_custom_parameters(lookup.parameters)
        # Everything known about the call: the stream's parameters, and the whole context
        # its way in stored (which wins: the parameters may have been cut to a budget).
        session.set_context({**session.custom_parameters, **(lookup.context or {})})
        session.context_updated_at = lookup.updated_at or time.time()
        session.hand_offs = list(lookup.hand_offs)
        media_format = session.media_format
        started = {
            "call_sid": session.call_sid,
            "stream_sid": session.stream_sid,
            "account_sid": session.account_sid,
            "tracks": list(session.tracks),
            "media_format": msgspec.structs.asdict(media_format) if media_format else None,
            "custom_parameters": dict(session.custom_parameters),
            "path": session.path,
            "bidirectional": session.bidirectional,
            "protocol_version": session.protocol_version,
            "provider": session.codec.provider,
            "correlation_id": session.codec.correlation_id,
            "context": lookup.context,
            "resumed_from": lookup.resumed_from,
        }
        logger.info("stream.started", **started)
        self._publish("stream.started", started)
        if session.parameters_over_budget:
            logger.warning(
                "stream.parameters_over_budget",
                custom_parameters_bytes=session.custom_parameters_bytes,
                budget_bytes=session.parameter_budget_bytes,
            )
        assert session.stream_sid is not None  # set by start
        self.server.metrics.calls_started += 1
        self.context_budget = lookup.budget
        fleet = self.server.fleet
        if fleet is not None:
            self.server.fleet_calls[session.stream_sid] = self
        if session.bidirectional:
            self.start_writer()
        self.chain.start(session)
        self._raw_wanted = self.chain.wants_raw_frames
        # No handler takes media (a route that only streams, or records raw frames): the
        # frame's accounting in the session is all its path does.
        self._on_media = self.chain.on_media if self.chain.takes_media else _ignore
        if self.route.publish_audio and fleet is not None:
            self._audio = AudioBatcher(fleet, session, self.server.settings.audio_batch_ms)
            self._on_media = self._audio.wrap(self._on_media)
        if self._raw_wanted:
            for raw in self.early_frames:
                self.chain.on_raw_frame(raw)
        self.early_frames = []

    def _log_bad_frame(self, bad: BadFrame) -> None:
        if bad.count <= BAD_FRAMES_LOGGED:
            logger.warning("stream.bad_frame", reason=bad.reason, excerpt=bad.excerpt,
                           count=bad.count, last_logged=bad.count == BAD_FRAMES_LOGGED)

    def _flush(self) -> None:
        """Hand what the session queued to the transport; raises LocalProtocolError (in the
        handler that sent) when the peer has stopped reading: the frames are dropped."""
        if self.outbound_full():
            self._drop_outbound()
            raise LocalProtocolError("the peer is not reading: too many frames wait to be sent")
        self._send_queued()

    def _flush_quietly(self) -> None:
        """As :meth:`_flush`, from the receive loop: a peer that stopped reading costs the
        frames queued for it (counted), never the call."""
        if self.outbound_full():
            self._drop_outbound()
        else:
            self._send_queued()

    def _drop_outbound(self) -> None:
        dropped = len(self.session.data_to_send())
        if dropped and not self.outbound_dropped:
            logger.warning("stream.peer_not_reading", dropped_frames=dropped)
        self.outbound_dropped += dropped
        self.server.metrics.outbound_dropped += dropped

    def _send_queued(self) -> None:
        for frame in self.session.data_to_send():
            self.send_now(frame)
            if self.chain.wants_raw_frames:
                self.chain.on_raw_frame(RawFrame(self._now_ms(), frame, sent=True,
                                                 binary=type(frame) is wire.BinaryFrame))

    async def finish(self, reason: StopReason) -> None:
        if self._starting is not None and not self._starting.done():
            await self._starting  # bounded by redis_timeout_ms
        if self.refused is not None:
            return  # never started: no handler saw it, nothing to summarize
        if self._handing_off is not None and not self._handing_off.done():
            # A hand-off under way (a REST call): its outcome belongs in the summary.
            await asyncio.wait({self._handing_off}, timeout=self._handler_grace_s())
        if reason == "closed" and self.session.codec.stops_on_close:
            reason = "stop"  # the provider has no stop message: its close is the stop
        if self.moved:
            reason = "moved"
        elif (self.hand_off_entry is not None and self.hand_off_entry["status"] != "failed"
              and self.hand_off_entry["mechanism"] in ENDS_STREAM):
            reason = "handed_off"
        if self._end_timer is not None:
            self._end_timer.cancel()
        stream_sid = self.session.stream_sid
        if stream_sid is not None and self.server.streams.get(stream_sid) is self.session:
            del self.server.streams[stream_sid]
        fleet = self.server.fleet
        if fleet is not None and stream_sid is not None:
            if self.server.fleet_calls.get(stream_sid) is self:
                del self.server.fleet_calls[stream_sid]
            fleet.unregister(stream_sid)  # only if this instance holds it
            if self._audio is not None:
                self._audio.flush()
        self.session.abandon_marks()  # no echo can come any more
        await asyncio.sleep(0)  # their callbacks run before the handlers report
        closed = dataclasses.replace(self.session.close(reason),
                                     context_budget=self.context_budget,
                                     hand_off=_hand_off_fields(self.hand_off_entry))
        summary = await self.chain.finish(self.session, closed, self._handler_grace_s())
        if self._context_write is not None:
            self._store_context()  # what handlers added last (on_stop too) is kept
        self.server.metrics.call_ended(summary, self.chain.errors(), self.chain.drops())
        stopped = dict(
            call_sid=self.session.call_sid,
            stream_sid=self.session.stream_sid,
            **summary.log_fields(),
            handler_errors=self.chain.errors(),
            handler_drops=self.chain.drops(),
            outbound_dropped=self.outbound_dropped,
            events_not_published=self.events_not_published,
            context_updates=self.context_updates,
            custom_parameters_bytes=self.session.custom_parameters_bytes,
            wall_ms=round((time.monotonic() - self.connected_at) * 1000),
        )
        logger.info("stream.stopped", **stopped)
        self._publish("stream.stopped", stopped)

    def _handler_grace_s(self) -> float:
        """How long handlers may take to finish: their stop timeout, cut to what is left
        of a drain's time."""
        grace = self.server.settings.handler_stop_timeout_s
        deadline = self.server.stop_deadline
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time() - SHUTDOWN_CLOSE_S
            grace = max(0.0, min(grace, left))
        return grace

    def start_writer(self) -> None:
        """Called when a bidirectional stream starts (before any handler can send)."""

    def hand_over(self) -> None:
        """Close the stream (1001) for another instance to resume the call (a drain in a
        fleet, on a bidirectional route)."""
        self.moved = True
        self.close_with(1001, "moving to another instance", "shutdown")


def _ignore(media: wire.Media) -> None:
    pass


def _hand_off_fields(entry: Mapping[str, object] | None) -> dict[str, object] | None:
    """A hand-off as the summary and the log carry it: the names sent, never the values
    (the context API, behind its token, has those), nor the TwiML."""
    if entry is None:
        return None
    fields = {k: v for k, v in entry.items() if k != "twiml"}
    fields["sent"] = list(dict(entry.get("sent") or {}))  # type: ignore[call-overload]
    return fields


async def _ready(found: Awaitable[CallContext] | CallContext) -> CallContext:
    return found if isinstance(found, CallContext) else await found
