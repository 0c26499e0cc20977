"""Handing a call to a person through a platform's REST API, with the official SDKs: the
hand-offs a stream's own protocol cannot carry (a Twilio ``<Start>`` route: the call's
update with the hand-off's TwiML). Each platform's base URL is a setting, so the tests reach
a local stand-in that checks the SDK's real requests."""

from __future__ import annotations

__all__ = ["TransferError"]


class TransferError(Exception):
    """The platform refused or could not be reached: ``str()`` says why."""
