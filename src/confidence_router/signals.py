"""Zero-shot confidence signals computed from per-token log-probabilities.

Pure Python, no framework imports. Every score is oriented "higher = the local answer is more
likely correct" and lies in [0, 1].

The paper's signal (``../shared/docs/method.md`` section 2.1) is the arithmetic mean of the
natural-log probabilities of all generated tokens, mapped through ``sigmoid(2 * mean + 3)``::

    >>> from confidence_router.signals import compute_signals
    >>> s = compute_signals([-0.1, -0.2, -0.3])
    >>> round(s.mean_logprob, 3), round(s.confidence, 4), s.token_count
    (-0.2, 0.9309, 3)

No logprobs means *unknown*, never a silent 0.5::

    >>> compute_signals([]).known
    False
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Paper constants of the logistic mapping ``sigmoid(SLOPE * mean + OFFSET)``.
SLOPE = 2.0
OFFSET = 3.0

#: Why a confidence could not be computed.
UNKNOWN_NO_LOGPROBS = "no_logprobs"
UNKNOWN_EMPTY_ANSWER = "empty_answer"
UNKNOWN_INVALID_LOGPROBS = "invalid_logprobs"


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def logprob_to_confidence(mean_logprob: float, slope: float = SLOPE, offset: float = OFFSET) -> float:
    """Map a mean token log-probability to a confidence: ``sigmoid(slope * mean + offset)``.

    With the paper's constants, -1.5 maps to 0.5 and 0 to sigmoid(3) = 0.9526 (the maximum,
    since a log-probability is never positive).

    >>> round(logprob_to_confidence(-1.5), 4)
    0.5
    """
    if math.isnan(mean_logprob):
        raise ValueError("mean_logprob is NaN")
    return sigmoid(slope * mean_logprob + offset)


def confidence_to_logprob(confidence: float, slope: float = SLOPE, offset: float = OFFSET) -> float:
    """Inverse of :func:`logprob_to_confidence`: the mean logprob at which a threshold sits.

    >>> round(confidence_to_logprob(0.7), 3)
    -1.076
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return (math.log(confidence / (1.0 - confidence)) - offset) / slope


@dataclass(frozen=True)
class LogprobSignals:
    """Signals derived from the chosen tokens' log-probabilities of one answer.

    Attributes:
        mean_logprob: arithmetic mean of all token logprobs (``None`` when unknown).
        min_logprob: the lowest token logprob (``None`` when unknown).
        token_count: number of tokens with a logprob.
        confidence: ``sigmoid(2 * mean + 3)`` (``None`` when unknown).
        min_confidence: ``sigmoid(2 * min + 3)``, the minimum-token variant (``None`` when unknown).
        unknown_reason: why the signals are unknown, else ``None``.
    """

    mean_logprob: float | None
    min_logprob: float | None
    token_count: int
    confidence: float | None
    min_confidence: float | None
    unknown_reason: str | None = None

    @property
    def known(self) -> bool:
        """Whether a confidence could be computed."""
        return self.confidence is not None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for metadata and storage)."""
        return asdict(self)


def unknown_signals(reason: str) -> LogprobSignals:
    """Signals for an answer whose confidence cannot be computed, with the reason."""
    return LogprobSignals(None, None, 0, None, None, unknown_reason=reason)


def compute_signals(
    logprobs: Iterable[float] | None, *, slope: float = SLOPE, offset: float = OFFSET
) -> LogprobSignals:
    """Compute the logprob signals from the chosen tokens' natural-log probabilities.

    ``None`` or an empty sequence gives unknown signals (reason ``no_logprobs``); a NaN, an
    infinity or a positive value gives unknown signals (reason ``invalid_logprobs``) rather than
    a misleading score.
    """
    if logprobs is None:
        return unknown_signals(UNKNOWN_NO_LOGPROBS)
    values = [float(v) for v in logprobs]
    if not values:
        return unknown_signals(UNKNOWN_NO_LOGPROBS)
    # A tiny positive value can come from float rounding of log(1); anything larger is garbage.
    if any(math.isnan(v) or math.isinf(v) or v > 1e-6 for v in values):
        return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
    values = [min(v, 0.0) for v in values]
    mean = math.fsum(values) / len(values)
    low = min(values)
    return LogprobSignals(
        mean_logprob=mean,
        min_logprob=low,
        token_count=len(values),
        confidence=logprob_to_confidence(mean, slope, offset),
        min_confidence=logprob_to_confidence(low, slope, offset),
    )


#: Named zero-shot scores the router can route on; each maps signals to [0, 1] or ``None``.
SIGNAL_SCORERS: Mapping[str, Callable[[LogprobSignals], float | None]] = {
    "mean_logprob": lambda s: s.confidence,
    "min_logprob": lambda s: s.min_confidence,
}


def score_for(signals: LogprobSignals, signal: str) -> float | None:
    """The [0, 1] score of the named signal (``mean_logprob`` or ``min_logprob``)."""
    try:
        scorer = SIGNAL_SCORERS[signal]
    except KeyError:
        raise ValueError(
            f"unknown signal {signal!r}; choose one of {sorted(SIGNAL_SCORERS)}"
        ) from None
    return scorer(signals)
