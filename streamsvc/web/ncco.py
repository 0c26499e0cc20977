"""The voice webhook of a ``provider = "vonage"`` route: Vonage's answer URL, answered with
an NCCO that connects the call to the route's WebSocket.

Vonage requests the answer URL with the call's ``uuid``, ``conversation_uuid``, ``from``
and ``to`` (GET query, or a JSON body for POST). The answer is
``[{"action":"connect","endpoint":[{"type":"websocket","uri":…,"content-type":…,
"headers":{…},"authorization":…}]}]``: the ``headers`` carry ``call_uuid`` (the call's
uuid: the stream's ``call_sid``), ``from``, ``to``, then the answer URL's own query
parameters (the call's context), within Vonage's 512 bytes (what does not fit is left
out, named in the ``ncco.headers_over_budget`` warning); ``authorization`` is
``{"type":"vonage"}`` when ``vonage_signature_secret`` is set (Vonage then signs the
upgrade). With ``vonage_signature_secret`` set, the answer request itself must carry
Vonage's signed-webhook JWT (``Authorization: Bearer``). The custom ``vonage_token`` is never
put in an NCCO: with it and no signature secret the answer URL refuses every request (403
``unsigned_answer_request``), since anyone could ask for the credential.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from streamsvc.providers.vonage import content_type

__all__ = ["ANSWER_FIELDS", "MAX_HEADERS_BYTES", "SAMPLE_RATE", "answer_fields", "ncco"]

# Vonage's limit on an endpoint's headers (JSON).
MAX_HEADERS_BYTES: Final = 512
# What the NCCO asks for: 16 kHz, the rate speech recognizers prefer.
SAMPLE_RATE: Final = 16000
# The answer request's own fields: not context from the answer URL's query.
ANSWER_FIELDS: Final = frozenset({"uuid", "conversation_uuid", "from", "to", "region_url",
                                  "endpoint_type", "custom_data"})


def answer_fields(query: Mapping[str, str], body: bytes, method: str) -> dict[str, str]:
    """The answer request's fields: the query, and a POST's JSON body (text values)."""
    fields = dict(query)
    if method == "POST" and body.strip():
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict):
            fields.update({str(k): v if isinstance(v, str) else orjson.dumps(v).decode()
                           for k, v in document.items() if v is not None})
    return fields


def ncco(uri: str, fields: Mapping[str, str], query: Mapping[str, str], *,
         authorization: dict[str, str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The NCCO connecting the call to ``uri``, and the context names left out for the
    512-byte budget."""
    headers: dict[str, str] = {}
    left_out: list[str] = []
    wanted = [("call_uuid", fields.get("uuid", "")), ("from", fields.get("from", "")),
              ("to", fields.get("to", ""))]
    wanted += sorted((k, v) for k, v in query.items() if k not in ANSWER_FIELDS)
    for name, value in wanted:
        if not value or name in headers:
            continue
        trial = {**headers, name: value}
        if len(orjson.dumps(trial)) > MAX_HEADERS_BYTES:
            left_out.append(name)
            continue
        headers = trial
    endpoint: dict[str, Any] = {"type": "websocket", "uri": uri,
                                "content-type": content_type(SAMPLE_RATE), "headers": headers}
    if authorization is not None:
        endpoint["authorization"] = authorization
    return [{"action": "connect", "endpoint": [endpoint]}], left_out
