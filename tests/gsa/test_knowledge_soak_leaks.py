"""Knowledge stores made and closed on a long-lived event loop must not pile up clients.

Found by the soak checks (``benchmarks/soak.py``): ``KnowledgeStore`` keeps, on the running
loop, an ``OllamaEmbeddings`` copy per embedder for async searches (its httpx ``AsyncClient``
is bound to that loop). The entry held the embedder itself, so a store made per request on a
server's loop, even when closed, left its embedder, the copy, their httpx clients and a
kept-alive socket behind for as long as the loop ran. Counts, not timings.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from confidence_router import KnowledgeStore


def _live(*names: str) -> int:
    gc.collect()
    return sum(type(o).__name__ in names for o in gc.get_objects())


@pytest.fixture
def chroma_client(tmp_path: Path):
    import chromadb

    return chromadb.PersistentClient(path=str(tmp_path / "kb"))


async def test_stores_made_per_request_leave_no_clients_on_the_loop(
    ollama_server, chroma_client
):
    from langchain_ollama import OllamaEmbeddings

    async def one_request(i: int) -> None:
        embedder = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")
        with KnowledgeStore(embedder, client=chroma_client) as store:
            store.add(f"What is the capital of country {i}?", f"City {i}.")
            hits = await store.asearch(f"What is the capital of country {i}?")
        assert hits and hits[0].content == f"City {i}."

    for i in range(3):
        await one_request(i)
    embedders, clients = _live("OllamaEmbeddings"), _live("Client", "AsyncClient")
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(3, 43):
        await one_request(i)
    # Every search embedded its query through the scripted server (async copy per store).
    embedded = [inputs for _model, inputs in ollama_server.backend.embed_requests]
    assert sum(i == [f"What is the capital of country {n}?"] for n in range(43)
               for i in embedded) == 2 * 43  # the add and the search of each request
    assert _live("OllamaEmbeddings") <= embedders
    assert _live("Client", "AsyncClient") <= clients
    assert len(os.listdir("/proc/self/fd")) <= fds + 4


async def test_a_long_lived_store_keeps_one_copy_per_loop(ollama_server, chroma_client):
    from langchain_ollama import OllamaEmbeddings

    embedder = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")
    with KnowledgeStore(embedder, client=chroma_client) as store:
        store.add("What is the capital of France?", "Paris.")
        await store.asearch("capital of France")
        embedders = _live("OllamaEmbeddings")
        for _ in range(30):
            assert (await store.asearch("capital of France"))[0].content == "Paris."
        assert _live("OllamaEmbeddings") == embedders == 2  # the embedder and its loop copy
