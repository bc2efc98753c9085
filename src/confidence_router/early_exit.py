"""Early-exit escalation: stop the local answer as soon as it can no longer be kept.

Pure Python, no framework imports. While the local answer streams, the router can ask after
every token whether the final decision can still come out "keep local" (score ``>=``
threshold, see :func:`confidence_router.policy.decide_after_generation`). If it cannot, the
rest of the local answer is wasted work: close the stream and escalate now.

Usage::

    from confidence_router.early_exit import should_exit_early

    seen: list[float] = []
    for token in local_stream:                     # per-token logprobs as they arrive
        seen.append(token.logprob)
        if should_exit_early("min_logprob", 0.7, seen, max_remaining_tokens=limit - len(seen)):
            local_stream.close()                   # the server stops generating
            break                                  # ... and escalate

    >>> should_exit_early("min_logprob", 0.7, [-0.01, -2.5])   # sigmoid(2 * -2.5 + 3) = 0.12
    True
    >>> should_exit_early("mean_logprob", 0.7, [-0.01, -2.5])  # no cap: more tokens may follow
    False
    >>> should_exit_early("mean_logprob", 0.7, [-0.01, -2.5], max_remaining_tokens=0)
    True

The rule per signal (``threshold`` is the keep-local threshold on the [0, 1] score):

* ``min_logprob`` — **exact.** The final minimum can only go down, so the first token whose own
  score ``sigmoid(2 * logprob + 3)`` is below the threshold decides; later tokens cannot bring
  the decision back. ``max_remaining_tokens`` is not needed.
* ``mean_logprob`` — a **bound**: the best the answer can still do is to continue with
  ``max_remaining_tokens`` tokens that are all certain (logprob 0), which pulls the mean up
  towards 0 as far as possible. If even that final mean scores below the threshold, exit. With
  the true cap (``num_predict`` minus the tokens seen) this is exact; a smaller value (a
  "plausible" horizon, e.g. 4 more tokens for a short factual answer) exits earlier but can
  change decisions: an answer that would have ended with many confident tokens is escalated.
  ``max_remaining_tokens=None`` (no cap known) never exits for the mean: unboundedly many
  certain tokens could still lift any mean above any threshold below ``sigmoid(3)``.
* ``mean_min`` (the default signal) — a **bound** that needs no cap: the average of the
  mean score (at best that of certain remaining tokens up to the cap, or of a mean of 0
  without one) and the min score (which can only fall). Sound: it never exits on an answer
  that would have been kept.
* ``sum_logprob`` and ``sum_min`` — **exact**, like the minimum: ``exp(sum)`` and
  ``exp((sum + min) / 2)`` can only fall as tokens arrive (every logprob is ``<= 0``), so the
  first token that takes the score below the threshold decides. No cap is needed.
* any other signal name (e.g. signals added to
  :data:`confidence_router.signals.SIGNAL_SCORERS` later) — no early exit (``False``): without a
  known bound an early stop could change the decision.

Exactness assumes the remaining tokens have valid logprobs (finite, ``<= 0``), which is what a
backend reports for generated tokens. An invalid value among the tokens *seen so far* makes the
final confidence unknown (handled by ``on_unknown``), so it never triggers an early exit. To stay
exact despite float rounding in the logistic map, a score within :data:`SCORE_MARGIN` of the
threshold does not trigger an exit (the answer then simply runs on and is decided normally).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from confidence_router.errors import InvalidTypeError, RoutingConfigError
from confidence_router.signals import OFFSET, SLOPE, logprob_to_confidence

__all__ = [
    "EXACT_SIGNALS",
    "SCORE_MARGIN",
    "ExitTracker",
    "early_exit_index",
    "should_exit_early",
]

#: A score must be this far below the threshold to trigger an exit. The logistic map is
#: monotone mathematically but not always in the last bit in floating point; the margin keeps
#: "exit early" identical to "run to the end" (it only delays exits for scores within 1e-9 of
#: the threshold).
SCORE_MARGIN = 1e-9

#: Signals for which early exit never changes the decision (given the true token cap for the
#: mean).
EXACT_SIGNALS: tuple[str, ...] = ("min_logprob", "mean_logprob", "sum_logprob", "sum_min")

# compute_signals accepts tiny positive values from float rounding of log(1) and clamps them.
_POSITIVE_TOLERANCE = 1e-6


def _logprob_of(item: Any) -> float:
    # A float, or any object with a ``logprob`` (TokenLogprob, GeneratedToken, ollama Logprob),
    # or a mapping with a "logprob" key (the Ollama wire format).
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return float(item)
    value = item.get("logprob") if isinstance(item, dict) else getattr(item, "logprob", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(
            f"expected a logprob (float) or an object with a float 'logprob', got {item!r}"
        )
    return float(value)


def _valid(values: Sequence[float]) -> bool:
    return all(not (math.isnan(v) or math.isinf(v)) and v <= _POSITIVE_TOLERANCE for v in values)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(
        threshold
    ):
        raise RoutingConfigError(f"threshold must be a number, got {threshold!r}")


def should_exit_early(
    signal: str,
    threshold: float,
    logprobs: Iterable[Any],
    *,
    max_remaining_tokens: int | None = None,
    slope: float = SLOPE,
    offset: float = OFFSET,
) -> bool:
    """Whether the decision can no longer come out "keep local" (see the module docstring).

    Args:
        signal: the routing signal name (``"min_logprob"``, ``"mean_logprob"``,
            ``"mean_min"``, ``"sum_logprob"``, ``"sum_min"``; any other name returns
            ``False``).
        threshold: keep the local answer iff its score ``>= threshold``.
        logprobs: the generated tokens' logprobs so far, as floats or as objects/mappings with a
            ``logprob`` (``TokenLogprob``, Ollama's per-token entries).
        max_remaining_tokens: at most this many tokens can still follow (e.g. ``num_predict``
            minus the tokens seen). Used by ``mean_logprob`` only.
        slope, offset: the logistic map (the paper's 2 and 3).

    Returns ``False`` while nothing was generated or when a logprob seen so far is invalid.

    Raises:
        RoutingConfigError: ``threshold`` is not a number or ``max_remaining_tokens < 0``.
        TypeError: an item carries no float logprob.
    """
    _check_threshold(threshold)
    if max_remaining_tokens is not None and (
        isinstance(max_remaining_tokens, bool)
        or not isinstance(max_remaining_tokens, int)
        or max_remaining_tokens < 0
    ):
        raise RoutingConfigError(
            f"max_remaining_tokens must be a non-negative int or None, got {max_remaining_tokens!r}"
        )
    values = [_logprob_of(item) for item in logprobs]
    if not values or not _valid(values):
        return False
    values = [min(v, 0.0) for v in values]  # the clamp compute_signals applies
    try:
        total = math.fsum(values)
    except OverflowError:  # as compute_signals: absurd logprobs (~-1e308) are invalid
        return False
    best_score = _best_score(signal, total, len(values), min(values), max_remaining_tokens,
                             slope, offset)
    if best_score is None:  # no bound for this signal (or no cap for the mean)
        return False
    return best_score < threshold - SCORE_MARGIN


def _best_score(
    signal: str,
    total: float,
    count: int,
    lowest: float,
    max_remaining_tokens: int | None,
    slope: float,
    offset: float,
) -> float | None:
    """The best final score an answer can still reach (``None``: no bound, never exit)."""
    if signal == "min_logprob":
        return logprob_to_confidence(lowest, slope, offset)
    if signal == "mean_logprob":
        if max_remaining_tokens is None:
            return None
        return logprob_to_confidence(
            _best_mean(total, count, max_remaining_tokens), slope, offset
        )
    if signal == "mean_min":
        # The average of the mean and min scores: the min score can only fall, and the mean
        # score is at most that of certain remaining tokens (without a cap: of a mean of 0).
        best_mean = 0.0 if max_remaining_tokens is None else _best_mean(
            total, count, max_remaining_tokens
        )
        return (
            logprob_to_confidence(best_mean, slope, offset)
            + logprob_to_confidence(lowest, slope, offset)
        ) / 2
    if signal == "sum_logprob":
        return math.exp(total)  # the final sum can only be lower
    if signal == "sum_min":
        return math.exp((total + lowest) / 2.0)  # both can only fall
    return None


class ExitTracker:
    """:func:`should_exit_early` for a growing answer, at a constant cost per token.

    Calling :func:`should_exit_early` after every token re-reads every token so far, which is
    quadratic in the answer's length (a 2,000-token answer costs seconds of CPU). The tracker
    keeps the running sum (exactly, as ``math.fsum`` does), minimum, count and validity, and
    gives the same answer as :func:`should_exit_early` on all the tokens added so far.

    >>> tracker = ExitTracker("min_logprob", 0.7)
    >>> tracker.add([-0.01]), tracker.add([{"token": "!", "logprob": -2.5}]), tracker.count
    (False, True, 2)

    Args:
        signal, threshold, slope, offset: as for :func:`should_exit_early`.
        max_tokens: the answer's token cap (``num_predict``), ``None`` when unknown: the
            remaining-token bound after ``n`` tokens is ``max(max_tokens - n, 0)``.

    Raises:
        RoutingConfigError: ``threshold`` is not a number, or ``max_tokens`` is not a
            non-negative int or ``None``.
    """

    __slots__ = (
        "_invalid", "_lowest", "_partials", "count", "max_tokens", "offset", "signal", "slope",
        "threshold",
    )

    def __init__(
        self,
        signal: str,
        threshold: float,
        *,
        max_tokens: int | None = None,
        slope: float = SLOPE,
        offset: float = OFFSET,
    ) -> None:
        _check_threshold(threshold)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
        ):
            raise RoutingConfigError(
                f"max_tokens must be a non-negative int or None, got {max_tokens!r}"
            )
        self.signal = signal
        self.threshold = threshold
        self.max_tokens = max_tokens
        self.slope = slope
        self.offset = offset
        self.count = 0
        """Tokens added so far."""
        self._invalid = False
        self._lowest = 0.0
        self._partials: list[float] = []  # the exact running sum (Shewchuk), as math.fsum

    def add(self, items: Iterable[Any]) -> bool:
        """Add the next tokens' logprobs (floats or objects / mappings with a ``logprob``);
        whether the decision can no longer come out "keep local".

        Raises:
            TypeError: an item carries no float logprob.
        """
        for item in items:
            value = _logprob_of(item)
            self.count += 1
            if math.isnan(value) or math.isinf(value) or value > _POSITIVE_TOLERANCE:
                self._invalid = True
            if self._invalid:
                continue
            value = min(value, 0.0)
            self._lowest = value if self.count == 1 else min(self._lowest, value)
            self._add_to_sum(value)
        return self.should_exit()

    def should_exit(self) -> bool:
        """:func:`should_exit_early` on every token added so far."""
        if self.count == 0 or self._invalid:
            return False
        try:
            total = math.fsum(self._partials)
        except OverflowError:  # as should_exit_early: absurd logprobs are invalid
            return False
        remaining = None if self.max_tokens is None else max(self.max_tokens - self.count, 0)
        best = _best_score(self.signal, total, self.count, self._lowest, remaining,
                           self.slope, self.offset)
        return best is not None and best < self.threshold - SCORE_MARGIN

    def _add_to_sum(self, value: float) -> None:
        # Shewchuk's algorithm (the math.fsum recipe): the partials sum exactly to the values
        # added, so fsum(partials) is fsum(values), correctly rounded.
        partials = self._partials
        kept = 0
        for partial in partials:
            if abs(value) < abs(partial):
                value, partial = partial, value
            high = value + partial
            low = partial - (high - value)
            if math.isinf(high):  # overflow (math.fsum raises): invalid, as there
                self._invalid = True
                return
            if low:
                partials[kept] = low
                kept += 1
            value = high
        partials[kept:] = [value]


def _best_mean(total: float, count: int, max_remaining_tokens: int) -> float:
    """The highest final mean of ``count`` tokens summing to ``total``: every remaining token
    certain (adds 0 to the sum, 1 to the count)."""
    return total / (count + max_remaining_tokens)


def early_exit_index(
    signal: str,
    threshold: float,
    logprobs: Sequence[Any],
    *,
    max_tokens: int | None = None,
    horizon: int | None = None,
    slope: float = SLOPE,
    offset: float = OFFSET,
) -> int | None:
    """How many tokens a stream with early exit would generate, or ``None`` if it never exits.

    Replays :func:`should_exit_early` token by token over a complete answer (for simulations on
    stored per-token data). ``max_tokens`` is the answer's token cap (``num_predict``): the
    remaining-token bound after ``k`` tokens is ``max_tokens - k``. ``None`` means no known cap.
    ``horizon`` replaces that bound by a fixed guess of the tokens still to come (exits earlier,
    may change decisions).

    >>> early_exit_index("min_logprob", 0.7, [-0.1, -0.2, -3.0, -0.1, -0.1])
    3
    """
    if max_tokens is not None and max_tokens < len(logprobs):
        raise RoutingConfigError(
            f"max_tokens ({max_tokens}) is smaller than the answer ({len(logprobs)} tokens)"
        )
    # Incremental versions of the rules would be O(n); answers are short (<= a few hundred
    # tokens), and reusing should_exit_early keeps the simulation identical to the live rule.
    if horizon is not None and (isinstance(horizon, bool) or horizon < 0):
        raise RoutingConfigError(f"horizon must be a non-negative int, got {horizon!r}")
    for k in range(1, len(logprobs) + 1):
        if horizon is not None:
            remaining: int | None = horizon
        else:
            remaining = None if max_tokens is None else max_tokens - k
        if should_exit_early(
            signal, threshold, logprobs[:k], max_remaining_tokens=remaining, slope=slope,
            offset=offset,
        ):
            return k
    return None
