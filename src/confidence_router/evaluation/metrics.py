"""Pure evaluation metrics for local-to-cloud routing (numpy only).

Every function takes plain array-likes, validates them, and returns floats or small frozen
dataclasses. Formulas are described in ``docs/how-it-works.md`` (section 5).
Conventions shared by all functions:

* ``labels`` (``y``): 1 if the **local** answer is correct, else 0 (bool, int or float 0/1).
* ``cloud_labels`` (``z``): 1 if the **cloud** answer is correct, else 0.
* ``scores`` (``s``): confidence oriented "higher = keep local". ``NaN`` is rejected: a missing
  signal must be excluded (and counted) by the caller, never silently scored.
* Routing policy: **escalate iff s < tau**.
* Inputs may be lists, tuples, numpy arrays, pandas Series (nullable dtypes too) or one-shot
  iterables such as generators (read once). Invalid input raises
  :class:`~confidence_router.errors.InvalidArgumentError` (a ``ValueError``) naming the
  argument: empty input, a length mismatch, labels other than 0/1 (``True``/``False`` count as
  1/0; ``2``, ``-1``, ``0.5``, strings are refused), non-numeric or boolean scores, a missing
  value (``None``, ``pd.NA``, ``NaN`` score), or a bad parameter (``n_bins``, ``n_resamples``,
  ``tau``, ...). ``-inf`` scores are valid everywhere; ``+inf`` only in the rank metrics
  (AUROC, AUPRC-error, AURC, risk-coverage): the threshold metrics refuse it, since no
  threshold would escalate such a row while ``tau = +inf`` means "escalate everything".
* When a metric is mathematically undefined on the given data (one class absent, zero
  cloud-local gap, ...) it returns ``float('nan')`` and emits an :class:`UndefinedMetricWarning`
  whose message says why. The bootstrap helpers silence that warning inside resamples and count
  the dropped resamples instead.

Example::

    >>> from confidence_router.evaluation.metrics import auroc, bootstrap_ci
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> ci = bootstrap_ci([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], n_resamples=200)
    >>> ci.low <= ci.estimate <= ci.high
    True
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from confidence_router.errors import InvalidArgumentError

__all__ = [
    "BootstrapResult",
    "DeferralCurve",
    "OperatingPoint",
    "PairedBootstrapResult",
    "UndefinedMetricWarning",
    "apgr",
    "auprc_error",
    "aurc",
    "auroc",
    "bootstrap_ci",
    "brier",
    "call_rate",
    "cpt",
    "deferral_curve",
    "e_aurc",
    "ece",
    "operating_points",
    "paired_bootstrap_delta",
    "risk_coverage",
    "system_accuracy",
    "threshold_sweep",
]

Metric = Callable[[Any, Any], "float | None"]
"""A metric ``metric(labels, scores) -> float``; ``NaN`` (or ``None``) means undefined."""

DEFAULT_ESCALATION_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the given data; the function returned ``NaN``."""


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _materialize(values: Any, name: str) -> Any:
    """``values`` ready for ``np.asarray``: one-shot iterables (generators, ``map``) read into a
    list, since numpy would wrap them as one opaque object; text refused (not rows)."""
    if isinstance(values, (str, bytes)):
        raise InvalidArgumentError(
            f"{name} must be an array with one entry per row; got a {type(values).__name__}"
        )
    if isinstance(values, Iterator) or (
        isinstance(values, Iterable)
        and not hasattr(values, "__len__")
        and not hasattr(values, "__array__")
    ):
        return list(values)
    return values


def _is_missing(value: Any) -> bool:
    # None, pandas.NA / NaT (nullable dtypes turn into object arrays holding them).
    return value is None or type(value).__name__ in ("NAType", "NaTType")


def _object_to_numeric(arr: NDArray[Any], name: str) -> NDArray[Any]:
    """An object array (mixed Python values, huge ints, pandas NA) as a bool or float array."""
    all_bool = True
    for i, v in enumerate(arr):
        if isinstance(v, (bool, np.bool_)):
            continue
        all_bool = False
        if _is_missing(v):
            raise InvalidArgumentError(
                f"{name} contains a missing value ({v!r}) at row {i}; drop rows with a missing "
                "value and report them separately"
            )
        if not isinstance(v, numbers.Real):
            raise InvalidArgumentError(
                f"{name} must be numeric; got {type(v).__name__} {v!r} at row {i}"
            )
    return arr.astype(bool if all_bool else np.float64)


def _as_1d(values: ArrayLike, name: str) -> NDArray[Any]:
    arr = np.asarray(_materialize(values, name))
    if arr.ndim != 1:
        raise InvalidArgumentError(
            f"{name} must be 1-dimensional; got an array of shape {arr.shape}"
        )
    if arr.size == 0:
        raise InvalidArgumentError(f"{name} is empty; need at least one row")
    if arr.dtype == object:
        arr = _object_to_numeric(arr, name)
    return arr


def _real(value: Any, name: str) -> float:
    """``value`` as a float; bools, strings, ``None`` and NaN are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a real number; got {value!r}")
    out = float(value)
    if math.isnan(out):
        raise InvalidArgumentError(f"{name} must not be NaN")
    return out


def _count(value: Any, name: str) -> int:
    """``value`` as an int >= 1; bools and floats are refused (``2.5`` bins is a typo)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer >= 1; got {value!r}")
    if value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def _as_labels(values: ArrayLike, name: str = "labels") -> NDArray[np.int64]:
    """Return ``values`` as an int array of 0/1, or raise a ValueError that names the bad values."""
    arr = _as_1d(values, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidArgumentError(f"{name} must be numeric 0/1 (or bool); got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))  # NaN is not in (0, 1), so NaN labels are reported here too
    if bad.any():
        examples = np.unique(arr[bad])[:5].tolist()
        raise InvalidArgumentError(f"{name} must contain only 0 and 1; found other values such as {examples}")
    return arr.astype(np.int64)


def _as_scores(values: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    arr = _as_1d(values, name)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise InvalidArgumentError(f"{name} must be a numeric array; got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    n_nan = int(np.isnan(out).sum())
    if n_nan:
        # A missing signal must be excluded and counted upstream, never scored as some value.
        raise InvalidArgumentError(
            f"{name} contains {n_nan} NaN value(s); drop rows with a missing signal and report "
            "them separately"
        )
    return out


def _as_decision_scores(values: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    """Scores for the threshold metrics: ``+inf`` is refused there.

    The sweep needs a threshold above every score for "escalate everything" (``tau = +inf``
    under "escalate iff s < tau"); a row scored ``+inf`` is above every threshold, so the
    curve's end point, the operating point at 100% and ``call_rate(s, inf)`` would disagree.
    The rank metrics (AUROC, AUPRC, AURC) accept ``+inf``; ``-inf`` is valid everywhere.
    """
    s = _as_scores(values, name)
    n_inf = int(np.isposinf(s).sum())
    if n_inf:
        raise InvalidArgumentError(
            f"{name} contains +inf in {n_inf} row(s); threshold metrics (call rate, system "
            "accuracy, deferral curve, APGR, CPT, operating points) need every score below "
            "the 'escalate everything' threshold +inf: clip them to a large finite value"
        )
    return s


def _check_same_length(**arrays: NDArray[Any]) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise InvalidArgumentError(f"length mismatch: {detail}")


def _undefined(reason: str) -> float:
    warnings.warn(reason, UndefinedMetricWarning, stacklevel=3)
    return float("nan")


def _is_undefined(value: float | None) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _tie_averaged_ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``x``; tied values all receive the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tied block
    starts = ends - counts + 1
    return ((starts + ends) / 2.0)[inverse]


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic with tie-averaged ranks.

    With ``R_i`` the tie-averaged rank (1-based) of ``s_i`` among all ``n`` scores,
    ``n+ = sum(y)``, ``n- = n - n+`` and ``R+ = sum_{y_i = 1} R_i``::

        AUROC = (R+ - n+ (n+ + 1) / 2) / (n+ * n-)
              = P(s_pos > s_neg) + 0.5 * P(s_pos = s_neg)

    Identical to :func:`sklearn.metrics.roc_auc_score` whenever both classes are present.

    Args:
        labels: 0/1 per row, 1 = positive (for routing: the local answer is correct).
        scores: real-valued scores, higher = more likely positive. ``+-inf`` is allowed.

    Returns:
        AUROC in [0, 1], or ``nan`` (with an :class:`UndefinedMetricWarning`) when only one
        class is present.

    Raises:
        InvalidArgumentError: (a ``ValueError``) empty input, length mismatch, labels other
            than 0/1, missing or non-numeric values, or NaN scores.

    Example::

        >>> auroc([0, 1, 0, 1], [0.2, 0.9, 0.2, 0.2])   # pairs: (0.9>0.2)x2 + tie x2 -> 3/4
        0.75
    """
    y = _as_labels(labels)
    s = _as_scores(scores)
    _check_same_length(labels=y, scores=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return _undefined(
            f"AUROC is undefined with a single class (n_pos={n_pos}, n_neg={n_neg}); returning nan"
        )
    ranks = _tie_averaged_ranks(s)
    r_pos = float(ranks[y == 1].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auprc_error(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision for finding **local errors** (positives ``y = 0``, score ``-s``).

    Rows are ranked by ``-s`` descending; a block of tied scores is one step. With precision
    ``P_k`` and recall ``R_k`` after the k-th distinct threshold::

        AP = sum_k (R_k - R_{k-1}) * P_k,     R_0 = 0

    This equals ``sklearn.metrics.average_precision_score(1 - y, -s)``. The chance level is the
    error rate ``1 - mean(y)``, so report it beside AP.

    Returns:
        AP in [0, 1], or ``nan`` (with a warning) when there is no local error.

    Example::

        >>> # errors at s=0.1 and s=0.5; order by -s: 0.1(err) 0.3(ok) 0.5(err) 0.9(ok)
        >>> # P after each error: 1/1 and 2/3 -> AP = 0.5*1 + 0.5*2/3 = 0.8333...
        >>> round(auprc_error([0, 1, 0, 1], [0.1, 0.3, 0.5, 0.9]), 4)
        0.8333
    """
    y = _as_labels(labels)
    s = _as_scores(scores)
    _check_same_length(labels=y, scores=s)
    err = 1 - y
    n_err = int(err.sum())
    if n_err == 0:
        return _undefined("AUPRC-error is undefined: there are no local errors (all y = 1)")
    # Ascending s == descending -s; np.unique groups tied scores into one threshold step.
    _, inverse = np.unique(s, return_inverse=True)
    err_per_block = np.bincount(inverse, weights=err)
    rows_per_block = np.bincount(inverse)
    tp = np.cumsum(err_per_block)
    k = np.cumsum(rows_per_block)
    precision = tp / k
    recall_step = err_per_block / n_err
    return float(np.sum(recall_step * precision))


def risk_coverage(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Risk-coverage curve of selective prediction on the local model alone.

    Rows are sorted by ``s`` descending (most confident first). For ``k = 1..n``::

        coverage_k = k / n
        risk_k     = 1 - (1/k) * sum_{j <= k} y_(j)

    Ties are resolved by **averaging over each tied block**: inside a block of ``m`` tied rows
    containing ``c`` correct ones, the j-th row contributes ``c/m`` expected correct answers, which
    is the expectation over all orderings of the block. The curve therefore does not depend on
    the input order.

    Returns:
        ``(coverages, risks)``, two float arrays of length ``n``.

    Example::

        >>> cov, risk = risk_coverage([1, 0, 1], [0.9, 0.5, 0.1])
        >>> cov.tolist(), risk.round(4).tolist()
        ([0.3333333333333333, 0.6666666666666666, 1.0], [0.0, 0.5, 0.3333])
    """
    y = _as_labels(labels)
    s = _as_scores(scores)
    _check_same_length(labels=y, scores=s)
    n = len(y)
    # Blocks in descending score order: np.unique sorts ascending, so negate.
    _, inverse = np.unique(-s, return_inverse=True)
    correct_per_block = np.bincount(inverse, weights=y)
    rows_per_block = np.bincount(inverse)
    block_end = np.cumsum(rows_per_block)  # k at the end of each block
    correct_before = np.concatenate(([0.0], np.cumsum(correct_per_block)[:-1]))
    rows_before = block_end - rows_per_block
    k = np.arange(1, n + 1)
    block_of_k = np.searchsorted(block_end, k, side="left")  # block containing position k
    expected_correct = correct_before[block_of_k] + (k - rows_before[block_of_k]) * (
        correct_per_block[block_of_k] / rows_per_block[block_of_k]
    )
    risks = 1.0 - expected_correct / k
    return k / n, risks


def aurc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the risk-coverage curve: ``AURC = (1/n) * sum_k risk_k`` (lower is better).

    See :func:`risk_coverage` for ``risk_k`` and tie handling.

    Example::

        >>> # risks 0, 1/2, 1/3 -> (0 + 0.5 + 0.3333) / 3 = 0.2778
        >>> round(aurc([1, 0, 1], [0.9, 0.5, 0.1]), 4)
        0.2778
    """
    _, risks = risk_coverage(labels, scores)
    return float(risks.mean())


def e_aurc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Excess AURC: ``E-AURC = AURC - AURC*`` (lower is better; 0 = perfect ordering).

    ``AURC*`` is the AURC of the perfect ordering (correct rows first). With ``n+`` correct
    rows: ``risk*_k = 0`` for ``k <= n+`` and ``(k - n+) / k`` afterwards. Subtracting it
    removes the dependence on base accuracy.

    Example::

        >>> # AURC = 0.2778 (see aurc); AURC* = (0 + 0 + 1/3)/3 = 0.1111 -> 0.1667
        >>> round(e_aurc([1, 0, 1], [0.9, 0.5, 0.1]), 4)
        0.1667
    """
    y = _as_labels(labels)
    value = aurc(y, scores)
    n = len(y)
    n_pos = int(y.sum())
    k = np.arange(1, n + 1)
    optimal = np.where(k <= n_pos, 0.0, (k - n_pos) / k)
    return float(value - optimal.mean())


# --------------------------------------------------------------------------------------------
# Decision metrics: threshold sweep, deferral curve, APGR, CPT, operating points
# --------------------------------------------------------------------------------------------


def threshold_sweep(scores: ArrayLike) -> NDArray[np.float64]:
    """Thresholds that cover every achievable call rate: ``{-inf} U distinct(s) U {+inf}``.

    Under the policy "escalate iff s < tau", ``tau = -inf`` escalates nothing (r = 0), ``tau =
    +inf`` escalates everything (r = 1), and ``tau = s_(j)`` escalates exactly the rows scored
    strictly below the j-th distinct score.

    Returns:
        Sorted ascending float array of length ``n_distinct + 2``.

    Example::

        >>> threshold_sweep([0.5, 0.2, 0.5]).tolist()
        [-inf, 0.2, 0.5, inf]
    """
    s = _as_decision_scores(scores)
    return np.concatenate(([-np.inf], np.unique(s), [np.inf]))


def call_rate(scores: ArrayLike, tau: float) -> float:
    """Share of rows escalated at threshold ``tau``: ``r(tau) = (1/n) * sum 1[s_i < tau]``.

    Example::

        >>> call_rate([0.1, 0.5, 0.9, 0.5], 0.5)
        0.25
    """
    s = _as_decision_scores(scores)
    tau = _real(tau, "tau")
    return float(np.mean(s < tau))


def system_accuracy(
    labels: ArrayLike, cloud_labels: ArrayLike, scores: ArrayLike, tau: float
) -> float:
    """Cascade accuracy at ``tau``: ``A(tau) = (1/n) * sum [(1 - e_i) y_i + e_i z_i]``.

    ``e_i = 1[s_i < tau]``; the escalated rows are answered by the cloud (``z``), the rest by the
    local model (``y``).

    Example::

        >>> # escalate the row with s=0.1 (y=0 -> z=1); keep the others (y=1, y=0) -> 2/3
        >>> round(system_accuracy([0, 1, 0], [1, 1, 1], [0.1, 0.9, 0.5], 0.3), 4)
        0.6667
    """
    y = _as_labels(labels)
    z = _as_labels(cloud_labels, "cloud_labels")
    s = _as_decision_scores(scores)
    _check_same_length(labels=y, cloud_labels=z, scores=s)
    tau = _real(tau, "tau")
    e = s < tau
    return float(np.mean(np.where(e, z, y)))


@dataclass(frozen=True)
class DeferralCurve:
    """Every point ``(r(tau), A(tau))`` of the threshold sweep, plus the end points.

    Attributes:
        thresholds: ``{-inf} U distinct(s) U {+inf}``, ascending (see :func:`threshold_sweep`).
        call_rates: ``r(tau)`` per threshold (non-decreasing, from 0 to 1).
        accuracies: ``A(tau)`` per threshold.
        local_accuracy: ``A_L = mean(y)`` (always local, r = 0).
        cloud_accuracy: ``A_C = mean(z)`` (always cloud, r = 1).
        gain: ``sum_{escalated}(z_i - y_i)`` per threshold, an integer count; ``A(tau) - A_L =
            gain / n``. Kept exact so PGR comparisons do not suffer float round-off.
        n: number of rows.
    """

    thresholds: NDArray[np.float64]
    call_rates: NDArray[np.float64]
    accuracies: NDArray[np.float64]
    local_accuracy: float
    cloud_accuracy: float
    gain: NDArray[np.int64]
    n: int

    @property
    def gap_count(self) -> int:
        """``n * (A_C - A_L)`` as an exact integer (``sum z - sum y``)."""
        return int(self.gain[-1])

    def pgr(self, min_gap: float = 0.0) -> NDArray[np.float64] | None:
        """``PGR(tau) = (A(tau) - A_L) / (A_C - A_L)``, or ``None`` if ``|A_C - A_L| <= min_gap``.

        PGR can be negative (escalation hurting) or exceed 1 (an ordering that escalates the
        fixable errors first when the cloud is sometimes wrong where local is right).
        """
        if abs(self.gap_count) / self.n <= min_gap:
            return None
        return self.gain / float(self.gap_count)


def deferral_curve(labels: ArrayLike, cloud_labels: ArrayLike, scores: ArrayLike) -> DeferralCurve:
    """Compute the deferral curve ``(r(tau), A(tau))`` for every ``tau`` of :func:`threshold_sweep`.

    ``O(n log n)``: rows are grouped by distinct score and cumulated, instead of re-evaluating
    each threshold.

    Example::

        >>> c = deferral_curve([0, 1, 1], [1, 1, 0], [0.2, 0.6, 0.9])
        >>> c.call_rates.tolist()      # tau = -inf, 0.2, 0.6, 0.9, +inf
        [0.0, 0.0, 0.3333333333333333, 0.6666666666666666, 1.0]
        >>> c.accuracies.round(4).tolist()
        [0.6667, 0.6667, 1.0, 1.0, 0.6667]
    """
    y = _as_labels(labels)
    z = _as_labels(cloud_labels, "cloud_labels")
    s = _as_decision_scores(scores)
    _check_same_length(labels=y, cloud_labels=z, scores=s)
    n = len(y)
    uniq, inverse = np.unique(s, return_inverse=True)
    rows_per_block = np.bincount(inverse, minlength=len(uniq))
    gain_per_block = np.bincount(inverse, weights=(z - y), minlength=len(uniq))
    # At tau = uniq[j] the escalated rows are the blocks strictly below j, so the cumulative
    # sums shifted by one give tau = uniq[0..m-1] (uniq[0] escalates nothing) and +inf (all);
    # a second leading zero is the tau = -inf point.
    escalated = np.concatenate(([0, 0], np.cumsum(rows_per_block)))
    # Integer counts: z - y is in {-1, 0, 1}, so rint only removes bincount's float dtype.
    gain = np.rint(np.concatenate(([0.0, 0.0], np.cumsum(gain_per_block)))).astype(np.int64)
    thresholds = np.concatenate(([-np.inf], uniq, [np.inf]))
    a_local = float(y.mean())
    return DeferralCurve(
        thresholds=thresholds,
        call_rates=escalated / n,
        accuracies=a_local + gain / n,
        local_accuracy=a_local,
        cloud_accuracy=float(z.mean()),
        gain=gain,
        n=n,
    )


def _pgr_or_reason(curve: DeferralCurve, min_gap: float, what: str) -> NDArray[np.float64] | None:
    gap = _real(min_gap, "min_gap")
    if not 0.0 <= gap < 1.0:
        raise InvalidArgumentError(f"min_gap must be in [0, 1); got {min_gap!r}")
    pgr = curve.pgr(gap)
    if pgr is None:
        _undefined(
            f"{what} is undefined: the cloud-local accuracy gap A_C - A_L = "
            f"{curve.cloud_accuracy:.6g} - {curve.local_accuracy:.6g} is within min_gap="
            f"{min_gap:g}, so PGR = (A - A_L)/(A_C - A_L) has no meaningful denominator"
        )
    return pgr


def apgr(
    labels: ArrayLike,
    cloud_labels: ArrayLike,
    scores: ArrayLike,
    *,
    min_gap: float = 0.0,
) -> float:
    """Average performance-gap recovered: ``APGR = integral_0^1 PGR(r) dr`` (trapezoid rule).

    ``PGR(tau) = (A(tau) - A_L) / (A_C - A_L)`` over the deferral-curve points sorted by call
    rate, from ``r = 0`` (tau = -inf) to ``r = 1`` (tau = +inf). References: random escalation
    gives about 0.5; the oracle ordering is the ceiling.

    Args:
        min_gap: APGR is reported as undefined when ``|A_C - A_L| <= min_gap``. The default 0
            only refuses an exactly zero gap; raise it (e.g. 0.02) to refuse a gap too small
            for PGR to be more than noise.

    Returns:
        APGR, or ``nan`` with an :class:`UndefinedMetricWarning` explaining the gap when
        undefined.

    Example::

        >>> # A_L = 1/3, A_C = 2/3; (r, PGR) = (0,0) (0,0) (1/3,1) (2/3,2) (1,1): escalating the
        >>> # two fixable errors first overshoots (PGR 2), then the harmful escalation gives 1.
        >>> # trapezoids: 0 + (1/3)(0+1)/2 + (1/3)(1+2)/2 + (1/3)(2+1)/2 = 1/6 + 1/2 + 1/2 = 7/6
        >>> round(apgr([0, 0, 1], [1, 1, 0], [0.1, 0.2, 0.9]), 4)
        1.1667
    """
    curve = deferral_curve(labels, cloud_labels, scores)
    pgr = _pgr_or_reason(curve, min_gap, "APGR")
    if pgr is None:
        return float("nan")
    r = curve.call_rates
    return float(np.sum(np.diff(r) * (pgr[1:] + pgr[:-1]) / 2.0))


def cpt(
    labels: ArrayLike,
    cloud_labels: ArrayLike,
    scores: ArrayLike,
    x: float,
    *,
    min_gap: float = 0.0,
) -> float:
    """Call-rate to reach a share ``x`` of the gap: ``CPT(x) = min { r(tau) : PGR(tau) >= x }``.

    ``x`` is a fraction (``0.5`` for CPT(50%)). The minimum is taken over the swept points, not
    interpolated. A tolerance of ``1e-12`` absorbs float round-off in ``PGR >= x``.

    Returns:
        The call rate, or ``nan`` with an :class:`UndefinedMetricWarning` when PGR is undefined
        (see :func:`apgr`) or when no point reaches ``x`` (only possible for ``x > 1``).

    Example::

        >>> # PGR per point: 0, 0, 1, 2, 1 at r = 0, 0, 1/3, 2/3, 1 -> CPT(0.5) = 1/3
        >>> round(cpt([0, 0, 1], [1, 1, 0], [0.1, 0.2, 0.9], 0.5), 4)
        0.3333
    """
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise InvalidArgumentError(f"x must be a finite fraction such as 0.5; got {x!r}")
    curve = deferral_curve(labels, cloud_labels, scores)
    pgr = _pgr_or_reason(curve, min_gap, f"CPT({x:g})")
    if pgr is None:
        return float("nan")
    reached = pgr >= x - 1e-12
    if not reached.any():
        return _undefined(f"CPT({x:g}) not reachable: max PGR over the sweep is {pgr.max():.6g}")
    return float(curve.call_rates[reached].min())


@dataclass(frozen=True)
class OperatingPoint:
    """One row of :func:`operating_points`.

    Attributes:
        requested_fraction: the escalation budget asked for.
        escalated_fraction: ``n_escalated / n`` actually escalated (``<= requested_fraction``).
        n_escalated: number of rows escalated (the lowest-scored ones).
        threshold: the lowest **kept** score, i.e. the ``tau`` of "escalate iff s < tau";
            ``+inf`` when every row is escalated. See ``ties_split``.
        ties_split: True when rows scored exactly ``threshold`` were split between escalated
            and kept (so the realised fraction is not reachable by a pure threshold rule).
        coverage: share of rows kept local, ``1 - escalated_fraction``.
        kept_accuracy: mean ``y`` over kept rows (``nan`` when nothing is kept).
        kept_correct_share: ``(1/n) * sum_{kept} y_i``. A lower bound on system accuracy (cloud
            always wrong); ``kept_correct_share + escalated_fraction`` is the upper bound
            (cloud always right).
        system_accuracy: ``(1/n) * sum [kept: y_i, escalated: z_i]`` when cloud labels were
            given, else ``None`` (cloud correctness of escalated rows is unknown; it is neither
            counted right nor wrong -- use the bounds above).
    """

    requested_fraction: float
    escalated_fraction: float
    n_escalated: int
    threshold: float
    ties_split: bool
    coverage: float
    kept_accuracy: float
    kept_correct_share: float
    system_accuracy: float | None


def operating_points(
    labels: ArrayLike,
    scores: ArrayLike,
    escalation_fractions: Sequence[float] = DEFAULT_ESCALATION_FRACTIONS,
    cloud_labels: ArrayLike | None = None,
) -> list[OperatingPoint]:
    """Escalate the lowest-scored share of rows for each budget and report the result.

    For a budget ``f`` the ``m = floor(f * n)`` lowest-scored rows are escalated (``floor``: a
    budget is never exceeded; a ``1e-9`` slack absorbs float error such as ``0.29 * 100``). Ties
    are broken by input order (stable sort), so the result is deterministic; ``ties_split``
    flags a point where that mattered.

    Args:
        labels: local correctness ``y``.
        scores: confidence, higher = keep local.
        escalation_fractions: budgets in ``[0, 1]``; default ``0, 0.1, ..., 1.0``.
        cloud_labels: cloud correctness ``z``; enables ``system_accuracy``.

    Returns:
        One :class:`OperatingPoint` per requested fraction, in the given order.

    Example::

        >>> pts = operating_points([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.3], (0.0, 0.5))
        >>> [(p.n_escalated, p.threshold, p.kept_accuracy) for p in pts]
        [(0, 0.1, 0.5), (2, 0.6, 1.0)]
    """
    y = _as_labels(labels)
    s = _as_decision_scores(scores)
    _check_same_length(labels=y, scores=s)
    z: NDArray[np.int64] | None = None
    if cloud_labels is not None:
        z = _as_labels(cloud_labels, "cloud_labels")
        _check_same_length(labels=y, cloud_labels=z)
    if isinstance(escalation_fractions, (str, bytes)) or not isinstance(
        escalation_fractions, Iterable
    ):
        raise InvalidArgumentError(
            "escalation_fractions must be a sequence of fractions such as (0.1, 0.3); got "
            f"{escalation_fractions!r}"
        )
    fractions = [_real(f, "each escalation fraction") for f in escalation_fractions]
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise InvalidArgumentError(f"escalation fractions must be in [0, 1]; got {f}")
    n = len(y)
    order = np.argsort(s, kind="stable")  # ascending: the first m rows are escalated
    s_sorted = s[order]
    y_sorted = y[order]
    z_sorted = z[order] if z is not None else None
    cum_y = np.concatenate(([0], np.cumsum(y_sorted)))  # cum_y[m] = sum of y over escalated
    cum_z = np.concatenate(([0], np.cumsum(z_sorted))) if z_sorted is not None else None
    total_y = int(cum_y[-1])

    points: list[OperatingPoint] = []
    for f in fractions:
        m = min(n, math.floor(f * n + 1e-9))
        kept = n - m
        threshold = float(s_sorted[m]) if m < n else math.inf
        ties_split = 0 < m < n and s_sorted[m - 1] == s_sorted[m]
        kept_correct = total_y - int(cum_y[m])
        sys_acc = None
        if cum_z is not None:
            sys_acc = (kept_correct + int(cum_z[m])) / n
        points.append(
            OperatingPoint(
                requested_fraction=f,
                escalated_fraction=m / n,
                n_escalated=m,
                threshold=threshold,
                ties_split=bool(ties_split),
                coverage=kept / n,
                kept_accuracy=kept_correct / kept if kept else float("nan"),
                kept_correct_share=kept_correct / n,
                system_accuracy=sys_acc,
            )
        )
    return points


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _as_probabilities(values: ArrayLike, name: str = "probs") -> NDArray[np.float64]:
    p = _as_scores(values, name)
    if (p < 0).any() or (p > 1).any():
        raise InvalidArgumentError(
            f"{name} must lie in [0, 1]; got min={p.min():.6g}, max={p.max():.6g}"
        )
    return p


def ece(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10, strategy: str = "uniform") -> float:
    """Expected calibration error: ``ECE = sum_m (|B_m|/n) * |acc(B_m) - conf(B_m)|``.

    ``acc`` = mean ``y`` and ``conf`` = mean ``p`` in bin ``B_m``; empty bins are skipped.

    Args:
        probs: calibrated probabilities of correctness in ``[0, 1]`` (not raw scores).
        n_bins: number of bins ``M``.
        strategy: ``"uniform"`` -- equal-width bins ``[m/M, (m+1)/M)``, the last one closed at
            1; ``"quantile"`` -- adaptive ECE, equal-mass bins over the rows sorted by ``p``
            (sizes differ by at most one; ties may straddle bins).

    Example::

        >>> # bins (M=2): [0, .5) holds p=.2,.4 (y=0,1): |0.5-0.3| = 0.2
        >>> #             [.5, 1] holds p=.9,.9 (y=1,1): |1.0-0.9| = 0.1  -> 0.5*0.2 + 0.5*0.1
        >>> round(ece([0, 1, 1, 1], [0.2, 0.4, 0.9, 0.9], n_bins=2), 4)
        0.15
    """
    y = _as_labels(labels)
    p = _as_probabilities(probs)
    _check_same_length(labels=y, probs=p)
    n_bins = _count(n_bins, "n_bins")
    n = len(y)
    if strategy == "uniform":
        bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    elif strategy == "quantile":
        bins = np.empty(n, dtype=np.int64)
        for m, chunk in enumerate(np.array_split(np.argsort(p, kind="stable"), n_bins)):
            bins[chunk] = m
    else:
        raise InvalidArgumentError(f"strategy must be 'uniform' or 'quantile'; got {strategy!r}")
    counts = np.bincount(bins, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=y, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=p, minlength=n_bins)
    nonempty = counts > 0
    gaps = np.abs(acc_sum[nonempty] - conf_sum[nonempty]) / counts[nonempty]
    return float(np.sum(counts[nonempty] / n * gaps))


def brier(labels: ArrayLike, probs: ArrayLike) -> float:
    """Brier score: ``(1/n) * sum (p_i - y_i)^2`` (lower is better).

    Example::

        >>> round(brier([1, 0], [0.8, 0.4]), 10)   # ((0.2)^2 + (0.4)^2) / 2
        0.1
    """
    y = _as_labels(labels)
    p = _as_probabilities(probs)
    _check_same_length(labels=y, probs=p)
    return float(np.mean((p - y) ** 2))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap CI of a metric.

    Attributes:
        estimate: the metric on the full data.
        low, high: ``100*alpha/2`` and ``100*(1-alpha/2)`` percentiles of the defined resampled
            values (``nan`` if none was defined).
        n_resamples_used: resamples where the metric was defined.
        n_dropped: resamples dropped because the metric was undefined (e.g. single class).
    """

    estimate: float
    low: float
    high: float
    n_resamples_used: int
    n_dropped: int


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Paired bootstrap of ``delta = M(a) - M(b)`` on shared resample indices.

    Attributes:
        delta: ``M(a) - M(b)`` on the full data.
        low, high: percentile CI of the resampled deltas ``delta*_k``.
        p_value: approximate one-sided p, the share of ``delta*_k <= 0``.
        significant: True iff the CI excludes 0 (``low > 0`` or ``high < 0``).
        n_resamples_used: resamples where both metrics were defined.
        n_dropped: resamples dropped because either metric was undefined.
    """

    delta: float
    low: float
    high: float
    p_value: float
    significant: bool
    n_resamples_used: int
    n_dropped: int


def _check_bootstrap_args(n: int, n_resamples: int, alpha: float) -> None:
    if n == 0:
        raise InvalidArgumentError("labels is empty; need at least one row")
    _count(n_resamples, "n_resamples")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise InvalidArgumentError(f"alpha must be in (0, 1); got {alpha}")


def _resample_indices(n: int, n_resamples: int, seed: int | None) -> Iterator[NDArray[np.int64]]:
    # One rng.integers(0, n, size=n) call per resample, in order: the draw sequence of the paper's
    # protocol (numpy default_rng(seed)). Drawing all resamples as one (B, n) block would be a
    # different stream, and would hold B*n indices in memory at once.
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield rng.integers(0, n, size=n)


def _percentile_ci(values: NDArray[np.float64], alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _as_float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _length(values: ArrayLike, name: str) -> NDArray[Any]:
    arr = np.asarray(_materialize(values, name))
    if arr.ndim == 0:
        raise InvalidArgumentError(f"{name} must be an array with one entry per row; got a scalar")
    if arr.ndim == 1 and arr.dtype == object and arr.size:
        arr = _object_to_numeric(arr, name)  # once here, not in every resample
    return arr


def bootstrap_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    metric: Metric = auroc,
    n_resamples: int = 1000,
    seed: int | None = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Percentile bootstrap confidence interval of ``metric(labels, scores)``.

    Draws ``n_resamples`` resamples of the ``n`` row indices with replacement from
    ``numpy.random.default_rng(seed)`` (one ``rng.integers(0, n, size=n)`` per resample),
    recomputes the metric on each, drops resamples where it is undefined (``nan``/``None``,
    e.g. a single class for AUROC) and reports the ``alpha/2`` and ``1 - alpha/2`` percentiles
    (``numpy.percentile``, linear interpolation). ``n_resamples=1000, seed=0`` reproduces the
    paper; use >= 2000 for final reports.

    ``labels`` and ``scores`` are resampled along their first axis only, so a metric that needs
    more per-row data can receive it packed in ``labels`` (for example an ``(n, 2)`` array of
    ``(y, z)`` with ``metric=lambda yz, s: apgr(yz[:, 0], yz[:, 1], s)``).

    Example::

        >>> r = bootstrap_ci([0, 1, 0, 1, 1, 0, 1, 0], [.1, .9, .3, .7, .4, .5, .8, .2],
        ...                  n_resamples=100, seed=0)
        >>> r.estimate, r.n_resamples_used + r.n_dropped
        (0.9375, 100)
    """
    y = _length(labels, "labels")
    s = _length(scores, "scores")
    _check_same_length(labels=y, scores=s)
    n = len(y)
    _check_bootstrap_args(n, n_resamples, alpha)
    estimate = _as_float(metric(y, s))  # also validates the inputs through the metric itself
    values: list[float] = []
    dropped = 0
    with warnings.catch_warnings():
        # Undefined resamples are expected and counted; one warning each would be noise.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for idx in _resample_indices(n, n_resamples, seed):
            value = metric(y[idx], s[idx])
            if _is_undefined(value):
                dropped += 1
            else:
                values.append(_as_float(value))
    low, high = _percentile_ci(np.asarray(values, dtype=np.float64), alpha)
    return BootstrapResult(
        estimate=estimate,
        low=low,
        high=high,
        n_resamples_used=len(values),
        n_dropped=dropped,
    )


def paired_bootstrap_delta(
    labels: ArrayLike,
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    metric: Metric = auroc,
    n_resamples: int = 1000,
    seed: int | None = 0,
    alpha: float = 0.05,
) -> PairedBootstrapResult:
    """Paired bootstrap of ``delta = metric(labels, a) - metric(labels, b)``.

    Both scorers are evaluated on the **same** resample indices (drawn as in
    :func:`bootstrap_ci`): ``delta*_k = M_a(k) - M_b(k)``. The CI is the percentile interval of
    the ``delta*_k``; ``p_value`` = share of ``delta*_k <= 0`` (approximate one-sided p for
    "a is better"); ``significant`` iff the CI excludes 0. Resamples where either metric is
    undefined are dropped and counted.

    Example::

        >>> y = [0, 1, 0, 1, 1, 0, 1, 0]
        >>> s = [.1, .9, .3, .7, .4, .5, .8, .2]
        >>> r = paired_bootstrap_delta(y, s, s, n_resamples=50)
        >>> (r.delta, r.low, r.high, r.significant)
        (0.0, 0.0, 0.0, False)
    """
    y = _length(labels, "labels")
    a = _length(scores_a, "scores_a")
    b = _length(scores_b, "scores_b")
    _check_same_length(labels=y, scores_a=a, scores_b=b)
    n = len(y)
    _check_bootstrap_args(n, n_resamples, alpha)
    delta = _as_float(metric(y, a)) - _as_float(metric(y, b))
    deltas: list[float] = []
    dropped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for idx in _resample_indices(n, n_resamples, seed):
            ya = y[idx]
            va = metric(ya, a[idx])
            vb = metric(ya, b[idx])
            if _is_undefined(va) or _is_undefined(vb):
                dropped += 1
            else:
                deltas.append(_as_float(va) - _as_float(vb))
    d = np.asarray(deltas, dtype=np.float64)
    low, high = _percentile_ci(d, alpha)
    p_value = float(np.mean(d <= 0)) if d.size else float("nan")
    significant = bool(d.size) and (low > 0 or high < 0)
    return PairedBootstrapResult(
        delta=delta,
        low=low,
        high=high,
        p_value=p_value,
        significant=significant,
        n_resamples_used=int(d.size),
        n_dropped=dropped,
    )
