"""Knowledge on a Chroma server: ``KnowledgeStore(embeddings, client=chromadb.HttpClient(...))``
against a real ``chroma run`` process, shared by two routers (as two workers would)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from confidence_router.testing.processes import ChromaServerProcess, start_or_skip


@pytest.fixture(scope="module")
def chroma_server() -> Iterator[ChromaServerProcess]:
    server = start_or_skip(ChromaServerProcess())
    yield server
    server.stop()


def http_client(server: ChromaServerProcess):
    import chromadb
    from chromadb.config import Settings

    return chromadb.HttpClient(host=server.host, port=server.port,
                               settings=Settings(anonymized_telemetry=False))


def test_knowledge_store_on_a_chroma_server(chroma_server, ollama_server):
    from langchain_ollama import OllamaEmbeddings

    from confidence_router import KnowledgeStore

    embeddings = OllamaEmbeddings(model="scripted-local", base_url=ollama_server.url)
    writer = KnowledgeStore(embeddings, client=http_client(chroma_server), collection="shared")
    reader = KnowledgeStore(embeddings, client=http_client(chroma_server), collection="shared")
    writer.add("What is the capital of Australia?", "Canberra.", source="test")
    hits = reader.search("capital of Australia?", k=1)
    assert hits and hits[0].content == "Canberra."
    assert len(reader) == 1
    # The embeddings were computed by the Ollama-compatible server, not by Chroma.
    assert ollama_server.requests_to("/api/embed")


def test_escalations_learned_by_one_router_are_seen_by_another(
    chroma_server, ollama_server, ollama_backend, ollama_chat, bedrock_chat, bedrock_server
):
    from langchain_ollama import OllamaEmbeddings

    from confidence_router import ConfidenceRoutedLLM, KnowledgeStore

    ollama_backend.add_answer("Kenya", " Mombasa", logprobs=-3.0)
    bedrock_server.add_answer("Kenya", "Nairobi.")
    embeddings = OllamaEmbeddings(model="scripted-local", base_url=ollama_server.url)

    def store() -> KnowledgeStore:
        return KnowledgeStore(embeddings, client=http_client(chroma_server), collection="learned")

    worker_a = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                   knowledge_store=store(), learn_from_escalations=True)
    assert worker_a.invoke("What is the capital of Kenya?").content == "Nairobi."
    other_worker_store = store()
    entry = other_worker_store.get_by_question("What is the capital of Kenya?")
    assert entry is not None and entry.content == "Nairobi."


def test_proxy_learns_into_a_chroma_server(chroma_server, make_proxy, ollama_server,
                                           ollama_backend, bedrock_server):
    """With CONFIDENCE_ROUTER_CHROMA_URL the proxy's escalations become shared knowledge."""
    import openai
    from langchain_ollama import OllamaEmbeddings

    from confidence_router import KnowledgeStore
    from confidence_router.proxy.config import ProxyConfig

    ollama_backend.add_answer("Peru", " Lima?", logprobs=-3.0)
    bedrock_server.add_answer("Peru", "Lima.")
    proxy = make_proxy(config=ProxyConfig(chroma_url=chroma_server.url,
                                          embedding_model="scripted-local"))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    assert reply.choices[0].message.content == "Lima."
    embeddings = OllamaEmbeddings(model="scripted-local", base_url=ollama_server.url)
    store = KnowledgeStore(embeddings, client=http_client(chroma_server))
    entry = store.get_by_question("What is the capital of Peru?")
    assert entry is not None and entry.content == "Lima."
