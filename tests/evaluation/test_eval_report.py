"""The Markdown/PNG report, from small synthetic SQLite runs, checked against numbers computed
independently here (sklearn's roc_auc_score and a hand-written bootstrap)."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
from langchain_ollama import OllamaEmbeddings
from sklearn.metrics import roc_auc_score

from confidence_router.evaluation.baseline import LabelledQuestion, split_train_test
from confidence_router.evaluation.report import build_report, generate_report
from confidence_router.evaluation.runner import (
    ResultRow,
    connect,
    load_run,
    register_run,
    write_row,
)

N_BOOT = 200


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_run(
    conn: sqlite3.Connection, name: str, dataset: str, n: int, seed: int, *, cloud: bool, gsa: bool
) -> None:
    """Planted data: correct rows have higher logprobs and mention "zebra" in the question."""
    rng = np.random.default_rng(seed)
    signals = [{"name": "gsa", "score_fields": ["p_yes"]}] if gsa else []
    run_id = register_run(
        conn,
        name=name,
        dataset=dataset,
        model="toy-model",
        prompt_templates={"name": "toy-v1", "question": "{question}", "completion": "{question}"},
        grader="match_grader",
        signals=signals,
        cloud_model="toy-cloud" if cloud else None,
    )
    for i in range(n):
        y = int(rng.random() < 0.4)
        word = "zebra" if y else "lamp"
        extras = (
            {
                "gsa": {
                    "p_yes": float(rng.random()),
                    "latency_s": 0.01,
                    "extraction_mode": "logprob_softmax",
                }
            }
            if gsa
            else {}
        )
        base = {
            "item_id": f"{dataset}:{i}",
            "position": i,
            "dataset": dataset,
            "question": f"Question {i} about the {word} {rng.integers(0, 9)}?",
            "gold_answers": ("x",),
            "extras": extras,
        }
        if i in (5, 17, 33):  # failure rows
            row = ResultRow(
                **base,
                answer=None,
                correct=None,
                token_count=None,
                mean_logprob=None,
                min_logprob=None,
                confidence=None,
                min_confidence=None,
                latency_s=0.1,
                signal_unknown_reason=None,
                error="local: ResponseError: boom",
            )
        elif i in (8, 21):  # missing signal
            row = ResultRow(
                **base,
                answer="",
                correct=0,
                token_count=0,
                mean_logprob=None,
                min_logprob=None,
                confidence=None,
                min_confidence=None,
                latency_s=0.1,
                signal_unknown_reason="empty_answer",
                error=None,
            )
        else:
            mean = -1.5 + 0.8 * y + rng.normal(0, 0.6)
            low = mean - abs(rng.normal(0.5, 0.5)) + 0.3 * y
            z = int(rng.random() < 0.7) if cloud else None
            row = ResultRow(
                **base,
                answer=" a",
                correct=y,
                token_count=2,
                mean_logprob=min(mean, 0.0),
                min_logprob=min(low, 0.0),
                confidence=float(sigmoid(2 * min(mean, 0.0) + 3)),
                min_confidence=float(sigmoid(2 * min(low, 0.0) + 3)),
                latency_s=0.2 + 0.01 * i,
                signal_unknown_reason=None,
                error=None,
                cloud_answer=" b" if cloud else None,
                cloud_correct=z,
                cloud_input_tokens=10 if cloud else None,
                cloud_output_tokens=3 if cloud else None,
            )
        write_row(conn, run_id, row)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "synthetic.sqlite"
    conn = connect(path)
    make_run(conn, "runA", "synthA", 160, seed=3, cloud=True, gsa=True)
    make_run(conn, "runB", "synthB", 90, seed=4, cloud=False, gsa=False)
    conn.close()
    return path


def pairwise_auroc(y, s):
    """P(s_pos > s_neg) + P(tie) / 2 over all pairs (independent of the library's ranks)."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def ci_by_hand(y, s, n_resamples=N_BOOT):
    rng = np.random.default_rng(0)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), size=len(y))
        if y[idx].min() != y[idx].max():
            values.append(pairwise_auroc(y[idx], s[idx]))
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{roc_auc_score(y, s):.3f} [{low:.3f}, {high:.3f}]"


def paired_by_hand(y, a, b, n_resamples=N_BOOT):
    rng = np.random.default_rng(0)
    deltas = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), size=len(y))
        if y[idx].min() != y[idx].max():
            deltas.append(pairwise_auroc(y[idx], a[idx]) - pairwise_auroc(y[idx], b[idx]))
    low, high = np.percentile(deltas, [2.5, 97.5])
    delta = roc_auc_score(y, a) - roc_auc_score(y, b)
    return f"{delta:+.3f} | [{low:+.3f}, {high:+.3f}]"


def usable(db, run, column):
    conn = sqlite3.connect(db)
    rows = conn.execute(
        f"SELECT correct, {column} FROM results JOIN runs USING (run_id) WHERE runs.name = ? "
        f"AND error IS NULL AND {column} IS NOT NULL ORDER BY position",
        (run,),
    ).fetchall()
    conn.close()
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def test_report_tables_match_independent_numbers(db, tmp_path, ollama_server):
    embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-local")
    report = generate_report(
        db,
        name="synthetic",
        out_dir=tmp_path / "out",
        embeddings=embeddings,
        embeddings_name="hashing (test)",
        n_resamples=N_BOOT,
        learning_curve_sizes=(25, 50, 100),
    )
    md = report.markdown
    assert report.markdown_path.read_text() == md

    # Row accounting: 160 stored, 3 failures, 157 labelled; 2 missing signals.
    y_all = np.array(
        [
            r[0]
            for r in sqlite3.connect(db).execute(
                "SELECT correct FROM results WHERE run_id = 1 AND error IS NULL"
            )
        ]
    )
    assert (
        "Rows stored: **160**; failures excluded: **3** (local: ResponseError: 3); "
        "labelled rows: **157**." in md
    )
    assert f"Local accuracy A_L: **{100 * y_all.mean():.1f}%** ({y_all.sum()} of 157)" in md
    assert "Missing `mean_logprob` (excluded from that signal): 2 (empty_answer: 2)." in md
    assert "`gsa.extraction_mode` distribution: logprob_softmax: 157." in md

    # AUROC with the bootstrap CI, for each zero-shot signal.
    y, mean = usable(db, "runA", "confidence")
    _, low = usable(db, "runA", "min_confidence")
    assert len(y) == 155
    assert pairwise_auroc(y, mean) == pytest.approx(roc_auc_score(y, mean))
    assert f"| logprob (mean token, σ(2ℓ̄+3)) | 155 | {ci_by_hand(y, mean)} |" in md
    assert f"| min-token logprob | 155 | {ci_by_hand(y, low)} |" in md
    assert "| gsa.p_yes | 157 |" in md
    # Paired delta min − mean on the same indices.
    assert (
        f"| min-token logprob − logprob (mean token, σ(2ℓ̄+3)) | all labelled rows | 155 | "
        f"{paired_by_hand(y, low, mean)} |"
    ) in md

    # Operating point: escalate the lowest 20% by mean logprob, accuracy of the rest.
    order = np.argsort(mean, kind="stable")
    kept = order[math.floor(0.2 * len(y) + 1e-9) :]
    assert f"| 20% | {100 * y[kept].mean():.1f}% kept acc." in md

    # Cloud labels exist for run A only: APGR/CPT table there.
    assert md.count("### Cascade with the cloud labels (APGR, CPT)") == 1

    # The supervised baseline: trained on runA's 70%, evaluated on the held-out 30% and on B.
    data = report.data
    a, b = data.datasets
    base_a = a.signal("supervised_baseline", heldout=True)
    base_b = b.signal("supervised_baseline", heldout=True)
    n_pos = int(y_all.sum())
    assert base_a.n == round(0.3 * n_pos) + round(0.3 * (157 - n_pos))
    assert base_a.subset == "held-out 30% of synthA"
    # B's 87 labelled rows, minus those repeating a question the baseline trained on: the
    # generator's questions collide across the two runs ("Question 12 about the lamp 3?").
    def labelled(run):
        conn = sqlite3.connect(db)
        rows = conn.execute(
            "SELECT item_id, question, correct FROM results JOIN runs USING (run_id) "
            "WHERE runs.name = ? AND error IS NULL ORDER BY position", (run,)
        ).fetchall()
        conn.close()
        return [LabelledQuestion(*r) for r in rows]

    trained_on = {r.question for r in split_train_test(labelled("runA"), test_fraction=0.3)[0]}
    repeats = [r for r in labelled("runB") if r.question in trained_on]
    assert len(labelled("runB")) == 87 and len(repeats) >= 1
    assert base_b.n == 87 - len(repeats)
    assert base_b.subset == "all rows of synthB, baseline trained on synthA"
    assert base_a.auroc.estimate > 0.8  # "zebra" is planted in the correct rows' questions
    assert data.baseline.trained and data.baseline.n_train == 157 - base_a.n
    assert "| supervised baseline (LR on query embeddings) |" in md
    assert "supervised baseline (LR on query embeddings) | held-out 30% of synthA |" in md
    assert "### Learning curve" in md and "mean CV AUROC (paper)" in md

    # A stated default signal, and figures on disk.
    assert "**Default signal supported by these measurements: `" in md
    for key in ("roc", "operating", "learning_curve"):
        path = report.figure_paths[key]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"]({path.name})" in md


def test_report_is_deterministic_and_works_without_baseline(db, tmp_path):
    runs = [load_run(db, "runA"), load_run(db, "runB")]
    first = build_report(runs, name="r", out_dir=tmp_path / "a", n_resamples=50)
    second = build_report(runs, name="r", out_dir=tmp_path / "b", n_resamples=50)
    assert first.markdown == second.markdown
    assert first.figure_paths["roc"].read_bytes() == second.figure_paths["roc"].read_bytes()
    assert "Not trained: no embeddings source configured." in first.markdown
    assert "learning_curve" not in first.figure_paths
