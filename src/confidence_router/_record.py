"""The routing record of one call: what was decided, why, at what cost and latency.

Private to :mod:`confidence_router.router`. :class:`RoutingTrace` applies the pure policy
(:mod:`confidence_router.policy`) to what the tiers returned and keeps the record that ends up
in ``response_metadata["routing"]``; it also settles the cloud budget, prices the call, feeds
the threshold calibrator and the stats sink, exactly once per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage

from confidence_router._tiers import last_user_text, model_name, unwrap, usage_of
from confidence_router.errors import BudgetExceededError, CloudEscalationError, LocalModelError
from confidence_router.extraction import message_token_logprobs
from confidence_router.policy import (
    REASON_LOCAL_ERROR,
    REASON_PRECHECK,
    Decision,
    RoutingPolicy,
    decide_after_generation,
    decide_precheck,
)
from confidence_router.retry import classify_error, error_code, refusal_reason
from confidence_router.signals import UNKNOWN_EMPTY_ANSWER, compute_signals, unknown_signals

logger = logging.getLogger("confidence_router")

REASON_CLOUD_ERROR = "cloud_error"
REASON_BUDGET = "budget_exceeded"

#: Output tokens assumed for a budget reservation when the cloud model sets no max_tokens.
DEFAULT_RESERVED_OUTPUT_TOKENS = 1024


class RoutingTrace:
    """Accumulates the routing record of one call.

    ``router`` supplies the optional collaborators: ``cloud``, ``calibrator``, ``prices``,
    ``stats``, ``budget``, ``escalation_guard``.
    """

    def __init__(self, policy: RoutingPolicy, router: Any, messages: Sequence[BaseMessage]) -> None:
        self.policy = policy
        self.router = router
        self.messages = messages
        self.started = time.perf_counter()
        self.local_error: BaseException | None = None
        self.reservation: Any = None
        self._finished: dict[str, Any] | None = None
        self.record: dict[str, Any] = {
            "decision": "local",
            "reason": None,
            "confidence": None,
            "threshold": policy.threshold,
            "signal": policy.signal,
            "policy": dict(policy.__dict__),
            "signals": None,
            "latency_s": {},
            "usage": {},
            "escalated": False,
            "would_escalate": False,
            "flagged": False,
        }

    def timed(self, stage: str, started: float) -> None:
        self.record["latency_s"][stage] = time.perf_counter() - started

    # -- pre-check ----------------------------------------------------------------------------

    def precheck_done(self, score: Any) -> bool:
        """Record the probe's score; True means escalate without generating locally."""
        p_yes = float(score.p_yes)
        decision = decide_precheck(self.policy, p_yes)
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
        self.record["reason"] = REASON_PRECHECK
        return True

    def precheck_failed(self, error: BaseException) -> bool:
        """A failed probe never blocks the query: record it and generate locally."""
        self.record["precheck"] = {
            "error": f"{type(error).__name__}: {error}",
            "error_kind": classify_error(error).value,
        }
        return False

    # -- local --------------------------------------------------------------------------------

    def local_failed(self, error: BaseException) -> None:
        self.record["reason"] = REASON_LOCAL_ERROR
        self.record["local_error"] = f"{type(error).__name__}: {error}"
        self.record["local_error_kind"] = classify_error(error).value
        self.local_error = error

    def local_done(self, message: BaseMessage) -> Decision:
        tokens = message_token_logprobs(message)
        if tokens == [] and not message.text.strip():
            # An empty answer has no tokens to score; say so rather than "no logprobs".
            signals = unknown_signals(UNKNOWN_EMPTY_ANSWER)
        else:
            signals = compute_signals(None if tokens is None else [t.logprob for t in tokens])
        decision = decide_after_generation(self.policy, signals)
        self.record["signals"] = signals.as_dict()
        self.record["confidence"] = decision.score
        self.record["reason"] = decision.reason
        self.record["usage"]["local"] = usage_of(message)
        calibrator = self.router.calibrator
        if calibrator is not None:
            calibrator.observe(decision.score, escalated=decision.escalate)
        return decision

    def after_local(self, message: BaseMessage | None) -> bool:
        """Decide after local generation; True means escalate to the cloud."""
        escalate = message is None or self.local_done(message).escalate
        if escalate and self.escalation_blocked():
            if message is None:
                why = self.record.get("escalation_skipped", "escalation not possible")
                raise LocalModelError(
                    f"local model failed ({self.record.get('local_error')}) and {why}"
                ) from self.local_error
            return False
        return escalate

    # -- escalation ---------------------------------------------------------------------------

    def escalation_blocked(self) -> bool:
        """True when the decision says escalate but the query must stay local."""
        self.record["would_escalate"] = True
        skipped = self._skip_reason()
        if skipped is None:
            return False
        self.record["flagged"] = True
        self.record["escalation_skipped"] = skipped
        return True

    def _skip_reason(self) -> str | None:
        if not self.policy.allow_escalation:
            return "allow_escalation=False"
        if self.router.cloud is None:
            return "no cloud configured"
        guard = self.router.escalation_guard
        if guard is not None:
            try:
                verdict = guard(self.messages)
            except Exception as error:  # noqa: BLE001 - a broken guard fails closed (privacy)
                return f"escalation guard failed: {type(error).__name__}: {error}"
            if verdict:
                return f"escalation guard: {verdict}"
        return None

    def escalating(self, local_message: BaseMessage | None) -> None:
        self.record["decision"] = "cloud"
        self.record["escalated"] = True
        if local_message is not None:
            self.record["local_answer"] = local_message.text

    def reserve_budget(self, local_message: BaseMessage | None) -> bool:
        """Reserve the estimated cloud cost; False when the budget cannot cover it and the
        policy serves the local answer (``on_budget_exceeded="local"``)."""
        budget = self.router.budget
        if budget is None:
            return True
        from confidence_router.budget import estimate_escalation_cost

        price = self.router.price_table().price_for(model_name(self.router.cloud))
        max_out = getattr(unwrap(self.router.cloud), "max_tokens", None)
        estimate = estimate_escalation_cost(
            [m.text for m in self.messages], int(max_out or DEFAULT_RESERVED_OUTPUT_TOKENS), price
        )
        self.reservation = budget.reserve(estimate)
        if self.reservation is not None:
            self.record["budget_reserved_usd"] = estimate
            return True
        self.record.update(decision="local", escalated=False, reason=REASON_BUDGET, flagged=True)
        self.record["escalation_skipped"] = "cloud budget exhausted"
        if self.policy.on_budget_exceeded == "raise":
            routing = self.finish()
            raise BudgetExceededError(
                f"cloud budget exhausted: an escalation needs about ${estimate:.6f}, "
                f"${budget.remaining:.6f} of ${budget.max_usd:g} left in the window",
                requested_usd=estimate,
                remaining_usd=budget.remaining,
                max_usd=budget.max_usd,
                window_s=budget.window_s,
                routing=routing,
                local_message=local_message,
            )
        return False

    def cloud_done(self, message: BaseMessage) -> None:
        self.record["usage"]["cloud"] = usage_of(message)
        refusal = refusal_reason(message.response_metadata)
        if refusal is not None:
            # A refusal is an answer, not an error: it is returned, flagged, never retried.
            self.record["refusal"] = refusal
            self.record["flagged"] = True
        if self.reservation is not None:
            actual = self.router.price_table().cost_of(
                self.record["usage"]["cloud"], model_name(self.router.cloud)
            )
            self.reservation.commit(actual)
            self.reservation = None

    def cloud_failed(self, error: BaseException, *, partial: bool = False) -> None:
        self.record["cloud_error"] = f"{type(error).__name__}: {error}"
        self.record["cloud_error_kind"] = classify_error(error).value
        self.record["cloud_error_code"] = error_code(error)
        self.record["cloud_attempts"] = getattr(error, "retry_attempts", 1)
        if self.reservation is not None:
            # A stream that failed midway may be billed: keep the estimate; else nothing spent.
            self.reservation.commit() if partial else self.reservation.release()
            self.reservation = None

    def retry_locally_after_cloud_failure(self, local_message: BaseMessage | None) -> bool:
        """After a cloud failure: generate locally now? Only when the pre-check skipped local
        generation and the policy accepts a local answer (the request is never lost)."""
        return (
            local_message is None
            and self.record["reason"] == REASON_PRECHECK
            and self.policy.on_cloud_error == "local"
        )

    def local_fallback_needed(self, local_message: BaseMessage | None) -> bool:
        """Budget refused the escalation and there is no local answer yet (pre-check path)."""
        return local_message is None and self.local_error is None

    def cloud_fallback(self, error: Exception, local_message: BaseMessage | None) -> BaseMessage:
        """Apply ``on_cloud_error``: raise, or fall back to the local answer (flagged)."""
        self.cloud_failed(error)
        if self.policy.on_cloud_error == "local" and local_message is not None:
            self.record.update(decision="local", reason=REASON_CLOUD_ERROR, flagged=True)
            return local_message
        routing = self.finish()
        if local_message is None:
            text = f"local model failed ({routing.get('local_error')}) and cloud failed: {error}"
        else:
            text = f"cloud model failed on an escalated query ({routing['reason']}): {error}"
        raise CloudEscalationError(text, routing=routing, local_message=local_message) from error

    def partial_cloud_failure(
        self, error: Exception, n_chunks: int, local_message: BaseMessage | None
    ) -> CloudEscalationError:
        """Part of the cloud answer is already out: falling back to the local one would mix
        two models' text, so this is always an error."""
        self.cloud_failed(error, partial=True)
        return CloudEscalationError(
            f"cloud stream failed after {n_chunks} chunks: {error}",
            routing=self.finish(),
            local_message=local_message,
        )

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Close the record once: total latency, costs, stats. Later calls return it as is."""
        if self._finished is not None:
            return self._finished
        if self.reservation is not None:  # e.g. a generator closed early
            self.reservation.release()
            self.reservation = None
        self.record["latency_s"]["total"] = time.perf_counter() - self.started
        from confidence_router.costs import routing_costs

        cloud = self.router.cloud
        self.record.update(
            routing_costs(
                self.record, self.router.price_table(), model_name(cloud) if cloud else None
            )
        )
        self._finished = self.record
        stats = self.router.stats
        if stats is not None:
            try:
                stats.record(self.record)
            except Exception:
                logger.exception("confidence_router: stats sink failed")
        # Decision facts only: never the prompt, the answers or any credential.
        logger.debug(
            "routed decision=%s reason=%s confidence=%s threshold=%s",
            self.record["decision"],
            self.record["reason"],
            self.record["confidence"],
            self.record["threshold"],
        )
        return self.record

    def decision_event(self) -> dict[str, Any]:
        keys = ("decision", "reason", "confidence", "threshold", "signal", "would_escalate")
        return {k: self.record.get(k) for k in keys}

    def question(self) -> str:
        return last_user_text(self.messages)
