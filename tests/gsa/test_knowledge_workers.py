"""The knowledge store's Chroma worker threads (a real chromadb PersistentClient in tmp_path).

Each Chroma operation once ran in a thread of its own (so that one past the store's timeout
could be abandoned): ~1.9 MB of RSS growth per 1000 calls in a soak, without bound. A store
now reuses a few daemon workers. Counts and thread identities, not timings.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest
from langchain_core.embeddings import Embeddings

from confidence_router.knowledge import (
    _SPARE_WORKERS,
    _WORKER_NAME,
    MAX_OVERDUE_OPERATIONS,
    KnowledgeStore,
)
from confidence_router.testing.embeddings import hashing_embedding

LIMIT = MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS


class HashEmbeddings(Embeddings):
    """Deterministic, offline embeddings (Chroma's default embedding function is never used)."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [hashing_embedding(t, 64) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return hashing_embedding(text, 64)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def baseline() -> set[threading.Thread]:
    """Worker threads alive before the test (other tests' stores): not this test's."""
    return set(_workers())


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == _WORKER_NAME]


def _new_workers(baseline: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in _workers() if t not in baseline}


def _store(tmp_path: Path, **kwargs: object) -> KnowledgeStore:
    return KnowledgeStore(HashEmbeddings(), path=tmp_path / "kb", timeout=30.0, **kwargs)


def test_a_sequential_caller_reuses_one_worker_over_2000_operations(tmp_path, baseline):
    with _store(tmp_path) as store:
        store.add("What is the capital of France?", "Paris.")
        first = _new_workers(baseline)
        assert len(first) == 1  # the open, the add's reads and writes: one worker
        seen: set[threading.Thread] = set(first)
        for i in range(500):  # 4 operations a round: 2000
            assert store.count() == 1
            assert store.get_by_question("What is the capital of France?") is not None
            hits = store.search("capital of France?", k=1)  # 2 counts and a query
            assert [h.content for h in hits] == ["Paris."]
            if i % 50 == 0:
                seen |= _new_workers(baseline)
        seen |= _new_workers(baseline)
        # One thread did all of it, and is still there for the next operation (a thread
        # per call left a different, or no, thread at each look).
        assert seen == first
        assert all(t.is_alive() for t in first)


def test_sixteen_concurrent_callers_get_their_own_answers(tmp_path, baseline):
    n = 16
    with _store(tmp_path) as store:
        store.add_many([(f"Question number {i}?", f"Answer {i}.") for i in range(n)])
        start = threading.Barrier(n)
        answers: dict[int, list[str]] = {}
        errors: list[BaseException] = []
        most = [0]

        def caller(i: int) -> None:
            try:
                start.wait()
                for _ in range(20):
                    hits = store.search(f"Question number {i}?", k=1)
                    answers.setdefault(i, []).append(hits[0].content)
                    most[0] = max(most[0], len(_new_workers(baseline)))
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        callers = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
        assert errors == []
        assert answers == {i: [f"Answer {i}."] * 20 for i in range(n)}
        assert 1 <= most[0] <= LIMIT
        assert len(_new_workers(baseline)) <= LIMIT


def test_concurrent_async_searches_keep_working(tmp_path, baseline):
    with _store(tmp_path) as store:
        store.add_many([(f"Question number {i}?", f"Answer {i}.") for i in range(16)])

        async def main() -> list[list[str]]:
            results = await asyncio.gather(
                *(store.asearch(f"Question number {i % 16}?", k=1) for i in range(64)))
            return [[h.content for h in hits] for hits in results]

        assert asyncio.run(main()) == [[f"Answer {i % 16}."] for i in range(64)]
        assert len(_new_workers(baseline)) <= LIMIT


def test_close_ends_the_workers_and_is_idempotent(tmp_path, baseline):
    store = _store(tmp_path)
    store.add("What is the capital of France?", "Paris.")
    assert len(_new_workers(baseline)) == 1
    store.close()
    assert _new_workers(baseline) == set()  # close() joined its idle worker
    store.close()
    assert _new_workers(baseline) == set()


def test_a_store_on_a_passed_client_still_works_after_close(tmp_path, baseline):
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(tmp_path / "kb"),
                                       settings=Settings(anonymized_telemetry=False))
    store = KnowledgeStore(HashEmbeddings(), client=client, timeout=30.0)
    store.add("What is the capital of France?", "Paris.")
    store.close()  # the client is the caller's: it stays open, and so does the store
    assert _new_workers(baseline) == set()
    assert store.count() == 1
    assert len(_new_workers(baseline)) == 1
    store.close()
    assert _new_workers(baseline) == set()


def test_a_store_garbage_collected_without_close_leaves_no_thread(tmp_path, baseline):
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(tmp_path / "kb"),
                                       settings=Settings(anonymized_telemetry=False))
    store = KnowledgeStore(HashEmbeddings(), client=client, timeout=30.0)
    store.add("What is the capital of France?", "Paris.")
    clone = store.with_embeddings(HashEmbeddings())  # shares the workers
    assert clone.count() == 1
    (worker,) = _new_workers(baseline)
    del store, clone
    gc.collect()
    worker.join(timeout=20.0)  # ends well before its idle time (60 s) runs out
    assert not worker.is_alive()
    assert _new_workers(baseline) == set()


def test_timeout_none_calls_chroma_inline(tmp_path, baseline):
    with KnowledgeStore(HashEmbeddings(), path=tmp_path / "kb", timeout=None) as store:
        store.add("What is the capital of France?", "Paris.")
        assert [h.content for h in store.search("capital of France?")] == ["Paris."]
        assert _new_workers(baseline) == set()


def test_chroma_errors_are_raised_in_the_callers_thread(tmp_path, baseline):
    import chromadb
    from chromadb.config import Settings

    from confidence_router.knowledge import KnowledgeStoreError

    with _store(tmp_path, collection="doomed") as store:
        store.add("What is the capital of France?", "Paris.")
        other = chromadb.PersistentClient(path=str(tmp_path / "kb"),
                                          settings=Settings(anonymized_telemetry=False))
        other.delete_collection("doomed")  # another client deletes it
        for _ in range(3):
            with pytest.raises(KnowledgeStoreError) as info:
                store.count()
            assert info.value.stage == "chroma" and info.value.__cause__ is not None
        assert len(_new_workers(baseline)) == 1  # the worker survived the errors
