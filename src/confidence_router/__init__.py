"""confidence-router: run a cheap local LLM first, pay for a cloud LLM only when the local
answer is probably wrong.

The package imports lazily: ``import confidence_router`` loads no framework; each name is
imported on first use.

>>> from confidence_router import ConfidenceRoutedLLM  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ConfidenceRoutedLLM": "confidence_router.router",
    "ChatConfidenceRouter": "confidence_router.router",
    "ConfidenceRoutedLlamaIndexLLM": "confidence_router.llamaindex",
    "KnowledgeStore": "confidence_router.knowledge",
    "KnowledgeStoreError": "confidence_router.knowledge",
    "SelfAssessmentProbe": "confidence_router.probe",
    "RoutingPolicy": "confidence_router.policy",
    "RouterSettings": "confidence_router.settings",
    "Decision": "confidence_router.policy",
    "LogprobSignals": "confidence_router.signals",
    "compute_signals": "confidence_router.signals",
    "logprob_to_confidence": "confidence_router.signals",
    "confidence_to_logprob": "confidence_router.signals",
    "TokenLogprob": "confidence_router.extraction",
    "token_logprobs": "confidence_router.extraction",
    "should_exit_early": "confidence_router.early_exit",
    "early_exit_index": "confidence_router.early_exit",
    "ConfidenceRouterError": "confidence_router.errors",
    "RoutingConfigError": "confidence_router.errors",
    "LocalModelError": "confidence_router.errors",
    "CloudEscalationError": "confidence_router.errors",
    "BudgetExceededError": "confidence_router.errors",
    "MissingExtraError": "confidence_router.errors",
    "InvalidArgumentError": "confidence_router.errors",
    "InvalidTypeError": "confidence_router.errors",
    "InvalidInputError": "confidence_router.errors",
    "InvalidStateError": "confidence_router.errors",
    "TierTimeoutError": "confidence_router.errors",
    "IncompleteAnswerError": "confidence_router.errors",
    "EscalationBlockedError": "confidence_router.errors",
    "ReservationStateError": "confidence_router.errors",
    "Reason": "confidence_router.record",
    "RoutingRecord": "confidence_router.record",
    "TierUsage": "confidence_router.record",
    "CloudBudget": "confidence_router.budget",
    "PIIGuard": "confidence_router.guards",
    "PriceTable": "confidence_router.costs",
    "RetryPolicy": "confidence_router.retry",
    "RollingQuantileThreshold": "confidence_router.calibration",
    "RoutingStats": "confidence_router.stats",
    "MultiSink": "confidence_router.stats",
    "StatsSink": "confidence_router.stats",
    "OpenTelemetrySink": "confidence_router.otel",
    "routing_run_metadata": "confidence_router.telemetry",
    "routing_run_tags": "confidence_router.telemetry",
    "structured_router": "confidence_router.structured",
    "calibrate_threshold": "confidence_router.calibration",
    "RedisCloudBudget": "confidence_router.redis_state",
    "RedisRoutingStats": "confidence_router.redis_state",
    "RedisRollingQuantileThreshold": "confidence_router.redis_state",
    "ProxyConfig": "confidence_router.proxy",
    "ConfidenceCalibration": "confidence_router.correctness",
    "CalibrationFitError": "confidence_router.correctness",
    "score_for": "confidence_router.signals",
}

# LangChain names chat models ``Chat*``: the same class under its LangChain-style name.
_ALIASES: dict[str, str] = {"ChatConfidenceRouter": "ConfidenceRoutedLLM"}

__all__ = [
    "BudgetExceededError",
    "CalibrationFitError",
    "ChatConfidenceRouter",
    "CloudBudget",
    "CloudEscalationError",
    "ConfidenceCalibration",
    "ConfidenceRoutedLLM",
    "ConfidenceRoutedLlamaIndexLLM",
    "ConfidenceRouterError",
    "Decision",
    "EscalationBlockedError",
    "IncompleteAnswerError",
    "InvalidArgumentError",
    "InvalidInputError",
    "InvalidStateError",
    "InvalidTypeError",
    "KnowledgeStore",
    "KnowledgeStoreError",
    "LocalModelError",
    "LogprobSignals",
    "MissingExtraError",
    "MultiSink",
    "OpenTelemetrySink",
    "PIIGuard",
    "PriceTable",
    "ProxyConfig",
    "Reason",
    "RedisCloudBudget",
    "RedisRollingQuantileThreshold",
    "RedisRoutingStats",
    "ReservationStateError",
    "RetryPolicy",
    "RollingQuantileThreshold",
    "RouterSettings",
    "RoutingConfigError",
    "RoutingPolicy",
    "RoutingRecord",
    "RoutingStats",
    "SelfAssessmentProbe",
    "StatsSink",
    "TierTimeoutError",
    "TierUsage",
    "TokenLogprob",
    "__version__",
    "calibrate_threshold",
    "compute_signals",
    "confidence_to_logprob",
    "early_exit_index",
    "logprob_to_confidence",
    "routing_run_metadata",
    "routing_run_tags",
    "score_for",
    "should_exit_early",
    "structured_router",
    "token_logprobs",
]

if TYPE_CHECKING:
    __version__: str
    from confidence_router.budget import CloudBudget
    from confidence_router.calibration import RollingQuantileThreshold, calibrate_threshold
    from confidence_router.correctness import CalibrationFitError, ConfidenceCalibration
    from confidence_router.costs import PriceTable
    from confidence_router.early_exit import early_exit_index, should_exit_early
    from confidence_router.errors import (
        BudgetExceededError,
        CloudEscalationError,
        ConfidenceRouterError,
        EscalationBlockedError,
        IncompleteAnswerError,
        InvalidArgumentError,
        InvalidInputError,
        InvalidStateError,
        InvalidTypeError,
        LocalModelError,
        MissingExtraError,
        ReservationStateError,
        RoutingConfigError,
        TierTimeoutError,
    )
    from confidence_router.extraction import TokenLogprob, token_logprobs
    from confidence_router.guards import PIIGuard
    from confidence_router.knowledge import KnowledgeStore, KnowledgeStoreError
    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM
    from confidence_router.otel import OpenTelemetrySink
    from confidence_router.policy import Decision, RoutingPolicy
    from confidence_router.probe import SelfAssessmentProbe
    from confidence_router.proxy import ProxyConfig
    from confidence_router.record import Reason, RoutingRecord, TierUsage
    from confidence_router.redis_state import (
        RedisCloudBudget,
        RedisRollingQuantileThreshold,
        RedisRoutingStats,
    )
    from confidence_router.retry import RetryPolicy
    from confidence_router.router import ConfidenceRoutedLLM
    from confidence_router.router import ConfidenceRoutedLLM as ChatConfidenceRouter
    from confidence_router.settings import RouterSettings
    from confidence_router.signals import (
        LogprobSignals,
        compute_signals,
        confidence_to_logprob,
        logprob_to_confidence,
        score_for,
    )
    from confidence_router.stats import MultiSink, RoutingStats, StatsSink
    from confidence_router.structured import structured_router
    from confidence_router.telemetry import routing_run_metadata, routing_run_tags


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = _installed_version()
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'confidence_router' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def _installed_version() -> str:
    # pyproject.toml is the only place the version is written; read it from the installed
    # metadata, on first use (importlib.metadata is not free to import).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("confidence-router")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __dir__() -> list[str]:
    return __all__
