"""A persistent cache in front of any LangChain ``Embeddings``.

The supervised baseline embeds every question of every run; with a slow embedder (the embedded
model: ~0.4 s per question on 2 cores) regenerating a report would repeat minutes of work.
Vectors are stored in a SQLite file keyed by (model, text); only misses reach the embedder.

>>> from langchain_core.embeddings import FakeEmbeddings
>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "cache.sqlite")
>>> cached = CachedEmbeddings(FakeEmbeddings(size=3), path, model="fake")
>>> cached.embed_documents(["a"]) == cached.embed_documents(["a"])
True
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from langchain_core.embeddings import Embeddings

from confidence_router.calibration import EvalDatabaseError
from confidence_router.errors import InvalidArgumentError


class CachedEmbeddings(Embeddings):
    """``embeddings`` with a SQLite cache at ``path`` (created if missing).

    Args:
        embeddings: the embedder to call on cache misses.
        path: the cache file; keep it out of version control (vectors are large).
        model: the model name, part of the key (a different model never hits old vectors).
    """

    def __init__(self, embeddings: Embeddings, path: str | os.PathLike[str], *, model: str) -> None:
        if not model:
            raise InvalidArgumentError(
                "model must name the embedding model (it is part of the cache key)"
            )
        self.embeddings = embeddings
        self.model = model
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(os.fspath(path), timeout=30.0, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector TEXT NOT NULL)"
            )
            self._conn.commit()
        except sqlite3.Error as error:
            raise EvalDatabaseError(
                f"{os.fspath(path)}: not a usable embedding cache ({error}); it only holds "
                "vectors that can be computed again: delete it to rebuild",
                path=Path(path),
            ) from None

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model}\0{text}".encode()).hexdigest()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        keys = [self._key(t) for t in texts]
        with self._lock:
            found = dict(self._lookup(keys))
        missing = sorted({i for i, k in enumerate(keys) if k not in found}, key=keys.__getitem__)
        if missing:
            unique = list(dict.fromkeys(texts[i] for i in missing))
            vectors = self.embeddings.embed_documents(unique)
            if len(vectors) != len(unique):
                raise InvalidArgumentError(
                    f"the embeddings returned {len(vectors)} vectors for {len(unique)} texts"
                )
            with self._lock:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                    [(self._key(t), json.dumps(v)) for t, v in zip(unique, vectors)],
                )
                self._conn.commit()
                found.update(self._lookup([self._key(t) for t in unique]))
        return [found[k] for k in keys]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    def _lookup(self, keys: Sequence[str]) -> list[tuple[str, list[float]]]:
        rows: list[tuple[str, list[float]]] = []
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += [
                (key, json.loads(vector))
                for key, vector in self._conn.execute(
                    f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk
                )
            ]
        return rows
