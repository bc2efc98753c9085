from langchain_core.embeddings import Embeddings

from confidence_router.evaluation.embedding_cache import CachedEmbeddings


class _Counting(Embeddings):
    def __init__(self):
        self.seen: list[str] = []

    def embed_documents(self, texts):
        self.seen += texts
        return [[float(len(t)), float(t.count("a"))] for t in texts]

    def embed_query(self, text):
        return self.embed_documents([text])[0]


def test_only_misses_reach_the_embedder_and_survive_reopening(tmp_path):
    inner = _Counting()
    cache = CachedEmbeddings(inner, tmp_path / "c.sqlite", model="m1")
    assert cache.embed_documents(["aa", "b", "aa"]) == [[2.0, 2.0], [1.0, 0.0], [2.0, 2.0]]
    assert inner.seen == ["aa", "b"]  # duplicates embedded once
    assert cache.embed_query("b") == [1.0, 0.0]
    assert inner.seen == ["aa", "b"]
    reopened = CachedEmbeddings(inner, tmp_path / "c.sqlite", model="m1")
    assert reopened.embed_documents(["b", "ccc"]) == [[1.0, 0.0], [3.0, 0.0]]
    assert inner.seen == ["aa", "b", "ccc"]
    other_model = CachedEmbeddings(inner, tmp_path / "c.sqlite", model="m2")
    other_model.embed_documents(["aa"])
    assert inner.seen[-1] == "aa"  # another model never reuses m1's vectors


# ---- attack round ---------------------------------------------------------------------------------


class _Short(Embeddings):
    """An embedder that drops the last text (a misbehaving server)."""

    def embed_documents(self, texts):
        return [[1.0, 2.0] for _ in texts[:-1]]

    def embed_query(self, text):
        return [1.0, 2.0]


def test_a_corrupted_cache_file_names_itself(tmp_path):
    import pytest

    from confidence_router.calibration import EvalDatabaseError

    path = tmp_path / "runs.sqlite.embeddings"
    path.write_bytes(b"garbage" * 100)
    # Found: sqlite3.DatabaseError "file is not a database", without the file's name.
    with pytest.raises(EvalDatabaseError, match=r"runs\.sqlite\.embeddings.*delete it"):
        CachedEmbeddings(_Counting(), path, model="m")


def test_an_embedder_returning_too_few_vectors_is_a_clear_error(tmp_path):
    import pytest

    from confidence_router.errors import InvalidArgumentError

    cache = CachedEmbeddings(_Short(), tmp_path / "c.sqlite", model="m")
    # Found: KeyError on the text that got no vector.
    with pytest.raises(InvalidArgumentError, match="1 vectors for 2 texts"):
        cache.embed_documents(["a", "b"])
