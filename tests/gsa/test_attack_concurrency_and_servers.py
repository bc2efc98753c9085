"""Attacks under load and with servers going away: concurrent probes from threads and from
asyncio against one knowledge store (every probe gets its own question's prompt, and the
scripted server receives exactly one embedding and one chat request per probe), and a Chroma
server (``chroma run``) stopped under a store that a router's probe uses."""

from __future__ import annotations

import asyncio
import hashlib
import time
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
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend
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
def store(tmp_path: Path, ollama_server: OllamaCompatibleServer) -> Iterator[KnowledgeStore]:
    store = KnowledgeStore(OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local"),
                           path=tmp_path / "kb")
    store.add_many([(_question(i), f"Answer {i}.") for i in range(0, 2 * N, 2)])
    ollama_server.clear_requests()
    with store:
        yield store


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


async def test_concurrent_probes_against_a_chroma_server(
    chroma_server: ChromaServerProcess, ollama_server: OllamaCompatibleServer, ollama_chat,
    ollama_backend,
) -> None:
    """One HttpClient-backed store shared by a thread pool and the event loop at once."""
    store = _http_store(chroma_server, ollama_server)
    store.add_many([(_question(i), f"Answer {i}.") for i in range(0, 2 * N, 2)])
    ollama_backend.set_default(["NO"], top_logprobs=[[("NO", -0.3), ("YES", -1.4)]])
    ollama_server.clear_requests()
    probe = SelfAssessmentProbe(model=ollama_chat(), store=store)
    indices = range(2 * N)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = [loop.run_in_executor(pool, probe.invoke, _question(i)) for i in indices]
        awaited = [probe.ainvoke(_question(i)) for i in indices]
        scores = await asyncio.gather(*threaded, *awaited)
    for i, score in zip([*indices, *indices], scores):
        assert score.prompt == _expected(i)
    assert len(ollama_server.requests_to("/api/chat")) == 4 * N
    assert len(ollama_server.requests_to("/api/embed")) == 4 * N


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

    # Learning from an escalation while the server is down: the cloud answer is served and
    # the record says why nothing was learned.
    unsure = "Who was the second president of Kenya?"
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == unsure, " Kenyatta",
                              logprobs=-3.0)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    learner = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(), knowledge_store=store,
                                  learn_from_escalations=True)
    escalated = learner.invoke(unsure)
    record = escalated.response_metadata["routing"]
    assert escalated.content == "Daniel arap Moi" and record["decision"] == "cloud"
    assert record["learned"] is False
    assert record["learn_error"].startswith("KnowledgeStoreError: knowledge store add failed")


# ---------------------------------------------------------------------- a hung embedding server


class _SlowEmbeddings(ScriptedBackend):
    """The scripted backend, with an embedding endpoint that stalls once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_delay = 0.0

    def embed(self, model: str, inputs: Any) -> list[list[float]]:
        if self.embed_delay:
            time.sleep(self.embed_delay)
        return super().embed(model, inputs)


@pytest.fixture
def slow_embed_server() -> Iterator[OllamaCompatibleServer]:
    with OllamaCompatibleServer(_SlowEmbeddings()) as server:
        yield server


def _router_over_slow_store(
    slow: OllamaCompatibleServer, tmp_path: Path, ollama_chat, ollama_backend, bedrock_chat
) -> ConfidenceRoutedLLM:
    question = "What is the capital of France?"
    store = KnowledgeStore(OllamaEmbeddings(base_url=slow.url, model="scripted-local"),
                           path=tmp_path / "kb")
    store.add(question, "Paris.")
    slow.backend.embed_delay = 3.0  # type: ignore[attr-defined]
    ollama_backend.add_probe(lambda r: "Respond with exactly one token" in
                             r.messages[-1]["content"], {"YES": -0.1, "NO": -3.0})
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == question, " Paris",
                              logprobs=-0.05)
    local = ollama_chat()
    return ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(), local_timeout=0.5,
                               precheck=SelfAssessmentProbe(model=local, store=store))


async def test_hung_embedding_server_times_the_probe_out_async(
    slow_embed_server: OllamaCompatibleServer, tmp_path: Path, ollama_chat, ollama_backend,
    ollama_server: OllamaCompatibleServer, bedrock_chat,
) -> None:
    router = _router_over_slow_store(slow_embed_server, tmp_path, ollama_chat, ollama_backend,
                                     bedrock_chat)
    message = await router.ainvoke("What is the capital of France?")
    routing = message.response_metadata["routing"]
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]
    assert message.content == " Paris"
    # the probe never got to the model: only the answer was asked for
    assert len(ollama_server.requests_to("/api/chat")) == 1


def test_hung_embedding_server_times_the_probe_out_sync(
    slow_embed_server: OllamaCompatibleServer, tmp_path: Path, ollama_chat, ollama_backend,
    ollama_server: OllamaCompatibleServer, bedrock_chat,
) -> None:
    router = _router_over_slow_store(slow_embed_server, tmp_path, ollama_chat, ollama_backend,
                                     bedrock_chat)
    message = router.invoke("What is the capital of France?")
    routing = message.response_metadata["routing"]
    assert message.content == " Paris"
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]


# ---------------------------------------------------------------------- one event loop after another


def test_probes_work_on_every_new_event_loop(
    store: KnowledgeStore, ollama_chat, ollama_backend, ollama_server: OllamaCompatibleServer,
) -> None:
    """A sync app calling ``asyncio.run(probe.ainvoke(...))`` per request. Before: the second
    loop failed with "RuntimeError: Event loop is closed" — in the model's client, and in the
    store's OllamaEmbeddings (the router then recorded every later precheck as failed)."""
    ollama_backend.set_default(["NO"], top_logprobs=[[("NO", -0.3), ("YES", -1.4)]])
    probe = SelfAssessmentProbe(model=ollama_chat(), store=store)
    router = ConfidenceRoutedLLM(local=ollama_chat(), precheck=probe)
    for _ in range(3):
        score = asyncio.run(probe.ainvoke(_question(0)))
        assert score.prompt == _expected(0)
        entry = asyncio.run(store.aadd(_question(1), "Answer 1."))
        assert entry.question == _question(1)
        record = asyncio.run(router.ainvoke(_question(0))).response_metadata["routing"]
        assert record["precheck"].get("had_retrieval") is True, record["precheck"]
    probes = [r["body"] for r in ollama_server.requests_to("/api/chat")
              if "Respond with exactly one token" in r["body"]["messages"][-1]["content"]]
    assert len(probes) == 6
    for body in probes:  # every loop's copy keeps the probe settings
        assert body["options"]["num_predict"] == 1 and body["top_logprobs"] == 5
    assert len(ollama_server.requests_to("/api/embed")) == 9  # 6 probe searches + 3 adds


class _FailingEmbeddings(ScriptedBackend):
    """The scripted backend whose embedding endpoint answers HTTP 500 once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def embed(self, model: str, inputs: Any) -> list[list[float]]:
        if self.failing:
            from confidence_router.serving.protocol import BackendError

            raise BackendError("embedding model overloaded", status=500)
        return super().embed(model, inputs)


async def test_embedding_server_500_is_typed_and_the_router_answers_locally(
    tmp_path: Path, ollama_chat, ollama_backend, ollama_server: OllamaCompatibleServer,
    bedrock_chat, bedrock_server,
) -> None:
    question = "What is the capital of France?"
    with OllamaCompatibleServer(_FailingEmbeddings()) as embed_server:
        store = KnowledgeStore(OllamaEmbeddings(base_url=embed_server.url, model="scripted-local"),
                               path=tmp_path / "kb")
        store.add(question, "Paris.")
        embed_server.backend.failing = True  # type: ignore[attr-defined]
        ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == question, " Paris",
                                  logprobs=-0.05)
        local = ollama_chat()
        probe = SelfAssessmentProbe(model=local, store=store)
        with pytest.raises(KnowledgeStoreError, match="overloaded") as info:
            probe.invoke(question)
        assert info.value.stage == "embedding"
        with pytest.raises(KnowledgeStoreError, match="overloaded"):
            await probe.ainvoke(question)
        assert ollama_server.requests_to("/api/chat") == []
        router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(), precheck=probe)
        for message in (router.invoke(question), await router.ainvoke(question)):
            record = message.response_metadata["routing"]
            assert message.content == " Paris"
            assert "KnowledgeStoreError" in record["precheck"]["error"]
            assert "overloaded" in record["precheck"]["error"]
        assert [r["body"]["messages"][-1]["content"]
                for r in ollama_server.requests_to("/api/chat")] == [question, question]
        assert bedrock_server.requests == []


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_hung_embedding_server_while_learning_still_serves_the_cloud_answer(
    entry: str, slow_embed_server: OllamaCompatibleServer, tmp_path: Path, ollama_chat,
    ollama_backend, bedrock_chat, bedrock_server,
) -> None:
    """Learning embeds the escalated question: with the embedder's server hung, the caller
    was held forever after the cloud had answered (measured: still waiting after 15 s)."""
    store = KnowledgeStore(OllamaEmbeddings(base_url=slow_embed_server.url, model="scripted-local"),
                           path=tmp_path / "kb")
    slow_embed_server.backend.embed_delay = 30.0  # type: ignore[attr-defined]
    ollama_backend.set_default("perhaps", logprobs=-3.0)
    bedrock_server.set_default("Daniel arap Moi")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), local_timeout=0.5,
                                 knowledge_store=store, learn_from_escalations=True)
    started = time.monotonic()
    message = (router.invoke("Who was the second president of Kenya?") if entry == "invoke"
               else asyncio.run(router.ainvoke("Who was the second president of Kenya?")))
    routing = message.response_metadata["routing"]
    assert message.content == "Daniel arap Moi" and routing["decision"] == "cloud"
    assert routing["learned"] is False
    assert "failed in the embedder" in routing["learn_error"], routing["learn_error"]
    assert time.monotonic() - started < 10.0  # the 30 s hang was not waited out
    assert len(bedrock_server.requests) == 1
    slow_embed_server.backend.embed_delay = 0.0  # type: ignore[attr-defined]
    assert store.count() == 0  # the store the caller passed: nothing half-written
