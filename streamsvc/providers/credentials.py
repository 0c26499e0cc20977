"""The credentials a stream's upgrade is checked against, and each provider's check: a pure
function of the upgrade (:class:`~streamsvc.wire.Upgrade`) and :class:`Credentials`.

A check returns the reason it refuses (``missing_token``, ``bad_token``,
``missing_signature``, ``bad_signature``) or None. A credential header sent more than once
is refused as a bad credential: which copy a proxy or a parser would take is not ours to
guess. The provider registry (:mod:`streamsvc.providers`) names each provider's check.
"""

from __future__ import annotations

import base64
import collections
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import jwt

from streamsvc.providers import plivo, vonage
from streamsvc.providers.genesys_auth import GenesysKey, nonce_of
from streamsvc.providers.genesys_auth import signature_problem as genesys_signature_problem
from streamsvc.providers.signature import signature_problem
from streamsvc.wire import Upgrade

__all__ = [
    "AcsTokenCheck",
    "Credentials",
    "NonceMemory",
    "acs_problem",
    "asterisk_problem",
    "basic",
    "bearer",
    "exotel_problem",
    "genesys_problem",
    "jambonz_problem",
    "jwt_algorithm",
    "parse_connection_string",
    "plivo_problem",
    "signalwire_problem",
    "telnyx_problem",
    "twilio_problem",
    "vonage_problem",
]

TWILIO_SIGNATURE: Final = "x-twilio-signature"
# How long a Plivo nonce is remembered, and how many at most (oldest forgotten first).
NONCE_TTL_S: Final = 3600.0
MAX_NONCES: Final = 100_000
TELNYX_TOKEN: Final = "x-telnyx-streaming-auth-token"
AUTHORIZATION: Final = "authorization"


class AcsTokenCheck(Protocol):
    """ACS's bearer-token check (:class:`~streamsvc.providers.acs_auth.AcsAuthenticator`,
    which keeps ACS's signing keys fresh)."""

    def problem(self, authorization: str | None) -> str | None: ...


class NonceMemory:
    """The signature nonces already used (Plivo's), each for ``ttl_s``, at most
    ``max_entries`` (the oldest forgotten first): a captured signature and nonce open one
    stream, not any number."""

    def __init__(self, *, ttl_s: float = NONCE_TTL_S, max_entries: int = MAX_NONCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s, self._max_entries, self._clock = ttl_s, max_entries, clock
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def first_use(self, nonce: str) -> bool:
        """True the first time ``nonce`` is seen within its window (and remember it)."""
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + self._ttl_s
        while len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
        return True


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the upgrades are checked against; a provider whose credential is unset is not
    checked (its row's ``configured`` is False). Built by the server from its settings."""

    public_ws_base: str | None = None  # the ws(s):// base signatures are made over
    # Named as the settings are (a registry row's ``settings`` name them).
    auth_token: str | None = None
    auth_token_previous: str | None = None
    acs_audience: str | None = None
    acs: AcsTokenCheck | None = None  # checks tokens for acs_audience
    telnyx_stream_token: str | None = None
    signalwire_token: str | None = None
    exotel_basic_auth: str | None = None
    plivo_auth_token: str | None = None
    vonage_token: str | None = None
    vonage_signature_secret: str | None = None
    vonage_application_id: str | None = None  # bound into Vonage's JWTs when set
    genesys_keys: tuple[GenesysKey, ...] = ()  # (API key, client secret), two in a rotation
    asterisk_basic_auth: str | None = None
    jambonz_basic_auth: str | None = None
    # Plivo's nonces seen (None: not remembered).
    nonces: NonceMemory | None = None

    @property
    def genesys_api_key(self) -> str | None:
        """The API key of the first Genesys pair (the registry row's setting), or None."""
        return self.genesys_keys[0].api_key if self.genesys_keys else None


class _Repeated(Exception):
    """A credential header came more than once."""


def _single(upgrade: Upgrade, name: str) -> str | None:
    values = upgrade.all(name)
    if len(values) > 1:
        raise _Repeated(name)
    return values[0] if values else None


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def basic(authorization: str | None) -> str | None:
    """The ``user:password`` of an ``Authorization: Basic`` header, or None."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8") or None
    except (ValueError, UnicodeDecodeError):
        return None


def jwt_algorithm(token: str) -> str | None:
    """The ``alg`` a JWT's header names (unverified), or None."""
    try:
        return str(jwt.get_unverified_header(token).get("alg"))
    except jwt.InvalidTokenError:
        return None


def _url(credentials: Credentials, upgrade: Upgrade, *, query: bool = False) -> str:
    base = credentials.public_ws_base
    assert base is not None  # load_settings requires public_url with a signing token
    return base + upgrade.path + (f"?{upgrade.query}" if query and upgrade.query else "")


def twilio_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """X-Twilio-Signature over the public URL of the path (Twilio's Media Streams pages)."""
    try:
        signature = _single(upgrade, TWILIO_SIGNATURE)
    except _Repeated:
        return "bad_signature"
    tokens = [t for t in (credentials.auth_token, credentials.auth_token_previous) if t]
    return signature_problem(signature, _url(credentials, upgrade), tokens)


def acs_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """An ACS-signed RS256 bearer token for the resource (``acs_audience``)."""
    if credentials.acs is None:  # no route of ACS's: nothing admits its tokens
        return "bad_token"
    try:
        return credentials.acs.problem(_single(upgrade, AUTHORIZATION))
    except _Repeated:
        return "bad_token"


def _token_problem(expected: str | None, given: str | None) -> str | None:
    if not given:
        return "missing_token"
    if not hmac.compare_digest(given.encode(), (expected or "").encode()):
        return "bad_token"
    return None


def telnyx_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``x-telnyx-streaming-auth-token`` is the ``stream_auth_token`` given to Telnyx."""
    try:
        given = _single(upgrade, TELNYX_TOKEN)
    except _Repeated:
        return "bad_token"
    return _token_problem(credentials.telnyx_stream_token, given)


def signalwire_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``Authorization: Bearer`` with the ``<Stream authBearerToken>`` SignalWire was given."""
    try:
        given = bearer(_single(upgrade, AUTHORIZATION))
    except _Repeated:
        return "bad_token"
    return _token_problem(credentials.signalwire_token, given)


def _basic_problem(upgrade: Upgrade, expected: str | None) -> str | None:
    try:
        given = basic(_single(upgrade, AUTHORIZATION))
    except _Repeated:
        return "bad_token"
    return _token_problem(expected, given)


def exotel_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``Authorization: Basic`` with the applet URL's ``KEY:TOKEN``."""
    return _basic_problem(upgrade, credentials.exotel_basic_auth)


def asterisk_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``Authorization: Basic`` with the ``websocket_client.conf`` connection's
    ``username:password``."""
    return _basic_problem(upgrade, credentials.asterisk_basic_auth)


def jambonz_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``Authorization: Basic`` with the ``listen`` verb's ``wsAuth`` ``username:password``."""
    return _basic_problem(upgrade, credentials.jambonz_basic_auth)


def plivo_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """``X-Plivo-Signature-V3`` and its nonce over the public URL with its query."""
    try:
        signature = _single(upgrade, plivo.SIGNATURE_V3_HEADER)
        nonce = _single(upgrade, plivo.NONCE_HEADER)
    except _Repeated:
        return "bad_signature"
    if not signature or not nonce:
        return "missing_signature"
    assert credentials.plivo_auth_token is not None
    if not plivo.signature_ok(credentials.plivo_auth_token,
                              _url(credentials, upgrade, query=True), signature, nonce):
        return "bad_signature"
    if credentials.nonces is not None and not credentials.nonces.first_use(nonce):
        return "replayed_signature"
    return None


def vonage_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """A JWT signed with ``vonage_signature_secret``, or the ``vonage_token`` value (as it
    is or as a bearer token)."""
    try:
        authorization = _single(upgrade, AUTHORIZATION)
    except _Repeated:
        return "bad_token"
    if not authorization:
        return "missing_token"
    secret = credentials.vonage_signature_secret
    problem = None
    if secret:
        problem = vonage.jwt_problem(secret, authorization,
                                     application_id=credentials.vonage_application_id)
        if problem is None:
            return None
    token = credentials.vonage_token
    if token and vonage.token_matches(token, authorization):
        return None
    return "wrong_application" if problem == "wrong_application" else "bad_token"


def genesys_problem(upgrade: Upgrade, credentials: Credentials) -> str | None:
    """Genesys AudioHook's RFC 9421 signature with one of the integration's key pairs
    (:mod:`streamsvc.providers.genesys_auth`); a nonce seen before is a replay."""
    problem = genesys_signature_problem(upgrade, credentials.genesys_keys,
                                        public_ws_base=credentials.public_ws_base)
    if problem is not None:
        return problem
    nonce = nonce_of(upgrade)
    if credentials.nonces is not None and nonce and not credentials.nonces.first_use(
            "genesys:" + nonce):
        return "replayed_signature"
    return None


def parse_connection_string(connection_string: str) -> tuple[str, str]:
    """ACS's ``endpoint=https://host/;accesskey=KEY`` -> (endpoint, key); ValueError otherwise."""
    parts = {}
    for element in connection_string.split(";"):
        name, _, value = element.partition("=")
        parts[name.strip().lower()] = value.strip()
    endpoint, key = parts.get("endpoint", ""), parts.get("accesskey", "")
    if not endpoint or not key:
        raise ValueError("the ACS connection string needs endpoint= and accesskey=")
    return endpoint.rstrip("/"), key
