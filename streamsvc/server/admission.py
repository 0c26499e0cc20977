"""Which stream upgrades the server takes: the route, the route's provider's credential
(from the provider registry, :mod:`streamsvc.providers`), and room for one more call.

On an ``auto`` route the credential decides the provider: every configured provider whose
kind of credential the upgrade carries is checked, and the first whose check passes is the
stream's provider, its codec the stream's codec (the first message is never allowed to
change it). Only where no provider's credential is configured at all is the provider told
from the stream itself (:class:`~streamsvc.providers.auto.AutoCodec`).
"""

from __future__ import annotations

import http
from dataclasses import dataclass

from streamsvc.config import Route, Settings
from streamsvc.providers import AUTO, REGISTRY, Provider, provider
from streamsvc.providers.credentials import AcsTokenCheck, Credentials, NonceMemory
from streamsvc.providers.genesys_auth import GenesysKey
from streamsvc.wire import Upgrade

__all__ = ["Admitted", "Refused", "credentials_of", "decide", "route_auth"]


@dataclass(frozen=True, slots=True)
class Admitted:
    """An upgrade taken: its route, the upgrade, and the provider whose codec serves it
    (the ``auto`` row: told from the stream)."""

    route: Route
    upgrade: Upgrade
    provider: Provider
    address: str | None = None  # the client's address, as the socket says

    def subprotocol(self) -> str | None:
        """The subprotocol the handshake answers with: one the client offered that the
        provider speaks (jambonz's ``audio.jambonz.org``), else None (the answer then
        names none, as Asterisk requires of a server it offered none)."""
        offered = [name.strip() for value in self.upgrade.all("sec-websocket-protocol")
                   for name in value.split(",") if name.strip()]
        return self.provider.subprotocol(offered) if offered else None


@dataclass(frozen=True, slots=True)
class Refused:
    """An upgrade refused: the HTTP status and the logged reason."""

    status: http.HTTPStatus
    reason: str
    # A credential refusal: the route's provider and where its credential is set.
    provider: str | None = None
    credential: str | None = None


def credentials_of(settings: Settings, acs: AcsTokenCheck | None = None,
                   nonces: NonceMemory | None = None) -> Credentials:
    """What upgrades are checked against, from the settings (``acs``: ACS's token check,
    which keeps its signing keys; ``nonces``: the Plivo nonces already used)."""
    return Credentials(
        public_ws_base=settings.public_base("ws"),
        auth_token=settings.auth_token,
        auth_token_previous=settings.auth_token_previous,
        acs_audience=settings.acs_audience,
        acs=acs,
        telnyx_stream_token=settings.telnyx_stream_token,
        signalwire_token=settings.signalwire_token,
        exotel_basic_auth=settings.exotel_basic_auth,
        plivo_auth_token=settings.plivo_auth_token,
        vonage_token=settings.vonage_token,
        vonage_signature_secret=settings.vonage_signature_secret,
        vonage_application_id=settings.vonage_application_id,
        genesys_keys=tuple(
            GenesysKey.of(key, secret) for key, secret in (
                (settings.genesys_api_key, settings.genesys_client_secret),
                (settings.genesys_api_key_previous, settings.genesys_client_secret_previous))
            if key and secret),
        asterisk_basic_auth=settings.asterisk_basic_auth,
        jambonz_basic_auth=settings.jambonz_basic_auth,
        nonces=nonces,
    )


def decide(route: Route, upgrade: Upgrade, credentials: Credentials) -> Admitted | Refused:
    """Admit ``upgrade`` on ``route`` by its provider's credential check, or refuse it
    (403 with the check's reason)."""
    row = provider(route.provider)
    if row is AUTO:
        return _decide_auto(route, upgrade, credentials)
    if row.check is not None and row.configured(credentials):
        problem = row.check(upgrade, credentials)
        if problem is not None:
            return Refused(http.HTTPStatus.FORBIDDEN, problem, row.name, row.credential_env)
    return Admitted(route, upgrade, row)


def _decide_auto(route: Route, upgrade: Upgrade, credentials: Credentials) -> Admitted | Refused:
    configured = [row for row in REGISTRY if row.check is not None
                  and row.configured(credentials)]
    if not configured:
        return Admitted(route, upgrade, AUTO)
    first_problem: str | None = None
    for row in configured:
        if not row.claims(upgrade):
            continue
        assert row.check is not None
        problem = row.check(upgrade, credentials)
        if problem is None:
            return Admitted(route, upgrade, row)
        first_problem = first_problem or problem
    return Refused(http.HTTPStatus.FORBIDDEN, first_problem or "missing_token", AUTO.name,
                   "the providers' stream credentials")


def route_auth(route: Route, settings: Settings) -> str | None:
    """What a route's upgrades are checked with (``server.listening``'s ``auth``), or None
    when nothing is checked."""
    row = provider(route.provider)
    if row is AUTO:
        checked = [row.credential for row in REGISTRY
                   if row.credential and row.configured(settings)]
        return "any of: " + "; ".join(checked) if checked else None
    return row.credential if row.configured(settings) else None
