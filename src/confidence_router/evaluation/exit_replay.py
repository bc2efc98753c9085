"""Early exit replayed on stored evaluation runs: what it would save, and what it would change.

An evaluation run stores every answer's tokens with their logprobs (see
:mod:`~confidence_router.evaluation.runner`). :func:`replay_early_exit` replays the router's
early-exit rule (:func:`confidence_router.early_exit.should_exit_early`) token by token over
them, as if each answer had been streamed with ``early_exit=True``, and compares with the
decision on the whole answer:

* **escalated**: answers the router escalates after generating them in full (score below the
  threshold, or unknown with ``on_unknown="escalate"``); early exit only ever saves work on these;
* **tokens saved**: of those answers' decode tokens, the ones after the exit point;
* **time saved**: estimated as tokens saved x the run's decode time per token (the slope of
  answer latency over token count, least squares over the run's rows), against the escalated
  answers' measured latency;
* **decisions changed**: answers that exit early although the whole answer would have been
  kept (0 for the exact rules: ``min_logprob``, the true cap for the means);
* **AUROC**: of the signal's score on the whole answers vs with early exit (an exited answer
  is scored on the tokens seen up to its exit, as the router records it).

Usage::

    from confidence_router.evaluation.exit_replay import replay_early_exit
    from confidence_router.evaluation.runner import load_run

    run = load_run("eval-runs.sqlite", "triviaqa__gemma3:270m-raw__few-shot-v3")
    result = replay_early_exit(run, "min_logprob", 0.7)
    result.tokens_saved / result.tokens_escalated     # share of escalated decode tokens saved

or ``confidence-router eval-early-exit --db eval-runs.sqlite`` for a table over every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from confidence_router.early_exit import early_exit_index
from confidence_router.errors import InvalidArgumentError
from confidence_router.evaluation.metrics import auroc
from confidence_router.evaluation.runner import RunData
from confidence_router.policy import RoutingPolicy, decide_after_generation
from confidence_router.signals import answer_signals, compute_signals, score_for

__all__ = ["ExitReplay", "decode_seconds_per_token", "replay_early_exit"]


@dataclass(frozen=True)
class ExitReplay:
    """Early exit replayed over one run for one signal, threshold and remaining-token bound.

    Attributes:
        run: the run's name.
        dataset: the run's dataset label.
        signal: the routed signal.
        threshold: the keep-local threshold.
        bound: how the rule bounded the tokens still to come: ``"cap N"`` (the run's
            ``num_predict``: exact), ``"horizon N"`` (a fixed guess: may change decisions) or
            ``"no cap"``.
        answers: answers replayed (rows with stored tokens and no failure).
        escalated: of those, answers escalated after the whole answer.
        exited: answers on which early exit fires.
        decisions_changed: answers that exit although the whole answer would have been kept.
        tokens_escalated: decode tokens of the escalated answers.
        tokens_saved: of those, the tokens after the exit point.
        seconds_per_token: the run's decode time per token (``nan`` if it cannot be fitted).
        latency_escalated_s: measured latency of the escalated answers, summed.
        auroc_full: the signal's AUROC on the whole answers (``nan`` if undefined).
        auroc_early: the same with exited answers scored at their exit point.
    """

    run: str
    dataset: str
    signal: str
    threshold: float
    bound: str
    answers: int
    escalated: int
    exited: int
    decisions_changed: int
    tokens_escalated: int
    tokens_saved: int
    seconds_per_token: float
    latency_escalated_s: float
    auroc_full: float
    auroc_early: float

    @property
    def token_share_saved(self) -> float:
        """Share of the escalated answers' decode tokens that early exit saves (``nan``: none)."""
        return self.tokens_saved / self.tokens_escalated if self.tokens_escalated else math.nan

    @property
    def time_saved_s(self) -> float:
        """Estimated local time saved: tokens saved x decode seconds per token."""
        return self.tokens_saved * self.seconds_per_token

    @property
    def time_share_saved(self) -> float:
        """Estimated share of the escalated answers' local latency saved (``nan``: unknown)."""
        if not self.latency_escalated_s or math.isnan(self.seconds_per_token):
            return math.nan
        return self.time_saved_s / self.latency_escalated_s


def decode_seconds_per_token(token_counts: ArrayLike, latencies: ArrayLike) -> float:
    """Least-squares slope of answer latency over answer length: the decode time per token.

    The intercept absorbs what every answer pays once (prompt evaluation, HTTP). Rows with a
    missing value are ignored; ``nan`` when fewer than two distinct lengths remain or the
    slope is not positive (nothing to attribute to decoding).

    >>> round(decode_seconds_per_token([1, 2, 4], [0.25, 0.30, 0.40]), 3)
    0.05
    """
    counts = np.asarray(token_counts, dtype=np.float64)
    times = np.asarray(latencies, dtype=np.float64)
    if counts.shape != times.shape:
        raise InvalidArgumentError(
            f"token_counts and latencies differ in length ({counts.size} vs {times.size})"
        )
    use = np.isfinite(counts) & np.isfinite(times)
    counts, times = counts[use], times[use]
    if np.unique(counts).size < 2:
        return math.nan
    slope = float(np.polyfit(counts, times, 1)[0])
    return slope if slope > 0 else math.nan


def replay_early_exit(
    run: RunData,
    signal: str,
    threshold: float,
    *,
    horizon: int | None = None,
    on_unknown: str = "escalate",
) -> ExitReplay:
    """Replay early exit over a stored run (see the module docstring for each figure).

    Args:
        run: a run loaded with :func:`~confidence_router.evaluation.runner.load_run`.
        signal: the routed signal (one of :data:`confidence_router.signals.SIGNAL_SCORERS`;
            signals without an early-exit rule never exit).
        threshold: the keep-local threshold in ``(0, 1)``.
        horizon: bound the tokens still to come by this many instead of by the run's
            ``num_predict`` cap (a guess that exits earlier but may change decisions).
            Without either, the rule gets no cap (sound for ``min_logprob`` and
            ``mean_min``; the mean then never exits).
        on_unknown: the router's ``on_unknown`` (``"escalate"`` or ``"local"``) for the
            whole-answer decision.

    Raises:
        InvalidArgumentError: a bad threshold, horizon or signal name.
    """
    if horizon is not None and (isinstance(horizon, bool) or horizon < 0):
        raise InvalidArgumentError(f"horizon must be a non-negative int, got {horizon!r}")
    policy = RoutingPolicy(threshold=threshold, signal=signal, on_unknown=on_unknown)
    cap = _int_or_none(run.info.model_options.get("num_predict"))
    if cap is not None and cap <= 0:
        cap = None  # Ollama: <= 0 means "no limit"
    bound = f"horizon {horizon}" if horizon is not None else (
        f"cap {cap}" if cap is not None else "no cap"
    )

    answers = escalated = exited = changed = tokens_escalated = tokens_saved = 0
    latency_escalated = 0.0
    labels: list[int] = []
    full_scores: list[float] = []
    early_scores: list[float] = []
    for i in range(run.n):
        tokens = run.tokens[i] if i < len(run.tokens) else None
        if tokens is None or run.errors[i] is not None:
            continue
        answers += 1
        logprobs = [token.logprob for token in tokens]
        full = answer_signals(run.answers[i], tokens)
        escalates = decide_after_generation(policy, full).escalate
        # A cap below an answer's length (an inconsistent row) bounds nothing.
        exit_at = early_exit_index(
            signal, threshold, logprobs, horizon=horizon,
            max_tokens=cap if cap is not None and cap >= len(logprobs) else None,
        )
        if exit_at is not None:
            exited += 1
            changed += not escalates
        if escalates:
            escalated += 1
            tokens_escalated += len(logprobs)
            latency_escalated += _finite_or_zero(run.latency_s[i])
            if exit_at is not None:
                tokens_saved += len(logprobs) - exit_at
        score = score_for(full, signal)
        if score is None or math.isnan(run.correct[i]):
            continue
        early = score if exit_at is None else score_for(compute_signals(tokens[:exit_at]), signal)
        labels.append(int(run.correct[i]))
        full_scores.append(score)
        early_scores.append(score if early is None else early)

    return ExitReplay(
        run=run.info.name,
        dataset=run.info.dataset,
        signal=signal,
        threshold=float(threshold),
        bound=bound,
        answers=answers,
        escalated=escalated,
        exited=exited,
        decisions_changed=changed,
        tokens_escalated=tokens_escalated,
        tokens_saved=tokens_saved,
        seconds_per_token=decode_seconds_per_token(run.token_count, run.latency_s),
        latency_escalated_s=latency_escalated,
        auroc_full=_auroc_or_nan(labels, full_scores),
        auroc_early=_auroc_or_nan(labels, early_scores),
    )


def _auroc_or_nan(labels: list[int], scores: list[float]) -> float:
    if len(set(labels)) < 2:
        return math.nan
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(auroc(labels, scores))


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _finite_or_zero(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0
