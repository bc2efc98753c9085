"""A Chroma server that hangs (``chroma run`` stopped with SIGSTOP: connections are accepted,
nothing answers). Chroma's HttpClient has no timeout of its own, so before the store's
``timeout`` a probe before an answer, or learning after an escalation, held the caller forever
(sync and async; measured: still hanging after 15 s). Every call must now end with an answer
and a record that says what happened, and a hung server must not cost a thread per call (a
store has a bounded number of reused worker threads)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import InvalidArgumentError, TierTimeoutError
from confidence_router.knowledge import (
    _SPARE_WORKERS,
    MAX_OVERDUE_OPERATIONS,
    KnowledgeStore,
    KnowledgeStoreError,
)
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.testing import OllamaCompatibleServer
from confidence_router.testing.processes import ChromaServerProcess, start_or_skip

QUESTION = "What is the capital of France?"
UNSURE = "Who was the second president of Kenya?"
TIMEOUT = 0.5


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def chroma_server() -> Iterator[ChromaServerProcess]:
    server = start_or_skip(ChromaServerProcess())
    yield server
    server.stop()


@pytest.fixture
def store(chroma_server: ChromaServerProcess,
          ollama_server: OllamaCompatibleServer) -> KnowledgeStore:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.HttpClient(host=chroma_server.host, port=chroma_server.port,
                                 settings=Settings(anonymized_telemetry=False))
    embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")
    # Seeded with a generous timeout: a freshly started server's first answers can take
    # longer than TIMEOUT on a loaded machine (the setup failed so once).
    with KnowledgeStore(embeddings, client=client, collection="hung", timeout=30.0) as seed:
        seed.add(QUESTION, "Paris.")
    return KnowledgeStore(embeddings, client=client, collection="hung", timeout=TIMEOUT)


@pytest.fixture
def hung(chroma_server: ChromaServerProcess) -> Iterator[ChromaServerProcess]:
    """The Chroma server, stopped (it hangs) for the test and resumed after it."""
    assert chroma_server.pid is not None
    os.kill(chroma_server.pid, signal.SIGSTOP)
    try:
        yield chroma_server
    finally:
        os.kill(chroma_server.pid, signal.SIGCONT)


@pytest.fixture
def scripted(ollama_backend):
    ollama_backend.add_probe(lambda r: "Respond with exactly one token" in
                             r.messages[-1]["content"], {"YES": -0.1, "NO": -3.0})
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == QUESTION, " Paris",
                              logprobs=-0.05)
    ollama_backend.add_answer(lambda r: r.messages[-1]["content"] == UNSURE, " Kenyatta",
                              logprobs=-3.0)
    return ollama_backend


def _chroma_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "confidence-router-chroma"]


def _bounded(call, limit: float = 20.0):
    """``call()`` in a thread; its result, or a failure if it still runs after ``limit`` s
    (the bug: the caller was held forever)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as error:  # noqa: BLE001 - reported below
            out["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still waiting after {limit} s: the caller hangs"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_a_probe_over_a_hung_chroma_server_answers_locally(entry, store, hung, scripted,
                                                           ollama_server, bedrock_chat,
                                                           bedrock_server):
    local = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(), local_timeout=5.0,
                                 precheck=SelfAssessmentProbe(model=local, store=store))
    ollama_server.clear_requests()
    call = ((lambda: router.invoke(QUESTION)) if entry == "invoke"
            else (lambda: asyncio.run(router.ainvoke(QUESTION))))
    message = _bounded(call)
    routing = message.response_metadata["routing"]
    assert message.content == " Paris"
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]
    if entry == "invoke":  # async: the router's own precheck deadline may come first
        assert "Chroma did not answer within 0.5 s" in routing["precheck"]["error"]
    chats = [r["body"]["messages"][-1]["content"] for r in ollama_server.requests_to("/api/chat")]
    assert chats == [QUESTION]  # no probe prompt was sent without its knowledge search
    assert bedrock_server.requests == []


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_learning_into_a_hung_chroma_server_still_serves_the_cloud_answer(
        entry, store, hung, scripted, ollama_server, bedrock_chat, bedrock_server):
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    local = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(), knowledge_store=store,
                                 learn_from_escalations=True)
    call = ((lambda: router.invoke(UNSURE)) if entry == "invoke"
            else (lambda: asyncio.run(router.ainvoke(UNSURE))))
    message = _bounded(call)
    routing = message.response_metadata["routing"]
    assert message.content == "Daniel arap Moi" and routing["decision"] == "cloud"
    assert routing["learned"] is False
    assert routing["learn_error"].startswith("KnowledgeStoreError: knowledge store add failed")
    assert "did not answer within 0.5 s" in routing["learn_error"]
    assert len(bedrock_server.requests) == 1


@pytest.fixture
def fresh(chroma_server: ChromaServerProcess, ollama_server: OllamaCompatibleServer,
          store: KnowledgeStore):
    """A factory of stores on the seeded collection, after the worker threads alive before
    it (other stores') are noted: ``(store, new_workers)``, ``new_workers()`` the store's."""
    import chromadb
    from chromadb.config import Settings

    store.close()  # the fixture's own store: its worker is not this test's
    before = set(_chroma_threads())
    made: list[KnowledgeStore] = []

    def make() -> KnowledgeStore:
        client = chromadb.HttpClient(host=chroma_server.host, port=chroma_server.port,
                                     settings=Settings(anonymized_telemetry=False))
        embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")
        made.append(KnowledgeStore(embeddings, client=client, collection="hung",
                                   timeout=TIMEOUT))
        return made[-1]

    yield make, lambda: {t for t in _chroma_threads() if t not in before}
    for each in made:
        each.close()


def _recovered(store: KnowledgeStore, limit: float = 20.0) -> int:
    """``store.count()`` once the overdue operations have returned (polled, bounded)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return store.count()
        except KnowledgeStoreError as error:
            if "have not returned" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_a_hung_server_costs_a_bounded_number_of_threads_then_fails_at_once(
        fresh, chroma_server):
    make, new_workers = fresh
    store = make()
    assert len(new_workers()) == 1  # the collection was opened in a worker
    os.kill(chroma_server.pid, signal.SIGSTOP)
    try:
        for _ in range(MAX_OVERDUE_OPERATIONS):
            with pytest.raises(KnowledgeStoreError, match="did not answer within") as info:
                store.count()
            assert info.value.stage == "chroma"
            assert isinstance(info.value.__cause__, TierTimeoutError)
        hung_workers = new_workers()
        assert len(hung_workers) == MAX_OVERDUE_OPERATIONS  # one per hung operation
        started = time.monotonic()
        for _ in range(10):
            with pytest.raises(KnowledgeStoreError, match="have not returned"):
                store.count()
        assert time.monotonic() - started < TIMEOUT  # none of the 10 waited for its timeout
        assert new_workers() == hung_workers  # no new thread
    finally:
        os.kill(chroma_server.pid, signal.SIGCONT)  # the server recovers: the store works
    assert _recovered(store) == 1
    for _ in range(20):
        assert store.count() == 1
    assert new_workers() == hung_workers  # the same workers, reused
    store.close()
    assert new_workers() == set()


def test_concurrent_callers_of_a_hung_server_use_a_bounded_number_of_workers(
        fresh, chroma_server):
    make, new_workers = fresh
    store = make()
    callers = 3 * (MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS)
    start = threading.Barrier(callers)
    errors: list[BaseException] = []

    def caller() -> None:
        start.wait()
        try:
            store.count()
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    os.kill(chroma_server.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20.0)
        assert not any(thread.is_alive() for thread in threads)  # every caller got an answer
        assert len(errors) == callers
        assert all(isinstance(e, KnowledgeStoreError) and e.stage == "chroma"
                   and isinstance(e.__cause__, TierTimeoutError) for e in errors)
        # A thread per call started one per caller; the workers are bounded per store.
        hung_workers = new_workers()
        assert len(hung_workers) <= MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS
        # Overdue: the calls each hung worker runs; the callers that timed out while queued
        # sent nothing to Chroma, so they are not counted (or nothing would ever recover).
        with pytest.raises(KnowledgeStoreError,
                           match=f"^.*: {len(hung_workers)} earlier Chroma operations have "
                                 "not returned"):
            store.count()
    finally:
        os.kill(chroma_server.pid, signal.SIGCONT)
    assert _recovered(store) == 1
    assert len(new_workers()) <= MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS


def test_a_copy_made_while_operations_are_overdue_recovers_with_the_store(
        fresh, chroma_server, ollama_server):
    """The router configures its own copy of a store (``with_embeddings``, for the
    embedder's timeout). A copy made while operations were overdue kept its own snapshot of
    the overdue count, which nothing decremented: it failed every call at once, forever."""
    make, _ = fresh
    store = make()
    os.kill(chroma_server.pid, signal.SIGSTOP)
    try:
        for _ in range(MAX_OVERDUE_OPERATIONS):
            with pytest.raises(KnowledgeStoreError, match="did not answer within"):
                store.count()
        copy = store.with_embeddings(
            OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local"))
        with pytest.raises(KnowledgeStoreError, match="have not returned"):
            copy.count()  # the same client, the same hung server
    finally:
        os.kill(chroma_server.pid, signal.SIGCONT)
    assert _recovered(store) == 1
    assert copy.count() == 1


def test_a_hung_server_does_not_hold_the_interpreter_at_exit(store, chroma_server,
                                                            ollama_server):
    """The workers are daemon threads (a ``ThreadPoolExecutor``'s are joined at exit): a
    process whose Chroma operation is still hanging exits (a real subprocess)."""
    import confidence_router

    script = textwrap.dedent(f"""
        import os, signal
        import chromadb
        from chromadb.config import Settings
        from langchain_ollama import OllamaEmbeddings
        from confidence_router.knowledge import KnowledgeStore, KnowledgeStoreError

        client = chromadb.HttpClient(host={chroma_server.host!r}, port={chroma_server.port},
                                     settings=Settings(anonymized_telemetry=False))
        store = KnowledgeStore(OllamaEmbeddings(base_url={ollama_server.url!r},
                                                model="scripted-local"),
                               client=client, collection="hung", timeout={TIMEOUT})
        print("count", store.count(), flush=True)
        os.kill({chroma_server.pid}, signal.SIGSTOP)
        try:
            store.count()
        except KnowledgeStoreError as error:
            print("timed out:", error.__cause__, flush=True)
    """)
    env = dict(os.environ,
               PYTHONPATH=str(Path(confidence_router.__file__).resolve().parents[1]))
    try:
        done = subprocess.run([sys.executable, "-c", script], check=False, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        os.kill(chroma_server.pid, signal.SIGCONT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "count 1", f"timed out: Chroma did not answer within {TIMEOUT:g} s"]


def test_a_healthy_server_is_unaffected_by_the_timeout(store, chroma_server):
    for i in range(5):
        store.add(f"Question {i}?", f"Answer {i}.")
    assert store.count() == 6
    assert [h.content for h in store.search("Question 3?", k=1)] == ["Answer 3."]


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, True, "5"])
def test_the_timeout_is_validated_before_any_connection(timeout, tmp_path):
    with pytest.raises(InvalidArgumentError, match="timeout must be a finite number"):
        KnowledgeStore(OllamaEmbeddings(base_url="http://127.0.0.1:9", model="m"),
                       path=tmp_path / "kb", timeout=timeout)
    assert not (tmp_path / "kb").exists()


def test_no_timeout_is_allowed(tmp_path, ollama_server):
    with KnowledgeStore(OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local"),
                        path=tmp_path / "kb", timeout=None) as store:
        store.add(QUESTION, "Paris.")
        assert store.timeout is None and store.count() == 1
