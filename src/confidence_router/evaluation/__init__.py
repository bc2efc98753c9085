"""Evaluation harness: routing metrics, answer grading and QA datasets.

Importing this package needs numpy only; scikit-learn, ``datasets`` and LangChain are imported
lazily by the few functions that use them.

Example::

    >>> from confidence_router.evaluation import auroc, bootstrap_ci, is_correct
    >>> is_correct("Paris, France", ["Paris"])
    True
    >>> auroc([0, 1, 1], [0.2, 0.9, 0.4])
    1.0
"""

from confidence_router.evaluation.datasets import (
    DATA_DIR_ENV,
    KNOWN_DATASETS,
    QAItem,
    load_dataset,
    load_hf_dataset,
    question_hash_id,
    resolve_data_dir,
)
from confidence_router.evaluation.grading import (
    Grader,
    JudgeParseError,
    is_correct,
    llm_judge_grader,
    match_grader,
    normalize_answer,
    substring_grader,
    substring_match,
)
from confidence_router.evaluation.metrics import (
    BootstrapResult,
    DeferralCurve,
    OperatingPoint,
    PairedBootstrapResult,
    UndefinedMetricWarning,
    apgr,
    auprc_error,
    aurc,
    auroc,
    bootstrap_ci,
    brier,
    call_rate,
    cpt,
    deferral_curve,
    e_aurc,
    ece,
    operating_points,
    paired_bootstrap_delta,
    risk_coverage,
    system_accuracy,
    threshold_sweep,
)

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_DATASETS",
    "BootstrapResult",
    "DeferralCurve",
    "Grader",
    "JudgeParseError",
    "OperatingPoint",
    "PairedBootstrapResult",
    "QAItem",
    "UndefinedMetricWarning",
    "apgr",
    "auprc_error",
    "aurc",
    "auroc",
    "bootstrap_ci",
    "brier",
    "call_rate",
    "cpt",
    "deferral_curve",
    "e_aurc",
    "ece",
    "is_correct",
    "llm_judge_grader",
    "load_dataset",
    "load_hf_dataset",
    "match_grader",
    "normalize_answer",
    "operating_points",
    "paired_bootstrap_delta",
    "question_hash_id",
    "resolve_data_dir",
    "risk_coverage",
    "substring_grader",
    "substring_match",
    "system_accuracy",
    "threshold_sweep",
]
