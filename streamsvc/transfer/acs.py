"""An ACS call's transfer to a person (``transfer_call_to_participant``) with the call's
context as custom calling context (SIP ``X-MS-Custom-`` headers to a phone number, VoIP
headers to an ACS user), through the official Call Automation SDK, on the endpoint of
``acs_connection_string``. Its outcome arrives later as the ``CallTransferAccepted`` or
``CallTransferFailed`` callback, matched by the operation context."""

from __future__ import annotations

import asyncio

from streamsvc.context.handoff import ACS_OPERATION_PREFIX, HeaderPlan
from streamsvc.providers.credentials import parse_connection_string
from streamsvc.transfer import TransferError

__all__ = ["transfer"]


async def transfer(connection_string: str, call_connection_id: str, plan: HeaderPlan, *,
                   call_id: str, callback_url: str | None) -> None:
    """Ask ACS to transfer the call; TransferError says why it would not."""
    await asyncio.to_thread(_transfer, connection_string, call_connection_id, plan, call_id,
                            callback_url)


def _transfer(connection_string: str, call_connection_id: str, plan: HeaderPlan,
              call_id: str, callback_url: str | None) -> None:
    # The SDK is slow to import and only ACS deployments need it: imported on first use.
    from azure.communication.callautomation import (
        CallAutomationClient,
        CommunicationUserIdentifier,
        PhoneNumberIdentifier,
    )
    from azure.core.credentials import AzureKeyCredential
    from azure.core.exceptions import AzureError

    target = plan.target
    identifier = (PhoneNumberIdentifier(target.address) if target.kind == "tel"
                  else CommunicationUserIdentifier(target.address))
    try:
        endpoint, access_key = parse_connection_string(connection_string)
        # The endpoint as written: the SDK's own parser would force https on it.
        client = CallAutomationClient(endpoint, AzureKeyCredential(access_key))
        client.get_call_connection(call_connection_id).transfer_call_to_participant(
            identifier, operation_context=ACS_OPERATION_PREFIX + call_id,
            operation_callback_url=callback_url,
            sip_headers=plan.sip or None, voip_headers=plan.voip or None)
    except (AzureError, ValueError) as exc:
        raise TransferError(f"ACS: {exc}") from None
