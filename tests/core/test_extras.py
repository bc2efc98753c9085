"""MissingExtraError: a feature whose extra is not installed fails with one clear error.

The real thing (a core-only venv) is tests/packaging/test_install.py; here the missing
package is simulated in-process (``sys.modules[name] = None`` makes Python treat it as not
installed), which is fast and runs everywhere.
"""

from __future__ import annotations

import importlib
import sys

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding

import confidence_router
from confidence_router import ConfidenceRouterError, MissingExtraError
from confidence_router._extras import EXTRAS, install_command, missing_extra, require_extra


def test_missing_extra_error_is_an_import_error_and_a_router_error() -> None:
    error = missing_extra("gsa", "KnowledgeStore", "chromadb")
    assert isinstance(error, MissingExtraError)
    assert isinstance(error, ImportError) and isinstance(error, ConfidenceRouterError)
    assert (error.extra, error.feature, error.name) == ("gsa", "KnowledgeStore", "chromadb")
    assert str(error) == (
        "KnowledgeStore needs the 'gsa' extra (chromadb is not installed): "
        'pip install "confidence-router[gsa]" (from a checkout: pip install -e ".[gsa]")'
    )
    assert "C/C++ compiler and cmake" in str(missing_extra("embedded", "x", "llama_cpp"))


def test_require_extra_passes_when_installed_and_names_the_first_missing_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_extra("gsa", "x")  # chromadb is installed in the test environment
    monkeypatch.setitem(sys.modules, "chromadb", None)
    with pytest.raises(MissingExtraError) as excinfo:
        require_extra("gsa", "the knowledge store")
    assert (excinfo.value.extra, excinfo.value.name) == ("gsa", "chromadb")


def test_every_extra_is_declared_in_pyproject() -> None:
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    declared = set(re.findall(r"^([a-z]+) = \[", pyproject.split(
        "[project.optional-dependencies]")[1].split("\n[")[0], re.MULTILINE))
    assert set(EXTRAS) <= declared
    assert {"all", "dev", "knowledge"} <= declared
    assert install_command("eval") == 'pip install "confidence-router[eval]"'


def test_knowledge_store_without_chromadb(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from confidence_router import KnowledgeStore

    monkeypatch.setitem(sys.modules, "chromadb", None)
    with pytest.raises(MissingExtraError, match=r"KnowledgeStore .*'gsa' extra") as excinfo:
        KnowledgeStore(DeterministicFakeEmbedding(size=8), path=tmp_path / "kb")
    assert excinfo.value.extra == "gsa"
    assert not (tmp_path / "kb").exists()  # failed before touching the disk


def test_llamaindex_module_without_llama_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_index.core", None)
    monkeypatch.delitem(sys.modules, "confidence_router.llamaindex", raising=False)
    monkeypatch.delitem(vars(confidence_router), "ConfidenceRoutedLlamaIndexLLM", raising=False)
    with pytest.raises(MissingExtraError) as excinfo:
        importlib.import_module("confidence_router.llamaindex")
    assert excinfo.value.extra == "llamaindex"
    with pytest.raises(MissingExtraError, match=r'pip install "confidence-router\[llamaindex\]"'):
        confidence_router.ConfidenceRoutedLlamaIndexLLM  # noqa: B018


def test_embedded_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    from confidence_router.embedded import load_embedded_backend

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingExtraError) as excinfo:
        load_embedded_backend()
    assert (excinfo.value.extra, excinfo.value.name) == ("embedded", "llama_cpp")


def test_version_comes_from_the_installed_metadata() -> None:
    from importlib.metadata import version

    assert confidence_router.__version__ == version("confidence-router")
