"""Calibrated confidence: a monotone map from a signal's score to P(correct).

Pure Python (standard library only). A raw signal ranks answers well but its value is not a
probability: ``sigmoid(2 * mean + 3) = 0.9`` does not mean 90% of such answers are right.
:class:`ConfidenceCalibration` is fitted on a labelled evaluation run (isotonic regression or
Platt scaling), saved as JSON, and then turns any score of that signal into ``p_correct``,
or a target accuracy into a threshold on the raw score::

    >>> from confidence_router.correctness import ConfidenceCalibration
    >>> cal = ConfidenceCalibration.fit([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1],
    ...                                 signal="mean_logprob", method="isotonic")
    >>> cal.p_correct(0.7), cal.p_correct(0.3), cal.p_correct(None)
    (1.0, 0.0, None)
    >>> cal.threshold_for_accuracy(0.5)
    0.5

From the command line: ``confidence-router calibrate --fit RUN.sqlite --signal sum_logprob
--out calibration.json`` (prints ECE and Brier before/after on held-out rows, computed with
:func:`confidence_router.evaluation.metrics.ece` and ``brier``).
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import random
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confidence_router.errors import (
    ConfidenceRouterError,
    InvalidArgumentError,
    InvalidTypeError,
)
from confidence_router.signals import SIGNAL_SCORERS

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationFitError",
    "ConfidenceCalibration",
    "split_holdout",
]

CALIBRATION_METHODS = ("isotonic", "platt")
_FORMAT = "confidence-router/confidence-calibration"
_VERSION = 1
_EPS = 1e-6


class CalibrationFitError(ConfidenceRouterError, ValueError):
    """A calibration cannot be fitted or loaded (bad input, one class only, corrupt file)."""


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars count; numpy's bool does not)."""
    kind = type(value)
    is_bool = isinstance(value, bool) or (
        kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")
    )
    if is_bool or not isinstance(value, numbers.Real):
        return False
    try:
        return not math.isnan(value)
    except OverflowError:  # an int too large for a float: a number, out of [0, 1] anyway
        return True


def _stored_count(value: Any, name: str) -> int:
    """A row count read from a calibration file: an integer (``3.0`` is accepted, ``2.7``,
    ``true`` and ``"3"`` are not - ``int()`` would silently truncate or convert them)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibrationFitError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _check_rows(
    scores: Iterable[float], labels: Iterable[int]
) -> tuple[list[float], list[int]]:
    # Read once: generators work, and lists, tuples and numpy arrays alike.
    score_rows: list[Any] = list(scores)
    label_rows: list[Any] = list(labels)
    if len(score_rows) != len(label_rows):
        raise CalibrationFitError(
            f"scores and labels differ in length: {len(score_rows)} != {len(label_rows)}"
        )
    xs: list[float] = []
    ys: list[int] = []
    for score, label in zip(score_rows, label_rows):
        if not _is_number(score):
            raise CalibrationFitError(f"scores must be numbers, got {score!r}")
        if not 0.0 <= score <= 1.0:
            raise CalibrationFitError(f"scores must lie in [0, 1], got {score!r}")
        if isinstance(label, bool) or type(label).__name__ in ("bool", "bool_"):
            label = int(label)  # True/False count as 1/0, as everywhere in the evaluation
        if not isinstance(label, numbers.Real) or label not in (0, 1):
            raise CalibrationFitError(f"labels must be 0 or 1, got {label!r}")
        xs.append(float(score))
        ys.append(1 if label == 1 else 0)
    if not xs:
        raise CalibrationFitError("no rows to fit on")
    if len(set(ys)) < 2:
        raise CalibrationFitError("the rows hold only one class; P(correct) cannot be fitted")
    return xs, ys


def _isotonic(xs: list[float], ys: list[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Pool-adjacent-violators on rows sorted by score; knots at each block's ends."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    # Tied scores must get one value: pool them first.
    blocks: list[list[float]] = []  # [sum_y, count, x_min, x_max]
    for i in order:
        if blocks and blocks[-1][3] == xs[i]:
            blocks[-1][0] += ys[i]
            blocks[-1][1] += 1
        else:
            blocks.append([float(ys[i]), 1.0, xs[i], xs[i]])
    merged: list[list[float]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][0] / merged[-2][1] >= merged[-1][0] / merged[-1][1]:
            last = merged.pop()
            merged[-1][0] += last[0]
            merged[-1][1] += last[1]
            merged[-1][3] = last[3]
    knots_x: list[float] = []
    knots_y: list[float] = []
    for total, count, x_min, x_max in merged:
        value = total / count
        for x in (x_min, x_max) if x_max > x_min else (x_min,):
            knots_x.append(x)
            knots_y.append(value)
    return tuple(knots_x), tuple(knots_y)


def _logit(p: float) -> float:
    p = min(1.0 - _EPS, max(_EPS, p))
    return math.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _platt(xs: list[float], ys: list[int]) -> tuple[float, float]:
    """Platt scaling on logit(score): ``p = sigmoid(a * logit(s) + b)``, Newton's method.

    Platt's smoothed targets ((N+ + 1) / (N+ + 2), 1 / (N- + 2)) keep the fit finite even
    when the classes are separable.
    """
    n_pos = sum(ys)
    n_neg = len(ys) - n_pos
    hi, lo = (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)
    targets = [hi if y else lo for y in ys]
    zs = [_logit(x) for x in xs]

    def loss(a: float, b: float) -> float:
        total = 0.0
        for z, t in zip(zs, targets):
            u = a * z + b
            # cross-entropy with log(1 + e^u) computed stably
            softplus = u + math.log1p(math.exp(-u)) if u > 0 else math.log1p(math.exp(u))
            total += softplus - t * u
        return total

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(200):
        g_a = g_b = h_aa = h_ab = h_bb = 0.0
        for z, t in zip(zs, targets):
            p = _sigmoid(a * z + b)
            d = p - t
            w = max(p * (1.0 - p), 1e-12)
            g_a += d * z
            g_b += d
            h_aa += w * z * z
            h_ab += w * z
            h_bb += w
        h_aa += 1e-9  # keeps the 2x2 system solvable when every score is identical
        h_bb += 1e-9
        det = h_aa * h_bb - h_ab * h_ab
        if det <= 0:
            break
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        # Newton with backtracking: a full step can overshoot on (near-)separable rows.
        scale = 1.0
        while scale > 1e-10:
            trial_a, trial_b = a - scale * step_a, b - scale * step_b
            trial = loss(trial_a, trial_b)
            if trial <= current:
                break
            scale /= 2.0
        else:
            break
        a, b, improvement = trial_a, trial_b, current - trial
        current = trial
        if improvement < 1e-12 * max(1.0, abs(current)):
            break
    return a, b


@dataclass(frozen=True)
class ConfidenceCalibration:
    """A fitted map from one signal's [0, 1] score to the probability that the answer is right.

    Attributes:
        signal: the router signal the scores come from (a :data:`SIGNAL_SCORERS` name);
            the map is only valid for that signal's scores.
        method: ``"isotonic"`` (monotone step-wise fit, linear between knots, flat beyond
            the fitted range) or ``"platt"`` (``sigmoid(a * logit(score) + b)``).
        knots_x, knots_y: the isotonic fit (non-decreasing); empty for Platt.
        a, b: the Platt coefficients; ``None`` for isotonic.
        n_train, n_train_correct: rows fitted on and how many were correct.
        source: free-form provenance (run, dataset, model, split), stored with the fit.

    ``p_correct`` is non-decreasing in the score for isotonic fits, and for Platt fits with
    ``a >= 0`` (a negative slope, which means the signal ranks backwards on the training
    rows, is kept as fitted: then :meth:`threshold_for_accuracy` says so by raising).
    """

    signal: str
    method: str
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    a: float | None = None
    b: float | None = None
    n_train: int = 0
    n_train_correct: int = 0
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.signal not in SIGNAL_SCORERS:
            raise CalibrationFitError(
                f"unknown signal {self.signal!r}; choose one of {sorted(SIGNAL_SCORERS)}"
            )
        if self.method == "isotonic":
            if not self.knots_x or len(self.knots_x) != len(self.knots_y):
                raise CalibrationFitError("an isotonic calibration needs matching knots")
            pairs = list(zip(self.knots_x, self.knots_y))
            if any(x2 < x1 or y2 < y1 for (x1, y1), (x2, y2) in itertools.pairwise(pairs)):
                raise CalibrationFitError("isotonic knots must be non-decreasing")
            if any(not 0.0 <= v <= 1.0 for v in (*self.knots_x, *self.knots_y)):
                raise CalibrationFitError("isotonic knots must lie in [0, 1]")
        elif self.method == "platt":
            if self.a is None or self.b is None or not all(
                math.isfinite(v) for v in (self.a, self.b)
            ):
                raise CalibrationFitError("a Platt calibration needs finite a and b")
        else:
            raise CalibrationFitError(
                f"method must be one of {CALIBRATION_METHODS}, got {self.method!r}"
            )
        self._check_source()
        for name in ("n_train", "n_train_correct"):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise CalibrationFitError(f"{name} must be an integer >= 0, got {count!r}")
        if self.n_train_correct > self.n_train:
            raise CalibrationFitError(
                f"n_train_correct ({self.n_train_correct}) exceeds n_train ({self.n_train})"
            )

    def _check_source(self) -> None:
        """``source`` is saved as JSON: it must survive the trip (checked now, not at save)."""
        if not isinstance(self.source, Mapping):
            raise CalibrationFitError(
                f"source must be a mapping (provenance fields), got {type(self.source).__name__}"
            )
        try:
            text = json.dumps(dict(self.source), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise CalibrationFitError(
                f"source must hold JSON values (str, finite numbers, bool, None, lists, "
                f"mappings): {exc}"
            ) from None
        if json.loads(text) != dict(self.source):
            raise CalibrationFitError(
                "source would not load back as saved (use string keys and lists, not tuples): "
                f"{dict(self.source)!r}"
            )

    # ---- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        scores: Iterable[float],
        labels: Iterable[int],
        *,
        signal: str,
        method: str = "isotonic",
        source: Mapping[str, Any] | None = None,
    ) -> ConfidenceCalibration:
        """Fit on labelled rows: ``scores`` of ``signal`` in [0, 1], ``labels`` 0/1.

        Raises :class:`CalibrationFitError` for mismatched lengths, scores outside [0, 1],
        labels other than 0/1, no rows, or a single class.
        """
        if source is not None and not isinstance(source, Mapping):
            raise CalibrationFitError(
                f"source must be a mapping (provenance fields) or None, got "
                f"{type(source).__name__}"
            )
        xs, ys = _check_rows(scores, labels)
        if method not in CALIBRATION_METHODS:
            raise CalibrationFitError(
                f"method must be one of {CALIBRATION_METHODS}, got {method!r}"
            )
        knots_x: tuple[float, ...] = ()
        knots_y: tuple[float, ...] = ()
        a = b = None
        if method == "isotonic":
            knots_x, knots_y = _isotonic(xs, ys)
        else:
            a, b = _platt(xs, ys)
        return cls(
            signal=signal, method=method, knots_x=knots_x, knots_y=knots_y, a=a, b=b,
            n_train=len(xs), n_train_correct=sum(ys), source=dict(source or {}),
        )

    # ---- use ---------------------------------------------------------------------------------

    def p_correct(self, score: float | None) -> float | None:
        """P(the answer is correct) for a score of :attr:`signal`; ``None`` stays ``None``.

        An unknown score has no probability (never 0.5). Raises
        :class:`~confidence_router.errors.InvalidArgumentError` (a ``ValueError``) for a score
        outside [0, 1], NaN or not a number.
        """
        if score is None:
            return None
        if not _is_number(score):
            raise InvalidArgumentError(f"score must be a number in [0, 1], got {score!r}")
        if not 0.0 <= score <= 1.0:
            raise InvalidArgumentError(f"score must be in [0, 1], got {score!r}")
        score = float(score)
        if self.method == "platt":
            return _sigmoid(self.a * _logit(score) + self.b)  # type: ignore[operator]
        xs, ys = self.knots_x, self.knots_y
        if score <= xs[0]:
            return ys[0]
        if score >= xs[-1]:
            return ys[-1]
        # the last knot at or below the score, then linear to the next one
        lo, hi = 0, len(xs) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if xs[mid] <= score:
                lo = mid
            else:
                hi = mid
        x1, x2, y1, y2 = xs[lo], xs[hi], ys[lo], ys[hi]
        if x2 == x1:
            return y2
        return y1 + (y2 - y1) * (score - x1) / (x2 - x1)

    def threshold_for_accuracy(self, target: float) -> float | None:
        """The lowest raw score whose ``p_correct`` reaches ``target``.

        Routing with ``threshold=`` this value keeps exactly the answers whose calibrated
        probability of being correct is at least ``target`` (a per-answer floor; the
        accuracy of all kept answers together is higher). Returns ``0.0`` when every score
        reaches it and ``None`` when none does.

        Raises ``InvalidArgumentError`` (a ``ValueError``) for a target outside (0, 1), and
        :class:`CalibrationFitError`
        for a Platt fit with a negative slope (higher scores mean *less* likely correct).
        """
        if not _is_number(target) or not 0.0 < target < 1.0:
            raise InvalidArgumentError(f"target accuracy must be in (0, 1), got {target!r}")
        if self.method == "platt":
            if self.a is None or self.a <= 0:
                raise CalibrationFitError(
                    f"the Platt fit of {self.signal!r} has slope {self.a!r}: higher scores are "
                    "not more likely correct, so no threshold keeps the likely-correct answers"
                )
            z = (_logit(target) - self.b) / self.a  # type: ignore[operator]
            threshold = _sigmoid(z)
            if threshold >= 1.0 - _EPS:
                return None if self.p_correct(1.0) < target else 1.0  # type: ignore[operator]
            return 0.0 if threshold <= _EPS else self._lowest_reaching(threshold, target, 1.0)
        xs, ys = self.knots_x, self.knots_y
        if ys[0] >= target:
            return 0.0
        for i in range(1, len(xs)):
            if ys[i] >= target:
                x1, x2, y1, y2 = xs[i - 1], xs[i], ys[i - 1], ys[i]
                if y2 == y1 or x2 == x1:
                    return x2
                return self._lowest_reaching(x1 + (target - y1) * (x2 - x1) / (y2 - y1), target, x2)
        return None

    def _lowest_reaching(self, estimate: float, target: float, upper: float) -> float:
        # Interpolation rounds: between two knots 1e-16 apart the estimate can land on the lower
        # knot, whose p_correct is below the target. Step up one float at a time (one or two
        # steps in practice) so the returned score really reaches the target.
        threshold = min(estimate, upper)
        while threshold < upper and self.p_correct(threshold) < target:  # type: ignore[operator]
            threshold = math.nextafter(threshold, upper)
        return threshold

    # ---- storage -----------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what :meth:`save` writes)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "signal": self.signal,
            "method": self.method,
            "knots_x": list(self.knots_x),
            "knots_y": list(self.knots_y),
            "a": self.a,
            "b": self.b,
            "n_train": self.n_train,
            "n_train_correct": self.n_train_correct,
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceCalibration:
        """Inverse of :meth:`as_dict` (validated; :class:`CalibrationFitError` if invalid)."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise CalibrationFitError("not a confidence-router confidence calibration")
        if data.get("version") != _VERSION:
            raise CalibrationFitError(
                f"calibration format version {data.get('version')!r}; this library reads "
                f"version {_VERSION}"
            )
        try:
            return cls(
                signal=str(data["signal"]),
                method=str(data["method"]),
                knots_x=tuple(float(v) for v in data.get("knots_x") or ()),
                knots_y=tuple(float(v) for v in data.get("knots_y") or ()),
                a=None if data.get("a") is None else float(data["a"]),
                b=None if data.get("b") is None else float(data["b"]),
                n_train=_stored_count(data.get("n_train", 0), "n_train"),
                n_train_correct=_stored_count(data.get("n_train_correct", 0), "n_train_correct"),
                source=dict(data.get("source") or {}),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, CalibrationFitError):
                raise
            raise CalibrationFitError(f"invalid calibration data: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON (atomically: a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.as_dict(), indent=2, sort_keys=True, allow_nan=False)
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConfidenceCalibration:
        """Read a calibration written by :meth:`save`.

        Raises ``FileNotFoundError`` for a missing file and :class:`CalibrationFitError`
        for anything that is not a valid calibration.
        """
        raw = Path(path).read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise CalibrationFitError(f"{os.fspath(path)}: not JSON ({exc.msg})") from exc
        except UnicodeDecodeError as exc:
            raise CalibrationFitError(f"{os.fspath(path)}: not UTF-8 JSON ({exc.reason})") from exc
        except RecursionError:
            raise CalibrationFitError(f"{os.fspath(path)}: not JSON (nested too deeply)") from None
        return cls.from_dict(data)


# ---- held-out evaluation helpers (pure) --------------------------------------------------------


def split_holdout(
    n: int, holdout: float = 0.3, *, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Deterministic random split of ``range(n)`` into (train, held-out) index lists.

    >>> split_holdout(10, 0.3)[1]
    [1, 7, 8]
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise InvalidTypeError(f"n must be an integer >= 0, got {n!r}")
    if n < 0:
        raise InvalidArgumentError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real):
        raise InvalidTypeError(f"holdout must be a number in (0, 1), got {holdout!r}")
    if not 0.0 < holdout < 1.0:
        raise InvalidArgumentError(f"holdout must be in (0, 1), got {holdout!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(n * holdout)
    return sorted(order[k:]), sorted(order[:k])
