"""Twilio request signatures (``X-Twilio-Signature``): the stream handshake and webhooks.

Twilio signs ``base64(HMAC-SHA1(auth_token, data))`` where ``data`` is the URL it was given
(query included) followed by each POST field's name and value, names sorted (values sorted
within a name). A Media Streams handshake has no fields: the data is the exact
``wss://host/path`` (Twilio's Media Streams pages).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["SIGNATURE_HEADER", "sign", "signature_matches", "signature_problem"]

SIGNATURE_HEADER = "X-Twilio-Signature"

Fields = Iterable[tuple[str, str]]


def sign(auth_token: str, url: str, fields: Fields = ()) -> str:
    """The signature Twilio sends for ``url`` (and POST ``fields``) with ``auth_token``."""
    grouped: dict[str, set[str]] = collections.defaultdict(set)
    for name, value in fields:
        grouped[name].add(value)
    data = url + "".join(name + value for name in sorted(grouped)
                         for value in sorted(grouped[name]))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_matches(signature: str, url: str, auth_tokens: Iterable[str],
                      fields: Fields = ()) -> bool:
    """Whether ``signature`` is valid for ``url`` and ``fields`` under any of
    ``auth_tokens`` (a second token is accepted during rotation). Comparisons take
    constant time."""
    given = signature.encode()
    fields = list(fields)
    matched = False
    for token in auth_tokens:
        # No early exit: the time taken does not tell which token matched.
        matched |= hmac.compare_digest(given, sign(token, url, fields).encode())
    return matched


def signature_problem(signature: str | None, url: str, auth_tokens: Iterable[str],
                      fields: Fields = ()) -> str | None:
    """Why a request carrying ``signature`` is refused (``missing_signature`` or
    ``bad_signature``), or None when it is signed by one of ``auth_tokens``."""
    if not signature:
        return "missing_signature"
    if not signature_matches(signature, url, auth_tokens, fields):
        return "bad_signature"
    return None
