"""Knowledge-store search latency at 1k and 10k entries (real Chroma, on disk), in one run.

Embeddings are the deterministic hashing embedding from the test bed (384-d, the size of
all-MiniLM-L6-v2), so the figure measures the store, not an embedding model; the printed
embed time per query shows what the embedder adds on top.

    python benchmarks/retrieval.py [--queries 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from langchain_core.embeddings import Embeddings

from confidence_router.knowledge import KnowledgeStore
from confidence_router.testing import hashing_embedding

DIM = 384
WORDS = ["capital", "river", "composer", "treaty", "element", "planet", "war", "city", "king", "queen", "novel", "painter", "mountain", "island", "language", "currency", "president", "battle", "symphony", "opera", "bridge"]


class HashingEmbeddings(Embeddings):
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [hashing_embedding(t, DIM) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return hashing_embedding(text, DIM)


def question(rng: random.Random, i: int) -> str:
    return f"Which {rng.choice(WORDS)} is linked to {rng.choice(WORDS)} number {i}?"


def measure(size: int, n_queries: int, root: str) -> tuple[float, float, float]:
    rng = random.Random(size)
    store = KnowledgeStore(HashingEmbeddings(), path=f"{root}/kb{size}")
    items = [(question(rng, i), f"answer {i}") for i in range(size)]
    for start in range(0, size, 1000):
        store.add_many(items[start:start + 1000])
    assert store.count() == size
    queries = [question(rng, rng.randrange(size)) for _ in range(n_queries)]
    for q in queries[:10]:  # warm up the index
        store.search(q)
    search_s = []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(q, k=5)
        search_s.append(time.perf_counter() - t)
        assert len(hits) == 5
    embed_s = []
    for q in queries:
        t = time.perf_counter()
        hashing_embedding(q, DIM)
        embed_s.append(time.perf_counter() - t)
    ordered = sorted(search_s)
    return (statistics.median(search_s), ordered[int(0.95 * len(ordered)) - 1],
            statistics.median(embed_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {size: measure(size, args.queries, root) for size in (1_000, 10_000)}
    for size, (p50, p95, embed) in results.items():
        print(f"{size:>6} entries: search (top-5) median {p50 * 1e3:6.2f} ms, p95 {p95 * 1e3:6.2f} ms"
              f"  (+ hashing embed {embed * 1e3:.2f} ms)")
    print(f"ratio 10k/1k median: {results[10_000][0] / results[1_000][0]:.2f}x")


if __name__ == "__main__":
    main()
