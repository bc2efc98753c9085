"""confidence-router: run a cheap local LLM first, pay for a cloud LLM only when the local
answer is probably wrong.

The package imports lazily: ``import confidence_router`` loads no framework; each name is
imported on first use.

>>> from confidence_router import ConfidenceRoutedLLM  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ConfidenceRoutedLLM": "confidence_router.router",
    "ConfidenceRoutedLlamaIndexLLM": "confidence_router.llamaindex",
    "KnowledgeStore": "confidence_router.knowledge",
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
    "ConfidenceRouterError": "confidence_router.errors",
    "RoutingConfigError": "confidence_router.errors",
    "LocalModelError": "confidence_router.errors",
    "CloudEscalationError": "confidence_router.errors",
    "BudgetExceededError": "confidence_router.errors",
    "CloudBudget": "confidence_router.budget",
    "PIIGuard": "confidence_router.guards",
    "PriceTable": "confidence_router.costs",
    "RetryPolicy": "confidence_router.retry",
    "RollingQuantileThreshold": "confidence_router.calibration",
    "RoutingStats": "confidence_router.stats",
    "calibrate_threshold": "confidence_router.calibration",
    "ConfidenceCalibration": "confidence_router.correctness",
    "CalibrationFitError": "confidence_router.correctness",
    "score_for": "confidence_router.signals",
}

__all__ = [
    "BudgetExceededError",
    "CalibrationFitError",
    "CloudBudget",
    "CloudEscalationError",
    "ConfidenceCalibration",
    "ConfidenceRoutedLLM",
    "ConfidenceRoutedLlamaIndexLLM",
    "ConfidenceRouterError",
    "Decision",
    "KnowledgeStore",
    "LocalModelError",
    "LogprobSignals",
    "PIIGuard",
    "PriceTable",
    "RetryPolicy",
    "RollingQuantileThreshold",
    "RouterSettings",
    "RoutingConfigError",
    "RoutingPolicy",
    "RoutingStats",
    "SelfAssessmentProbe",
    "TokenLogprob",
    "__version__",
    "calibrate_threshold",
    "compute_signals",
    "confidence_to_logprob",
    "logprob_to_confidence",
    "score_for",
    "token_logprobs",
]

if TYPE_CHECKING:
    from confidence_router.budget import CloudBudget
    from confidence_router.calibration import RollingQuantileThreshold, calibrate_threshold
    from confidence_router.correctness import CalibrationFitError, ConfidenceCalibration
    from confidence_router.costs import PriceTable
    from confidence_router.errors import (
        BudgetExceededError,
        CloudEscalationError,
        ConfidenceRouterError,
        LocalModelError,
        RoutingConfigError,
    )
    from confidence_router.extraction import TokenLogprob, token_logprobs
    from confidence_router.guards import PIIGuard
    from confidence_router.knowledge import KnowledgeStore
    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM
    from confidence_router.policy import Decision, RoutingPolicy
    from confidence_router.probe import SelfAssessmentProbe
    from confidence_router.retry import RetryPolicy
    from confidence_router.router import ConfidenceRoutedLLM
    from confidence_router.settings import RouterSettings
    from confidence_router.signals import (
        LogprobSignals,
        compute_signals,
        confidence_to_logprob,
        logprob_to_confidence,
        score_for,
    )
    from confidence_router.stats import RoutingStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'confidence_router' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
