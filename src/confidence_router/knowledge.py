"""The knowledge store: cloud escalations become knowledge (docs/how-it-works.md §2.3).

:class:`KnowledgeStore` keeps ``(question, content)`` entries in a Chroma collection. The
retrieval key is the embedding of the **question** (question-to-question retrieval); the
content (in the paper: the cloud model's verbatim answer) is stored but never searched.

Embeddings are computed here with a LangChain :class:`~langchain_core.embeddings.Embeddings`
and passed to Chroma as explicit vectors. The collection is opened with
``embedding_function=None``, so Chroma's default embedding function (which downloads an ONNX
model on first use) is never involved.

Usage::

    from langchain_ollama import OllamaEmbeddings
    from confidence_router.knowledge import KnowledgeStore

    store = KnowledgeStore(OllamaEmbeddings(model="qllama/bge-large-en-v1.5"))
    store.add("What is the capital of France?", "Paris.", source="cloud_escalation",
              provenance={"model": "claude-sonnet-4-5", "run_id": "r1"})
    hits = store.search("capital of France?", k=5)   # list[confidence_router.gsa.Hit]
    hits[0].score                                    # raw cosine similarity, not clamped

Storage location (when no ``client`` is given): ``path``, else the environment variable
``CONFIDENCE_ROUTER_KNOWLEDGE_PATH``, else ``$XDG_CACHE_HOME/confidence-router/knowledge``
(``~/.cache/confidence-router/knowledge`` when ``XDG_CACHE_HOME`` is unset). A remote store
works by passing any Chroma client, e.g. ``client=chromadb.HttpClient(host=..., port=...)``.

Design notes:

* ``chromadb`` is imported lazily (in the constructor), so ``import confidence_router.knowledge``
  stays cheap (``chromadb`` takes ~1 s to import).
* The collection uses cosine space; a hit's ``score`` is ``1 - cosine distance``, the raw
  cosine similarity. No similarity floor is applied here: every consumer applies its own
  threshold (GSA τ = 0.70, KS none); a store-level floor once silently pre-filtered an
  experiment's own threshold.
* Chroma's HNSW index is approximate; for knowledge bases of the paper's size (≤ ~1,000
  entries, ``ef_search`` 100) it returns the exact top-k in practice, but it is not the
  paper's exact scan.
* Entries are deduplicated by question: the id is derived from the normalised question
  (strip, casefold, collapse whitespace), so re-adding a question updates the entry.
* The embedding dimension is recorded in the collection metadata and checked before Chroma
  sees a vector, so mixing embedders fails with :class:`EmbeddingDimensionError`.
* Not implemented from the paper's store: validity intervals (``valid_from``/``valid_to``)
  and the per-entry ``confidence``; delete an entry to retire it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confidence_router._extras import require_extra
from confidence_router.errors import InvalidArgumentError, InvalidTypeError
from confidence_router.gsa import Hit

if TYPE_CHECKING:  # pragma: no cover - typing only
    from langchain_core.embeddings import Embeddings

__all__ = [
    "DEFAULT_COLLECTION",
    "KNOWLEDGE_PATH_ENV",
    "EmbeddingDimensionError",
    "KnowledgeEntry",
    "KnowledgeStore",
    "default_knowledge_path",
    "entry_id_for_question",
    "normalize_question",
]

DEFAULT_COLLECTION = "confidence_router_knowledge"
KNOWLEDGE_PATH_ENV = "CONFIDENCE_ROUTER_KNOWLEDGE_PATH"

# Keys we own in Chroma metadata. Chroma metadata values must be scalars, so provenance is
# stored as a JSON string and timestamps as ISO-8601 strings.
_DIM_KEY = "confidence_router_embedding_dim"
_M_QUESTION = "question"
_M_SOURCE = "source"
_M_CREATED = "created_at"
_M_UPDATED = "updated_at"
_M_PROVENANCE = "provenance_json"
_ID_PREFIX = "kq-"


class EmbeddingDimensionError(InvalidArgumentError):
    """An embedding's dimension differs from the dimension already stored in the collection.

    Usually the embedder changed (e.g. bge-large 1024-d vs nomic-embed-text 768-d). Use a
    separate ``collection`` or ``path`` per embedder: similarities (and the GSA threshold τ)
    are embedder-specific anyway.
    """

    def __init__(self, expected: int, got: int, collection: str) -> None:
        super().__init__(
            f"embedding dimension mismatch in knowledge collection {collection!r}: the "
            f"collection stores {expected}-dimensional vectors but the embedder returned a "
            f"{got}-dimensional vector; use a separate collection or path per embedder"
        )
        self.expected = expected
        self.got = got
        self.collection = collection


@dataclass(frozen=True)
class KnowledgeEntry:
    """One stored piece of knowledge.

    Attributes:
        id: Deterministic id derived from the normalised question (see
            :func:`entry_id_for_question`).
        question: The question, as last added (the retrieval key).
        content: The knowledge itself, e.g. the cloud model's answer to ``question``.
        source: ``"manual"``, ``"cloud_escalation"`` or any other non-empty label.
        created_at: When the question was first added (UTC).
        updated_at: When the entry was last written (UTC).
        provenance: Free-form JSON-serialisable data, e.g. ``{"model": ..., "run_id": ...}``
            (stored as JSON; excluded from ``==`` and ``hash`` so entries stay hashable).
    """

    id: str
    question: str
    content: str
    source: str
    created_at: datetime
    updated_at: datetime
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def normalize_question(question: str) -> str:
    """Normalise a question for deduplication: strip, casefold, collapse whitespace."""
    return " ".join(question.casefold().split())


def entry_id_for_question(question: str) -> str:
    """The deterministic entry id for ``question`` (same id for equal normalised questions)."""
    digest = hashlib.sha256(normalize_question(question).encode("utf-8")).hexdigest()
    return _ID_PREFIX + digest[:32]


def default_knowledge_path() -> Path:
    """Where the store persists when neither ``path`` nor ``client`` is given.

    ``$CONFIDENCE_ROUTER_KNOWLEDGE_PATH`` if set, else
    ``$XDG_CACHE_HOME/confidence-router/knowledge`` (``~/.cache/...`` by default).
    """
    env = os.environ.get(KNOWLEDGE_PATH_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "confidence-router" / "knowledge"


def _require_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(f"{name} must be a non-empty, non-whitespace string")
    return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _check_vector(vector: Sequence[float], what: str) -> list[float]:
    """Validate one embedding: finite numbers, non-zero norm (cosine is undefined for 0)."""
    try:
        values = [float(x) for x in vector]
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{what}: embedding is not a sequence of numbers") from exc
    if not values:
        raise InvalidArgumentError(f"{what}: embedding is empty")
    if not all(math.isfinite(x) for x in values):
        raise InvalidArgumentError(f"{what}: embedding contains NaN or infinite values")
    if not any(values):
        raise InvalidArgumentError(f"{what}: embedding has zero norm; cosine similarity is undefined")
    return values


class KnowledgeStore:
    """Question-keyed knowledge over a Chroma collection in cosine space.

    Args:
        embeddings: The LangChain embedder. Must be the same embedder for adding and
            searching (and for the lifetime of a collection); τ is calibrated per embedder.
        path: Directory of a local persistent store. See the module docstring for defaults.
        client: An existing Chroma client (``PersistentClient``, ``HttpClient``, ...) instead
            of ``path``. Mutually exclusive with ``path``.
        collection: Collection name (3–512 chars of ``[a-zA-Z0-9._-]``).

    Raises:
        ValueError: ``path`` and ``client`` both given, or an existing collection of that name
            is not in cosine space.
        MissingExtraError: no ``client`` given and chromadb is not installed (the ``gsa``
            extra: ``pip install "confidence-router[gsa]"``).

    Example::

        store = KnowledgeStore(embeddings, path="/tmp/kb")
        entry = store.add("Who wrote Hamlet?", "William Shakespeare.")
        store.add("who wrote  HAMLET? ", "Shakespeare.")   # same id: updated, not added
        assert store.count() == 1
    """

    def __init__(
        self,
        embeddings: Embeddings,
        *,
        path: str | os.PathLike[str] | None = None,
        client: Any = None,
        collection: str = DEFAULT_COLLECTION,
    ) -> None:
        if path is not None and client is not None:
            raise InvalidArgumentError("pass either path or client, not both")
        self._embeddings = embeddings
        self._collection_name = collection
        #: The local storage directory, or ``None`` when a ``client`` was supplied.
        self.path: Path | None = None
        if client is None:
            require_extra("gsa", "KnowledgeStore (the GSA v3 knowledge store)")
            # Imported here, not at module level: chromadb costs ~1 s to import.
            import chromadb
            from chromadb.config import Settings

            local = Path(path).expanduser() if path is not None else default_knowledge_path()
            local.mkdir(parents=True, exist_ok=True)
            self.path = local
            # Telemetry off: the library must work offline and must not phone home.
            client = chromadb.PersistentClient(
                path=str(local), settings=Settings(anonymized_telemetry=False)
            )
        self._client = client
        # embedding_function=None: we always pass vectors, and Chroma's default EF would try to
        # download a model. Cosine space: similarity = 1 - distance (Chroma's default l2 space
        # is squared L2).
        self._collection = client.get_or_create_collection(
            name=collection,
            configuration={"hnsw": {"space": "cosine"}},
            embedding_function=None,
        )
        space = self._space()
        if space is not None and space != "cosine":
            raise InvalidArgumentError(
                f"knowledge collection {collection!r} exists with distance space {space!r}; "
                "it must be 'cosine' (the space cannot be changed after creation)"
            )
        self._dim: int | None = None

    # ---------------------------------------------------------------- introspection

    @property
    def collection_name(self) -> str:
        """The Chroma collection name."""
        return self._collection_name

    @property
    def embeddings(self) -> Embeddings:
        """The LangChain embedder used for questions and queries."""
        return self._embeddings

    def _space(self) -> str | None:
        # configuration_json is the raw stored dict; the parsed `.configuration` property
        # emits a DeprecationWarning for collections without a Chroma embedding function.
        config = getattr(self._collection, "configuration_json", None) or {}
        for index in ("hnsw", "spann"):
            sub = config.get(index) if isinstance(config, Mapping) else None
            if isinstance(sub, Mapping) and sub.get("space"):
                return str(sub["space"])
        metadata = self._collection.metadata or {}
        legacy = metadata.get("hnsw:space")
        return str(legacy) if legacy else None

    @property
    def dimension(self) -> int | None:
        """The embedding dimension of the stored vectors, or ``None`` while empty."""
        if self._dim is None:
            metadata = self._collection.metadata or {}
            recorded = metadata.get(_DIM_KEY)
            if isinstance(recorded, int) and not isinstance(recorded, bool):
                self._dim = recorded
            elif self._collection.count() > 0:
                # A collection written by something else: read the dimension off a vector.
                peek = self._collection.get(limit=1, include=["embeddings"])
                vectors = peek.get("embeddings")
                if vectors is not None and len(vectors) > 0:
                    self._dim = len(vectors[0])
        return self._dim

    def _check_dimension(self, got: int) -> None:
        expected = self.dimension
        if expected is not None and expected != got:
            raise EmbeddingDimensionError(expected, got, self._collection_name)

    def _record_dimension(self, dim: int) -> None:
        """Persist the dimension in the collection metadata (once), so reopening is cheap."""
        self._dim = dim
        metadata = dict(self._collection.metadata or {})
        if metadata.get(_DIM_KEY) == dim:
            return
        metadata[_DIM_KEY] = dim
        # modify() replaces the whole metadata dict, hence the merge above. Chroma refuses to
        # "change" legacy hnsw:* keys on modify, so never resend them.
        metadata = {k: v for k, v in metadata.items() if not k.startswith("hnsw:")}
        self._collection.modify(metadata=metadata)

    def count(self) -> int:
        """Number of stored entries."""
        return int(self._collection.count())

    def __len__(self) -> int:
        return self.count()

    # ---------------------------------------------------------------- writing

    def _prepare(
        self,
        question: Any,
        content: Any,
        source: Any,
        provenance: Mapping[str, Any] | None,
    ) -> tuple[str, str, str, str, str]:
        """Validate one entry; return (id, question, content, source, provenance_json)."""
        # The question is the key: surrounding whitespace is noise for embedding and display.
        # The content is stored verbatim (the paper injects the cloud answer as given).
        question = _require_text(question, "question").strip()
        content = _require_text(content, "content")
        source = _require_text(source, "source")
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, Mapping):
            raise InvalidTypeError(f"provenance must be a mapping, got {type(provenance).__name__}")
        try:
            provenance_json = json.dumps(dict(provenance), sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"provenance is not JSON-serialisable: {exc}") from exc
        return entry_id_for_question(question), question, content, source, provenance_json

    def add(
        self,
        question: str,
        content: str,
        *,
        source: str = "manual",
        provenance: Mapping[str, Any] | None = None,
    ) -> KnowledgeEntry:
        """Add or update the entry for ``question``.

        The retrieval key is the embedding of ``question`` (not of ``content``). A question
        whose normalised form (strip, casefold, collapsed whitespace) is already stored updates
        that entry: question text, content, source, provenance and ``updated_at`` are replaced,
        ``created_at`` is kept.

        Raises:
            ValueError: empty/whitespace ``question``, ``content`` or ``source`` (the message
                names the field), or provenance that is not JSON-serialisable.
            EmbeddingDimensionError: the embedder's dimension differs from the stored one.
        """
        return self.add_many([(question, content)], source=source, provenance=provenance)[0]

    def add_many(
        self,
        items: Iterable[tuple[str, str]],
        *,
        source: str = "manual",
        provenance: Mapping[str, Any] | None = None,
    ) -> list[KnowledgeEntry]:
        """Add or update several ``(question, content)`` pairs with one embedding batch.

        All items are validated and embedded before anything is written. Within one call a
        later duplicate question wins. Returns one entry per input item, in input order
        (duplicates return the final entry).
        """
        prepared = [self._prepare(q, c, source, provenance) for q, c in items]
        if not prepared:
            return []
        vectors = self._embeddings.embed_documents([p[1] for p in prepared])
        return self._write(prepared, vectors)

    async def aadd(
        self,
        question: str,
        content: str,
        *,
        source: str = "manual",
        provenance: Mapping[str, Any] | None = None,
    ) -> KnowledgeEntry:
        """Async :meth:`add`: embeds with ``aembed_documents``, writes in a worker thread."""
        return (await self.aadd_many([(question, content)], source=source, provenance=provenance))[
            0
        ]

    async def aadd_many(
        self,
        items: Iterable[tuple[str, str]],
        *,
        source: str = "manual",
        provenance: Mapping[str, Any] | None = None,
    ) -> list[KnowledgeEntry]:
        """Async :meth:`add_many`."""
        prepared = [self._prepare(q, c, source, provenance) for q, c in items]
        if not prepared:
            return []
        vectors = await self._embeddings.aembed_documents([p[1] for p in prepared])
        # Chroma's client is synchronous; keep the event loop free while it writes.
        return await asyncio.to_thread(self._write, prepared, vectors)

    def _write(
        self,
        prepared: list[tuple[str, str, str, str, str]],
        vectors: Sequence[Sequence[float]],
    ) -> list[KnowledgeEntry]:
        if len(vectors) != len(prepared):
            raise InvalidArgumentError(
                f"embedder returned {len(vectors)} vectors for {len(prepared)} questions"
            )
        checked = [_check_vector(v, f"question {p[1]!r}") for p, v in zip(prepared, vectors)]
        dims = {len(v) for v in checked}
        if len(dims) > 1:
            raise InvalidArgumentError(f"embedder returned vectors of mixed dimensions {sorted(dims)}")
        dim = dims.pop()
        self._check_dimension(dim)

        # Last occurrence of an id wins (Chroma rejects duplicate ids in one call).
        latest: dict[str, int] = {}
        for index, item in enumerate(prepared):
            latest[item[0]] = index
        ids = list(latest)
        existing = self._collection.get(ids=ids, include=["metadatas"])
        created: dict[str, str] = {}
        for entry_id, metadata in zip(existing["ids"], existing.get("metadatas") or []):
            if metadata and isinstance(metadata.get(_M_CREATED), str):
                created[entry_id] = metadata[_M_CREATED]

        now = _utcnow().isoformat()
        metadatas: list[dict[str, Any]] = []
        documents: list[str] = []
        embeddings: list[list[float]] = []
        entries: dict[str, KnowledgeEntry] = {}
        for entry_id in ids:
            _, question, content, source, provenance_json = prepared[latest[entry_id]]
            metadata = {
                _M_QUESTION: question,
                _M_SOURCE: source,
                _M_CREATED: created.get(entry_id, now),
                _M_UPDATED: now,
                _M_PROVENANCE: provenance_json,
            }
            metadatas.append(metadata)
            documents.append(content)
            embeddings.append(checked[latest[entry_id]])
            entries[entry_id] = self._entry(entry_id, content, metadata)

        self._collection.upsert(
            ids=ids, embeddings=embeddings, documents=documents, metadatas=metadatas
        )
        self._record_dimension(dim)
        return [entries[item[0]] for item in prepared]

    def delete(self, entry_id: str) -> bool:
        """Delete an entry by id. Returns ``True`` if it existed."""
        if self.get(entry_id) is None:
            return False
        self._collection.delete(ids=[entry_id])
        return True

    # ---------------------------------------------------------------- reading

    @staticmethod
    def _entry(entry_id: str, content: str | None, metadata: Mapping[str, Any]) -> KnowledgeEntry:
        try:
            provenance = json.loads(metadata.get(_M_PROVENANCE) or "{}")
        except ValueError:
            provenance = {}
        created = metadata.get(_M_CREATED)
        updated = metadata.get(_M_UPDATED)
        created_at = datetime.fromisoformat(created) if isinstance(created, str) else None
        updated_at = datetime.fromisoformat(updated) if isinstance(updated, str) else None
        epoch = datetime.fromtimestamp(0, timezone.utc)
        return KnowledgeEntry(
            id=entry_id,
            question=str(metadata.get(_M_QUESTION, "")),
            content=content or "",
            source=str(metadata.get(_M_SOURCE, "")),
            created_at=created_at or updated_at or epoch,
            updated_at=updated_at or created_at or epoch,
            provenance=provenance if isinstance(provenance, dict) else {},
        )

    def get(self, entry_id: str) -> KnowledgeEntry | None:
        """The entry with this id, or ``None``."""
        result = self._collection.get(ids=[entry_id], include=["metadatas", "documents"])
        if not result["ids"]:
            return None
        documents = result.get("documents") or [None]
        metadatas = result.get("metadatas") or [{}]
        return self._entry(result["ids"][0], documents[0], metadatas[0] or {})

    def get_by_question(self, question: str) -> KnowledgeEntry | None:
        """The entry for ``question`` (normalised match, no embedding call), or ``None``."""
        return self.get(entry_id_for_question(_require_text(question, "question")))

    def self_similarity_tau(self, quantile: float = 0.975) -> float:
        """A strong-hit threshold calibrated for this store's embedder (docs/how-it-works.md §2.3).

        Cosine levels differ between embedders (bge-large runs ~0.15 below nomic-embed-text),
        so the paper's 0.70 only fits bge-large. This returns the ``quantile`` of each stored
        question's cosine to its nearest *other* stored question: with the default 0.975 only
        the closest ~2.5% of near-neighbour pairs count as "strong", about the share of strong
        hits the paper saw on TriviaQA with bge-large at 0.70.

        Raises:
            ValueError: fewer than 2 entries, or ``quantile`` outside (0, 1).
        """
        import numpy as np

        if not 0.0 < quantile < 1.0:
            raise InvalidArgumentError(f"quantile must be in (0, 1), got {quantile!r}")
        vectors = self._collection.get(include=["embeddings"])["embeddings"]
        if vectors is None or len(vectors) < 2:
            raise InvalidArgumentError("self_similarity_tau needs at least 2 stored entries")
        matrix = np.asarray(vectors, dtype=np.float64)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-10)
        cosine = matrix @ matrix.T
        np.fill_diagonal(cosine, -np.inf)
        return float(np.quantile(cosine.max(axis=1), quantile))

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` entries whose questions are most similar to ``query``.

        Returns :class:`~confidence_router.gsa.Hit` objects in retrieval order (descending
        similarity) with ``score = 1 - cosine distance`` (raw cosine similarity, not clamped,
        no floor), ``question``, ``content``, ``id`` and ``metadata`` (source, timestamps,
        provenance). An empty store returns ``[]`` without calling the embedder.

        Raises:
            ValueError: empty/whitespace ``query`` or ``k < 1``.
            EmbeddingDimensionError: the query embedding's dimension differs from the store's.
        """
        query = _require_text(query, "query").strip()
        self._check_k(k)
        if self.count() == 0:
            return []
        return self._query_vector(self._embeddings.embed_query(query), k)

    async def asearch(self, query: str, k: int = 5) -> list[Hit]:
        """Async :meth:`search`: ``aembed_query``, then the Chroma query in a worker thread."""
        query = _require_text(query, "query").strip()
        self._check_k(k)
        if await asyncio.to_thread(self.count) == 0:
            return []
        vector = await self._embeddings.aembed_query(query)
        return await asyncio.to_thread(self._query_vector, vector, k)

    @staticmethod
    def _check_k(k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")

    def _query_vector(self, vector: Sequence[float], k: int) -> list[Hit]:
        checked = _check_vector(vector, "query")
        self._check_dimension(len(checked))
        n = min(k, self.count())
        if n == 0:
            return []
        result = self._collection.query(
            query_embeddings=[checked],
            n_results=n,
            include=["metadatas", "documents", "distances"],
        )
        ids = result["ids"][0]
        documents = (result.get("documents") or [[]])[0]
        metadatas = (result.get("metadatas") or [[]])[0]
        distances = (result.get("distances") or [[]])[0]
        hits: list[Hit] = []
        for i, entry_id in enumerate(ids):
            entry = self._entry(entry_id, documents[i], metadatas[i] or {})
            hits.append(
                Hit(
                    content=entry.content,
                    score=1.0 - float(distances[i]),
                    question=entry.question,
                    id=entry_id,
                    metadata={
                        "source": entry.source,
                        "created_at": entry.created_at.isoformat(),
                        "updated_at": entry.updated_at.isoformat(),
                        "provenance": dict(entry.provenance),
                    },
                )
            )
        # Chroma returns ascending distance already; sort defensively (stable) so the
        # "retrieval order = descending score" contract never depends on the backend.
        hits.sort(key=lambda h: h.score or 0.0, reverse=True)  # stable, also with reverse
        return hits
