"""A Telnyx call's transfer to a person (``POST /v2/calls/{call_control_id}/actions/
transfer``) with the call's context as ``X-`` SIP headers (``custom_headers``) and the
call's id in ``client_state`` (base64, handed back on the call's later webhooks), through
the official ``telnyx`` SDK."""

from __future__ import annotations

import base64
import json

from streamsvc.config import Settings
from streamsvc.context.handoff import CALL_ID_NAME, HeaderPlan
from streamsvc.transfer import TransferError

__all__ = ["transfer"]


async def transfer(settings: Settings, call_control_id: str, plan: HeaderPlan, *,
                   call_id: str) -> None:
    """Ask Telnyx to transfer the call; TransferError says why it would not."""
    # The SDK is slow to import and only Telnyx deployments need it: imported on first use.
    from telnyx import APIError, AsyncTelnyx

    assert settings.telnyx_api_key is not None
    target = plan.target
    to = target.address if target.kind == "tel" else str(target)
    state = base64.b64encode(json.dumps({CALL_ID_NAME: call_id}).encode()).decode()
    async with AsyncTelnyx(api_key=settings.telnyx_api_key,
                           base_url=settings.telnyx_api_base_url, max_retries=1) as client:
        try:
            await client.calls.actions.transfer(
                call_control_id, to=to, client_state=state,
                custom_headers=[{"name": name, "value": value}
                                for name, value in plan.sip.items()])
        except APIError as exc:
            raise TransferError(f"Telnyx: {exc}") from None
