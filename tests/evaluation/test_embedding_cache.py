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
