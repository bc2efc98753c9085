"""Early exit: can a local answer, part-way through, still end up "keep local"?

Pure functions over the tokens generated so far (floats or
:class:`~confidence_router.extraction.TokenLogprob`). With ``early_exit=True`` the router asks
:func:`can_no_longer_keep` after every streamed token and, when it says so, closes the local
stream (the server stops generating) and escalates at once.

* ``min_logprob`` — **exact**: the score is ``sigmoid(2*min+3)`` and the minimum can only go
  down, so the first token whose own score is below the threshold decides; the decision is
  identical to generating to the end.
* ``mean_logprob`` — a **bound**: assume every remaining token is certain (logprob 0) and the
  answer runs to ``max_tokens`` more tokens; if even then the mean stays below the
  threshold's equivalent, the answer cannot be kept. With the default horizon this fires only
  on answers that are hopeless early on; a shorter horizon exits earlier but may change
  decisions (measure it on your traffic).
* any other signal: never exits early (no sound rule is known for it).

>>> can_no_longer_keep("min_logprob", 0.7, [-0.1, -2.0])
True
>>> can_no_longer_keep("mean_logprob", 0.7, [-0.1, -0.2])
False
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from confidence_router.signals import confidence_to_logprob

#: How many more tokens the mean bound assumes could still come (all certain).
DEFAULT_HORIZON_TOKENS = 32


def _logprob(token: Any) -> float:
    return float(getattr(token, "logprob", token))


def can_no_longer_keep(
    signal: str,
    threshold: float,
    tokens: Sequence[Any],
    *,
    horizon: int = DEFAULT_HORIZON_TOKENS,
) -> bool:
    """True when no continuation can bring the answer's ``signal`` score up to ``threshold``.

    Args:
        signal: the routing signal's name.
        threshold: the threshold in effect (a confidence in [0, 1]).
        tokens: the tokens generated so far (logprobs or ``TokenLogprob``).
        horizon: for mean-type signals, the most further tokens assumed possible.
    """
    if not tokens or threshold <= 0.0:
        return False
    if threshold >= 1.0:
        return True  # no answer reaches a confidence of 1
    values = [_logprob(t) for t in tokens]
    if any(math.isnan(v) for v in values):
        return False
    cutoff = confidence_to_logprob(threshold)
    if signal == "min_logprob":
        return min(values) < cutoff
    if signal == "mean_logprob":
        best_mean = math.fsum(min(v, 0.0) for v in values) / (len(values) + horizon)
        return best_mean < cutoff
    return False
