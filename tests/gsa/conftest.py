"""A scripted Ollama-compatible server per test module of the probe (model ``qwen2.5:7b``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

#: The model name the GSA probe tests' scripted server lists.
GSA_MODEL = "qwen2.5:7b"


@pytest.fixture(scope="module")
def gsa_backend() -> ScriptedBackend:
    return ScriptedBackend(models=[GSA_MODEL])


@pytest.fixture(scope="module")
def gsa_server(gsa_backend: ScriptedBackend) -> Iterator[OllamaCompatibleServer]:
    with OllamaCompatibleServer(gsa_backend) as server:
        yield server
