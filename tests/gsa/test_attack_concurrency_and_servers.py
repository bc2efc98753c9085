"""Attacks under load and with servers going away: concurrent probes from threads and from
asyncio against one knowledge store (every probe gets its own question's prompt, and the
scripted server receives exactly one embedding and one chat request per probe), and a Chroma
server (``chroma run``) stopped under a store that a router's probe uses."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings

from confidence_router import ConfidenceRoutedLLM
from confidence_router.gsa import GSA_V2_PROMPT_TEMPLATE, GSA_V3_PROMPT_TEMPLATE
from confidence_router.knowledge import KnowledgeStore, KnowledgeStoreError
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.testing import OllamaCompatibleServer
from confidence_router.testing.processes import ChromaServerProcess, start_or_skip

N = 12  # probes per kind (threads, asyncio)


def _question(i: int) -> str:
    """Questions sharing no words (the test embeddings measure surface overlap only)."""
    words = (hashlib.blake2b(f"{i}-{j}".encode(), digest_size=5).hexdigest() for j in range(4))
    return " ".join(words) + "?"


def _expected(i: int) -> str:
    """Even questions are stored (a strong hit on themselves), odd ones are not."""
    question = _question(i)
    if i % 2 == 0:
        block = f"1. (memory of: {question})\n   Answer {i}."
        return GSA_V3_PROMPT_TEMPLATE.format(query=question, hits_block=block)
    return GSA_V2_PROMPT_TEMPLATE.format(query=question)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def store(tmp_path: Path, ollama_server: OllamaCompatibleServer) -> KnowledgeStore:
    store = KnowledgeStore(OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local"),
                           path=tmp_path / "kb")
    store.add_many([(_question(i), f"Answer {i}.") for i in range(0, 2 * N, 2)])
    ollama_server.clear_requests()
    return store


@pytest.fixture
def probe(ollama_chat, store: KnowledgeStore, ollama_backend) -> SelfAssessmentProbe:
    ollama_backend.set_default(["NO"], top_logprobs=[[("NO", -0.3), ("YES", -1.4)]])
    return SelfAssessmentProbe(model=ollama_chat(), store=store)


def _check(scores: list[Any], indices: range, server: OllamaCompatibleServer) -> None:
    for i, score in zip(indices, scores):
        assert score.prompt == _expected(i)  # no probe got another's knowledge or question
        assert score.had_retrieval == (i % 2 == 0)
    received = sorted(r["body"]["messages"][-1]["content"] for r in server.requests_to("/api/chat"))
    assert received == sorted(_expected(i) for i in indices)
    embedded = sorted(r["body"]["input"][0] for r in server.requests_to("/api/embed"))
    assert embedded == sorted(_question(i) for i in indices)


def test_concurrent_probes_from_threads(
    probe: SelfAssessmentProbe, ollama_server: OllamaCompatibleServer
) -> None:
    indices = range(2 * N)
    with ThreadPoolExecutor(max_workers=8) as pool:
        scores = list(pool.map(lambda i: probe.invoke(_question(i)), indices))
    _check(scores, indices, ollama_server)


async def test_concurrent_probes_from_asyncio(
    probe: SelfAssessmentProbe, ollama_server: OllamaCompatibleServer
) -> None:
    indices = range(2 * N)
    scores = await asyncio.gather(*(probe.ainvoke(_question(i)) for i in indices))
    _check(list(scores), indices, ollama_server)


async def test_threads_and_asyncio_at_once_with_writes(
    probe: SelfAssessmentProbe, store: KnowledgeStore, ollama_server: OllamaCompatibleServer
) -> None:
    """Probes from a thread pool and the event loop while another thread writes unrelated
    entries: each probe still sees exactly its own prompt, and request counts match calls."""
    indices = range(2 * N)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=6) as pool:
        writer = loop.run_in_executor(
            pool, lambda: [store.add(f"Unrelated zebra topic {j}?", "z") for j in range(6)])
        threaded = [loop.run_in_executor(pool, probe.invoke, _question(i))
                    for i in indices if i % 2 == 0]
        awaited = [probe.ainvoke(_question(i)) for i in indices if i % 2 == 1]
        results = await asyncio.gather(*threaded, *awaited, writer)
    scores = results[:N] + results[N:2 * N]
    order = [i for i in indices if i % 2 == 0] + [i for i in indices if i % 2 == 1]
    for i, score in zip(order, scores):
        assert score.prompt == _expected(i)
    assert len(ollama_server.requests_to("/api/chat")) == 2 * N
    embed_inputs = [r["body"]["input"] for r in ollama_server.requests_to("/api/embed")]
    assert len([x for x in embed_inputs if "zebra" not in x[0]]) == 2 * N
    assert store.count() == N + 6


# ---------------------------------------------------------------------- a Chroma server


@pytest.fixture
def chroma_server() -> Iterator[ChromaServerProcess]:
    server = start_or_skip(ChromaServerProcess())
    yield server
    server.stop()


def _http_store(server: ChromaServerProcess, ollama_server: OllamaCompatibleServer) -> KnowledgeStore:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.HttpClient(host=server.host, port=server.port,
                                 settings=Settings(anonymized_telemetry=False))
    return KnowledgeStore(OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local"),
                          client=client, collection="attack")


def test_chroma_server_going_away_under_a_router(
    chroma_server: ChromaServerProcess, ollama_server: OllamaCompatibleServer, ollama_backend,
    bedrock_chat, bedrock_server,
) -> None:
    question = "What is the capital of France?"
    store = _http_store(chroma_server, ollama_server)
    store.add(question, "Paris.")
    ollama_backend.add_probe(lambda r: "Respond with exactly one token" in
                             r.messages[-1]["content"], {"YES": -0.1, "NO": -3.0})
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == question, " Paris",
                              logprobs=-0.05)
    local = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(),
                                 precheck=SelfAssessmentProbe(model=local, store=store))
    up = router.invoke(question).response_metadata["routing"]
    assert up["precheck"]["had_retrieval"] is True

    chroma_server.stop()
    ollama_server.clear_requests()
    probe = SelfAssessmentProbe(model=local, store=store)
    with pytest.raises(KnowledgeStoreError) as info:
        probe.invoke(question)
    assert info.value.stage == "chroma"
    assert ollama_server.requests_to("/api/chat") == []  # no probe prompt was sent

    message = router.invoke(question)
    down = message.response_metadata["routing"]
    assert message.content == " Paris"
    assert down["precheck"]["error"].startswith("KnowledgeStoreError: ")
    assert "attack" in down["precheck"]["error"]
    chats = ollama_server.requests_to("/api/chat")
    assert [c["body"]["messages"][-1]["content"] for c in chats] == [question]  # no probe
    assert bedrock_server.requests == []
