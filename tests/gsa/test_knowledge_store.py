"""KnowledgeStore over a real Chroma PersistentClient (one fresh directory per test)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings

from confidence_router.gsa import Hit, build_gsa_prompt
from confidence_router.knowledge import (
    KNOWLEDGE_PATH_ENV,
    EmbeddingDimensionError,
    KnowledgeEntry,
    KnowledgeStore,
    KnowledgeStoreError,
    default_knowledge_path,
    entry_id_for_question,
    normalize_question,
)
from confidence_router.testing.embeddings import hashing_embedding


class HashEmbeddings(Embeddings):
    """Deterministic, offline LangChain embeddings (no semantics: surface overlap only)."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return [hashing_embedding(t, self.dim) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        self.calls.append([text])
        return hashing_embedding(text, self.dim)


class FixedEmbeddings(Embeddings):
    """Maps known texts to chosen vectors (for exact similarity checks)."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.table[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.table[text]


@pytest.fixture(autouse=True)
def _offline_chroma(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """HOME in tmp (Chroma/onnxruntime write to ~/.cache) and a tripwire on the default EF."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(KNOWLEDGE_PATH_ENV, raising=False)

    from chromadb.api import types as chroma_types
    from chromadb.utils.embedding_functions import onnx_mini_lm_l6_v2

    def _boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("Chroma's default embedding function must never be used")

    monkeypatch.setattr(chroma_types.DefaultEmbeddingFunction, "__call__", _boom)
    monkeypatch.setattr(onnx_mini_lm_l6_v2.ONNXMiniLM_L6_V2, "__call__", _boom)
    monkeypatch.setattr(onnx_mini_lm_l6_v2.ONNXMiniLM_L6_V2, "_download_model_if_not_exists", _boom)
    yield home
    # nothing was downloaded or cached under HOME
    assert not (home / ".cache" / "chroma").exists()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KnowledgeStore]:
    with KnowledgeStore(HashEmbeddings(), path=tmp_path / "kb") as opened:
        yield opened


# ---------------------------------------------------------------------- import hygiene


def test_import_does_not_import_chromadb() -> None:
    code = (
        "import sys, confidence_router.knowledge, confidence_router.gsa; "
        "print('chromadb' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- CRUD


def test_add_get_search_delete(store: KnowledgeStore) -> None:
    assert store.count() == 0
    assert store.search("anything at all") == []

    entry = store.add(
        "What is the capital of France?",
        "Paris.",
        source="cloud_escalation",
        provenance={"model": "claude-sonnet-4-5", "run_id": "r1"},
    )
    assert isinstance(entry, KnowledgeEntry)
    assert entry.id == entry_id_for_question("What is the capital of France?")
    assert entry.source == "cloud_escalation"
    assert entry.provenance == {"model": "claude-sonnet-4-5", "run_id": "r1"}
    assert entry.created_at == entry.updated_at
    assert entry.created_at.tzinfo is not None
    assert store.count() == 1 and len(store) == 1

    got = store.get(entry.id)
    assert got == entry
    assert got is not None and got.provenance == entry.provenance
    assert store.get_by_question("  what is the CAPITAL of france? ") == entry
    assert store.get("kq-missing") is None

    hits = store.search("What is the capital of France?")
    assert len(hits) == 1
    hit = hits[0]
    assert isinstance(hit, Hit)
    assert hit.content == "Paris."
    assert hit.question == "What is the capital of France?"
    assert hit.id == entry.id
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert hit.metadata is not None and hit.metadata["source"] == "cloud_escalation"
    assert hit.metadata["provenance"] == {"model": "claude-sonnet-4-5", "run_id": "r1"}

    assert store.delete(entry.id) is True
    assert store.delete(entry.id) is False
    assert store.count() == 0
    assert store.search("What is the capital of France?") == []


def test_question_is_the_retrieval_key_not_content(store: KnowledgeStore) -> None:
    store.add("Who wrote Hamlet?", "The capital of France is Paris.")
    store.add("What is the capital of France?", "William Shakespeare wrote it.")
    hits = store.search("What is the capital of France?", k=2)
    assert hits[0].question == "What is the capital of France?"
    assert hits[0].content == "William Shakespeare wrote it."


def test_search_order_k_and_no_floor(store: KnowledgeStore) -> None:
    store.add_many(
        [
            ("What is the capital of France?", "Paris."),
            ("What is the capital of Spain?", "Madrid."),
            ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
            ("How many legs does a spider have?", "Eight."),
        ]
    )
    hits = store.search("What is the capital of France?", k=10)
    assert len(hits) == 4  # k larger than the store: everything, no floor
    scores = [h.score for h in hits]
    assert all(isinstance(x, float) for x in scores)
    assert scores == sorted((x for x in scores if x is not None), reverse=True)
    assert hits[0].content == "Paris."
    assert hits[1].content == "Madrid."
    assert len(store.search("What is the capital of France?", k=2)) == 2


def test_dedupe_updates_instead_of_multiplying(store: KnowledgeStore) -> None:
    first = store.add("What is the capital of France?", "Paris.", provenance={"run": 1})
    second = store.add(
        "  what is the   CAPITAL of France?\n", "Paris, France.", provenance={"run": 2}
    )
    assert store.count() == 1
    assert second.id == first.id
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    stored = store.get(first.id)
    assert stored is not None
    assert stored.content == "Paris, France."
    assert stored.question == "what is the   CAPITAL of France?"  # latest wording, stripped
    assert stored.provenance == {"run": 2}
    assert stored.created_at == first.created_at


def test_add_many_dedupes_within_batch_and_returns_in_order(store: KnowledgeStore) -> None:
    entries = store.add_many(
        [("Q one?", "a"), ("Q two?", "b"), ("q ONE?", "c")], source="cloud_escalation"
    )
    assert store.count() == 2
    assert [e.content for e in entries] == ["c", "b", "c"]  # the later duplicate wins
    assert entries[0].id == entries[2].id
    assert store.add_many([]) == []


def test_normalize_question() -> None:
    assert normalize_question("  Hello\t  WORLD \n") == "hello world"
    assert normalize_question("Straße") == normalize_question("STRASSE")  # casefold
    assert entry_id_for_question("A  b") == entry_id_for_question("a b")
    assert entry_id_for_question("a b") != entry_id_for_question("a c")


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("question", "content", "field"),
    [("", "c", "question"), ("  \n", "c", "question"), ("q", "", "content"), ("q", " ", "content")],
)
def test_empty_text_errors_name_the_field(
    store: KnowledgeStore, question: str, content: str, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        store.add(question, content)
    assert store.count() == 0


def test_other_bad_input(store: KnowledgeStore) -> None:
    with pytest.raises(ValueError, match="source"):
        store.add("q", "c", source=" ")
    with pytest.raises(TypeError):
        store.add("q", "c", provenance=["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query"):
        store.search("   ")
    with pytest.raises(ValueError, match="k must"):
        store.search("q", k=0)
    # a bad item anywhere in a batch writes nothing
    with pytest.raises(ValueError, match="content"):
        store.add_many([("good?", "fine"), ("bad?", "")])
    assert store.count() == 0
    with pytest.raises(ValueError, match="either path or client"):
        KnowledgeStore(HashEmbeddings(), path="x", client=object())


def test_dimension_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    KnowledgeStore(HashEmbeddings(64), path=path).add("Who wrote Hamlet?", "Shakespeare.")
    other = KnowledgeStore(HashEmbeddings(32), path=path)
    with pytest.raises(EmbeddingDimensionError) as info:
        other.add("Who wrote Macbeth?", "Shakespeare.")
    assert "64" in str(info.value) and "32" in str(info.value)
    assert (info.value.expected, info.value.got) == (64, 32)
    assert isinstance(info.value, ValueError)
    with pytest.raises(EmbeddingDimensionError):
        other.search("Who wrote Hamlet?")
    assert other.count() == 1


def test_zero_or_nan_embeddings_rejected(tmp_path: Path) -> None:
    zero = KnowledgeStore(FixedEmbeddings({"q": [0.0, 0.0]}), path=tmp_path / "a")
    with pytest.raises(ValueError, match="zero norm"):
        zero.add("q", "c")
    nan = KnowledgeStore(FixedEmbeddings({"q": [float("nan"), 1.0]}), path=tmp_path / "b")
    with pytest.raises(ValueError, match="NaN"):
        nan.add("q", "c")


# ---------------------------------------------------------------------- similarity


def test_score_is_one_minus_cosine_distance(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    a, b, c = (rng.normal(size=16) for _ in range(3))
    q = a + 0.4 * rng.normal(size=16)
    table = {"A?": list(a * 3.0), "B?": list(b), "C?": list(c * 0.1), "query": list(q)}
    store = KnowledgeStore(FixedEmbeddings(table), path=tmp_path / "kb")
    store.add_many([("A?", "a"), ("B?", "b"), ("C?", "c")])

    def cosine(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    expected = {"A?": cosine(q, a), "B?": cosine(q, b), "C?": cosine(q, c)}
    hits = store.search("query", k=3)
    assert [h.question for h in hits] == sorted(expected, key=lambda k: expected[k], reverse=True)
    for hit in hits:
        assert hit.question is not None
        assert hit.score == pytest.approx(expected[hit.question], abs=1e-5)


def test_negative_similarity_not_clamped(tmp_path: Path) -> None:
    store = KnowledgeStore(
        FixedEmbeddings({"x?": [1.0, 0.0], "opposite": [-1.0, 0.2]}), path=tmp_path / "kb"
    )
    store.add("x?", "c")
    [hit] = store.search("opposite")
    assert hit.score is not None
    assert hit.score == pytest.approx(-1.0 / np.sqrt(1.04), abs=1e-5)
    assert hit.score < 0


def test_known_pair_cosine_0875(tmp_path: Path) -> None:
    # unit vectors with cos 0.875 -> cosine distance 0.125
    table = {"k?": [1.0, 0.0, 0.0], "q": [0.875, float(np.sqrt(1 - 0.875**2)), 0.0]}
    store = KnowledgeStore(FixedEmbeddings(table), path=tmp_path / "kb")
    store.add("k?", "content")
    assert store.search("q")[0].score == pytest.approx(0.875, abs=1e-6)


def test_strong_hit_feeds_gsa_prompt(store: KnowledgeStore) -> None:
    store.add("What is the capital of France?", "Paris is the capital of France.")
    store.add("How many legs does a spider have?", "Eight.")
    hits = store.search("What is the capital of France?")
    prompt = build_gsa_prompt("What is the capital of France?", hits)
    assert prompt.n_hits_used == 1
    assert "(memory of: What is the capital of France?)\n   Paris is the capital" in prompt.text
    assert "Eight." not in prompt.text


# ---------------------------------------------------------------------- persistence


def test_persistence_across_process_restart(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    store = KnowledgeStore(HashEmbeddings(), path=path, collection="persist_test")
    store.add("What is the capital of France?", "Paris.", source="cloud_escalation")
    store.add("Who wrote Hamlet?", "Shakespeare.")
    del store

    script = textwrap.dedent(
        f"""
        import json, sys
        from langchain_core.embeddings import Embeddings
        from confidence_router.knowledge import KnowledgeStore
        from confidence_router.testing.embeddings import hashing_embedding

        class E(Embeddings):
            def embed_documents(self, texts):
                return [hashing_embedding(t, 64) for t in texts]
            def embed_query(self, text):
                return hashing_embedding(text, 64)

        store = KnowledgeStore(E(), path={str(path)!r}, collection="persist_test")
        hits = store.search("What is the capital of France?", k=5)
        print(json.dumps({{
            "count": store.count(),
            "dimension": store.dimension,
            "hits": [[h.question, h.content, h.score, h.metadata["source"]] for h in hits],
            "chromadb_loaded": "chromadb" in sys.modules,
        }}))
        """
    )
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["count"] == 2
    assert data["dimension"] == 64
    assert data["hits"][0][:2] == ["What is the capital of France?", "Paris."]
    assert data["hits"][0][2] == pytest.approx(1.0, abs=1e-5)
    assert data["hits"][0][3] == "cloud_escalation"
    assert data["hits"][1][0] == "Who wrote Hamlet?"


def test_reopen_keeps_cosine_space_and_dimension(tmp_path: Path) -> None:
    path = tmp_path / "kb"
    KnowledgeStore(HashEmbeddings(), path=path).add("Q?", "A.")
    reopened = KnowledgeStore(HashEmbeddings(), path=path)
    assert reopened.dimension == 64
    assert reopened._space() == "cosine"


def test_rejects_existing_non_cosine_collection(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(
        path=str(tmp_path / "kb"), settings=Settings(anonymized_telemetry=False)
    )
    client.create_collection("l2_collection", embedding_function=None)
    with pytest.raises(ValueError, match="cosine"):
        KnowledgeStore(HashEmbeddings(), client=client, collection="l2_collection")


def test_user_supplied_client(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(
        path=str(tmp_path / "shared"), settings=Settings(anonymized_telemetry=False)
    )
    store = KnowledgeStore(HashEmbeddings(), client=client, collection="mine")
    assert store.path is None
    store.add("Q?", "A.")
    assert client.get_collection("mine", embedding_function=None).count() == 1


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    assert default_knowledge_path() == home / ".cache" / "confidence-router" / "knowledge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_knowledge_path() == tmp_path / "xdg" / "confidence-router" / "knowledge"
    monkeypatch.setenv(KNOWLEDGE_PATH_ENV, str(tmp_path / "env-kb"))
    assert default_knowledge_path() == tmp_path / "env-kb"
    store = KnowledgeStore(HashEmbeddings())
    assert store.path == tmp_path / "env-kb"
    store.add("Q?", "A.")
    assert (tmp_path / "env-kb").is_dir()


def test_empty_store_search_does_not_embed(store: KnowledgeStore) -> None:
    embeddings = store.embeddings
    assert isinstance(embeddings, HashEmbeddings)
    assert store.search("What?") == []
    assert embeddings.calls == []


# ---------------------------------------------------------------------- async


def test_async_add_and_search(store: KnowledgeStore) -> None:
    async def main() -> list[Hit]:
        await store.aadd("What is the capital of France?", "Paris.")
        await store.aadd_many([("Who wrote Hamlet?", "Shakespeare.")])
        return await store.asearch("What is the capital of France?", k=2)

    hits = asyncio.run(main())
    assert store.count() == 2
    assert hits[0].content == "Paris."
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------- OllamaEmbeddings


def test_with_ollama_embeddings_over_fake_server(tmp_path: Path) -> None:
    testing = pytest.importorskip("confidence_router.testing")
    from langchain_ollama import OllamaEmbeddings

    backend = testing.ScriptedBackend(models=["x"], embedding_dim=48)
    with testing.OllamaCompatibleServer(backend) as server:
        embeddings = OllamaEmbeddings(base_url=server.url, model="x")
        store = KnowledgeStore(embeddings, path=tmp_path / "kb")
        store.add("What is the capital of France?", "Paris.")
        store.add("Who wrote Hamlet?", "Shakespeare.")
        hits = store.search("What is the capital of France?", k=2)
        assert store.dimension == 48
        assert hits[0].content == "Paris."
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        embedded = [text for _, inputs in backend.embed_requests for text in inputs]
        # the question is embedded (not the content), and the query as given
        assert "What is the capital of France?" in embedded
        assert "Paris." not in embedded


def test_self_similarity_tau(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from confidence_router.testing import hashing_embedding

    class _Hashing(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [hashing_embedding(t, 32) for t in texts]

        def embed_query(self, text: str) -> list[float]:
            return hashing_embedding(text, 32)

    monkeypatch.setenv("HOME", str(tmp_path))
    store = KnowledgeStore(_Hashing(), path=tmp_path / "kb")
    questions = [f"question {w} about topic {i}" for i, w in enumerate("abcdefghij")]
    store.add_many([(q, "x") for q in questions])
    vectors = np.array([hashing_embedding(q, 32) for q in questions])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = vectors @ vectors.T
    np.fill_diagonal(cosine, -np.inf)
    expected = float(np.quantile(cosine.max(axis=1), 0.9))
    assert store.self_similarity_tau(0.9) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="quantile"):
        store.self_similarity_tau(1.0)


def test_close_releases_the_client_the_store_opened(tmp_path: Path) -> None:
    import os

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    with KnowledgeStore(HashEmbeddings(), path=tmp_path / "warm") as warm:
        warm.add("warm up", "imports")
    before = descriptors()
    for i in range(5):
        with KnowledgeStore(HashEmbeddings(), path=tmp_path / f"kb{i}") as store:
            store.add("What is the capital of France?", "Paris.")
            assert len(store) == 1
    assert descriptors() <= before + 2  # each store's database and threads were released
    reopened = KnowledgeStore(HashEmbeddings(), path=tmp_path / "kb0")
    assert len(reopened) == 1  # closing kept the data
    reopened.close()
    reopened.close()  # idempotent
    with pytest.raises(KnowledgeStoreError):
        reopened.count()


def test_close_leaves_a_client_passed_in_open(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(tmp_path / "own"),
                                       settings=Settings(anonymized_telemetry=False))
    store = KnowledgeStore(HashEmbeddings(), client=client)
    store.add("q", "a")
    store.close()
    assert len(store) == 1  # the caller's client still serves
    client.close()
