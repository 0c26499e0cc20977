"""Settings: one frozen object built at the edge from, in rising precedence, the defaults, a
TOML file (``--config`` or ``STREAMSVC_CONFIG``), environment variables and CLI flags.

Every scalar setting has one name in each place, listed in :data:`SETTINGS`: TOML key
``[server] max_connections``, env ``STREAMSVC_MAX_CONNECTIONS``, flag ``--max-connections``.
Routes and handler options only come from TOML::

    [[routes]]
    path = "/stream"
    handlers = ["log", "mypkg.handlers:Recorder"]
    bidirectional = false

    [handlers.log]            # keyword options for that handler's factory

A bad value fails at start-up with :class:`~streamsvc.exceptions.ConfigError` naming the key.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url as redis_parse_url

from streamsvc.exceptions import ConfigError
from streamsvc.providers import REGISTRY
from streamsvc.routes import DEFAULT_ROUTES, Route, check_keys, parse_routes, table

__all__ = [
    "DEFAULT_ROUTES",
    "HEALTH_PATH",
    "METRICS_PATH",
    "PROBE_PATHS",
    "READY_PATH",
    "SETTINGS",
    "Route",
    "Setting",
    "Settings",
    "load_settings",
]

HEALTH_PATH: Final = "/healthz"  # the process is alive (stays 200 while draining)
READY_PATH: Final = "/readyz"  # the process takes new calls (503 while draining)
METRICS_PATH: Final = "/metrics"
PROBE_PATHS: Final = frozenset({HEALTH_PATH, READY_PATH, METRICS_PATH})
# public_url: the stream origin Twilio is given, or the HTTPS origin of the webhooks.
PUBLIC_SCHEMES: Final = ("ws", "wss", "http", "https")


@dataclass(frozen=True, slots=True)
class Setting:
    """One scalar setting: its TOML key under ``[server]``, its env vars (first set wins),
    its type, default and help text. The CLI flag is ``--`` + key with dashes."""

    key: str
    env: tuple[str, ...]
    type: type
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False  # never shown: not in --help defaults, not in error messages

    @property
    def default(self) -> Any:
        """The default, as :class:`Settings` declares it (the one place that owns it)."""
        return _DEFAULTS[self.key]

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs; build with :func:`load_settings`. The defaults are safe
    for production and serve ``/stream`` and ``/connect`` (bidirectional) with the
    built-in ``log`` handler."""

    # Listening
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    reuse_port: bool = False
    event_loop: str = "auto"
    transport: str = "auto"
    # Security
    public_url: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_token_previous: str | None = field(default=None, repr=False)
    twilio_account_sid: str | None = None
    twilio_api_key: str | None = None
    twilio_api_secret: str | None = field(default=None, repr=False)
    twilio_api_base_url: str = "https://api.twilio.com"
    insecure: bool = False
    acs_audience: str | None = None
    acs_jwks_url: str = "https://acscallautomation.communication.azure.com/calling/keys"
    acs_events_secret: str | None = field(default=None, repr=False)
    acs_connection_string: str | None = field(default=None, repr=False)
    telnyx_stream_token: str | None = field(default=None, repr=False)
    telnyx_api_key: str | None = field(default=None, repr=False)
    telnyx_api_base_url: str = "https://api.telnyx.com/v2"
    signalwire_token: str | None = field(default=None, repr=False)
    signalwire_signing_key: str | None = field(default=None, repr=False)
    signalwire_l16_little_endian: bool = False
    exotel_basic_auth: str | None = field(default=None, repr=False)
    plivo_auth_token: str | None = field(default=None, repr=False)
    vonage_token: str | None = field(default=None, repr=False)
    vonage_signature_secret: str | None = field(default=None, repr=False)
    vonage_application_id: str | None = None
    vonage_private_key: str | None = field(default=None, repr=False)
    vonage_api_base_url: str = "https://api.nexmo.com"
    genesys_api_key: str | None = field(default=None, repr=False)
    genesys_client_secret: str | None = field(default=None, repr=False)
    genesys_api_key_previous: str | None = field(default=None, repr=False)
    genesys_client_secret_previous: str | None = field(default=None, repr=False)
    asterisk_basic_auth: str | None = field(default=None, repr=False)
    jambonz_basic_auth: str | None = field(default=None, repr=False)
    # Limits
    max_message_bytes: int = 64 * 1024
    max_connections: int = 1000
    max_pending_starts: int = 200
    max_streams_per_address: int = 0
    max_unread_bytes: int = 8 * 1024 * 1024
    parameter_budget_bytes: int = 800
    context_max_bytes: int = 16384
    # Who may read a call's context (GET /calls/<call id>/context); unset: nobody.
    context_api_token: str | None = field(default=None, repr=False)
    # Timeouts
    handshake_timeout_s: float = 5.0
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 15.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    handler_stop_timeout_s: float = 10.0
    drain_timeout_s: float = 25.0
    gc_full_interval_s: float = 600.0
    # Webhooks
    webhook_path: str = "/twiml"
    status_callback_path: str = "/stream-status"
    acs_events_path: str = "/acs/events"
    acs_callback_path: str = "/acs/callbacks"
    acs_route: str | None = None
    # Fleet (Redis): unset, everything stays in this process
    redis_url: str | None = field(default=None, repr=False)
    instance_id: str | None = None
    context_ttl_s: float = 3600.0
    events_stream: str = "streamsvc:events"
    events_maxlen: int = 100_000
    audio_batch_ms: int = 200
    redis_timeout_ms: int = 50
    bus_buffer: int = 10_000
    # Logging
    log_format: str = "json"
    log_level: str = "info"
    # Routing
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    # Set by `serve --workers N` for its workers: where they share their metrics.
    shared_metrics_dir: str | None = None

    @property
    def auth_tokens(self) -> tuple[str, ...]:
        """The tokens a signature may be made with (the previous one during rotation)."""
        return tuple(t for t in (self.auth_token, self.auth_token_previous) if t)

    @property
    def effective_transport(self) -> str:
        """The transport the server runs on: ``transport``, with ``auto`` resolved to
        picows when it is installed (a regular dependency) and websockets otherwise."""
        if self.transport != "auto":
            return self.transport
        return "picows" if importlib.util.find_spec("picows") is not None else "websockets"

    @property
    def public_prefix(self) -> str:
        """The path prefix of ``public_url`` (``/voice`` for ``wss://api.example.com/voice``),
        or ``""``: a proxy in front serves the service below it."""
        if self.public_url is None:
            return ""
        return urlsplit(self.public_url).path.rstrip("/")

    def public_base(self, kind: str) -> str | None:
        """``public_url`` as the ``ws`` or ``http`` base URL, prefix included
        (``wss://api.example.com/voice``, ``https://api.example.com/voice``), or None when
        it is not set. A secure scheme (``wss``, ``https``) gives secure ones."""
        if self.public_url is None:
            return None
        parts = urlsplit(self.public_url)
        secure = "s" if parts.scheme in ("wss", "https") else ""
        return f"{kind}{secure}://{parts.netloc}{self.public_prefix}"

    def local_path(self, path: str) -> str:
        """``path`` without the public prefix, for a proxy that forwards it unchanged
        (``/voice/stream`` -> ``/stream``); other paths are returned as they are."""
        prefix = self.public_prefix
        if prefix and path.startswith(prefix + "/"):
            return path[len(prefix):]
        return path

    @property
    def acs_answer_route(self) -> Route | None:
        """The route ACS calls are answered with: ``acs_route``, else the first ACS one."""
        if self.acs_route is not None:
            return self.route_for(self.acs_route)
        return next((route for route in self.routes if route.provider == "acs"), None)

    def route_for(self, path: str) -> Route | None:
        """The route serving ``path`` (exact match), or None."""
        for route in self.routes:
            if route.path == path:
                return route
        return None


_DEFAULTS: Final = {f.name: f.default for f in dataclasses.fields(Settings)}

SETTINGS: Final[tuple[Setting, ...]] = (
    # Listening
    Setting("host", ("STREAMSVC_HOST",), str, "address to listen on"),
    Setting("port", ("STREAMSVC_PORT", "PORT"), int, "TCP port (0 picks a free one)",
            minimum=0, maximum=65535),
    Setting("workers", ("STREAMSVC_WORKERS",), int,
            "server processes sharing the port (SO_REUSEPORT), e.g. one per core", minimum=1),
    Setting("reuse_port", ("STREAMSVC_REUSE_PORT",), bool,
            "bind with SO_REUSEPORT so that several processes share the port"),
    Setting("event_loop", ("STREAMSVC_EVENT_LOOP",), str,
            "auto (uvloop when installed), asyncio or uvloop",
            choices=("auto", "asyncio", "uvloop")),
    Setting("transport", ("STREAMSVC_TRANSPORT",), str,
            "auto (picows when installed, as it is by default: about half the CPU per frame; "
            "else websockets), picows or websockets; both serve streams, webhooks, probes "
            "and metrics alike", choices=("auto", "picows", "websockets")),
    # Security
    Setting("public_url", ("STREAMSVC_PUBLIC_URL",), str,
            "public origin Twilio reaches, e.g. wss://voice.example.com or, behind a proxy "
            "path, https://api.example.com/voice: stream, webhook and status URLs and "
            "signatures are built from it, never from the Host header"),
    Setting("auth_token", ("STREAMSVC_AUTH_TOKEN", "TWILIO_AUTH_TOKEN"), str,
            "Twilio auth token: when set, every handshake needs a valid X-Twilio-Signature",
            secret=True),
    Setting("auth_token_previous", ("STREAMSVC_AUTH_TOKEN_PREVIOUS",
                                    "TWILIO_AUTH_TOKEN_PREVIOUS"), str,
            "a second token also accepted, while the account's token is rotated", secret=True),
    Setting("twilio_account_sid", ("STREAMSVC_TWILIO_ACCOUNT_SID", "TWILIO_ACCOUNT_SID"), str,
            "the Twilio account (AC...): when set, a twilio stream whose start names another "
            "accountSid is refused (1008), so that a captured signed upgrade cannot carry "
            "another account's call"),
    Setting("twilio_api_key", ("STREAMSVC_TWILIO_API_KEY", "TWILIO_API_KEY"), str,
            "a Twilio API key (SK...) for the REST API (a hand-off on a <Start> route); "
            "without it the account's auth token is used"),
    Setting("twilio_api_secret", ("STREAMSVC_TWILIO_API_SECRET", "TWILIO_API_SECRET"), str,
            "the API key's secret", secret=True),
    Setting("twilio_api_base_url", ("STREAMSVC_TWILIO_API_BASE_URL",), str,
            "where Twilio's REST API is reached (a local stand-in in tests)"),
    Setting("insecure", ("STREAMSVC_INSECURE",), bool,
            "allow a non-loopback host without a credential for each route's provider "
            "(streams unchecked)"),
    Setting("acs_audience", ("STREAMSVC_ACS_AUDIENCE",), str,
            "the ACS resource id: when set, every upgrade on a provider = \"acs\" route needs "
            "an ACS-signed bearer token for it (HTTP 403 otherwise)"),
    Setting("acs_jwks_url", ("STREAMSVC_ACS_JWKS_URL",), str,
            "where ACS publishes the keys its tokens are signed with"),
    Setting("acs_events_secret", ("STREAMSVC_ACS_EVENTS_SECRET",), str,
            "the ?secret= the Event Grid subscription URL and ACS callbacks carry", secret=True),
    Setting("acs_connection_string", ("STREAMSVC_ACS_CONNECTION_STRING",
                                      "ACS_CONNECTION_STRING"), str,
            "the ACS resource's connection string: its endpoint= answers IncomingCall",
            secret=True),
    # Limits
    Setting("telnyx_stream_token", ("STREAMSVC_TELNYX_STREAM_TOKEN",), str,
            "the stream_auth_token given to Telnyx's streaming_start: when set, upgrades on "
            "telnyx routes need it in x-telnyx-streaming-auth-token (403 otherwise)",
            secret=True),
    Setting("telnyx_api_key", ("STREAMSVC_TELNYX_API_KEY", "TELNYX_API_KEY"), str,
            "a Telnyx API key: a hand-off on a telnyx route transfers the call through "
            "Call Control with it", secret=True),
    Setting("telnyx_api_base_url", ("STREAMSVC_TELNYX_API_BASE_URL",), str,
            "where Telnyx's API is reached (a local stand-in in tests)"),
    Setting("signalwire_token", ("STREAMSVC_SIGNALWIRE_TOKEN",), str,
            "the <Stream authBearerToken> given to SignalWire: when set, upgrades on "
            "signalwire routes need Authorization: Bearer <it> (403 otherwise)", secret=True),
    Setting("signalwire_signing_key", ("STREAMSVC_SIGNALWIRE_SIGNING_KEY",
                                       "SIGNALWIRE_SIGNING_KEY"), str,
            "the SignalWire project's signing key: the voice webhook of a signalwire route "
            "answers only requests it signed (X-SignalWire-Signature); needed for the cXML "
            "to carry signalwire_token", secret=True),
    Setting("signalwire_l16_little_endian", ("STREAMSVC_SIGNALWIRE_L16_LITTLE_ENDIAN",), bool,
            "SignalWire L16 streams arrive little-endian (default: network order, "
            "big-endian, as RFC 2586 has it)"),
    Setting("exotel_basic_auth", ("STREAMSVC_EXOTEL_BASIC_AUTH",), str,
            "KEY:TOKEN of the applet's wss://KEY:TOKEN@host/path URL: when set, upgrades "
            "on exotel routes need Authorization: Basic with it (403 otherwise)",
            secret=True),
    Setting("plivo_auth_token", ("STREAMSVC_PLIVO_AUTH_TOKEN", "PLIVO_AUTH_TOKEN"), str,
            "the Plivo account's auth token: when set, upgrades on plivo routes need a "
            "valid X-Plivo-Signature-V3 over public_url (403 otherwise)", secret=True),
    Setting("vonage_token", ("STREAMSVC_VONAGE_TOKEN",), str,
            "the value of the NCCO websocket endpoint's authorization {type: custom}: when "
            "set, upgrades on vonage routes need Authorization: <it> or Bearer <it> "
            "(403 otherwise)", secret=True),
    Setting("vonage_signature_secret", ("STREAMSVC_VONAGE_SIGNATURE_SECRET",
                                        "VONAGE_SIGNATURE_SECRET"), str,
            "the Vonage account's signature secret, for an NCCO websocket endpoint with "
            "authorization {type: vonage}: when set, upgrades on vonage routes need "
            "Authorization: Bearer <a JWT it signed> (403 otherwise)", secret=True),
    Setting("vonage_application_id", ("STREAMSVC_VONAGE_APPLICATION_ID",
                                      "VONAGE_APPLICATION_ID"), str,
            "the Vonage application's id: when set, a Vonage JWT (upgrade or answer "
            "request) must carry it as application_id (403 otherwise)"),
    Setting("vonage_private_key", ("STREAMSVC_VONAGE_PRIVATE_KEY", "VONAGE_PRIVATE_KEY"), str,
            "the Vonage application's private key (PEM, or the file it is in): a hand-off "
            "on a vonage route transfers the call through the Voice API with it",
            secret=True),
    Setting("genesys_api_key", ("STREAMSVC_GENESYS_API_KEY",), str,
            "the API key of the Genesys AudioHook or Audio Connector integration: with "
            "genesys_client_secret, upgrades on genesys routes need its RFC 9421 signature "
            "(403 otherwise)", secret=True),
    Setting("genesys_client_secret", ("STREAMSVC_GENESYS_CLIENT_SECRET",), str,
            "the integration's client secret (base64, as Genesys shows it): the HMAC key "
            "of the upgrade's signature", secret=True),
    Setting("genesys_api_key_previous", ("STREAMSVC_GENESYS_API_KEY_PREVIOUS",), str,
            "a second API key and client secret pair, accepted too while the integration's "
            "credentials are rotated", secret=True),
    Setting("genesys_client_secret_previous", ("STREAMSVC_GENESYS_CLIENT_SECRET_PREVIOUS",),
            str, "the client secret of genesys_api_key_previous", secret=True),
    Setting("asterisk_basic_auth", ("STREAMSVC_ASTERISK_BASIC_AUTH",), str,
            "USER:PASSWORD of the websocket_client.conf connection Asterisk dials: when "
            "set, upgrades on asterisk routes need Authorization: Basic with it (403 "
            "otherwise)", secret=True),
    Setting("jambonz_basic_auth", ("STREAMSVC_JAMBONZ_BASIC_AUTH",), str,
            "USER:PASSWORD of the listen verb's wsAuth: when set, upgrades on jambonz routes "
            "need Authorization: Basic with it (403 otherwise)", secret=True),
    Setting("vonage_api_base_url", ("STREAMSVC_VONAGE_API_BASE_URL",), str,
            "where Vonage's Voice API is reached, https:// (a local stand-in in tests)"),
    Setting("max_message_bytes", ("STREAMSVC_MAX_MESSAGE_BYTES",), int,
            "largest WebSocket message accepted; bigger closes the stream with 1009", minimum=1),
    Setting("max_connections", ("STREAMSVC_MAX_CONNECTIONS",), int,
            "concurrent streams; handshakes beyond get HTTP 503", minimum=1),
    Setting("max_pending_starts", ("STREAMSVC_MAX_PENDING_STARTS",), int,
            "connections that have not sent a valid start yet, apart from calls: more "
            "handshakes get HTTP 503, so idle or garbage connections never take every slot",
            minimum=1),
    Setting("max_streams_per_address", ("STREAMSVC_MAX_STREAMS_PER_ADDRESS",), int,
            "streams one client address may hold at once (0: no limit); only where callers "
            "do not share a platform's media edge (Twilio's and most providers' streams "
            "come from a few shared addresses): more get HTTP 429", minimum=0),
    Setting("max_unread_bytes", ("STREAMSVC_MAX_UNREAD_BYTES",), int,
            "bytes waiting unread for one peer (pongs to a ping flood, audio it does not "
            "read) beyond which it is disconnected", minimum=65536),
    Setting("parameter_budget_bytes", ("STREAMSVC_PARAMETER_BUDGET_BYTES",), int,
            "custom parameter bytes above which a warning is logged (kept whole)", minimum=0),
    Setting("context_max_bytes", ("STREAMSVC_CONTEXT_MAX_BYTES",), int,
            "bytes (UTF-8 names and values) a call's whole context may take: an update "
            "beyond raises LocalProtocolError in the handler", minimum=256),
    Setting("context_api_token", ("STREAMSVC_CONTEXT_API_TOKEN",), str,
            "the bearer token GET /calls/<call id>/context asks for (an agent's app reads "
            "the call's context there); unset, the path answers 404", secret=True),
    # Timeouts
    Setting("handshake_timeout_s", ("STREAMSVC_HANDSHAKE_TIMEOUT_S",), float,
            "seconds from connect to a whole request head (HTTP or WebSocket handshake); "
            "idle sockets are closed then", minimum=0.001),
    Setting("start_timeout_s", ("STREAMSVC_START_TIMEOUT_S",), float,
            "seconds from connect to `start`; then the stream is closed with 1008", minimum=0.001),
    Setting("idle_timeout_s", ("STREAMSVC_IDLE_TIMEOUT_S",), float,
            "seconds without any frame after which a stream is closed (1008)", minimum=0.001),
    Setting("ping_interval_s", ("STREAMSVC_PING_INTERVAL_S",), float,
            "seconds between WebSocket pings that detect a dead peer (0: none)", minimum=0.0),
    Setting("ping_timeout_s", ("STREAMSVC_PING_TIMEOUT_S",), float,
            "seconds a pong may take before the connection counts as dead", minimum=0.001),
    Setting("handler_stop_timeout_s", ("STREAMSVC_HANDLER_STOP_TIMEOUT_S",), float,
            "seconds queued handlers get to finish on_stop before they are cancelled",
            minimum=0.0),
    Setting("drain_timeout_s", ("STREAMSVC_DRAIN_TIMEOUT_S",), float,
            "on SIGTERM, seconds calls in progress may go on before they are closed (1001)",
            minimum=0.0),
    Setting("gc_full_interval_s", ("STREAMSVC_GC_FULL_INTERVAL_S",), float,
            "seconds between the served process's full garbage collections while calls run "
            "(0: CPython's own collector)", minimum=0.0),
    # Webhooks
    Setting("webhook_path", ("STREAMSVC_WEBHOOK_PATH",), str,
            "voice webhook answering TwiML that streams to this service (first route; "
            "PATH/<name> for the route /<name>)"),
    Setting("status_callback_path", ("STREAMSVC_STATUS_CALLBACK_PATH",), str,
            "where Twilio posts stream-started/-stopped/-error callbacks"),
    Setting("acs_events_path", ("STREAMSVC_ACS_EVENTS_PATH",), str,
            "where Event Grid delivers ACS IncomingCall events"),
    Setting("acs_callback_path", ("STREAMSVC_ACS_CALLBACK_PATH",), str,
            "where ACS posts the answered calls' callbacks"),
    Setting("acs_route", ("STREAMSVC_ACS_ROUTE",), str,
            "the ACS route (path) IncomingCall answers stream to (default: the first ACS "
            "route)"),
    # Fleet
    Setting("redis_url", ("STREAMSVC_REDIS_URL",), str,
            "redis://host:port/db shared by a fleet of instances: call context, live "
            "registry, events (streamsvc:events), talk-back; unset: one process",
            secret=True),
    Setting("instance_id", ("STREAMSVC_INSTANCE_ID",), str,
            "this instance's name in the fleet (default: host-pid)"),
    Setting("context_ttl_s", ("STREAMSVC_CONTEXT_TTL_S",), float,
            "how long a webhook's call context waits in Redis for its stream", minimum=1),
    Setting("events_stream", ("STREAMSVC_EVENTS_STREAM",), str,
            "the Redis stream call events go to"),
    Setting("events_maxlen", ("STREAMSVC_EVENTS_MAXLEN",), int,
            "entries the events stream keeps (approximate trim)", minimum=1),
    Setting("audio_batch_ms", ("STREAMSVC_AUDIO_BATCH_MS",), int,
            "audio per entry on routes with publish_audio", minimum=20, maximum=10_000),
    Setting("redis_timeout_ms", ("STREAMSVC_REDIS_TIMEOUT_MS",), int,
            "how long a call waits for Redis (its context at start) before going on "
            "without", minimum=1, maximum=1000),
    Setting("bus_buffer", ("STREAMSVC_BUS_BUFFER",), int,
            "writes held while Redis is away; more are dropped and counted", minimum=1),
    # Logging
    Setting("log_format", ("STREAMSVC_LOG_FORMAT",), str,
            "json (one object per line) or console", choices=("json", "console")),
    Setting("log_level", ("STREAMSVC_LOG_LEVEL",), str, "lowest level logged",
            choices=("debug", "info", "warning", "error")),
)
_BY_KEY: Final = {setting.key: setting for setting in SETTINGS}


def load_settings(
    *,
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings. ``config_path`` (else ``STREAMSVC_CONFIG`` in ``env``) names a
    TOML file; ``cli`` holds flag values by setting key (None means not given).
    Raises :class:`ConfigError` naming the offending key."""
    env = os.environ if env is None else env
    config_path = config_path or env.get("STREAMSVC_CONFIG") or None
    document = _read_toml(config_path) if config_path else {}
    check_keys(document, {"server", "routes", "handlers"}, "")
    server = table(document, "server")
    check_keys(server, set(_BY_KEY), "server.")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in server:
            values[setting.key] = _coerce(setting, server[setting.key], f"server.{setting.key}")
        for name in reversed(setting.env):  # the first listed wins, so apply it last
            if env.get(name):
                values[setting.key] = _coerce(setting, env[name], name)
        if cli and cli.get(setting.key) is not None:
            values[setting.key] = _coerce(setting, cli[setting.key], setting.flag)
    if "routes" in document:
        values["routes"] = parse_routes(document)
    settings = dataclasses.replace(Settings(), **values)
    _check_security(settings)
    return settings


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def _coerce(setting: Setting, raw: Any, key: str) -> Any:
    value: Any
    try:
        if setting.type is bool:
            value = _boolean(raw)
        elif setting.type is int and not isinstance(raw, bool):
            value = int(raw)
        elif setting.type is float and not isinstance(raw, bool):
            value = float(raw)
        elif setting.type is str and isinstance(raw, str):
            value = raw.strip().lower() if setting.choices else raw
            if not value.strip():
                if setting.default is not None:
                    raise ValueError(raw)
                value = None  # an empty optional setting means unset
        else:
            raise TypeError
    except (TypeError, ValueError):
        shown = "(hidden)" if setting.secret else repr(raw)
        raise ConfigError(key, f"expected {setting.type.__name__}, got {shown}") from None
    if setting.choices and value not in setting.choices:
        raise ConfigError(key, f"expected one of {', '.join(setting.choices)}, got {raw!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(key, f"must be at least {setting.minimum}, got {raw!r}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(key, f"must be at most {setting.maximum}, got {raw!r}")
    return value


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError(raw)


def _check_security(settings: Settings) -> None:
    """Fail closed: a token needs the public URL to check against, and a server reachable
    from elsewhere needs a credential for each of its routes' providers (or an explicit
    ``insecure``)."""
    if settings.public_url is not None:
        parts = urlsplit(settings.public_url)
        if (parts.scheme not in PUBLIC_SCHEMES or not parts.netloc or parts.query
                or parts.fragment):
            raise ConfigError("public_url", "must be the public origin, optionally with a path "
                              "prefix, like wss://voice.example.com or "
                              f"https://api.example.com/voice; got {settings.public_url!r}")
    if settings.plivo_auth_token and settings.public_url is None:
        raise ConfigError("public_url", "is needed to check Plivo's signatures when "
                          "plivo_auth_token is set: the origin Plivo connects to")
    if settings.auth_tokens and settings.public_url is None:
        raise ConfigError("public_url", "is needed to check signatures when an auth token "
                          "is set (Twilio signs the URL it was given, not the Host header)")
    _check_paths(settings)
    if settings.redis_url is not None and (problem := redis_url_problem(settings.redis_url)):
        raise ConfigError("redis_url", problem)
    if not settings.events_stream:
        raise ConfigError("events_stream", "must name a Redis stream")
    if settings.acs_route is not None and (settings.acs_answer_route is None
                                           or settings.acs_answer_route.provider != "acs"):
        raise ConfigError("acs_route", f"{settings.acs_route!r} is not a provider = \"acs\" "
                          "route")
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError("workers", "several workers need a fixed port to share, not 0")
    for key, secret in (("genesys_api_key", "genesys_client_secret"),
                        ("genesys_api_key_previous", "genesys_client_secret_previous")):
        given = (getattr(settings, key), getattr(settings, secret))
        if any(given) and not all(given):
            missing = secret if given[0] else key
            raise ConfigError(missing, f"{key} and {secret} go together: set both")
        if given[1]:
            try:
                base64.b64decode(given[1], validate=True)
            except ValueError:
                raise ConfigError(secret, "must be base64, as Genesys shows the client "
                                  "secret") from None
    exposed = not settings.insecure and not _is_loopback(settings.host)
    if exposed and not settings.acs_audience and any(r.provider == "acs"
                                                     for r in settings.routes):
        raise ConfigError("acs_audience", f"{settings.host!r} is reachable from other "
                          "machines but ACS routes check no token: set "
                          "STREAMSVC_ACS_AUDIENCE to the ACS resource id, or pass --insecure")
    if exposed and settings.vonage_token and not settings.vonage_signature_secret and any(
            r.provider == "vonage" for r in settings.routes):
        raise ConfigError("vonage_signature_secret", f"{settings.host!r} is reachable from "
                          "other machines and vonage_token is set, but the answer URL cannot "
                          "tell Vonage's requests from a stranger's without "
                          "VONAGE_SIGNATURE_SECRET; set it, or pass --insecure")
    if exposed and settings.acs_connection_string and not settings.acs_events_secret:
        raise ConfigError("acs_events_secret", f"{settings.host!r} is reachable from other "
                          "machines and acs_connection_string answers calls, but "
                          f"{settings.acs_events_path} would take IncomingCall events from "
                          "anyone: set STREAMSVC_ACS_EVENTS_SECRET (the ?secret= of the Event "
                          "Grid subscription), or pass --insecure")
    if not settings.auth_tokens and exposed and any(r.provider == "twilio"
                                                    for r in settings.routes):
        raise ConfigError("host", f"{settings.host!r} is reachable from other machines but no "
                          "auth token is set: set TWILIO_AUTH_TOKEN and STREAMSVC_PUBLIC_URL, "
                          "or pass --insecure to accept unsigned streams")
    if exposed:
        credentials = provider_credentials(settings)
        for route in settings.routes:
            if route.provider in ("twilio", "acs"):
                continue  # said above, in their own words
            needed = credentials.get(route.provider)
            if needed is not None and not needed[1]:
                raise ConfigError("host", f"{settings.host!r} is reachable from other "
                                  f"machines but the {route.provider} route {route.path!r} "
                                  f"checks no credential: set {needed[0]}, or pass "
                                  "--insecure to accept unchecked streams")
            if route.provider == "auto" and not any(c for _, c in credentials.values()):
                raise ConfigError("host", f"{settings.host!r} is reachable from other "
                                  f"machines but the auto route {route.path!r} checks no "
                                  "credential: configure the providers' credentials, or "
                                  "pass --insecure to accept unchecked streams")


def provider_credentials(settings: Settings) -> dict[str, tuple[str, bool]]:
    """Per provider with a stream credential, where it is set and whether it is (from the
    provider registry's rows)."""
    return {row.name: (row.credential_env, row.configured(settings))
            for row in REGISTRY if row.check is not None}


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a Redis URL a fleet can use, in one line, or None."""
    expected = "must be redis://host:port/db, rediss:// (TLS) or unix:///path/to/redis.sock"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number
        redis_parse_url(url)
    except ValueError as exc:
        return f"{expected}: {exc}"
    if parts.scheme in ("redis", "rediss") and not parts.hostname:
        return f"{expected}: no host in {parts.scheme}:// URL"
    if parts.scheme == "unix" and not parts.path:
        return f"{expected}: no socket path"
    return None


def _check_paths(settings: Settings) -> None:
    """The webhook paths are paths, and no stream route sits where the service answers
    HTTP itself (probes, metrics, webhooks)."""
    for key in ("webhook_path", "status_callback_path", "acs_events_path",
                "acs_callback_path"):
        value = getattr(settings, key)
        if not value.startswith("/"):
            raise ConfigError(key, f"must start with '/', like '/{value}'; got {value!r}")
        if value in PROBE_PATHS:
            raise ConfigError(key, f"{value!r} is where the service answers probes and metrics")
        if settings.route_for(value) is not None:
            raise ConfigError(key, f"{value!r} is a stream route: pick another path")
    for index, route in enumerate(settings.routes):
        taken = _answered_by_the_service(settings, route.path)
        if taken:
            raise ConfigError(f"routes[{index}].path",
                              f"{route.path!r} is {taken}: pick another path")


def _answered_by_the_service(settings: Settings, path: str) -> str | None:
    if path in PROBE_PATHS:
        return "a probe or metrics path"
    webhook = settings.webhook_path
    if path == webhook or path.startswith(webhook.rstrip("/") + "/"):
        return f"under the voice webhook path ({webhook})"
    if path == settings.status_callback_path:
        return "the status callback path"
    if path in (settings.acs_events_path, settings.acs_callback_path):
        return "an ACS webhook path"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
