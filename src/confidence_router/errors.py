"""Typed errors raised by confidence-router.

Every error says what happened; none is swallowed. Escalation failures keep the local answer
(when there is one) so the caller can still use it.
"""

from __future__ import annotations

from typing import Any


class ConfidenceRouterError(Exception):
    """Base class of every error this library raises."""


class RoutingConfigError(ConfidenceRouterError, ValueError):
    """A routing knob (threshold, policy name, ...) has an invalid value."""


class LocalModelError(ConfidenceRouterError):
    """The local model failed and the query could not be escalated (no cloud, or not allowed)."""


class CloudEscalationError(ConfidenceRouterError):
    """The cloud model failed on an escalated query and the policy is ``on_cloud_error="raise"``.

    Attributes:
        routing: the routing record up to the failure (reason, confidence, latencies, ...).
        local_message: the local answer, when the local model produced one.
    """

    def __init__(self, message: str, *, routing: dict[str, Any], local_message: Any = None) -> None:
        super().__init__(message)
        self.routing = routing
        self.local_message = local_message


class BudgetExceededError(ConfidenceRouterError):
    """An escalation would push cloud spend over the configured budget (policy ``raise``).

    Raised by :meth:`confidence_router.budget.CloudBudget.hold` and by the router when its
    budget policy says so; the alternative policy serves the local answer, flagged.

    Attributes:
        requested_usd: the estimated cost of the refused escalation.
        remaining_usd: what was left of the budget in the current window when it was refused.
        max_usd: the budget per window.
        window_s: the window length in seconds.
        routing: the routing record up to the refusal, when raised by the router.
        local_message: the local answer, when the local model produced one.
    """

    def __init__(
        self,
        message: str,
        *,
        requested_usd: float | None = None,
        remaining_usd: float | None = None,
        max_usd: float | None = None,
        window_s: float | None = None,
        routing: dict[str, Any] | None = None,
        local_message: Any = None,
    ) -> None:
        super().__init__(message)
        self.requested_usd = requested_usd
        self.remaining_usd = remaining_usd
        self.max_usd = max_usd
        self.window_s = window_s
        self.routing = routing
        self.local_message = local_message
