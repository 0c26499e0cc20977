"""Authenticating Azure Communication Services media WebSocket upgrades.

Every upgrade ACS makes carries ``Authorization: Bearer <JWT>``, signed RS256 by ACS: its
issuer is ``https://acscallautomation.communication.azure.com``, its audience the ACS
resource's id (``acs_audience``), and its key one of the JSON Web Key Set at
``acs_jwks_url``. Validated with PyJWT: signature, expiry, issuer,
audience.

The check runs inside the handshake, which must not wait on the network, so the key set
is fetched ahead: when the server starts, every few hours after, and (at most every
:data:`REFETCH_MIN_INTERVAL_S`) when a token names a key id the set does not have, as
after a key rotation; that token is refused meanwhile and ACS's next attempt succeeds.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Final

import jwt
import structlog

__all__ = ["ACS_ISSUER", "AcsAuthenticator"]

logger = structlog.get_logger("streamsvc.providers.acs_auth")

ACS_ISSUER: Final = "https://acscallautomation.communication.azure.com"
DEFAULT_JWKS_URL: Final = ACS_ISSUER + "/calling/keys"
REFRESH_INTERVAL_S: Final = 6 * 3600
REFETCH_MIN_INTERVAL_S: Final = 30.0
FETCH_TIMEOUT_S: Final = 5.0
MAX_JWKS_BYTES: Final = 1 << 20


class AcsAuthenticator:
    """Checks ACS upgrade tokens against ``audience`` with keys from ``jwks_url``. Call
    :meth:`start` once on the running loop; :meth:`problem` per handshake; :meth:`stop`."""

    def __init__(self, audience: str, jwks_url: str = DEFAULT_JWKS_URL) -> None:
        self.audience = audience
        self.jwks_url = jwks_url
        self.keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = -REFETCH_MIN_INTERVAL_S
        self._refresher: asyncio.Task[None] | None = None
        self._fetching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Fetch the key set (a failure is logged, and retried later), then keep it fresh."""
        await self._fetch()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    def stop(self) -> None:
        for task in (self._refresher, self._fetching):
            if task is not None:
                task.cancel()

    def problem(self, authorization: str | None) -> str | None:
        """None when ``authorization`` (the header's value) is a valid ACS bearer token;
        else ``missing_token`` or ``bad_token``."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing_token"
        try:
            key_id = jwt.get_unverified_header(token.strip()).get("kid")
            key = self.keys.get(str(key_id))
            if key is None:
                self._refetch_soon()
                return "bad_token"
            jwt.decode(token.strip(), key.key, algorithms=["RS256"], audience=self.audience,
                       issuer=ACS_ISSUER, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError:
            return "bad_token"
        return None

    def _refetch_soon(self) -> None:
        if time.monotonic() - self._last_fetch < REFETCH_MIN_INTERVAL_S:
            return
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S if self.keys else REFETCH_MIN_INTERVAL_S)
            await self._fetch()

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        try:
            document = await asyncio.to_thread(_download, self.jwks_url)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            logger.error("acs.jwks_failed", url=self.jwks_url, error=str(exc))
            return
        self.keys = {str(key.key_id): key for key in keys if key.key_id}
        logger.info("acs.jwks_loaded", url=self.jwks_url, keys=sorted(self.keys))


def _download(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("key set larger than 1 MiB")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("key set is not a JSON object")
    return document
