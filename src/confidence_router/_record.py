"""Keeping the routing record of one call (see :mod:`confidence_router.record`).

:class:`RoutingTrace` applies the pure policy (:mod:`confidence_router.policy`) to what the
tiers returned and writes the record; it holds the cloud budget reservation of the call and,
when the call ends, prices it and feeds the calibrator and the stats sink, exactly once. It is
given its collaborators explicitly (:class:`Collaborators`), never the router.

Private to the router.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage

from confidence_router import policy as rules
from confidence_router.costs import routing_costs
from confidence_router.errors import (
    BudgetExceededError,
    CloudEscalationError,
    EscalationBlockedError,
    InvalidInputError,
    InvalidTypeError,
    LocalModelError,
)
from confidence_router.extraction import chosen_logprobs, message_text, token_logprobs
from confidence_router.guards import json_strings, request_check
from confidence_router.policy import RoutingPolicy
from confidence_router.record import Reason
from confidence_router.retry import (
    RetryPolicy,
    classify_error,
    error_code,
    may_have_been_billed,
    refusal_reason,
)
from confidence_router.signals import answer_signals, compute_signals, score_for

logger = logging.getLogger("confidence_router")


@dataclass(frozen=True)
class Collaborators:
    """What a call's record needs besides the policy; built once per router."""

    cloud_model: str | None
    """The cloud model id (``None``: no cloud tier)."""
    prices: Any
    """A :class:`~confidence_router.costs.PriceTable`."""
    local_model: str = ""
    """The local model's name (for tracing)."""
    stats: Any = None
    calibrator: Any = None
    budget: Any = None
    guard: Callable[[Sequence[BaseMessage]], str | None] | None = None
    cloud_refusal: Callable[[Sequence[BaseMessage]], str | None] | None = None
    """Why the cloud client could not send the conversation as it is (see
    :func:`~confidence_router.tier_clients.conversation_check`), or ``None``."""
    cloud_retry: RetryPolicy | None = None
    reserve_usd: Callable[..., float] | None = None
    """``reserve_usd(messages, tools=extras)``: the upper bound on one cloud request's cost
    (set when there is a budget)."""
    confidence_calibration: Any = None
    """A fitted :class:`~confidence_router.correctness.ConfidenceCalibration` that adds
    ``p_correct`` to the record."""
    cloud_extras: Sequence[Any] = ()
    """What every cloud request carries besides the messages (see
    :func:`~confidence_router.tier_clients.request_extras`): the guard judges it and the
    budget's bound counts it."""
    answer_checks: Sequence[Callable[[BaseMessage], str | None]] = ()
    """Checks of a local answer the decision would keep: each returns why it cannot be used
    (it then escalates, reason ``unusable_answer``) or ``None``."""


class RoutingTrace:
    """Accumulates the routing record of one call."""

    def __init__(
        self,
        policy: RoutingPolicy,
        messages: Sequence[BaseMessage],
        collab: Collaborators,
        cloud_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.messages = messages
        self.collab = collab
        self.cloud_kwargs: Mapping[str, Any] = cloud_kwargs or {}
        """This call's kwargs for the tiers (tools, formats, ...): sent to the cloud too."""
        self.started = time.perf_counter()
        self.local_error: BaseException | None = None
        self.reservation: Any = None
        self._attempt_in_flight = False
        """A cloud attempt started and is not settled: it may be billed."""
        self._committed_unknown_usd = 0.0
        self._may_escalate: bool | None = None
        self.run: tuple[Any, Any] | None = None
        """``(handlers, run_id)`` of the router's own run, annotated with the decision."""
        self._finished: dict[str, Any] | None = None
        self.record: dict[str, Any] = {
            "decision": "local",
            "reason": None,
            "confidence": None,
            "threshold": policy.threshold,
            "signal": policy.signal,
            "policy": policy.as_dict(),
            "signals": None,
            "latency_s": {},
            "usage": {},
            "escalated": False,
            "would_escalate": False,
            "flagged": False,
            "cloud_attempts": 0,
            "models": {"local": collab.local_model, "cloud": collab.cloud_model},
        }
        if policy.early_exit:
            # On every path, also when no local answer comes (skipped by the pre-check, failed):
            # the local answer's watch replaces it with what it saw.
            self.record["early_exit"] = {"exited": False, "tokens": 0}

    def timed(self, stage: str, started: float) -> None:
        self.record["latency_s"][stage] = time.perf_counter() - started

    # -- pre-check ----------------------------------------------------------------------------

    def precheck_done(self, score: Any) -> bool:
        """Record the probe's score; True means escalate without generating locally.

        Raises:
            InvalidTypeError: the score has no ``p_yes`` in [0, 1] (a custom pre-check's
                result); the flow then treats the pre-check as failed.
        """
        p_yes = getattr(score, "p_yes", None)
        if isinstance(p_yes, bool) or not isinstance(p_yes, (int, float)) or not (
            0.0 <= p_yes <= 1.0  # False for NaN too
        ):
            raise InvalidTypeError(
                f"the pre-check returned {type(score).__name__} {score!r:.80}, not a score with "
                "p_yes in [0, 1]"
            )
        p_yes = float(p_yes)
        decision = rules.decide_precheck(self.policy, p_yes)
        self.record["precheck"] = {
            "p_yes": p_yes,
            "threshold": self.policy.precheck_threshold,
            "escalate": decision.escalate,
            "extraction_mode": getattr(score, "extraction_mode", None),
            "had_retrieval": getattr(score, "had_retrieval", None),
            "n_hits_used": getattr(score, "n_hits_used", None),
            "prompt_version": getattr(score, "prompt_version", None),
        }
        if not decision.escalate or self.escalation_blocked():
            return False
        self.record["reason"] = Reason.PRECHECK
        return True

    def precheck_failed(self, error: BaseException) -> None:
        """A failed probe never blocks the query: record it and generate locally."""
        self.record["precheck"] = {
            "error": f"{type(error).__name__}: {error}",
            "error_kind": classify_error(error).value,
        }

    # -- local --------------------------------------------------------------------------------

    def local_failed(self, error: BaseException) -> None:
        self.record["reason"] = Reason.LOCAL_ERROR
        self._note_local_error(error)

    def retake_failed(self, error: BaseException) -> None:
        """The local answer generated after a refused or failed escalation failed (the reason
        that escalated stays)."""
        self._note_local_error(error)

    def _note_local_error(self, error: BaseException) -> None:
        self.record["local_error"] = f"{type(error).__name__}: {error}"
        self.record["local_error_kind"] = classify_error(error).value
        self.local_error = error

    def should_stop_early(self, cannot_be_kept: bool, *, has_content: bool = True) -> bool:
        """With ``early_exit`` on, and the tokens so far saying the local answer can no longer
        be kept (``cannot_be_kept``, from :class:`~confidence_router.early_exit.ExitTracker`):
        stop it now?

        Never when the query could not escalate anyway (not allowed, no cloud, guarded): the
        local answer will then be served, so it must be complete. Never while the answer
        shows nothing yet (``has_content`` False) under ``on_unknown="local"``: a blank
        answer has unknown confidence, which that policy keeps whatever its logprobs.
        """
        if not cannot_be_kept or not self.policy.early_exit:
            return False
        if not has_content and self.policy.on_unknown == "local":
            return False
        if self._may_escalate is None:
            self._may_escalate = self.policy.allow_escalation and (
                self.collab.cloud_model is not None and self._guard_verdict() is None
                and self._cloud_refusal() is None
            )
        return self._may_escalate

    def threshold_in_effect(self) -> float:
        return float(self.record["threshold"])

    def _score_local(self, message: BaseMessage, early_exit: dict[str, Any] | None) -> rules.Decision:
        meta = getattr(message, "response_metadata", None)
        # Without alternatives the chosen logprobs are all the signals need (faster).
        tokens: Sequence[Any] | None = chosen_logprobs(meta)
        if tokens is None:
            tokens = token_logprobs(meta)
        has_tool_calls = bool(getattr(message, "tool_calls", None))
        if early_exit is not None:
            self.record["early_exit"] = early_exit
        if early_exit and early_exit.get("exited"):
            # Stopped mid-generation because the answer could no longer reach the threshold.
            signals = compute_signals(tokens)
            decision = rules.Decision(
                True, Reason.EARLY_EXIT, rules.decide_after_generation(self.policy, signals).score
            )
        else:
            # A blank answer (without tool calls) has nothing to score, whatever its logprobs.
            text = None if has_tool_calls else message_text(message)
            signals = answer_signals(text, tokens)
            decision = rules.decide_after_generation(self.policy, signals)
            if self.collab.answer_checks and not decision.escalate:
                unusable = _unusable(self.collab.answer_checks, message)
                decision = rules.decide_on_usability(decision, unusable)
                if unusable is not None:
                    self.record["unusable_answer"] = unusable
        self.record["signals"] = _signals_dict(signals)
        self.record["confidence"] = decision.score
        self.record["reason"] = decision.reason
        self.record["usage"]["local"] = _usage_of(message)
        calibration = self.collab.confidence_calibration
        if calibration is not None:
            # The map was fitted on one signal's scores: read that signal, not the routed one.
            score = score_for(signals, getattr(calibration, "signal", self.policy.signal))
            self.record["p_correct"] = None if score is None else calibration.p_correct(score)
        if rules.serve_local_when_unknown(self.policy, decision):
            self.record["flagged"] = True  # kept although nothing says it is right
        calibrator = self.collab.calibrator
        if calibrator is not None and decision.score is not None:
            calibrator.observe(decision.score, escalated=decision.escalate)
        return decision

    def after_local(
        self, message: BaseMessage | None, *, early_exit: dict[str, Any] | None = None
    ) -> bool:
        """Decide after local generation; True means escalate to the cloud."""
        escalate = message is None or self._score_local(message, early_exit).escalate
        if escalate and self.escalation_blocked():
            if message is None:
                raise self.no_answer_error()
            return False
        return escalate

    def local_regenerated(self, message: BaseMessage) -> None:
        """The whole local answer, generated (again) to be served after a refused or failed
        escalation: the record's signals, confidence and local usage describe it (the usage
        adds to a first, stopped generation's); the reason and the early-exit facts stay."""
        meta = getattr(message, "response_metadata", None)
        tokens: Sequence[Any] | None = chosen_logprobs(meta)
        if tokens is None:
            tokens = token_logprobs(meta)
        text = None if getattr(message, "tool_calls", None) else message_text(message)
        signals = answer_signals(text, tokens)
        self.record["signals"] = _signals_dict(signals)
        self.record["confidence"] = rules.decide_after_generation(self.policy, signals).score
        self.record["usage"]["local"] = _added_usage(
            self.record["usage"].get("local"), _usage_of(message)
        )

    # -- escalation ---------------------------------------------------------------------------

    def escalation_blocked(self) -> bool:
        """True when the decision says escalate but the query must stay local."""
        self.record["would_escalate"] = True
        may_send = self.policy.allow_escalation
        guard_verdict = self._guard_verdict() if may_send else None
        skipped = rules.escalation_skip_reason(
            self.policy,
            has_cloud=self.collab.cloud_model is not None,
            guard_verdict=guard_verdict,
            cloud_refusal=self._cloud_refusal() if may_send and not guard_verdict else None,
        )
        if skipped is None:
            return False
        self.record["flagged"] = True
        self.record["escalation_skipped"] = skipped
        return True

    def _guard_verdict(self) -> str | None:
        guard = self.collab.guard
        if guard is None or self.collab.cloud_model is None:
            return None
        try:
            verdict = guard(self.messages)
            # (A wire check on the serialised body, where the client allows one, comes on top.)
            extras = self._request_extras()
            if not verdict and extras:
                verdict = _judge_extras(guard, extras)
        except Exception as error:  # noqa: BLE001 - a broken guard fails closed (privacy)
            return f"failed ({type(error).__name__}: {error})"
        return verdict or None

    def _cloud_refusal(self) -> str | None:
        check = self.collab.cloud_refusal
        if check is None or self.collab.cloud_model is None:
            return None
        return check(self.messages)

    def escalating(self, local_message: BaseMessage | None) -> None:
        self.record["decision"] = "cloud"
        self.record["escalated"] = True
        self.record["would_escalate"] = True
        if local_message is not None:
            self.record["local_answer"] = message_text(local_message)

    def _serve_local_instead(self, reason: str | None, skipped: str) -> None:
        self.record.update(decision="local", escalated=False, flagged=True)
        if reason is not None:
            self.record["reason"] = reason
        self.record["escalation_skipped"] = skipped

    def reserve_budget(self, local_message: BaseMessage | None) -> bool:
        """Reserve the upper bound of one cloud request's cost; False when the budget cannot
        cover it and the policy serves the local answer (``on_budget_exceeded="local"``)."""
        try:
            if self._reserve():
                return True
            estimate: float | None = self._estimate()
            unavailable = getattr(self.collab.budget, "unavailable", None)
            why = ("cloud budget exhausted" if not unavailable
                   else f"cloud budget unavailable: {unavailable}")
        except InvalidInputError as error:
            # Content billed by pages or duration (a document, audio): no bound can be
            # reserved, so no capped budget can admit it; the local answer is not lost.
            estimate, why = None, f"cloud budget cannot admit this request: {error}"
        self._serve_local_instead(Reason.BUDGET_EXCEEDED, why)
        if self.policy.on_budget_exceeded == "raise":
            budget = self.collab.budget
            needs = "an unbounded amount" if estimate is None else f"up to ${estimate:.6f}"
            raise BudgetExceededError(
                f"{why}: an escalation needs {needs}, "
                f"${budget.remaining:.6f} of ${budget.max_usd:g} left in the window",
                requested_usd=estimate,
                remaining_usd=budget.remaining,
                max_usd=budget.max_usd,
                window_s=budget.window_s,
                routing=self.finish(),
                local_message=local_message,
            )
        return False

    def _estimate(self) -> float:
        assert self.collab.reserve_usd is not None
        # Everything sent is billed as input: tool definitions, schemas and model fields too.
        return float(self.collab.reserve_usd(self.messages, tools=self._request_extras()))

    def _request_extras(self) -> list[Any]:
        """What the cloud request carries besides the messages: bound tools, schemas, model
        fields, and this call's tier kwargs (judged by the guard, counted by the budget)."""
        return [*self.collab.cloud_extras, *self.cloud_kwargs.values()]

    def _reserve(self) -> bool:
        budget = self.collab.budget
        if budget is None:
            return True
        estimate = self._estimate()
        self.reservation = budget.reserve(estimate)
        if self.reservation is None:
            return False
        self.record["budget_reserved_usd"] = (
            self.record.get("budget_reserved_usd", 0.0) + estimate
        )
        return True

    def needs_local_after_refusal(self, has_complete_answer: bool) -> bool:
        """The escalation was refused: generate the (whole) local answer now?"""
        return rules.generate_locally_after_budget_refusal(
            has_local_answer=has_complete_answer, local_failed=self.local_error is not None
        )

    def cloud_attempt_started(self) -> None:
        self.record["cloud_attempts"] += 1
        self._attempt_in_flight = True

    def blocked_on_the_wire(self, error: EscalationBlockedError) -> None:
        """The guard stopped the serialised request before it was sent: nothing was billed."""
        self.record["cloud_attempts"] -= 1
        self._settle(billed=False)
        self._serve_local_instead(None, f"escalation guard: {error}")

    def _settle(self, *, billed: bool, actual_usd: float | None = None) -> None:
        self._attempt_in_flight = False
        if self.reservation is None:
            return
        reservation, self.reservation = self.reservation, None
        if billed:
            reservation.commit(actual_usd)
            if actual_usd is None:
                self._committed_unknown_usd += reservation.amount_usd if hasattr(
                    reservation, "amount_usd") else 0.0
            self.record["budget_settlement"] = "committed"
        else:
            reservation.release()
            self.record["budget_settlement"] = "released"

    def cloud_attempt_failed(self, error: BaseException) -> None:
        """Record a failed cloud attempt; a request that may have reached the cloud (a read
        timeout, a dropped connection, a cancellation) keeps its reservation as spent."""
        self._count_client_retries(getattr(error, "response", None))
        self.record["cloud_error"] = f"{type(error).__name__}: {error}"
        self.record["cloud_error_kind"] = classify_error(error).value
        self.record["cloud_error_code"] = error_code(error)
        self._settle(billed=may_have_been_billed(error))

    def retry_delay(self, error: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying the cloud, or ``None`` to stop. A retry needs a new
        budget reservation: the cap holds across retries."""
        retry = self.collab.cloud_retry
        if retry is None or attempt >= retry.max_attempts:
            return None
        if not retry.should_retry(classify_error(error)):
            return None
        if not self._reserve():
            self.record["retry_stopped"] = "cloud budget exhausted"
            return None
        delay = retry.delays()[attempt - 1]
        self.record.setdefault("cloud_retries", []).append(
            {
                "attempt": attempt,
                "kind": classify_error(error).value,
                "delay_s": delay,
                "error": f"{type(error).__name__}: {error}",
            }
        )
        logger.info(
            "confidence_router: cloud attempt %d failed (%s), retrying in %.3g s",
            attempt, classify_error(error).value, delay,
        )
        return delay

    def cancelled(self) -> None:
        """The caller went away mid-call (stream closed, task cancelled): a request in flight
        may still be billed, so its reservation counts as spent; one reserved for an attempt
        not yet sent (cancelled during a retry's back-off) is released."""
        self._settle(billed=self._attempt_in_flight)

    def _count_client_retries(self, response: Any) -> None:
        # A client the router could not configure (your own boto3 client) may retry on its
        # own; botocore reports how often, and those are requests sent too.
        meta = response.get("ResponseMetadata") if isinstance(response, dict) else None
        retries = meta.get("RetryAttempts") if isinstance(meta, dict) else None
        if isinstance(retries, int) and not isinstance(retries, bool) and retries > 0:
            self.record["cloud_attempts"] += retries

    def cloud_done(self, message: BaseMessage) -> None:
        self._count_client_retries(message.response_metadata)
        self.record["usage"]["cloud"] = _usage_of(message)
        refusal = refusal_reason(message.response_metadata)
        if refusal is not None:
            # A refusal is an answer, not an error: it is returned, flagged, never retried.
            self.record["refusal"] = refusal
            self.record["flagged"] = True
        self.record.pop("cloud_error", None)
        self.record.pop("cloud_error_kind", None)
        self.record.pop("cloud_error_code", None)
        if self.reservation is not None:
            usage = self.record["usage"]["cloud"]
            # Every real request has input tokens: an answer reporting none (ChatBedrock reads
            # InvokeModel's counts from headers a gateway may drop, and reports 0/0) was
            # billed for an unknown amount, so it counts at its reserved bound, not as free.
            actual = (
                self.collab.prices.cost_of(usage, self.collab.cloud_model)
                if _input_tokens(usage) else None
            )
            self._settle(billed=True, actual_usd=actual)

    def needs_local_after_cloud_failure(self, has_complete_answer: bool, ran: bool) -> bool:
        """The cloud failed: generate the (whole) local answer now, to fall back on it?"""
        if ran and not has_complete_answer:  # stopped early: finish it if the policy falls back
            return self.policy.on_cloud_error == "local"
        return rules.generate_locally_after_cloud_failure(
            self.policy, reason=self.record["reason"], has_local_answer=has_complete_answer
        )

    def cloud_fallback(self, error: BaseException, local_message: BaseMessage | None) -> None:
        """Apply ``on_cloud_error``: return to serve the local answer (flagged), or raise."""
        if rules.falls_back_to_local(self.policy, has_local_answer=local_message is not None):
            self.record.update(decision="local", reason=Reason.CLOUD_ERROR, flagged=True)
            return
        routing = self.finish()
        if routing.get("local_error") is not None:
            text = f"local model failed ({routing['local_error']}) and cloud failed: {error}"
        else:
            text = f"cloud model failed on an escalated query ({routing['reason']}): {error}"
        raise CloudEscalationError(text, routing=routing, local_message=local_message) from error

    def partial_cloud_failure(
        self, error: BaseException, n_chunks: int, local_message: BaseMessage | None
    ) -> CloudEscalationError:
        """Part of the cloud answer is already out: falling back to the local one would mix
        two models' text, so this is always an error."""
        self.record["cloud_error"] = f"{type(error).__name__}: {error}"
        self.record["cloud_error_kind"] = classify_error(error).value
        self.record["cloud_error_code"] = error_code(error)
        self._settle(billed=True)  # the cloud produced output: it bills it
        return CloudEscalationError(
            f"cloud stream failed after {n_chunks} chunks: {error}",
            routing=self.finish(),
            local_message=local_message,
        )

    def no_answer_error(self) -> LocalModelError:
        """The local model failed and the query could not go to the cloud."""
        why = self.record.get("escalation_skipped", "escalation was not possible")
        error = LocalModelError(
            f"local model failed ({self.record.get('local_error')}) and {why}",
            routing=self.finish(),
        )
        error.__cause__ = self.local_error
        return error

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Close the record once: total latency, costs, stats. Later calls return it as is."""
        if self._finished is not None:
            return self._finished
        if self.reservation is not None:  # the call ended without settling (cancelled)
            self.cancelled()
        self.record["latency_s"]["total"] = time.perf_counter() - self.started
        self.record.update(routing_costs(self.record, self.collab.prices, self.collab.cloud_model))
        if self._committed_unknown_usd:
            # Requests that may have been billed without usage (timeouts, cancellations, an
            # answer that reported none) count at their reserved bound, as in the budget.
            cloud = (self.record.get("cloud_cost_usd") or 0.0) + self._committed_unknown_usd
            local = self.record.get("local_cost_usd")
            self.record["cloud_cost_usd"] = cloud
            self.record["cost_usd"] = None if local is None else local + cloud
            self.record["cloud_cost_estimated"] = True
        self._finished = self.record
        if self.run is not None:
            try:
                from confidence_router.telemetry import annotate_run

                annotate_run(self.run[0], self.run[1], self.record)
            except Exception:
                logger.exception("confidence_router: annotating the run failed")
        stats = self.collab.stats
        if stats is not None:
            try:
                stats.record(self.record)
            except Exception:
                logger.exception("confidence_router: stats sink failed")
        # Decision facts only: never the prompt, the answers or any credential.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "routed decision=%s reason=%s confidence=%s threshold=%s cloud_attempts=%s",
                self.record["decision"],
                self.record["reason"],
                self.record["confidence"],
                self.record["threshold"],
                self.record["cloud_attempts"],
            )
        return self.record

    def decision_event(self) -> dict[str, Any]:
        keys = ("decision", "reason", "confidence", "threshold", "signal", "would_escalate")
        return {k: self.record.get(k) for k in keys}


def _signals_dict(signals: Any) -> dict[str, Any]:
    # A shallow copy of the dataclass's fields (dataclasses.asdict deep-copies: slow on the hot
    # path); LogprobSignals keeps exactly its fields in __dict__.
    return dict(vars(signals))


def _usage_of(message: BaseMessage | None) -> dict[str, Any] | None:
    usage = getattr(message, "usage_metadata", None)
    return dict(usage) if usage else None


def _input_tokens(usage: Mapping[str, Any] | None) -> int:
    """The input token count of a usage record (LangChain's or Bedrock's key), 0 if none."""
    value = (usage or {}).get("input_tokens", (usage or {}).get("inputTokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _added_usage(
    spent: dict[str, Any] | None, more: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Two generations' token counts added up (``None`` when neither reported any)."""
    if spent is None or more is None:
        return more if spent is None else spent
    total = dict(spent)
    for key, value in more.items():
        if isinstance(value, int) and isinstance(total.get(key, 0), int):
            total[key] = total.get(key, 0) + value
    return total


def _unusable(checks: Sequence[Callable[[BaseMessage], str | None]], message: BaseMessage) -> str | None:
    """The first check's reason why ``message`` cannot be used, ``None`` when all pass. A check
    that raises rejects the answer (the cloud is asked instead)."""
    for check in checks:
        try:
            verdict = check(message)
        except Exception as error:  # noqa: BLE001 - a broken check must not serve the answer
            return f"answer check failed ({type(error).__name__}: {error})"
        if verdict:
            return str(verdict)
    return None


def _judge_extras(guard: Callable[..., Any], extras: Sequence[Any]) -> str | None:
    """The guard's verdict on what a request carries besides its messages (see
    :func:`~confidence_router.guards.request_check`)."""
    strings, unreadable = json_strings(extras)
    return request_check(guard)(strings, unreadable)  # type: ignore[no-any-return]
