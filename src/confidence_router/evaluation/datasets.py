"""Question-answering evaluation sets: the offline JSONL files and Hugging Face datasets.

Known names (files in the evaluation data directory):

============  ==========================  ==========================================
name          file                        schema
============  ==========================  ==========================================
``wikidata``  ``wikidata_15000.jsonl``    ``{"prompt", "answer"}`` -- completion prompt
``triviaqa``  ``triviaqa_3000.jsonl``     ``{"context", "answer", "aliases"}``
``nq_open``   ``nq_open_dev.jsonl``       ``{"question", "answer": [...]}``
============  ==========================  ==========================================

Any other JSONL file is loaded by path with the schema detected from its first record; the
generic schema is ``{"question", "answers": [...]}`` with optional ``"id"`` and
``"prompt_style"``.

The data directory is the ``data_dir`` argument, else the environment variable
``CONFIDENCE_ROUTER_DATA_DIR``. With neither, ``wikidata`` and ``triviaqa`` are read from the
small samples shipped inside the package (:data:`SAMPLE_DATASETS`: 300 rows each, with their
attribution and licence in ``confidence_router/data/README.md``), so a plain ``pip install``
can run an evaluation; their item ids (``wikidata_sample:<line>``) never collide with the full
files'. The files are read in place, never copied.

Example::

    >>> items = load_dataset("wikidata", limit=2)                      # doctest: +SKIP
    >>> items[0]                                                       # doctest: +SKIP
    QAItem(id='wikidata_15000:1', question='The country of citizenship of Shuji Nakamura is',
           answers=('Japan',), prompt_style='completion')
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confidence_router.errors import InvalidArgumentError

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "SAMPLE_DATASETS",
    "DatasetFormatError",
    "QAItem",
    "dataset_file",
    "load_dataset",
    "load_hf_dataset",
    "question_hash_id",
    "resolve_data_dir",
]

DATA_DIR_ENV = "CONFIDENCE_ROUTER_DATA_DIR"

KNOWN_DATASETS: Mapping[str, str] = {
    "wikidata": "wikidata_15000.jsonl",
    "triviaqa": "triviaqa_3000.jsonl",
    "nq_open": "nq_open_dev.jsonl",
}
"""Known dataset names and their file names in the evaluation data directory."""

SAMPLE_DATASETS: Mapping[str, str] = {
    "wikidata": "wikidata_sample.jsonl",
    "triviaqa": "triviaqa_sample.jsonl",
}
"""Known names with a small sample shipped in the package (``confidence_router/data``)."""

PROMPT_STYLE_COMPLETION = "completion"
"""The question text is a sentence to complete ("The country of X is")."""
PROMPT_STYLE_QUESTION = "question"
"""The question text is a question to answer."""


class DatasetFormatError(InvalidArgumentError):
    """A question file cannot be loaded: the message starts with ``file:line:``.

    Raised for invalid JSON, bytes that are not UTF-8, a record that fits no schema (or not the
    schema of the file's first record), a missing, empty or wrongly typed field, no usable gold
    answer, a bad or duplicate ``id``, and a file without any record. Nothing is skipped
    silently: fix the line (or drop it) and load again.

    Attributes:
        path: the file.
        line: the 1-based physical line (``None`` when the problem is the whole file).
    """

    def __init__(self, message: str, *, path: Path, line: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


@dataclass(frozen=True)
class QAItem:
    """One evaluation question.

    Attributes:
        id: stable identifier: ``"<file stem>:<1-based line number>"`` for JSONL files (or the
            record's own ``"id"`` in the generic schema), ``"<name>:<split>:<id or index>"``
            for Hugging Face datasets.
        question: the question text, without dataset-specific scaffolding ("Question: ...",
            "Answer:"); for ``prompt_style == "completion"`` it is the sentence to complete.
        answers: accepted gold answers (canonical answer first, then aliases), stripped and
            de-duplicated exactly (case-sensitive), in source order; never empty.
        prompt_style: ``"completion"`` or ``"question"`` -- tells the caller which answer
            prompt to wrap the text in.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    prompt_style: str


# --------------------------------------------------------------------------------------------
# Data-directory resolution
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The configured evaluation data directory, or ``None`` when none is configured.

    Order: ``data_dir`` if given; else ``$CONFIDENCE_ROUTER_DATA_DIR``. A configured directory
    must exist: it is never silently replaced by the packaged samples.

    Raises:
        FileNotFoundError: the given directory (argument or variable) does not exist.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir {str(path)!r} is not a directory")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_DIR_ENV}={env!r} is not a directory")
        return path
    return None


def _package_data() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


def dataset_file(
    name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The JSONL file that :func:`load_dataset` reads for a known name or a path.

    A known name resolves in the configured data directory (:func:`resolve_data_dir`), else
    to its packaged sample (:data:`SAMPLE_DATASETS`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        FileNotFoundError: the file does not exist, or no data directory is configured for a
            name without a packaged sample (the message names ``$CONFIDENCE_ROUTER_DATA_DIR``).

    >>> dataset_file("wikidata").name                               # doctest: +SKIP
    'wikidata_sample.jsonl'
    """
    name = os.fspath(name_or_path)
    if name in KNOWN_DATASETS:
        directory = resolve_data_dir(data_dir)
        if directory is not None:
            path = directory / KNOWN_DATASETS[name]
        elif name in SAMPLE_DATASETS:
            path = _package_data() / SAMPLE_DATASETS[name]
        else:
            raise FileNotFoundError(
                f"dataset {name!r} is not shipped with the package; pass data_dir=... or set "
                f"the environment variable {DATA_DIR_ENV} to the directory holding "
                f"{KNOWN_DATASETS[name]}"
            )
    elif Path(name).is_file() or _is_path_like(name):
        path = Path(name)
    else:
        raise InvalidArgumentError(
            f"unknown dataset {name!r}; known names: {', '.join(sorted(KNOWN_DATASETS))} "
            "(or pass a path to a .jsonl file)"
        )
    if path.is_dir():
        raise InvalidArgumentError(
            f"dataset {str(path)!r} is a directory; pass a .jsonl file (or a known name with "
            "--data-dir / data_dir= for the directory)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {str(path)!r}")
    return path


# --------------------------------------------------------------------------------------------
# Record parsing (one function per schema)
# --------------------------------------------------------------------------------------------


class _RecordError(InvalidArgumentError):
    """A record does not fit its schema; the caller adds the file:line location."""


def _require_str(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} must be a string; got {type(value).__name__}")
    if not value.strip():
        raise _RecordError(f"field {key!r} is empty")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RecordError(f"field {key!r} must be a string or a list of strings")
    return value


def _dedupe_answers(answers: Iterable[str]) -> tuple[str, ...]:
    # Exact (case-sensitive) de-duplication after stripping: grading normalises anyway, and
    # keeping distinct spellings preserves the source data for other grading rules.
    seen: dict[str, None] = {}
    for a in answers:
        a = a.strip()
        if a:
            seen.setdefault(a, None)
    if not seen:
        raise _RecordError("no non-empty gold answer")
    return tuple(seen)


def _parse_wikidata(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    prompt = _require_str(record, "prompt").strip()
    return prompt, _dedupe_answers([_require_str(record, "answer")]), PROMPT_STYLE_COMPLETION


_TRIVIA_PREFIX = "Question:"
_TRIVIA_SUFFIX = "Answer:"


def _parse_triviaqa(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    # context is "Question: <q>\nAnswer:" (llm-foundry's few-shot format); strip the scaffold so
    # the project's own answer prompt can be applied. Missing scaffold parts are tolerated.
    text = _require_str(record, "context").strip()
    text = text.removeprefix(_TRIVIA_PREFIX).removesuffix(_TRIVIA_SUFFIX).strip()
    if not text:
        raise _RecordError("field 'context' holds no question text")
    aliases = _str_list(record.get("aliases", []), "aliases")
    answers = _dedupe_answers([_require_str(record, "answer"), *aliases])
    return text, answers, PROMPT_STYLE_QUESTION


def _parse_nq_open(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    question = _require_str(record, "question").strip()
    answers = _dedupe_answers(_str_list(record.get("answer"), "answer"))
    return question, answers, PROMPT_STYLE_QUESTION


def _parse_generic(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...], str]:
    question = _require_str(record, "question").strip()
    answers = _dedupe_answers(_str_list(record.get("answers"), "answers"))
    style = record.get("prompt_style", PROMPT_STYLE_QUESTION)
    if style not in (PROMPT_STYLE_QUESTION, PROMPT_STYLE_COMPLETION):
        raise _RecordError(
            f"field 'prompt_style' must be {PROMPT_STYLE_QUESTION!r} or "
            f"{PROMPT_STYLE_COMPLETION!r}; got {style!r}"
        )
    return question, answers, style


_Parser = Callable[[Mapping[str, Any]], tuple[str, tuple[str, ...], str]]

# (schema name, keys that identify it, parser); the first match wins, most specific first.
_SCHEMAS: tuple[tuple[str, frozenset[str], _Parser], ...] = (
    ("generic", frozenset({"question", "answers"}), _parse_generic),
    ("triviaqa", frozenset({"context", "answer"}), _parse_triviaqa),
    ("wikidata", frozenset({"prompt", "answer"}), _parse_wikidata),
    ("nq_open", frozenset({"question", "answer"}), _parse_nq_open),
)


def _detect_schema(record: Mapping[str, Any]) -> tuple[str, _Parser]:
    keys = set(record)
    for name, required, parser in _SCHEMAS:
        if required <= keys:
            return name, parser
    known = "; ".join(f"{n}: {sorted(k)}" for n, k, _ in _SCHEMAS)
    raise _RecordError(f"unrecognised record keys {sorted(keys)}; expected one of {known}")


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_window(limit: int | None, offset: int) -> None:
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise InvalidArgumentError(f"limit must be None or an int >= 0; got {limit!r}")
    if not _is_int(offset) or offset < 0:
        raise InvalidArgumentError(f"offset must be an int >= 0; got {offset!r}")


def _record_id(record: Mapping[str, Any]) -> str:
    value = record["id"]
    if isinstance(value, str) and value.strip():
        return value
    if _is_int(value):
        return str(value)
    raise _RecordError(f"field 'id' must be a non-empty string or an integer; got {value!r}")


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` per physical line: UTF-8 with an optional BOM, any line ending.

    Lines are decoded one by one so that a byte that is not UTF-8 is reported with its line.
    """
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a BOM written by Windows editors; not part of the record
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                utf16 = lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff"))
                raise DatasetFormatError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}"
                    + ("; the file looks like UTF-16" if utf16 else "")
                    + "); save the file as UTF-8",
                    path=path,
                    line=lineno,
                ) from None
            yield lineno, text


def _iter_jsonl(path: Path) -> Iterator[QAItem]:
    """Yield items in file order; the schema is fixed by the first non-blank record."""
    parser: _Parser | None = None
    schema = ""
    seen_ids: dict[str, int] = {}
    n_records = 0
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue  # blank lines carry no record; line numbers stay physical
        n_records += 1
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if n_records == 1 and line.lstrip().startswith("["):
                hint = (
                    "; the file looks like one JSON array, expected JSON Lines (one object "
                    "per line)"
                )
            raise DatasetFormatError(
                f"{where}: invalid JSON ({exc.msg}){hint}", path=path, line=lineno
            ) from None
        try:
            if not isinstance(record, dict):
                raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
            if parser is None:
                schema, parser = _detect_schema(record)
            else:
                # Every record must fit the schema of the first: a mixed file is malformed.
                _, required, _ = next(s for s in _SCHEMAS if s[0] == schema)
                if not required <= set(record):
                    raise _RecordError(
                        f"record does not match the file's {schema!r} schema "
                        f"(needs keys {sorted(required)}, has {sorted(record)})"
                    )
            question, answers, style = parser(record)
            item_id = f"{path.stem}:{lineno}"
            if schema == "generic" and "id" in record:
                item_id = _record_id(record)
            if item_id in seen_ids:
                raise _RecordError(
                    f"duplicate id {item_id!r} (first on line {seen_ids[item_id]})"
                )
            seen_ids[item_id] = lineno
        except _RecordError as exc:
            raise DatasetFormatError(f"{where}: {exc}", path=path, line=lineno) from None
        yield QAItem(id=item_id, question=question, answers=answers, prompt_style=style)
    if n_records == 0:
        raise DatasetFormatError(
            f"{path}: no records (the file is empty or holds only blank lines)",
            path=path,
            line=None,
        )


def _is_path_like(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or os.sep in name or "/" in name


def load_dataset(
    name_or_path: str | os.PathLike[str],
    limit: int | None = None,
    offset: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> list[QAItem]:
    """Load a QA evaluation set by known name or from a JSONL path.

    Args:
        name_or_path: one of :data:`KNOWN_DATASETS` (``"wikidata"``, ``"triviaqa"``,
            ``"nq_open"``), resolved by :func:`dataset_file` (the data directory, else the
            packaged sample); or a path to a JSONL file in any supported schema (detected
            from its first record).
        limit: at most this many items (``None`` = all).
        offset: skip this many items first (records, not physical lines).
        data_dir: the evaluation data directory, for known names (see
            :func:`resolve_data_dir`).

    Returns:
        Items in file order (deterministic), ``items[offset : offset + limit]``. Records after
        the window are not read, so a malformed line beyond it is not reported.

    Raises:
        DatasetFormatError: a malformed line (the message starts with ``file:line``; see the
            class for every case) or a file without records. A UTF-8 BOM and CRLF line
            endings are accepted.
        InvalidArgumentError: a bad ``limit``/``offset``.
        InvalidArgumentError: unknown name (the message lists the known ones).
        FileNotFoundError: the file or the data directory does not exist.

    Example::

        >>> train = load_dataset("triviaqa", limit=100)                   # doctest: +SKIP
        >>> test = load_dataset("triviaqa", offset=100, limit=500)        # doctest: +SKIP
    """
    _check_window(limit, offset)
    path = dataset_file(name_or_path, data_dir)
    items: list[QAItem] = []
    if limit == 0:
        return items
    for index, item in enumerate(_iter_jsonl(path)):
        if index < offset:
            continue
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def _hf_row_to_item(row: Mapping[str, Any], index: int, prefix: str) -> QAItem:
    """Map a Hugging Face row (TriviaQA, NQ-open or generic layout) to a :class:`QAItem`."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _RecordError("row has no string 'question' field")
    answer = row.get("answer")
    if isinstance(answer, Mapping):
        # trivia_qa (rc / rc.nocontext): answer = {"value": ..., "aliases": [...], ...}
        raw = [answer.get("value", ""), *(answer.get("aliases") or [])]
        answers = _dedupe_answers(a for a in raw if isinstance(a, str))
    elif "answers" in row:
        answers = _dedupe_answers(_str_list(row["answers"], "answers"))
    else:
        # nq_open: answer = [str, ...]
        answers = _dedupe_answers(_str_list(answer, "answer"))
    row_id = row.get("question_id", row.get("id"))
    suffix = str(row_id) if row_id not in (None, "") else str(index)
    return QAItem(
        id=f"{prefix}:{suffix}",
        question=question.strip(),
        answers=answers,
        prompt_style=PROMPT_STYLE_QUESTION,
    )


def load_hf_dataset(
    name: str,
    split: str = "validation",
    limit: int | None = None,
    *,
    config: str | None = None,
) -> list[QAItem]:
    """Load a QA set from the Hugging Face Hub via the ``datasets`` library (needs network).

    Supported layouts: TriviaQA (``load_hf_dataset("mandarjoshi/trivia_qa", config=
    "rc.nocontext")`` -- answer dict with ``value`` and ``aliases``), NQ-open
    (``"google-research-datasets/nq_open"`` -- ``answer`` list) and generic ``question`` +
    ``answers`` rows. Ids are ``"<name>:<split>:<question_id | id | row index>"``; rows keep
    the dataset's order.

    Raises:
        ImportError: ``datasets`` is not installed (with install advice).
        ValueError: a row fits none of the layouts (message names the row index).

    Example::

        >>> items = load_hf_dataset("google-research-datasets/nq_open", limit=10)  # doctest: +SKIP
    """
    _check_window(limit, 0)
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise ImportError(
            "load_hf_dataset needs the Hugging Face 'datasets' package: pip install datasets "
            "(or use load_dataset() with the offline JSONL files)"
        ) from exc
    ds = hf_datasets.load_dataset(name, config, split=split)
    prefix = f"{name}:{split}"
    items: list[QAItem] = []
    for index, row in enumerate(ds):
        if limit is not None and len(items) >= limit:
            break
        try:
            items.append(_hf_row_to_item(row, index, prefix))
        except _RecordError as exc:
            raise InvalidArgumentError(f"{prefix} row {index}: {exc}") from None
    return items


def question_hash_id(question: str) -> str:
    """A content-derived id (first 16 hex digits of SHA-256 of the stripped question).

    Useful to join rows across files or runs where line numbers differ.
    """
    return hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:16]
