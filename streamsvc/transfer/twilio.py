"""A Twilio call's update with new TwiML (``calls(sid).update``), through the official
``twilio`` SDK: how a call on a ``<Start>`` route is handed to a person. The TwiML goes
inline up to Twilio's 4,000 characters (error 32018 beyond), else as ``url=`` to the
service's own hand-off endpoint, which answers it."""

from __future__ import annotations

import asyncio

from streamsvc.config import Settings
from streamsvc.transfer import TransferError

__all__ = ["TwilioCalls", "configured"]


def configured(settings: Settings) -> str | None:
    """None when the REST API can be used, else what to set."""
    if not settings.twilio_account_sid:
        return "twilio_account_sid"
    if not (settings.auth_token or (settings.twilio_api_key and settings.twilio_api_secret)):
        return "auth_token (or twilio_api_key and twilio_api_secret)"
    return None


class TwilioCalls:
    """The REST API's calls of the account (``twilio_account_sid``), authenticated with an
    API key and secret when set, else the auth token."""

    def __init__(self, settings: Settings) -> None:
        # The SDK is slow to import and only <Start> hand-offs need it: imported here.
        from twilio.rest import Client

        assert configured(settings) is None
        account = settings.twilio_account_sid
        key, secret = settings.twilio_api_key, settings.twilio_api_secret
        if key and secret:
            self.client = Client(key, secret, account_sid=account)
        else:
            self.client = Client(account, settings.auth_token)
        self.client.api.base_url = settings.twilio_api_base_url.rstrip("/")

    async def update(self, call_sid: str, *, twiml: str | None = None,
                     url: str | None = None) -> None:
        """Run ``twiml`` (or what ``url`` answers) on the call now; TransferError says why
        not."""
        await asyncio.to_thread(self._update, call_sid, twiml, url)

    def _update(self, call_sid: str, twiml: str | None, url: str | None) -> None:
        from twilio.base.exceptions import TwilioException, TwilioRestException

        try:
            if twiml is not None:
                self.client.calls(call_sid).update(twiml=twiml)
            else:
                self.client.calls(call_sid).update(url=url, method="POST")
        except TwilioRestException as exc:
            raise TransferError(f"Twilio answered {exc.status}: {exc.msg}") from None
        except (TwilioException, OSError) as exc:
            raise TransferError(f"Twilio's REST API: {exc}") from None
