"""Routes: which URL path serves which provider's streams, with which handlers, and what the
voice webhook answers for it. Read from ``[[routes]]`` tables::

    [[routes]]
    path = "/stream"
    handlers = ["log", "mypkg.handlers:Recorder"]
    bidirectional = false
    provider = "twilio"          # acs, telnyx, signalwire, exotel, plivo, vonage, auto

    [routes.context]             # the call's context -> <Parameter>s (streamsvc.context.twiml)
    [routes.handoff]             # what goes along to an agent (streamsvc.context.handoff)
    [routes.twiml]               # track, follow-on TwiML

Errors raise :class:`~streamsvc.exceptions.ConfigError` naming the key (``routes[0].path``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from streamsvc.context.handoff import HandOffMapping
from streamsvc.context.twiml import ContextMapping, render_stream_twiml
from streamsvc.exceptions import ConfigError
from streamsvc.handlers import BIDIRECTIONAL_ONLY, HandlerSpec, resolve_handler
from streamsvc.providers import PROVIDERS

__all__ = ["DEFAULT_ROUTES", "Route", "check_keys", "parse_routes", "table"]


@dataclass(frozen=True, slots=True)
class Route:
    """A URL path and the handlers each stream on it gets, in order; and for the voice
    webhook, which call context becomes ``<Parameter>``s and the TwiML around the stream."""

    path: str
    handlers: tuple[HandlerSpec, ...]
    bidirectional: bool = False
    context: ContextMapping = field(default_factory=ContextMapping)
    stream_track: str = "inbound_track"  # <Start><Stream track=...>
    after_twiml: str = ""  # verbs after <Start>, e.g. '<Pause length="3600"/>'
    provider: str = "twilio"  # whose wire protocol the streams speak (streamsvc.providers)
    unmixed: bool = False  # ACS: each participant its own track
    publish_audio: bool = False  # fleet: the audio goes to streamsvc:audio:<stream_sid>
    handoff: HandOffMapping = field(default_factory=HandOffMapping)  # what goes to an agent
    # Genesys: the channels asked for, "both", "external" or "auto" (both when a handler
    # reads or records the agent's side too: channels_for).
    channels: str = "auto"
    # jambonz: the listen verb sets bidirectionalAudio.streaming (audio back as binary).
    bidirectional_streaming: bool = False

    def channels_for(self) -> str:
        """The channels a Genesys stream of this route asks for: ``channels``, or with
        ``auto`` the external (customer) channel alone when every handler reads only the
        inbound track (log, dtmf, echo, handoff, forward of the inbound track), else both."""
        if self.channels != "auto":
            return self.channels
        for spec in self.handlers:
            tracks = spec.options.get("tracks", ("inbound",))
            if spec.kind in INBOUND_ONLY_HANDLERS or (
                    spec.kind == "forward" and list(tracks) == ["inbound"]):
                continue
            return "both"
        return "external"


# The key of a named handler instance's table that says what it is an instance of.
USE: Final = "use"
# Built-in handlers that read the caller's (inbound) track only.
INBOUND_ONLY_HANDLERS: Final = frozenset({"log", "dtmf", "echo", "handoff"})
CHANNELS: Final = ("auto", "both", "external")


# The embedded default: <Start><Stream> calls on /stream, <Connect><Stream> on /connect.
DEFAULT_ROUTES: Final = (
    Route("/stream", (resolve_handler("log", {}, key="handlers"),), bidirectional=False),
    Route("/connect", (resolve_handler("log", {}, key="handlers"),), bidirectional=True),
)


def table(document: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The TOML table ``document[key]`` (empty when absent); ConfigError when not a table."""
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a table")
    return value


def check_keys(entries: Mapping[str, Any], known: set[str], prefix: str) -> None:
    """ConfigError naming the first key of ``entries`` that is not ``known``."""
    for key in entries:
        if key not in known:
            raise ConfigError(prefix + key, f"unknown setting; known: {', '.join(sorted(known))}")


def parse_routes(document: Mapping[str, Any]) -> tuple[Route, ...]:
    raw_routes = document["routes"]
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("routes", "must be a non-empty array of tables ([[routes]])")
    options = table(document, "handlers")
    routes = tuple(_route(raw, i, options) for i, raw in enumerate(raw_routes))
    paths = [route.path for route in routes]
    for path in paths:
        if paths.count(path) > 1:
            raise ConfigError("routes.path", f"{path!r} appears more than once")
    return routes


def _route(raw: Any, index: int, options: Mapping[str, Any]) -> Route:
    key = f"routes[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a table")
    check_keys(raw, {"path", "handlers", "bidirectional", "context", "twiml", "provider",
                      "unmixed", "publish_audio", "handoff", "channels",
                      "bidirectional_streaming"}, key + ".")
    provider = raw.get("provider", "twilio")
    if provider not in PROVIDERS:
        raise ConfigError(key + ".provider",
                          f"expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    unmixed = raw.get("unmixed", False)
    if not isinstance(unmixed, bool):
        raise ConfigError(key + ".unmixed", f"must be true or false, got {unmixed!r}")
    publish_audio = raw.get("publish_audio", False)
    if not isinstance(publish_audio, bool):
        raise ConfigError(key + ".publish_audio", f"must be true or false, got {publish_audio!r}")
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "?" in path:
        raise ConfigError(key + ".path", f"must be a URL path like '/stream', got {path!r}")
    names = raw.get("handlers", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(key + ".handlers", "must be an array of handler names")
    bidirectional = raw.get("bidirectional", False)
    if not isinstance(bidirectional, bool):
        raise ConfigError(key + ".bidirectional", f"must be true or false, got {bidirectional!r}")
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(key + ".handlers", f"{name!r} is listed twice: for a second "
                              f"one with other options, make a named instance ([handlers."
                              f"<name>] use = {name!r})")
    specs = tuple(_handler(name, options, key + ".handlers") for name in names)
    for spec in specs:
        if spec.kind in BIDIRECTIONAL_ONLY and not bidirectional:
            raise ConfigError(key + ".handlers",
                              f"{spec.name!r} talks back: the route needs bidirectional = true")
    context = ContextMapping.from_table(table(raw, "context"), key=key + ".context")
    twiml = table(raw, "twiml")
    check_keys(twiml, {"track", "after"}, key + ".twiml.")
    track, after = twiml.get("track", "inbound_track"), twiml.get("after", "")
    try:
        render_stream_twiml("wss://check.invalid" + path, {}, connect=bidirectional,
                            track=track, after=after)
    except (ValueError, TypeError) as exc:
        raise ConfigError(key + ".twiml", str(exc)) from None
    handoff = HandOffMapping.from_table(table(raw, "handoff"), key=key + ".handoff")
    channels = raw.get("channels", "auto")
    if channels not in CHANNELS:
        raise ConfigError(key + ".channels",
                          f"expected one of {', '.join(CHANNELS)}, got {channels!r}")
    streaming = raw.get("bidirectional_streaming", False)
    if not isinstance(streaming, bool):
        raise ConfigError(key + ".bidirectional_streaming",
                          f"must be true or false, got {streaming!r}")
    return Route(path, specs, bidirectional, context, track, after, provider, unmixed,
                 publish_audio, handoff, channels, streaming)


def _handler(name: str, options: Mapping[str, Any], key: str) -> HandlerSpec:
    """The handler a route names: a built-in or ``pkg.mod:Factory`` with its
    ``[handlers.<name>]`` options, or a named instance (``[handlers.<name>]`` with ``use =
    "<built-in or pkg.mod:Factory>"`` and its own options), so one handler can serve several
    routes (or one route twice) with different options."""
    handler_options = options.get(name, {})
    if not isinstance(handler_options, dict):
        raise ConfigError(f"handlers.{name}", "must be a table of options")
    if USE not in handler_options:
        return resolve_handler(name, handler_options, key=key)
    kind = handler_options[USE]
    if not isinstance(kind, str) or not kind or kind == name:
        raise ConfigError(f"handlers.{name}.{USE}", "must name a built-in handler or "
                          f"'pkg.mod:Factory' other than the instance itself, got {kind!r}")
    if kind in options and isinstance(options[kind], dict) and USE in options[kind]:
        raise ConfigError(f"handlers.{name}.{USE}", f"{kind!r} is itself a named instance: "
                          "use the built-in or 'pkg.mod:Factory' it uses")
    own = {option: value for option, value in handler_options.items() if option != USE}
    return resolve_handler(kind, own, key=f"handlers.{name}", instance=name)
