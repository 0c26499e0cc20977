"""Liberal where it costs nothing, on every codec of the registry: a field the service does
not use never fails a start. "Not used" is measured, not listed: a key whose removal, and
whose value changed, both leave the parsed start as it was. Such a key may hold any JSON
value, and keys the codec has never heard of may appear in any object that is not itself
data (custom parameters, headers): the start is the same."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc import wire
from streamsvc.exceptions import RemoteProtocolError
from streamsvc.providers import REGISTRY, codec_for
from streamsvc.replay.fixture import load_fixture

from .conftest import BUNDLED

FIXTURES = Path(__file__).parent.parent / "fixtures"
Path_ = tuple[str, ...]
# Vonage's first message is the NCCO's headers: its top-level keys are the call's context.
CONTEXT_AT_THE_TOP = frozenset({"vonage", "jambonz"})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)


def test_every_provider_is_covered() -> None:
    assert {row.name for row in REGISTRY if row.name != "auto"} == set(BUNDLED)


@functools.cache
def opening(provider: str) -> tuple[dict[str, Any], wire.Start]:
    """The message of the provider's bundled fixture that starts the stream, and its start."""
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    for frame in fixture.frames:
        if frame.binary is not None:
            continue
        event = parse(provider, frame.text, fixture.headers)
        if isinstance(event, wire.Start):
            return orjson.loads(frame.text), event
    raise AssertionError(f"{provider}: no start in the fixture")


def parse(provider: str, text: str | bytes,
          headers: dict[str, str] | None = None) -> wire.Event | RemoteProtocolError:
    codec = codec_for(provider, wire.Upgrade.of("/", "", (headers or {}).items()))
    try:
        return codec.parse(text)
    except RemoteProtocolError as exc:
        return exc


# Providers that send no stream id: the service makes one up for each stream.
MADE_UP_STREAM_IDS = frozenset({"vonage", "jambonz"})


def view(event: object, provider: str) -> object:
    """What a start tells the service (the stream id too, unless the service makes one up:
    Vonage and jambonz send none)."""
    if not isinstance(event, wire.Start):
        return event
    generated = event.stream_sid is None or provider in MADE_UP_STREAM_IDS
    return (event.call_sid, event.account_sid, event.tracks, event.media_format,
            dict(event.custom_parameters), None if generated else event.started_stream_sid)


def paths(message: Any, prefix: Path_ = ()) -> list[Path_]:
    if not isinstance(message, dict):
        return []
    found = []
    for key, value in message.items():
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


def without(message: Any, path: Path_) -> Any:
    if len(path) == 1:
        return {k: v for k, v in message.items() if k != path[0]}
    return {**message, path[0]: without(message[path[0]], path[1:])}


def replaced(message: Any, path: Path_, value: Any) -> Any:
    if len(path) == 1:
        return {**message, path[0]: value}
    return {**message, path[0]: replaced(message[path[0]], path[1:], value)}


def perturbed(value: Any) -> Any:
    """``value`` changed but of the same JSON type (what a field that is read would show)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "1"
    if isinstance(value, dict):
        return {key: perturbed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [perturbed(item) for item in value]
    return "x"


@functools.cache
def unused(provider: str) -> list[Path_]:
    message, start = opening(provider)
    headers = load_fixture(FIXTURES / BUNDLED[provider]).headers
    return [path for path in paths(message)
            if view(parse(provider, orjson.dumps(without(message, path)), headers),
                    provider) == view(start, provider)
            and view(parse(provider, orjson.dumps(replaced(message, path, perturbed(
                _at(message, path)))), headers), provider) == view(start, provider)]


@pytest.mark.parametrize("provider", sorted(BUNDLED))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_unused_fields_and_unknown_keys_never_fail_a_start(provider: str,
                                                           data: st.DataObject) -> None:
    message, start = opening(provider)
    message = copy.deepcopy(message)
    headers = load_fixture(FIXTURES / BUNDLED[provider]).headers
    candidates = unused(provider)
    for path in data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)
                          if candidates else st.just([])):
        message = replaced(message, path, data.draw(json_values))
    # A key of no known name, at the top or inside any object that is not data.
    objects = [path for path in paths(message)
               if isinstance(_at(message, path), dict) and not _is_data(path[-1])]
    if provider not in CONTEXT_AT_THE_TOP:
        objects.append(())
    if objects:
        where = data.draw(st.sampled_from(objects))
        name = "x-unknown-" + data.draw(st.text("abcdefgh", min_size=1, max_size=6))
        message = replaced(message, (*where, name), data.draw(json_values))
    assert view(start, provider) == view(parse(provider, orjson.dumps(message), headers),
                                         provider)


def _is_data(key: str) -> bool:
    """An object whose keys are the call's context, not the provider's schema."""
    return key in ("customerData", "metadata") or any(
        word in key.lower() for word in ("param", "header", "config", "variables"))


def _at(message: Any, path: Path_) -> Any:
    for key in path:
        message = message[key]
    return message
