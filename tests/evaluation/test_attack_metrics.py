"""Attack round on the evaluation metrics: hostile inputs, typed errors, input kinds, and
property tests against scikit-learn.

Every validation failure must be an :class:`InvalidArgumentError` (a ``ValueError``, so code
catching ``ValueError`` keeps working) whose message names the problem; an undefined metric
is ``nan`` with an :class:`UndefinedMetricWarning`, the same way in every function.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError
from confidence_router.evaluation.metrics import (
    UndefinedMetricWarning,
    apgr,
    auprc_error,
    aurc,
    auroc,
    bootstrap_ci,
    brier,
    call_rate,
    cpt,
    deferral_curve,
    e_aurc,
    ece,
    operating_points,
    paired_bootstrap_delta,
    risk_coverage,
    system_accuracy,
    threshold_sweep,
)

sk_metrics = pytest.importorskip("sklearn.metrics")

# Every (labels, scores) metric, for checks that must hold for all of them alike.
PAIR_METRICS = [auroc, auprc_error, aurc, e_aurc, risk_coverage, brier, ece]


def _call(metric, labels, scores):
    return metric(labels, scores)


# ----------------------------------------------------------------------------------------------
# Typed errors
# ----------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ([0, 2, 1], [0.1, 0.2, 0.3], "only 0 and 1"),
    ([0, -1], [0.1, 0.2], "only 0 and 1"),
    ([0, 0.5], [0.1, 0.2], "only 0 and 1"),
    (["0", "1"], [0.1, 0.2], "numeric"),
    (["yes", "no"], [0.1, 0.2], "numeric"),
    ([0, 1, None], [0.1, 0.2, 0.3], "labels"),
    ([0, 1], [0.1, float("nan")], "NaN"),
    ([0, 1], ["a", "b"], "numeric"),
    ([0, 1], [0.1, None], "(scores|probs) contains a missing value"),
    ([0, 1], [1j, 2j], "numeric"),
    ([0, 1, 1], [0.1, 0.2], "length mismatch"),
    ([], [], "empty"),
    ([[0, 1]], [[0.1, 0.2]], "1-dimensional"),
]


@pytest.mark.parametrize("metric", PAIR_METRICS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(("labels", "scores", "match"), BAD_INPUTS)
def test_every_metric_raises_a_typed_error_naming_the_problem(metric, labels, scores, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        _call(metric, labels, scores)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfidenceRouterError)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: deferral_curve([0, 1], [0, 2], [0.1, 0.2]), "cloud_labels"),
        (lambda: apgr([0, 1], [1, 1], [0.1, np.nan]), "NaN"),
        (lambda: cpt([0, 1], [1, 1], [0.1, 0.2], float("inf")), "finite"),
        (lambda: call_rate([0.1], float("nan")), "tau"),
        (lambda: system_accuracy([0], [1], [0.1], float("nan")), "tau"),
        (lambda: operating_points([0, 1], [0.1, 0.2], (0.5, 1.5)), "fraction"),
        (lambda: operating_points([0, 1], [0.1, 0.2], (float("nan"),)), "fraction"),
        (lambda: ece([0, 1], [0.2, 1.2]), r"\[0, 1\]"),
        (lambda: ece([0, 1], [0.2, 0.5], strategy="bogus"), "strategy"),
        (lambda: ece([0, 1], [0.2, 0.5], n_bins=0), "n_bins"),
        (lambda: brier([0, 1], [-0.1, 0.5]), r"\[0, 1\]"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], n_resamples=0), "n_resamples"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], alpha=float("nan")), "alpha"),
        (lambda: bootstrap_ci([], []), "empty"),
        (lambda: paired_bootstrap_delta([0, 1], [0.1, 0.2], [0.1]), "length mismatch"),
        (lambda: threshold_sweep([0.1, float("nan")]), "NaN"),
    ],
)
def test_other_entry_points_raise_typed_errors(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # Found: n_bins=2.5 crashed inside numpy's bincount with a TypeError about casting.
        (lambda: ece([0, 1], [0.2, 0.5], n_bins=2.5), "n_bins"),
        # Found: "3" raised TypeError "'<' not supported between 'str' and 'int'".
        (lambda: ece([0, 1], [0.2, 0.5], n_bins="3"), "n_bins"),
        # Found: True was taken as one bin.
        (lambda: ece([0, 1], [0.2, 0.5], n_bins=True), "n_bins"),
        # Found: 2.5 resamples crashed in range() with "'float' object cannot be interpreted".
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], n_resamples=2.5), "n_resamples"),
        (lambda: bootstrap_ci([0, 1], [0.1, 0.2], n_resamples=True), "n_resamples"),
        (lambda: paired_bootstrap_delta([0, 1], [0.1, 0.2], [0.2, 0.1], n_resamples="9"),
         "n_resamples"),
        # Found: a string or None threshold raised a bare TypeError from math.isnan.
        (lambda: call_rate([0.1], "0.5"), "tau"),
        (lambda: call_rate([0.1], None), "tau"),
        (lambda: system_accuracy([0], [1], [0.1], None), "tau"),
        # Found: a bare float as the fractions raised "'float' object is not iterable".
        (lambda: operating_points([0, 1], [0.1, 0.2], 0.5), "escalation_fractions"),
        (lambda: operating_points([0, 1], [0.1, 0.2], ("a",)), "fraction"),
        (lambda: cpt([0, 1], [1, 1], [0.1, 0.2], "0.5"), "x"),
        (lambda: apgr([0, 1], [1, 1], [0.1, 0.2], min_gap=float("nan")), "min_gap"),
        (lambda: apgr([0, 1], [1, 1], [0.1, 0.2], min_gap=-0.1), "min_gap"),
    ],
)
def test_bad_parameters_raise_typed_errors(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Input kinds: lists, numpy arrays, generators, tuples, object arrays, pandas
# ----------------------------------------------------------------------------------------------

Y = [0, 1, 1, 0, 1, 0, 1, 1]
S = [0.1, 0.9, 0.35, 0.4, 0.8, 0.2, 0.6, 0.6]


@pytest.mark.parametrize("metric", [auroc, auprc_error, aurc, e_aurc], ids=lambda m: m.__name__)
def test_input_kinds_give_identical_results(metric):
    expected = metric(Y, S)
    assert metric(np.array(Y), np.array(S)) == expected
    assert metric(tuple(Y), tuple(S)) == expected
    assert metric(np.array(Y, dtype=bool), np.array(S, dtype=np.float32).astype(float)) == expected
    # Found: a generator became a 0-d object array -> "must be 1-dimensional; got shape ()".
    assert metric((v for v in Y), (v for v in S)) == expected
    assert metric(iter(Y), map(float, S)) == expected
    # Found: an object array of plain numbers was refused ("got dtype object").
    assert metric(np.array(Y, dtype=object), np.array(S, dtype=object)) == expected
    # Python ints too large for int64 are still numbers.
    assert math.isfinite(metric(Y, [2**70 * s for s in S]))


def test_generators_accepted_by_bootstrap_and_operating_points():
    ref = bootstrap_ci(Y, S, n_resamples=50, seed=3)
    assert bootstrap_ci((v for v in Y), (v for v in S), n_resamples=50, seed=3) == ref
    ref_d = paired_bootstrap_delta(Y, S, S[::-1], n_resamples=30, seed=1)
    got_d = paired_bootstrap_delta(iter(Y), iter(S), iter(S[::-1]), n_resamples=30, seed=1)
    assert got_d == ref_d
    assert operating_points(iter(Y), iter(S), iter([0.0, 0.5])) == operating_points(
        Y, S, [0.0, 0.5]
    )
    assert call_rate(iter(S), 0.5) == call_rate(S, 0.5)


def test_pandas_series_and_nullable_dtypes():
    pd = pytest.importorskip("pandas")
    expected = auroc(Y, S)
    assert auroc(pd.Series(Y), pd.Series(S)) == expected
    assert auroc(pd.Series(Y, dtype="Int64"), pd.Series(S, dtype="Float64")) == expected
    with pytest.raises(InvalidArgumentError, match="labels"):
        auroc(pd.Series([0, 1, None], dtype="Int64"), [0.1, 0.2, 0.3])
    with pytest.raises(InvalidArgumentError, match="scores"):
        auroc([0, 1, 1], pd.Series([0.1, None, 0.3], dtype="Float64"))


def test_bool_scores_are_refused_and_bool_labels_accepted():
    assert auroc([True, False, True], [0.9, 0.1, 0.8]) == 1.0
    with pytest.raises(InvalidArgumentError, match="numeric"):
        auroc([0, 1], [False, True])


# ----------------------------------------------------------------------------------------------
# Infinite scores, ties, single class
# ----------------------------------------------------------------------------------------------


def test_infinite_scores_are_ordered_and_tied_like_sklearn():
    y = [0, 1, 0, 1, 1, 0]
    s = [-np.inf, np.inf, np.inf, 0.5, -np.inf, 0.0]
    assert auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, np.clip(s, -1e300, 1e300)))
    cov, risk = risk_coverage(y, s)
    assert np.isfinite(risk).all() and cov[-1] == 1.0
    low = [-np.inf, 0.7, -np.inf, 0.5, -np.inf, 0.0]  # -inf is fine for the threshold metrics
    pts = operating_points(y, low, (0.0, 0.5, 1.0))
    assert pts[0].threshold == -np.inf and pts[-1].threshold == math.inf
    assert pts[1].n_escalated == 3 and pts[1].threshold == 0.0
    curve = deferral_curve(y, [1] * 6, low)
    assert curve.call_rates[0] == 0.0 and curve.call_rates[-1] == 1.0
    assert call_rate(low, np.inf) == 1.0 and call_rate(low, -np.inf) == 0.0


@pytest.mark.parametrize(
    "call",
    [
        lambda s: threshold_sweep(s),
        lambda s: call_rate(s, 0.5),
        lambda s: system_accuracy([0, 1, 1], [1, 1, 1], s, 0.5),
        lambda s: deferral_curve([0, 1, 1], [1, 1, 1], s),
        lambda s: apgr([0, 1, 1], [1, 1, 0], s),
        lambda s: cpt([0, 1, 1], [1, 1, 0], s, 0.5),
        lambda s: operating_points([0, 1, 1], s, (0.5,)),
    ],
)
def test_plus_infinity_is_refused_by_the_threshold_metrics(call):
    # Found: with a +inf score the deferral curve's last point (tau = +inf, "escalate
    # everything") claimed r = 1 while call_rate(s, inf) and system_accuracy at tau = +inf kept
    # the +inf row local: the curve, APGR and the operating points disagreed with the policy.
    with pytest.raises(InvalidArgumentError, match=r"\+inf"):
        call([0.2, np.inf, 0.9])


def test_all_scores_tied():
    y = [0, 1, 1, 0, 1]
    s = [0.3] * 5
    assert auroc(y, s) == 0.5 == sk_metrics.roc_auc_score(y, s)
    assert auprc_error(y, s) == pytest.approx(sk_metrics.average_precision_score([1 - v for v in y],
                                                                                   [-v for v in s]))
    assert aurc(y, s) == pytest.approx(1 - 3 / 5)
    pts = operating_points(y, s, (0.4,))
    assert pts[0].ties_split and pts[0].n_escalated == 2
    assert threshold_sweep(s).tolist() == [-np.inf, 0.3, np.inf]


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [1], [0]])
def test_single_class_is_nan_with_warning_everywhere(labels):
    scores = [0.1, 0.5, 0.9][: len(labels)]
    with pytest.warns(UndefinedMetricWarning, match="single class"):
        assert math.isnan(auroc(labels, scores))
    with pytest.warns(UndefinedMetricWarning):  # the full-data estimate's own warning
        ci = bootstrap_ci(labels, scores, n_resamples=20)
    with pytest.warns(UndefinedMetricWarning):
        d = paired_bootstrap_delta(labels, scores, scores[::-1], n_resamples=20)
    # Every resample is dropped and counted.
    assert math.isnan(ci.low) and math.isnan(ci.high) and ci.n_dropped == 20
    assert math.isnan(d.delta) and d.n_dropped == 20 and not d.significant


def test_bootstrap_single_class_estimate_warns_once():
    with pytest.warns(UndefinedMetricWarning) as record:
        bootstrap_ci([1, 1, 1], [0.1, 0.5, 0.9], n_resamples=20)
    assert len(record) == 1


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

_labels_scores = st.integers(min_value=2, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(
            st.one_of(
                st.integers(-3, 3).map(float),  # many ties
                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                st.sampled_from([-np.inf, np.inf]),
            ),
            min_size=n,
            max_size=n,
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(_labels_scores)
def test_auroc_equals_sklearn_including_ties_and_infinities(data):
    y, s = data
    if len(set(y)) < 2:
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(auroc(y, s))
        return
    # sklearn refuses infinities; replacing them with the extreme finite floats keeps the order
    # and the ties, so the reference AUROC is the same.
    finite = np.clip(np.array(s), -np.finfo(float).max, np.finfo(float).max)
    assert auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, finite), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(_labels_scores, st.integers(0, 2**32 - 1))
def test_bootstrap_ci_is_deterministic_and_contains_the_estimate(data, seed):
    y, s = data
    if len(set(y)) < 2:
        return
    a = bootstrap_ci(y, s, n_resamples=200, seed=seed)
    b = bootstrap_ci(np.array(y), np.array(s), n_resamples=200, seed=seed)
    assert a == b
    assert a.n_resamples_used + a.n_dropped == 200
    assert a.low <= a.estimate <= a.high


@settings(max_examples=100, deadline=None)
@given(_labels_scores, st.integers(0, 2**32 - 1))
def test_paired_delta_is_deterministic_and_antisymmetric(data, seed):
    y, s = data
    if len(set(y)) < 2:
        return
    other = [-v for v in s]
    d1 = paired_bootstrap_delta(y, s, other, n_resamples=100, seed=seed)
    d2 = paired_bootstrap_delta(y, s, other, n_resamples=100, seed=seed)
    rev = paired_bootstrap_delta(y, other, s, n_resamples=100, seed=seed)
    assert d1 == d2
    assert rev.delta == pytest.approx(-d1.delta, abs=1e-12)
    assert rev.low == pytest.approx(-d1.high, abs=1e-12)
    assert d1.low <= d1.delta <= d1.high


_cascade = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.25, 0.5, 1.0]), min_size=n,
                 max_size=n),
        st.lists(st.floats(0, 1), min_size=1, max_size=5),
    )
)


@settings(max_examples=200, deadline=None)
@given(_cascade)
def test_operating_points_and_curve_match_their_definitions(data):
    y, z, s, fractions = data
    n = len(y)
    order = sorted(range(n), key=lambda i: s[i])  # Python's sort is stable, like the docs say
    for point, f in zip(operating_points(y, s, fractions, cloud_labels=z), fractions):
        m = min(n, math.floor(f * n + 1e-9))
        escalated, kept = order[:m], order[m:]
        assert point.n_escalated == m and point.coverage == (n - m) / n
        assert point.kept_correct_share == pytest.approx(sum(y[i] for i in kept) / n)
        expected_sys = (sum(y[i] for i in kept) + sum(z[i] for i in escalated)) / n
        assert point.system_accuracy == pytest.approx(expected_sys)
        if kept:
            assert point.kept_accuracy == pytest.approx(sum(y[i] for i in kept) / len(kept))
            assert point.threshold == s[kept[0]]
        else:
            assert math.isnan(point.kept_accuracy) and point.threshold == math.inf
    curve = deferral_curve(y, z, s)
    for tau, rate, acc in zip(curve.thresholds, curve.call_rates, curve.accuracies):
        assert rate == call_rate(s, tau)
        assert acc == pytest.approx(system_accuracy(y, z, s, tau))


@settings(max_examples=200, deadline=None)
@given(_labels_scores)
def test_auprc_error_equals_sklearn_average_precision(data):
    y, s = data
    if all(y):
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(auprc_error(y, s))
        return
    finite = np.clip(-np.array(s), -np.finfo(float).max, np.finfo(float).max)
    expected = sk_metrics.average_precision_score([1 - v for v in y], finite)
    assert auprc_error(y, s) == pytest.approx(expected, abs=1e-12)
