"""Named handler instances: one built-in with different options on two routes (or twice on
one), each report under its instance's name, config errors naming the instance and the key;
end to end, two routes forwarding to two stand-in speech-to-text services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamsvc.config import ConfigError, load_settings
from streamsvc.replay import replay
from streamsvc.replay.fixture import load_fixture
from streamsvc.server import StreamServer

from .conftest import LogEvents, SttStandIn, events, stt_stand_in, until

FIXTURES = Path(__file__).parent.parent / "fixtures"


def settings_of(tmp_path: Path, toml: str) -> object:
    (tmp_path / "config.toml").write_text(toml, encoding="utf-8")
    return load_settings(config_path=str(tmp_path / "config.toml"), env={})


TWO_ROUTES = """
[[routes]]
path = "/acs-stt"
handlers = ["log", "stt_acs"]

[[routes]]
path = "/deepgram-stt"
handlers = ["log", "stt_deepgram", "recorder"]

[handlers.stt_acs]
use = "forward"
url = "ws://127.0.0.1:{one}/speech"

[handlers.stt_deepgram]
use = "forward"
url = "ws://127.0.0.1:{two}/listen"
tracks = ["inbound", "outbound"]
linger_s = 0.2

[handlers.recorder]
dir = "{dir}"
"""


def test_two_routes_use_one_built_in_with_their_own_options(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, TWO_ROUTES.format(one=1, two=2, dir=tmp_path))
    [acs, deepgram] = settings.routes  # type: ignore[attr-defined]
    assert [("log", "log"), ("stt_acs", "forward")] == [
        (spec.name, spec.kind) for spec in acs.handlers]
    assert (["stt_deepgram", "forward"], "ws://127.0.0.1:2/listen") == (
        [deepgram.handlers[1].name, deepgram.handlers[1].kind],
        deepgram.handlers[1].options["url"])
    assert "ws://127.0.0.1:1/speech" == acs.handlers[1].options["url"]


@pytest.mark.parametrize(("toml", "key", "said"), [
    ('[[routes]]\npath = "/a"\nhandlers = ["stt"]\n[handlers.stt]\nuse = "forward"\n'
     'url = "ws://x"\nnot_an_option = 1\n', "handlers.stt", "instance 'stt'"),
    ('[[routes]]\npath = "/a"\nhandlers = ["stt"]\n[handlers.stt]\nuse = "nope"\n',
     "handlers.stt", "unknown handler 'nope'"),
    ('[[routes]]\npath = "/a"\nhandlers = ["stt"]\n[handlers.stt]\nuse = 5\n',
     "handlers.stt.use", "must name a built-in"),
    ('[[routes]]\npath = "/a"\nhandlers = ["a"]\n[handlers.a]\nuse = "b"\n'
     '[handlers.b]\nuse = "log"\n', "handlers.a.use", "itself a named instance"),
    ('[[routes]]\npath = "/a"\nhandlers = ["log", "log"]\n', "routes[0].handlers",
     "listed twice"),
    ('[[routes]]\npath = "/a"\nhandlers = ["talk"]\n[handlers.talk]\nuse = "echo"\n',
     "routes[0].handlers", "'talk' talks back"),
    ('[[routes]]\npath = "/a"\nhandlers = ["stt"]\n[handlers.stt]\nuse = "forward"\n'
     'url = "ws://x"\nqueue_size = 0\n', "handlers.stt.queue_size", "whole number"),
])
def test_config_errors_name_the_instance_and_the_key(tmp_path: Path, toml: str, key: str,
                                                     said: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_of(tmp_path, toml)
    assert key == error.value.key
    assert said in str(error.value)


@pytest.fixture
async def stts() -> AsyncIterator[tuple[SttStandIn, SttStandIn]]:
    async with stt_stand_in() as one, stt_stand_in() as two:
        yield one, two


async def test_two_routes_forward_to_two_services_with_their_own_options(
        tmp_path: Path, stts: tuple[SttStandIn, SttStandIn], logs: LogEvents) -> None:
    one, two = stts
    settings = settings_of(tmp_path, TWO_ROUTES.format(one=one.port, two=two.port,
                                                       dir=tmp_path / "rec"))
    server = StreamServer(settings)  # type: ignore[arg-type]
    await server.start()
    try:
        fixture = load_fixture(FIXTURES / "both_tracks.jsonl")
        for path in ("/acs-stt", "/deepgram-stt"):
            report = await replay([fixture], f"ws://127.0.0.1:{server.port}{path}", speed=0)
            assert report.sessions[0].ok, report.sessions[0].error
        await until(lambda: len(events(logs, "stream.stopped")) == 2)
        await until(lambda: len(one.messages) == 1 and len(two.messages) == 1)
    finally:
        await server.stop()
    inbound = fixture.expect["frames"]["inbound"]
    both = inbound + fixture.expect["frames"]["outbound"]
    binary = [sum(isinstance(m, bytes) for m in stt.messages[0]) for stt in (one, two)]
    assert (["/speech"], ["/listen"], [inbound, both]) == (one.paths, two.paths, binary)
    first, second = sorted(events(logs, "stream.stopped"),
                           key=lambda line: "stt_acs" not in line["handlers"])
    assert ({"stt_acs"}, {"stt_deepgram", "recorder"}) == (
        set(first["handlers"]), set(second["handlers"]))
    assert inbound == first["handlers"]["stt_acs"]["frames_sent"]
