"""Correctness grading for open-domain QA answers.

The default rule (:func:`is_correct`) is the usual SQuAD-style normalised match described in
``data/README.md``: normalise both strings, then an answer is correct when a normalised gold
answer (or alias) equals, or is contained in, the normalised prediction -- on whole words.

All graders share one signature, :class:`Grader`::

    grader(question, prediction, gold_answers) -> bool

so a rule-based grader and an LLM judge are interchangeable in the evaluation harness. The
rule-based ones ignore ``question``.

Example::

    >>> is_correct("It is the city of Rome.", ["Rome", "Roma"])
    True
    >>> is_correct("Romeo", ["Rome"])       # whole words only
    False
    >>> match_grader("Capital of Italy?", "rome", ["Rome"])
    True
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Any, Protocol

from confidence_router.errors import InvalidArgumentError
from confidence_router.extraction import message_text as _message_text

__all__ = [
    "Grader",
    "JudgeParseError",
    "is_correct",
    "llm_judge_grader",
    "match_grader",
    "normalize_answer",
    "substring_grader",
    "substring_match",
]


class Grader(Protocol):
    """``grader(question, prediction, gold_answers) -> bool`` (True = prediction is correct)."""

    def __call__(self, question: str, prediction: str, gold_answers: Sequence[str], /) -> bool:
        """Return True iff ``prediction`` answers ``question`` correctly given ``gold_answers``."""
        ...


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punctuation(ch: str) -> bool:
    # string.punctuation (SQuAD's set) covers ASCII only, and includes symbols such as $ + < = >
    # ^ ` | ~; Unicode punctuation (categories P*: curly quotes, dashes, guillemets, ...) is
    # removed too so that typographic variants of the same answer normalise identically.
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Normalise an answer string for matching (SQuAD-style, plus accent folding).

    Steps, in order:

    1. ``str.casefold()`` (lower-casing that also maps e.g. "ß" to "ss").
    2. Unicode NFKD decomposition, then removal of combining marks: accents are **folded**
       ("Zürich" -> "zurich", "São Paulo" -> "sao paulo"); compatibility characters are
       unfolded too (full-width letters, ligatures such as "ﬁ", superscripts "²" -> "2").
    3. Punctuation is **deleted** (not replaced by a space), as in SQuAD: ASCII
       ``string.punctuation`` plus every Unicode punctuation character. So "U.S." -> "us" and
       "dik-dik" -> "dikdik" -- consistently on both sides of a comparison.
    4. The whole words "a", "an", "the" are removed.
    5. Runs of whitespace collapse to one space; leading/trailing whitespace is dropped.

    Example::

        >>> normalize_answer("  The Eiffel-Tower, Paris!  ")
        'eiffeltower paris'
        >>> normalize_answer("São Paulo")
        'sao paulo'
    """
    text = text.casefold()
    text = "".join(
        ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)
    )
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_answer_list(gold_answers: Sequence[str] | str) -> Sequence[str]:
    # A bare string is a Sequence[str] too; iterating it would grade against single characters
    # (and "a" normalises to nothing, but "x" would match any word "x"). Treat it as one answer.
    if isinstance(gold_answers, str):
        return (gold_answers,)
    return gold_answers


def _contains_words(haystack: list[str], needle: list[str]) -> bool:
    """True iff ``needle`` occurs as a contiguous run of whole tokens in ``haystack``."""
    m = len(needle)
    return any(haystack[i : i + m] == needle for i in range(len(haystack) - m + 1))


def is_correct(prediction: str, gold_answers: Sequence[str] | str) -> bool:
    """Normalised whole-word match of a prediction against gold answers.

    Rule: let ``P`` be the token list of ``normalize_answer(prediction)`` (split on spaces) and
    ``G`` that of ``normalize_answer(g)`` for each gold answer ``g``. The prediction is correct
    iff some non-empty ``G`` occurs in ``P`` as a **contiguous run of whole tokens** (equality is
    the special case ``G == P``). Token boundaries matter: gold "rome" is not found in
    "romeo", nor "new york" in "new yorker".

    * A gold answer that normalises to the empty string (e.g. "The", "!") never matches.
    * An empty prediction (after normalisation) is never correct.
    * A single string passed as ``gold_answers`` is treated as one answer.

    Example::

        >>> is_correct("I think it's The Beatles", ["Beatles"])
        True
        >>> is_correct("New Yorker", ["New York"])
        False
    """
    pred_tokens = normalize_answer(prediction).split()
    if not pred_tokens:
        return False
    for gold in _as_answer_list(gold_answers):
        gold_tokens = normalize_answer(gold).split()
        if gold_tokens and _contains_words(pred_tokens, gold_tokens):
            return True
    return False


def substring_match(prediction: str, gold_answers: Sequence[str] | str) -> bool:
    """The paper's TriviaQA rule (docs/how-it-works.md §5.1), for reproducing its numbers.

    Correct iff some ``gold.strip().lower()`` is a raw **substring** of ``prediction.lower()``:
    no punctuation/article normalisation and no word boundaries (so "rome" *is* found in
    "romeo"). Empty gold strings never match. Prefer :func:`is_correct` for new results, and
    say in reports which rule was used.

    Example::

        >>> substring_match("Romeo", ["Rome"])
        True
    """
    pred = prediction.lower()
    for gold in _as_answer_list(gold_answers):
        g = gold.strip().lower()
        if g and g in pred:
            return True
    return False


def match_grader(question: str, prediction: str, gold_answers: Sequence[str]) -> bool:
    """:class:`Grader` form of :func:`is_correct` (``question`` is ignored)."""
    del question  # part of the shared Grader signature; the rule does not need it
    return is_correct(prediction, gold_answers)


def substring_grader(question: str, prediction: str, gold_answers: Sequence[str]) -> bool:
    """:class:`Grader` form of :func:`substring_match` (``question`` is ignored)."""
    del question
    return substring_match(prediction, gold_answers)


class JudgeParseError(InvalidArgumentError):
    """The LLM judge replied with neither YES nor NO.

    Raised rather than guessing, so that the harness can exclude the row as a failure and count
    it (docs/how-it-works.md §5.1) instead of silently labelling it wrong.
    """


JUDGE_PROMPT_TEMPLATE = (
    "You are grading an answer to a question. Decide whether the model answer is correct, "
    "i.e. whether it gives the same answer as one of the accepted answers (wording, spelling "
    "and extra detail may differ; a different or hedged-between-several answer is wrong).\n\n"
    "Question: {question}\n"
    "Accepted answers: {gold_answers}\n"
    "Model answer: {prediction}\n\n"
    "Reply with exactly one word: YES or NO."
)
"""Default judge prompt; placeholders ``{question}``, ``{gold_answers}``, ``{prediction}``."""


def _parse_yes_no(reply: str) -> bool:
    words = re.findall(r"[A-Za-z]+", reply)
    first = words[0].upper() if words else ""
    if first == "YES":
        return True
    if first == "NO":
        return False
    raise JudgeParseError(f"LLM judge reply is neither YES nor NO: {reply[:200]!r}")


def llm_judge_grader(
    chat_model: Any,
    *,
    prompt_template: str = JUDGE_PROMPT_TEMPLATE,
    match_first: bool = False,
) -> Grader:
    """Build a :class:`Grader` that asks a LangChain chat model a YES/NO question.

    The judge sees one user message (no system prompt) built from ``prompt_template`` with the
    question, the accepted answers (joined with ``" | "``) and the prediction; the first word
    of its reply decides (``YES`` -> True, ``NO`` -> False, case-insensitive). Anything else
    raises :class:`JudgeParseError`. An empty (whitespace-only) prediction is graded False
    without a call, as in :func:`is_correct`. Configure the model for determinism yourself
    (temperature 0, a few output tokens), e.g. ``ChatBedrockConverse(model=...,
    temperature=0, max_tokens=4)``.

    Args:
        chat_model: any object with LangChain's ``invoke(messages)`` returning a message
            (``langchain_core`` is imported only when the grader is first called).
        prompt_template: ``str.format`` template with ``{question}``, ``{gold_answers}`` and
            ``{prediction}``.
        match_first: if True, return True without calling the judge when :func:`is_correct`
            already matches (saves judge calls; the judge then only rules on non-matches).

    Example::

        >>> from langchain_core.language_models.fake_chat_models import FakeListChatModel
        >>> grade = llm_judge_grader(FakeListChatModel(responses=["YES"]))
        >>> grade("Capital of Italy?", "It's Rome.", ["Rome"])
        True
    """
    for field in ("{question}", "{gold_answers}", "{prediction}"):
        if field not in prompt_template:
            raise InvalidArgumentError(f"prompt_template must contain the placeholder {field}")

    def grade(question: str, prediction: str, gold_answers: Sequence[str]) -> bool:
        answers = _as_answer_list(gold_answers)
        if match_first and is_correct(prediction, answers):
            return True
        if not prediction.strip():
            return False  # nothing to judge; consistent with is_correct
        try:
            from langchain_core.messages import HumanMessage
        except ImportError as exc:  # pragma: no cover - langchain-core is a core dependency
            raise ImportError(
                "llm_judge_grader needs langchain-core: pip install 'langchain-core>=1.0'"
            ) from exc
        text = prompt_template.format(
            question=question,
            gold_answers=" | ".join(answers),
            prediction=prediction,
        )
        reply = chat_model.invoke([HumanMessage(content=text)])
        return _parse_yes_no(_message_text(reply))

    return grade
