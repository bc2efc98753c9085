"""GSA: the YES/NO self-assessment probe (prompt construction and P(YES) extraction).

Pure Python, no framework imports: this module only builds prompt strings and turns the
probe's first-token top logprobs (or its text) into a score. The LangChain wrapper that
actually calls a model is :class:`confidence_router.probe.SelfAssessmentProbe`; the store
that produces retrieval hits is :class:`confidence_router.knowledge.KnowledgeStore`.

Two prompt versions (docs/how-it-works.md §2.3), both kept **byte for byte** as in the paper:

* ``gsa-v2-confidence`` — always the bare prompt :data:`GSA_V2_PROMPT_TEMPLATE`.
* ``gsa-v3-retrieval-conditional`` (default) — shows retrieved knowledge only when at least
  one hit is *strong* (numeric score ``>= tau``, inclusive, ``tau = 0.70`` by default), and is
  otherwise **byte-identical** to the v2 prompt, so the model cannot tell "nothing strong was
  found" from "retrieval never ran" (absence language primes the model toward NO).

and the same two in a cache-friendly order, for local models with a prompt-prefix cache:

* ``gsa-v2-question-last`` / ``gsa-v3-question-last`` — the same sentences, but the
  instruction comes first and the question last (:data:`GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE`,
  :data:`GSA_V3_QUESTION_LAST_PROMPT_TEMPLATE`), with nothing after it. Every probe prompt
  then starts with the same constant text (:data:`GSA_QUESTION_LAST_HEAD`, ending in a
  newline), which a prefix cache evaluates once; only the question is new per request.
  Injected knowledge goes between that head and the question, so it never changes the cached
  head, and without a strong hit v3 is again byte-identical to its v2. The paper's order is
  the default; the measured AUROC of both orders on the embedded model is in the README.

Usage::

    from confidence_router.gsa import Hit, build_gsa_prompt, extract_p_yes

    hits = [Hit(content="Paris.", score=0.91, question="What is the capital of France?"),
            Hit(content="Lyon is ...", score=0.55)]
    prompt = build_gsa_prompt("  Capital of France?  ", hits)
    assert prompt.had_retrieval and prompt.n_hits_used == 1

    # top logprobs of the FIRST generated position, highest first
    ext = extract_p_yes([{"token": "YES", "logprob": -0.1}, {"token": "NO", "logprob": -3.0}],
                        "YES")
    assert ext.extraction_mode == "logprob_softmax" and round(ext.p_yes, 4) == 0.9478

**Injected knowledge is data, not instructions.** The paper's v3 prompt delimits each
injected memory only by its numbered ``{i}. (memory of: {Q})`` header and the three-space
indentation of its content, under the heading "Here is what you recall from your knowledge
base:". Those exact bytes are the method (changing them changes the measured AUROC), so they
are the default. Stronger quoting — every content line prefixed with ``   > `` — is available
as the opt-in ``quote_hits=True``; it changes the prompt bytes and is therefore recorded as a
distinct version (:data:`QUOTED_SUFFIX` appended). Without a strong hit both variants emit the
exact v2 bytes.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from confidence_router.errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "DEFAULT_GSA_VERSION",
    "DEFAULT_TAU",
    "GSA_QUESTION_LAST_HEAD",
    "GSA_V2_PROMPT_TEMPLATE",
    "GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE",
    "GSA_V2_QUESTION_LAST_VERSION",
    "GSA_V2_VERSION",
    "GSA_V3_PROMPT_TEMPLATE",
    "GSA_V3_QUESTION_LAST_PROMPT_TEMPLATE",
    "GSA_V3_QUESTION_LAST_VERSION",
    "GSA_V3_VERSION",
    "GSA_VERSIONS",
    "MAX_HITS_USED",
    "MISSING_SIDE_LOGPROB",
    "NO_TOKENS",
    "QUOTED_SUFFIX",
    "RETRIEVAL_CONDITIONAL_VERSIONS",
    "YES_TOKENS",
    "ExtractionMode",
    "GsaExtraction",
    "GsaExtractionWarning",
    "GsaPrompt",
    "GsaScore",
    "GsaVersion",
    "Hit",
    "build_gsa_prompt",
    "build_hits_block",
    "check_query",
    "check_tau",
    "extract_p_yes",
    "is_strong_hit",
    "parse_yes_no_text",
]

logger = logging.getLogger(__name__)

GSA_V2_VERSION = "gsa-v2-confidence"
GSA_V3_VERSION = "gsa-v3-retrieval-conditional"
GSA_V2_QUESTION_LAST_VERSION = "gsa-v2-question-last"
GSA_V3_QUESTION_LAST_VERSION = "gsa-v3-question-last"
DEFAULT_GSA_VERSION = GSA_V3_VERSION
GSA_VERSIONS: tuple[str, ...] = (
    GSA_V3_VERSION, GSA_V2_VERSION, GSA_V3_QUESTION_LAST_VERSION, GSA_V2_QUESTION_LAST_VERSION
)
#: The versions that show strong retrieval hits (the others ignore hits).
RETRIEVAL_CONDITIONAL_VERSIONS: frozenset[str] = frozenset(
    {GSA_V3_VERSION, GSA_V3_QUESTION_LAST_VERSION}
)
GsaVersion = Literal[
    "gsa-v3-retrieval-conditional",
    "gsa-v2-confidence",
    "gsa-v3-question-last",
    "gsa-v2-question-last",
]

#: Appended to the version string when the opt-in ``quote_hits=True`` rendering is used.
QUOTED_SUFFIX = "+quoted"

#: Strong-hit threshold τ (inclusive). Embedder-specific: calibrated on bge-large-en-v1.5.
DEFAULT_TAU = 0.70
#: The paper passes the top-5 hits; at most this many strong hits are injected.
MAX_HITS_USED = 5
#: Logprob assigned to a YES/NO side that is absent from the top-k list.
MISSING_SIDE_LOGPROB = -20.0

# Exact prompt bytes from the paper (docs/how-it-works.md §2.3). Do not reformat these strings:
# the v3 fallback must equal the v2 prompt byte for byte, and both are part of the method.
GSA_V2_PROMPT_TEMPLATE = (
    "The user has asked the following question:\n{query}\n\n"
    "Are you confident you can answer this question correctly? "
    "Respond with exactly one token: YES or NO."
)
GSA_V3_PROMPT_TEMPLATE = (
    "The user has asked the following question:\n{query}\n\n"
    "Here is what you recall from your knowledge base:\n{hits_block}\n\n"
    "Are you confident you can answer this question correctly? "
    "Respond with exactly one token: YES or NO."
)

# The cache-friendly order (not from the paper; its own versions): the paper's sentences with
# the instruction first and the question last. Do not reformat these strings either: the v3
# fallback must equal the v2 prompt byte for byte, and every probe must start with the head.
#: The constant start of every question-last probe prompt (ends with a newline, where a
#: line-aligned prefix cache can stop reusing).
GSA_QUESTION_LAST_HEAD = (
    "Are you confident you can answer the question below correctly? "
    "Respond with exactly one token: YES or NO.\n\n"
)
GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE = (
    GSA_QUESTION_LAST_HEAD + "The user has asked the following question:\n{query}"
)
GSA_V3_QUESTION_LAST_PROMPT_TEMPLATE = (
    GSA_QUESTION_LAST_HEAD
    + "Here is what you recall from your knowledge base:\n{hits_block}\n\n"
    "The user has asked the following question:\n{query}"
)

# version: (the bare prompt, the prompt with knowledge or None if the version ignores hits)
_TEMPLATES: dict[str, tuple[str, str | None]] = {
    GSA_V2_VERSION: (GSA_V2_PROMPT_TEMPLATE, None),
    GSA_V3_VERSION: (GSA_V2_PROMPT_TEMPLATE, GSA_V3_PROMPT_TEMPLATE),
    GSA_V2_QUESTION_LAST_VERSION: (GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE, None),
    GSA_V3_QUESTION_LAST_VERSION: (
        GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE, GSA_V3_QUESTION_LAST_PROMPT_TEMPLATE
    ),
}

# Truncation limits of the hits block (docs/how-it-works.md §2.3).
_QUESTION_MAX_CHARS = 120
_CONTENT_MAX_CHARS = 400

#: Pass-1 candidates: exact token strings (with and without a leading space).
YES_TOKENS: frozenset[str] = frozenset(
    v for base in ("YES", "Yes", "yes", "Y", "y") for v in (base, " " + base)
)
NO_TOKENS: frozenset[str] = frozenset(
    v for base in ("NO", "No", "no", "N", "n") for v in (base, " " + base)
)
# Pass-2 canonical forms after ``token.strip().upper()``.
_YES_CANONICAL = frozenset({"YES", "Y"})
_NO_CANONICAL = frozenset({"NO", "N"})

# text_hard: characters stripped from both ends after whitespace (the backtick included).
_EDGE_CHARS = ".,;:!?)('\"`"

ExtractionMode = Literal["logprob_softmax", "text_hard", "neutral"]


class GsaExtractionWarning(UserWarning):
    """Emitted when a probe answer could not be read (``extraction_mode == "neutral"``)."""


# --------------------------------------------------------------------------------------------
# Prompt construction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One retrieval hit, as produced by a knowledge store search.

    Attributes:
        content: The stored knowledge (in the paper: the cloud model's verbatim answer).
        score: Raw cosine similarity to the query (not clamped), or ``None`` when the source
            gives no score. A hit without a numeric score is never strong.
        question: The stored question the entry was keyed on, if any. Rendered as
            ``(memory of: ...)`` in the v3 prompt.
        id: Optional store id of the entry.
        metadata: Optional extra data (source, timestamps, ...). Excluded from equality and
            hashing so that hits stay hashable.
    """

    content: str
    score: float | None
    question: str | None = None
    id: str | None = None
    metadata: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class GsaPrompt:
    """A rendered probe prompt.

    Attributes:
        text: The exact user-message text to send (one user message, no system prompt).
        version: The prompt version requested (``gsa-v3-retrieval-conditional`` even when the
            v3 prompt fell back to the bare bytes; ``had_retrieval`` tells them apart).
        had_retrieval: ``True`` iff knowledge was injected (at least one strong hit).
        n_hits_used: Number of injected hits, ``0..MAX_HITS_USED``.
    """

    text: str
    version: str
    had_retrieval: bool
    n_hits_used: int


def is_strong_hit(hit: Hit, tau: float = DEFAULT_TAU) -> bool:
    """Return ``True`` iff ``hit`` has a numeric score and ``score >= tau`` (inclusive).

    ``None``, booleans, strings and NaN scores are never strong, and neither is a hit with no
    knowledge to show (content that is not a string, or whose first 400 characters, the
    part that is rendered, are only whitespace): injecting it would render a numbered header
    over nothing.
    """
    # What would be shown (the first 400 characters, stripped) must not be empty: 400
    # spaces of padding before the text once rendered an empty block too.
    if not isinstance(hit.content, str) or not hit.content[:_CONTENT_MAX_CHARS].strip():
        return False
    score = hit.score
    # bool is an int subclass; a True "score" is a bug upstream, not a similarity of 1.0.
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        return False
    return float(score) >= tau  # NaN >= tau is False, which is what we want


def _render_hit(index: int, hit: Hit, *, quote: bool) -> str:
    # Order matters (docs/how-it-works.md §2.3): content is cut to 400 chars THEN stripped; the question is
    # stripped THEN cut to 120 chars.
    content = hit.content[:_CONTENT_MAX_CHARS].strip()
    question = hit.question.strip()[:_QUESTION_MAX_CHARS] if hit.question is not None else ""
    if quote:
        # The hardened rendering: no injected text may start a line of its own. splitlines()
        # also breaks on \r, \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, which a model may
        # read as line breaks; the stored question (user text, learned from escalations)
        # goes into the header on one line.
        content = "\n".join("   > " + line for line in content.splitlines())
        question = " ".join(hit.question.split())[:_QUESTION_MAX_CHARS] if hit.question else ""
    if question:
        if quote:
            return f"{index}. (memory of: {question})\n{content}"
        return f"{index}. (memory of: {question})\n   {content}"
    if quote:
        return f"{index}.\n{content}"
    return f"{index}. {content}"


def build_hits_block(hits: Sequence[Hit], *, quote: bool = False) -> str:
    """Render hits (already filtered to the strong ones) as the v3 ``{hits_block}``.

    For the i-th hit (1-based), lines joined by a single ``\\n``:

    * with a stored question: ``"{i}. (memory of: {Q})\\n   {C}"``;
    * without one (``None`` or blank): ``"{i}. {C}"``.

    ``quote=True`` is the opt-in, non-paper rendering in which every content line (split at
    any line boundary, ``str.splitlines``) is prefixed with ``"   > "`` and the question's
    whitespace, line breaks included, is collapsed to single spaces.
    """
    return "\n".join(_render_hit(i, hit, quote=quote) for i, hit in enumerate(hits, start=1))


def check_query(query: Any) -> str:
    """Validate a probe question; return it stripped (the form every prompt uses).

    Raises:
        InvalidTypeError: ``query`` is not a string.
        InvalidArgumentError: ``query`` is empty or whitespace, or cannot be sent as UTF-8
            (a lone surrogate, e.g. from a badly decoded file): it would fail inside the HTTP
            client after the knowledge search already ran.
    """
    if not isinstance(query, str):
        raise InvalidTypeError(f"query must be a str, got {type(query).__name__}")
    stripped = query.strip()
    if not stripped:
        raise InvalidArgumentError("query must be a non-empty, non-whitespace string")
    try:
        stripped.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"query cannot be encoded as UTF-8 ({exc.reason} at position {exc.start})"
        ) from exc
    return stripped


def check_tau(tau: Any) -> float:
    """Validate a strong-hit threshold: a finite number in ``[-1, 1]`` (a cosine similarity).

    A τ outside that range can never (or always) be met, which would silently switch the
    knowledge off (or on for every hit) - e.g. ``tau=70`` meant as a percentage.
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau):
        raise InvalidArgumentError(f"tau must be a finite number, got {tau!r}")
    if not -1.0 <= float(tau) <= 1.0:
        raise InvalidArgumentError(
            f"tau must be a cosine similarity in [-1, 1], got {tau!r}"
        )
    return float(tau)


def build_gsa_prompt(
    query: str,
    hits: Iterable[Hit] = (),
    *,
    version: str = DEFAULT_GSA_VERSION,
    tau: float = DEFAULT_TAU,
    max_hits: int = MAX_HITS_USED,
    quote_hits: bool = False,
) -> GsaPrompt:
    """Build the self-assessment prompt for ``query``.

    Args:
        query: The user question (for MCQ benchmarks: the stem only). It is stripped.
        hits: Retrieval hits in retrieval order (best first), normally the unfiltered top-5.
            Ignored by ``gsa-v2-confidence``.
        version: ``"gsa-v3-retrieval-conditional"`` (default), ``"gsa-v2-confidence"``,
            or their question-last forms ``"gsa-v3-question-last"`` and
            ``"gsa-v2-question-last"`` (see the module docstring).
        tau: Strong-hit threshold (inclusive). Embedder-specific; recalibrate per embedder.
        max_hits: Cap on injected strong hits (the paper: 5).
        quote_hits: Opt-in stronger delimiting of injected content (changes the bytes; the
            returned version gets :data:`QUOTED_SUFFIX`). Default ``False`` = paper bytes.

    Returns:
        A :class:`GsaPrompt`. With no strong hit the text is exactly the bare (v2) prompt of
        the same order.

    Raises:
        InvalidArgumentError: empty/whitespace ``query`` (or one that cannot be encoded as
            UTF-8), unknown ``version``, ``tau`` not a finite number in ``[-1, 1]`` or
            ``max_hits < 1`` (a ``ValueError``).
        InvalidTypeError: ``query`` is not a string (a ``TypeError``).

    >>> p = build_gsa_prompt("Q?", [Hit("A", 0.69)])
    >>> p.text == build_gsa_prompt("Q?", version="gsa-v2-confidence").text
    True
    """
    stripped = check_query(query)
    if version not in GSA_VERSIONS:
        raise InvalidArgumentError(
            f"unknown GSA version {version!r}; expected one of {GSA_VERSIONS}"
        )
    tau = check_tau(tau)
    if isinstance(max_hits, bool) or not isinstance(max_hits, int) or max_hits < 1:
        raise InvalidArgumentError(f"max_hits must be a positive integer, got {max_hits!r}")

    bare_template, knowledge_template = _TEMPLATES[version]
    if knowledge_template is not None:
        if isinstance(hits, (str, bytes, Mapping)):
            raise InvalidTypeError(f"hits must be an iterable of Hit, got {type(hits).__name__}")
        hits = list(hits)
        for index, hit in enumerate(hits):
            if not isinstance(hit, Hit):
                raise InvalidTypeError(f"hits[{index}] must be a Hit, got {type(hit).__name__}")
        strong = [hit for hit in hits if is_strong_hit(hit, tau)][:max_hits]
    else:
        strong = []  # v2 ignores hits by definition

    reported_version = version
    if quote_hits and knowledge_template is not None:
        reported_version = version + QUOTED_SUFFIX
    if not strong or knowledge_template is None:
        # "Never reveal retrieval absence": exactly the v2 bytes, no placeholder text.
        text = bare_template.format(query=stripped)
        return GsaPrompt(text=text, version=reported_version, had_retrieval=False, n_hits_used=0)
    # str.format does not re-interpret braces inside substituted values, so queries or
    # contents containing "{...}" are safe.
    text = knowledge_template.format(
        query=stripped, hits_block=build_hits_block(strong, quote=quote_hits)
    )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # The query was checked: a strong hit carries the unsendable character. Refuse the
        # whole prompt rather than send a half-built one or drop the hit silently.
        raise InvalidArgumentError(
            f"a strong knowledge hit cannot be encoded as UTF-8 ({exc.reason}); "
            "the probe prompt was not built"
        ) from exc
    return GsaPrompt(
        text=text, version=reported_version, had_retrieval=True, n_hits_used=len(strong)
    )


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GsaExtraction:
    """P(YES) read from one probe answer.

    Attributes:
        p_yes: Probability of YES in ``[0, 1]``; higher = the local model is more likely right.
        yes_logprob: Raw logprob of the YES token found in the top list, or ``None``.
        no_logprob: Raw logprob of the NO token found in the top list, or ``None``.
        extraction_mode: ``"logprob_softmax"``, ``"text_hard"`` or ``"neutral"``.
        recognized: ``False`` only for ``"neutral"`` (the answer could not be read).
    """

    p_yes: float
    yes_logprob: float | None
    no_logprob: float | None
    extraction_mode: ExtractionMode
    recognized: bool

    def __post_init__(self) -> None:
        _check_probability(self.p_yes)


def _check_probability(p_yes: Any) -> None:
    """P(YES) is a probability: a real number in ``[0, 1]`` (never NaN). A router compares it
    with a threshold, and NaN compares False with everything (it would read as confident)."""
    if (
        isinstance(p_yes, bool)
        or not isinstance(p_yes, numbers.Real)
        or not 0.0 <= float(p_yes) <= 1.0
    ):
        raise InvalidArgumentError(f"p_yes must be a probability in [0, 1], got {p_yes!r}")


def _raw_pair(item: Any) -> tuple[Any, Any] | None:
    """``(token, logprob)`` as given by a pydantic object, a mapping or a 2-sequence."""
    if isinstance(item, Mapping):
        return item.get("token"), item.get("logprob")
    if hasattr(item, "token") and hasattr(item, "logprob"):
        # ollama._types.TokenLogprob and similar objects
        return item.token, item.logprob
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
        return item[0], item[1]
    return None


def _unreadable_side(item: Any) -> str | None:
    """``"yes"`` / ``"no"`` for an item that names a YES / NO candidate but whose logprob
    cannot be read (NaN, +inf, missing, not a number); ``None`` otherwise."""
    pair = _raw_pair(item)
    if pair is None or not isinstance(pair[0], str):
        return None
    token = pair[0]
    if token in YES_TOKENS or token.strip().upper() in _YES_CANONICAL:
        return "yes"
    if token in NO_TOKENS or token.strip().upper() in _NO_CANONICAL:
        return "no"
    return None


def _token_and_logprob(item: Any) -> tuple[str, float] | None:
    """Read ``(token, logprob)`` from a pydantic object, a mapping or a 2-sequence."""
    pair = _raw_pair(item)
    if pair is None:
        return None
    token, logprob = pair
    if not isinstance(token, str):
        return None
    if isinstance(logprob, bool) or not isinstance(logprob, numbers.Real):
        return None
    value = float(logprob)
    if math.isnan(value) or value == math.inf:
        return None  # not a log-probability; -inf (probability 0) is legitimate
    return token, value


def _lookup(
    items: Sequence[tuple[str, float]], exact: frozenset[str], canonical: frozenset[str]
) -> float | None:
    # Pass 1: the first item (list order) that is exactly a candidate.
    for token, logprob in items:
        if token in exact:
            return logprob
    # Pass 2: the first item whose stripped, upper-cased form is a candidate. Python's
    # str.strip() does not strip the SentencePiece marker "▁", so "▁YES" never matches.
    for token, logprob in items:
        if token.strip().upper() in canonical:
            return logprob
    return None


def _softmax_yes(yes: float, no: float) -> float | None:
    """Two-way softmax P(YES), stable (max subtracted), clamped; ``None`` if undefined."""
    top = max(yes, no)
    if top == -math.inf:
        return None  # both sides have probability 0: no information
    e_yes = math.exp(yes - top)
    e_no = math.exp(no - top)
    return min(1.0, max(0.0, e_yes / (e_yes + e_no)))


def parse_yes_no_text(text: str | None) -> float | None:
    """The ``text_hard`` rule: 1.0 for YES, 0.0 for NO, ``None`` when unparseable.

    Strip whitespace, then the edge characters ``. , ; : ! ? ) ( ' "`` and backtick, then
    upper-case. First word in {YES, Y} → 1.0, in {NO, N} → 0.0; otherwise a prefix test:
    starts with ``YES`` or ``Y `` → 1.0, with ``NO`` or ``N `` → 0.0.

    Known consequences (kept for fidelity): "Nope" and "NONE" read as NO, "Yesterday" as YES,
    and markdown "**YES**" is unparseable.
    """
    if not isinstance(text, str):
        return None
    cleaned = text.strip().strip(_EDGE_CHARS).upper()
    words = cleaned.split()
    if words:
        if words[0] in _YES_CANONICAL:
            return 1.0
        if words[0] in _NO_CANONICAL:
            return 0.0
    if cleaned.startswith(("YES", "Y ")):
        return 1.0
    if cleaned.startswith(("NO", "N ")):
        return 0.0
    return None


def extract_p_yes(
    top_logprobs_first_position: Iterable[Any] | None,
    text: str | None,
) -> GsaExtraction:
    """Turn a probe answer into P(YES) with the paper's three-tier extraction.

    Args:
        top_logprobs_first_position: The top-k alternatives of the **first generated
            position**, in backend order (highest first). Items may be objects with
            ``.token``/``.logprob`` (e.g. ``ollama`` ``TokenLogprob``), mappings with
            ``"token"``/``"logprob"`` keys, or ``(token, logprob)`` pairs. ``None`` or empty
            means "no logprobs".
        text: The generated text, used by the ``text_hard`` tier.

    Tiers:
        1. ``logprob_softmax``: at least one side found in the list (pass 1: exact
           candidate; pass 2: ``token.strip().upper()`` in {YES, Y} / {NO, N}; the first match
           wins, variants are not summed). A missing side gets ``-20.0``; a side listed only
           with an unreadable logprob (NaN, +inf, none) is not missing, so this tier is
           skipped. Stable two-way softmax, clamped to ``[0, 1]``.
        2. ``text_hard``: :func:`parse_yes_no_text` on ``text``.
        3. ``neutral``: ``p_yes = 0.5``, ``recognized = False`` and a
           :class:`GsaExtractionWarning`.

    >>> round(extract_p_yes([("YES", -0.1), ("NO", -3.0)], "YES").p_yes, 4)
    0.9478
    """
    items: list[tuple[str, float]] = []
    unreadable: set[str] = set()
    if top_logprobs_first_position is not None:
        for raw in top_logprobs_first_position:
            parsed = _token_and_logprob(raw)
            if parsed is not None:
                items.append(parsed)
            else:
                side = _unreadable_side(raw)
                if side is not None:
                    unreadable.add(side)

    yes_lp = _lookup(items, YES_TOKENS, _YES_CANONICAL) if items else None
    no_lp = _lookup(items, NO_TOKENS, _NO_CANONICAL) if items else None
    # A side listed with an unreadable logprob is not missing from the top-k: giving it the
    # missing side's -20 would read a NaN YES as a certain NO (and escalate at once).
    garbled = (yes_lp is None and "yes" in unreadable) or (no_lp is None and "no" in unreadable)
    if (yes_lp is not None or no_lp is not None) and not garbled:
        p = _softmax_yes(
            MISSING_SIDE_LOGPROB if yes_lp is None else yes_lp,
            MISSING_SIDE_LOGPROB if no_lp is None else no_lp,
        )
        if p is not None:
            return GsaExtraction(
                p_yes=p,
                yes_logprob=yes_lp,
                no_logprob=no_lp,
                extraction_mode="logprob_softmax",
                recognized=True,
            )

    hard = parse_yes_no_text(text)
    if hard is not None:
        return GsaExtraction(
            p_yes=hard,
            yes_logprob=yes_lp,
            no_logprob=no_lp,
            extraction_mode="text_hard",
            recognized=True,
        )

    # Not silent (docs/how-it-works.md §2.2): the neutral 0.5 once hid a total extraction failure.
    message = (
        f"GSA probe answer could not be read as YES/NO (text={text!r}, "
        f"{len(items)} top logprobs); using neutral p_yes=0.5"
    )
    logger.warning(message)
    warnings.warn(message, GsaExtractionWarning, stacklevel=2)
    return GsaExtraction(
        p_yes=0.5,
        yes_logprob=yes_lp,
        no_logprob=no_lp,
        extraction_mode="neutral",
        recognized=False,
    )


# --------------------------------------------------------------------------------------------
# Combined record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GsaScore:
    """Everything recorded for one probe call (docs/how-it-works.md §2.3: score, tier, raw text, prompt info).

    ``p_yes`` is the confidence score: higher = the local answer is more likely correct.
    ``latency_s`` is the client-side wall time of the model call; ``retrieval_latency_s`` the
    wall time of the knowledge-store search (``None`` when no search ran).
    """

    p_yes: float
    extraction_mode: ExtractionMode
    recognized: bool
    yes_logprob: float | None
    no_logprob: float | None
    raw_text: str
    prompt_version: str
    had_retrieval: bool
    n_hits_used: int
    latency_s: float
    prompt: str = ""
    tau: float = DEFAULT_TAU
    retrieval_latency_s: float | None = None
    n_hits_retrieved: int = 0

    def __post_init__(self) -> None:
        _check_probability(self.p_yes)

    @classmethod
    def from_parts(
        cls,
        prompt: GsaPrompt,
        extraction: GsaExtraction,
        *,
        raw_text: str,
        latency_s: float,
        tau: float = DEFAULT_TAU,
        retrieval_latency_s: float | None = None,
        n_hits_retrieved: int = 0,
    ) -> GsaScore:
        """Combine a rendered prompt and an extraction into one record."""
        return cls(
            p_yes=extraction.p_yes,
            extraction_mode=extraction.extraction_mode,
            recognized=extraction.recognized,
            yes_logprob=extraction.yes_logprob,
            no_logprob=extraction.no_logprob,
            raw_text=raw_text,
            prompt_version=prompt.version,
            had_retrieval=prompt.had_retrieval,
            n_hits_used=prompt.n_hits_used,
            latency_s=latency_s,
            prompt=prompt.text,
            tau=tau,
            retrieval_latency_s=retrieval_latency_s,
            n_hits_retrieved=n_hits_retrieved,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for logs and result files)."""
        return asdict(self)
