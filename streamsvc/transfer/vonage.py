"""A Vonage call's transfer to a person (``PUT /v1/calls/{uuid}`` with an NCCO
``connect``) with the call's context as SIP headers (Vonage sends them as ``X-`` headers) or
to a phone number, through the official ``vonage`` SDK, authenticated as the application
(``vonage_application_id`` and ``vonage_private_key``, a signed JWT)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

from streamsvc.config import Settings
from streamsvc.context.handoff import HeaderPlan
from streamsvc.transfer import TransferError

__all__ = ["configured", "transfer"]


def configured(settings: Settings) -> str | None:
    """None when the Voice API can be used, else what to set."""
    if not (settings.vonage_application_id and settings.vonage_private_key):
        return "vonage_application_id and vonage_private_key"
    if urlsplit(settings.vonage_api_base_url).scheme != "https":
        return "vonage_api_base_url as https:// (the SDK speaks only https)"
    return None


async def transfer(settings: Settings, call_uuid: str, plan: HeaderPlan) -> None:
    """Ask Vonage to move the call to an NCCO that connects the target; TransferError
    says why it would not."""
    await asyncio.to_thread(_transfer, settings, call_uuid, plan)


def _private_key(value: str) -> str:
    """The PEM itself, or the file it is in."""
    return value if value.lstrip().startswith("-----BEGIN") else Path(value).read_text()


def _transfer(settings: Settings, call_uuid: str, plan: HeaderPlan) -> None:
    # The SDK is slow to import and only Vonage deployments need it: imported on first use.
    from vonage import Auth, HttpClientOptions, Vonage
    from vonage_utils.errors import VonageError
    from vonage_voice import Connect, PhoneEndpoint, SipEndpoint

    assert settings.vonage_application_id is not None
    assert settings.vonage_private_key is not None
    target = plan.target
    headers = {name.removeprefix("X-"): value for name, value in plan.sip.items()}
    try:
        endpoint = (SipEndpoint(uri=target.address, headers=headers or None)
                    if target.kind == "sip" else
                    PhoneEndpoint(number=target.address.removeprefix("+")))
        # The caller is presented from one of the application's own numbers.
        connect = Connect(endpoint=[endpoint], randomFromNumber=True)
        client = Vonage(Auth(application_id=settings.vonage_application_id,
                             private_key=_private_key(settings.vonage_private_key)),
                        HttpClientOptions(api_host=urlsplit(settings.vonage_api_base_url).netloc,
                                          max_retries=1))
        client.voice.transfer_call_ncco(call_uuid, [connect])
    except (VonageError, OSError, ValueError) as exc:  # a model's validation: ValueError
        raise TransferError(f"Vonage: {exc}") from None
