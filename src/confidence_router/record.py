"""The routing record: what was decided for one call, why, at what cost and latency.

Every response of :class:`~confidence_router.router.ConfidenceRoutedLLM` carries one in
``message.response_metadata["routing"]`` (LlamaIndex: ``additional_kwargs["routing"]``); stats
sinks, costs, the LlamaIndex LLM and errors (``error.routing``) read the same dict. At run
time it is a plain, JSON-serialisable ``dict``; :class:`RoutingRecord` types its keys.

>>> from confidence_router.record import Reason
>>> Reason.LOW_CONFIDENCE
'low_confidence'

Pure Python, no framework imports.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class Reason:
    """Every value of ``routing["reason"]`` (plain strings, so records stay JSON)."""

    CONFIDENT = "confident"
    """The local answer's confidence reached the threshold: served locally."""
    LOW_CONFIDENCE = "low_confidence"
    """The confidence was below the threshold: escalated (or would have been)."""
    CONFIDENCE_UNKNOWN = "confidence_unknown"
    """No logprobs, or an empty/whitespace answer: ``on_unknown`` decided."""
    LOCAL_ERROR = "local_error"
    """The local model failed or timed out: escalated."""
    PRECHECK = "precheck"
    """The self-assessment probe's P(YES) was below ``precheck_threshold``: escalated
    without local generation."""
    EARLY_EXIT = "early_exit"
    """The local answer was stopped mid-generation because it could no longer reach the
    threshold (``early_exit=True``): escalated."""
    CLOUD_ERROR = "cloud_error"
    """The cloud failed and ``on_cloud_error="local"`` served the local answer, flagged."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """The cloud budget could not cover the escalation: the local answer, flagged."""
    UNUSABLE_ANSWER = "unusable_answer"
    """The local answer does not do what the request requires, however confident (a forced
    tool call it did not make, output that does not parse into the requested schema, or an
    ``answer_check`` that rejected it; why in ``routing["unusable_answer"]``): escalated."""

    ALL = (
        CONFIDENT,
        LOW_CONFIDENCE,
        CONFIDENCE_UNKNOWN,
        LOCAL_ERROR,
        PRECHECK,
        EARLY_EXIT,
        CLOUD_ERROR,
        BUDGET_EXCEEDED,
        UNUSABLE_ANSWER,
    )


class TierUsage(TypedDict, total=False):
    """Token usage of one tier (LangChain ``usage_metadata`` shape)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


class RoutingRecord(TypedDict, total=False):
    """The keys of ``response_metadata["routing"]``.

    Always present: ``decision``, ``reason``, ``confidence``, ``threshold``, ``signal``,
    ``policy``, ``signals``, ``latency_s``, ``usage``, ``escalated``, ``would_escalate``,
    ``flagged``, ``cloud_attempts``, and the cost keys. The others appear when their stage
    ran.
    """

    decision: Literal["local", "cloud"]
    """Which tier's answer was returned."""
    reason: str
    """Why (a :class:`Reason` value)."""
    confidence: float | None
    """The routing score of the local answer (the chosen ``signal``), ``None`` if unknown."""
    p_correct: float | None
    """With a fitted confidence calibration: the estimated probability the local answer is
    correct."""
    threshold: float
    """The threshold in effect (per call, calibrator, or the router's)."""
    signal: str
    """The signal routed on."""
    policy: dict[str, Any]
    """Every knob in effect for this call."""
    signals: dict[str, Any] | None
    """All logprob signals of the local answer (``LogprobSignals.as_dict()``)."""
    latency_s: dict[str, float]
    """Seconds per stage: ``precheck``, ``local``, ``cloud``, ``total``."""
    usage: dict[str, TierUsage | None]
    """Token usage per tier (``local``, ``cloud``), each as reported by that tier."""
    escalated: bool
    """The query was sent to the cloud: it answered (``decision == "cloud"``), or it failed and
    ``on_cloud_error="local"`` served the local answer (``decision == "local"``, reason
    ``cloud_error``). Stats count both as escalations."""
    would_escalate: bool
    """The decision asked for the cloud (true even when the escalation was refused)."""
    flagged: bool
    """The answer needs a second look: kept local although the decision said escalate, kept
    with unknown confidence, a refusal, or a fall-back after a cloud error."""
    escalation_skipped: str
    """Why an escalation did not happen (``allow_escalation=False``, ``no cloud configured``,
    ``escalation guard: <reason>``, ``cloud budget exhausted``)."""
    unusable_answer: str
    """Why the local answer could not be used whatever its confidence (reason
    ``unusable_answer``): ``"no call of the forced tool 'get_weather'"``, the parse error of
    a structured answer, or what your ``answer_check`` returned."""
    local_answer: str
    """The local answer's text, kept when the query escalated."""
    local_error: str
    local_error_kind: str
    """``timeout``, ``transient``, ``disconnected``, ``throttled``, ``permanent`` or
    ``unknown``."""
    early_exit: dict[str, Any]
    """``{"exited": bool, "tokens": int}`` whenever ``early_exit`` was on: whether the local
    answer was stopped early and how many of its tokens were seen (``{"exited": False,
    "tokens": 0}`` when no local answer came: skipped by the pre-check; a local answer that
    failed counts the tokens that arrived before the failure)."""
    precheck: dict[str, Any]
    """The probe's ``p_yes``, threshold and extraction details (or its error)."""
    cloud_error: str
    cloud_error_kind: str
    cloud_error_code: str
    cloud_attempts: int
    """Cloud requests sent for this call (retries included; 0 when it did not escalate)."""
    refusal: str
    """The cloud's refusal stop reason (``content_filtered``, ``guardrail_intervened``)."""
    budget_reserved_usd: float
    budget_settlement: Literal["committed", "released"]
    cost_usd: float | None
    cloud_cost_usd: float | None
    all_cloud_cost_usd: float | None
    learned: bool
    learn_error: str
