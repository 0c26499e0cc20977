"""Genesys AudioHook's upgrade signature: RFC 9421 HTTP message signatures, HMAC-SHA256,
checked as Genesys's reference implementation checks them (developer.genesys.cloud,
AudioHook protocol, "Security"). Pure functions of the upgrade's headers and the keys.

Genesys signs ``"@request-target"``, ``"@authority"``, ``"audiohook-organization-id"``,
``"audiohook-session-id"``, ``"audiohook-correlation-id"`` and ``"x-api-key"`` with the
integration's client secret (base64, decoded into the HMAC key), ``keyid`` = the API key.
A signature holds when it covers all six, ``alg`` is ``hmac-sha256``, ``keyid`` equals the
``X-API-KEY`` header, its ``nonce`` has at least 22 characters, it was ``created`` at most
:data:`MAX_AGE_S` ago (:data:`CLOCK_SKEW_S` either way) and has not ``expires``-d, and the
HMAC matches one of the configured (API key, client secret) pairs (two during a rotation).
An unknown API key costs the same HMAC work, with a random key. RFC 9421's parsing and
signature base are ``http-message-signatures``'s (with ``http-sf``), which reproduces the
reference implementation's test vector (``tests/test_genesys.py``).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import secrets
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Final
from urllib.parse import urlsplit

import http_message_signatures as hms

from streamsvc.wire import Upgrade

__all__ = [
    "API_KEY_HEADER",
    "COVERED",
    "GenesysKey",
    "nonce_of",
    "sign_headers",
    "signature_problem",
]

API_KEY_HEADER: Final = "x-api-key"
COVERED: Final = ("@request-target", "@authority", "audiohook-organization-id",
                  "audiohook-session-id", "audiohook-correlation-id", "x-api-key")
MAX_AGE_S: Final = 10
CLOCK_SKEW_S: Final = 3
MIN_NONCE_CHARS: Final = 22
_NONCE_MARK: Final = 'nonce="'


class GenesysKey(SimpleNamespace):
    """One (API key, client secret) pair: ``api_key`` as given, ``secret`` the decoded
    client secret."""

    api_key: str
    secret: bytes

    @classmethod
    def of(cls, api_key: str, client_secret: str) -> GenesysKey:
        """ValueError when the client secret is not base64 (as Genesys gives it)."""
        try:
            secret = base64.b64decode(client_secret, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the Genesys client secret is not base64") from None
        return cls(api_key=api_key, secret=secret)


class _Keys(hms.HTTPSignatureKeyResolver):
    def __init__(self, keys: Sequence[GenesysKey], api_key: str) -> None:
        self.keys = [key.secret for key in keys if hmac.compare_digest(key.api_key, api_key)]
        self.unknown = not self.keys

    def resolve_public_key(self, key_id: str) -> bytes:
        # Tried in turn by signature_problem; an unknown key is checked with a random one.
        return self.keys.pop(0) if self.keys else secrets.token_bytes(32)

    def resolve_private_key(self, key_id: str) -> bytes:
        return self.resolve_public_key(key_id)


def nonce_of(upgrade: Upgrade) -> str | None:
    """The ``nonce`` parameter of the upgrade's ``signature-input`` (for replay memory),
    or None."""
    value = upgrade.get("signature-input") or ""
    start = value.find(_NONCE_MARK)
    if start < 0:
        return None
    start += len(_NONCE_MARK)
    end = value.find('"', start)
    return value[start:end] if end > start else None


def _requests(upgrade: Upgrade, public_ws_base: str | None) -> list[SimpleNamespace]:
    """The request as Genesys may have signed it: its authority as it arrived (Host) or as
    the public URL names it, its target as it arrived or with the public URL's path prefix
    (a proxy in front may rewrite either)."""
    headers = [(name, value) for name, value in upgrade.headers]
    target = upgrade.path + (f"?{upgrade.query}" if upgrade.query else "")
    authorities, targets = [upgrade.get("host")], [target]
    if public_ws_base:  # the public URL's host, and its path prefix (stripped on the way in)
        base = urlsplit(public_ws_base)
        authorities.append(base.netloc)
        targets.append(base.path.rstrip("/") + target)
    candidates = [f"https://{authority}{path}" for authority in authorities if authority
                  for path in targets]
    return [SimpleNamespace(method="GET", url=url, headers=_Headers(headers))
            for url in dict.fromkeys(candidates)]


class _Headers:
    """The upgrade's headers as the library reads a request's (repeats combined)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return self.pairs

    def __contains__(self, name: object) -> bool:
        return any(key == str(name).lower() for key, _ in self.pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = [value for key, value in self.pairs if key == name.lower()]
        return ", ".join(values) if values else default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(dict.fromkeys(key for key, _ in self.pairs))


def signature_problem(upgrade: Upgrade, keys: Sequence[GenesysKey], *,
                      public_ws_base: str | None = None,
                      now: float | None = None) -> str | None:
    """Why the upgrade's signature does not hold (``missing_signature``,
    ``bad_signature``, ``expired_signature``), or None when it does (see the module
    docstring)."""
    api_keys = upgrade.all(API_KEY_HEADER)
    if not upgrade.all("signature") or not upgrade.all("signature-input") or not api_keys:
        return "missing_signature"
    if (len(api_keys) > 1 or len(upgrade.all("signature")) > 1
            or len(upgrade.all("signature-input")) > 1):
        return "bad_signature"
    api_key = api_keys[0].strip()
    moment = time.time() if now is None else now
    outcome = "bad_signature"
    for request in _requests(upgrade, public_ws_base):
        resolver = _Keys(keys, api_key)
        for _ in range(max(1, len(resolver.keys))):
            verifier = hms.HTTPMessageVerifier(signature_algorithm=hms.algorithms.HMAC_SHA256,
                                               key_resolver=resolver)
            try:
                results = verifier.verify(request, max_age=None,
                                          require_components=COVERED)
            except hms.HTTPMessageSignaturesException:
                continue
            found = _parameters_problem(results, api_key, moment)
            if found is None and not resolver.unknown:
                return None
            if found == "expired_signature":
                outcome = found
    return outcome


def _parameters_problem(results: Sequence[hms.VerifyResult], api_key: str,
                        moment: float) -> str | None:
    for result in results:
        parameters = result.parameters
        nonce, created = parameters.get("nonce"), parameters.get("created")
        expires = parameters.get("expires")
        if (parameters.get("alg", "hmac-sha256") != "hmac-sha256"
                or parameters.get("keyid") != api_key
                or not isinstance(nonce, str) or len(nonce) < MIN_NONCE_CHARS
                or not isinstance(created, int)):
            return "bad_signature"
        if (created > moment + CLOCK_SKEW_S or created + MAX_AGE_S < moment - CLOCK_SKEW_S
                or (isinstance(expires, int) and expires < moment - CLOCK_SKEW_S)):
            return "expired_signature"
        return None
    return "bad_signature"


def sign_headers(url: str, key: GenesysKey, *, organization_id: str, session_id: str,
                 correlation_id: str, nonce: str | None = None,
                 created: float | None = None) -> dict[str, str]:
    """The headers Genesys sends with an upgrade to ``url`` (``wss://host/path``), signed
    with ``key``: the replay client's side of :func:`signature_problem`."""
    parts = urlsplit(url)
    headers = {"audiohook-organization-id": organization_id,
               "audiohook-session-id": session_id,
               "audiohook-correlation-id": correlation_id,
               "x-api-key": key.api_key}
    request = SimpleNamespace(method="GET", url=f"https://{parts.netloc}{parts.path}"
                              + (f"?{parts.query}" if parts.query else ""),
                              headers={"host": parts.netloc, **headers})
    signer = hms.HTTPMessageSigner(signature_algorithm=hms.algorithms.HMAC_SHA256,
                                   key_resolver=_Keys([key], key.api_key))
    moment = time.time() if created is None else created
    signer.sign(request, key_id=key.api_key, covered_component_ids=COVERED,
                label="sig1", include_alg=True,
                created=datetime.datetime.fromtimestamp(moment, datetime.UTC),
                expires=datetime.datetime.fromtimestamp(moment + 60, datetime.UTC),
                nonce=nonce or base64.b64encode(secrets.token_bytes(24)).decode())
    return {**headers, "signature-input": request.headers["Signature-Input"],
            "signature": request.headers["Signature"]}
