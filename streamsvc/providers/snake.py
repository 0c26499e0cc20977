"""What the snake_case JSON providers (Telnyx, Exotel) share: their key-press and mark
bodies, and how one of their frames is decoded or refused with a reason."""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from streamsvc import wire as common
from streamsvc.exceptions import RemoteProtocolError

__all__ = ["DigitBody", "NameBody", "context_value", "decode", "dtmf", "mark", "parameters",
           "text"]

_encoder: Final = msgspec.json.Encoder()
_DIGIT: Final = re.compile(r"[0-9*#A-D]")


class DigitBody(msgspec.Struct, frozen=True):
    digit: str


class NameBody(msgspec.Struct, frozen=True):
    name: str


def decode(decoder: msgspec.json.Decoder[Any], frame: bytes | str,
           kinds: tuple[str, ...]) -> Any:
    """``frame`` decoded; a known kind (``kinds``) that does not validate is a bad frame
    (RemoteProtocolError naming it), an unknown kind an :class:`UnknownEvent` (ignored,
    counted), and anything but JSON a bad frame."""
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        _, kind = common.tagged_object(frame, "event")
        if kind in kinds:
            raise RemoteProtocolError(f"invalid {kind}: {exc}") from None
        return common.UnknownEvent(kind)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"not JSON: {exc}") from None


def parameters(value: object) -> dict[str, str]:
    """Custom parameters as providers send them: an object of names and values (values
    that are numbers or booleans become text), or a list of ``{"name", "value"}`` objects
    (Telnyx's Call Control form); anything else contributes nothing."""
    if isinstance(value, dict):
        return {str(name): text(item) for name, item in value.items()
                if isinstance(item, (str, int, float, bool))}
    if isinstance(value, list):
        return {str(item["name"]): text(item.get("value", "")) for item in value
                if isinstance(item, dict) and "name" in item
                and isinstance(item.get("value", ""), (str, int, float, bool))}
    return {}


def text(value: object) -> str:
    """A parameter's value as text (booleans as ``true``/``false``, as in JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def context_value(value: object, limit: int) -> str:
    """A value of the call's context as a platform sends it (text kept, numbers and
    booleans as text, null as nothing, objects and lists as compact JSON), at most
    ``limit`` characters."""
    if isinstance(value, str):
        return value[:limit]
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return text(value)
    return _encoder.encode(value).decode()[:limit]


def dtmf(body: DigitBody, stream_id: str | None) -> common.Dtmf:
    """A key press as the common event; a digit that is no key is a bad frame."""
    if not _DIGIT.fullmatch(body.digit):
        raise RemoteProtocolError(f"invalid dtmf: not a key: {body.digit[:20]!r}")
    return common.Dtmf(common._DtmfBody("inbound_track", body.digit), stream_id)


def mark(body: NameBody, stream_id: str | None) -> common.Mark:
    return common.Mark(common._MarkBody(body.name), stream_id)
