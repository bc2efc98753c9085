"""Evaluation runner: send QA items through a local chat model and record one row per query.

Each :class:`~confidence_router.evaluation.datasets.QAItem` is wrapped in the answer prompt of
its ``prompt_style`` (see :class:`PromptSet`), sent to any LangChain chat model (greedy,
logprobs on), graded, and written to SQLite **as it goes**: one committed transaction per row,
WAL journal. A killed run (even ``SIGKILL``) therefore loses at most the rows in flight, and
re-running the same command resumes: item ids already recorded for the run are skipped.

Usage::

    from langchain_ollama import ChatOllama
    from confidence_router.evaluation import load_dataset
    from confidence_router.evaluation.runner import EvalRunner, load_run

    items = load_dataset("triviaqa", limit=200)
    runner = EvalRunner(
        ChatOllama(base_url="http://127.0.0.1:11434", model="qwen2.5:7b"),
        db_path="eval-runs.sqlite",
        dataset="triviaqa",
        prompts="instruct",          # or "few-shot" for a base model served raw
        concurrency=2,
    )
    summary = runner.run(items)      # resumable; returns counts
    data = load_run("eval-runs.sqlite", summary.run_name)
    labels, scores = data.signal("mean_logprob").labels, data.signal("mean_logprob").scores

Extra signals plug in as :class:`ExtraSignal` (a callable or async callable taking the
``QAItem`` and returning a mapping of named fields), e.g. the GSA probe through
:func:`runnable_signal`::

    from confidence_router.probe import SelfAssessmentProbe
    gsa = runnable_signal("gsa", SelfAssessmentProbe(model=local),
                          score_fields=("p_yes",),
                          fields=("p_yes", "extraction_mode", "had_retrieval", "n_hits_used",
                                  "latency_s"))
    EvalRunner(local, db_path=..., dataset=..., signals=[gsa])

Storage (stdlib ``sqlite3``): table ``runs`` holds one row per run name with its
configuration (model, dataset, prompt templates, grader, signals, library version, start time,
host); table ``results`` holds one row per ``(run_id, item_id)``. Failure rows (the model call
or the grader raised) keep the error text and ``correct = NULL``; the loaders exclude and count
them. Answers with no logprobs keep ``confidence = NULL`` and the reason in
``signal_unknown_reason``: a missing signal is never scored as 0.5.

Latency (``latency_s``) is the client-side wall time of the local call. With ``concurrency >
1`` it includes time queued behind other requests at the server, so measure latency with
``concurrency=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import platform
import sqlite3
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confidence_router._aio import within
from confidence_router.calibration import EvalDatabaseError, database_errors
from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError, InvalidTypeError
from confidence_router.evaluation.datasets import (
    KNOWN_DATASETS,
    PROMPT_STYLE_COMPLETION,
    PROMPT_STYLE_QUESTION,
    QAItem,
)
from confidence_router.evaluation.grading import Grader, match_grader
from confidence_router.extraction import (
    TokenLogprob,
    decode_tokens,
    encode_tokens,
    message_token_logprobs,
)
from confidence_router.extraction import message_text as _message_text
from confidence_router.signals import (
    SIGNAL_SCORERS,
    LogprobSignals,
    answer_signals,
    score_for,
)

__all__ = [
    "BUILTIN_SIGNALS",
    "FEW_SHOT_PROMPTS",
    "FEW_SHOT_V2_PROMPTS",
    "INSTRUCT_PROMPTS",
    "PROMPT_SETS",
    "EvalDatabaseError",
    "EvalRunner",
    "EvalRunnerError",
    "ExtraSignal",
    "PromptSet",
    "ResultRow",
    "RunConfigMismatchError",
    "RunData",
    "RunDatabaseError",
    "RunInfo",
    "RunNotFoundError",
    "RunSummary",
    "SignalArrays",
    "connect",
    "dataset_label",
    "decode_tokens",
    "encode_tokens",
    "list_runs",
    "load_run",
    "prepare_chat_model",
    "register_run",
    "run_eval",
    "runnable_signal",
    "write_row",
]

SCHEMA_VERSION = 2
"""Version 2 added ``results.tokens``; version-1 files are upgraded in place on open."""
DEFAULT_NUM_PREDICT = 50
"""Answer length limit; the paper used 50 tokens for TriviaQA."""
TOP_LOGPROBS = 5
"""Alternatives recorded per answer token (the top-k signals need k >= 2)."""


class EvalRunnerError(ConfidenceRouterError):
    """Base class of the evaluation runner's errors."""


class RunConfigMismatchError(EvalRunnerError, ValueError):
    """A run name already exists in the database with a different configuration.

    Resuming would mix rows produced under two configurations, so the runner refuses; choose
    another ``run_name`` (or database) for the new configuration.
    """


class RunNotFoundError(EvalRunnerError, LookupError):
    """No run with the requested name (or id) exists in the database."""


class RunDatabaseError(EvalRunnerError, EvalDatabaseError):
    """The file is not an evaluation database this library can use: not SQLite, a directory,
    another application's SQLite file, another schema version, a table or column missing, or
    a stored value that does not decode. The message names the file (also ``.path``); the
    file is left as it was.

    Both an :class:`EvalRunnerError` and a
    :class:`~confidence_router.calibration.EvalDatabaseError` (a ``ValueError``), so either
    ``except`` catches it.
    """


# --------------------------------------------------------------------------------------------
# Answer prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """Answer-prompt templates, one per dataset ``prompt_style``.

    Templates contain the placeholder ``{question}`` (substituted literally, so braces inside a
    question are safe). The rendered prompt is sent as **one user message, no system prompt**.

    Attributes:
        name: version string stored with every run (change it whenever a template changes).
        question: template for ``prompt_style == "question"`` (the text is a question).
        completion: template for ``prompt_style == "completion"`` (the text is a sentence to
            complete, e.g. Wikidata's "The country of Novosibirsk is").
        stop: stop strings sent with the request (``ChatOllama(stop=...)``); the few-shot set
            stops at the newline so that a base model does not invent the next ``Q:``.
        description: one line for reports.
        one_line: collapse white space (including newlines) in the question to single spaces;
            line-based few-shot templates break on a newline inside a question.
        raw: the templates render the *whole* prompt for a base model, so the model must
            apply no template of its own (Ollama's ``raw`` semantics: on the embedded server,
            the ``-raw`` model variant; on Ollama, a model whose Modelfile ``TEMPLATE`` is
            ``{{ .Prompt }}``).

    Example::

        >>> item = QAItem("x:1", "Who painted the Mona Lisa?", ("Leonardo da Vinci",), "question")
        >>> INSTRUCT_PROMPTS.render(item).splitlines()[-2:]
        ['Question: Who painted the Mona Lisa?', 'Answer:']
    """

    name: str
    question: str
    completion: str
    stop: tuple[str, ...] = ()
    description: str = ""
    one_line: bool = False
    raw: bool = False

    def __post_init__(self) -> None:
        for style, template in (("question", self.question), ("completion", self.completion)):
            if "{question}" not in template:
                raise InvalidArgumentError(
                    f"PromptSet {self.name!r}: the {style} template lacks {{question}}"
                )

    def template_for(self, prompt_style: str) -> str:
        """The template for a dataset ``prompt_style`` (``"question"`` or ``"completion"``)."""
        if prompt_style == PROMPT_STYLE_QUESTION:
            return self.question
        if prompt_style == PROMPT_STYLE_COMPLETION:
            return self.completion
        raise InvalidArgumentError(
            f"unknown prompt_style {prompt_style!r}; expected {PROMPT_STYLE_QUESTION!r} or "
            f"{PROMPT_STYLE_COMPLETION!r}"
        )

    def render(self, item: QAItem) -> str:
        """The user-message text for ``item``."""
        text = " ".join(item.question.split()) if self.one_line else item.question
        return self.template_for(item.prompt_style).replace("{question}", text)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in the ``runs`` table)."""
        return {
            "name": self.name,
            "question": self.question,
            "completion": self.completion,
            "stop": list(self.stop),
            "description": self.description,
            "one_line": self.one_line,
            "raw": self.raw,
        }


def _build_few_shot() -> tuple[PromptSet, PromptSet]:
    # The demonstrations live with the embedded backend's templates (one source of truth);
    # that module imports only the standard library at module level.
    from confidence_router.serving.llamacpp import (
        COMPLETION_FEW_SHOT_PREFIX,
        FEW_SHOT_PREFIX,
        TRIVIA_FEW_SHOT_PREFIX,
    )

    # One style per dataset: demonstrations in the question's own form before a question,
    # plain completion sentences before a sentence to complete. Mixing them (v1: Q:/A: pairs,
    # then two sentences, then the Wikidata prompt) cost accuracy and AUROC on Wikidata.
    v2 = PromptSet(
        name="few-shot-v2",
        question=FEW_SHOT_PREFIX + "Q: {question}\nA:",
        completion=COMPLETION_FEW_SHOT_PREFIX + "{question}",
        stop=("\n",),
        description="few-shot prompts for base models (the embedded Gemma 3 270M): Q:/A: "
        "pairs for questions, plain sentences for completions; sent raw",
        one_line=True,
        raw=True,
    )
    # v3 changes only the question template: eight trivia demonstrations with short entity
    # answers instead of two Q:/A: pairs (the completion template keeps v2's bytes). Measured
    # on TriviaQA rows the committed report does not use; see docs/signals.md.
    v3 = PromptSet(
        name="few-shot-v3",
        question=TRIVIA_FEW_SHOT_PREFIX + "Question: {question}\nAnswer:",
        completion=v2.completion,
        stop=v2.stop,
        description="few-shot prompts for base models (the embedded Gemma 3 270M): eight "
        "Question:/Answer: trivia pairs for questions, plain sentences for completions; sent raw",
        one_line=True,
        raw=True,
    )
    return v3, v2


FEW_SHOT_PROMPTS, FEW_SHOT_V2_PROMPTS = _build_few_shot()
"""``FEW_SHOT_PROMPTS`` (``few-shot-v3``) is for base (non-chat) models such as the embedded
Gemma 3 270M: the whole few-shot prompt in the question's style, sent raw (the embedded
server's ``gemma3:270m-raw``), stopped at the newline. ``FEW_SHOT_V2_PROMPTS`` is the previous
version (two ``Q:``/``A:`` pairs before a question), kept so older runs can be reproduced."""

INSTRUCT_PROMPTS = PromptSet(
    name="instruct-v1",
    # The paper's TriviaQA local prompt, exact bytes.
    question="Answer this trivia question in a few words.\n\nQuestion: {question}\nAnswer:",
    completion="Complete the sentence with a few words.\n\nSentence: {question}\nCompletion:",
    stop=(),
    description="instruction prompt for chat models (the paper's TriviaQA prompt)",
)
"""For instruction-tuned chat models (a user's Ollama 7B, the cloud model)."""

PROMPT_SETS: Mapping[str, PromptSet] = {
    "few-shot": FEW_SHOT_PROMPTS,
    "few-shot-v2": FEW_SHOT_V2_PROMPTS,
    "instruct": INSTRUCT_PROMPTS,
}
"""Built-in prompt sets by short name."""


def _resolve_prompts(prompts: PromptSet | str) -> PromptSet:
    if isinstance(prompts, PromptSet):
        return prompts
    try:
        return PROMPT_SETS[prompts]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown prompt set {prompts!r}; choose one of {sorted(PROMPT_SETS)} or pass a "
            "PromptSet"
        ) from None


# --------------------------------------------------------------------------------------------
# Extra signals
# --------------------------------------------------------------------------------------------

SignalFn = Callable[[QAItem], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]


@dataclass(frozen=True)
class ExtraSignal:
    """A confidence signal computed per item besides the answer's logprobs.

    Attributes:
        name: short identifier (``[a-z0-9_]``); fields are stored as ``"<name>.<field>"``.
        fn: ``fn(item) -> {field: value}``, sync or async. Values are numbers, bools, strings
            or ``None``. A field ``latency_s`` is added with the measured wall time unless the
            signal reports its own. If ``fn`` raises, the row keeps ``{"error": "..."}`` for
            this signal (the signal is *missing* for that row; the answer row still counts).
        score_fields: the fields that are confidence scores oriented "higher = keep local"
            (reported with AUROC), e.g. ``("p_yes",)``. Other fields are kept as diagnostics.

    Example::

        >>> sig = ExtraSignal("question_len", lambda item: {"score": -len(item.question)},
        ...                   score_fields=("score",))
        >>> sig.name, sig.score_fields
        ('question_len', ('score',))
    """

    name: str
    fn: SignalFn
    score_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name):
            raise InvalidArgumentError(f"signal name must be non-empty [A-Za-z0-9_]; got {self.name!r}")
        if self.name in BUILTIN_SIGNALS:
            raise InvalidArgumentError(f"signal name {self.name!r} is reserved for a built-in signal")
        object.__setattr__(self, "score_fields", tuple(self.score_fields))


def _attribute_or_key(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def runnable_signal(
    name: str,
    runnable: Any,
    *,
    score_fields: Sequence[str] = ("p_yes",),
    fields: Sequence[str] | None = None,
    to_input: Callable[[QAItem], Any] = lambda item: item.question,
) -> ExtraSignal:
    """Wrap a LangChain Runnable (e.g. the GSA ``SelfAssessmentProbe``) as an :class:`ExtraSignal`.

    The runnable is called with ``to_input(item)`` (default: the question text) through
    ``ainvoke``; the listed ``fields`` are read from its result (attributes of a dataclass or
    pydantic object, or keys of a mapping). ``fields`` defaults to ``score_fields`` plus
    ``latency_s``.

    Example::

        >>> from langchain_core.runnables import RunnableLambda
        >>> sig = runnable_signal("toy", RunnableLambda(lambda q: {"p_yes": 0.5}))
        >>> import asyncio
        >>> asyncio.run(sig.fn(QAItem("a:1", "Q?", ("A",), "question")))
        {'p_yes': 0.5, 'latency_s': None}
    """
    wanted = tuple(fields) if fields is not None else (*score_fields, "latency_s")

    async def call(item: QAItem) -> Mapping[str, Any]:
        result = await runnable.ainvoke(to_input(item))
        return {f: _attribute_or_key(result, f) for f in wanted}

    return ExtraSignal(name=name, fn=call, score_fields=tuple(score_fields))


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: numbers (NaN/inf -> None), bools, strings, None; else ``str()``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "value") and isinstance(value.value, (str, int, float)):  # enums
        return value.value
    return str(value)


async def _call_signal(signal: ExtraSignal, item: QAItem) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        fn = signal.fn
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        ):
            result = await fn(item)  # type: ignore[misc]
        else:
            # A synchronous signal (e.g. a blocking HTTP call) must not stall the event loop
            # that the other in-flight items share.
            result = await asyncio.to_thread(fn, item)
            if inspect.isawaitable(result):
                result = await result
        if not isinstance(result, Mapping):
            raise InvalidTypeError(f"signal returned {type(result).__name__}, expected a mapping")
        out = {str(k): _json_value(v) for k, v in result.items()}
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded per row, never silently dropped
        return {"error": _error_text(exc), "latency_s": time.perf_counter() - start}
    if out.get("latency_s") is None:
        out["latency_s"] = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------


def prepare_chat_model(
    model: Any,
    *,
    num_predict: int = DEFAULT_NUM_PREDICT,
    stop: Sequence[str] = (),
    top_logprobs: int = TOP_LOGPROBS,
) -> Any:
    """Configure a chat model for confidence measurement; other models are returned unchanged.

    A ``ChatOllama`` is **copied** (the caller's instance keeps its settings) with
    ``temperature=0`` (greedy: confidence is defined on the greedy answer), ``logprobs=True``,
    ``top_logprobs=5`` (:data:`TOP_LOGPROBS`: the paper uses only the chosen token; the
    alternatives feed the top-k signals and are stored with the run),
    ``num_predict=num_predict`` and ``stop`` (if given). Per-call kwargs cannot do this:
    ChatOllama forwards unknown invoke kwargs to its HTTP client, which rejects them. The copy
    gets fresh HTTP clients, because an async client keeps connections bound to the event loop
    that opened them, and every :meth:`EvalRunner.run` uses a new loop.

    Any other chat model must already be configured (greedy, logprobs if it has them); rows
    without logprobs are recorded with ``signal_unknown_reason = "no_logprobs"``.
    """
    cls = type(model)
    if cls.__name__ != "ChatOllama" or "langchain_ollama" not in cls.__module__:
        return model
    update: dict[str, Any] = {
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": int(top_logprobs),
        "num_predict": int(num_predict),
    }
    if stop:
        update["stop"] = list(stop)
    copy = model.model_copy(update=update, deep=False)
    reset_clients = getattr(copy, "_set_clients", None)
    if callable(reset_clients):
        reset_clients()
    return copy


def _model_name(model: Any) -> str:
    for attr in ("model", "model_name", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def _model_options(model: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for attr in (
        "temperature",
        "num_predict",
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "stop",
        "base_url",
    ):
        if hasattr(model, attr):
            options[attr] = (
                _json_value(getattr(model, attr))
                if attr != "stop"
                else (list(getattr(model, attr) or []))
            )
    if isinstance(options.get("base_url"), str):
        from confidence_router.settings import redact_url

        options["base_url"] = redact_url(options["base_url"])  # never store a password
    return options


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}"[:2000] if text else type(exc).__name__


def _usage(message: Any) -> tuple[int | None, int | None]:
    usage = getattr(message, "usage_metadata", None) or {}
    inp = usage.get("input_tokens") if isinstance(usage, Mapping) else None
    out = usage.get("output_tokens") if isinstance(usage, Mapping) else None
    return (int(inp) if inp is not None else None, int(out) if out is not None else None)


# --------------------------------------------------------------------------------------------
# Rows and the database
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    """One evaluated query, as stored in the ``results`` table.

    ``correct`` is ``None`` exactly when ``error`` is set (a failure row). ``confidence`` is
    ``sigmoid(2 * mean_logprob + 3)`` and ``min_confidence`` ``sigmoid(2 * min_logprob + 3)``;
    all four are ``None`` when the signal is unknown (``signal_unknown_reason`` says why).
    ``extras`` maps each extra signal name to its recorded fields. ``tokens`` are the answer's
    tokens with their logprobs and top alternatives (``None``: not recorded, e.g. no logprobs
    or a run written by an older version).
    """

    item_id: str
    position: int
    dataset: str
    question: str
    gold_answers: tuple[str, ...]
    answer: str | None
    correct: int | None
    token_count: int | None
    mean_logprob: float | None
    min_logprob: float | None
    confidence: float | None
    min_confidence: float | None
    latency_s: float | None
    signal_unknown_reason: str | None
    error: str | None
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    done_reason: str | None = None
    cloud_answer: str | None = None
    cloud_correct: int | None = None
    cloud_input_tokens: int | None = None
    cloud_output_tokens: int | None = None
    cloud_latency_s: float | None = None
    cloud_error: str | None = None
    tokens: tuple[TokenLogprob, ...] | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_set TEXT NOT NULL,
    prompt_templates TEXT NOT NULL,
    grader TEXT NOT NULL,
    signals TEXT NOT NULL,
    cloud_model TEXT,
    model_options TEXT NOT NULL,
    library_version TEXT NOT NULL,
    started_at TEXT NOT NULL,
    host TEXT NOT NULL,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    question TEXT NOT NULL,
    gold_answers TEXT NOT NULL,
    answer TEXT,
    correct INTEGER CHECK (correct IN (0, 1)),
    token_count INTEGER,
    mean_logprob REAL,
    min_logprob REAL,
    confidence REAL,
    min_confidence REAL,
    latency_s REAL,
    signal_unknown_reason TEXT,
    error TEXT,
    extras TEXT NOT NULL DEFAULT '{}',
    done_reason TEXT,
    cloud_answer TEXT,
    cloud_correct INTEGER CHECK (cloud_correct IN (0, 1)),
    cloud_input_tokens INTEGER,
    cloud_output_tokens INTEGER,
    cloud_latency_s REAL,
    cloud_error TEXT,
    completed_at TEXT NOT NULL,
    tokens BLOB,
    PRIMARY KEY (run_id, item_id)
);
"""

_RESULT_COLUMNS = (
    "item_id", "position", "dataset", "question", "gold_answers", "answer", "correct",
    "token_count", "mean_logprob", "min_logprob", "confidence", "min_confidence", "latency_s",
    "signal_unknown_reason", "error", "extras", "done_reason", "cloud_answer", "cloud_correct",
    "cloud_input_tokens", "cloud_output_tokens", "cloud_latency_s", "cloud_error", "tokens",
)  # fmt: skip


_RUNS_COLUMNS = (
    "run_id", "name", "dataset", "model", "prompt_set", "prompt_templates", "grader", "signals",
    "cloud_model", "model_options", "library_version", "started_at", "host", "config",
)  # fmt: skip


def connect(db_path: str | os.PathLike[str], *, create: bool = True) -> sqlite3.Connection:
    """Open an evaluation database in WAL mode with the schema in place.

    A missing (or empty) file becomes a new database when ``create`` (the runner); readers
    (:func:`load_run`, :func:`list_runs`) pass ``create=False`` and refuse it. An existing file
    must be an evaluation database of a version this library reads (version 1 is upgraded in
    place); anything else -- not SQLite, another application's SQLite file, another schema
    version, a table missing -- raises :class:`RunDatabaseError` naming the file, **before**
    anything is written to it.

    WAL + ``synchronous=NORMAL``: every committed row survives the death of the process
    (including ``SIGKILL``); only an OS crash or power loss can drop the last commits. Several
    processes may write to one file at once (each waits up to 30 s for the write lock).
    """
    path = Path(db_path)
    if path.is_dir():
        raise RunDatabaseError(f"{path}: is a directory, not an evaluation database", path=path)
    if not create and not path.is_file():
        raise FileNotFoundError(f"evaluation database not found: {os.fspath(db_path)!r}")
    if create and path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with database_errors(path, RunDatabaseError):
        conn = sqlite3.connect(str(path), timeout=30.0)
    try:
        with database_errors(path, RunDatabaseError):
            conn.row_factory = sqlite3.Row
            _prepare_with_retry(conn, path, create=create)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare_with_retry(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    # Switching a new file to WAL while another process creates the same file can fail at
    # once with "database is locked" (SQLite does not wait on the busy handler there): retry
    # for as long as a write would wait (30 s).
    deadline = time.monotonic() + 30.0
    delay = 0.01
    while True:
        try:
            _prepare_schema(conn, path, create=create)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            if conn.in_transaction:
                conn.rollback()
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _prepare_schema(conn: sqlite3.Connection, path: Path, *, create: bool) -> None:
    # Check what the file holds before writing anything: a foreign file stays untouched.
    tables = {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    } - {"sqlite_sequence"}
    version: int | None = None
    if tables:
        row = None
        if "meta" in tables and "value" in _table_columns(conn, "meta"):
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise RunDatabaseError(
                f"{path}: not an evaluation database (it holds the tables {sorted(tables)} "
                "but no confidence-router schema version); use a new --db file",
                path=path,
            )
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            version = None
        if version not in (1, SCHEMA_VERSION):
            raise RunDatabaseError(
                f"{path}: evaluation database schema version {row[0]}, this library reads "
                f"version {SCHEMA_VERSION}; use a new --db file",
                path=path,
            )
        missing = {"runs", "results"} - tables
        if missing:
            raise RunDatabaseError(
                f"{path}: not a complete evaluation database: table(s) {sorted(missing)} "
                "missing",
                path=path,
            )
    elif not create:
        raise RunDatabaseError(
            f"{path}: not an evaluation database (it holds no tables)", path=path
        )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    if not tables:
        # One transaction: another process opening the file meanwhile sees no tables or the
        # whole schema with its version, never tables without a version (which it would refuse
        # as a foreign file). IF NOT EXISTS / OR IGNORE: it may be creating the same file.
        conn.executescript(
            "BEGIN IMMEDIATE;\n"
            + _SCHEMA
            + "INSERT OR IGNORE INTO meta(key, value) VALUES "
            + f"('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;"
        )
    elif version == 1:
        # Version 1 had no per-token data: add the column; old rows keep NULL (= unknown).
        if "tokens" not in _table_columns(conn, "results"):
            conn.execute("ALTER TABLE results ADD COLUMN tokens BLOB")
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )
        conn.commit()
    for table, needed in (
        ("runs", _RUNS_COLUMNS),
        ("results", ("run_id", *_RESULT_COLUMNS, "completed_at")),
    ):
        lacking = [c for c in needed if c not in _table_columns(conn, table)]
        if lacking:
            raise RunDatabaseError(
                f"{path}: table {table!r} lacks the column(s) {lacking}; not an evaluation "
                f"database of schema version {SCHEMA_VERSION}",
                path=path,
            )


def _table_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def write_row(conn: sqlite3.Connection, run_id: int, row: ResultRow) -> None:
    """Insert one row of run ``run_id`` and commit it (its own transaction).

    An existing row of the same item is replaced only if it is a failure row: a completed row
    is kept, whoever writes after it.
    """
    values = [
        row.item_id, row.position, row.dataset, row.question,
        json.dumps(list(row.gold_answers), ensure_ascii=False), row.answer, row.correct,
        row.token_count, row.mean_logprob, row.min_logprob, row.confidence, row.min_confidence,
        row.latency_s, row.signal_unknown_reason, row.error,
        json.dumps(row.extras, ensure_ascii=False, sort_keys=True), row.done_reason,
        row.cloud_answer, row.cloud_correct, row.cloud_input_tokens, row.cloud_output_tokens,
        row.cloud_latency_s, row.cloud_error, encode_tokens(row.tokens),
    ]  # fmt: skip
    placeholders = ", ".join("?" for _ in range(len(_RESULT_COLUMNS) + 2))
    updates = ", ".join(f"{c} = excluded.{c}" for c in (*_RESULT_COLUMNS, "completed_at"))
    # A stored failure row is replaced (retry_errors); a completed row never is, so another
    # process running the same command at the same time cannot overwrite it with a failure.
    conn.execute(
        f"INSERT INTO results (run_id, {', '.join(_RESULT_COLUMNS)}, completed_at) "
        f"VALUES ({placeholders}) ON CONFLICT (run_id, item_id) DO UPDATE SET {updates} "
        "WHERE results.error IS NOT NULL",
        [run_id, *values, _now()],
    )
    conn.commit()  # one transaction per row: a killed run keeps everything written so far


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _library_version() -> str:
    try:
        from confidence_router import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _host_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def dataset_label(name_or_path: str | os.PathLike[str]) -> str:
    """A short dataset name for reports: known names as is, paths by their file stem.

    >>> dataset_label("wikidata"), dataset_label("/data/my_set.jsonl")
    ('wikidata', 'my_set')
    """
    text = os.fspath(name_or_path)
    return text if text in KNOWN_DATASETS else Path(text).stem


def register_run(
    conn: sqlite3.Connection,
    *,
    name: str,
    dataset: str,
    model: str,
    prompt_templates: Mapping[str, Any],
    grader: str,
    signals: Sequence[Mapping[str, Any]] = (),
    cloud_model: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> int:
    """Create run ``name`` (or check that the stored one matches) and return its ``run_id``.

    The identity fields (dataset, model, prompt templates incl. their ``name``, grader,
    signals, cloud model) must equal the stored ones, else :class:`RunConfigMismatchError`.
    Used by :class:`EvalRunner`; also the way to import rows produced elsewhere (then add rows
    with :func:`write_row`).
    """
    identity = {
        "dataset": dataset,
        "model": model,
        "prompt_set": str(prompt_templates.get("name", "")),
        "prompt_templates": json.dumps(dict(prompt_templates), sort_keys=True),
        "grader": grader,
        "signals": json.dumps([dict(s) for s in signals], sort_keys=True),
        "cloud_model": cloud_model,
    }
    row = conn.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
    if row is None:
        # OR IGNORE: another process may register the same run between the look-up above and
        # this insert; then its row is the run, checked like any stored one below.
        conn.execute(
            "INSERT OR IGNORE INTO runs (name, dataset, model, prompt_set, prompt_templates, "
            "grader, signals, cloud_model, model_options, library_version, started_at, host, "
            "config) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                identity["dataset"],
                identity["model"],
                identity["prompt_set"],
                identity["prompt_templates"],
                identity["grader"],
                identity["signals"],
                identity["cloud_model"],
                json.dumps(dict(model_options or {}), sort_keys=True),
                _library_version(),
                _now(),
                json.dumps(_host_info(), sort_keys=True),
                json.dumps(dict(config or {}), sort_keys=True, default=str),
            ),
        )
        conn.commit()
        row = conn.execute("SELECT * FROM runs WHERE name = ?", (name,)).fetchone()
    diffs = [
        f"{k}: stored {row[k]!r} != requested {identity[k]!r}"
        for k in _IDENTITY_FIELDS
        if row[k] != identity[k]
    ]
    if diffs:
        raise RunConfigMismatchError(
            f"run {name!r} already exists with another configuration; resuming would mix "
            "rows. Use another run name (or database). " + "; ".join(diffs)
        )
    return int(row["run_id"])


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`EvalRunner.run` did.

    Attributes:
        run_name, run_id: the run written to.
        n_items: items passed in.
        n_skipped: items already recorded (resumed run), not requested again.
        n_written: rows written now (successes and failures).
        n_errors: failure rows among ``n_written``.
        elapsed_s: wall time of this call.
    """

    run_name: str
    run_id: int
    n_items: int
    n_skipped: int
    n_written: int
    n_errors: int
    elapsed_s: float


# Fields that must match for a resumed run (the rest -- start time, host -- may differ).
_IDENTITY_FIELDS = (
    "dataset",
    "model",
    "prompt_set",
    "prompt_templates",
    "grader",
    "signals",
    "cloud_model",
)


class EvalRunner:
    """Evaluate QA items with a local chat model and store one row per item (resumable).

    Args:
        model: any LangChain chat model (``ainvoke(list[BaseMessage])``). A ``ChatOllama`` is
            copied and configured by :func:`prepare_chat_model` (greedy, logprobs on,
            ``num_predict``, the prompt set's stop strings).
        db_path: SQLite file (created if missing).
        dataset: dataset name or path (stored with the run; see :func:`dataset_label`).
        run_name: the run's unique name in the database. Default:
            ``"<dataset>__<model>__<prompt set>"``. Re-running with the same name resumes.
        prompts: a :class:`PromptSet` or a built-in name (``"few-shot"``, ``"instruct"``).
        grader: ``grader(question, answer, gold_answers) -> bool``; default
            :func:`~confidence_router.evaluation.grading.match_grader` (normalised whole-word
            match, data/README.md). ``grader_name`` is stored with the run.
        signals: extra per-item signals (:class:`ExtraSignal`), e.g. the GSA probe.
        cloud_model: optional chat model whose answers give cloud labels (``cloud_correct``)
            for APGR/CPT; it gets ``cloud_prompts`` (default: the instruct set).
        concurrency: items in flight at once (asyncio tasks sharing one event loop; rows are
            written by that one loop, in completion order).
        num_predict: answer token limit for ChatOllama.
        timeout_s: per-call timeout (``None``: none); a timeout becomes a failure row.
        retry_errors: on resume, re-run items whose stored row is a failure (the new row
            replaces it). Default False: every recorded item id is skipped.
        progress: show a tqdm progress bar.

    Example::

        runner = EvalRunner(ChatOllama(base_url=url, model="gemma3:270m-raw"),
                            db_path="runs.sqlite", dataset="wikidata", prompts="few-shot")
        summary = runner.run(load_dataset("wikidata", limit=100))
    """

    def __init__(
        self,
        model: Any,
        *,
        db_path: str | os.PathLike[str],
        dataset: str | os.PathLike[str],
        run_name: str | None = None,
        prompts: PromptSet | str = "instruct",
        grader: Grader = match_grader,
        grader_name: str | None = None,
        signals: Sequence[ExtraSignal] = (),
        cloud_model: Any = None,
        cloud_prompts: PromptSet | str = "instruct",
        concurrency: int = 1,
        num_predict: int = DEFAULT_NUM_PREDICT,
        timeout_s: float | None = None,
        retry_errors: bool = False,
        progress: bool = True,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be an int >= 1; got {concurrency!r}")
        if timeout_s is not None and not (
            isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
            and math.isfinite(timeout_s) and timeout_s > 0
        ):
            raise InvalidArgumentError(
                f"timeout_s must be a finite number > 0, or None; got {timeout_s!r}"
            )
        if isinstance(num_predict, bool) or not isinstance(num_predict, int) or not (
            num_predict >= 1 or num_predict == -1
        ):
            raise InvalidArgumentError(
                f"num_predict must be an int >= 1 (or -1: no limit); got {num_predict!r}"
            )
        names = [s.name for s in signals]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"duplicate extra signal names: {names}")
        self.prompts = _resolve_prompts(prompts)
        self.cloud_prompts = _resolve_prompts(cloud_prompts)
        self._raw_model = model
        self._raw_cloud_model = cloud_model
        self.model = prepare_chat_model(model, num_predict=num_predict, stop=self.prompts.stop)
        self.cloud_model = (
            prepare_chat_model(cloud_model, num_predict=num_predict, stop=self.cloud_prompts.stop)
            if cloud_model is not None
            else None
        )
        self.db_path = Path(db_path)
        self.dataset = dataset_label(dataset)
        self.dataset_source = os.fspath(dataset)
        self.model_name = _model_name(model)
        self.run_name = run_name or f"{self.dataset}__{self.model_name}__{self.prompts.name}"
        self.grader = grader
        self.grader_name = grader_name or getattr(grader, "__name__", type(grader).__name__)
        self.signals = tuple(signals)
        self.concurrency = concurrency
        self.num_predict = num_predict
        self.timeout_s = timeout_s
        self.retry_errors = retry_errors
        self.progress = progress

    # ---- configuration -----------------------------------------------------------------------

    def run_config(self) -> dict[str, Any]:
        """The configuration stored in the ``runs`` table (JSON-serialisable)."""
        return {
            "dataset": self.dataset,
            "dataset_source": self.dataset_source,
            "model": self.model_name,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "model_options": _model_options(self.model),
            "prompt_set": self.prompts.name,
            "prompt_templates": self.prompts.as_dict(),
            "grader": self.grader_name,
            "signals": [
                {"name": s.name, "score_fields": list(s.score_fields)} for s in self.signals
            ],
            "cloud_model": _model_name(self.cloud_model) if self.cloud_model is not None else None,
            "cloud_prompt_set": self.cloud_prompts.name if self.cloud_model is not None else None,
            "num_predict": self.num_predict,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
        }

    def _register(self, conn: sqlite3.Connection) -> int:
        cfg = self.run_config()
        return register_run(
            conn,
            name=self.run_name,
            dataset=cfg["dataset"],
            model=cfg["model"],
            prompt_templates=cfg["prompt_templates"],
            grader=cfg["grader"],
            signals=cfg["signals"],
            cloud_model=cfg["cloud_model"],
            model_options=cfg["model_options"],
            config=cfg,
        )

    # ---- running -----------------------------------------------------------------------------

    def run(self, items: Iterable[QAItem], *, start_position: int = 0) -> RunSummary:
        """Evaluate ``items`` (skipping those already recorded) and return a summary.

        ``start_position`` is added to each item's index to form the stored ``position``
        (pass the dataset ``offset`` so that rows sort in file order across invocations).
        Runs its own event loop; from async code use :meth:`arun`.
        """
        return asyncio.run(self.arun(items, start_position=start_position))

    async def arun(self, items: Iterable[QAItem], *, start_position: int = 0) -> RunSummary:
        """Async form of :meth:`run`."""
        started = time.perf_counter()
        items = list(items)
        ids = [item.id for item in items]
        duplicates = [i for i, c in Counter(ids).items() if c > 1]
        if duplicates:
            raise InvalidArgumentError(f"duplicate item ids in the input: {duplicates[:5]}")
        # Fresh copies (and HTTP clients) for this event loop: an async client keeps connections
        # bound to the loop that opened them, and every run() starts a new loop.
        self.model = prepare_chat_model(
            self._raw_model, num_predict=self.num_predict, stop=self.prompts.stop
        )
        if self._raw_cloud_model is not None:
            self.cloud_model = prepare_chat_model(
                self._raw_cloud_model, num_predict=self.num_predict, stop=self.cloud_prompts.stop
            )
        conn = connect(self.db_path)
        try:
            with database_errors(self.db_path, RunDatabaseError):
                run_id = self._register(conn)
                query = "SELECT item_id FROM results WHERE run_id = ?"
                if self.retry_errors:
                    query += " AND error IS NULL"
                done = {r[0] for r in conn.execute(query, (run_id,))}
            pending = [
                (start_position + index, item)
                for index, item in enumerate(items)
                if item.id not in done
            ]
            n_written = n_errors = 0
            semaphore = asyncio.Semaphore(self.concurrency)

            async def bounded(position: int, item: QAItem) -> ResultRow:
                async with semaphore:
                    return await self.evaluate_item(item, position)

            tasks = [asyncio.create_task(bounded(p, it)) for p, it in pending]
            bar = _progress(
                self.progress,
                total=len(items),
                initial=len(items) - len(pending),
                desc=self.run_name,
            )
            try:
                # The loop's own coroutine is the single writer: rows arrive in completion
                # order and are committed one by one.
                for next_done in asyncio.as_completed(tasks):
                    row = await next_done
                    # A write that fails (locked for 30 s, disk full) names the file.
                    with database_errors(self.db_path, RunDatabaseError):
                        write_row(conn, run_id, row)
                    n_written += 1
                    n_errors += row.error is not None
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(errors=n_errors, refresh=False)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if bar is not None:
                    bar.close()
        finally:
            conn.close()
        return RunSummary(
            run_name=self.run_name,
            run_id=run_id,
            n_items=len(items),
            n_skipped=len(items) - len(pending),
            n_written=n_written,
            n_errors=n_errors,
            elapsed_s=time.perf_counter() - started,
        )

    async def _call(self, model: Any, prompt: str) -> Any:
        from langchain_core.messages import HumanMessage

        call = model.ainvoke([HumanMessage(content=prompt)])
        if self.timeout_s is None:
            return await call
        return await within(call, self.timeout_s)

    async def evaluate_item(self, item: QAItem, position: int = 0) -> ResultRow:
        """Evaluate one item and return its row (never raises for model/grader failures)."""
        extras: dict[str, dict[str, Any]] = {}
        for signal in self.signals:
            extras[signal.name] = await _call_signal(signal, item)

        base: dict[str, Any] = {
            "item_id": item.id,
            "position": position,
            "dataset": self.dataset,
            "question": item.question,
            "gold_answers": tuple(item.answers),
            "extras": extras,
        }
        start = time.perf_counter()
        try:
            message = await self._call(self.model, self.prompts.render(item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failure row, excluded and counted later
            return ResultRow(
                **base, answer=None, correct=None, token_count=None, mean_logprob=None,
                min_logprob=None, confidence=None, min_confidence=None,
                latency_s=time.perf_counter() - start, signal_unknown_reason=None,
                error=f"local: {_error_text(exc)}",
            )  # fmt: skip
        latency = time.perf_counter() - start
        answer = _message_text(message)
        token_lps = message_token_logprobs(message)
        # An empty answer has no confidence to speak of: unknown, never 0.5.
        signals: LogprobSignals = answer_signals(answer, token_lps)
        _, output_tokens = _usage(message)
        token_count = signals.token_count if signals.known else output_tokens
        metadata = getattr(message, "response_metadata", None) or {}
        done_reason = metadata.get("done_reason") if isinstance(metadata, Mapping) else None

        error: str | None = None
        correct: int | None = None
        try:
            correct = int(bool(self.grader(item.question, answer, item.answers)))
        except Exception as exc:  # noqa: BLE001 - e.g. JudgeParseError: excluded, counted
            error = f"grader: {_error_text(exc)}"

        cloud: dict[str, Any] = {}
        if self.cloud_model is not None:
            cloud = await self._cloud(item)

        return ResultRow(
            **base,
            answer=answer,
            correct=correct,
            token_count=token_count,
            mean_logprob=signals.mean_logprob,
            min_logprob=signals.min_logprob,
            confidence=signals.confidence,
            min_confidence=signals.min_confidence,
            latency_s=latency,
            signal_unknown_reason=signals.unknown_reason,
            error=error,
            done_reason=str(done_reason) if done_reason is not None else None,
            tokens=tuple(token_lps) if token_lps else None,
            **cloud,
        )

    async def _cloud(self, item: QAItem) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            message = await self._call(self.cloud_model, self.cloud_prompts.render(item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - cloud failure: excluded from cloud metrics
            return {"cloud_error": _error_text(exc), "cloud_latency_s": time.perf_counter() - start}
        latency = time.perf_counter() - start
        answer = _message_text(message)
        in_tokens, out_tokens = _usage(message)
        try:
            correct: int | None = int(bool(self.grader(item.question, answer, item.answers)))
            error = None
        except Exception as exc:  # noqa: BLE001
            correct, error = None, f"grader: {_error_text(exc)}"
        return {
            "cloud_answer": answer,
            "cloud_correct": correct,
            "cloud_input_tokens": in_tokens,
            "cloud_output_tokens": out_tokens,
            "cloud_latency_s": latency,
            "cloud_error": error,
        }


def _progress(enabled: bool, *, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", dynamic_ncols=True)


def run_eval(
    model: Any,
    items: Iterable[QAItem],
    *,
    db_path: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    start_position: int = 0,
    **runner_kwargs: Any,
) -> RunSummary:
    """One-call form: ``EvalRunner(model, db_path=..., dataset=..., **kw).run(items)``.

    Example::

        summary = run_eval(llm, load_dataset("wikidata", limit=50), db_path="r.sqlite",
                           dataset="wikidata", prompts="few-shot", progress=False)
    """
    runner = EvalRunner(model, db_path=db_path, dataset=dataset, **runner_kwargs)
    return runner.run(items, start_position=start_position)


# --------------------------------------------------------------------------------------------
# Loading runs back (pure helpers for the metrics)
# --------------------------------------------------------------------------------------------

_LEGACY_COLUMNS: Mapping[str, str] = {
    "mean_logprob": "confidence",
    "min_logprob": "min_confidence",
}

RANK_SIGNALS: Mapping[str, tuple[str, ...]] = {
    "rank_avg": ("sum_logprob", "min_logprob", "min_margin", "max_entropy"),
}
"""Label-free rank combinations, computed over a whole run (mean normalised rank of the
listed signals, :func:`confidence_router.signals.rank_average`): report-only, because a
single answer has no rank."""

BUILTIN_SIGNALS: Mapping[str, str | None] = {
    **{name: _LEGACY_COLUMNS.get(name) for name in SIGNAL_SCORERS},
    **{name: None for name in RANK_SIGNALS},
}
"""Built-in zero-shot signals (every :data:`confidence_router.signals.SIGNAL_SCORERS` name,
then the :data:`RANK_SIGNALS`) and the ``results`` column that holds the [0, 1] score of
rows without token data (runs written before tokens were stored), if any: ``mean_logprob``
-> ``confidence`` = ``sigmoid(2 * mean + 3)``, ``min_logprob`` -> ``min_confidence``. Rows
with tokens have every signal recomputed from them."""


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table, decoded."""

    run_id: int
    name: str
    dataset: str
    model: str
    prompt_set: str
    prompt_templates: dict[str, Any]
    grader: str
    signals: list[dict[str, Any]]
    cloud_model: str | None
    model_options: dict[str, Any]
    library_version: str
    started_at: str
    host: dict[str, Any]
    config: dict[str, Any]

    @property
    def score_signals(self) -> list[str]:
        """All score names of the run: built-ins then ``"<signal>.<field>"`` extras."""
        names = list(BUILTIN_SIGNALS)
        for sig in self.signals:
            names.extend(f"{sig['name']}.{f}" for f in sig.get("score_fields", []))
        return names


def _run_info(row: sqlite3.Row) -> RunInfo:
    return RunInfo(
        run_id=int(row["run_id"]),
        name=row["name"],
        dataset=row["dataset"],
        model=row["model"],
        prompt_set=row["prompt_set"],
        prompt_templates=json.loads(row["prompt_templates"]),
        grader=row["grader"],
        signals=json.loads(row["signals"]),
        cloud_model=row["cloud_model"],
        model_options=json.loads(row["model_options"]),
        library_version=row["library_version"],
        started_at=row["started_at"],
        host=json.loads(row["host"]),
        config=json.loads(row["config"]),
    )


def list_runs(db_path: str | os.PathLike[str]) -> list[RunInfo]:
    """All runs in the database, oldest first.

    Raises:
        FileNotFoundError: no such file.
        RunDatabaseError: the file is not an evaluation database (see :func:`connect`).
    """
    conn = connect(db_path, create=False)
    try:
        with database_errors(db_path, RunDatabaseError), _decoding(db_path):
            return [_run_info(r) for r in conn.execute("SELECT * FROM runs ORDER BY run_id")]
    finally:
        conn.close()


@contextlib.contextmanager
def _decoding(db_path: str | os.PathLike[str]) -> Iterator[None]:
    """A stored JSON or token field that does not decode names the file."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, zlib.error) as error:
        if isinstance(error, ConfidenceRouterError):
            raise
        path = Path(db_path)
        raise RunDatabaseError(
            f"{path}: a stored value cannot be decoded ({type(error).__name__}: {error})",
            path=path,
        ) from None


@dataclass(frozen=True)
class SignalArrays:
    """Rows usable for one signal: both a 0/1 label and a known score.

    Attributes:
        signal: the signal name.
        item_ids: ids of the used rows (file order).
        labels: local correctness ``y`` (int 0/1).
        scores: the signal's score (higher = keep local).
        cloud_labels: cloud correctness ``z`` for the same rows, or ``None`` unless every used
            row has a cloud label.
        n_excluded_errors: failure rows excluded (for every signal alike).
        n_missing: rows without a score for this signal (excluded, counted).
        missing_reasons: ``{reason: count}`` of the missing scores.
    """

    signal: str
    item_ids: tuple[str, ...]
    labels: NDArray[np.int64]
    scores: NDArray[np.float64]
    cloud_labels: NDArray[np.int64] | None
    n_excluded_errors: int
    n_missing: int
    missing_reasons: dict[str, int]


@dataclass(frozen=True)
class RunData:
    """A whole run as arrays (one entry per stored row, in ``position`` order).

    Float arrays use ``NaN`` for "no value". ``correct`` is ``NaN`` on failure rows.
    ``extras`` maps ``"<signal>.<field>"`` to a float array (numeric fields only; a missing or
    non-numeric value is ``NaN``); ``extra_values`` keeps every field's raw values (e.g.
    ``"gsa.extraction_mode"``) and the per-signal ``"<signal>.error"``.
    """

    info: RunInfo
    item_ids: tuple[str, ...]
    questions: tuple[str, ...]
    gold_answers: tuple[tuple[str, ...], ...]
    answers: tuple[str | None, ...]
    errors: tuple[str | None, ...]
    correct: NDArray[np.float64]
    token_count: NDArray[np.float64]
    mean_logprob: NDArray[np.float64]
    min_logprob: NDArray[np.float64]
    confidence: NDArray[np.float64]
    min_confidence: NDArray[np.float64]
    latency_s: NDArray[np.float64]
    signal_unknown_reason: tuple[str | None, ...]
    extras: dict[str, NDArray[np.float64]]
    extra_values: dict[str, tuple[Any, ...]]
    cloud_correct: NDArray[np.float64]
    cloud_input_tokens: NDArray[np.float64]
    cloud_output_tokens: NDArray[np.float64]
    cloud_errors: tuple[str | None, ...]
    tokens: tuple[tuple[TokenLogprob, ...] | None, ...] = ()

    @property
    def n(self) -> int:
        """Rows stored (including failures)."""
        return len(self.item_ids)

    @property
    def ok(self) -> NDArray[np.bool_]:
        """Mask of non-failure rows (a 0/1 label exists)."""
        return ~np.isnan(self.correct)

    @property
    def n_errors(self) -> int:
        """Failure rows (excluded from every metric)."""
        return int((~self.ok).sum())

    def error_counts(self) -> dict[str, int]:
        """Failure rows by kind: the error text up to the first colon after the stage prefix
        (e.g. ``"local: ResponseError"``), sorted by count then name."""
        kinds = Counter(_error_kind(e) for e in self.errors if e is not None)
        return dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def accuracy(self) -> float:
        """Local accuracy ``A_L`` over non-failure rows (``nan`` if none)."""
        ok = self.ok
        return float(self.correct[ok].mean()) if ok.any() else float("nan")

    @property
    def has_cloud(self) -> bool:
        """Whether any row has a cloud label."""
        return bool((~np.isnan(self.cloud_correct)).any())

    def token_signals(self, index: int) -> LogprobSignals | None:
        """The signals of row ``index`` recomputed from its stored tokens (``None``: no tokens)."""
        return self._token_signals[index]

    @cached_property
    def _token_signals(self) -> tuple[LogprobSignals | None, ...]:
        out: list[LogprobSignals | None] = []
        for i in range(self.n):
            tokens = self.tokens[i] if i < len(self.tokens) else None
            if tokens is None or self.errors[i] is not None:
                out.append(None)
            else:
                out.append(answer_signals(self.answers[i], tokens))
        return tuple(out)

    def score_column(self, signal: str) -> NDArray[np.float64]:
        """The raw score array of ``signal`` (``NaN`` = missing), for every stored row.

        Built-in signals are recomputed from each row's stored tokens; rows without tokens
        fall back to the signal's stored column (``mean_logprob`` and ``min_logprob`` only),
        else they are missing.
        """
        if signal in RANK_SIGNALS:
            from confidence_router.signals import rank_average

            columns = [self.score_column(name) for name in RANK_SIGNALS[signal]]
            ranked = rank_average(
                [[None if math.isnan(v) else float(v) for v in column] for column in columns]
            )
            return _floats(ranked)
        if signal in BUILTIN_SIGNALS:
            legacy = _LEGACY_COLUMNS.get(signal)
            values = np.full(self.n, np.nan)
            for i, signals in enumerate(self._token_signals):
                if signals is not None:
                    score = score_for(signals, signal)
                    values[i] = np.nan if score is None else score
                elif legacy is not None:
                    values[i] = getattr(self, legacy)[i]
            return values
        if signal in self.extras:
            return self.extras[signal]
        known = [*BUILTIN_SIGNALS, *self.extras]
        raise KeyError(f"unknown signal {signal!r} in run {self.info.name!r}; known: {known}")

    def _missing_reason(self, signal: str, index: int) -> str:
        if signal in BUILTIN_SIGNALS:
            if self.signal_unknown_reason[index]:
                return self.signal_unknown_reason[index]  # type: ignore[return-value]
            if index >= len(self.tokens) or self.tokens[index] is None:
                return "no_token_data"
            return "not computable (needs top-k alternatives)"
        name = signal.split(".", 1)[0]
        error = self.extra_values.get(f"{name}.error", ())
        if error and error[index]:
            return f"signal error: {str(error[index]).split(':', 1)[0]}"
        return "no value"

    def signal(self, signal: str) -> SignalArrays:
        """Labels and scores of the rows usable for ``signal`` (failures and missing excluded).

        Example::

            s = load_run("runs.sqlite", "wikidata__gemma3:270m-raw__few-shot-v3").signal(
                "min_logprob")
            auroc(s.labels, s.scores)
        """
        scores = self.score_column(signal)
        ok = self.ok
        has_score = ~np.isnan(scores)
        use = ok & has_score
        missing_idx = np.flatnonzero(ok & ~has_score)
        reasons = Counter(self._missing_reason(signal, int(i)) for i in missing_idx)
        cloud = self.cloud_correct[use]
        return SignalArrays(
            signal=signal,
            item_ids=tuple(self.item_ids[i] for i in np.flatnonzero(use)),
            labels=self.correct[use].astype(np.int64),
            scores=scores[use].astype(np.float64),
            cloud_labels=cloud.astype(np.int64)
            if cloud.size and not np.isnan(cloud).any()
            else None,
            n_excluded_errors=self.n_errors,
            n_missing=int(missing_idx.size),
            missing_reasons=dict(sorted(reasons.items())),
        )


def _error_kind(error: str) -> str:
    stage, _, rest = error.partition(": ")
    if not rest:
        return stage
    kind = rest.split(":", 1)[0].strip()
    return f"{stage}: {kind}"


def _floats(values: Iterable[Any]) -> NDArray[np.float64]:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _get_run_row(conn: sqlite3.Connection, run: str | int) -> sqlite3.Row:
    if isinstance(run, int) and not isinstance(run, bool):
        row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM runs WHERE name = ?", (str(run),)).fetchone()
    if row is None:
        names = [r[0] for r in conn.execute("SELECT name FROM runs ORDER BY run_id")]
        raise RunNotFoundError(f"no run {run!r} in the database; runs: {names}")
    return row


def load_run(db_path: str | os.PathLike[str], run: str | int) -> RunData:
    """Load a run (by name or id) as :class:`RunData` arrays, rows in ``position`` order.

    Raises:
        FileNotFoundError: no such file.
        RunNotFoundError: no such run (the message lists the runs).
        RunDatabaseError: the file is not an evaluation database (see :func:`connect`), or a
            stored value does not decode.
    """
    conn = connect(db_path, create=False)
    try:
        with database_errors(db_path, RunDatabaseError), _decoding(db_path):
            info = _run_info(_get_run_row(conn, run))
            rows = conn.execute(
                "SELECT * FROM results WHERE run_id = ? ORDER BY position, item_id",
                (info.run_id,),
            ).fetchall()
    finally:
        conn.close()
    with _decoding(db_path):
        return _run_data(info, rows)


def _run_data(info: RunInfo, rows: list[sqlite3.Row]) -> RunData:
    extras_raw = [json.loads(r["extras"] or "{}") for r in rows]
    field_names: dict[str, None] = {}
    declared = set(info.score_signals) - set(BUILTIN_SIGNALS)
    for sig in info.signals:  # declared signals first, in declaration order
        for f in sig.get("score_fields", []):
            field_names.setdefault(f"{sig['name']}.{f}", None)
    for ex in extras_raw:
        for name, fields in ex.items():
            for f in fields:
                field_names.setdefault(f"{name}.{f}", None)
    extra_values: dict[str, tuple[Any, ...]] = {}
    extras: dict[str, NDArray[np.float64]] = {}
    for key in field_names:
        name, f = key.split(".", 1)
        values = tuple(ex.get(name, {}).get(f) for ex in extras_raw)
        extra_values[key] = values
        numeric = [
            float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            for v in values
        ]
        if any(v is not None for v in numeric) or key in declared:
            extras[key] = _floats(numeric)
    return RunData(
        info=info,
        item_ids=tuple(r["item_id"] for r in rows),
        questions=tuple(r["question"] for r in rows),
        gold_answers=tuple(tuple(json.loads(r["gold_answers"])) for r in rows),
        answers=tuple(r["answer"] for r in rows),
        errors=tuple(r["error"] for r in rows),
        correct=_floats(r["correct"] for r in rows),
        token_count=_floats(r["token_count"] for r in rows),
        mean_logprob=_floats(r["mean_logprob"] for r in rows),
        min_logprob=_floats(r["min_logprob"] for r in rows),
        confidence=_floats(r["confidence"] for r in rows),
        min_confidence=_floats(r["min_confidence"] for r in rows),
        latency_s=_floats(r["latency_s"] for r in rows),
        signal_unknown_reason=tuple(r["signal_unknown_reason"] for r in rows),
        extras=extras,
        extra_values=extra_values,
        cloud_correct=_floats(
            r["cloud_correct"] if r["cloud_error"] is None else None for r in rows
        ),
        cloud_input_tokens=_floats(r["cloud_input_tokens"] for r in rows),
        cloud_output_tokens=_floats(r["cloud_output_tokens"] for r in rows),
        cloud_errors=tuple(r["cloud_error"] for r in rows),
        tokens=tuple(decode_tokens(r["tokens"]) for r in rows),
    )
