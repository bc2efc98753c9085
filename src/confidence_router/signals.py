"""Zero-shot confidence signals computed from the tokens of one answer.

Pure Python, no framework imports. Every score is oriented "higher = the local answer is more
likely correct" and lies in [0, 1]; an answer whose score cannot be computed gets ``None``
(*unknown*), never a silent 0.5.

The paper's signal is the arithmetic mean of the natural-log probabilities of all generated
tokens, mapped through ``sigmoid(2 * mean + 3)``::

    >>> from confidence_router.signals import compute_signals, score_for
    >>> s = compute_signals([-0.1, -0.2, -0.3])
    >>> round(s.mean_logprob, 3), round(s.confidence, 4), s.token_count
    (-0.2, 0.9309, 3)
    >>> round(score_for(s, "sum_logprob"), 4)      # exp(sum): the answer's joint probability
    0.5488

Give it the tokens with their top alternatives (``TokenLogprob`` objects, e.g. from
:func:`confidence_router.extraction.token_logprobs`) and the top-k signals are known too::

    >>> from confidence_router.extraction import TokenLogprob
    >>> tokens = [TokenLogprob(" Paris", -0.1, ((" Paris", -0.1), (" Lyon", -2.5)))]
    >>> round(score_for(compute_signals(tokens), "min_margin"), 4)  # p(top 1) - p(top 2)
    0.8228

No logprobs means *unknown*::

    >>> compute_signals([]).known
    False

The signals (names accepted by :func:`score_for`, the router's ``signal=`` and
``confidence-router calibrate --signal``) are listed in :data:`SIGNAL_DESCRIPTIONS`.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from confidence_router.errors import InvalidArgumentError

#: Paper constants of the logistic mapping ``sigmoid(SLOPE * mean + OFFSET)``.
SLOPE = 2.0
OFFSET = 3.0

#: Why a confidence could not be computed.
UNKNOWN_NO_LOGPROBS = "no_logprobs"
UNKNOWN_EMPTY_ANSWER = "empty_answer"
UNKNOWN_INVALID_LOGPROBS = "invalid_logprobs"

#: The signal the paper routes on (and the router's default).
PAPER_SIGNAL = "mean_logprob"


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
        raise InvalidArgumentError("mean_logprob is NaN")
    return sigmoid(slope * mean_logprob + offset)


def confidence_to_logprob(confidence: float, slope: float = SLOPE, offset: float = OFFSET) -> float:
    """Inverse of :func:`logprob_to_confidence`: the mean logprob at which a threshold sits.

    >>> round(confidence_to_logprob(0.7), 3)
    -1.076
    """
    if not 0.0 < confidence < 1.0:
        raise InvalidArgumentError(f"confidence must be in (0, 1), got {confidence!r}")
    return (math.log(confidence / (1.0 - confidence)) - offset) / slope


@dataclass(frozen=True)
class LogprobSignals:
    """Signals derived from the tokens of one answer.

    The first six fields come from the chosen tokens' logprobs alone; the margin and entropy
    fields need each token's top alternatives (``top_k >= 2`` resp. ``>= 1``) and are ``None``
    without them. Every field is ``None`` when the signals are unknown.

    Attributes:
        mean_logprob: arithmetic mean of all token logprobs.
        min_logprob: the lowest token logprob.
        token_count: number of tokens with a logprob.
        confidence: ``sigmoid(2 * mean + 3)`` (the paper's score).
        min_confidence: ``sigmoid(2 * min + 3)``, the minimum-token variant.
        unknown_reason: why the signals are unknown, else ``None``.
        sum_logprob: sum of the token logprobs (log of the answer's joint probability).
        first_logprob: logprob of the first token.
        mean_margin: mean over tokens of ``p(top 1) - p(top 2)`` of the position's top-k
            distribution (with greedy decoding, top 1 is the chosen token).
        min_margin: the smallest such margin (the least decided position).
        mean_entropy: mean over tokens of the entropy (nats) of the top-k distribution, the
            mass outside the top k counted as one more outcome (a lower bound of the true
            entropy).
        max_entropy: the largest such entropy.
        top_k: the smallest number of alternatives any token carried (0 = none).
    """

    mean_logprob: float | None
    min_logprob: float | None
    token_count: int
    confidence: float | None
    min_confidence: float | None
    unknown_reason: str | None = None
    sum_logprob: float | None = None
    first_logprob: float | None = None
    mean_margin: float | None = None
    min_margin: float | None = None
    mean_entropy: float | None = None
    max_entropy: float | None = None
    top_k: int = 0

    @property
    def known(self) -> bool:
        """Whether a confidence could be computed (the chosen tokens' logprobs are known)."""
        return self.confidence is not None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for metadata and storage)."""
        return asdict(self)


def unknown_signals(reason: str) -> LogprobSignals:
    """Signals for an answer whose confidence cannot be computed, with the reason."""
    return LogprobSignals(None, None, 0, None, None, unknown_reason=reason)


#: A tiny positive logprob can come from float rounding of log(1); anything larger is garbage.
_ROUNDING_SLACK = 1e-6


def _valid_logprob(value: float) -> bool:
    return math.isfinite(value) and value <= _ROUNDING_SLACK


def _position_stats(alternatives: Sequence[Any]) -> tuple[float | None, float] | None:
    """``(margin, entropy)`` of one position's top-k list, ``None`` if it is unusable.

    ``margin`` is ``None`` with fewer than two alternatives. Alternatives are ``(token,
    logprob)`` pairs (or objects with ``logprob``); invalid values make the list unusable.
    """
    probs: list[float] = []
    for alt in alternatives:
        value = alt[1] if isinstance(alt, (tuple, list)) else getattr(alt, "logprob", None)
        if value is None:
            return None
        value = float(value)
        if not _valid_logprob(value):
            return None
        probs.append(math.exp(min(value, 0.0)))
    if not probs:
        return None
    probs.sort(reverse=True)
    total = math.fsum(probs)
    if total > 1.0 + 1e-6:
        return None  # not a distribution (duplicated or garbage alternatives)
    rest = max(0.0, 1.0 - total)
    entropy = -math.fsum(p * math.log(p) for p in (*probs, rest) if p > 0.0)
    margin = probs[0] - probs[1] if len(probs) >= 2 else None
    return margin, max(0.0, entropy)


#: The fields of :class:`LogprobSignals` with their defaults, in declaration order.
_SIGNAL_DEFAULTS = {f.name: f.default for f in fields(LogprobSignals)}


def _chosen_fields(values: list[float], slope: float, offset: float) -> dict[str, Any] | None:
    """The fields that need only the chosen tokens' logprobs (clamped to <= 0); ``None`` when
    their sum is not finite (a NaN, or absurd logprobs near -1e308 that no model reports)."""
    try:
        total = math.fsum(values)
    except (OverflowError, ValueError):  # ValueError: inf + -inf
        return None
    if not math.isfinite(total):  # a NaN the caller's min/max let through
        return None
    mean = total / len(values)
    low = min(values)
    return {
        "mean_logprob": mean,
        "min_logprob": low,
        "token_count": len(values),
        "confidence": sigmoid(slope * mean + offset),
        "min_confidence": sigmoid(slope * low + offset),
        "sum_logprob": total,
        "first_logprob": values[0],
    }


def _chosen_signals(values: list[float], slope: float, offset: float) -> LogprobSignals:
    """:func:`compute_signals` of plain float logprobs (no alternatives)."""
    low, high = min(values), max(values)
    # min/max can step over a NaN (it compares false both ways): the sum catches it.
    if not (math.isfinite(low) and math.isfinite(high) and high <= _ROUNDING_SLACK):
        return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
    if high > 0.0:
        values = [min(value, 0.0) for value in values]
    base = _chosen_fields(values, slope, offset)
    if base is None:
        return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
    # What LogprobSignals(**base) builds, without the frozen dataclass's field-by-field
    # object.__setattr__ (a third of this function's time on the routing path).
    signals = object.__new__(LogprobSignals)
    signals.__dict__.update(_SIGNAL_DEFAULTS, **base)
    return signals


def compute_signals(
    logprobs: Iterable[float] | Iterable[Any] | None,
    *,
    slope: float = SLOPE,
    offset: float = OFFSET,
) -> LogprobSignals:
    """Compute the signals of one answer.

    ``logprobs`` is either the chosen tokens' natural-log probabilities (floats), or the
    tokens themselves: objects with a ``logprob`` and optionally ``top_logprobs`` (a sequence
    of ``(token, logprob)`` pairs, as :class:`confidence_router.extraction.TokenLogprob`).
    With tokens, the top-k signals (margins, entropies) are computed as well.

    ``None`` or an empty sequence gives unknown signals (reason ``no_logprobs``); a NaN, an
    infinity or a positive value gives unknown signals (reason ``invalid_logprobs``) rather than
    a misleading score. Unusable top-k lists leave only the top-k signals unknown.
    """
    if logprobs is None:
        return unknown_signals(UNKNOWN_NO_LOGPROBS)
    items = list(logprobs)
    if not items:
        return unknown_signals(UNKNOWN_NO_LOGPROBS)
    if set(map(type, items)) == {float}:
        # The routing hot path (chosen logprobs only): the same checks, without a Python-level
        # step per token.
        return _chosen_signals(items, slope, offset)
    values: list[float] = []
    tops: list[Sequence[Any]] = []
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            value = float(item)
            top: Sequence[Any] = ()
        else:
            raw = getattr(item, "logprob", None)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
            value = float(raw)
            top = getattr(item, "top_logprobs", None) or ()
            if not isinstance(top, (tuple, list)):
                top = tuple(top)  # read twice below
        if not _valid_logprob(value):
            return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
        values.append(min(value, 0.0))
        tops.append(top)
    base = _chosen_fields(values, slope, offset)
    if base is None:
        return unknown_signals(UNKNOWN_INVALID_LOGPROBS)
    if not all(tops):
        # A position without alternatives leaves every top-k signal unknown (the routing path
        # asks for none unless its signal reads them): skip the per-position work.
        return LogprobSignals(**base)
    stats = [_position_stats(top) for top in tops]
    margins = [s[0] for s in stats if s is not None]
    entropies = [s[1] for s in stats if s is not None]
    every_position = all(s is not None for s in stats)
    has_margins = every_position and all(m is not None for m in margins)
    return LogprobSignals(
        **base,
        mean_margin=math.fsum(margins) / len(margins) if has_margins else None,  # type: ignore[arg-type]
        min_margin=min(margins) if has_margins else None,  # type: ignore[type-var]
        mean_entropy=math.fsum(entropies) / len(entropies) if every_position else None,
        max_entropy=max(entropies) if every_position else None,
        top_k=min(len(top) for top in tops) if every_position else 0,
    )


# ---------------------------------------------------------------------------------------------
# Scores: each maps signals to [0, 1] ("higher = more likely correct") or None (unknown)
# ---------------------------------------------------------------------------------------------


def _exp(value: float | None) -> float | None:
    return None if value is None else math.exp(value)


def _entropy_score(entropy: float | None, top_k: int) -> float | None:
    # The largest entropy over k alternatives plus the rest is log(k + 1): scale to [0, 1].
    if entropy is None or top_k < 1:
        return None
    return min(1.0, max(0.0, 1.0 - entropy / math.log(top_k + 1)))


def _mean_of(*scores: float | None) -> float | None:
    if None in scores:
        return None
    return math.fsum(scores) / len(scores)  # type: ignore[arg-type]


def _sum_min_score(s: LogprobSignals) -> float | None:
    if s.sum_logprob is None or s.min_logprob is None:
        return None
    return math.exp((s.sum_logprob + s.min_logprob) / 2.0)


#: Named zero-shot scores the router can route on; each maps signals to [0, 1] or ``None``.
SIGNAL_SCORERS: Mapping[str, Callable[[LogprobSignals], float | None]] = {
    "mean_logprob": lambda s: s.confidence,
    "min_logprob": lambda s: s.min_confidence,
    "sum_logprob": lambda s: _exp(s.sum_logprob),
    "first_token": lambda s: _exp(s.first_logprob),
    "length": lambda s: 1.0 / s.token_count if s.known and s.token_count else None,
    "mean_margin": lambda s: s.mean_margin,
    "min_margin": lambda s: s.min_margin,
    "mean_entropy": lambda s: _entropy_score(s.mean_entropy, s.top_k),
    "max_entropy": lambda s: _entropy_score(s.max_entropy, s.top_k),
    "mean_min": lambda s: _mean_of(s.confidence, s.min_confidence),
    "sum_min": _sum_min_score,
    "margin_sum": lambda s: _mean_of(s.min_margin, _exp(s.sum_logprob)),
}

#: One line per signal, for help texts and reports.
SIGNAL_DESCRIPTIONS: Mapping[str, str] = {
    "mean_logprob": "mean token logprob, sigmoid(2*mean+3) (the paper's signal)",
    "min_logprob": "lowest token logprob, sigmoid(2*min+3)",
    "sum_logprob": "answer probability, exp(sum of token logprobs)",
    "first_token": "first token's probability, exp(logprob)",
    "length": "1 / number of tokens (shorter = more confident)",
    "mean_margin": "mean over tokens of p(top 1) - p(top 2) (needs top-k >= 2)",
    "min_margin": "smallest p(top 1) - p(top 2) over tokens (needs top-k >= 2)",
    "mean_entropy": "1 - mean top-k entropy / log(k+1) (needs top-k)",
    "max_entropy": "1 - largest top-k entropy / log(k+1) (needs top-k)",
    "mean_min": "average of the mean_logprob and min_logprob scores",
    "sum_min": "exp((sum + min) / 2): geometric mean of answer and weakest-token probability",
    "margin_sum": "average of the min_margin and sum_logprob scores (needs top-k >= 2)",
}


#: The signals that read each token's top alternatives (the local tier is asked for them).
NEEDS_TOP_LOGPROBS = frozenset(
    {"mean_margin", "min_margin", "mean_entropy", "max_entropy", "margin_sum"}
)


def score_for(signals: LogprobSignals, signal: str) -> float | None:
    """The [0, 1] score of the named signal (one of :data:`SIGNAL_SCORERS`), ``None`` if unknown."""
    try:
        scorer = SIGNAL_SCORERS[signal]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown signal {signal!r}; choose one of {sorted(SIGNAL_SCORERS)}"
        ) from None
    if not signals.known:
        return None
    return scorer(signals)


def answer_signals(answer: str | None, tokens: Iterable[Any] | None) -> LogprobSignals:
    """Signals of an answer text and its tokens: an empty (blank) answer is unknown.

    One rule for live routing records and stored evaluation rows: a blank answer has no
    confidence to speak of, whatever its tokens' logprobs.

    >>> answer_signals("  ", [-0.1]).unknown_reason
    'empty_answer'
    >>> answer_signals("\\u200b\\n", [-0.1]).unknown_reason   # only invisible characters
    'empty_answer'
    """
    if answer is not None and is_blank(answer):
        return unknown_signals(UNKNOWN_EMPTY_ANSWER)
    return compute_signals(tokens)


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace and invisible format characters
    (zero-width spaces and joiners, word joiners, byte order marks: Unicode category Cf).

    >>> is_blank(" \\n\\t"), is_blank("\\u200b\\ufeff\\u2060"), is_blank("\\u200bParis")
    (True, True, False)
    """
    if not text.strip():
        return True
    if text.isascii():
        return False
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def rank_average(columns: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Label-free rank combination: each row's mean normalised rank over several scores.

    Each column is one signal's scores over the same rows (``None`` = unknown). Ranks are
    tie-averaged and scaled to [0, 1] within each column; a row's result is the mean over
    the columns, ``None`` if any of its scores is unknown. It needs a population of answers
    (an evaluation run), not labels, so it is for reports and calibration, not per answer.

    >>> rank_average([[0.1, 0.9, 0.5], [0.2, 0.3, 0.1]])
    [0.25, 1.0, 0.25]
    """
    if not columns:
        raise InvalidArgumentError("rank_average needs at least one column")
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise InvalidArgumentError("all columns must have the same length")
    usable = [i for i in range(n) if all(c[i] is not None for c in columns)]
    out: list[float | None] = [None] * n
    if not usable:
        return out
    totals = {i: 0.0 for i in usable}
    for column in columns:
        ordered = sorted(usable, key=lambda i: column[i])  # type: ignore[arg-type,return-value]
        position = 0
        while position < len(ordered):
            end = position
            while end + 1 < len(ordered) and column[ordered[end + 1]] == column[ordered[position]]:
                end += 1
            rank = (position + end) / 2.0  # tie-averaged, 0-based
            scaled = rank / (len(ordered) - 1) if len(ordered) > 1 else 0.5
            for j in range(position, end + 1):
                totals[ordered[j]] += scaled
            position = end + 1
    for i in usable:
        out[i] = totals[i] / len(columns)
    return out
