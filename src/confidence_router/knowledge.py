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
* The collection uses cosine space; a hit's ``score`` is the raw cosine similarity of the
  query to the stored question, computed in float64 from the two vectors (Chroma's own
  ``1 - distance`` is float32 and misses an inclusive threshold by ~6e-8). No similarity floor is applied here: every consumer applies its own
  threshold (GSA τ = 0.70, KS none); a store-level floor once silently pre-filtered an
  experiment's own threshold.
* Chroma's HNSW index is approximate; for knowledge bases of the paper's size (≤ ~1,000
  entries, ``ef_search`` 100) it returns the exact top-k in practice, but it is not the
  paper's exact scan.
* Entries are deduplicated by question: the id is derived from the normalised question
  (strip, casefold, collapse whitespace), so re-adding a question updates the entry.
* The embedding dimension is recorded in the collection metadata and checked before Chroma
  sees a vector, so mixing embedders fails with :class:`EmbeddingDimensionError`.
* Chroma operations run in a few reused daemon threads per store (at most
  ``MAX_OVERDUE_OPERATIONS + 4``; idle ones exit after a minute, on :meth:`KnowledgeStore.close`
  or when the store is garbage-collected), so that one past ``timeout`` can be abandoned:
  Chroma's HTTP client cannot be cancelled.
* Not implemented from the paper's store: validity intervals (``valid_from``/``valid_to``)
  and the per-entry ``confidence``; delete an entry to retire it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import math
import numbers
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from confidence_router._extras import require_extra
from confidence_router._loop_cache import per_loop_copy
from confidence_router.errors import (
    ConfidenceRouterError,
    InvalidArgumentError,
    InvalidTypeError,
    TierTimeoutError,
)
from confidence_router.gsa import Hit

if TYPE_CHECKING:  # pragma: no cover - typing only
    from langchain_core.embeddings import Embeddings
    from typing_extensions import Self

__all__ = [
    "DEFAULT_CHROMA_TIMEOUT",
    "DEFAULT_COLLECTION",
    "KNOWLEDGE_PATH_ENV",
    "MAX_OVERDUE_OPERATIONS",
    "EmbeddingDimensionError",
    "KnowledgeEntry",
    "KnowledgeStore",
    "KnowledgeStoreError",
    "default_knowledge_path",
    "entry_id_for_question",
    "normalize_question",
]

DEFAULT_COLLECTION = "confidence_router_knowledge"

#: Seconds a Chroma operation may take before the store gives up on it (see ``timeout``).
DEFAULT_CHROMA_TIMEOUT = 10.0

#: Chroma operations still running past their timeout before the store stops sending more: a
#: hung server then costs callers an immediate error, not another ``timeout`` and thread each.
MAX_OVERDUE_OPERATIONS = 4
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
_COLLECTION_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]")


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


class KnowledgeStoreError(ConfidenceRouterError, RuntimeError):
    """The knowledge store could not be read or written: the embedder or Chroma failed.

    Raised instead of whatever the embedder's client or Chroma raised (the original is the
    ``__cause__``): an unreachable embedding server, a Chroma server that went away, a
    collection deleted by another process, a closed client. Nothing is half-done: a failed
    search returns no hits (the probe builds no prompt), a failed add writes nothing or the
    whole batch (one Chroma upsert).

    Attributes:
        operation: what the store was doing (``"search"``, ``"add"``, ``"count"``, ...).
        stage: ``"embedding"`` (the LangChain embedder) or ``"chroma"`` (the collection).
        collection: the collection name.
    """

    def __init__(
        self, operation: str, stage: Literal["embedding", "chroma"], collection: str,
        error: BaseException,
    ) -> None:
        what = "the embedder" if stage == "embedding" else "Chroma"
        super().__init__(
            f"knowledge store {operation} failed in {what} (collection {collection!r}): "
            f"{type(error).__name__}: {error}"
        )
        self.operation = operation
        self.stage = stage
        self.collection = collection


_R = TypeVar("_R")


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
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate (a badly decoded file) fails later inside the embedder's HTTP
        # client or Chroma; name it here, before anything is embedded or written.
        raise InvalidArgumentError(
            f"{name} cannot be encoded as UTF-8 ({exc.reason} at position {exc.start})"
        ) from exc
    return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp(value: Any) -> datetime | None:
    """An ISO-8601 metadata timestamp, or ``None`` (absent, or written by something else)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _pairs(items: Any) -> Iterator[tuple[Any, Any]]:
    """The ``(question, content)`` items of an ``add_many`` call, each checked for shape.

    A bare string is iterable too, and a 2-character one would unpack as (question, content).
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise InvalidTypeError(
            f"items must be an iterable of (question, content) pairs, got {type(items).__name__}"
        )
    for index, item in enumerate(items):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise InvalidTypeError(
                f"items[{index}] must be a (question, content) pair, got {item!r:.80}"
            )
        yield item[0], item[1]


_LOOP_ATTRIBUTE = "_confidence_router_embeddings"


def _loop_embeddings(embeddings: Any) -> Any:
    """``embeddings`` with an async HTTP client usable on the running event loop.

    ``OllamaEmbeddings`` keeps one httpx ``AsyncClient``, whose connections are bound to the
    loop that opened them: after that loop closed (a second ``asyncio.run()``), every async
    search failed with "Event loop is closed". It gets a copy per loop, built once and kept
    on the loop object (so it goes away with the loop). The entry refers to the embedder
    weakly: once the embedder is gone (a store made per request on a server's long-lived
    loop), so is its copy, with its HTTP clients. Other embedders are used as given.
    """
    if type(embeddings).__name__ != "OllamaEmbeddings" or not hasattr(embeddings, "model_validate"):
        return embeddings
    return per_loop_copy(embeddings, _LOOP_ATTRIBUTE, _rebuilt)


def _rebuilt(embeddings: Any) -> Any:
    # model_validate runs the validator that creates the HTTP clients (model_copy would share
    # the old ones).
    values = {name: getattr(embeddings, name) for name in embeddings.model_fields_set}
    return type(embeddings).model_validate(values)


def _order_key(hit: Hit) -> float:
    score = hit.score
    return -math.inf if score is None or math.isnan(score) else float(score)


#: Scores and calibrated τ are rounded to this many decimals: far below any embedder's
#: precision, far above float64 rounding noise, so equal cosines on paper compare equal.
_SCORE_DECIMALS = 12


def _cosine(query: Sequence[float], stored: Sequence[float]) -> float:
    """Cosine similarity in float64, from the query vector and the stored vector, rounded
    to :data:`_SCORE_DECIMALS`.

    Chroma's own distance is computed in float32, so a pair whose cosine is exactly τ came
    back as ``1 - distance = τ - 6e-8`` and missed the inclusive threshold; and a stored
    question asked again scored 0.99999994, below the τ that ``self_similarity_tau``
    calibrated from its own duplicates (1.0000000000000002).
    """
    import numpy as np

    q = np.asarray(query, dtype=np.float64)
    v = np.asarray(stored, dtype=np.float64)
    norm = float(np.linalg.norm(q)) * float(np.linalg.norm(v))
    if v.shape != q.shape or not norm or not math.isfinite(norm):
        return float("nan")  # a stored vector we cannot compare with: never a strong hit
    return round(float(np.dot(q, v) / norm), _SCORE_DECIMALS)


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
    import numpy as np

    # Chroma stores float32 and normalises in float32: a norm that underflows (1e-30) or
    # overflows (1e30) there became a zero or NaN vector inside the index.
    with np.errstate(over="ignore", under="ignore"):
        single = np.asarray(values, dtype=np.float32)
        squared = float(np.dot(single, single))
    if not np.all(np.isfinite(single)) or squared == 0.0 or not math.isfinite(squared):
        raise InvalidArgumentError(
            f"{what}: embedding norm is outside float32 range (Chroma stores float32 vectors)"
        )
    return values


#: Worker threads a store may run beyond :data:`MAX_OVERDUE_OPERATIONS`: with that many
#: operations overdue (a hung server) the store still has these for new calls, which fail at
#: once anyway when the cap is reached. More concurrent callers than workers queue (their
#: ``timeout`` runs from the call, so a queued call times out like a slow one).
_SPARE_WORKERS = 4
#: Seconds an idle worker waits for another operation before it exits.
_WORKER_IDLE_SECONDS = 60.0
_WORKER_NAME = "confidence-router-chroma"


class _Task:
    """One Chroma call handed to a worker."""

    __slots__ = ("args", "call", "future", "given_up", "kwargs")

    def __init__(self, call: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.call, self.args, self.kwargs = call, args, kwargs
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.given_up = False  # the caller stopped waiting while it ran: counted overdue


class _Workers:
    """A few reused daemon threads that run one store's Chroma calls.

    Each call once had a thread of its own (so that a call past the store's timeout could be
    abandoned): a soak attributed ~1.9 MB of RSS growth per 1000 calls to that thread churn
    (thread stacks, allocator arenas), without bound in a long-running server, and each
    thread start costs time (30000 searches: 133 s before, 95 s with reused workers). Not ``ThreadPoolExecutor``: its threads are
    joined at interpreter exit (a hung Chroma would block exit) and never end when idle.

    One pool per store, not one per process: the overdue cap is per store, so a store's
    workers are bounded by it (``MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS``); a shared pool
    either needs no bound (a thread per concurrent call again) or lets one store's hung
    server hold the workers another store needs.

    Threads start on demand, exit after :data:`_WORKER_IDLE_SECONDS` idle or on
    :meth:`close`. Nothing here refers to the store, so a store nobody closed is still
    garbage-collected (its finaliser closes the pool).
    """

    def __init__(self) -> None:
        # An RLock: a store's finaliser (close) can run on a thread that holds it already,
        # when a garbage collection happens inside submit() or a worker's bookkeeping.
        self._lock = threading.Condition(threading.RLock())
        self._tasks: deque[_Task] = deque()  # submitted, not yet taken by a worker
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()
        self._idle = 0  # workers waiting for a task (woken or not)
        self._closing = False
        #: Operations whose caller gave up (past the timeout) still running in a worker.
        self.overdue = 0

    def submit(self, call: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> _Task:
        task = _Task(call, args, kwargs)
        with self._lock:
            # Used after close() (a with_embeddings copy of a closed store): work again.
            self._closing = False
            self._tasks.append(task)
            if self._idle >= len(self._tasks):
                self._lock.notify()  # a waiting worker takes it
            elif len(self._threads) < MAX_OVERDUE_OPERATIONS + _SPARE_WORKERS:
                thread = threading.Thread(target=self._work, name=_WORKER_NAME, daemon=True)
                self._threads.add(thread)
                try:
                    thread.start()
                except BaseException:  # e.g. "can't start new thread": the caller's error
                    self._threads.discard(thread)
                    self._tasks.remove(task)
                    raise
            # else all workers are busy: it waits in the queue for the first free one.
        return task

    def give_up(self, task: _Task) -> bool:
        """The caller stops waiting for ``task``; ``False`` if it has finished after all.

        A task no worker has taken is dropped (never sent to Chroma, so not overdue); one
        that runs is counted overdue until its worker sees it end.
        """
        with self._lock:
            if task.future.cancel():  # still queued (a worker takes tasks under the lock)
                self._tasks.remove(task)
                return True
            if task.future.done():
                return False
            task.given_up = True
            self.overdue += 1
            return True

    def _work(self) -> None:
        me = threading.current_thread()
        with self._lock:
            try:
                while True:
                    if not self._tasks:
                        if self._closing:
                            return
                        self._idle += 1
                        try:
                            woken = self._lock.wait(_WORKER_IDLE_SECONDS)
                        finally:
                            self._idle -= 1
                        if not self._tasks and (not woken or self._closing):
                            return  # idle too long, or closed
                        continue
                    task = self._tasks.popleft()
                    if not task.future.set_running_or_notify_cancel():
                        continue  # given up while queued (give_up removes those; defensive)
                    self._busy.add(me)
                    self._lock.release()
                    try:
                        try:
                            task.future.set_result(task.call(*task.args, **task.kwargs))
                        except BaseException as error:  # noqa: BLE001 - raised in the caller
                            task.future.set_exception(error)
                    finally:
                        self._lock.acquire()
                        self._busy.discard(me)
                    # Under the lock, after the result is set: give_up() either saw the
                    # result (not overdue) or marked it given up before this check.
                    if task.given_up:
                        self.overdue -= 1
                    del task  # the result and its caller's arguments are not kept while idle
            finally:
                self._threads.discard(me)

    def close(self, wait: bool = True) -> None:
        """End the idle workers (``wait``: and join them); busy ones end when their call
        returns. Idempotent; a later submit() starts workers again."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            idle = [t for t in self._threads if t not in self._busy]
        if wait:
            # They only have to take the lock and return. Bounded all the same: one that was
            # just started for a queued call may be running it against a hung Chroma.
            deadline = time.monotonic() + 5.0
            for thread in idle:
                if thread is not threading.current_thread():
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))


class KnowledgeStore:
    """Question-keyed knowledge over a Chroma collection in cosine space.

    Args:
        embeddings: The LangChain embedder. Must be the same embedder for adding and
            searching (and for the lifetime of a collection); τ is calibrated per embedder.
        path: Directory of a local persistent store. See the module docstring for defaults.
        client: An existing Chroma client (``PersistentClient``, ``HttpClient``, ...) instead
            of ``path``. Mutually exclusive with ``path``.
        collection: Collection name (3–512 chars of ``[a-zA-Z0-9._-]``).
        timeout: Seconds each Chroma operation may take (default
            :data:`DEFAULT_CHROMA_TIMEOUT`), or ``None`` for no limit. Chroma's
            ``HttpClient`` has no timeout of its own: a hung server would hold the caller
            forever (a probe before every answer, learning after every escalation). Past it
            the operation fails with :class:`KnowledgeStoreError` (its cause a
            :class:`~confidence_router.errors.TierTimeoutError`), which the router records
            and answers without; while :data:`MAX_OVERDUE_OPERATIONS` operations are still
            running past their timeout, new ones fail at once.

    Raises:
        InvalidArgumentError: ``path`` and ``client`` both given, an invalid collection name
            (checked before any directory is created), an existing collection of that name
            is not in cosine space, or ``timeout`` is not a finite number of seconds > 0.
        KnowledgeStoreError: Chroma could not open the collection (e.g. the server is down).
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
        timeout: float | None = DEFAULT_CHROMA_TIMEOUT,
    ) -> None:
        if path is not None and client is not None:
            raise InvalidArgumentError("pass either path or client, not both")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout <= 0
        ):
            raise InvalidArgumentError(
                f"timeout must be a finite number of seconds > 0 or None, got {timeout!r}"
            )
        #: Seconds each Chroma operation may take (``None``: no limit).
        self.timeout: float | None = timeout
        # Shared with with_embeddings() copies (same client, same overdue operations). Ended
        # by close(), or when this store is garbage-collected: its idle workers must not
        # outlive it. atexit=False: at exit they are daemon threads, nothing to do.
        self._workers = _Workers()
        weakref.finalize(self, self._workers.close, False).atexit = False
        if not isinstance(collection, str):
            raise InvalidTypeError(f"collection must be a str, got {type(collection).__name__}")
        if not _COLLECTION_RE.fullmatch(collection):
            # Checked here: Chroma's own error came only after the directory was created.
            raise InvalidArgumentError(
                f"collection name {collection!r} is invalid: 3-512 characters of "
                "[a-zA-Z0-9._-], starting and ending with a letter or digit"
            )
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
        self._collection = self._chroma(
            "open", client.get_or_create_collection,
            name=collection, configuration={"hnsw": {"space": "cosine"}},
            embedding_function=None,
        )
        space = self._space()
        if space is not None and space != "cosine":
            raise InvalidArgumentError(
                f"knowledge collection {collection!r} exists with distance space {space!r}; "
                "it must be 'cosine' (the space cannot be changed after creation)"
            )
        self._dim: int | None = None

    # ---------------------------------------------------------------- failures

    @contextlib.contextmanager
    def _failures(
        self, operation: str, stage: Literal["embedding", "chroma"]
    ) -> Iterator[None]:
        """Re-raise what the embedder or Chroma raised as :class:`KnowledgeStoreError`.

        The library's own typed errors (a dimension mismatch, a bad vector) pass unchanged.
        """
        try:
            yield
        except ConfidenceRouterError:
            raise
        except Exception as exc:  # any client failure becomes one typed error
            raise KnowledgeStoreError(operation, stage, self._collection_name, exc) from exc

    def _chroma(self, operation: str, call: Callable[..., _R], /, *args: Any, **kwargs: Any) -> _R:
        with self._failures(operation, "chroma"):
            if self.timeout is None:
                return call(*args, **kwargs)
            return self._within_timeout(operation, call, *args, **kwargs)

    def _within_timeout(
        self, operation: str, call: Callable[..., _R], /, *args: Any, **kwargs: Any
    ) -> _R:
        """``call(*args, **kwargs)`` in one of the store's worker threads, awaited up to
        :attr:`timeout`.

        Chroma's HTTP client cannot be cancelled (its connections have no timeout): an
        operation past its timeout is left to finish in its worker, and counted as overdue
        until it does (the worker is then reused).
        """
        workers = self._workers
        overdue = workers.overdue
        if overdue >= MAX_OVERDUE_OPERATIONS:
            cause = TierTimeoutError(
                f"{overdue} earlier Chroma operations have not returned (each past its "
                f"{self.timeout:g} s timeout); not sending more until they do"
            )
            raise KnowledgeStoreError(operation, "chroma", self._collection_name, cause) from cause
        task = workers.submit(call, args, kwargs)
        try:
            return task.future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            if not workers.give_up(task):
                return task.future.result()  # it finished just now
            cause = TierTimeoutError(f"Chroma did not answer within {self.timeout:g} s")
            raise KnowledgeStoreError(operation, "chroma", self._collection_name, cause) from cause

    # ---------------------------------------------------------------- introspection

    @property
    def collection_name(self) -> str:
        """The Chroma collection name."""
        return self._collection_name

    @property
    def embeddings(self) -> Embeddings:
        """The LangChain embedder used for questions and queries."""
        return self._embeddings

    def with_embeddings(self, embeddings: Embeddings) -> KnowledgeStore:
        """The same store (client, collection, entries) used through ``embeddings``: the same
        embedding model configured differently, e.g. with a timeout (its vectors must be the
        stored ones', or searches raise :class:`EmbeddingDimensionError` or go astray).

        Example: ``store.with_embeddings(OllamaEmbeddings(model=m, client_kwargs={"timeout": 5}))``
        """
        clone = copy.copy(self)
        clone._embeddings = embeddings
        # The copy shares the workers (and so the overdue count: the same client hangs for
        # both). Either one garbage-collected ends the idle workers; the other starts new ones.
        weakref.finalize(clone, clone._workers.close, False).atexit = False
        return clone

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
            elif self._chroma("count", self._collection.count) > 0:
                # A collection written by something else: read the dimension off a vector.
                peek = self._chroma(
                    "get", self._collection.get, limit=1, include=["embeddings"]
                )
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
        self._chroma("add", self._collection.modify, metadata=metadata)

    def count(self) -> int:
        """Number of stored entries.

        Raises:
            KnowledgeStoreError: Chroma failed (server gone, collection deleted, ...).
        """
        return int(self._chroma("count", self._collection.count))

    def __len__(self) -> int:
        return self.count()

    def close(self) -> None:
        """Release the Chroma client this store opened for its ``path`` (database files,
        threads); a ``client`` you passed in is yours to close. Ends the store's idle worker
        threads (one still waiting for a hung Chroma ends when Chroma answers). Idempotent;
        the store cannot be used afterwards. Also ``with KnowledgeStore(...) as store: ...``.
        """
        self._workers.close()
        if self.path is not None:
            close = getattr(self._client, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
            InvalidArgumentError: empty/whitespace ``question``, ``content`` or ``source``, or
                text that is not valid UTF-8 (the message names the field); provenance that is
                not JSON-serialisable; the embedder returned a bad vector (empty, NaN/inf,
                zero, outside float32 range) or the wrong number of them.
            InvalidTypeError: a field of the wrong type.
            EmbeddingDimensionError: the embedder's dimension differs from the stored one.
            KnowledgeStoreError: the embedder or Chroma failed.
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

        All items are validated and embedded before anything is written, and written with one
        Chroma upsert. Within one call a later duplicate question wins. Returns one entry per
        input item, in input order (duplicates return the final entry).

        Raises:
            InvalidTypeError: ``items`` is not an iterable of ``(question, content)`` pairs
                (a bare string is refused: it would unpack character by character).
            and the errors of :meth:`add`.
        """
        prepared = [self._prepare(q, c, source, provenance) for q, c in _pairs(items)]
        if not prepared:
            return []
        with self._failures("add", "embedding"):
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
        prepared = [self._prepare(q, c, source, provenance) for q, c in _pairs(items)]
        if not prepared:
            return []
        with self._failures("add", "embedding"):
            embeddings = _loop_embeddings(self._embeddings)
            vectors = await embeddings.aembed_documents([p[1] for p in prepared])
        # Chroma's client is synchronous; keep the event loop free while it writes.
        return await asyncio.to_thread(self._write, prepared, vectors)

    def _write(
        self,
        prepared: list[tuple[str, str, str, str, str]],
        vectors: Sequence[Sequence[float]],
    ) -> list[KnowledgeEntry]:
        try:
            n_vectors = len(vectors)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"embedder returned {type(vectors).__name__}, not a list of vectors"
            ) from exc
        if n_vectors != len(prepared):
            raise InvalidArgumentError(
                f"embedder returned {n_vectors} vectors for {len(prepared)} questions"
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
        existing = self._chroma("add", self._collection.get, ids=ids, include=["metadatas"])
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

        self._chroma(
            "add", self._collection.upsert,
            ids=ids, embeddings=embeddings, documents=documents, metadatas=metadatas,
        )
        self._record_dimension(dim)
        return [entries[item[0]] for item in prepared]

    def delete(self, entry_id: str) -> bool:
        """Delete an entry by id. Returns ``True`` if it existed."""
        if self.get(entry_id) is None:
            return False
        self._chroma("delete", self._collection.delete, ids=[entry_id])
        return True

    # ---------------------------------------------------------------- reading

    @staticmethod
    def _entry(entry_id: str, content: str | None, metadata: Mapping[str, Any]) -> KnowledgeEntry:
        try:
            provenance = json.loads(metadata.get(_M_PROVENANCE) or "{}")
        except ValueError:
            provenance = {}
        created_at = _timestamp(metadata.get(_M_CREATED))
        updated_at = _timestamp(metadata.get(_M_UPDATED))
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
        """The entry with this id, or ``None``.

        Raises:
            InvalidTypeError / InvalidArgumentError: ``entry_id`` is not a non-empty string.
            KnowledgeStoreError: Chroma failed.
        """
        entry_id = _require_text(entry_id, "entry_id")
        result = self._chroma(
            "get", self._collection.get, ids=[entry_id], include=["metadatas", "documents"]
        )
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

        The result is clipped to ``[-1, 1]`` and rounded like search scores, so a stored
        question searched again always meets the τ calibrated from its own duplicates.

        Raises:
            InvalidArgumentError: fewer than 2 entries, or ``quantile`` not a number in (0, 1).
        """
        import numpy as np

        if (
            isinstance(quantile, bool)
            or not isinstance(quantile, numbers.Real)
            or not 0.0 < quantile < 1.0
        ):
            raise InvalidArgumentError(f"quantile must be in (0, 1), got {quantile!r}")
        vectors = self._chroma("get", self._collection.get, include=["embeddings"])["embeddings"]
        if vectors is None or len(vectors) < 2:
            raise InvalidArgumentError("self_similarity_tau needs at least 2 stored entries")
        matrix = np.asarray(vectors, dtype=np.float64)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-10)
        cosine = matrix @ matrix.T
        np.fill_diagonal(cosine, -np.inf)
        # Clipped and rounded like search scores: a stored duplicate has cosine
        # 1.0000000000000002 in float64, and τ is a cosine in [-1, 1] (the probe refuses
        # anything outside).
        value = float(np.clip(np.quantile(cosine.max(axis=1), quantile), -1.0, 1.0))
        return round(value, _SCORE_DECIMALS)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` entries whose questions are most similar to ``query``.

        Returns :class:`~confidence_router.gsa.Hit` objects in retrieval order (descending
        similarity) with ``score`` = the raw cosine similarity (float64, not clamped, no
        floor), ``question``, ``content``, ``id`` and ``metadata`` (source, timestamps,
        provenance). An empty store returns ``[]`` without calling the embedder.

        Raises:
            InvalidArgumentError: empty/whitespace ``query`` or ``k < 1``; the embedder
                returned an empty, NaN/infinite or zero vector.
            InvalidTypeError: ``query`` is not a string.
            EmbeddingDimensionError: the query embedding's dimension differs from the store's.
            KnowledgeStoreError: the embedder or Chroma failed (server down, collection
                deleted, closed client, ...).
        """
        query = _require_text(query, "query").strip()
        self._check_k(k)
        if self.count() == 0:
            return []
        with self._failures("search", "embedding"):
            vector = self._embeddings.embed_query(query)
        return self._query_vector(vector, k)

    async def asearch(self, query: str, k: int = 5) -> list[Hit]:
        """Async :meth:`search`: ``aembed_query``, then the Chroma query in a worker thread."""
        query = _require_text(query, "query").strip()
        self._check_k(k)
        if await asyncio.to_thread(self.count) == 0:
            return []
        with self._failures("search", "embedding"):
            vector = await _loop_embeddings(self._embeddings).aembed_query(query)
        return await asyncio.to_thread(self._query_vector, vector, k)

    @staticmethod
    def _check_k(k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")

    def _query_vector(self, vector: Sequence[float], k: int) -> list[Hit]:
        checked = _check_vector(vector, "query")
        self._check_dimension(len(checked))
        n = min(int(k), self.count())
        if n == 0:
            return []
        result = self._chroma(
            "search", self._collection.query,
            query_embeddings=[checked],
            n_results=n,
            include=["metadatas", "documents", "embeddings"],
        )
        ids = result["ids"][0]
        documents = (result.get("documents") or [[]])[0]
        metadatas = (result.get("metadatas") or [[]])[0]
        stored = result.get("embeddings")
        vectors = stored[0] if stored is not None and len(stored) > 0 else []
        if not (len(ids) == len(documents) == len(metadatas) == len(vectors)):
            raise KnowledgeStoreError(
                "search", "chroma", self._collection_name,
                ValueError(
                    f"Chroma answered {len(ids)} ids, {len(documents)} documents, "
                    f"{len(metadatas)} metadatas and {len(vectors)} embeddings"
                ),
            )
        hits: list[Hit] = []
        for i, entry_id in enumerate(ids):
            entry = self._entry(entry_id, documents[i], metadatas[i] or {})
            hits.append(
                Hit(
                    content=entry.content,
                    score=_cosine(checked, vectors[i]),
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
        hits.sort(key=_order_key, reverse=True)  # stable, also with reverse
        return hits
