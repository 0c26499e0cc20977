"""Twilio request signatures (``X-Twilio-Signature``), for the stream handshake.

For a Media Streams handshake Twilio signs the exact ``wss://host/path`` it was given, with
no body and no parameters: ``base64(HMAC-SHA1(auth_token, url))`` (``shared/protocol.md``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["SIGNATURE_HEADER", "sign", "signature_matches"]

SIGNATURE_HEADER = "X-Twilio-Signature"


def sign(auth_token: str, url: str) -> str:
    """The signature Twilio sends for ``url`` with ``auth_token``."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_matches(signature: str, url: str, auth_tokens: Iterable[str]) -> bool:
    """Whether ``signature`` is valid for ``url`` under any of ``auth_tokens`` (a second
    token is accepted during rotation). Comparisons take constant time."""
    given = signature.encode()
    matched = False
    for token in auth_tokens:
        # No early exit: the time taken does not tell which token matched.
        matched |= hmac.compare_digest(given, sign(token, url).encode())
    return matched
