"""The report's signal comparison on runs with stored tokens: every signal with its CI, the
best per dataset, a new default only when it is significantly better on EVERY set, what did
not work, and hand-written notes kept across regeneration."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np

from confidence_router.evaluation.report import generate_report
from confidence_router.evaluation.runner import ResultRow, connect, register_run, write_row
from confidence_router.extraction import TokenLogprob
from confidence_router.signals import SIGNAL_SCORERS, compute_signals

N_BOOT = 200


def _tok(lp: float) -> TokenLogprob:
    # a proper top-2 distribution: the runner-up takes half of the remaining mass
    rest = max(1e-12, (1.0 - math.exp(lp)) / 2.0)
    return TokenLogprob("w", lp, (("w", lp), ("v", math.log(rest))))


def _make_run(conn: sqlite3.Connection, name: str, dataset: str, seed: int,
              *, first_token_informative: bool, n: int = 300) -> None:
    """Labels live in the first token's logprob (when informative); the second token is
    noise shared by both classes, which blurs the mean but not the first token."""
    rng = np.random.default_rng(seed)
    run_id = register_run(
        conn, name=name, dataset=dataset, model="toy", grader="match_grader",
        prompt_templates={"name": "toy-v1", "question": "{question}", "completion": "{question}"},
    )
    for i in range(n):
        y = int(rng.random() < 0.5)
        if first_token_informative:
            first = -0.05 - abs(rng.normal(0, 0.05)) if y else -1.2 - abs(rng.normal(0, 0.3))
        else:
            first = -abs(rng.normal(0.6, 0.4))
        second = -abs(rng.normal(1.0, 1.0)) + (0.2 * y if not first_token_informative else 0.0)
        tokens = (_tok(first), _tok(min(second, -1e-3)))
        s = compute_signals(tokens)
        write_row(conn, run_id, ResultRow(
            item_id=f"{dataset}:{i}", position=i, dataset=dataset, question=f"Q{i}?",
            gold_answers=("x",), answer=" w w", correct=y, token_count=2,
            mean_logprob=s.mean_logprob, min_logprob=s.min_logprob, confidence=s.confidence,
            min_confidence=s.min_confidence, latency_s=0.1, signal_unknown_reason=None,
            error=None, tokens=tokens,
        ))


def _report(tmp_path: Path, *, shifted_informative: bool, notes: str | None = None):
    db = tmp_path / "runs.sqlite"
    conn = connect(db)
    _make_run(conn, "main", "main_set", 1, first_token_informative=True)
    _make_run(conn, "shifted", "shifted_set", 2, first_token_informative=shifted_informative)
    conn.close()
    out = tmp_path / "out"
    if notes is not None:
        out.mkdir()
        (out / "toy.notes.md").write_text(notes)
    return generate_report(db, name="toy", out_dir=out, n_resamples=N_BOOT)


def test_a_signal_better_on_every_set_becomes_the_recommendation(tmp_path):
    report = _report(tmp_path, shifted_informative=True,
                     notes="## What did not work elsewhere\n\n- a hand-written finding\n")
    assert report.data.recommendation == "first_token"
    md = report.markdown
    assert "## Every signal on every dataset" in md
    for name in (*SIGNAL_SCORERS, "rank_avg"):
        assert f"| `{name}` |" in md, name  # every signal, with its CI, in the summary
    row = next(line for line in md.splitlines() if line.startswith("| `first_token` |"))
    assert row.endswith("| **yes** |") and row.count("✓") == 2
    assert "On main_set the highest AUROC is" in md and "On shifted_set the highest AUROC" in md
    assert "significantly better than the mean logprob on every set" in md
    # the length signal carries nothing here (every answer has two tokens)
    assert "### What did not work (measured here)" in md
    assert "- a hand-written finding" in md  # notes beside the report are included


def test_better_on_the_main_set_only_keeps_the_paper_signal(tmp_path):
    report = _report(tmp_path, shifted_informative=False)
    assert report.data.recommendation == "mean_logprob"
    md = report.markdown
    assert "No router signal is significantly better than the mean logprob on every set" in md
    row = next(line for line in md.splitlines() if line.startswith("| `first_token` |"))
    assert row.endswith("| no |") and "✓" in row  # better on main, not on shifted
    assert "is significantly worse than the mean logprob" in md  # on the shifted set


def test_runs_without_tokens_report_only_the_stored_pair(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = connect(db)
    _make_run(conn, "main", "main_set", 1, first_token_informative=True)
    conn.execute("UPDATE results SET tokens = NULL")
    conn.commit()
    conn.close()
    report = generate_report(db, name="old", out_dir=tmp_path / "o", n_resamples=N_BOOT)
    reported = [r.signal for r in report.data.datasets[0].signals]
    assert reported == ["mean_logprob", "min_logprob"]


# ---- the recommendation rule, on hand-written paired results --------------------------------

def _delta(a: str, b: str, low: float, high: float):
    from confidence_router.evaluation.metrics import PairedBootstrapResult
    from confidence_router.evaluation.report import DeltaResult

    result = PairedBootstrapResult(delta=(low + high) / 2, low=low, high=high, p_value=0.01,
                                   significant=low > 0 or high < 0, n_resamples_used=200,
                                   n_dropped=0)
    return DeltaResult(a, b, "all labelled rows", 500, result)


def _dataset(name: str, aurocs: dict[str, float], deltas: list):
    from types import SimpleNamespace

    from confidence_router.evaluation.metrics import BootstrapResult

    signals = tuple(
        SimpleNamespace(signal=s, label=s, auroc=BootstrapResult(estimate=v, low=v - 0.03,
                                                                 high=v + 0.03,
                                                                 n_resamples_used=200,
                                                                 n_dropped=0))
        for s, v in aurocs.items()
    )
    return SimpleNamespace(dataset=name, signals=signals, deltas=tuple(deltas))


def _recommendation(sum_vs_default: tuple[float, float]) -> tuple[str, list[str]]:
    from confidence_router.evaluation.report import (
        ROUTER_DEFAULT_SIGNAL,
        BaselineReport,
        _recommend,
    )

    default = ROUTER_DEFAULT_SIGNAL
    assert default not in ("mean_logprob", "sum_logprob")
    datasets = [
        _dataset(name, {"mean_logprob": 0.70, default: 0.74, "sum_logprob": 0.76}, [
            _delta(default, "mean_logprob", 0.01, 0.07),       # both beat the mean ...
            _delta("sum_logprob", "mean_logprob", 0.02, 0.10),
            _delta("sum_logprob", default, *sum_vs_default),    # ... and sum vs the default
        ])
        for name in ("main_set", "shifted_set")
    ]
    return _recommend(datasets, BaselineReport(trained=False, train_dataset="main_set",
                                               note="not needed here"))


def test_the_router_default_stays_unless_another_signal_beats_it_on_every_set():
    from confidence_router.evaluation.report import ROUTER_DEFAULT_SIGNAL

    # sum_logprob has the higher AUROC but is not significantly better than the default
    choice, lines = _recommendation((-0.01, 0.05))
    assert choice == ROUTER_DEFAULT_SIGNAL
    assert any("stays the supported default" in line for line in lines)
    # significantly better than the default on every set: it is named instead
    choice, lines = _recommendation((0.005, 0.04))
    assert choice == "sum_logprob"
    assert any("significantly better than the router's default" in line for line in lines)
