"""Tests for confidence_router.evaluation.grading."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from confidence_router.evaluation.grading import (
    Grader,
    JudgeParseError,
    is_correct,
    llm_judge_grader,
    match_grader,
    normalize_answer,
    substring_grader,
    substring_match,
)

# ----------------------------------------------------------------------------------------------
# normalize_answer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  The  Eiffel   Tower ", "eiffel tower"),  # article dropped, whitespace collapsed
        ("A cat and an owl", "cat and owl"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("Anne", "anne"),  # "an" only as a whole word
        ("U.S.A.", "usa"),  # punctuation deleted, not replaced by a space (SQuAD)
        ("dik-dik", "dikdik"),
        ("Rock 'n' Roll!", "rock n roll"),
        ("“Quoted” — text…", "quoted text"),  # Unicode punctuation removed too
        ("$100 + tax", "100 tax"),  # ASCII symbols in string.punctuation
        ("Zürich", "zurich"),  # accents folded (NFKD + drop combining marks)
        ("São Paulo", "sao paulo"),
        ("Ångström", "angstrom"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # casefold
        ("ﬁnal", "final"),  # NFKD compatibility ligature
        ("ＰＡＲＩＳ", "paris"),  # full-width letters
        ("the", ""),
        ("", ""),
        ("\t\n", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_articles_after_punctuation_removal() -> None:
    # "the." -> "the" -> removed; punctuation goes first, as in SQuAD.
    assert normalize_answer("The. Beatles") == "beatles"


# ----------------------------------------------------------------------------------------------
# is_correct
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Rome", ["Rome"], True),  # equality
        ("rome.", ["Rome"], True),  # case and punctuation
        ("The answer is Rome, Italy", ["Rome"], True),  # containment on whole words
        ("Romeo", ["Rome"], False),  # NOT raw substring containment
        ("Romeo and Juliet", ["Rome"], False),
        ("New Yorker", ["New York"], False),
        ("in New York City", ["New York"], True),  # multi-word gold, contiguous
        ("York New", ["New York"], False),  # order matters
        ("Beatles", ["The Beatles"], True),  # article removed from gold
        ("the beatles", ["Beatles"], True),
        ("Onion", ["Allium cepa", "Onion"], True),  # any alias
        ("Allium cepa", ["Onion", "Allium cepa"], True),
        ("Zurich", ["Zürich"], True),  # accents folded on both sides
        ("Zürich", ["Zurich"], True),
        ("USA", ["U.S.A."], True),
        ("14 December 1972", ["December 1972"], True),
        ("1972", ["December 1972"], False),  # prediction must contain the whole gold
        ("", ["Rome"], False),  # empty prediction never correct
        ("...", ["..."], False),  # both normalise to empty
        ("the", ["The"], False),
        ("Rome", [], False),
        ("Rome", ["", "the", "Rome"], True),  # empty golds skipped, others still count
        ("anything", ["", "the"], False),  # empty gold never matches
    ],
)
def test_is_correct(prediction: str, gold: list[str], expected: bool) -> None:
    assert is_correct(prediction, gold) is expected


def test_is_correct_single_string_gold_is_one_answer() -> None:
    # Iterating "Rome" char by char would make "r" etc. separate answers; a str is one answer.
    assert is_correct("Rome", "Rome")
    assert not is_correct("r o m e", "Rome")


def test_substring_match_is_the_papers_raw_rule() -> None:
    assert substring_match("Romeo", ["Rome"])  # raw substring: matches, unlike is_correct
    assert substring_match("THE ROME", ["  rome "])  # lower-cased and stripped alias
    assert not substring_match("U.S.A.", ["USA"])  # no punctuation normalisation
    assert not substring_match("Rome", ["", "  "])  # empty alias never matches


# ----------------------------------------------------------------------------------------------
# Grader protocol and the LLM judge
# ----------------------------------------------------------------------------------------------


def test_rule_graders_follow_the_grader_signature() -> None:
    graders: list[Grader] = [match_grader, substring_grader]
    for grade in graders:
        assert grade("Capital of Italy?", "Rome", ["Rome"]) is True
        assert grade("Capital of Italy?", "Paris", ["Rome"]) is False


class _RecordingModel:
    """Minimal stand-in for a LangChain chat model: records messages, replies from a script."""

    def __init__(self, replies: Sequence[Any]) -> None:
        self.replies = list(replies)
        self.calls: list[list[Any]] = []

    def invoke(self, messages: list[Any]) -> Any:
        self.calls.append(messages)
        return self.replies.pop(0)


class _Msg:
    def __init__(self, content: Any) -> None:
        self.content = content


def test_llm_judge_prompt_and_yes_no_parsing() -> None:
    model = _RecordingModel([_Msg("YES"), _Msg(" no."), _Msg("Yes, it is correct")])
    grade = llm_judge_grader(model)
    assert grade("Capital of Italy?", "It is Rome", ["Rome", "Roma"]) is True
    assert grade("Capital of Italy?", "Milan", ["Rome"]) is False
    assert grade("Capital of Italy?", "Rome", "Rome") is True
    (message,) = model.calls[0]  # one user message, no system prompt
    assert type(message).__name__ == "HumanMessage"
    assert "Question: Capital of Italy?" in message.content
    assert "Accepted answers: Rome | Roma" in message.content
    assert "Model answer: It is Rome" in message.content
    assert "YES or NO" in message.content


def test_llm_judge_content_blocks() -> None:
    model = _RecordingModel([_Msg([{"type": "text", "text": "NO"}])])
    assert llm_judge_grader(model)("q", "a", ["b"]) is False


def test_llm_judge_unparseable_reply_raises() -> None:
    grade = llm_judge_grader(_RecordingModel([_Msg("Maybe")]))
    with pytest.raises(JudgeParseError, match="Maybe"):
        grade("q", "a", ["b"])


def test_llm_judge_match_first_and_empty_prediction_skip_the_call() -> None:
    model = _RecordingModel([])
    grade = llm_judge_grader(model, match_first=True)
    assert grade("q", "Rome!", ["Rome"]) is True
    assert grade("q", "   ", ["Rome"]) is False
    assert model.calls == []


def test_llm_judge_custom_template_validation() -> None:
    with pytest.raises(ValueError, match="{prediction}"):
        llm_judge_grader(_RecordingModel([]), prompt_template="{question} {gold_answers}")


def test_llm_judge_with_langchain_fake_model() -> None:
    fake = pytest.importorskip("langchain_core.language_models.fake_chat_models")
    grade = llm_judge_grader(fake.FakeListChatModel(responses=["NO", "YES"]))
    assert grade("Who wrote Hamlet?", "Marlowe", ["Shakespeare"]) is False
    assert grade("Who wrote Hamlet?", "Shakespeare", ["William Shakespeare"]) is True
