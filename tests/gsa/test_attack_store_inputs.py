"""Attacks on KnowledgeStore and SelfAssessmentProbe input validation: every bad value is a
clear typed error (under ConfidenceRouterError) raised before anything is written or sent.
Runs a real Chroma PersistentClient per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from confidence_router.errors import (
    ConfidenceRouterError,
    InvalidArgumentError,
    InvalidTypeError,
    RoutingConfigError,
)
from confidence_router.gsa import build_gsa_prompt
from confidence_router.knowledge import KnowledgeStore, KnowledgeStoreError
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.testing.embeddings import hashing_embedding


class CountingEmbeddings(Embeddings):
    """Offline hashing embeddings that count calls (no call may happen on a bad input)."""

    def __init__(self, dim: int = 32) -> None:
        self.dim = dim
        self.calls = 0
        self.fail: BaseException | None = None
        self.override: Any = None

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.override is not None:
            return self.override  # type: ignore[no-any-return]
        return [hashing_embedding(t, self.dim) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def embeddings() -> CountingEmbeddings:
    return CountingEmbeddings()


@pytest.fixture
def store(tmp_path: Path, embeddings: CountingEmbeddings) -> Iterator[KnowledgeStore]:
    with KnowledgeStore(embeddings, path=tmp_path / "kb") as opened:
        yield opened


# ---------------------------------------------------------------------- adding


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        (["Qa"], InvalidTypeError, r"items\[0\]"),  # was stored as question "Q", content "a"
        ([("q?", "c", "extra")], InvalidTypeError, r"items\[0\]"),  # was a bare ValueError
        ([("q?",)], InvalidTypeError, r"items\[0\]"),
        ([("good?", "fine"), 42], InvalidTypeError, r"items\[1\]"),
        (None, InvalidTypeError, "items"),  # was a bare TypeError
        ("QA", InvalidTypeError, "items"),
        ({"q?": "c"}, InvalidTypeError, "items"),
        ([("q?", None)], InvalidTypeError, "content"),
        ([(None, "c")], InvalidTypeError, "question"),
        ([("   ", "c")], InvalidArgumentError, "question"),
        ([("q?", "\n\t")], InvalidArgumentError, "content"),
        ([("q\ud800?", "c")], InvalidArgumentError, "question"),  # was the embedder's error
        ([("q?", "c\udfff")], InvalidArgumentError, "content"),  # was Chroma's error
    ],
    ids=["two-char-str", "triple", "single", "non-pair", "none", "str", "mapping",
         "none-content", "none-question", "blank-question", "blank-content",
         "surrogate-question", "surrogate-content"],
)
def test_bad_items_are_typed_and_nothing_is_embedded_or_written(
    store: KnowledgeStore, embeddings: CountingEmbeddings, items: Any,
    error: type[Exception], match: str,
) -> None:
    with pytest.raises(error, match=match) as info:
        store.add_many(items)
    assert isinstance(info.value, ConfidenceRouterError)
    assert embeddings.calls == 0 and store.count() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"source": ""}, InvalidArgumentError, "source"),
        ({"source": None}, InvalidTypeError, "source"),
        ({"provenance": ["a", "b"]}, InvalidTypeError, "provenance"),
        ({"provenance": {1: "a", "b": 2}}, InvalidArgumentError, "provenance"),
    ],
)
def test_bad_metadata_is_typed_before_any_write(
    store: KnowledgeStore, embeddings: CountingEmbeddings, kwargs: dict[str, Any],
    error: type[Exception], match: str,
) -> None:
    with pytest.raises(error, match=match):
        store.add("q?", "c", **kwargs)
    assert embeddings.calls == 0 and store.count() == 0


def test_duplicate_questions_in_one_batch_are_one_entry(store: KnowledgeStore) -> None:
    entries = store.add_many([("Who wrote Hamlet?", "Marlowe."),
                              ("  who WROTE   hamlet?", "Shakespeare.")])
    assert entries[0].id == entries[1].id and store.count() == 1
    assert store.get(entries[0].id).content == "Shakespeare."  # type: ignore[union-attr]


class _NotAList:
    """What a broken embedder might hand back: no length, not a list of vectors."""


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (_NotAList(), "not a list of vectors"),  # was a bare TypeError from len()
        ([], "0 vectors for 1"),
        ([[0.1] * 32, [0.2] * 32], "2 vectors for 1"),
        ([[float("nan")] * 32], "NaN"),
        ([["x"] * 32], "not a sequence of numbers"),
        ([[1e-30] + [0.0] * 31], "float32"),  # was stored; Chroma normalised it to zeros
        ([[1e30] + [0.0] * 31], "float32"),  # was stored; Chroma normalised it to NaN
        ([[1e39] + [0.0] * 31], "float32"),
    ],
    ids=["no-len", "none", "two", "nan", "strings", "tiny-norm", "huge-norm", "beyond-f32"],
)
def test_a_misbehaving_embedder_on_add_is_typed_and_writes_nothing(
    store: KnowledgeStore, embeddings: CountingEmbeddings, override: Any, match: str
) -> None:
    embeddings.override = override
    with pytest.raises(InvalidArgumentError, match=match):
        store.add("q?", "c")
    assert store.count() == 0


def test_an_embedder_raising_on_add_is_a_typed_error(
    store: KnowledgeStore, embeddings: CountingEmbeddings
) -> None:
    embeddings.fail = TimeoutError("embedding server too slow")
    with pytest.raises(KnowledgeStoreError, match="too slow") as info:
        store.add("q?", "c")
    assert (info.value.operation, info.value.stage) == ("add", "embedding")
    assert isinstance(info.value.__cause__, TimeoutError)
    embeddings.fail = None
    assert store.count() == 0


async def test_an_embedder_raising_on_aadd_is_a_typed_error(
    store: KnowledgeStore, embeddings: CountingEmbeddings
) -> None:
    embeddings.fail = ConnectionResetError("reset by peer")
    with pytest.raises(KnowledgeStoreError, match="reset by peer"):
        await store.aadd("q?", "c")
    embeddings.fail = None
    assert store.count() == 0


# ---------------------------------------------------------------------- reading by id


@pytest.mark.parametrize(
    ("entry_id", "error"),
    [(None, InvalidTypeError), (42, InvalidTypeError), (["kq-1"], InvalidTypeError),
     ("", InvalidArgumentError), ("  ", InvalidArgumentError)],
)
def test_bad_ids_are_typed(store: KnowledgeStore, entry_id: Any, error: type[Exception]) -> None:
    store.add("q?", "c")
    with pytest.raises(error, match="entry_id"):
        store.get(entry_id)
    with pytest.raises(error, match="entry_id"):
        store.delete(entry_id)
    assert store.count() == 1


def test_unknown_id_is_none_not_an_error(store: KnowledgeStore) -> None:
    assert store.get("kq-does-not-exist") is None
    assert store.delete("kq-does-not-exist") is False


# ---------------------------------------------------------------------- searching


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "5", None])
def test_bad_k_is_typed_before_embedding(
    store: KnowledgeStore, embeddings: CountingEmbeddings, k: Any
) -> None:
    store.add("q?", "c")
    calls = embeddings.calls
    with pytest.raises(InvalidArgumentError, match="k must"):
        store.search("q?", k=k)
    assert embeddings.calls == calls


def test_numpy_integer_k_is_a_positive_integer(store: KnowledgeStore) -> None:
    """Before: ``k=np.int64(2)`` (e.g. from a config array) was refused as not an integer."""
    store.add_many([("a?", "1"), ("b?", "2"), ("c?", "3")])
    assert len(store.search("a?", k=np.int64(2))) == 2


def test_k_larger_than_the_store(store: KnowledgeStore) -> None:
    store.add("q?", "c")
    assert len(store.search("q?", k=10_000)) == 1


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.5, float("nan"), "0.5", True])
def test_bad_quantile_is_typed(store: KnowledgeStore, quantile: Any) -> None:
    store.add_many([("a?", "1"), ("b?", "2")])
    with pytest.raises(InvalidArgumentError, match="quantile"):
        store.self_similarity_tau(quantile)


# ---------------------------------------------------------------------- thresholds and knobs


def _model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content="YES")] * 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": float("nan")}, "tau"),  # was accepted; every probe then failed after searching
        ({"tau": float("inf")}, "tau"),
        ({"tau": 70}, "tau"),  # a percentage: knowledge would never be shown
        ({"tau": -1.5}, "tau"),  # every hit would be "strong"
        ({"tau": "0.7"}, "tau"),
        ({"tau": True}, "tau"),
        ({"k": 0}, "k must"),
        ({"k": 2.5}, "k must"),
        ({"k": "5"}, "k must"),  # pydantic coerced it to 5
        ({"version": "gsa-v9"}, "unknown GSA version"),
        ({"message_template": "no slot"}, "placeholder"),
        ({"tua": 0.5}, "tua"),  # a misspelt field was silently ignored
        ({"threshold": 0.5}, "threshold"),
    ],
)
def test_probe_knobs_are_typed_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RoutingConfigError, match=match) as info:
        SelfAssessmentProbe(model=_model(), **kwargs)
    assert isinstance(info.value, ValueError)


def test_probe_tau_range_edges_are_accepted() -> None:
    for tau in (-1.0, 0.0, 1.0, 0.7):
        assert SelfAssessmentProbe(model=_model(), tau=tau).tau == tau


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tau": 1.01}, InvalidArgumentError),
        ({"tau": -1.01}, InvalidArgumentError),
        ({"tau": float("nan")}, InvalidArgumentError),
        ({"max_hits": 0}, InvalidArgumentError),
        ({"version": "x"}, InvalidArgumentError),
        ({"query": "  "}, InvalidArgumentError),
        ({"query": None}, InvalidTypeError),
    ],
)
def test_build_gsa_prompt_errors_are_library_errors(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """Before: plain ValueError/TypeError, not catchable as ConfidenceRouterError."""
    with pytest.raises(error):
        build_gsa_prompt(**{"query": "q?", **kwargs})


class _SameVector(Embeddings):
    """Every question gets the same vector (paraphrases the embedder cannot tell apart)."""

    def __init__(self, vector: list[float]) -> None:
        self.vector = vector

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [list(self.vector) for _ in texts]

    def embed_query(self, text: str) -> list[float]:
        return list(self.vector)


@pytest.mark.parametrize(
    "vector", [[1.1, 0.9, 0.6], [0.2, 0.4, 1.1], [1.0, 1.0, 1.0], [0.3, 0.7, 0.5]]
)
def test_self_similarity_tau_admits_the_stored_questions_themselves(
    tmp_path: Path, vector: list[float]
) -> None:
    """Before, for [1.1, 0.9, 0.6]: τ = 1.0000000000000002 (float64 noise, above any cosine)
    and the stored question searched again scored 1 - float32 distance = 1.0 < τ, so the
    calibrated store never showed its own knowledge."""
    store = KnowledgeStore(_SameVector(vector), path=tmp_path / "kb")
    store.add_many([("a?", "1"), ("b?", "2")])
    tau = store.self_similarity_tau()
    assert -1.0 <= tau <= 1.0
    [best, _] = store.search("a?")
    assert best.score is not None and best.score >= tau
    assert build_gsa_prompt("a?", [best], tau=tau).had_retrieval
    assert SelfAssessmentProbe(model=_model(), store=store, tau=tau).tau == tau


@pytest.mark.parametrize(
    ("name", "error"),
    [("ab", InvalidArgumentError), ("-bad-", InvalidArgumentError),
     ("has space", InvalidArgumentError), ("x" * 513, InvalidArgumentError),
     (None, InvalidTypeError)],
)
def test_bad_collection_names_are_typed_before_touching_disk(
    tmp_path: Path, name: Any, error: type[Exception]
) -> None:
    """Before: Chroma's own chromadb.errors.InvalidArgumentError (not a library error), after
    the store's directory had been created."""
    with pytest.raises(error, match="collection"):
        KnowledgeStore(CountingEmbeddings(), path=tmp_path / "kb", collection=name)
    assert not (tmp_path / "kb").exists()
