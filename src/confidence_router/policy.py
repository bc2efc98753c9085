"""The routing policy: pure functions from signals to a decision. No framework imports.

A query passes through stages; each stage either keeps the query local or escalates it:

1. optional pre-generation check (a self-assessment probe's P(YES)),
2. local generation, scored by a logprob signal after generation.

>>> from confidence_router.policy import RoutingPolicy, decide_after_generation
>>> from confidence_router.signals import compute_signals
>>> decide_after_generation(RoutingPolicy(threshold=0.7), compute_signals([-0.1, -0.3]))
Decision(escalate=False, reason='confident', score=0.9...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from confidence_router.errors import RoutingConfigError
from confidence_router.signals import SIGNAL_SCORERS, LogprobSignals, score_for

# Reasons recorded in ``response_metadata["routing"]["reason"]``.
REASON_CONFIDENT = "confident"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_UNKNOWN = "confidence_unknown"
REASON_LOCAL_ERROR = "local_error"
REASON_PRECHECK = "precheck"

ON_UNKNOWN_CHOICES = ("escalate", "local")
ON_CLOUD_ERROR_CHOICES = ("raise", "local")
ON_BUDGET_EXCEEDED_CHOICES = ("local", "raise")


@dataclass(frozen=True)
class RoutingPolicy:
    """The knobs of one routing decision (all overridable per call).

    Attributes:
        threshold: keep the local answer iff its confidence >= threshold (paper default 0.7,
            i.e. mean logprob >= -1.076 for the ``mean_logprob`` signal).
        signal: which zero-shot score to route on: ``mean_logprob`` (the paper's
            ``sigmoid(2*mean+3)``) or ``min_logprob`` (``sigmoid(2*min+3)``).
        on_unknown: what to do when the confidence is unknown (no logprobs): ``escalate``
            (default; safe) or ``local`` (keep the local answer, flagged).
        on_cloud_error: when the cloud fails on an escalated query: ``raise`` a
            :class:`~confidence_router.errors.CloudEscalationError` (default) or return the
            ``local`` answer flagged with ``reason="cloud_error"``.
        precheck_threshold: with a pre-generation probe, escalate at once iff P(YES) < this.
        allow_escalation: ``False`` keeps every query local (e.g. private data).
        on_budget_exceeded: when the cloud budget cannot cover an escalation: serve the
            ``local`` answer flagged (default, ``reason="budget_exceeded"``) or ``raise``
            :class:`~confidence_router.errors.BudgetExceededError`.
    """

    threshold: float = 0.7
    signal: str = "mean_logprob"
    on_unknown: str = "escalate"
    on_cloud_error: str = "raise"
    precheck_threshold: float = 0.5
    allow_escalation: bool = True
    on_budget_exceeded: str = "local"

    def __post_init__(self) -> None:
        for name in ("threshold", "precheck_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RoutingConfigError(f"{name} must be a number in [0, 1], got {value!r}")
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise RoutingConfigError(f"{name} must be in [0, 1], got {value!r}")
        if self.signal not in SIGNAL_SCORERS:
            raise RoutingConfigError(
                f"signal must be one of {sorted(SIGNAL_SCORERS)}, got {self.signal!r}"
            )
        if self.on_unknown not in ON_UNKNOWN_CHOICES:
            raise RoutingConfigError(
                f"on_unknown must be one of {ON_UNKNOWN_CHOICES}, got {self.on_unknown!r}"
            )
        if self.on_cloud_error not in ON_CLOUD_ERROR_CHOICES:
            raise RoutingConfigError(
                f"on_cloud_error must be one of {ON_CLOUD_ERROR_CHOICES}, got {self.on_cloud_error!r}"
            )
        if self.on_budget_exceeded not in ON_BUDGET_EXCEEDED_CHOICES:
            raise RoutingConfigError(
                f"on_budget_exceeded must be one of {ON_BUDGET_EXCEEDED_CHOICES}, "
                f"got {self.on_budget_exceeded!r}"
            )
        if not isinstance(self.allow_escalation, bool):
            raise RoutingConfigError(
                f"allow_escalation must be a bool, got {self.allow_escalation!r}"
            )

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """Names of the knobs, as accepted per call."""
        return _KNOB_NAMES

    def with_overrides(self, overrides: dict[str, Any]) -> RoutingPolicy:
        """A copy with some knobs replaced (validated)."""
        unknown = set(overrides) - set(self.knob_names())
        if unknown:
            raise RoutingConfigError(
                f"unknown routing knob(s) {sorted(unknown)}; known: {list(self.knob_names())}"
            )
        return replace(self, **overrides) if overrides else self


_KNOB_NAMES = tuple(f.name for f in fields(RoutingPolicy))


@dataclass(frozen=True)
class Decision:
    """Whether to escalate, why, and the score the decision was based on."""

    escalate: bool
    reason: str
    score: float | None


def decide_after_generation(policy: RoutingPolicy, signals: LogprobSignals) -> Decision:
    """Post-generation decision: keep the local answer iff its score >= the threshold."""
    score = score_for(signals, policy.signal)
    if score is None:
        return Decision(policy.on_unknown == "escalate", REASON_UNKNOWN, None)
    if score >= policy.threshold:
        return Decision(False, REASON_CONFIDENT, score)
    return Decision(True, REASON_LOW_CONFIDENCE, score)


def decide_precheck(policy: RoutingPolicy, p_yes: float) -> Decision:
    """Pre-generation decision: escalate without generating iff P(YES) < precheck_threshold."""
    if p_yes < policy.precheck_threshold:
        return Decision(True, REASON_PRECHECK, p_yes)
    return Decision(False, REASON_CONFIDENT, p_yes)
