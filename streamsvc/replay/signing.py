"""How a replay signs each upgrade as the fixture's provider would: one signer per provider
with a stream credential (the provider registry's rows with a ``check``), from the same
secrets the server is configured with.

* Twilio: ``X-Twilio-Signature`` over the stream URL Twilio was given (``public_url`` plus
  the path), HMAC-SHA1 with the auth token;
* SignalWire: ``Authorization: Bearer`` with the ``<Stream authBearerToken>``;
* Telnyx: ``x-telnyx-streaming-auth-token`` with the ``stream_auth_token``;
* Exotel: ``Authorization: Basic`` with the applet URL's ``KEY:TOKEN``;
* Plivo: ``X-Plivo-Signature-V3`` over the public URL with its query and a fresh nonce
  (``X-Plivo-Signature-V3-Nonce``);
* Vonage: a fresh HS256 JWT signed with the signature secret, else the custom token;
* ACS: an RS256 JWT with ACS's issuer and the resource id as audience, signed with a local
  key whose public half the server reads from ``acs_jwks_url`` (:func:`write_acs_keys`);
* Asterisk, jambonz: ``Authorization: Basic`` with ``USER:PASSWORD``;
* Genesys: an RFC 9421 signature (HMAC-SHA256 with the client secret, ``keyid`` the API
  key) over the stream URL and the ``audiohook-*`` headers, with ``X-API-KEY``.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from streamsvc.providers.acs_auth import ACS_ISSUER
from streamsvc.providers.genesys_auth import GenesysKey, sign_headers
from streamsvc.providers.plivo import NONCE_HEADER, SIGNATURE_V3_HEADER, sign_v3
from streamsvc.providers.signature import SIGNATURE_HEADER, sign

__all__ = ["SIGNERS", "Signer", "Signing", "acs_token", "signed_url", "upgrade_headers",
           "write_acs_keys"]

DEFAULT_ACS_KID: Final = "streamsvc-replay"
TELNYX_TOKEN: Final = "x-telnyx-streaming-auth-token"
_AUTHORIZATION: Final = frozenset({"authorization"})
ACS_KEY_FILE: Final = "acs-signing-key.pem"
ACS_JWKS_FILE: Final = "acs-jwks.json"


@dataclass(frozen=True, slots=True)
class Signing:
    """The secrets a replay signs with (any unset: that provider's upgrades go unsigned)."""

    public_url: str | None = None  # the origin the provider was given (public_url)
    auth_token: str | None = None
    signalwire_token: str | None = None
    telnyx_stream_token: str | None = None
    exotel_basic_auth: str | None = None
    plivo_auth_token: str | None = None
    vonage_token: str | None = None
    vonage_signature_secret: str | None = None
    vonage_application_id: str | None = None  # the JWT's application_id claim
    acs_key_pem: bytes | None = None
    acs_audience: str | None = None
    acs_kid: str = DEFAULT_ACS_KID
    genesys_api_key: str | None = None
    genesys_client_secret: str | None = None  # base64, as Genesys shows it
    asterisk_basic_auth: str | None = None  # USER:PASSWORD
    jambonz_basic_auth: str | None = None  # USER:PASSWORD


@dataclass(frozen=True, slots=True)
class Signer:
    """One provider's way of signing an upgrade, and what to give replay for it (the hint
    of a refused handshake)."""

    # (url, secrets, the upgrade's other headers) -> the headers that sign it
    sign: Callable[[str, Signing, Mapping[str, str]], dict[str, str]]
    needs: str
    headers: frozenset[str]  # the headers it sends, lower-case


def signed_url(url: str, public_url: str | None, *, query: bool = False) -> str:
    """``url`` as the provider was given it: on ``public_url``'s origin (its ``ws``/``wss``
    form, path prefix included) when one is given; ``query``: with ``url``'s query."""
    parts = urlsplit(url)
    if not public_url:
        return url if query else url.split("?", 1)[0]
    public = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws"}.get(public.scheme, public.scheme)
    prefix = public.path.rstrip("/")
    path = parts.path
    if prefix and not path.startswith(prefix + "/"):
        path = prefix + path
    signed = f"{scheme}://{public.netloc}{path}"
    return signed + (f"?{parts.query}" if query and parts.query else "")


def acs_token(private_key_pem: bytes, audience: str, *, kid: str,
              lifetime_s: float = 3600) -> str:
    """A bearer JWT shaped like the ones ACS signs its media upgrades with (RS256, ACS's
    issuer, ``audience``, an expiry), made with ``private_key_pem``: for replaying at a
    server whose ``acs_jwks_url`` publishes the matching public key as ``kid``."""
    claims = {"iss": ACS_ISSUER, "aud": audience, "iat": int(time.time()),
              "exp": int(time.time() + lifetime_s)}
    return jwt.encode(claims, private_key_pem, algorithm="RS256", headers={"kid": kid})


def write_acs_keys(directory: Path, kid: str = DEFAULT_ACS_KID) -> tuple[Path, Path]:
    """A fresh RSA signing key (PEM, readable by its owner only) and its JWKS in
    ``directory``: point the server's ``acs_jwks_url`` at the JWKS (``file://``) and
    replay's ``--acs-token`` at the key. Returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path, jwks_path = directory / ACS_KEY_FILE, directory / ACS_JWKS_FILE
    key_path.touch(mode=0o600)
    key_path.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    jwks_path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig",
                                               "alg": "RS256"}]}), encoding="utf-8")
    return key_path, jwks_path


def _twilio(url: str, signing: Signing, headers: Mapping[str, str]) -> dict[str, str]:
    if not signing.auth_token:
        return {}
    return {SIGNATURE_HEADER: sign(signing.auth_token, signed_url(url, signing.public_url))}


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _basic(user_password: str | None) -> dict[str, str]:
    if not user_password:
        return {}
    encoded = base64.b64encode(user_password.encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def _plivo(url: str, signing: Signing, headers: Mapping[str, str]) -> dict[str, str]:
    if not signing.plivo_auth_token:
        return {}
    nonce = str(secrets.randbelow(10**20))
    target = signed_url(url, signing.public_url, query=True)
    return {SIGNATURE_V3_HEADER: sign_v3(signing.plivo_auth_token, target, nonce),
            NONCE_HEADER: nonce}


def _vonage(url: str, signing: Signing, headers: Mapping[str, str]) -> dict[str, str]:
    if signing.vonage_signature_secret:
        claims = {"iat": int(time.time()), "jti": str(uuid.uuid4())}
        if signing.vonage_application_id:
            claims["application_id"] = signing.vonage_application_id
        return _bearer(jwt.encode(claims, signing.vonage_signature_secret,
                                  algorithm="HS256"))
    return _bearer(signing.vonage_token)


def _acs(url: str, signing: Signing, headers: Mapping[str, str]) -> dict[str, str]:
    if not signing.acs_key_pem or not signing.acs_audience:
        return {}
    return _bearer(acs_token(signing.acs_key_pem, signing.acs_audience, kid=signing.acs_kid))


def _genesys(url: str, signing: Signing, headers: Mapping[str, str]) -> dict[str, str]:
    if not signing.genesys_api_key or not signing.genesys_client_secret:
        return {}
    given = {name.lower(): value for name, value in headers.items()}
    key = GenesysKey.of(signing.genesys_api_key, signing.genesys_client_secret)
    return sign_headers(
        signed_url(url, signing.public_url, query=True), key,
        organization_id=given.get("audiohook-organization-id") or str(uuid.uuid4()),
        session_id=given.get("audiohook-session-id") or str(uuid.uuid4()),
        correlation_id=given.get("audiohook-correlation-id") or str(uuid.uuid4()))


SIGNERS: Final[dict[str, Signer]] = {
    "twilio": Signer(_twilio, "--auth-token (or TWILIO_AUTH_TOKEN) and --public-url",
                     frozenset({SIGNATURE_HEADER.lower()})),
    "signalwire": Signer(lambda url, s, h: _bearer(s.signalwire_token),
                         "--signalwire-token (or STREAMSVC_SIGNALWIRE_TOKEN)",
                         _AUTHORIZATION),
    "telnyx": Signer(lambda url, s, h: {TELNYX_TOKEN: s.telnyx_stream_token}
                     if s.telnyx_stream_token else {},
                     "--telnyx-token (or STREAMSVC_TELNYX_STREAM_TOKEN)",
                     frozenset({TELNYX_TOKEN})),
    "exotel": Signer(lambda url, s, h: _basic(s.exotel_basic_auth),
                     "--exotel-basic-auth KEY:TOKEN (or STREAMSVC_EXOTEL_BASIC_AUTH)",
                     _AUTHORIZATION),
    "asterisk": Signer(lambda url, s, h: _basic(s.asterisk_basic_auth),
                       "--asterisk-basic-auth USER:PASSWORD (or "
                       "STREAMSVC_ASTERISK_BASIC_AUTH)", _AUTHORIZATION),
    "jambonz": Signer(lambda url, s, h: _basic(s.jambonz_basic_auth),
                      "--jambonz-basic-auth USER:PASSWORD (or STREAMSVC_JAMBONZ_BASIC_AUTH)",
                      _AUTHORIZATION),
    "plivo": Signer(_plivo, "--plivo-auth-token (or PLIVO_AUTH_TOKEN) and --public-url",
                    frozenset({SIGNATURE_V3_HEADER, NONCE_HEADER})),
    "vonage": Signer(_vonage, "--vonage-signature-secret (or VONAGE_SIGNATURE_SECRET) or "
                     "--vonage-token (or STREAMSVC_VONAGE_TOKEN)", _AUTHORIZATION),
    "acs": Signer(_acs, "--acs-token KEY.pem and --acs-audience (streamsvc fixture acs-keys "
                  "makes a key the server can check)", _AUTHORIZATION),
    "genesys": Signer(_genesys, "--genesys-api-key and --genesys-client-secret (or "
                      "STREAMSVC_GENESYS_API_KEY and STREAMSVC_GENESYS_CLIENT_SECRET)",
                      frozenset({"signature", "signature-input", "x-api-key"})),
}


def upgrade_headers(provider: str, url: str, signing: Signing,
                    headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers that sign an upgrade of ``provider``'s to ``url`` (none for a provider
    without a stream credential, or without its secret in ``signing``); ``headers``: the
    upgrade's others (Genesys signs its ``audiohook-*`` headers too)."""
    signer = SIGNERS.get(provider)
    return signer.sign(url, signing, headers or {}) if signer else {}
