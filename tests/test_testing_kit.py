"""The testing kit: fixtures and sessions built in code played through handlers
in-process, on a virtual clock, with the summary, what the handlers sent and the log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from streamsvc import Handler
from streamsvc.config import Route, Settings
from streamsvc.handlers import HandlerSpec
from streamsvc.live import LiveSession, MarkResult
from streamsvc.replay.fixture import load_fixture
from streamsvc.replay.synth import SessionPlan
from streamsvc.testing import from_plan, play, play_async
from streamsvc.testing.clock import run_virtual

from .conftest import BUNDLED

FIXTURES = Path(__file__).parent.parent / "fixtures"


class Talker(Handler):
    """Says a second of audio with a mark, waits two virtual minutes, hangs nothing up."""

    def __init__(self) -> None:
        self.results: list[MarkResult] = []
        self.slept_s = 0.0

    def on_start(self, session: LiveSession) -> None:
        session.send_audio(b"\x00\x00" * 8000, sample_rate=8000, final=True)
        session.mark("said").add_done_callback(lambda done: self.results.append(done.result()))
        asyncio.get_running_loop().create_task(self._sleep())

    async def _sleep(self) -> None:
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(120)
        self.slept_s = asyncio.get_running_loop().time() - started


def test_a_bundled_fixture_plays_to_its_expected_counts_in_no_time() -> None:
    fixture = load_fixture(FIXTURES / "inbound_params.jsonl")
    started = time.monotonic()
    result = play(fixture, ["log", "dtmf"])
    elapsed = time.monotonic() - started
    assert result.summary is not None
    assert result.stopped is not None
    assert (fixture.expect["frames"], "stop") == (dict(result.summary.frames),
                                                  result.summary.reason)
    assert fixture.expect["custom_parameters"] == result.started["custom_parameters"]  # type: ignore[index]
    assert result.stopped["duration_ms"] > 4000 > elapsed * 1000  # 4 s of call, far less


def test_marks_resolve_when_the_simulated_playback_reaches_them() -> None:
    talker = Talker()
    plan = SessionPlan(inbound=[0] * 8000 * 3)  # a three-second call
    result = play(from_plan(plan), [talker], bidirectional=True)
    assert (["played"], {"said": "played"}, 16000) == (talker.results, result.marks,
                                                        len(result.audio))


@pytest.mark.parametrize("provider", sorted(set(BUNDLED) - {"acs"}))
def test_every_providers_bundled_session_plays_through_the_kit(provider: str) -> None:
    fixture = load_fixture(FIXTURES / BUNDLED[provider])
    result = play(fixture, ["echo"], bidirectional=True)
    assert result.summary is not None, result.close_reason
    assert (fixture.expect["frames"], fixture.expect["dtmf"]) == (
        dict(result.summary.frames), result.summary.dtmf)
    assert result.audio  # the echo reached the platform's side


def test_a_refused_upgrade_never_starts_and_says_why() -> None:
    result = play(FIXTURES / "inbound_params.jsonl", route=Route("/twilio", ()),
                  settings=Settings(auth_token="secret", public_url="https://voice.example.com"))
    assert (None, 403) == (result.summary, result.close_code)
    assert ["missing_signature"] == [line["reason"] for line in
                                     result.events("handshake.rejected")]


def test_the_virtual_clock_runs_a_handlers_sleeps_in_order() -> None:
    talker = Talker()
    spec = HandlerSpec("talker", lambda: talker)
    play(from_plan(SessionPlan(inbound=[0] * 8000 * 200)), [spec], bidirectional=True)
    assert 120.0 == pytest.approx(talker.slept_s)


def test_play_async_runs_in_a_loop_of_ones_own() -> None:
    async def run() -> int:
        result = await play_async(FIXTURES / "inbound_params.jsonl", ["log"])
        assert result.summary is not None
        return result.summary.frames["inbound"]
    assert 204 == run_virtual(run())


def test_the_pytest_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("streamsvc")


def test_the_docs_example_runs_as_written() -> None:
    page = (Path(__file__).parent.parent / "docs" / "testing.md").read_text(encoding="utf-8")
    [code] = [block.split("```", 1)[0] for block in page.split("```python\n")[1:]]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/testing.md", "exec"), namespace)
    test = namespace["test_my_bot_answers_the_caller"]
    assert callable(test)
    test()


def test_the_readmes_greeter_runs_as_written() -> None:
    """The README's talk-back snippet, played with a key press during its greeting."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    [code] = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]
              if "class Greeter" in block]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    greeter = namespace["Greeter"]()  # type: ignore[operator]
    pressed = play(from_plan(SessionPlan(inbound=[0] * 16_000, dtmf=[("5", 0.5)])),
                   [greeter], bidirectional=True)
    quiet = namespace["Greeter"]()  # type: ignore[operator]
    play(from_plan(SessionPlan(inbound=[0] * 24_000)), [quiet], bidirectional=True)
    assert (["cleared"], ["played"], 1) == (greeter.results, quiet.results, pressed.clears)


def test_the_readmes_handler_and_its_test_run_as_written() -> None:
    """The README's "Write a handler, and test it": its handler, then its test of it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        assert callable(test)
        test()
