"""The pytest plugin of :mod:`streamsvc.testing` (a ``pytest11`` entry point: installed with
streamsvc, on in every pytest run): the ``streamsvc_play`` fixture is
:func:`streamsvc.testing.play`.

    def test_my_handler(streamsvc_play):
        result = streamsvc_play("fixtures/inbound_params.jsonl", ["mypkg.handlers:Meter"])
        assert {"inbound": 204} == dict(result.summary.frames)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from streamsvc.testing import CallResult, play

__all__ = ["streamsvc_play"]


@pytest.fixture
def streamsvc_play() -> Callable[..., CallResult]:
    """:func:`streamsvc.testing.play`: a fixture played through handlers, in-process."""
    def run(*args: Any, **kwargs: Any) -> CallResult:
        return play(*args, **kwargs)
    return run
