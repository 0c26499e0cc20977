"""The package's shape: no import cycle (TYPE_CHECKING imports included), few flat modules,
and a provider registry whose every row is complete. The layering itself is checked by
``lint-imports`` (the contracts in pyproject.toml), which .ci/run runs."""

from __future__ import annotations

import importlib

import grimp
import pytest

from streamsvc import providers
from streamsvc.providers import PROVIDERS, REGISTRY

# At most this many modules sit flat in streamsvc/ (the rest live in the sides' folders).
MAX_FLAT_MODULES = 15


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("streamsvc", include_external_packages=False)


def test_no_module_imports_itself_back(graph: grimp.ImportGraph) -> None:
    """For every import A -> B there is no chain of imports from B back to A."""
    cycles = [
        (importer, imported)
        for importer in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.find_shortest_chain(importer=imported, imported=importer)
    ]
    assert [] == cycles


def test_few_modules_sit_flat_in_the_package(graph: grimp.ImportGraph) -> None:
    flat = [module for module in graph.modules
            if module.count(".") == 1 and not graph.find_children(module)]
    assert len(flat) <= MAX_FLAT_MODULES, sorted(flat)


def test_the_registry_names_every_provider_once() -> None:
    assert sorted(PROVIDERS) == sorted(row.name for row in REGISTRY)
    assert len(REGISTRY) == len({row.name for row in REGISTRY})


@pytest.mark.parametrize("row", REGISTRY, ids=lambda row: row.name)
def test_every_row_is_complete(row: providers.Provider) -> None:
    """A credential check comes with its settings and where they are set; a synthesizer
    names a module that has ``synthesize_*`` or ``synthesize``."""
    if row.check is not None:
        assert row.settings
        assert row.credential_env
        assert row.credential
    if row.synth is not None:
        module = importlib.import_module(row.synth)
        assert any(name.startswith("synthesize") for name in dir(module))
    assert row.peer in ("mark", "mark:stream_id", "mark:stream_sid", "checkpoint", "notify",
                        "genesys", "asterisk", "jambonz", "none")


def test_an_unknown_provider_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        providers.provider("nope")
