"""hashing_embedding: deterministic unit vectors, plus the embedding endpoints of the fake Ollama."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import ollama
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_ollama import OllamaEmbeddings

from confidence_router.serving.ollama_server import OllamaCompatibleServer
from confidence_router.testing import (
    ScriptedBackend,
    cosine_similarity,
    hashing_embedding,
    hashing_embeddings,
)

QUESTION = "What is the capital of France?"


def _norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


# ---- the pure function ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), dim=st.integers(min_value=1, max_value=256))
def test_any_text_gives_unit_vector_of_requested_dim(text: str, dim: int) -> None:
    vector = hashing_embedding(text, dim)
    assert len(vector) == dim
    assert all(math.isfinite(x) for x in vector)
    assert _norm(vector) == pytest.approx(1.0)
    assert hashing_embedding(text, dim) == vector  # deterministic


def test_identical_texts_have_cosine_one() -> None:
    a, b = hashing_embedding(QUESTION), hashing_embedding(QUESTION)
    assert a == b
    assert cosine_similarity(a, b) == pytest.approx(1.0)


def test_case_and_punctuation_are_ignored() -> None:
    assert hashing_embedding("Hello, World!") == hashing_embedding("hello world")


def test_texts_sharing_most_words_are_close() -> None:
    similar = "What is the capital city of France?"
    assert cosine_similarity(hashing_embedding(QUESTION), hashing_embedding(similar)) > 0.85


def test_unrelated_texts_are_far() -> None:
    unrelated = "Who wrote the novel Moby Dick?"
    low_dim = cosine_similarity(hashing_embedding(QUESTION), hashing_embedding(unrelated))
    high_dim = cosine_similarity(
        hashing_embedding(QUESTION, 1024), hashing_embedding(unrelated, 1024)
    )
    assert low_dim < 0.4
    # Collision noise shrinks with the dimension; what remains is the shared word "the".
    assert high_dim < 0.3


def test_similarity_ranks_near_duplicates_above_unrelated() -> None:
    query = hashing_embedding("how many moons does jupiter have")
    near = hashing_embedding("Jupiter has how many moons?")
    far = hashing_embedding("best pizza dough recipe")
    assert cosine_similarity(query, near) > cosine_similarity(query, far) + 0.5


def test_stable_across_processes() -> None:
    # Python's hash() is salted per process; the embedding must not be.
    code = (
        "import json; from confidence_router.testing.embeddings import hashing_embedding;"
        f"print(json.dumps(hashing_embedding({QUESTION!r}, 16)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == hashing_embedding(QUESTION, 16)  # floats round-trip exactly


@pytest.mark.parametrize("text", ["", "   ", "?!."])
def test_texts_without_words_still_give_a_unit_vector(text: str) -> None:
    vector = hashing_embedding(text)
    assert _norm(vector) == pytest.approx(1.0)
    assert vector == hashing_embedding("")


@pytest.mark.parametrize("dim", [0, -3, 2.5, True])
def test_invalid_dim_is_a_value_error(dim: object) -> None:
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        hashing_embedding("x", dim)  # type: ignore[arg-type]


def test_non_string_text_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expects a str"):
        hashing_embedding(["not", "a", "string"])  # type: ignore[arg-type]


def test_batch_helper_and_its_guard_against_a_bare_string() -> None:
    assert hashing_embeddings(["a", "b"], 8) == [
        hashing_embedding("a", 8),
        hashing_embedding("b", 8),
    ]
    with pytest.raises(TypeError, match="not a single str"):
        hashing_embeddings("abc")


def test_cosine_similarity_checks_lengths_and_handles_zero_vectors() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        cosine_similarity([1.0], [1.0, 0.0])
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) == 0.0
    assert cosine_similarity([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(-1.0)


# ---- through the fake Ollama server -----------------------------------------------------------


def test_ollama_embeddings_client_gets_hashing_vectors(
    ollama_server: OllamaCompatibleServer, ollama_backend: ScriptedBackend
) -> None:
    embedder = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-embed")
    docs = ["Paris is the capital of France.", "Canberra is the capital of Australia."]
    assert embedder.embed_query(QUESTION) == pytest.approx(hashing_embedding(QUESTION))
    assert embedder.embed_documents(docs) == [pytest.approx(hashing_embedding(d)) for d in docs]
    assert ollama_backend.embed_requests == [
        ("scripted-embed", [QUESTION]),
        ("scripted-embed", docs),
    ]
    body = ollama_server.requests_to("/api/embed")[-1]["body"]
    assert body["input"] == docs


async def test_ollama_embeddings_async(ollama_server: OllamaCompatibleServer) -> None:
    embedder = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-embed")
    assert await embedder.aembed_query("hi") == pytest.approx(hashing_embedding("hi"))


def test_embedding_dimension_is_configurable_on_the_backend() -> None:
    with OllamaCompatibleServer(ScriptedBackend(embedding_dim=384)) as server:
        vector = OllamaEmbeddings(base_url=server.url, model="m").embed_query("hello")
    assert len(vector) == 384


def test_raw_client_embed_and_legacy_embeddings_endpoint(
    ollama_server: OllamaCompatibleServer,
) -> None:
    client = ollama.Client(host=ollama_server.url)
    single = client.embed(model="m", input="one text")
    assert single.embeddings == [pytest.approx(hashing_embedding("one text"))]
    legacy = client.embeddings(model="m", prompt="one text")
    assert list(legacy.embedding) == pytest.approx(hashing_embedding("one text"))
    # Ollama's `dimensions` option truncates (and the fake re-normalises).
    short = client.embed(model="m", input=["a b c"], dimensions=8).embeddings[0]
    assert len(short) == 8
    assert _norm(list(short)) == pytest.approx(1.0)


def test_embed_rejects_non_string_input(ollama_server: OllamaCompatibleServer) -> None:
    import httpx

    reply = httpx.post(f"{ollama_server.url}/api/embed", json={"model": "m", "input": [1, 2]})
    assert reply.status_code == 400
    assert "input must be a string or a list of strings" in reply.json()["error"]
