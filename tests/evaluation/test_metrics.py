"""Tests for confidence_router.evaluation.metrics: hand-computed values, sklearn parity,
property tests and input validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from confidence_router.evaluation.metrics import (
    BootstrapResult,
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


# ----------------------------------------------------------------------------------------------
# AUROC
# ----------------------------------------------------------------------------------------------


def test_auroc_hand_computed_no_ties() -> None:
    # pos scores {0.35, 0.8}, neg {0.1, 0.4}: pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4)
    # -> 3 of 4 pairs ordered correctly = 0.75.
    # Rank form: ranks of [0.1, 0.4, 0.35, 0.8] = [1, 3, 2, 4]; R+ = 2 + 4 = 6;
    # (6 - 2*3/2) / (2*2) = 3/4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auroc_hand_computed_ties_averaged() -> None:
    # scores [0.2, 0.9, 0.2, 0.2], labels [0, 1, 0, 1]: 0.2 occupies ranks 1..3 -> each 2.0;
    # 0.9 has rank 4. R+ = 4 + 2 = 6; (6 - 3) / (2*2) = 0.75
    # = P(pos>neg) + 0.5 P(tie): 0.9 beats both negatives (2), 0.2 ties both (2 * 0.5) -> 3/4.
    assert auroc([0, 1, 0, 1], [0.2, 0.9, 0.2, 0.2]) == pytest.approx(0.75)


def test_auroc_all_tied_is_half() -> None:
    assert auroc([0, 1, 1, 0, 1], [3, 3, 3, 3, 3]) == pytest.approx(0.5)


def test_auroc_perfect_and_inverted() -> None:
    assert auroc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert auroc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0


def test_auroc_accepts_bool_and_float_labels_and_infinite_scores() -> None:
    assert auroc(np.array([False, True]), [-np.inf, np.inf]) == 1.0
    assert auroc([0.0, 1.0], [0.3, 0.2]) == 0.0


def test_auroc_single_class_is_nan_with_warning() -> None:
    with pytest.warns(UndefinedMetricWarning, match="single class"):
        assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(auroc([0], [0.1]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    # Round to create many ties, which is where rank averaging matters.
    s = np.round(rng.normal(size=200) + 0.7 * y, 1)
    assert auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 1, 1], [0.1, 0.2], "length mismatch"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, -1], [0.1, 0.2], "only 0 and 1"),
        ([0, 0.5], [0.1, 0.2], "only 0 and 1"),
        ([0, float("nan")], [0.1, 0.2], "only 0 and 1"),
        (["0", "1"], [0.1, 0.2], "numeric"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], ["a", "b"], "numeric"),
        ([], [], "empty"),
        ([[0, 1]], [[0.1, 0.2]], "1-dimensional"),
    ],
)
def test_validation_errors(labels: object, scores: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auroc(labels, scores)  # type: ignore[arg-type]


def test_validation_errors_other_metrics() -> None:
    with pytest.raises(ValueError, match="cloud_labels must contain only 0 and 1"):
        apgr([0, 1], [0, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="length mismatch"):
        deferral_curve([0, 1], [0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        aurc([0, 1], [np.nan, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece([0, 1], [0.2, 1.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier([0, 1], [-0.1, 0.5])
    with pytest.raises(ValueError, match="strategy"):
        ece([0, 1], [0.2, 0.5], strategy="bogus")
    with pytest.raises(ValueError, match="escalation fractions"):
        operating_points([0, 1], [0.1, 0.2], (0.5, 1.5))
    with pytest.raises(ValueError, match="finite"):
        cpt([0, 1], [1, 1], [0.1, 0.2], float("nan"))
    with pytest.raises(ValueError, match="tau must not be NaN"):
        call_rate([0.1], float("nan"))
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([0, 1], [0.1, 0.2], n_resamples=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0.1, 0.2], alpha=1.5)
    with pytest.raises(ValueError, match="length mismatch"):
        paired_bootstrap_delta([0, 1], [0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], [])


# ----------------------------------------------------------------------------------------------
# AUROC properties
# ----------------------------------------------------------------------------------------------

_rows = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        # Small integer scores force many ties.
        st.lists(st.integers(-5, 5), min_size=n, max_size=n),
    )
)


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_auroc_in_unit_interval_or_nan(rows: tuple[list[int], list[int]]) -> None:
    y, s = rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        value = auroc(y, s)
    if 0 < sum(y) < len(y):
        assert 0.0 <= value <= 1.0
    else:
        assert math.isnan(value)


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_auroc_invariant_under_strictly_monotonic_transform(
    rows: tuple[list[int], list[int]],
) -> None:
    y, s = rows
    assume(0 < sum(y) < len(y))
    s_arr = np.asarray(s, dtype=float)
    base = auroc(y, s_arr)
    for transformed in (np.exp(s_arr), 3.0 * s_arr - 7.0, s_arr**3, np.arctan(s_arr)):
        assert auroc(y, transformed) == pytest.approx(base, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_auroc_of_negated_scores_is_complement(rows: tuple[list[int], list[int]]) -> None:
    y, s = rows
    assume(0 < sum(y) < len(y))
    s_arr = np.asarray(s, dtype=float)
    assert auroc(y, -s_arr) == pytest.approx(1.0 - auroc(y, s_arr), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(_rows)
def test_auroc_matches_sklearn_property(rows: tuple[list[int], list[int]]) -> None:
    y, s = rows
    assume(0 < sum(y) < len(y))
    assert auroc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------

_Y = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0])
_S = np.array(
    [0.1, 0.9, 0.3, 0.7, 0.4, 0.5, 0.8, 0.2, 0.6, 0.65, 0.45, 0.15, 0.55, 0.62, 0.35, 0.95,
     0.05, 0.75, 0.58, 0.25]
)  # fmt: skip


def test_bootstrap_deterministic_for_seed() -> None:
    a = bootstrap_ci(_Y, _S, n_resamples=300, seed=7)
    b = bootstrap_ci(_Y, _S, n_resamples=300, seed=7)
    c = bootstrap_ci(_Y, _S, n_resamples=300, seed=8)
    assert a == b
    assert isinstance(a, BootstrapResult)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.estimate == auroc(_Y, _S)
    assert a.low <= a.estimate <= a.high
    assert a.n_resamples_used + a.n_dropped == 300


def test_bootstrap_matches_reference_loop() -> None:
    # The documented protocol, written out: default_rng(seed), one integers(0, n, n) per
    # resample, drop undefined, 2.5/97.5 percentiles.
    rng = np.random.default_rng(0)
    values = []
    for _ in range(200):
        idx = rng.integers(0, len(_Y), size=len(_Y))
        if 0 < _Y[idx].sum() < len(_Y):
            values.append(sk_metrics.roc_auc_score(_Y[idx], _S[idx]))
    low, high = np.percentile(values, [2.5, 97.5])
    r = bootstrap_ci(_Y, _S, n_resamples=200, seed=0)
    assert r.low == pytest.approx(low, abs=1e-12)
    assert r.high == pytest.approx(high, abs=1e-12)
    assert r.n_resamples_used == len(values)


def test_bootstrap_counts_dropped_single_class_resamples() -> None:
    # n = 3 with one positive: a resample misses it with prob (2/3)^3 = 8/27 and is all-positive
    # with prob (1/3)^3, so ~30% of resamples are undefined and must be dropped, not warned.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)
        r = bootstrap_ci([0, 0, 1], [0.1, 0.2, 0.3], n_resamples=500, seed=0)
    assert r.n_dropped > 0
    assert r.n_dropped + r.n_resamples_used == 500
    assert 0.2 < r.n_dropped / 500 < 0.42


def test_bootstrap_all_dropped_gives_nan_interval() -> None:
    with pytest.warns(UndefinedMetricWarning):
        r = bootstrap_ci([1, 1, 1], [0.1, 0.2, 0.3], n_resamples=20)
    assert math.isnan(r.estimate) and math.isnan(r.low) and math.isnan(r.high)
    assert r.n_resamples_used == 0 and r.n_dropped == 20


def test_bootstrap_with_packed_labels_for_apgr() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=60)
    z = rng.integers(0, 2, size=60) | (1 - y) * rng.integers(0, 2, size=60)
    s = rng.random(60) + 0.5 * y
    yz = np.column_stack([y, z])
    r = bootstrap_ci(yz, s, metric=lambda a, b: apgr(a[:, 0], a[:, 1], b), n_resamples=100)
    assert r.estimate == pytest.approx(apgr(y, z, s))
    assert r.low <= r.high


def test_paired_delta_of_scorer_with_itself_is_zero() -> None:
    r = paired_bootstrap_delta(_Y, _S, _S, n_resamples=300, seed=0)
    assert r.delta == 0.0
    assert r.low == 0.0 and r.high == 0.0
    assert r.p_value == 1.0  # every delta* is 0 <= 0
    assert r.significant is False
    assert r.n_resamples_used + r.n_dropped == 300


def test_paired_delta_uses_shared_indices() -> None:
    # b is a strictly monotonic transform of a: equal AUROC on *every* resample only if both
    # scorers see the same indices, so the CI collapses to exactly 0.
    r = paired_bootstrap_delta(_Y, _S, np.exp(_S) * 5 - 1, n_resamples=300, seed=1)
    assert r.low == r.high == 0.0


def test_paired_delta_perfect_vs_random_is_significant() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    perfect = y + rng.random(200) * 0.5
    noise = rng.random(200)
    r = paired_bootstrap_delta(y, perfect, noise, n_resamples=300)
    assert r.delta == pytest.approx(1.0 - auroc(y, noise))
    assert r.low > 0 and r.significant
    assert r.p_value == 0.0
    # and the reverse direction
    r2 = paired_bootstrap_delta(y, noise, perfect, n_resamples=300)
    assert r2.high < 0 and r2.significant and r2.p_value == 1.0


def test_paired_delta_deterministic() -> None:
    noise = np.linspace(0, 1, len(_Y))
    a = paired_bootstrap_delta(_Y, _S, noise, n_resamples=200, seed=4)
    b = paired_bootstrap_delta(_Y, _S, noise, n_resamples=200, seed=4)
    assert a == b


# ----------------------------------------------------------------------------------------------
# AUPRC-error
# ----------------------------------------------------------------------------------------------


def test_auprc_error_hand_computed() -> None:
    # errors (y=0) at s=0.1 and s=0.5. Rank by -s: 0.1(err) 0.3(ok) 0.5(err) 0.9(ok).
    # precision at each error: 1/1, 2/3; each recall step 1/2 -> AP = 0.5 + 1/3 = 0.8333
    assert auprc_error([0, 1, 0, 1], [0.1, 0.3, 0.5, 0.9]) == pytest.approx(5 / 6)


def test_auprc_error_tied_block_is_one_step() -> None:
    # all tied: one step with recall 1 and precision = error rate 2/4 -> AP = 0.5
    assert auprc_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)


def test_auprc_error_no_errors_is_nan() -> None:
    with pytest.warns(UndefinedMetricWarning, match="no local errors"):
        assert math.isnan(auprc_error([1, 1], [0.1, 0.2]))


@pytest.mark.parametrize("seed", range(5))
def test_auprc_error_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=150)
    s = np.round(rng.normal(size=150) + y, 1)
    expected = sk_metrics.average_precision_score(1 - y, -s)
    assert auprc_error(y, s) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Risk-coverage, AURC, E-AURC
# ----------------------------------------------------------------------------------------------


def test_risk_coverage_hand_computed() -> None:
    # order by s desc: 0.9(y1) 0.5(y0) 0.1(y1); risks 1-1/1=0, 1-1/2=0.5, 1-2/3=1/3
    cov, risk = risk_coverage([1, 0, 1], [0.9, 0.5, 0.1])
    np.testing.assert_allclose(cov, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3])
    # AURC = (0 + 0.5 + 1/3) / 3 = 5/18; AURC* (n+=2) = (0 + 0 + 1/3)/3 = 1/9
    assert aurc([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 18)
    assert e_aurc([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 18 - 1 / 9)


def test_risk_coverage_ties_are_averaged_and_order_free() -> None:
    # One tied block of 4 rows with 2 correct: expected correct after k rows = k/2 -> risk 0.5.
    _, risk = risk_coverage([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3])
    np.testing.assert_allclose(risk, [0.5, 0.5, 0.5, 0.5])
    _, risk2 = risk_coverage([0, 0, 1, 1], [0.3, 0.3, 0.3, 0.3])
    np.testing.assert_allclose(risk, risk2)
    # Mixed: 0.9(y1), then a tie block {y0, y1} at 0.5: k=2 -> 1 + 0.5 correct -> risk 0.25;
    # k=3 -> 2 correct -> risk 1/3.
    _, risk3 = risk_coverage([0, 1, 1], [0.5, 0.9, 0.5])
    np.testing.assert_allclose(risk3, [0.0, 0.25, 1 / 3])


def test_e_aurc_zero_for_perfect_ordering_and_single_class() -> None:
    assert e_aurc([1, 1, 0, 0], [4, 3, 2, 1]) == pytest.approx(0.0)
    assert e_aurc([1, 1, 1], [1, 2, 3]) == pytest.approx(0.0)
    assert aurc([0, 0], [1, 2]) == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(_rows)
def test_e_aurc_nonnegative(rows: tuple[list[int], list[int]]) -> None:
    y, s = rows
    assert e_aurc(y, s) >= -1e-12


# ----------------------------------------------------------------------------------------------
# Threshold sweep, deferral curve, APGR, CPT
# ----------------------------------------------------------------------------------------------


def test_threshold_sweep_and_call_rate() -> None:
    taus = threshold_sweep([0.5, 0.2, 0.5])
    assert taus.tolist() == [-np.inf, 0.2, 0.5, np.inf]
    # escalate iff s < tau: at 0.5 only the 0.2 row -> 1/3
    assert [call_rate([0.5, 0.2, 0.5], t) for t in taus] == pytest.approx([0, 0, 1 / 3, 1])


def test_system_accuracy_hand_computed() -> None:
    # y=[0,1,0], z=[1,1,1]; tau=0.3 escalates row 0 only: z0 + y1 + y2 = 1 + 1 + 0 -> 2/3
    assert system_accuracy([0, 1, 0], [1, 1, 1], [0.1, 0.9, 0.5], 0.3) == pytest.approx(2 / 3)
    assert system_accuracy([0, 1, 0], [1, 1, 1], [0.1, 0.9, 0.5], -np.inf) == pytest.approx(1 / 3)
    assert system_accuracy([0, 1, 0], [1, 1, 1], [0.1, 0.9, 0.5], np.inf) == pytest.approx(1.0)


def test_deferral_curve_hand_computed() -> None:
    # y=[0,1,1], z=[1,1,0], s=[0.2,0.6,0.9]; A_L = 2/3, A_C = 2/3.
    # tau=-inf,0.2: nothing escalated -> 2/3; tau=0.6: row 0 fixed -> 1; tau=0.9: rows 0,1
    # (+1, 0) -> 1; +inf: all (+1, 0, -1) -> 2/3.
    c = deferral_curve([0, 1, 1], [1, 1, 0], [0.2, 0.6, 0.9])
    np.testing.assert_allclose(c.call_rates, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(c.accuracies, [2 / 3, 2 / 3, 1, 1, 2 / 3])
    assert c.gain.tolist() == [0, 0, 1, 1, 0]
    assert c.local_accuracy == pytest.approx(2 / 3)
    assert c.cloud_accuracy == pytest.approx(2 / 3)
    assert c.pgr() is None  # zero gap


def test_deferral_curve_matches_pointwise_definition() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 50)
    z = rng.integers(0, 2, 50)
    s = np.round(rng.random(50), 1)
    c = deferral_curve(y, z, s)
    for tau, r, a in zip(c.thresholds, c.call_rates, c.accuracies, strict=True):
        assert r == pytest.approx(call_rate(s, tau))
        assert a == pytest.approx(system_accuracy(y, z, s, tau))


def test_apgr_and_cpt_hand_computed() -> None:
    # y=[0,0,1], z=[1,1,0], s=[0.1,0.2,0.9]; A_L=1/3, A_C=2/3, gap 1/3 (1 row).
    # (r, PGR): (0,0) (0,0) (1/3,1) (2/3,2) (1,1).
    # APGR = 0 + (1/3)(0+1)/2 + (1/3)(1+2)/2 + (1/3)(2+1)/2 = 1/6 + 1/2 + 1/2 = 7/6.
    y, z, s = [0, 0, 1], [1, 1, 0], [0.1, 0.2, 0.9]
    assert apgr(y, z, s) == pytest.approx(7 / 6)
    assert cpt(y, z, s, 0.5) == pytest.approx(1 / 3)
    assert cpt(y, z, s, 1.0) == pytest.approx(1 / 3)
    assert cpt(y, z, s, 1.5) == pytest.approx(2 / 3)  # min over points, not the monotone r=1
    assert cpt(y, z, s, 0.0) == 0.0
    with pytest.warns(UndefinedMetricWarning, match="not reachable"):
        assert math.isnan(cpt(y, z, s, 2.5))


def test_apgr_random_like_scores_is_half() -> None:
    # Constant scores: one tie block, the curve jumps from (0,0) to (1,1): trapezoid = 1/2.
    assert apgr([0, 1, 0, 0], [1, 1, 1, 0], [0.5] * 4) == pytest.approx(0.5)


def test_apgr_oracle_beats_inverted() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    z = np.array([1, 1, 1, 0, 0, 1])
    oracle = np.where((y == 0) & (z == 1), 0.0, 1.0) + 0.01 * np.arange(6)
    assert apgr(y, z, oracle) > 0.5 > apgr(y, z, -oracle)


def test_apgr_undefined_gap_reports_reason() -> None:
    with pytest.warns(UndefinedMetricWarning, match=r"A_C - A_L"):
        assert math.isnan(apgr([1, 0], [0, 1], [0.1, 0.2]))
    # min_gap refuses small but non-zero gaps: A_L = 0.5, A_C = 0.75
    with pytest.warns(UndefinedMetricWarning, match="min_gap=0.3"):
        assert math.isnan(apgr([1, 0, 1, 0], [1, 1, 1, 0], [1, 2, 3, 4], min_gap=0.3))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(cpt([1, 0], [0, 1], [0.1, 0.2], 0.5))


def test_cpt_exact_at_float_awkward_fraction() -> None:
    # gap = 5 rows; reaching PGR 0.6 = 3/5 needs exactly the three fixable rows escalated.
    y = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    z = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    s = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert cpt(y, z, s, 0.6) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------
# Operating points
# ----------------------------------------------------------------------------------------------


def test_operating_points_hand_computed() -> None:
    # sorted by s: 0.1(y0,z1) 0.3(y0,z0) 0.6(y1,z1) 0.8(y1,z0)
    y = [0, 1, 1, 0]
    z = [1, 0, 1, 0]
    s = [0.1, 0.8, 0.6, 0.3]
    p0, p25, p5, p1 = operating_points(y, s, (0.0, 0.25, 0.5, 1.0), cloud_labels=z)
    # 0%: keep all: kept acc 2/4; system = A_L = 0.5
    assert (p0.n_escalated, p0.threshold, p0.kept_accuracy) == (0, 0.1, 0.5)
    assert p0.system_accuracy == 0.5
    assert p0.coverage == 1.0
    # 25%: escalate the 0.1 row (z=1): kept {0.3:0, 0.6:1, 0.8:1} -> 2/3; system (2+1)/4
    assert p25.n_escalated == 1 and p25.threshold == 0.3
    assert p25.kept_accuracy == pytest.approx(2 / 3)
    assert p25.system_accuracy == pytest.approx(0.75)
    # 50%: escalate 0.1 (z1) and 0.3 (z0): kept acc 1.0; system (2 + 1)/4
    assert (p5.n_escalated, p5.threshold, p5.kept_accuracy) == (2, 0.6, 1.0)
    assert p5.system_accuracy == pytest.approx(0.75)
    assert p5.kept_correct_share == pytest.approx(0.5)
    # 100%: escalate all; nothing kept; system = A_C = 2/4
    assert p1.n_escalated == 4 and p1.threshold == math.inf and p1.coverage == 0.0
    assert math.isnan(p1.kept_accuracy)
    assert p1.system_accuracy == pytest.approx(0.5)


def test_operating_points_without_cloud_labels_and_budget_floor() -> None:
    pts = operating_points([1, 0, 1], [0.2, 0.1, 0.9], (0.5,))
    (p,) = pts
    # floor(0.5 * 3) = 1 row escalated (never exceed the budget)
    assert p.n_escalated == 1 and p.escalated_fraction == pytest.approx(1 / 3)
    assert p.system_accuracy is None
    # bounds: kept_correct_share = 2/3 (cloud always wrong) .. 2/3 + 1/3 (cloud always right)
    assert p.kept_correct_share == pytest.approx(2 / 3)


def test_operating_points_default_fractions_and_float_slack() -> None:
    pts = operating_points(np.ones(100, dtype=int), np.arange(100.0))
    assert [p.requested_fraction for p in pts] == pytest.approx([i / 10 for i in range(11)])
    assert [p.n_escalated for p in pts] == [10 * i for i in range(11)]
    # 0.29 * 100 = 28.999999999999996 in floats; the budget still means 29 rows
    (p,) = operating_points(np.ones(100, dtype=int), np.arange(100.0), (0.29,))
    assert p.n_escalated == 29


def test_operating_points_flags_split_ties() -> None:
    (p,) = operating_points([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.9], (0.25,))
    assert p.ties_split and p.threshold == 0.5
    (q,) = operating_points([1, 0, 1, 0], [0.1, 0.5, 0.5, 0.9], (0.25,))
    assert not q.ties_split


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def test_ece_hand_computed() -> None:
    # M=2: bin [0,.5) = {p .2 (y0), .4 (y1)}: |0.5 - 0.3| = 0.2
    #      bin [.5,1] = {p .9 (y1), .9 (y1)}: |1.0 - 0.9| = 0.1 -> ECE = .5*.2 + .5*.1 = 0.15
    assert ece([0, 1, 1, 1], [0.2, 0.4, 0.9, 0.9], n_bins=2) == pytest.approx(0.15)


def test_ece_edges_and_quantile() -> None:
    # p = 1.0 falls in the last bin; p = 0 in the first; both perfectly calibrated -> 0
    assert ece([0, 1], [0.0, 1.0]) == pytest.approx(0.0)
    # quantile bins of 2 rows each over sorted p: {.1 y0, .2 y0} -> |0 - .15| ; {.8 y1, .9 y1}
    # -> |1 - .85| ; ECE = .5*.15 + .5*.15 = 0.15
    assert ece([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_bins=2, strategy="quantile") == (
        pytest.approx(0.15)
    )


def test_brier_hand_computed() -> None:
    # ((0.8 - 1)^2 + (0.4 - 0)^2) / 2 = (0.04 + 0.16) / 2 = 0.1
    assert brier([1, 0], [0.8, 0.4]) == pytest.approx(0.1)
    assert brier([1, 0], [0.8, 0.4]) == pytest.approx(
        sk_metrics.brier_score_loss([1, 0], [0.8, 0.4])
    )
