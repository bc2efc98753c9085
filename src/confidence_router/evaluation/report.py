"""Markdown + PNG report of one or more evaluation runs: the paper's central claim, measured.

For every run (one dataset each) the report gives the row accounting (n, failures excluded and
why, missing signals and why), local accuracy, and for every zero-shot signal (mean-logprob
confidence, min-token logprob, any extra score such as GSA ``p_yes``) and for the supervised
baseline: AUROC with a 95% bootstrap CI, AUPRC for errors, AURC/E-AURC, operating points
("escalate the bottom k%"), APGR/CPT when cloud labels exist, and paired bootstrap deltas.
The supervised baseline is trained on the **first** run's dataset (a stratified 70% split),
evaluated in distribution on the held-out 30% and cross-dataset on every other run. A learning
curve reports the paper's mean CV AUROC *and* the held-out AUROC per training size. The report
ends with the default signal the measurements support.

Everything is deterministic given the SQLite inputs (and the embeddings): bootstrap RNG seed 0,
baseline seed 43, no timestamps other than the runs' own start times.

Usage::

    from confidence_router.evaluation.report import generate_report

    report = generate_report(
        "eval-runs.sqlite",
        runs=["wikidata__gemma3:270m__few-shot-qa-v1", "triviaqa__gemma3:270m__few-shot-qa-v1"],
        name="embedded-gemma3-270m",
        out_dir="docs/results",
        embeddings=OllamaEmbeddings(base_url=server.url, model="gemma3:270m"),  # or None
    )
    report.markdown_path, report.figure_paths

or from the command line: ``confidence-router eval-report --db eval-runs.sqlite``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confidence_router.errors import InvalidArgumentError
from confidence_router.evaluation.baseline import (
    DEFAULT_SEED,
    BaselineDataError,
    EmbeddingCache,
    LabelledQuestion,
    LearningCurvePoint,
    SupervisedBaseline,
    learning_curve,
    split_train_test,
)
from confidence_router.evaluation.metrics import (
    BootstrapResult,
    OperatingPoint,
    PairedBootstrapResult,
    UndefinedMetricWarning,
    apgr,
    auprc_error,
    aurc,
    auroc,
    bootstrap_ci,
    cpt,
    e_aurc,
    operating_points,
    paired_bootstrap_delta,
)
from confidence_router.evaluation.runner import (
    BUILTIN_SIGNALS,
    RANK_SIGNALS,
    RunData,
    list_runs,
    load_run,
)
from confidence_router.policy import DEFAULT_POLICY
from confidence_router.signals import PAPER_SIGNAL, SIGNAL_DESCRIPTIONS, SIGNAL_SCORERS

__all__ = [
    "BASELINE",
    "BaselineReport",
    "DatasetReport",
    "DeltaResult",
    "Report",
    "ReportData",
    "SignalResult",
    "build_report",
    "compute_report",
    "evaluate_signal",
    "generate_report",
    "render_markdown",
    "signal_label",
    "write_figures",
]

BASELINE = "supervised_baseline"
"""Signal name used for the supervised baseline's scores in the report."""
DEFAULT_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
"""Escalation budgets of the operating-point tables ("escalate the bottom k%")."""
CPT_TARGETS: tuple[float, ...] = (0.2, 0.5, 0.8)
MIN_ROWS_PER_SIGNAL = 10
"""A per-signal AUROC needs at least this many rows."""

_LABELS = {
    "mean_logprob": "logprob (mean token, σ(2ℓ̄+3))",
    "min_logprob": "min-token logprob",
    BASELINE: "supervised baseline (LR on query embeddings)",
}

_DESCRIPTIONS = {
    **SIGNAL_DESCRIPTIONS,
    **{
        name: "label-free rank combination over the run: mean normalised rank of "
        + ", ".join(parts)
        + " (report only: one answer has no rank)"
        for name, parts in RANK_SIGNALS.items()
    },
}


def signal_label(signal: str) -> str:
    """Human-readable name of a signal for tables and plots.

    >>> signal_label("min_logprob"), signal_label("gsa.p_yes")
    ('min-token logprob', 'gsa.p_yes')
    """
    return _LABELS.get(signal, signal)


# --------------------------------------------------------------------------------------------
# Result records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalResult:
    """Ranking and decision metrics of one signal on one set of rows.

    ``auroc`` is ``None`` when the signal has fewer than :data:`MIN_ROWS_PER_SIGNAL` rows or a
    single class (``note`` says which).
    """

    signal: str
    subset: str
    n: int
    n_pos: int
    auroc: BootstrapResult | None
    auprc_error: float
    aurc: float
    e_aurc: float
    operating: tuple[OperatingPoint, ...]
    apgr: float | None = None
    cpt: dict[float, float] = field(default_factory=dict)
    cloud_accuracy: float | None = None
    roc: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
    note: str = ""

    @property
    def label(self) -> str:
        """Display name."""
        return signal_label(self.signal)


@dataclass(frozen=True)
class DeltaResult:
    """Paired bootstrap of ``AUROC(a) - AUROC(b)`` on the rows where both have a score."""

    a: str
    b: str
    subset: str
    n: int
    result: PairedBootstrapResult


@dataclass(frozen=True)
class DatasetReport:
    """Everything measured on one run."""

    run: RunData
    n_rows: int
    n_errors: int
    error_counts: dict[str, int]
    n_valid: int
    accuracy: float
    cloud_accuracy: float | None
    n_cloud_missing: int
    missing: dict[str, tuple[int, dict[str, int]]]
    signals: tuple[SignalResult, ...]
    heldout_signals: tuple[SignalResult, ...]
    deltas: tuple[DeltaResult, ...]
    latency: dict[str, tuple[float, float, float, int]]
    extra_text_counts: dict[str, dict[str, int]]

    @property
    def dataset(self) -> str:
        """The run's dataset name."""
        return self.run.info.dataset

    def signal(self, name: str, heldout: bool = False) -> SignalResult | None:
        """The result of signal ``name`` (on the baseline's held-out rows if ``heldout``)."""
        for result in self.heldout_signals if heldout else self.signals:
            if result.signal == name:
                return result
        return None


@dataclass(frozen=True)
class BaselineReport:
    """The supervised baseline: training summary, learning curve, or why it is missing."""

    trained: bool
    train_dataset: str
    note: str = ""
    n_train: int = 0
    n_train_pos: int = 0
    n_test: int = 0
    best_c: float = math.nan
    mean_cv_auroc: float = math.nan
    best_c_cv_auroc: float = math.nan
    learning_curve: tuple[LearningCurvePoint, ...] = ()
    reference_auroc: dict[str, float] = field(default_factory=dict)
    embeddings: str = ""


@dataclass(frozen=True)
class ReportData:
    """All computed numbers of a report (rendering is separate, see :func:`render_markdown`)."""

    name: str
    datasets: tuple[DatasetReport, ...]
    baseline: BaselineReport
    n_resamples: int
    seed: int
    fractions: tuple[float, ...]
    recommendation: str
    recommendation_lines: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    """A written report: the Markdown file, the figures and the data behind them."""

    markdown: str
    markdown_path: Path
    figure_paths: dict[str, Path]
    data: ReportData


# --------------------------------------------------------------------------------------------
# Computation
# --------------------------------------------------------------------------------------------


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a metric; an undefined value is reported as NaN in the table, not as a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return fn(*args, **kwargs)


def _roc_points(
    labels: NDArray[np.int64], scores: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve points (FPR, TPR) at every distinct threshold, highest score first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each tie block
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def evaluate_signal(
    signal: str,
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    *,
    subset: str,
    cloud_labels: NDArray[np.int64] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n_resamples: int = 1000,
    seed: int = 0,
) -> SignalResult:
    """All per-signal metrics on one set of rows (labels ``y``, scores ``s``, optional ``z``)."""
    n = int(labels.size)
    n_pos = int(labels.sum()) if n else 0
    note = ""
    auroc_ci: BootstrapResult | None = None
    if n < MIN_ROWS_PER_SIGNAL:
        note = f"only {n} rows (< {MIN_ROWS_PER_SIGNAL}): AUROC not reported"
    elif n_pos in (0, n):
        note = "a single class: AUROC undefined"
    else:
        auroc_ci = bootstrap_ci(labels, scores, n_resamples=n_resamples, seed=seed)
    if n == 0:
        return SignalResult(
            signal, subset, 0, 0, None, math.nan, math.nan, math.nan, (), note=note or "no rows"
        )
    apgr_value: float | None = None
    cpt_values: dict[float, float] = {}
    cloud_accuracy: float | None = None
    if cloud_labels is not None:
        cloud_accuracy = float(cloud_labels.mean())
        apgr_value = _quiet(apgr, labels, cloud_labels, scores)
        cpt_values = {x: _quiet(cpt, labels, cloud_labels, scores, x) for x in CPT_TARGETS}
    return SignalResult(
        signal=signal,
        subset=subset,
        n=n,
        n_pos=n_pos,
        auroc=auroc_ci,
        auprc_error=_quiet(auprc_error, labels, scores),
        aurc=_quiet(aurc, labels, scores),
        e_aurc=_quiet(e_aurc, labels, scores),
        operating=tuple(operating_points(labels, scores, (0.0, *fractions), cloud_labels)),
        apgr=apgr_value,
        cpt=cpt_values,
        cloud_accuracy=cloud_accuracy,
        roc=_roc_points(labels, scores) if auroc_ci is not None else None,
        note=note,
    )


def _paired(
    a: str,
    b: str,
    subset: str,
    ids_a: Sequence[str],
    scores_a: NDArray[np.float64],
    ids_b: Sequence[str],
    scores_b: NDArray[np.float64],
    labels_by_id: dict[str, int],
    n_resamples: int,
    seed: int,
) -> DeltaResult | None:
    """Paired delta on the rows both signals scored (in ``ids_a`` order); None if undefined."""
    index_b = {item: i for i, item in enumerate(ids_b)}
    keep = [i for i, item in enumerate(ids_a) if item in index_b]
    if len(keep) < MIN_ROWS_PER_SIGNAL:
        return None
    y = np.array([labels_by_id[ids_a[i]] for i in keep], dtype=np.int64)
    if y.min() == y.max():
        return None
    sa = scores_a[keep]
    sb = scores_b[[index_b[ids_a[i]] for i in keep]]
    result = paired_bootstrap_delta(y, sa, sb, n_resamples=n_resamples, seed=seed)
    return DeltaResult(a=a, b=b, subset=subset, n=len(keep), result=result)


def _latency_summary(values: NDArray[np.float64]) -> tuple[float, float, float, int] | None:
    """(mean, p50, p95, n) with nearest-rank percentiles (docs/how-it-works.md §5.2)."""
    v = np.sort(values[~np.isnan(values)])
    if v.size == 0:
        return None

    def rank(p: float) -> float:
        return float(v[max(math.ceil(p * v.size), 1) - 1])

    return float(v.mean()), rank(0.5), rank(0.95), int(v.size)


def _labelled(run: RunData) -> list[LabelledQuestion]:
    ok = run.ok
    return [
        LabelledQuestion(run.item_ids[i], run.questions[i], int(run.correct[i]))
        for i in np.flatnonzero(ok)
    ]


@dataclass
class _BaselineScores:
    ids: tuple[str, ...]
    scores: NDArray[np.float64]
    subset: str


def _train_baseline(
    runs: Sequence[RunData],
    embeddings: Any,
    *,
    test_fraction: float,
    sizes: Sequence[int],
    embeddings_name: str,
) -> tuple[BaselineReport, dict[str, _BaselineScores]]:
    first = runs[0]
    train_dataset = first.info.dataset
    if embeddings is None:
        return BaselineReport(False, train_dataset, note="no embeddings source configured"), {}
    rows = _labelled(first)
    train, test = split_train_test(rows, test_fraction=test_fraction, seed=DEFAULT_SEED)
    cache = EmbeddingCache(embeddings)
    try:
        model = SupervisedBaseline.fit(train, cache)
    except BaselineDataError as exc:
        return BaselineReport(False, train_dataset, note=str(exc), n_train=len(train)), {}
    scored: dict[str, _BaselineScores] = {}
    # In distribution: the held-out part only (score_rows refuses training ids).
    scored[first.info.name] = _BaselineScores(
        tuple(r.item_id for r in test),
        model.score_rows(test),
        f"held-out {round(100 * test_fraction)}% of {train_dataset}",
    )
    for run in runs[1:]:
        # Cross-dataset: every labelled row, minus any row whose id or question the model was
        # trained on (two runs of one dataset, or a question that two files share).
        other = model.unseen(_labelled(run))
        scored[run.info.name] = _BaselineScores(
            tuple(r.item_id for r in other),
            model.score_rows(other),
            f"all rows of {run.info.dataset}, baseline trained on {train_dataset}"
            if run.info.dataset != train_dataset
            else f"rows of {run.info.dataset} not used for training",
        )
    curve = learning_curve(train, cache, sizes=sizes, test_rows=test)
    reference: dict[str, float] = {}
    held_ids = {r.item_id for r in test}
    for signal in ("mean_logprob", "min_logprob"):  # the paper's pair, as a reference
        arrays = first.signal(signal)
        keep = [i for i, item in enumerate(arrays.item_ids) if item in held_ids]
        if keep:
            reference[signal] = _quiet(auroc, arrays.labels[keep], arrays.scores[keep])
    return (
        BaselineReport(
            trained=True,
            train_dataset=train_dataset,
            n_train=model.n_train,
            n_train_pos=model.n_train_pos,
            n_test=len(test),
            best_c=model.cv.best_c,
            mean_cv_auroc=model.cv.mean_auroc,
            best_c_cv_auroc=model.cv.best_c_auroc,
            learning_curve=tuple(curve),
            reference_auroc=reference,
            embeddings=embeddings_name,
        ),
        scored,
    )


def _reported_signals(run: RunData) -> list[str]:
    """The run's signals, minus the token-only built-ins when no row has token data (a run
    written before tokens were stored): those would be empty columns, not findings."""
    if any(tokens is not None for tokens in run.tokens):
        return list(run.info.score_signals)
    return [
        s
        for s in run.info.score_signals
        if s not in BUILTIN_SIGNALS or BUILTIN_SIGNALS[s] is not None
    ]


def _dataset_report(
    run: RunData,
    baseline: _BaselineScores | None,
    *,
    fractions: Sequence[float],
    n_resamples: int,
    seed: int,
) -> DatasetReport:
    signals = _reported_signals(run)
    arrays = {s: run.signal(s) for s in signals}
    labels_by_id = {run.item_ids[i]: int(run.correct[i]) for i in np.flatnonzero(run.ok)}
    results = [
        evaluate_signal(
            s,
            a.labels,
            a.scores,
            subset="all labelled rows",
            cloud_labels=a.cloud_labels,
            fractions=fractions,
            n_resamples=n_resamples,
            seed=seed,
        )
        for s, a in arrays.items()
    ]
    heldout: list[SignalResult] = []
    deltas: list[DeltaResult] = []

    def add_delta(
        a: str,
        b: str,
        subset: str,
        ids_a: Sequence[str],
        sa: NDArray[np.float64],
        ids_b: Sequence[str],
        sb: NDArray[np.float64],
    ) -> None:
        d = _paired(a, b, subset, ids_a, sa, ids_b, sb, labels_by_id, n_resamples, seed)
        if d is not None:
            deltas.append(d)

    # Every signal against the paper's mean and, when the router's default is another signal,
    # against that default too (a new default must beat the one in use, not only the mean).
    references = [PAPER_SIGNAL]
    if ROUTER_DEFAULT_SIGNAL != PAPER_SIGNAL and ROUTER_DEFAULT_SIGNAL in arrays:
        references.append(ROUTER_DEFAULT_SIGNAL)
    for reference in references:
        if reference not in arrays:
            continue
        for s in signals:
            if s not in (reference, PAPER_SIGNAL):
                add_delta(
                    s,
                    reference,
                    "all labelled rows",
                    arrays[s].item_ids,
                    arrays[s].scores,
                    arrays[reference].item_ids,
                    arrays[reference].scores,
                )
    # GSA v3 is judged against the bare v2 probe it extends (as in the paper).
    for v3, v2 in (("gsa_v3.p_yes", "gsa_v2.p_yes"),
                   ("gsa_v3_question_last.p_yes", "gsa_v2_question_last.p_yes")):
        if v3 in arrays and v2 in arrays:
            add_delta(v3, v2, "all labelled rows", arrays[v3].item_ids, arrays[v3].scores,
                      arrays[v2].item_ids, arrays[v2].scores)
    if baseline is not None:
        b_labels = np.array([labels_by_id[i] for i in baseline.ids], dtype=np.int64)
        cloud_by_id = {run.item_ids[i]: run.cloud_correct[i] for i in range(run.n)}
        b_cloud = np.array([cloud_by_id[i] for i in baseline.ids], dtype=np.float64)
        cloud = b_cloud.astype(np.int64) if b_cloud.size and not np.isnan(b_cloud).any() else None
        heldout.append(
            evaluate_signal(
                BASELINE,
                b_labels,
                baseline.scores,
                subset=baseline.subset,
                cloud_labels=cloud,
                fractions=fractions,
                n_resamples=n_resamples,
                seed=seed,
            )
        )
        wanted = set(baseline.ids)
        for s, a in arrays.items():
            keep = [i for i, item in enumerate(a.item_ids) if item in wanted]
            cl = a.cloud_labels[keep] if a.cloud_labels is not None else None
            heldout.append(
                evaluate_signal(
                    s,
                    a.labels[keep],
                    a.scores[keep],
                    subset=baseline.subset,
                    cloud_labels=cl,
                    fractions=fractions,
                    n_resamples=n_resamples,
                    seed=seed,
                )
            )
            add_delta(
                s, BASELINE, baseline.subset, a.item_ids, a.scores, baseline.ids, baseline.scores
            )

    latency: dict[str, tuple[float, float, float, int]] = {}
    local = _latency_summary(run.latency_s[run.ok])
    if local is not None:
        latency["local answer (logprob signals)"] = local
    for key, values in run.extras.items():
        if key.endswith(".latency_s"):
            summary = _latency_summary(values[run.ok])
            if summary is not None:
                latency[key.removesuffix(".latency_s") + " signal"] = summary
    text_counts: dict[str, dict[str, int]] = {}
    for key, raw_values in run.extra_values.items():
        if key in run.extras or key.endswith(".error"):
            continue
        counts: dict[str, int] = {}
        for ok, v in zip(run.ok, raw_values):
            if ok and v is not None:
                counts[str(v)] = counts.get(str(v), 0) + 1
        if counts:
            text_counts[key] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    cloud_ok = ~np.isnan(run.cloud_correct) & run.ok
    return DatasetReport(
        run=run,
        n_rows=run.n,
        n_errors=run.n_errors,
        error_counts=run.error_counts(),
        n_valid=int(run.ok.sum()),
        accuracy=run.accuracy,
        cloud_accuracy=float(run.cloud_correct[cloud_ok].mean()) if cloud_ok.any() else None,
        n_cloud_missing=int((run.ok & ~cloud_ok).sum()) if cloud_ok.any() else 0,
        missing={s: (a.n_missing, a.missing_reasons) for s, a in arrays.items()},
        signals=tuple(results),
        heldout_signals=tuple(heldout),
        deltas=tuple(deltas),
        latency=latency,
        extra_text_counts=text_counts,
    )


def _fmt_ci(r: BootstrapResult | None) -> str:
    if r is None:
        return "n/a"
    return f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]"


def _delta_sentence(d: DeltaResult) -> str:
    r = d.result
    verdict = "significant" if r.significant else "not significant"
    return (
        f"{signal_label(d.a)} − {signal_label(d.b)} = {r.delta:+.3f} "
        f"[{r.low:+.3f}, {r.high:+.3f}] ({verdict}, n = {d.n}, {d.subset})"
    )


#: The signal the router routes on by default (what a report's recommendation is checked against).
ROUTER_DEFAULT_SIGNAL = DEFAULT_POLICY.signal


def _find_delta(ds: DatasetReport, a: str, b: str) -> DeltaResult | None:
    for d in ds.deltas:
        if d.a == a and d.b == b:
            return d
    return None


def _versus_baseline(d: DeltaResult) -> str:
    r = d.result
    if r.significant and r.delta > 0:
        return "significantly better than"
    if r.significant:
        return "significantly worse than"
    return "not significantly different from"


def _recommend(
    datasets: Sequence[DatasetReport], baseline: BaselineReport
) -> tuple[str, list[str]]:
    """Pick the default signal the measurements support, with the reasoning as sentences.

    Rule: candidates are the router signals significantly better (paired CI excludes 0) than
    the paper's mean logprob on every dataset; without one, the paper's signal is the default.
    The router's current default stays while it is a candidate, unless another candidate is
    significantly better than it on every dataset; otherwise the candidate with the highest
    mean AUROC is named. Then each
    dataset's comparison with the supervised baseline is stated, and the paper's central
    claim (zero-shot logprob matches or beats the baseline in distribution, and beats it out of
    distribution) is checked against the paired deltas.
    """
    lines: list[str] = []
    primary = PAPER_SIGNAL
    main = datasets[0]
    if not any(r.auroc is not None for r in main.signals):
        return primary, ["No signal has a defined AUROC on the main dataset; nothing to compare."]
    for ds in datasets:
        defined = [r for r in ds.signals if r.auroc is not None]
        if not defined:
            continue
        best = max(defined, key=lambda r: r.auroc.estimate if r.auroc else -1.0)
        sentence = (
            f"On {ds.dataset} the highest AUROC is {best.label}: {_fmt_ci(best.auroc)}"
        )
        d_best = _find_delta(ds, best.signal, primary)
        if best.signal == primary:
            sentence += " (the paper's signal itself)."
        elif d_best is not None:
            sentence += f"; against the mean logprob: {_delta_sentence(d_best)}."
        else:
            sentence += "."
        lines.append(sentence)
    # A new default must be significantly better than the paper's signal on EVERY dataset
    # (the main and the shifted set), and usable per answer by the router.
    supported: list[tuple[float, str]] = []
    for signal in SIGNAL_SCORERS:
        if signal == primary:
            continue
        found = [_find_delta(ds, signal, primary) for ds in datasets]
        if found and all(
            d is not None and d.result.significant and d.result.delta > 0 for d in found
        ):
            aurocs = [
                r.auroc.estimate
                for ds in datasets
                for r in ds.signals
                if r.signal == signal and r.auroc is not None
            ]
            supported.append((float(np.mean(aurocs)) if aurocs else 0.0, signal))
    names = ", ".join(d.dataset for d in datasets)
    if supported:
        supported.sort(reverse=True)
        candidates = [signal for _, signal in supported]
        current = ROUTER_DEFAULT_SIGNAL
        # Defaults do not churn on noise: the router's current default stays while it is
        # supported, unless another candidate is significantly better than it on every set.
        beats_current = [
            signal for signal in candidates
            if signal != current and all(
                (d := _find_delta(ds, signal, current)) is not None
                and d.result.significant and d.result.delta > 0
                for ds in datasets
            )
        ]
        if current in candidates and not beats_current:
            choice = current
            others = [signal_label(s) for s in candidates if s != current]
            lines.append(
                f"{signal_label(choice)} (the router's default) is significantly better than "
                f"the mean logprob on every set ({names}), and no signal is significantly "
                "better than it on every set, so it stays the supported default"
                + (f" (also significantly better than the mean everywhere: "
                   f"{', '.join(others)})." if others else ".")
            )
        else:
            choice = beats_current[0] if beats_current else candidates[0]
            also = [signal_label(s) for s in candidates if s != choice]
            why = (
                f"and significantly better than the router's default {signal_label(current)} "
                "on every set" if beats_current else
                f"while the router's default {signal_label(current)} is not"
            )
            lines.append(
                f"{signal_label(choice)} is significantly better than the mean logprob on every "
                f"set ({names}), {why}, so it is the supported default"
                + (f" (also significantly better than the mean everywhere: "
                   f"{', '.join(also)})." if also else ".")
            )
    else:
        choice = primary
        lines.append(
            "No router signal is significantly better than the mean logprob on every set "
            f"({names}), so the paper's mean-logprob signal stays the default."
        )

    if not baseline.trained:
        lines.append(
            f"The supervised baseline was not trained ({baseline.note}); the comparison with "
            "it is missing."
        )
        return choice, lines
    for signal in dict.fromkeys((primary, choice)):
        for ds in datasets:
            d = _find_delta(ds, signal, BASELINE)
            if d is not None:
                lines.append(
                    f"On {ds.dataset}, {signal_label(signal)} is {_versus_baseline(d)} the "
                    f"supervised baseline: {_delta_sentence(d)}."
                )
    # The paper's central claim, for the paper's signal.
    in_dist = _find_delta(main, primary, BASELINE)
    if in_dist is not None:
        r = in_dist.result
        held = not (r.significant and r.delta < 0)
        lines.append(
            "Paper's claim 1 (in distribution, zero-shot logprob matches or beats the supervised "
            f"baseline): {'consistent' if held else 'contradicted'} on {main.dataset} "
            f"(Δ = {r.delta:+.3f} [{r.low:+.3f}, {r.high:+.3f}])."
        )
    for ds in datasets[1:]:
        d = _find_delta(ds, primary, BASELINE)
        if d is None:
            continue
        r = d.result
        if r.significant and r.delta > 0:
            verdict = "supported"
        elif r.significant:
            verdict = "contradicted"
        else:
            verdict = "not shown (no significant difference)"
        lines.append(
            "Paper's claim 2 (out of distribution, zero-shot logprob beats a baseline trained "
            f"on {baseline.train_dataset}): {verdict} on {ds.dataset} "
            f"(Δ = {r.delta:+.3f} [{r.low:+.3f}, {r.high:+.3f}])."
        )
    return choice, lines


def compute_report(
    runs: Sequence[RunData],
    *,
    name: str,
    embeddings: Any = None,
    embeddings_name: str = "",
    n_resamples: int = 1000,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    test_fraction: float = 0.3,
    learning_curve_sizes: Sequence[int] = (25, 50, 100, 250, 500, 1000),
) -> ReportData:
    """Compute every number of the report (no files written).

    Args:
        runs: the runs, main (baseline training) dataset first.
        name: report name (file stem).
        embeddings: LangChain ``Embeddings`` for the supervised baseline; ``None`` skips it
            (the report says so).
        embeddings_name: how to describe the embeddings in the report.
        n_resamples, seed: bootstrap size and RNG seed (the paper: 1000, 0).
        fractions: escalation budgets of the operating-point tables.
        test_fraction: held-out share of the main dataset for the baseline.
        learning_curve_sizes: training sizes of the learning curve.
    """
    if not runs:
        raise InvalidArgumentError("a report needs at least one run")
    baseline_report, baseline_scores = _train_baseline(
        runs,
        embeddings,
        test_fraction=test_fraction,
        sizes=learning_curve_sizes,
        embeddings_name=embeddings_name,
    )
    datasets = tuple(
        _dataset_report(
            run,
            baseline_scores.get(run.info.name),
            fractions=fractions,
            n_resamples=n_resamples,
            seed=seed,
        )
        for run in runs
    )
    choice, lines = _recommend(datasets, baseline_report)
    return ReportData(
        name=name,
        datasets=datasets,
        baseline=baseline_report,
        n_resamples=n_resamples,
        seed=seed,
        fractions=tuple(fractions),
        recommendation=choice,
        recommendation_lines=tuple(lines),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return out


def _signal_rows(results: Sequence[SignalResult]) -> list[list[str]]:
    rows = []
    for r in results:
        chance = 1 - r.n_pos / r.n if r.n else math.nan
        rows.append(
            [
                r.label,
                str(r.n),
                _fmt_ci(r.auroc),
                f"{_num(r.auprc_error)} (chance {_num(chance)})",
                _num(r.aurc),
                _num(r.e_aurc),
                r.note or "",
            ]
        )
    return rows


def _operating_table(results: Sequence[SignalResult], fractions: Sequence[float]) -> list[str]:
    header = ["escalate bottom", *[r.label for r in results]]
    rows = []
    for k, f in enumerate((0.0, *fractions)):
        cells = [f"{round(100 * f)}%"]
        for r in results:
            if k < len(r.operating):
                p = r.operating[k]
                cell = f"{_pct(p.kept_accuracy)} kept acc."
                if p.system_accuracy is not None:
                    cell += f", {_pct(p.system_accuracy)} system"
                cells.append(cell)
            else:
                cells.append("n/a")
        rows.append(cells)
    return _table(header, rows)


def _summary_table(data: ReportData) -> list[str]:
    """Every signal on every dataset: AUROC with its CI and the paired delta vs the mean."""
    header = ["signal"]
    for ds in data.datasets:
        header += [f"{ds.dataset} AUROC [95% CI]", f"{ds.dataset} Δ vs mean [95% CI]"]
    header.append("better than the mean on every set")
    order = list(dict.fromkeys(r.signal for ds in data.datasets for r in ds.signals))
    rows = []
    for signal in order:
        cells = [f"`{signal}`"]
        everywhere = signal != PAPER_SIGNAL
        for ds in data.datasets:
            result = next((r for r in ds.signals if r.signal == signal), None)
            cells.append(_fmt_ci(result.auroc) if result is not None else "n/a")
            d = _find_delta(ds, signal, PAPER_SIGNAL)
            if signal == PAPER_SIGNAL:
                cells.append("(reference)")
            elif d is None:
                cells.append("n/a")
                everywhere = False
            else:
                r = d.result
                mark = " ✓" if r.significant and r.delta > 0 else (" ✗" if r.significant else "")
                cells.append(f"{r.delta:+.3f} [{r.low:+.3f}, {r.high:+.3f}]{mark}")
                everywhere = everywhere and r.significant and r.delta > 0
        if signal == PAPER_SIGNAL:
            cells.append("—")
        elif signal in RANK_SIGNALS:
            cells.append(("yes" if everywhere else "no") + " (report only)")
        elif signal not in SIGNAL_SCORERS:
            cells.append(("yes" if everywhere else "no") + " (extra signal)")
        else:
            cells.append("**yes**" if everywhere else "no")
        rows.append(cells)
    return _table(header, rows)


def _did_not_work(data: ReportData) -> list[str]:
    """Measured failures, stated plainly: worse than the mean, or no better than chance."""
    lines: list[str] = []
    for ds in data.datasets:
        worse = [
            d for d in ds.deltas
            if d.b == PAPER_SIGNAL and d.result.significant and d.result.delta < 0
        ]
        for d in worse:
            lines.append(
                f"On {ds.dataset}, `{d.a}` is significantly worse than the mean logprob: "
                f"Δ = {d.result.delta:+.3f} [{d.result.low:+.3f}, {d.result.high:+.3f}]."
            )
        chance = [r for r in ds.signals if r.auroc is not None and r.auroc.low <= 0.5]
        for r in chance:
            lines.append(
                f"On {ds.dataset}, `{r.signal}` is not distinguishable from chance: AUROC "
                f"{_fmt_ci(r.auroc)}."
            )
        undefined = [r for r in ds.signals if r.auroc is None]
        for r in undefined:
            lines.append(f"On {ds.dataset}, `{r.signal}` has no AUROC: {r.note or 'no rows'}.")
    return lines


def _focus_signals(ds: DatasetReport, recommendation: str) -> list[SignalResult]:
    """The signals worth a column in wide tables: the paper's, the recommendation, this
    dataset's three best by AUROC, and every extra (non-built-in) signal."""
    defined = sorted(
        (r for r in ds.signals if r.auroc is not None),
        key=lambda r: -r.auroc.estimate,  # type: ignore[union-attr]
    )
    wanted = {PAPER_SIGNAL, recommendation, *(r.signal for r in defined[:3])}
    wanted |= {
        r.signal
        for r in ds.signals
        if r.signal not in SIGNAL_SCORERS and r.signal not in RANK_SIGNALS
    }
    return [r for r in ds.signals if r.signal in wanted]


def render_markdown(
    data: ReportData, figures: dict[str, str] | None = None, notes: str | None = None
) -> str:
    """The report as Markdown; ``figures`` maps figure keys (``roc``, ``operating``,
    ``learning_curve``) to relative paths to embed; ``notes`` (Markdown written by a person,
    e.g. measurements made outside these runs) is included verbatim before the figures."""
    figures = figures or {}
    out: list[str] = [f"# Evaluation report: {data.name}", ""]
    out.append(
        "Generated by `confidence-router eval-report` from the SQLite runs listed below; every "
        "number is reproducible from those rows (bootstrap and baseline seeds are fixed)."
    )
    out += ["", "## Conclusion", ""]
    label = signal_label(data.recommendation)
    out.append(
        f"**Default signal supported by these measurements: `{data.recommendation}`"
        + (f" ({label}).**" if label != data.recommendation else ".**")
    )
    out.append("")
    out.extend(f"- {line}" for line in data.recommendation_lines)

    out += ["", "## Every signal on every dataset", ""]
    out.append(
        "AUROC with its 95% bootstrap CI, and the paired bootstrap difference against the "
        "paper's mean logprob on the rows both scored (✓ significantly better, ✗ significantly "
        "worse). Only a router signal that is significantly better on every set may become the "
        "default."
    )
    out.append("")
    out += _summary_table(data)
    out += ["", "### What did not work (measured here)", ""]
    failures = _did_not_work(data)
    out.extend(f"- {line}" for line in failures) if failures else out.append(
        "- Every signal beat chance and none was significantly worse than the mean logprob."
    )

    out += ["", "## Setup", ""]
    setup_rows = []
    for ds in data.datasets:
        info = ds.run.info
        host = info.host
        setup_rows.append(
            [
                f"`{info.name}`",
                info.dataset,
                f"`{info.model}`",
                f"`{info.prompt_set}`",
                info.grader,
                info.cloud_model or "none",
                info.library_version,
                info.started_at,
                (
                    f"{host.get('machine', '?')}, {host.get('cpu_count', '?')} CPUs, "
                    f"Python {host.get('python', '?')}"
                ),
            ]
        )
    out += _table(
        [
            "run",
            "dataset",
            "local model",
            "prompt set",
            "grader",
            "cloud model",
            "library",
            "started (UTC)",
            "host",
        ],
        setup_rows,
    )
    out += [
        "",
        (
            f"- AUROC: Mann–Whitney with tie-averaged ranks, label = local answer correct. "
            f"95% CI: percentile bootstrap, {data.n_resamples} resamples, NumPy `default_rng"
            f"({data.seed})`; single-class resamples dropped."
        ),
        (
            "- Paired deltas use the same resample indices for both scores, on the rows both "
            "scored; a difference is significant iff its CI excludes 0."
        ),
        (
            "- Failure rows (model or grader error) are excluded and counted; rows whose signal is "
            "missing are excluded from that signal only and counted (never scored 0.5)."
        ),
        (
            "- Operating points escalate the lowest-scored share of rows (ties by file order); "
            "'kept acc.' is the local accuracy on the rows kept."
        ),
        "- Grading: `match_grader` = normalised whole-word match of any gold answer or alias "
        "(lower-case, punctuation and articles removed); see `evaluation/grading.py`."
        if all(ds.run.info.grader == "match_grader" for ds in data.datasets)
        else "- Grading: see the grader column.",
    ]
    for ds in data.datasets:
        templates = ds.run.info.prompt_templates
        out += [
            "",
            f"<details><summary>Prompt templates of <code>{ds.run.info.name}</code></summary>",
            "",
            "```text",
        ]
        out.append(f"question:   {templates.get('question', '')!r}")
        out.append(f"completion: {templates.get('completion', '')!r}")
        out.append(f"stop:       {templates.get('stop', [])!r}")
        out.append(f"raw:        {templates.get('raw', False)!r}")
        out += ["```", "", "</details>"]

    present = list(
        dict.fromkeys(
            r.signal for ds in data.datasets for r in ds.signals if r.signal in _DESCRIPTIONS
        )
    )
    if present:
        out += ["", "### Signals", ""]
        out.append(
            "Every score is oriented 'higher = more likely correct' and computed from the "
            "tokens stored with each row (top-5 alternatives per token); see "
            "`confidence_router.signals`."
        )
        out.append("")
        out += _table(["signal", "definition"], [[f"`{s}`", _DESCRIPTIONS[s]] for s in present])

    for ds in data.datasets:
        out += ["", f"## Dataset: {ds.dataset}", ""]
        out.append(
            f"- Rows stored: **{ds.n_rows}**; failures excluded: **{ds.n_errors}**"
            + (
                " (" + ", ".join(f"{k}: {v}" for k, v in ds.error_counts.items()) + ")"
                if ds.error_counts
                else ""
            )
            + f"; labelled rows: **{ds.n_valid}**."
        )
        out.append(
            f"- Local accuracy A_L: **{_pct(ds.accuracy)}** "
            f"({round(ds.accuracy * ds.n_valid) if ds.n_valid else 0} of "
            f"{ds.n_valid})."
        )
        if ds.cloud_accuracy is not None:
            out.append(
                f"- Cloud accuracy A_C: **{_pct(ds.cloud_accuracy)}**"
                + (
                    f" ({ds.n_cloud_missing} rows without a cloud label)"
                    if ds.n_cloud_missing
                    else ""
                )
                + "."
            )
        missing = [(s, n, reasons) for s, (n, reasons) in ds.missing.items() if n]
        if missing:
            for s, n, reasons in missing:
                why = ", ".join(f"{k}: {v}" for k, v in reasons.items())
                out.append(f"- Missing `{s}` (excluded from that signal): {n} ({why}).")
        else:
            out.append("- No missing signal values.")
        for key, counts in ds.extra_text_counts.items():
            out.append(
                f"- `{key}` distribution: "
                + ", ".join(f"{k}: {v}" for k, v in counts.items())
                + "."
            )

        out += ["", "### Zero-shot signals (all labelled rows)", ""]
        header = ["signal", "n", "AUROC [95% CI]", "AUPRC-error", "AURC", "E-AURC", "note"]
        out += _table(header, _signal_rows(ds.signals))
        if ds.heldout_signals:
            subset = ds.heldout_signals[0].subset
            out += ["", f"### Against the supervised baseline ({subset})", ""]
            out += _table(header, _signal_rows(ds.heldout_signals))
        if ds.deltas:
            out += ["", "### Paired AUROC differences", ""]
            rows = [
                [
                    f"{signal_label(d.a)} − {signal_label(d.b)}",
                    d.subset,
                    str(d.n),
                    f"{d.result.delta:+.3f}",
                    f"[{d.result.low:+.3f}, {d.result.high:+.3f}]",
                    _num(d.result.p_value),
                    "yes" if d.result.significant else "no",
                ]
                for d in ds.deltas
            ]
            out += _table(
                ["difference", "rows", "n", "Δ AUROC", "95% CI", "p (Δ* ≤ 0)", "significant"], rows
            )
        out += ["", "### Operating points (escalate the bottom k% by score)", ""]
        out.append(
            "The 0% row is the local accuracy on the rows the signal scored; random "
            "escalation keeps that accuracy in expectation."
        )
        out.append("")
        out += _operating_table(_focus_signals(ds, data.recommendation), data.fractions)
        with_cloud = [r for r in ds.signals if r.apgr is not None]
        if with_cloud:
            out += ["", "### Cascade with the cloud labels (APGR, CPT)", ""]
            rows = [
                [r.label, str(r.n), _num(r.apgr), *[_pct(r.cpt.get(x)) for x in CPT_TARGETS]]
                for r in with_cloud
            ]
            out += _table(
                ["signal", "n", "APGR", *[f"CPT({round(100 * x)}%)" for x in CPT_TARGETS]], rows
            )
        if ds.latency:
            out += ["", "### Latency (client wall time, seconds)", ""]
            rows = [
                [k, str(v[3]), _num(v[0]), _num(v[1]), _num(v[2])] for k, v in ds.latency.items()
            ]
            out += _table(["call", "n", "mean", "p50", "p95"], rows)

    out += ["", "## Supervised baseline", ""]
    b = data.baseline
    if not b.trained:
        out.append(f"Not trained: {b.note}.")
    else:
        out.append(
            f"L2 logistic regression on query embeddings ({b.embeddings or 'embeddings'}), "
            f"5-fold stratified CV over C ∈ logspace(−4, 4, 10), ROC-AUC scoring, max_iter 2000, "
            f"seed {DEFAULT_SEED}. Trained on {b.n_train} rows of {b.train_dataset} "
            f"({b.n_train_pos} correct); {b.n_test} held-out rows, disjoint by item id. "
            f"Selected C = {b.best_c:.4g}; mean CV AUROC over all folds and all C (the paper's "
            f"learning-curve number) = {_num(b.mean_cv_auroc)}; mean CV AUROC at the selected "
            f"C = {_num(b.best_c_cv_auroc)}."
        )
        if b.learning_curve:
            out += ["", "### Learning curve", ""]
            ref = ", ".join(f"{signal_label(k)} {_num(v)}" for k, v in b.reference_auroc.items())
            out.append(
                "**Mean CV AUROC** is the paper's definition (mean over 5 folds × 10 C values on "
                "the training rows themselves); **held-out AUROC** is measured on the fixed "
                f"held-out rows of {b.train_dataset} and is the one comparable with the "
                f"zero-shot signals on the same rows ({ref})."
            )
            out.append("")
            rows = [
                [
                    str(p.n_train),
                    str(p.n_train_pos),
                    _num(p.mean_cv_auroc),
                    _num(p.heldout_auroc),
                    p.note,
                ]
                for p in b.learning_curve
            ]
            out += _table(
                ["N train", "correct", "mean CV AUROC (paper)", "held-out AUROC", "note"], rows
            )

    if notes:
        out += ["", notes.strip()]

    if figures:
        out += ["", "## Figures", ""]
        titles = {
            "roc": "ROC curves",
            "operating": "Operating points",
            "learning_curve": "Baseline learning curve",
        }
        for key, path in figures.items():
            out += [f"![{titles.get(key, key)}]({path})", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    # No "Software" metadata: keeps the PNG bytes independent of the matplotlib version.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})


def write_figures(data: ReportData, out_dir: Path) -> dict[str, Path]:
    """Write the ROC, operating-point and learning-curve PNGs; return their paths by key."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    n = len(data.datasets)

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.8), squeeze=False)
    for ax, ds in zip(axes[0], data.datasets):
        curves = _focus_signals(ds, data.recommendation) + [
            r for r in ds.heldout_signals if r.signal == BASELINE
        ]
        for r in curves:
            if r.roc is None or r.auroc is None:
                continue
            style = "--" if r.signal == BASELINE else "-"
            ax.plot(
                r.roc[0],
                r.roc[1],
                style,
                label=f"{r.label} ({r.auroc.estimate:.3f})",
                linewidth=1.4,
            )
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        ax.set_title(f"{ds.dataset} (n = {ds.n_valid}, A_L = {_pct(ds.accuracy)})")
        ax.set_xlabel("false positive rate (wrong answers kept)")
        ax.set_ylabel("true positive rate (correct answers kept)")
        if ax.get_legend_handles_labels()[0]:  # no curve when AUROC is undefined everywhere
            ax.legend(fontsize=7, loc="lower right")
    path = out_dir / f"{data.name}-roc.png"
    _save(fig, path)
    plt.close(fig)
    paths["roc"] = path

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.8), squeeze=False)
    grid = tuple(i / 20 for i in range(20))  # 0%, 5%, ..., 95% escalated
    for ax, ds in zip(axes[0], data.datasets):
        focus = [r.signal for r in _focus_signals(ds, data.recommendation)]
        arrays = {s: ds.run.signal(s) for s in focus}
        for s, a in arrays.items():
            if a.labels.size < MIN_ROWS_PER_SIGNAL:
                continue
            pts = operating_points(a.labels, a.scores, grid)
            ax.plot(
                [p.escalated_fraction for p in pts],
                [p.kept_accuracy for p in pts],
                label=signal_label(s),
                linewidth=1.4,
            )
        ax.axhline(
            ds.accuracy,
            color="grey",
            linestyle=":",
            linewidth=1,
            label=f"random escalation (A_L = {_pct(ds.accuracy)})",
        )
        ax.set_title(ds.dataset)
        ax.set_xlabel("share escalated (lowest scores first)")
        ax.set_ylabel("local accuracy on kept queries")
        ax.legend(fontsize=7, loc="upper left")
    path = out_dir / f"{data.name}-operating.png"
    _save(fig, path)
    plt.close(fig)
    paths["operating"] = path

    b = data.baseline
    points = [p for p in b.learning_curve if not math.isnan(p.mean_cv_auroc)]
    if b.trained and points:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        xs = [p.n_train for p in points]
        ax.plot(
            xs,
            [p.mean_cv_auroc for p in points],
            "o-",
            label="baseline: mean CV AUROC (paper definition)",
        )
        ax.plot(xs, [p.heldout_auroc for p in points], "s-", label="baseline: held-out AUROC")
        for color, (k, v) in zip(("C2", "C3", "C4"), b.reference_auroc.items()):
            if not math.isnan(v):
                ax.axhline(
                    v,
                    linestyle="--",
                    linewidth=1,
                    color=color,
                    label=f"{signal_label(k)} (same held-out rows)",
                )
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(f"training rows ({b.train_dataset})")
        ax.set_ylabel("AUROC")
        ax.set_title("Supervised baseline learning curve")
        ax.legend(fontsize=7)
        path = out_dir / f"{data.name}-learning-curve.png"
        _save(fig, path)
        plt.close(fig)
        paths["learning_curve"] = path
    return paths


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def build_report(
    runs: Sequence[RunData],
    *,
    name: str,
    out_dir: str | os.PathLike[str],
    embeddings: Any = None,
    embeddings_name: str = "",
    **compute_kwargs: Any,
) -> Report:
    """Compute the report for loaded runs and write ``<out_dir>/<name>.md`` plus PNGs.

    A file ``<out_dir>/<name>.notes.md`` (hand-written Markdown, e.g. what was tried and did
    not work outside these runs) is included in the report when it exists.

    ``compute_kwargs`` go to :func:`compute_report` (``n_resamples``, ``seed``, ``fractions``,
    ``test_fraction``, ``learning_curve_sizes``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = compute_report(
        runs, name=name, embeddings=embeddings, embeddings_name=embeddings_name, **compute_kwargs
    )
    figure_paths = write_figures(data, out)
    # Notes written by a person live beside the report and survive regeneration.
    notes_path = out / f"{name}.notes.md"
    notes = notes_path.read_text(encoding="utf-8") if notes_path.is_file() else None
    markdown = render_markdown(data, {k: p.name for k, p in figure_paths.items()}, notes)
    md_path = out / f"{name}.md"
    md_path.write_text(markdown, encoding="utf-8")
    return Report(markdown=markdown, markdown_path=md_path, figure_paths=figure_paths, data=data)


def generate_report(
    db_path: str | os.PathLike[str],
    *,
    runs: Sequence[str] | None = None,
    name: str,
    out_dir: str | os.PathLike[str] = "docs/results",
    embeddings: Any = None,
    embeddings_name: str = "",
    **compute_kwargs: Any,
) -> Report:
    """Load runs from ``db_path`` (all of them, oldest first, when ``runs`` is None) and
    :func:`build_report` them. The first run is the main dataset (baseline training)."""
    names = list(runs) if runs else [r.name for r in list_runs(db_path)]
    if not names:
        raise InvalidArgumentError(f"no runs in {os.fspath(db_path)!r}")
    loaded = [load_run(db_path, n) for n in names]
    return build_report(
        loaded,
        name=name,
        out_dir=out_dir,
        embeddings=embeddings,
        embeddings_name=embeddings_name,
        **compute_kwargs,
    )
