"""The routing policy: its knobs and pure decision functions. No framework imports.

A query passes through stages; each stage either keeps the query local or escalates it:

1. optional pre-generation check (a self-assessment probe's P(YES)),
2. local generation, scored by a logprob signal after generation,
3. escalation, which may still be refused: not allowed, no cloud, the privacy guard, or the
   cloud budget; then the local answer is served, flagged.

Every function here is pure: the router (``_record``) feeds it facts and records the result.

>>> from confidence_router.policy import RoutingPolicy, decide_after_generation
>>> from confidence_router.signals import compute_signals
>>> decide_after_generation(RoutingPolicy(threshold=0.7), compute_signals([-0.1, -0.3]))
Decision(escalate=False, reason='confident', score=0.9...)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from confidence_router.errors import RoutingConfigError
from confidence_router.record import Reason
from confidence_router.signals import SIGNAL_SCORERS, LogprobSignals, score_for

# Kept as module constants for code written against 0.1 (the names are in record.Reason).
REASON_CONFIDENT = Reason.CONFIDENT
REASON_LOW_CONFIDENCE = Reason.LOW_CONFIDENCE
REASON_UNKNOWN = Reason.CONFIDENCE_UNKNOWN
REASON_LOCAL_ERROR = Reason.LOCAL_ERROR
REASON_PRECHECK = Reason.PRECHECK

ON_UNKNOWN_CHOICES = ("escalate", "local")
ON_CLOUD_ERROR_CHOICES = ("raise", "local")
ON_BUDGET_EXCEEDED_CHOICES = ("local", "raise")


@dataclass(frozen=True)
class RoutingPolicy:
    """The knobs of one routing decision, with their defaults: the single declaration that the
    router's fields, :class:`~confidence_router.settings.RouterSettings` and the LlamaIndex
    LLM derive from. Every knob can be overridden per call.

    Attributes:
        threshold: keep the local answer iff its confidence >= threshold (paper default 0.7,
            i.e. mean logprob >= -1.076 for the ``mean_logprob`` signal).
        signal: which zero-shot score to route on (a name in
            :data:`confidence_router.signals.SIGNAL_SCORERS`). Default ``mean_min``: the
            average of the paper's ``sigmoid(2*mean+3)`` (``mean_logprob``, still available
            by name) and the weakest token's ``sigmoid(2*min+3)`` — the only signal
            significantly better than the mean on both evaluation sets (README, "Confidence
            signals"). For answers whose tokens are equally sure, it equals the paper's.
        on_unknown: what to do when the confidence is unknown (no logprobs, empty answer):
            ``escalate`` (default; safe) or ``local`` (keep the local answer, flagged).
        on_cloud_error: when the cloud fails on an escalated query: ``raise`` a
            :class:`~confidence_router.errors.CloudEscalationError` (default) or return the
            ``local`` answer flagged with ``reason="cloud_error"``.
        precheck_threshold: with a pre-generation probe, escalate at once iff P(YES) < this.
        allow_escalation: ``False`` keeps every query local (e.g. private data).
        on_budget_exceeded: when the cloud budget cannot cover an escalation: serve the
            ``local`` answer flagged (default, ``reason="budget_exceeded"``) or ``raise``
            :class:`~confidence_router.errors.BudgetExceededError`.
        early_exit: stop the local generation as soon as the decision can no longer come out
            "keep local", and escalate at once (saves local decode time on escalated queries).
    """

    threshold: float = 0.7
    signal: str = "mean_min"
    on_unknown: str = "escalate"
    on_cloud_error: str = "raise"
    precheck_threshold: float = 0.5
    allow_escalation: bool = True
    on_budget_exceeded: str = "local"
    early_exit: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "precheck_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RoutingConfigError(f"{name} must be a number in [0, 1], got {value!r}")
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise RoutingConfigError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.signal, str) or self.signal not in SIGNAL_SCORERS:
            raise RoutingConfigError(
                f"signal must be one of {sorted(SIGNAL_SCORERS)}, got {self.signal!r}"
            )
        for name, choices in (
            ("on_unknown", ON_UNKNOWN_CHOICES),
            ("on_cloud_error", ON_CLOUD_ERROR_CHOICES),
            ("on_budget_exceeded", ON_BUDGET_EXCEEDED_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise RoutingConfigError(
                    f"{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        for name in ("allow_escalation", "early_exit"):
            if not isinstance(getattr(self, name), bool):
                raise RoutingConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def knob_names(cls) -> tuple[str, ...]:
        """Names of the knobs, as accepted per call."""
        return _KNOB_NAMES

    def with_overrides(self, overrides: dict[str, Any]) -> RoutingPolicy:
        """A copy with some knobs replaced (validated; unknown names raise
        :class:`~confidence_router.errors.RoutingConfigError`)."""
        if not overrides:
            return self
        check_knob_names(overrides)
        return replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        """The knobs as a plain dict (a fresh copy)."""
        return dict(self._as_dict)

    @functools.cached_property
    def _as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _KNOB_NAMES}

    @functools.cached_property
    def _as_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _KNOB_NAMES)


_KNOB_NAMES = tuple(f.name for f in fields(RoutingPolicy))

#: The defaults of every knob (``DEFAULT_POLICY.threshold == 0.7``).
DEFAULT_POLICY = RoutingPolicy()


def check_knob_names(names: Any, *, what: str = "routing knob") -> None:
    """Raise :class:`RoutingConfigError` naming any name that is not a knob (with a hint for
    a near miss such as ``allow_escalaton``)."""
    unknown = sorted(set(names) - set(_KNOB_NAMES))
    if unknown:
        raise RoutingConfigError(unknown_names_message(unknown, _KNOB_NAMES, what=what))


def unknown_names_message(unknown: Any, known: Any, *, what: str) -> str:
    """``unknown routing knob(s) ['allow_escalaton'] (did you mean 'allow_escalation'?)...``"""
    import difflib

    unknown = sorted(unknown)
    by_lower = {str(k).lower(): k for k in known}  # a wrong case is a near miss too
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
        if close:
            hints.append(f"{name!r} -> did you mean {by_lower[close[0]]!r}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unknown {what}(s) {unknown}{hint}; known: {sorted(known)}"


@dataclass(frozen=True)
class Decision:
    """Whether to escalate, why, and the score the decision was based on.

    >>> from confidence_router.signals import compute_signals
    >>> decide_after_generation(RoutingPolicy(threshold=0.7), compute_signals([-2.0, -1.5]))
    Decision(escalate=True, reason='low_confidence', score=0.32324104508407026)
    """

    escalate: bool
    reason: str
    score: float | None


def decide_after_generation(policy: RoutingPolicy, signals: LogprobSignals) -> Decision:
    """Post-generation decision: keep the local answer iff its score >= the threshold.

    An unknown score (no logprobs, an empty answer) follows ``on_unknown``.
    """
    score = score_for(signals, policy.signal)
    if score is None:
        return Decision(policy.on_unknown == "escalate", Reason.CONFIDENCE_UNKNOWN, None)
    if score >= policy.threshold:
        return Decision(False, Reason.CONFIDENT, score)
    return Decision(True, Reason.LOW_CONFIDENCE, score)


def decide_on_usability(decision: Decision, unusable: str | None) -> Decision:
    """A local answer the decision would keep, but that does not do what the request requires
    (``unusable`` says why), escalates: a confident answer of the wrong shape is still wrong."""
    if unusable is None or decision.escalate:
        return decision
    return Decision(True, Reason.UNUSABLE_ANSWER, decision.score)


def decide_precheck(policy: RoutingPolicy, p_yes: float) -> Decision:
    """Pre-generation decision: escalate without generating iff P(YES) < precheck_threshold."""
    if p_yes < policy.precheck_threshold:
        return Decision(True, Reason.PRECHECK, p_yes)
    return Decision(False, Reason.CONFIDENT, p_yes)


def escalation_skip_reason(
    policy: RoutingPolicy,
    *,
    has_cloud: bool,
    guard_verdict: str | None,
    cloud_refusal: str | None = None,
) -> str | None:
    """Why an escalation the decision asked for must not happen (``None``: it may).

    ``guard_verdict`` is what the escalation guard said (a reason to keep the query local,
    or ``None``); a guard that failed is reported by the caller as a verdict too.
    ``cloud_refusal``: why the cloud client could not send the conversation as it is (an
    empty turn ChatBedrock would send as is), or ``None``.

    >>> escalation_skip_reason(RoutingPolicy(), has_cloud=True, guard_verdict=None,
    ...                        cloud_refusal="message 0 (user) would reach Bedrock empty")
    'cloud cannot send it: message 0 (user) would reach Bedrock empty'
    """
    if not policy.allow_escalation:
        return "allow_escalation=False"
    if not has_cloud:
        return "no cloud configured"
    if guard_verdict:
        return f"escalation guard: {guard_verdict}"
    if cloud_refusal:
        return f"cloud cannot send it: {cloud_refusal}"
    return None


def serve_local_when_unknown(policy: RoutingPolicy, decision: Decision) -> bool:
    """True when a local answer is kept although its confidence is unknown: it is flagged."""
    return decision.reason == Reason.CONFIDENCE_UNKNOWN and not decision.escalate


def falls_back_to_local(policy: RoutingPolicy, *, has_local_answer: bool) -> bool:
    """After a cloud failure: serve the local answer (flagged) rather than raise?"""
    return policy.on_cloud_error == "local" and has_local_answer


def generate_locally_after_cloud_failure(
    policy: RoutingPolicy, *, reason: str | None, has_local_answer: bool
) -> bool:
    """After a cloud failure on a query the pre-check sent straight to the cloud: generate
    locally now, when the policy accepts a local answer (the request is never lost)."""
    return (
        not has_local_answer and reason == Reason.PRECHECK and policy.on_cloud_error == "local"
    )


def generate_locally_after_budget_refusal(*, has_local_answer: bool, local_failed: bool) -> bool:
    """The budget refused an escalation that skipped local generation (pre-check): generate
    locally now, unless the local model already failed."""
    return not has_local_answer and not local_failed
