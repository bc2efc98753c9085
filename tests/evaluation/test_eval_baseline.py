"""The RouteLLM-style supervised baseline: separation, refusals, and a planted signal.

Embeddings come from the scripted Ollama server's deterministic hashing ``/api/embed``
through the real ``OllamaEmbeddings`` client.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from langchain_ollama import OllamaEmbeddings

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
from confidence_router.evaluation.metrics import auroc

WORDS = (
    "river",
    "mountain",
    "painter",
    "novel",
    "city",
    "battle",
    "planet",
    "song",
    "king",
    "island",
    "bridge",
    "opera",
    "desert",
    "castle",
    "poet",
    "engine",
)


def planted_rows(n: int, seed: int = 1) -> list[LabelledQuestion]:
    """Questions mentioning "zebra" are answered correctly, the others are not."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=3))
        label = int(i % 3 == 0)
        text = f"Which {words} {'zebra' if label else 'lamp'} is meant here?"
        rows.append(LabelledQuestion(f"planted:{i}", text, label))
    return rows


@pytest.fixture
def embeddings(ollama_server):
    return OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")


def test_split_is_disjoint_stratified_and_deterministic():
    rows = planted_rows(100)
    train, test = split_train_test(rows, test_fraction=0.3)
    assert not {r.item_id for r in train} & {r.item_id for r in test}
    assert len(train) + len(test) == 100
    n_pos = sum(r.label for r in rows)
    assert sum(r.label for r in test) == round(0.3 * n_pos)
    assert sum(1 - r.label for r in test) == round(0.3 * (100 - n_pos))
    assert split_train_test(rows, test_fraction=0.3) == (train, test)


def test_overlap_is_refused(embeddings):
    rows = planted_rows(90)
    train, test = split_train_test(rows)
    with pytest.raises(TrainTestOverlapError):
        assert_disjoint(train, test + train[:1])
    model = SupervisedBaseline.fit(train, embeddings)
    assert model.train_ids == frozenset(r.item_id for r in train)
    with pytest.raises(TrainTestOverlapError, match="used for training"):
        model.score_rows(test + [train[0]])  # a forced overlap
    with pytest.raises(TrainTestOverlapError):
        model.evaluate(train)
    with pytest.raises(BaselineDataError, match="duplicate"):
        split_train_test(rows + rows[:1])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (planted_rows(49), "at least 50"),
        ([LabelledQuestion(f"x:{i}", f"q {i}", 1) for i in range(60)], "both classes"),
        (
            [LabelledQuestion(f"x:{i}", f"q {i}", int(i < 3)) for i in range(60)],
            "at least 5 rows of each class",
        ),
    ],
)
def test_refuses_too_few_rows_or_one_class(rows, message, embeddings):
    with pytest.raises(BaselineDataError, match=message):
        SupervisedBaseline.fit(rows, embeddings)


def test_learns_a_planted_signal_on_held_out_rows(embeddings, ollama_backend):
    rows = planted_rows(150)
    train, test = split_train_test(rows, test_fraction=0.3)
    cache = EmbeddingCache(embeddings)
    model = SupervisedBaseline.fit(train, cache)
    assert model.cv.fold_auroc.shape == (5, 10)
    assert model.cv.mean_auroc == pytest.approx(model.cv.fold_auroc.mean())
    assert model.cv.best_c in model.cv.cs

    result = model.evaluate(test, n_resamples=200)
    assert result.auroc.estimate > 0.9
    assert result.auroc.estimate == pytest.approx(auroc(result.labels, result.scores))
    assert set(result.item_ids) == {r.item_id for r in test}
    scores = model.score(
        ["Which river city zebra is meant here?", "Which river city lamp is meant here?"]
    )
    assert scores[0] > scores[1]
    # Each distinct question went over the wire once (cached afterwards).
    embedded = [text for _, inputs in ollama_backend.embed_requests for text in inputs]
    assert len(embedded) == len(set(embedded))


def test_learning_curve_reports_both_auroc_definitions(embeddings):
    rows = planted_rows(150)
    curve = learning_curve(rows, embeddings, sizes=(25, 60, 1000))
    small, medium, too_big, full = curve
    # + the whole training pool, each question once. planted_rows(150) repeats a question
    # ("Which <3 of 16 words> ..." collide); the split keeps both copies on one side.
    pool, held = split_train_test(rows, test_fraction=0.3)
    distinct = {question_key(r.question): r for r in reversed(pool)}
    assert len(pool) + len(held) == 150 and len(distinct) == 104
    assert [p.n_train for p in curve] == [25, 60, 1000, 104]
    assert small.n_test == medium.n_test == len(held)  # the fixed held-out 30%
    for point in (small, medium):
        assert 0.5 < point.mean_cv_auroc <= 1.0  # the paper's number (CV on training rows)
        assert 0.5 < point.heldout_auroc <= 1.0  # evaluation on the held-out rows
        assert point.note == ""
    assert medium.n_train_pos == 20  # stratified: a third of 60
    assert math.isnan(too_big.mean_cv_auroc) and "only 104 training rows" in too_big.note
    assert full.note == "" and full.n_train_pos == sum(r.label for r in distinct.values())
