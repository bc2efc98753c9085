"""Attack round on the supervised baseline: a question repeated under another id (or with
other case, spacing or punctuation) must never be trained on and evaluated; fits are
deterministic; too little data is a clear typed error.

Embeddings come from the scripted Ollama server's deterministic ``/api/embed`` through the
real ``OllamaEmbeddings`` client.
"""

from __future__ import annotations

import numpy as np
import pytest
from langchain_ollama import OllamaEmbeddings

from confidence_router.errors import InvalidArgumentError
from confidence_router.evaluation.baseline import (
    BaselineDataError,
    EmbeddingCache,
    LabelledQuestion,
    SupervisedBaseline,
    TrainTestOverlapError,
    assert_disjoint,
    learning_curve,
    question_key,
    split_train_test,
)

WORDS = ("river", "mountain", "painter", "novel", "city", "battle", "planet", "song", "king",
         "island", "bridge", "opera", "desert", "castle", "poet", "engine")  # fmt: skip


def _variant(text: str, k: int) -> str:
    """The same question as a person would type it again: case, spacing, punctuation."""
    return [text, text.upper(), f"  {text.replace(' ', '   ')} ", text.rstrip("?") + " ?!"][k % 4]


def duplicated_rows(n_questions: int, copies: int = 2, seed: int = 5) -> list[LabelledQuestion]:
    """Each question ``copies`` times under different ids; labels random but equal per question."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_questions):
        words = " ".join(rng.choice(WORDS, size=4))
        text = f"Which {words} number {q} is meant?"
        label = int(rng.integers(0, 2))
        rows += [LabelledQuestion(f"dup:{q}:{c}", _variant(text, c), label) for c in range(copies)]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


@pytest.fixture
def embeddings(ollama_server):
    return OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")


def test_question_key_ignores_case_spacing_punctuation():
    base = "Who wrote Hamlet?"
    assert {question_key(_variant(base, k)) for k in range(4)} == {question_key(base)}
    assert question_key("Who wrote Hamlet?") != question_key("Who wrote Macbeth?")


@pytest.mark.parametrize("seed", range(8))
def test_split_never_puts_one_question_on_both_sides(seed):
    # Found: the split was by item id only; with each question twice, about half of the
    # held-out questions were also training questions (e.g. 13 of 30 at seed 0).
    rows = duplicated_rows(100)
    train, test = split_train_test(rows, test_fraction=0.3, seed=seed)
    train_q = {question_key(r.question) for r in train}
    test_q = {question_key(r.question) for r in test}
    assert not train_q & test_q
    assert len(train) + len(test) == len(rows) and test
    assert_disjoint(train, test)  # agrees


def test_split_without_repeats_is_unchanged_and_deterministic():
    rows = [LabelledQuestion(f"q{i}", f"distinct question {i}", i % 2) for i in range(10)]
    train, test = split_train_test(rows, test_fraction=0.4)
    # The documented example (unchanged by grouping when there is nothing to group).
    assert (len(train), len(test), sorted(r.label for r in test)) == (6, 4, [0, 0, 1, 1])
    assert split_train_test(rows, test_fraction=0.4) == (train, test)
    assert split_train_test(list(reversed(rows)), test_fraction=0.4, seed=43) == \
        split_train_test(list(reversed(rows)), test_fraction=0.4, seed=43)


def test_assert_disjoint_refuses_a_repeated_question_under_another_id():
    train = [LabelledQuestion("a:1", "Who wrote Hamlet?", 1)]
    test = [LabelledQuestion("b:7", "who wrote   HAMLET", 0)]
    with pytest.raises(TrainTestOverlapError, match="another id"):
        assert_disjoint(train, test)


def test_fit_trains_each_question_once_and_refuses_it_at_evaluation(embeddings):
    rows = duplicated_rows(60)
    model = SupervisedBaseline.fit(rows, embeddings)
    assert (model.n_train, model.n_duplicates) == (60, 60)
    assert model.train_ids == frozenset(r.item_id for r in rows)
    probe = LabelledQuestion("elsewhere:1", rows[0].question.upper(), rows[0].label)
    # Found: score_rows checked item ids only, so this row was scored as "held out".
    with pytest.raises(TrainTestOverlapError, match="another id"):
        model.score_rows([probe])
    with pytest.raises(TrainTestOverlapError):
        model.evaluate([probe])
    fresh = LabelledQuestion("elsewhere:2", "A question nobody trained on?", 1)
    assert model.unseen([probe, fresh]) == [fresh]
    assert model.score_rows([fresh]).shape == (1,)


def test_repeated_questions_do_not_leak_across_cv_folds(embeddings):
    # Labels are pure noise. Found: with each question three times, StratifiedKFold put copies
    # of a validation question into the training folds, and the weakly regularised fits
    # memorised them: mean fold AUROC at the best C was 0.95+ on noise.
    rows = duplicated_rows(60, copies=3, seed=11)
    model = SupervisedBaseline.fit(rows, embeddings)
    assert model.cv.best_c_auroc < 0.8
    assert model.n_train == 60


def test_fit_is_deterministic_for_a_seed(embeddings):
    rows = duplicated_rows(70, copies=1, seed=2)
    cache = EmbeddingCache(embeddings)
    a = SupervisedBaseline.fit(rows, cache, seed=7)
    b = SupervisedBaseline.fit(rows, cache, seed=7)
    np.testing.assert_array_equal(a.cv.fold_auroc, b.cv.fold_auroc)
    np.testing.assert_array_equal(a.classifier.coef_, b.classifier.coef_)
    c1 = learning_curve(rows, cache, sizes=(25, 40), seed=3)
    c2 = learning_curve(rows, cache, sizes=(25, 40), seed=3)
    assert c1 == c2


def test_too_few_distinct_questions_is_a_clear_error(embeddings):
    # 60 rows, but only 30 distinct questions: below the 50-row minimum.
    rows = duplicated_rows(30)
    with pytest.raises(BaselineDataError, match="at least 50 labelled rows .*got 30"):
        SupervisedBaseline.fit(rows, embeddings)
    one_class = [LabelledQuestion(f"o:{i}", f"only class question {i}", 1) for i in range(60)]
    with pytest.raises(BaselineDataError, match="both classes"):
        SupervisedBaseline.fit(one_class, embeddings)
    with pytest.raises(BaselineDataError, match="duplicate item ids"):
        SupervisedBaseline.fit(one_class + one_class[:1], embeddings)


@pytest.mark.parametrize(
    ("label", "question"), [(2, "q?"), (0.5, "q?"), (1.0, "q?"), ("1", "q?"), (1, "   ")]
)
def test_labelled_question_validates(label, question):
    with pytest.raises(InvalidArgumentError):
        LabelledQuestion("x", question, label)
    assert LabelledQuestion("x", "q?", True).label == 1  # bools count as 1/0, as in metrics


def test_learning_curve_with_given_test_rows_refuses_repeated_questions(embeddings):
    rows = duplicated_rows(40, copies=1)
    test = [LabelledQuestion("t:1", rows[0].question.lower(), rows[0].label)]
    with pytest.raises(TrainTestOverlapError):
        learning_curve(rows, embeddings, sizes=(25,), test_rows=test)
