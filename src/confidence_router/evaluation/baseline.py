"""The RouteLLM-style supervised baseline: logistic regression on query embeddings.

The paper's comparison point (docs/how-it-works.md §4): an L2 logistic regression on the embedding of
the question alone predicts whether the **local** answer is correct (cloud correctness is
ignored). Hyper-parameters as in the paper: 5-fold stratified CV over 10 values of ``C``
(``np.logspace(-4, 4, 10)``), ROC-AUC scoring, ``max_iter=2000``, seed 43; at least 50 rows
and both classes. The score is ``P(correct)`` -- "higher = keep local", like every signal.

Usage::

    from langchain_ollama import OllamaEmbeddings
    from confidence_router.evaluation.baseline import (
        LabelledQuestion, SupervisedBaseline, learning_curve, split_train_test,
    )

    rows = [LabelledQuestion(item_id, question, label) for ...]   # from an evaluation run
    train, test = split_train_test(rows, test_fraction=0.3)      # disjoint by item id
    emb = OllamaEmbeddings(base_url=server.url, model="gemma3:270m")
    baseline = SupervisedBaseline.fit(train, emb)
    p_correct = baseline.score(["What is the capital of France?"])
    held_out = baseline.evaluate(test)          # AUROC + bootstrap CI, refuses train ids
    curve = learning_curve(rows, emb)           # mean CV AUROC and held-out AUROC per N

**Train/test separation is explicit**, by item id *and* by question text (normalised with
:func:`question_key`: case, accents, punctuation, articles and spacing ignored), so a question
that a file holds twice under two ids can never be trained on and evaluated:
:func:`split_train_test` keeps all rows of a question on one side,
:meth:`SupervisedBaseline.fit` trains on each question once (the first row; later duplicates
are dropped and counted, so they cannot leak across the CV folds either), and
:meth:`SupervisedBaseline.score_rows` / :meth:`SupervisedBaseline.evaluate` raise
:class:`TrainTestOverlapError` for a row whose id or question was used for training
(:meth:`SupervisedBaseline.unseen` filters such rows out instead).

The CV loop is written out (``StratifiedKFold`` + ``LogisticRegression`` per ``C``) rather than
delegated to ``LogisticRegressionCV``: it is the same procedure (pick the ``C`` with the best mean
fold AUROC, refit on all training rows), but it keeps the full fold-by-C AUROC grid, whose mean
is the paper's learning-curve number, and does not depend on that class's changing API.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confidence_router.errors import InvalidArgumentError, InvalidTypeError
from confidence_router.evaluation.grading import normalize_answer
from confidence_router.evaluation.metrics import BootstrapResult, auroc, bootstrap_ci

__all__ = [
    "DEFAULT_CS",
    "DEFAULT_SEED",
    "MIN_TRAIN_ROWS",
    "BaselineDataError",
    "BaselineEvaluation",
    "CrossValidation",
    "EmbeddingCache",
    "LabelledQuestion",
    "LearningCurvePoint",
    "SupervisedBaseline",
    "TrainTestOverlapError",
    "assert_disjoint",
    "learning_curve",
    "question_key",
    "split_train_test",
]

DEFAULT_CS: NDArray[np.float64] = np.logspace(-4, 4, 10)
"""The paper's grid of inverse regularisation strengths."""
DEFAULT_SEED = 43
"""The paper's seed for the baseline (fold shuffling and sub-sampling here)."""
MIN_TRAIN_ROWS = 50
"""The paper refuses to train on fewer rows."""
N_FOLDS = 5
MAX_ITER = 2000


class BaselineDataError(InvalidArgumentError):
    """The training rows cannot train the baseline (too few rows, one class, ...)."""


class TrainTestOverlapError(InvalidArgumentError):
    """An item id appears both in the training rows and in the rows being evaluated."""


@dataclass(frozen=True)
class LabelledQuestion:
    """One labelled training/evaluation row.

    Attributes:
        item_id: the dataset item id (train/test disjointness is checked on it).
        question: the text that is embedded (the question alone, never the answer).
        label: 1 if the local answer was correct, else 0.
    """

    item_id: str
    question: str
    label: int

    def __post_init__(self) -> None:
        if isinstance(self.label, bool):
            object.__setattr__(self, "label", int(self.label))  # as the metrics take them
        if not isinstance(self.label, int) or self.label not in (0, 1):
            raise InvalidArgumentError(
                f"label must be 0 or 1; got {self.label!r} for {self.item_id!r}"
            )
        if not isinstance(self.question, str) or not self.question.strip():
            raise InvalidArgumentError(f"question of {self.item_id!r} must be non-empty text")


def question_key(question: str) -> str:
    """The form under which two questions count as the same one for train/test separation.

    :func:`~confidence_router.evaluation.grading.normalize_answer` (case folded, accents
    folded, punctuation and the articles a/an/the removed, spacing collapsed); a question that
    normalises to nothing keeps its stripped text.

    >>> question_key("Who wrote  'Hamlet'?") == question_key("who wrote hamlet")
    True
    """
    return normalize_answer(question) or question.strip()


def assert_disjoint(train: Iterable[LabelledQuestion], test: Iterable[LabelledQuestion]) -> None:
    """Raise :class:`TrainTestOverlapError` if the two row sets share an item id or a question
    (compared by :func:`question_key`)."""
    train = list(train)
    test = list(test)
    train_ids = {r.item_id for r in train}
    shared = sorted(train_ids.intersection(r.item_id for r in test))
    if shared:
        raise TrainTestOverlapError(
            f"{len(shared)} item id(s) are in both the training and the evaluation rows, "
            f"e.g. {shared[:5]}; evaluate only on held-out rows"
        )
    train_keys = {question_key(r.question) for r in train}
    same = [r.item_id for r in test if question_key(r.question) in train_keys]
    if same:
        raise TrainTestOverlapError(
            f"{len(same)} evaluation row(s) repeat a training question under another id, "
            f"e.g. {same[:5]}; evaluate only on held-out questions"
        )


def _check_unique_ids(rows: Sequence[LabelledQuestion], what: str) -> None:
    seen: set[str] = set()
    dupes = []
    for r in rows:
        if r.item_id in seen:
            dupes.append(r.item_id)
        seen.add(r.item_id)
    if dupes:
        raise BaselineDataError(f"duplicate item ids in the {what} rows: {dupes[:5]}")


def split_train_test(
    rows: Sequence[LabelledQuestion], *, test_fraction: float = 0.3, seed: int = DEFAULT_SEED
) -> tuple[list[LabelledQuestion], list[LabelledQuestion]]:
    """Stratified random split into training and held-out rows, disjoint by item id and by
    question.

    Rows are grouped by :func:`question_key`; each group is represented by its first row (and
    its label). The representatives of each class are shuffled with
    ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction * n_class)`` go to
    the test part **with every row of their group**; both parts keep the input order.
    Deterministic for a given input order and seed; without repeated questions every group is
    one row and this is a plain stratified row split.

    Raises:
        BaselineDataError: duplicate item ids, or ``test_fraction`` outside ``(0, 1)``.

    Example::

        >>> rows = [LabelledQuestion(f"q{i}", f"question {i}", i % 2) for i in range(10)]
        >>> train, test = split_train_test(rows, test_fraction=0.4)
        >>> len(train), len(test), sorted(r.label for r in test)
        (6, 4, [0, 0, 1, 1])
    """
    if not 0.0 < test_fraction < 1.0:
        raise BaselineDataError(f"test_fraction must be in (0, 1); got {test_fraction}")
    rows = list(rows)
    _check_unique_ids(rows, "input")
    keys = [question_key(r.question) for r in rows]
    first_of: dict[str, int] = {}
    for i, key in enumerate(keys):
        first_of.setdefault(key, i)
    representatives = set(first_of.values())
    rng = np.random.default_rng(seed)
    test_groups: set[str] = set()
    for label in (0, 1):
        idx = np.array(
            [i for i, r in enumerate(rows) if r.label == label and i in representatives],
            dtype=np.int64,
        )
        rng.shuffle(idx)
        test_groups.update(keys[int(i)] for i in idx[: round(test_fraction * idx.size)])
    train = [r for r, key in zip(rows, keys) if key not in test_groups]
    test = [r for r, key in zip(rows, keys) if key in test_groups]
    assert_disjoint(train, test)  # by construction; kept as an executable guarantee
    return train, test


class EmbeddingCache:
    """Embeds texts through any LangChain ``Embeddings`` once, in batches, and caches them.

    Example::

        >>> class Fake:
        ...     def embed_documents(self, texts): return [[float(len(t)), 1.0] for t in texts]
        >>> cache = EmbeddingCache(Fake())
        >>> cache.embed(["ab", "abc", "ab"]).tolist()
        [[2.0, 1.0], [3.0, 1.0], [2.0, 1.0]]
    """

    def __init__(self, embeddings: Any, *, batch_size: int = 64) -> None:
        if isinstance(embeddings, EmbeddingCache):
            raise InvalidTypeError("wrap a LangChain Embeddings, not another EmbeddingCache")
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1; got {batch_size}")
        self.embeddings = embeddings
        self.batch_size = batch_size
        self._cache: dict[str, NDArray[np.float64]] = {}

    def embed(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """An ``(n, d)`` float array, one row per text (duplicates embedded once)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            vectors = self.embeddings.embed_documents(batch)
            if len(vectors) != len(batch):
                raise InvalidArgumentError(
                    f"the embeddings returned {len(vectors)} vectors for {len(batch)} texts"
                )
            for text, vector in zip(batch, vectors):
                self._cache[text] = np.asarray(vector, dtype=np.float64)
        if not texts:
            return np.zeros((0, 0), dtype=np.float64)
        matrix = np.vstack([self._cache[t] for t in texts])
        if not np.isfinite(matrix).all():
            raise InvalidArgumentError("the embeddings contain NaN or infinite values")
        return matrix


def _as_cache(embeddings: Any) -> EmbeddingCache:
    return embeddings if isinstance(embeddings, EmbeddingCache) else EmbeddingCache(embeddings)


@dataclass(frozen=True)
class CrossValidation:
    """The CV grid of one fit.

    Attributes:
        cs: the C values tried.
        fold_auroc: ``(n_folds, n_cs)`` validation-fold AUROC.
        mean_auroc: the mean over **all folds and all C values** -- the paper's learning-curve
            number (docs/how-it-works.md §4), not an evaluation-set AUROC.
        best_c: the C with the highest mean fold AUROC (the refit model uses it).
        best_c_auroc: mean fold AUROC at ``best_c`` (optimistically biased: C was chosen on it).
    """

    cs: tuple[float, ...]
    fold_auroc: NDArray[np.float64]
    mean_auroc: float
    best_c: float
    best_c_auroc: float


def _cross_validate(
    x: NDArray[np.float64], y: NDArray[np.int64], cs: Sequence[float], seed: int
) -> CrossValidation:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    grid = np.full((N_FOLDS, len(cs)), np.nan)
    for f, (train_idx, val_idx) in enumerate(folds.split(x, y)):
        for c_index, c in enumerate(cs):
            clf = _classifier(float(c), seed)
            _fit_quietly(clf, x[train_idx], y[train_idx])
            grid[f, c_index] = auroc(y[val_idx], clf.predict_proba(x[val_idx])[:, 1])
    means = grid.mean(axis=0)
    best = int(np.argmax(means))  # first maximum on ties: the strongest regularisation
    return CrossValidation(
        cs=tuple(float(c) for c in cs),
        fold_auroc=grid,
        mean_auroc=float(grid.mean()),
        best_c=float(cs[best]),
        best_c_auroc=float(means[best]),
    )


def _classifier(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    # L2 is LogisticRegression's default penalty; not passing ``penalty`` keeps this working
    # across scikit-learn versions (it is deprecated from 1.8 in favour of l1_ratio).
    return LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)


def _fit_quietly(clf: Any, x: NDArray[np.float64], y: NDArray[np.int64]) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these problems are tiny, and a multi-threaded BLAS spends 10-20x the
    # work synchronising (measured: 100 ms vs 5 ms per lbfgs fit on a 2-core machine).
    with threadpool_limits(limits=1), warnings.catch_warnings():
        # Extreme C values may stop at max_iter on hard data; the fit is still usable and the
        # paper's setup (max_iter 2000) accepted the same.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        clf.fit(x, y)


def _dedupe_questions(rows: Sequence[LabelledQuestion]) -> list[LabelledQuestion]:
    """The first row of each question (:func:`question_key`), in input order."""
    seen: set[str] = set()
    out = []
    for r in rows:
        key = question_key(r.question)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _check_training_rows(rows: Sequence[LabelledQuestion], min_rows: int) -> None:
    n = len(rows)
    n_pos = sum(r.label for r in rows)
    n_neg = n - n_pos
    if n < min_rows:
        raise BaselineDataError(
            f"the supervised baseline needs at least {min_rows} labelled rows (distinct "
            f"questions); got {n}"
        )
    if n_pos == 0 or n_neg == 0:
        raise BaselineDataError(
            f"the supervised baseline needs both classes; got {n_pos} correct and "
            f"{n_neg} incorrect rows"
        )
    if min(n_pos, n_neg) < N_FOLDS:
        raise BaselineDataError(
            f"{N_FOLDS}-fold stratified CV needs at least {N_FOLDS} rows of each class; got "
            f"{n_pos} correct and {n_neg} incorrect"
        )


@dataclass(frozen=True)
class BaselineEvaluation:
    """AUROC of the baseline on evaluation rows, with a bootstrap CI."""

    n: int
    n_pos: int
    auroc: BootstrapResult
    scores: NDArray[np.float64]
    labels: NDArray[np.int64]
    item_ids: tuple[str, ...]


class SupervisedBaseline:
    """A fitted baseline: ``score(questions) -> P(correct)``. Create it with :meth:`fit`.

    Attributes:
        cv: the cross-validation grid (:class:`CrossValidation`).
        train_ids: the item ids of the rows given for training, duplicates included
            (evaluation rows must avoid them).
        train_questions: the :func:`question_key` of every training question (evaluation
            rows must avoid them too).
        n_train, n_train_pos: training rows (distinct questions) and correct ones among them.
        n_duplicates: rows dropped because their question was already in the training rows.
    """

    def __init__(
        self,
        classifier: Any,
        embedder: EmbeddingCache,
        *,
        train_ids: frozenset[str],
        cv: CrossValidation,
        n_train: int,
        n_train_pos: int,
        train_questions: frozenset[str] = frozenset(),
        n_duplicates: int = 0,
    ) -> None:
        self.classifier = classifier
        self.embedder = embedder
        self.train_ids = train_ids
        self.train_questions = train_questions
        self.cv = cv
        self.n_train = n_train
        self.n_train_pos = n_train_pos
        self.n_duplicates = n_duplicates

    @classmethod
    def fit(
        cls,
        rows: Sequence[LabelledQuestion],
        embeddings: Any,
        *,
        cs: Sequence[float] = tuple(DEFAULT_CS),
        seed: int = DEFAULT_SEED,
        min_rows: int = MIN_TRAIN_ROWS,
    ) -> SupervisedBaseline:
        """Cross-validate ``C`` and fit on all ``rows``.

        Args:
            rows: the labelled training rows (unique item ids).
            embeddings: a LangChain ``Embeddings`` (``embed_documents``) or an
                :class:`EmbeddingCache` (share one to embed each question only once).
            cs: the C grid (default: the paper's ``np.logspace(-4, 4, 10)``).
            seed: fold-shuffling seed (default 43, the paper's baseline seed).
            min_rows: refuse fewer rows (default 50, the paper's rule; :func:`learning_curve`
                lowers it to probe small N, as the paper did).

        A question repeated under several ids (compared by :func:`question_key`) is trained
        on once, with its first row's label; the others are dropped and counted in
        ``n_duplicates`` (a repeat in another CV fold would be graded on a question the fold
        was trained on). ``min_rows`` and the class checks count distinct questions.

        Raises:
            BaselineDataError: fewer than ``min_rows`` distinct questions, a single class,
                fewer than 5 rows of a class (5-fold stratified CV), or duplicate item ids.
        """
        given = list(rows)
        _check_unique_ids(given, "training")
        rows = _dedupe_questions(given)
        _check_training_rows(rows, min_rows)
        if len(cs) == 0:
            raise InvalidArgumentError("cs must not be empty")
        embedder = _as_cache(embeddings)
        x = embedder.embed([r.question for r in rows])
        y = np.array([r.label for r in rows], dtype=np.int64)
        cv = _cross_validate(x, y, cs, seed)
        clf = _classifier(cv.best_c, seed)
        _fit_quietly(clf, x, y)
        return cls(
            clf,
            embedder,
            train_ids=frozenset(r.item_id for r in given),
            train_questions=frozenset(question_key(r.question) for r in given),
            cv=cv,
            n_train=len(rows),
            n_train_pos=int(y.sum()),
            n_duplicates=len(given) - len(rows),
        )

    def score(self, questions: Sequence[str]) -> NDArray[np.float64]:
        """``P(local answer correct)`` for each question (no train/test check: see
        :meth:`score_rows` for evaluation)."""
        if isinstance(questions, str):
            raise InvalidTypeError("score() takes a list of questions, not a single string")
        if len(questions) == 0:
            return np.zeros(0, dtype=np.float64)
        x = self.embedder.embed(list(questions))
        return self.classifier.predict_proba(x)[:, 1].astype(np.float64)

    def _seen(self, row: LabelledQuestion) -> bool:
        return row.item_id in self.train_ids or question_key(row.question) in self.train_questions

    def unseen(self, rows: Iterable[LabelledQuestion]) -> list[LabelledQuestion]:
        """The rows whose item id and question were both not used for training."""
        return [r for r in rows if not self._seen(r)]

    def score_rows(self, rows: Sequence[LabelledQuestion]) -> NDArray[np.float64]:
        """Scores of evaluation rows; raises :class:`TrainTestOverlapError` on a row whose item
        id or question (:func:`question_key`) was used for training."""
        overlap = sorted(r.item_id for r in rows if r.item_id in self.train_ids)
        if overlap:
            raise TrainTestOverlapError(
                f"{len(overlap)} evaluation row(s) were used for training, e.g. {overlap[:5]}"
            )
        same = [r.item_id for r in rows if self._seen(r)]
        if same:
            raise TrainTestOverlapError(
                f"{len(same)} evaluation row(s) repeat a question used for training under "
                f"another id, e.g. {same[:5]}"
            )
        return self.score([r.question for r in rows])

    def evaluate(
        self, rows: Sequence[LabelledQuestion], *, n_resamples: int = 1000, seed: int = 0
    ) -> BaselineEvaluation:
        """AUROC (with a ``n_resamples`` bootstrap CI, RNG ``seed``) on held-out rows."""
        rows = list(rows)
        scores = self.score_rows(rows)
        labels = np.array([r.label for r in rows], dtype=np.int64)
        return BaselineEvaluation(
            n=len(rows),
            n_pos=int(labels.sum()),
            auroc=bootstrap_ci(labels, scores, n_resamples=n_resamples, seed=seed),
            scores=scores,
            labels=labels,
            item_ids=tuple(r.item_id for r in rows),
        )


@dataclass(frozen=True)
class LearningCurvePoint:
    """The baseline trained on ``n_train`` rows.

    Attributes:
        n_train: training rows (a stratified subsample of the training pool).
        n_train_pos: correct rows among them.
        mean_cv_auroc: **the paper's number**: mean validation AUROC over all 5 folds and all
            10 C values, on the training rows themselves.
        best_c_cv_auroc: mean fold AUROC at the selected C (optimistic).
        heldout_auroc: AUROC of the refit model on the fixed held-out rows (disjoint from every
            training subsample) -- the number comparable to a signal's evaluation AUROC.
        n_test: held-out rows.
        note: why the point is missing (``nan`` values), else ``""``.
    """

    n_train: int
    n_train_pos: int
    mean_cv_auroc: float
    best_c_cv_auroc: float
    heldout_auroc: float
    n_test: int
    note: str = ""


def learning_curve(
    rows: Sequence[LabelledQuestion],
    embeddings: Any,
    *,
    sizes: Sequence[int] = (25, 50, 100, 250, 500, 1000),
    include_full_pool: bool = True,
    test_rows: Sequence[LabelledQuestion] | None = None,
    test_fraction: float = 0.3,
    seed: int = DEFAULT_SEED,
    cs: Sequence[float] = tuple(DEFAULT_CS),
) -> list[LearningCurvePoint]:
    """Train the baseline on growing subsamples and report both AUROC definitions per N.

    The held-out rows are ``test_rows`` if given (checked disjoint from ``rows``, by id and
    question), else a stratified ``test_fraction`` split of ``rows`` (:func:`split_train_test`);
    the rest, each question once, is the training pool. For each ``N`` in ``sizes`` a stratified subsample of ``N`` pool rows
    (``seed``) is cross-validated and refit; sizes larger than the pool are reported with a
    note, as are sizes too small for 5-fold stratified CV (fewer than 5 rows of a class).
    With ``include_full_pool`` the whole pool is appended as a last point when it is larger
    than every listed size that fits (e.g. N = 700 for a 1,000-row set with a 30% test part).
    The 50-row minimum of :meth:`SupervisedBaseline.fit` is lifted here on purpose: the paper's
    curve starts at N = 25.

    Returns:
        One :class:`LearningCurvePoint` per size, in the given order. ``mean_cv_auroc`` is the
        paper's definition; ``heldout_auroc`` is the comparable evaluation AUROC.
    """
    rows = list(rows)
    if test_rows is None:
        pool, test = split_train_test(rows, test_fraction=test_fraction, seed=seed)
    else:
        pool, test = rows, list(test_rows)
        assert_disjoint(pool, test)
    # Each question once, so that a subsample of N rows trains on N questions.
    pool = _dedupe_questions(pool)
    embedder = _as_cache(embeddings)
    test_labels = np.array([r.label for r in test], dtype=np.int64)
    sizes = list(sizes)
    fitting = [n for n in sizes if n <= len(pool)]
    if include_full_pool and pool and len(pool) > max(fitting, default=0):
        sizes.append(len(pool))
    points = []
    for n in sizes:
        if n > len(pool):
            points.append(_missing_point(n, len(test), f"only {len(pool)} training rows"))
            continue
        subset = _stratified_subsample(pool, n, seed)
        try:
            model = SupervisedBaseline.fit(subset, embedder, cs=cs, seed=seed, min_rows=0)
        except BaselineDataError as exc:
            points.append(_missing_point(n, len(test), str(exc)))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a single-class test set gives nan; noted below
            held = auroc(test_labels, model.score_rows(test)) if len(test) else math.nan
        points.append(
            LearningCurvePoint(
                n_train=n,
                n_train_pos=model.n_train_pos,
                mean_cv_auroc=model.cv.mean_auroc,
                best_c_cv_auroc=model.cv.best_c_auroc,
                heldout_auroc=float(held),
                n_test=len(test),
                note="" if not math.isnan(held) else "held-out AUROC undefined",
            )
        )
    return points


def _missing_point(n: int, n_test: int, note: str) -> LearningCurvePoint:
    return LearningCurvePoint(n, 0, math.nan, math.nan, math.nan, n_test, note)


def _stratified_subsample(
    rows: Sequence[LabelledQuestion], n: int, seed: int
) -> list[LabelledQuestion]:
    """``n`` rows keeping the class ratio (largest remainder), input order preserved."""
    if n >= len(rows):
        return list(rows)
    rng = np.random.default_rng(seed)
    n_pos_total = sum(r.label for r in rows)
    n_pos = round(n * n_pos_total / len(rows))
    n_pos = min(max(n_pos, 0), n_pos_total)
    n_neg = min(n - n_pos, len(rows) - n_pos_total)
    n_pos = n - n_neg
    chosen: set[int] = set()
    for label, k in ((1, n_pos), (0, n_neg)):
        idx = np.array([i for i, r in enumerate(rows) if r.label == label], dtype=np.int64)
        rng.shuffle(idx)
        chosen.update(int(i) for i in idx[:k])
    return [r for i, r in enumerate(rows) if i in chosen]
