"""Choosing the routing threshold: label-free online (target call rate) and labelled offline.

Two tools, both for the policy **escalate iff score < threshold** (the router's rule, see
:func:`confidence_router.policy.decide_after_generation`):

* :class:`RollingQuantileThreshold` - online and label-free. It keeps the last ``window`` known
  confidence scores and sets the threshold to their ``target_rate``-quantile, so that about a
  ``target_rate`` share of queries is escalated whatever the score distribution of the traffic
  is (docs/how-it-works.md §5.2, "call-rate drift"). It reports the
  realised call rate of its own decisions and the drift from the target.
* :func:`calibrate_threshold` - offline, from an evaluation run: the threshold for a target call
  rate, or the lowest call rate whose accuracy reaches a target (docs/how-it-works.md §5.2, "operating
  rate at a quality target"). An unreachable target is reported as such, never replaced by a
  silent best effort. :func:`load_scores_from_run` reads the arrays from an evaluation database
  written by :mod:`confidence_router.evaluation.runner`.

Pure stdlib (no numpy, no LangChain), so the router can use it in its hot path.

Example (online)::

    >>> rq = RollingQuantileThreshold(target_rate=0.25, window=8, min_samples=4)
    >>> rq.threshold                      # not enough scores yet: the initial threshold
    0.7
    >>> for s in (0.9, 0.2, 0.6, 0.4, 0.8, 0.7, 0.3, 0.5):
    ...     rq.observe(s)
    >>> rq.threshold                      # floor(0.25 * 8) = 2 scores lie strictly below it
    0.4

Example (offline, labelled)::

    >>> r = calibrate_threshold([0.1, 0.4, 0.6, 0.9], [0, 0, 1, 1], target_accuracy=1.0)
    >>> r.threshold, r.expected_call_rate, r.expected_accuracy, r.reachable
    (0.6, 0.5, 1.0, True)
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import numbers
import os
import sqlite3
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confidence_router.errors import InvalidArgumentError, InvalidStateError, InvalidTypeError
from confidence_router.extraction import decode_tokens
from confidence_router.signals import SIGNAL_SCORERS, answer_signals, score_for

__all__ = [
    "CalibrationResult",
    "EvalDatabaseError",
    "InvalidStateError",
    "RollingQuantileThreshold",
    "RunScores",
    "calibrate_run",
    "calibrate_threshold",
    "database_errors",
    "load_scores_from_run",
    "read_json_state",
    "write_json_atomic",
]

# Float slack for "rate * n" products such as 0.29 * 100 = 28.999999999999996, which must
# count as 29 rows (same convention as evaluation.metrics.operating_points).
_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# JSON state files (shared with confidence_router.budget)
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically.

    The JSON goes to a temporary file in the same directory, is flushed and fsynced, then
    ``os.replace``-d over ``path``: a reader (or a crash) sees the old file or the new one,
    never a half-written one. Non-finite floats are refused (``allow_nan=False``) because
    they are not valid JSON.
    """
    target = Path(path)
    text = json.dumps(obj, allow_nan=False, sort_keys=True, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json_atomic`.

    Raises:
        FileNotFoundError: no such file.
        InvalidStateError: the file is not valid JSON or not a JSON object (corrupt state).
    """
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidStateError(
            f"{os.fspath(path)}: corrupt state file, not valid JSON ({error})"
        ) from None
    except RecursionError:
        raise InvalidStateError(
            f"{os.fspath(path)}: corrupt state file, JSON nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise InvalidStateError(
            f"{os.fspath(path)}: corrupt state file, expected a JSON object, got "
            f"{type(data).__name__}"
        )
    return data


def _is_bool(value: Any) -> bool:
    # numpy's bool (``bool_``) is no bool subclass; recognised by type to stay numpy-free.
    kind = type(value)
    return isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    )


def _finite_number(value: Any, name: str) -> float:
    """``value`` as a float; ``InvalidTypeError`` (a ``TypeError``) for a non-number (bools
    included; numpy scalars are numbers), ``InvalidArgumentError`` for NaN or an infinity."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise InvalidArgumentError(
            f"{name} must be finite, got an integer too large for a float"
        ) from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return number


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Online, label-free: rolling quantile
# --------------------------------------------------------------------------------------------

_ROLLING_KIND = "confidence_router.RollingQuantileThreshold"
_ROLLING_VERSION = 1


class RollingQuantileThreshold:
    """A threshold that keeps the escalation rate near ``target_rate``, without labels.

    **Quantile definition.** With the last ``n`` known scores sorted ascending,
    ``x[0] <= x[1] <= ... <= x[n-1]``, and ``k = floor(target_rate * n)``, the threshold is
    ``x[k]``. Under "escalate iff score < threshold" exactly the scores strictly below ``x[k]``
    are escalated: ``k`` of them when ``x[k-1] < x[k]``, fewer when ``x[k]`` is tied with lower
    positions. So the in-window rate is the largest achievable rate **not above** the target
    (the "lower" empirical quantile): on continuous data it lies in
    ``(target - 1/n, target]``; ties can lower it further, by at most the share of the scores
    tied with ``x[k]``. The threshold is always one of the observed scores, so it stays in
    their range (``[0, 1]`` for the router's sigmoid scores).

    Until ``min_samples`` known scores have been seen, ``threshold`` is ``initial_threshold``.

    **Unknown scores.** ``observe(None)`` (no logprobs) is counted separately and never enters
    the quantile: the router's ``on_unknown`` policy handles those queries, so with
    ``on_unknown="escalate"`` the total call rate is about
    ``target_rate * (1 - unknown_rate) + unknown_rate``.

    **Realised rate and drift.** Each known observation also records whether it was escalated:
    the ``escalated`` argument when given (pass the router's actual decision), else
    ``score < threshold`` with the threshold in force just before the observation.
    ``realised_rate`` is the escalated share of the window and ``drift = realised - target``:
    this measures the controller on the traffic it actually saw, e.g. a burst of
    out-of-distribution queries (docs/how-it-works.md §5.2).

    **Concurrency.** Every method takes one ``threading.Lock`` for O(window) work at most (an
    insertion into a sorted list); ``threshold`` is O(1). Nothing awaits or blocks on I/O, so it
    is safe to call from threads and from asyncio code alike.

    Args:
        target_rate: the escalation share to aim for, strictly between 0 and 1.
        window: how many recent known scores define the quantile.
        min_samples: known scores needed before the quantile replaces ``initial_threshold``.
        initial_threshold: the threshold used during warm-up (the paper's default 0.7).

    Example::

        >>> rq = RollingQuantileThreshold(target_rate=0.5, window=4, min_samples=2)
        >>> rq.observe(0.2); rq.observe(None); rq.observe(0.8)
        >>> rq.threshold, rq.n_known, rq.n_unknown
        (0.8, 2, 1)
    """

    def __init__(
        self,
        target_rate: float,
        window: int = 500,
        min_samples: int = 50,
        initial_threshold: float = 0.7,
    ) -> None:
        rate = _finite_number(target_rate, "target_rate")
        if not 0.0 < rate < 1.0:
            raise InvalidArgumentError(
                f"target_rate must be strictly between 0 and 1, got {target_rate!r} (0 = never "
                "escalate: use allow_escalation=False; 1 = always escalate: call the cloud)"
            )
        self._target = rate
        self._window = _positive_int(window, "window")
        self._min_samples = _positive_int(min_samples, "min_samples")
        if self._min_samples > self._window:
            raise InvalidArgumentError(f"min_samples ({min_samples}) must not exceed window ({window})")
        self._initial = _finite_number(initial_threshold, "initial_threshold")
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        # Arrival order (oldest first) of the known scores and their escalation flags.
        self._scores: deque[float] = deque()
        self._escalated: deque[bool] = deque()
        self._n_escalated = 0
        # The same scores kept sorted, for an O(1) quantile and O(window) updates.
        self._sorted: list[float] = []
        # The last `window` observations: True where the score was unknown.
        self._recent_unknown: deque[bool] = deque()
        self._n_recent_unknown = 0
        self._n_known_total = 0
        self._n_unknown_total = 0

    # -- configuration -----------------------------------------------------------------------

    @property
    def target_rate(self) -> float:
        """The escalation share aimed for."""
        return self._target

    @property
    def window(self) -> int:
        """How many recent known scores define the quantile."""
        return self._window

    @property
    def min_samples(self) -> int:
        """Known scores needed before the quantile is used."""
        return self._min_samples

    @property
    def initial_threshold(self) -> float:
        """The warm-up threshold."""
        return self._initial

    # -- updates -----------------------------------------------------------------------------

    def observe(self, score: float | None, *, escalated: bool | None = None) -> None:
        """Record one query's confidence (``None`` = unknown).

        Args:
            score: the confidence the decision was based on, or ``None`` when unknown.
            escalated: whether this query was escalated because of its score. Pass the
                router's decision when you have it: under concurrency the threshold may move
                between the router reading it and this call. Default: ``score < threshold``
                with the current threshold. Ignored for unknown scores.

        Raises:
            ValueError: ``score`` is NaN or infinite (a bug upstream, not an "unknown").
        """
        if score is not None:
            score = _finite_number(score, "score")
        if escalated is not None and not isinstance(escalated, bool):
            raise InvalidArgumentError(f"escalated must be a bool or None, got {escalated!r}")
        with self._lock:
            self._push_recent(score is None)
            if score is None:
                self._n_unknown_total += 1
                return
            if escalated is None:
                escalated = score < self._threshold_locked()
            self._n_known_total += 1
            self._scores.append(score)
            self._escalated.append(escalated)
            self._n_escalated += escalated
            bisect.insort(self._sorted, score)
            if len(self._scores) > self._window:
                old = self._scores.popleft()
                self._n_escalated -= self._escalated.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]

    def _push_recent(self, unknown: bool) -> None:
        self._recent_unknown.append(unknown)
        self._n_recent_unknown += unknown
        if len(self._recent_unknown) > self._window:
            self._n_recent_unknown -= self._recent_unknown.popleft()

    def reset(self) -> None:
        """Forget every observation (back to warm-up)."""
        with self._lock:
            self._clear()

    # -- readings ----------------------------------------------------------------------------

    def _threshold_locked(self) -> float:
        n = len(self._sorted)
        if n < self._min_samples:
            return self._initial
        k = min(n - 1, math.floor(self._target * n + _EPS))
        return self._sorted[k]

    @property
    def threshold(self) -> float:
        """The threshold to route with now (see the class docstring for the definition)."""
        with self._lock:
            return self._threshold_locked()

    @property
    def ready(self) -> bool:
        """Whether the quantile is in use (at least ``min_samples`` known scores)."""
        with self._lock:
            return len(self._sorted) >= self._min_samples

    @property
    def n_known(self) -> int:
        """Known scores in the window."""
        with self._lock:
            return len(self._sorted)

    @property
    def n_unknown(self) -> int:
        """Unknown scores observed since construction or :meth:`reset`."""
        with self._lock:
            return self._n_unknown_total

    @property
    def unknown_rate(self) -> float | None:
        """Share of unknown scores among the last ``window`` observations (``None``: none yet)."""
        with self._lock:
            n = len(self._recent_unknown)
            return self._n_recent_unknown / n if n else None

    @property
    def realised_rate(self) -> float | None:
        """Share of the window's known-score queries that were escalated (``None``: empty)."""
        with self._lock:
            n = len(self._escalated)
            return self._n_escalated / n if n else None

    @property
    def drift(self) -> float | None:
        """``realised_rate - target_rate`` (``None`` when the window is empty)."""
        realised = self.realised_rate
        return None if realised is None else realised - self._target

    def in_window_rate(self, threshold: float | None = None) -> float | None:
        """Share of the window's known scores strictly below ``threshold`` (default: the
        current threshold) - the rate this threshold *would* give on the recent traffic."""
        with self._lock:
            n = len(self._sorted)
            if not n:
                return None
            tau = self._threshold_locked() if threshold is None else threshold
            return bisect.bisect_left(self._sorted, tau) / n

    def snapshot(self) -> dict[str, Any]:
        """A consistent summary for monitoring (one lock acquisition)."""
        with self._lock:
            n = len(self._sorted)
            n_obs = len(self._recent_unknown)
            realised = self._n_escalated / n if n else None
            return {
                "target_rate": self._target,
                "threshold": self._threshold_locked(),
                "ready": n >= self._min_samples,
                "window": self._window,
                "n_known": n,
                "n_known_total": self._n_known_total,
                "n_unknown_total": self._n_unknown_total,
                "unknown_rate": self._n_recent_unknown / n_obs if n_obs else None,
                "realised_rate": realised,
                "drift": None if realised is None else realised - self._target,
            }

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the whole state (configuration and window)."""
        with self._lock:
            return {
                "kind": _ROLLING_KIND,
                "version": _ROLLING_VERSION,
                "target_rate": self._target,
                "window": self._window,
                "min_samples": self._min_samples,
                "initial_threshold": self._initial,
                "scores": list(self._scores),
                "escalated": list(self._escalated),
                "recent_unknown": list(self._recent_unknown),
                "n_known_total": self._n_known_total,
                "n_unknown_total": self._n_unknown_total,
            }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RollingQuantileThreshold:
        """Rebuild from :meth:`state` output.

        Raises:
            InvalidStateError: (a ``ValueError``) the state is not a valid
                ``RollingQuantileThreshold`` state: wrong kind or version, missing keys,
                values of the wrong type or out of range, inconsistent lengths.
        """
        try:
            return cls._from_state(state)
        except InvalidStateError:
            raise
        except (TypeError, ValueError) as error:
            raise InvalidStateError(f"invalid RollingQuantileThreshold state: {error}") from None

    @classmethod
    def _from_state(cls, state: Mapping[str, Any]) -> RollingQuantileThreshold:
        if not isinstance(state, Mapping):
            raise InvalidTypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("kind") != _ROLLING_KIND:
            raise InvalidStateError(
                f"not a RollingQuantileThreshold state: kind={state.get('kind')!r}"
            )
        if state.get("version") != _ROLLING_VERSION:
            raise InvalidStateError(
                f"unsupported RollingQuantileThreshold state version {state.get('version')!r} "
                f"(this library reads version {_ROLLING_VERSION})"
            )
        required = (
            "target_rate", "window", "min_samples", "initial_threshold", "scores", "escalated",
            "recent_unknown", "n_known_total", "n_unknown_total",
        )  # fmt: skip
        missing = [k for k in required if k not in state]
        if missing:
            raise InvalidArgumentError(f"missing keys {missing}")
        obj = cls(
            state["target_rate"],
            window=state["window"],
            min_samples=state["min_samples"],
            initial_threshold=state["initial_threshold"],
        )
        lists = {k: state[k] for k in ("scores", "escalated", "recent_unknown")}
        for name, value in lists.items():
            if not isinstance(value, list):
                raise InvalidTypeError(f"{name!r} must be a list, got {type(value).__name__}")
            if len(value) > obj._window:
                raise InvalidArgumentError(
                    f"{name!r} holds {len(value)} entries, more than window={obj._window}"
                )
        scores, escalated, recent = lists["scores"], lists["escalated"], lists["recent_unknown"]
        if len(scores) != len(escalated):
            raise InvalidArgumentError(
                f"'scores' ({len(scores)}) and 'escalated' ({len(escalated)}) must have the same "
                "length"
            )
        clean_scores = [_finite_number(s, "a 'scores' entry") for s in scores]
        for name in ("escalated", "recent_unknown"):
            if not all(isinstance(f, bool) for f in lists[name]):
                raise InvalidTypeError(f"{name!r} must hold only booleans")
        n_known_total = _positive_int(state["n_known_total"], "'n_known_total'", 0)
        n_unknown_total = _positive_int(state["n_unknown_total"], "'n_unknown_total'", 0)
        if n_known_total < len(scores) or n_unknown_total < sum(recent):
            raise InvalidArgumentError("the totals are smaller than the window contents")
        # The window keeps the last `window` known scores: all of them while fewer were seen.
        if len(scores) != min(obj._window, n_known_total):
            raise InvalidArgumentError(
                f"'scores' holds {len(scores)} entries, but {n_known_total} known scores were "
                f"observed with window={obj._window} (expected {min(obj._window, n_known_total)})"
            )
        # The last `window` observations cannot hold more known scores than the score window.
        known_recent = len(recent) - sum(recent)
        if known_recent > len(scores):
            raise InvalidArgumentError(
                f"'recent_unknown' marks {known_recent} known observations, more than the "
                f"{len(scores)} scores kept"
            )
        obj._scores = deque(clean_scores)
        obj._escalated = deque(escalated)
        obj._n_escalated = sum(escalated)
        obj._sorted = sorted(clean_scores)
        obj._recent_unknown = deque(recent)
        obj._n_recent_unknown = sum(recent)
        obj._n_known_total = n_known_total
        obj._n_unknown_total = n_unknown_total
        return obj

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state` to ``path`` as JSON, atomically (temp file + ``os.replace``)."""
        write_json_atomic(path, self.state())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RollingQuantileThreshold:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            InvalidStateError: (a ``ValueError``) the file is corrupt or not a valid state; the
                message names the file.
        """
        data = read_json_state(path)
        try:
            return cls.from_state(data)
        except InvalidStateError as error:
            raise InvalidStateError(f"{os.fspath(path)}: {error}") from None

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"RollingQuantileThreshold(target_rate={self._target}, window={self._window}, "
            f"threshold={s['threshold']!r}, n_known={s['n_known']}, ready={s['ready']})"
        )


# --------------------------------------------------------------------------------------------
# Offline, labelled: calibrate on an evaluation run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationResult:
    """The outcome of :func:`calibrate_threshold`.

    Attributes:
        threshold: route with "escalate iff score < threshold". ``math.inf`` means escalate
            everything (target rate 1). ``None`` when the target is not reachable.
        expected_call_rate: the call rate this threshold gave on the calibration rows.
        expected_accuracy: with cloud labels the **system** accuracy ``A(tau)``; without, the
            accuracy of the **kept** (local) answers (``None`` when nothing is kept or there
            are no labels).
        accuracy_kind: ``"system"``, ``"kept_local"`` or ``None`` (no labels).
        n: rows used (rows with a known score).
        n_missing: rows without a score, excluded (the router's ``on_unknown`` policy covers
            them in production); never scored as 0.5.
        target: the requested target value.
        target_kind: ``"call_rate"`` or ``"accuracy"``.
        reachable: whether a threshold meets the target.
        note: a human-readable explanation (ties, unreachable targets, best achievable).
    """

    threshold: float | None
    expected_call_rate: float | None
    expected_accuracy: float | None
    accuracy_kind: str | None
    n: int
    n_missing: int
    target: float
    target_kind: str
    reachable: bool
    note: str

    def require_threshold(self) -> float:
        """The threshold, or ``ValueError`` (with the note) when the target is unreachable."""
        if not self.reachable or self.threshold is None:
            raise InvalidArgumentError(f"calibration target not reachable: {self.note}")
        return self.threshold

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (``inf`` threshold kept as a float; JSON callers should map it)."""
        return asdict(self)


def _is_missing(score: Any) -> bool:
    if score is None:
        return True
    if not isinstance(score, numbers.Real) or _is_bool(score):
        return False
    try:
        return math.isnan(score)
    except OverflowError:  # a huge int: not missing, refused as not finite
        return False


def _label(value: Any, name: str, index: int) -> int:
    if _is_bool(value):
        return int(value)
    if isinstance(value, numbers.Real) and value in (0, 1):
        return 1 if value == 1 else 0
    raise InvalidArgumentError(f"{name}[{index}] must be 0/1 (or a bool), got {value!r}")


def _rows(values: Iterable[Any]) -> Sequence[Any]:
    """A sequence of rows: lists, tuples and numpy arrays as they are, other iterables (a
    generator) read once into a list."""
    if isinstance(values, (str, bytes, Mapping)):
        # A mapping would be indexed by key (row i = values[i]): a KeyError or, with integer
        # keys in another order, labels silently paired with the wrong scores.
        raise InvalidTypeError(f"expected one value per row, got a {type(values).__name__}")
    if hasattr(values, "__len__") and hasattr(values, "__getitem__"):
        return values  # type: ignore[return-value]
    return list(values)


def calibrate_threshold(
    scores: Sequence[float | None],
    labels: Sequence[int | bool | None] | None = None,
    *,
    target_rate: float | None = None,
    target_accuracy: float | None = None,
    cloud_labels: Sequence[int | bool | None] | None = None,
) -> CalibrationResult:
    """Choose the threshold for a target call rate or a target accuracy.

    The sweep (docs/how-it-works.md §5): under "escalate iff s < tau", the candidates
    ``tau`` in ``{distinct s} U {+inf}`` reach every achievable call rate (``tau = min(s)``
    escalates nothing, ``+inf`` everything).

    * ``target_rate=rho``: the threshold whose call rate is the **largest achievable rate not
      above** ``rho`` (a call-rate target is treated as a budget: never exceeded on the
      calibration rows). Ties can make it noticeably lower; the note says so. Labels are
      optional here (label-free calibration); with labels the expected accuracy is reported.
    * ``target_accuracy=a``: the **lowest** call rate whose accuracy reaches ``a``: system
      accuracy ``A(tau)`` when ``cloud_labels`` are given, else the accuracy of the answers
      kept local. Escalating everything keeps no answer, so without cloud labels ``+inf`` is
      not a candidate. No qualifying threshold -> ``reachable=False``, ``threshold=None`` and
      the best achievable accuracy in the note.

    Rows whose score is ``None`` or NaN are excluded and counted in ``n_missing`` (their labels
    may be ``None``).

    Args:
        scores: confidence per row, higher = keep local.
        labels: local correctness ``y`` (0/1) per row; required for ``target_accuracy``.
        target_rate: target call rate in ``[0, 1]``.
        target_accuracy: target accuracy in ``[0, 1]``.
        cloud_labels: cloud correctness ``z`` per row, to target system accuracy.

    ``scores`` and the labels may be lists, tuples, numpy arrays (any int, float or bool
    dtype) or one-shot iterables.

    Raises:
        InvalidArgumentError: (a ``ValueError``) not exactly one target, a target out of
            range, mismatched lengths, a label that is not 0/1, an infinite score, or no row
            with a known score.
        InvalidTypeError: (a ``TypeError``) a score or target that is not a number.

    Example::

        >>> r = calibrate_threshold([0.2, 0.5, 0.5, 0.9], target_rate=0.5)
        >>> r.threshold, r.expected_call_rate   # the 0.5 tie: 0.25 or 0.75, not 0.5
        (0.5, 0.25)
        >>> r = calibrate_threshold([0.2, 0.6], [0, 1], target_accuracy=0.9,
        ...                         cloud_labels=[0, 1])
        >>> r.reachable, r.threshold
        (False, None)
    """
    scores = _rows(scores)
    labels = None if labels is None else _rows(labels)
    cloud_labels = None if cloud_labels is None else _rows(cloud_labels)
    if (target_rate is None) == (target_accuracy is None):
        raise InvalidArgumentError("give exactly one of target_rate and target_accuracy")
    target_kind = "call_rate" if target_rate is not None else "accuracy"
    target = _finite_number(
        target_rate if target_rate is not None else target_accuracy, target_kind.replace("_", " ")
    )
    if not 0.0 <= target <= 1.0:
        raise InvalidArgumentError(f"the target {target_kind} must be in [0, 1], got {target!r}")
    if target_accuracy is not None and labels is None:
        raise InvalidArgumentError("target_accuracy needs labels (local correctness per row)")
    if cloud_labels is not None and labels is None:
        raise InvalidArgumentError("cloud_labels need labels too (system accuracy mixes y and z)")
    n_rows = len(scores)
    for name, values in (("labels", labels), ("cloud_labels", cloud_labels)):
        if values is not None and len(values) != n_rows:
            raise InvalidArgumentError(f"{name} has {len(values)} rows, scores has {n_rows}")

    rows: list[tuple[float, int, int]] = []
    n_missing = 0
    for i, s in enumerate(scores):
        if _is_missing(s):
            n_missing += 1
            continue
        value = _finite_number(s, f"scores[{i}]")
        y = _label(labels[i], "labels", i) if labels is not None else 0
        z = _label(cloud_labels[i], "cloud_labels", i) if cloud_labels is not None else 0
        rows.append((value, y, z))
    n = len(rows)
    if n == 0:
        raise InvalidArgumentError(f"no row has a known score ({n_missing} missing): nothing to calibrate")
    rows.sort(key=lambda r: r[0])

    # Candidates in ascending call rate: escalating the rows below each distinct score, then
    # all rows (+inf). cum_y[e] / cum_z[e] = correct local / cloud answers among the e lowest.
    cum_y = [0]
    cum_z = [0]
    for _, y, z in rows:
        cum_y.append(cum_y[-1] + y)
        cum_z.append(cum_z[-1] + z)
    candidates: list[tuple[float, int]] = []
    for i, (s, _, _) in enumerate(rows):
        if i == 0 or s != rows[i - 1][0]:
            candidates.append((s, i))
    candidates.append((math.inf, n))

    has_labels = labels is not None
    kind = None if not has_labels else ("system" if cloud_labels is not None else "kept_local")

    def accuracy(escalated: int) -> float | None:
        if not has_labels:
            return None
        kept_correct = cum_y[n] - cum_y[escalated]
        if kind == "system":
            return (kept_correct + cum_z[escalated]) / n
        kept = n - escalated
        return kept_correct / kept if kept else None

    def result(
        tau: float | None, escalated: int | None, reachable: bool, note: str
    ) -> CalibrationResult:
        return CalibrationResult(
            threshold=tau,
            expected_call_rate=None if escalated is None else escalated / n,
            expected_accuracy=None if escalated is None else accuracy(escalated),
            accuracy_kind=kind,
            n=n,
            n_missing=n_missing,
            target=target,
            target_kind=target_kind,
            reachable=reachable,
            note=note,
        )

    missing_note = f"; {n_missing} rows without a score excluded" if n_missing else ""
    if target_kind == "call_rate":
        budget = math.floor(target * n + _EPS)  # rows we may escalate
        tau, escalated = max((c for c in candidates if c[1] <= budget), key=lambda c: c[1])
        note = f"escalates {escalated} of {n} rows (target {target:g} -> at most {budget})"
        if escalated < budget:
            nxt = min((c for c in candidates if c[1] > budget), key=lambda c: c[1])
            note += (
                f"; ties at score {tau!r} make the next achievable rate "
                f"{nxt[1] / n:.4g} ({nxt[1]} rows), above the target"
            )
        return result(tau, escalated, True, note + missing_note)

    best: tuple[float, int, float] | None = None  # (tau, escalated, accuracy)
    for tau, escalated in candidates:
        acc = accuracy(escalated)
        if acc is None:  # nothing kept and no cloud labels: not a meaningful point
            continue
        if acc >= target - _EPS:
            what = "system accuracy" if kind == "system" else "accuracy of the kept answers"
            note = f"lowest call rate whose {what} reaches {target:g}: {escalated}/{n} escalated"
            return result(tau, escalated, True, note + missing_note)
        if best is None or acc > best[2]:
            best = (tau, escalated, acc)
    assert best is not None  # candidate tau = min(s) keeps every row
    what = "system accuracy" if kind == "system" else "kept-answer accuracy"
    hint = (
        "" if kind == "system" else " (without cloud labels, escalating everything is not scored)"
    )
    note = (
        f"not reachable: the best {what} is {best[2]:.4g} at call rate {best[1] / n:.4g} "
        f"(threshold {best[0]!r}) < target {target:g}{hint}"
    )
    return result(None, None, False, note + missing_note)


# --------------------------------------------------------------------------------------------
# Evaluation-run adapter (SQLite written by confidence_router.evaluation.runner)
# --------------------------------------------------------------------------------------------

#: Column names accepted as signal names, and the router signal whose [0, 1] score they hold.
#: The raw ``mean_logprob`` / ``min_logprob`` columns are not on the router's [0, 1] scale.
_COLUMN_ALIASES: Mapping[str, str] = {
    "confidence": "mean_logprob",
    "min_confidence": "min_logprob",
}
#: Router signals with a stored score column, for rows written before tokens were stored.
_LEGACY_COLUMNS: Mapping[str, str] = {
    "mean_logprob": "confidence",
    "min_logprob": "min_confidence",
}


class EvalDatabaseError(InvalidArgumentError):
    """A file given as an evaluation database cannot be read as one; the message names it.

    Raised for a file that is not SQLite (corrupted, truncated, a text file), a directory, a
    SQLite file of another application or of another schema version, a table lacking needed
    columns, and values of the wrong type (a ``correct`` column holding ``'yes'``). The file
    is left as it was: readers never create tables in it or change its journal mode.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class RunScores:
    """Arrays read from an evaluation run, aligned row by row (failure rows excluded).

    Attributes:
        scores: the signal's score per row (``None`` = missing).
        labels: local correctness per row, or ``None`` if some row with a score lacks one.
        cloud_labels: cloud correctness per row (``None`` entries only where the score is
            missing), or ``None`` if some row with a score has no usable cloud label.
        signal: the signal read.
        run: the run's name (``None`` for a database without a ``runs`` table).
        n_errors: failure rows (non-NULL ``error``) excluded.
    """

    scores: list[float | None]
    labels: list[int | None] | None
    cloud_labels: list[int | None] | None
    signal: str
    run: str | None
    n_errors: int


def _connect_read_only(path: str | os.PathLike[str]) -> sqlite3.Connection:
    p = Path(path)
    if p.is_dir():
        raise EvalDatabaseError(f"{p}: is a directory, not an evaluation database", path=p)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation database not found: {os.fspath(path)!r}")
    # Read-only: calibrating must never create tables or rows in someone's run database.
    return sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)


@contextlib.contextmanager
def database_errors(
    path: str | os.PathLike[str], error_class: type[EvalDatabaseError] | None = None
) -> Any:
    """Context manager: SQLite's own errors inside it (``file is not a database``, ``no such
    column``, ``database is locked``) become :class:`EvalDatabaseError` (or ``error_class``, a
    subclass) naming the file."""
    try:
        yield
    except sqlite3.Error as error:
        p = Path(path)
        raise (error_class or EvalDatabaseError)(
            f"{p}: cannot be read as an evaluation database ({error})", path=p
        ) from None


def _db_label(value: Any, path: str | os.PathLike[str], column: str) -> int | None:
    """A stored 0/1 label (``None`` stays ``None``); anything else names the file."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    raise EvalDatabaseError(
        f"{Path(path)}: column {column!r} must hold 0, 1 or NULL; found {value!r}", path=Path(path)
    )


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _pick_run(conn: sqlite3.Connection, run: str | int | None) -> tuple[int | None, str | None]:
    if "runs" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}:
        if run is not None:
            raise InvalidArgumentError(f"run {run!r} requested but the database has no 'runs' table")
        return None, None
    runs = conn.execute("SELECT run_id, name FROM runs ORDER BY run_id").fetchall()
    names = [name for _, name in runs]
    if run is None:
        if len(runs) != 1:
            raise InvalidArgumentError(
                f"the database holds {len(runs)} runs; choose one with run=...: {names}"
            )
        return runs[0][0], runs[0][1]
    for run_id, name in runs:
        if (isinstance(run, int) and not isinstance(run, bool) and run == run_id) or run == name:
            return run_id, name
    raise InvalidArgumentError(f"no run {run!r} in the database; runs: {names}")


def load_scores_from_run(
    path: str | os.PathLike[str], signal: str = "confidence", *, run: str | int | None = None
) -> RunScores:
    """Read scores and labels of one evaluation run for :func:`calibrate_threshold`.

    Reads the SQLite database of :class:`confidence_router.evaluation.runner.EvalRunner`
    read-only, with the stdlib only (no numpy). Layout used: table ``results`` with columns
    ``correct`` (0/1, NULL on failures), ``error`` (NULL unless the row failed), the score
    columns ``confidence`` / ``min_confidence`` (NULL = missing), ``extras`` (JSON
    ``{signal: {field: value}}``) and, optionally, ``cloud_correct`` / ``cloud_error``; rows of
    several runs are told apart by ``run_id`` (table ``runs``). A database with only a
    ``results`` table holding those columns works too.

    Args:
        path: the ``.sqlite`` file.
        signal: any router signal (:data:`confidence_router.signals.SIGNAL_SCORERS`, e.g.
            ``mean_logprob``, the paper's score, or ``sum_logprob``), recomputed from each
            row's stored tokens (rows without tokens: the stored ``confidence`` /
            ``min_confidence`` column for the paper's pair, else missing); the column names
            ``confidence`` / ``min_confidence`` as aliases; or an extra signal field
            ``"<name>.<field>"`` such as ``"gsa.p_yes"``.
        run: run name or id; may be omitted when the database holds exactly one run.

    Raises:
        FileNotFoundError: no such file.
        EvalDatabaseError: (a ``ValueError``) the file is not SQLite, a table lacks needed
            columns, or a label column holds something other than 0/1/NULL.
        ValueError: unknown signal, ambiguous/unknown run.

    Example::

        data = load_scores_from_run("eval-runs.sqlite", "confidence")
        calibrate_threshold(data.scores, data.labels, target_rate=0.3)
    """
    conn = _connect_read_only(path)
    try:
        with database_errors(path):
            return _load_scores(conn, path, signal, run)
    finally:
        conn.close()


def _load_scores(
    conn: sqlite3.Connection, path: str | os.PathLike[str], signal: str, run: str | int | None
) -> RunScores:
    columns = _columns(conn, "results")
    p = Path(path)
    if not columns:
        raise EvalDatabaseError(
            f"{p}: not an evaluation database (no 'results' table)", path=p
        )
    if "correct" not in columns:
        raise EvalDatabaseError(
            f"{p}: not an evaluation database (table 'results' lacks the 'correct' column)",
            path=p,
        )
    extra_key: tuple[str, str] | None = None
    router_signal = _COLUMN_ALIASES.get(signal, signal)
    if router_signal in SIGNAL_SCORERS:
        legacy = _LEGACY_COLUMNS.get(router_signal)
        if "tokens" not in columns and (legacy is None or legacy not in columns):
            raise EvalDatabaseError(
                f"{p}: table 'results' has no per-token data (column "
                f"'tokens') to compute {router_signal!r} from",
                path=p,
            )
        column = ", ".join(
            [
                legacy if legacy is not None and legacy in columns else "NULL",
                "tokens" if "tokens" in columns else "NULL",
                "answer" if "answer" in columns else "NULL",
            ]
        )
    elif "." in signal and "extras" in columns:
        name, _, field = signal.partition(".")
        extra_key = (name, field)
        column = "extras"
    else:
        raise InvalidArgumentError(
            f"unknown signal {signal!r}: use one of {sorted(SIGNAL_SCORERS)} (or the "
            f"columns {sorted(_COLUMN_ALIASES)}) or '<extra signal>.<field>' "
            "(e.g. 'gsa.p_yes')"
        )
    run_id, run_name = _pick_run(conn, run)
    has = columns.__contains__
    select = [
        column,
        "correct",
        "error" if has("error") else "NULL",
        "cloud_correct" if has("cloud_correct") else "NULL",
        "cloud_error" if has("cloud_error") else "NULL",
    ]
    order = "position, item_id" if has("position") and has("item_id") else "rowid"
    where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
    rows = conn.execute(
        f"SELECT {', '.join(select)} FROM results {where} ORDER BY {order}", params
    ).fetchall()

    scores: list[float | None] = []
    labels: list[int | None] = []
    cloud: list[int | None] = []
    n_errors = 0
    for row, (*values, correct, error, cloud_correct, cloud_error) in enumerate(rows, start=1):
        if error is not None:
            n_errors += 1
            continue
        if extra_key is not None:
            raw = _extra_value(values[0], *extra_key)
        else:
            try:
                raw = _token_score(router_signal, *values)
            except (zlib.error, ValueError, TypeError, KeyError, RecursionError) as exc:
                # Not written by the runner (or damaged): zlib, UTF-8, JSON or layout errors.
                raise EvalDatabaseError(
                    f"{p}: column 'tokens' of result row {row} cannot be decoded "
                    f"({type(exc).__name__}: {exc})",
                    path=p,
                ) from None
        score = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
        scores.append(None if score is None or math.isnan(score) else score)
        labels.append(_db_label(correct, path, "correct"))
        cloud_label = _db_label(cloud_correct, path, "cloud_correct")
        cloud.append(None if cloud_error is not None else cloud_label)
    scored = [i for i, s in enumerate(scores) if s is not None]
    return RunScores(
        scores=scores,
        labels=labels if all(labels[i] is not None for i in scored) else None,
        cloud_labels=cloud if scored and all(cloud[i] is not None for i in scored) else None,
        signal=signal,
        run=run_name,
        n_errors=n_errors,
    )


def _token_score(signal: str, stored: Any, tokens: Any, answer: Any) -> float | None:
    """The router signal's score of one row: from its tokens, else from its stored column."""
    if tokens is not None:
        return score_for(answer_signals(answer, decode_tokens(tokens)), signal)
    return stored


def _extra_value(raw: Any, name: str, field: str) -> Any:
    if not raw:
        return None
    try:
        extras = json.loads(raw)
    except (TypeError, json.JSONDecodeError, RecursionError):
        return None
    entry = extras.get(name) if isinstance(extras, dict) else None
    return entry.get(field) if isinstance(entry, dict) else None


def calibrate_run(
    path: str | os.PathLike[str],
    *,
    signal: str = "confidence",
    run: str | int | None = None,
    target_rate: float | None = None,
    target_accuracy: float | None = None,
    use_cloud_labels: bool = True,
) -> CalibrationResult:
    """:func:`load_scores_from_run` then :func:`calibrate_threshold` (what the CLI calls).

    With ``use_cloud_labels`` (default) and cloud labels present in the run, an accuracy
    target means system accuracy; otherwise the accuracy of the kept answers.

    Example: ``calibrate_run("run.sqlite", target_rate=0.3).threshold``
    """
    data = load_scores_from_run(path, signal, run=run)
    if target_accuracy is not None and data.labels is None:
        raise InvalidArgumentError(f"{os.fspath(path)}: rows lack labels; an accuracy target needs them")
    return calibrate_threshold(
        data.scores,
        data.labels,
        target_rate=target_rate,
        target_accuracy=target_accuracy,
        cloud_labels=data.cloud_labels if use_cloud_labels and data.labels is not None else None,
    )
