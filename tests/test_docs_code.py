"""Every Python block of the README and of the docs: run in order, a page's blocks in one
namespace (as a reader pastes them one after the other), so a renamed API or a typo fails
here. Blocks written for an async REPL (top-level ``await``: the fleet's client) are
compiled as such and their imports run; running them needs a fleet, which
tests/test_fleet.py has. Pages whose examples the tests also play (the README's handler,
docs/testing.md, docs/asgi.md, docs/providers/genesys.md, docs/context.md) are played there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from streamsvc.cli import log_reference

ROOT = Path(__file__).parent.parent
PAGES = [page for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
         if "```python\n" in page.read_text(encoding="utf-8")]


def blocks_of(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def top_level_await(node: ast.AST) -> bool:
    """An ``await`` (or ``async with``/``for``) outside any function: an async REPL's."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.Await | ast.AsyncWith | ast.AsyncFor) or top_level_await(
                child):
            return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_python_block_of_the_page_runs(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs:{page.name}"}
    for number, block in enumerate(blocks_of(page)):
        where = f"{page.relative_to(ROOT)} python block {number}"
        tree = compile(block, where, "exec", flags=ast.PyCF_ONLY_AST
                       | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        assert isinstance(tree, ast.Module)
        if top_level_await(tree):  # an async REPL's block: its imports, and that it compiles as one
            imports = ast.Module([node for node in tree.body
                                  if isinstance(node, ast.Import | ast.ImportFrom)], [])
            exec(compile(imports, where, "exec"), namespace)
            compile(block, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        else:
            exec(compile(block, where, "exec"), namespace)


def test_the_pages_with_python_are_the_ones_expected() -> None:
    assert {"README.md", "asgi.md", "context.md", "fleet.md", "genesys.md", "handlers.md",
            "testing.md"} <= {page.name for page in PAGES}


def _emitted_event_names() -> set[str]:
    """Each event name a logger call in the package writes as a literal."""
    emitted = set()
    for module in (ROOT / "streamsvc").rglob("*.py"):
        emitted |= set(re.findall(
            r'logger\.(?:debug|info|warning|error|exception)\(\s*"([a-z_]+\.[a-z_.]+)"',
            module.read_text(encoding="utf-8")))
    return emitted


def test_the_log_events_page_is_the_one_the_code_table_generates() -> None:
    """One place owns the log-event reference: docs/log-events.md is what
    ``python -m streamsvc.cli.log_reference`` writes from its table."""
    committed = (ROOT / "docs" / "log-events.md").read_text(encoding="utf-8")
    assert log_reference.page() == committed, (
        "docs/log-events.md differs from the table: run python -m streamsvc.cli.log_reference")


def test_every_log_event_the_code_emits_is_in_the_log_events_reference() -> None:
    """A log event is a public contract: each name a logger call in the package writes
    (a literal name) has its row in the table."""
    emitted = _emitted_event_names()
    documented = {name for event in log_reference.EVENTS for name in event.names}
    assert len(emitted) > 60
    assert [] == sorted(emitted - documented)


def test_the_log_events_reference_keeps_no_event_nothing_writes() -> None:
    """Each name in the table is written somewhere: a literal logger call, a name passed
    to a logging helper, or a platform codec's ``wire.Noted`` (logged as
    ``<provider>.<name>``; Asterisk's are its command names, lower-cased)."""
    emitted = _emitted_event_names()
    sources = {module: module.read_text(encoding="utf-8")
               for module in (ROOT / "streamsvc").rglob("*.py")}
    everything = "\n".join(sources.values())
    stale = []
    for name in (name for event in log_reference.EVENTS for name in event.names):
        if name in emitted or f'"{name}"' in everything:
            continue
        provider, _, suffix = name.partition(".")
        codec = ROOT / "streamsvc" / "providers" / f"{provider}.py"
        if codec.exists() and any(f'"{word}"' in sources[codec]
                                  for word in (suffix, suffix.upper())):
            continue
        if f'{{codec.provider}}.{suffix}"' in everything:
            continue
        stale.append(name)
    assert [] == stale
