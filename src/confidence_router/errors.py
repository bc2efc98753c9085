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
