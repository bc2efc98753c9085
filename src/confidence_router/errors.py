"""Typed errors raised by confidence-router.

Every error this library raises derives from :class:`ConfidenceRouterError`, so
``except ConfidenceRouterError`` catches all of them; each also derives from the builtin it
refines (``ValueError``, ``TimeoutError``, ...) so generic handlers keep working::

    ConfidenceRouterError
    ├── InvalidArgumentError (ValueError)    a bad value passed to a library function
    │   ├── RoutingConfigError               a bad knob, setting, kwarg or constructor field
    │   │   └── KnobError                    proxy.knobs: a bad per-request knob (body, header)
    │   ├── InvalidInputError                nothing to answer (no messages, only whitespace)
    │   ├── InvalidStateError                a saved state file that cannot be loaded
    │   └── (defined next to their features)
    │       EmbeddingDimensionError          knowledge: vectors of another dimension
    │       EvalDatabaseError                calibration: a run database that cannot be read
    │       DatasetFormatError               evaluation.datasets: a bad question-file row
    │       BaselineDataError,               evaluation.baseline: too few / one-class data,
    │         TrainTestOverlapError            a question both trained and tested on
    │       JudgeParseError                  evaluation.grading: an unreadable judge verdict
    │       ProtocolError                    serving.protocol: a malformed Ollama request
    │       RequestError                     proxy.formats: a malformed proxy request (400)
    ├── InvalidTypeError (TypeError)         a value of the wrong type
    ├── LocalModelError                      the local model failed and the query could not
    │                                        be escalated (no cloud, not allowed, guarded)
    ├── CloudEscalationError                 the cloud failed on an escalated query
    ├── BudgetExceededError                  an escalation would exceed the cloud budget
    ├── TierTimeoutError (TimeoutError)      a tier did not answer within its timeout
    ├── IncompleteAnswerError (ConnectionResetError)  a model's answer stream ended
    │                                        before its final chunk (cut mid-answer)
    ├── EscalationBlockedError               the privacy guard stopped a request on its
    │                                        way to the cloud (the router serves local)
    ├── ReservationStateError (RuntimeError) a budget reservation settled twice
    ├── KnowledgeStoreError (RuntimeError)   knowledge: the store's embedder or Chroma failed
    ├── CalibrationFitError (ValueError)     correctness: a calibration that cannot be fitted
    ├── EvalRunnerError                      evaluation.runner: a run that cannot go on
    │   ├── RunConfigMismatchError (ValueError)  resumed with another configuration
    │   ├── RunNotFoundError (LookupError)       no run of that name in the database
    │   └── RunDatabaseError (EvalDatabaseError) the run database cannot be written or read
    ├── BackendError                         serving.protocol: a model backend failed (HTTP)
    ├── RequestBodyError                     serving.http: a request body's framing or size
    │                                        (the server has answered 400 / 413)
    ├── ServerProcessError (RuntimeError)    testing.processes: redis/chroma did not start
    └── MissingExtraError (ImportError)      a feature's optional dependencies are missing

Nothing is swallowed: escalation failures keep the local answer (when there is one) and the
routing record, so the caller can still use them.
"""

from __future__ import annotations

from typing import Any


class ConfidenceRouterError(Exception):
    """Base class of every error this library raises."""


class InvalidArgumentError(ConfidenceRouterError, ValueError):
    """A value passed to a library function is invalid (the message names it)."""


class InvalidTypeError(ConfidenceRouterError, TypeError):
    """A value passed to a library function has the wrong type (the message names it)."""


class RoutingConfigError(InvalidArgumentError):
    """A routing knob, setting, per-call kwarg or constructor field is invalid or unknown."""


class InvalidInputError(InvalidArgumentError):
    """The input holds nothing to answer (no messages, or only whitespace). Raised before any
    request is sent."""


class InvalidStateError(InvalidArgumentError):
    """A saved state (threshold calibrator, budget) cannot be loaded: wrong kind, version or
    values."""


class LocalModelError(ConfidenceRouterError):
    """The local model failed and the query could not be escalated (no cloud, escalation not
    allowed, or blocked by the guard).

    Attributes:
        routing: the routing record of the failed call (also counted by ``stats``).
    """

    def __init__(self, message: str, *, routing: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.routing = routing


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


class TierTimeoutError(ConfidenceRouterError, TimeoutError):
    """A tier did not answer (or did not produce the next stream chunk) in time. The call was
    cancelled: its connection is closed, nothing keeps running."""


class IncompleteAnswerError(ConfidenceRouterError, ConnectionResetError):
    """A model's answer stream ended before its final chunk: the connection closed
    mid-answer, so the text received is a fragment, not an answer. The router treats it as a
    failed tier (``error_kind`` ``disconnected``) and never serves the fragment."""


class EscalationBlockedError(ConfidenceRouterError):
    """The escalation guard found something it must not send (or could not read) in the
    request as the cloud client serialised it, and stopped it before it left the process.

    The router catches it and serves the local answer flagged; you see it only when you use
    the guarded cloud client directly.
    """


class ReservationStateError(ConfidenceRouterError, RuntimeError):
    """A budget reservation was settled twice (committed or released more than once)."""


class MissingExtraError(ConfidenceRouterError, ImportError):
    """A feature was used whose pip extra is not installed; the message names the extra and
    the command that installs it.

    An :class:`ImportError` too, so code that already catches import failures keeps working.

    Attributes:
        extra: the extra to install (``"gsa"``, ``"llamaindex"``, ``"embedded"``, ...).
        feature: what needed it, in words.
        name: the module that is missing (as on every ImportError).
    """

    def __init__(self, message: str, *, extra: str, feature: str, name: str) -> None:
        super().__init__(message, name=name)
        self.extra = extra
        self.feature = feature
