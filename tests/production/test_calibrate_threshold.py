"""calibrate_threshold (labelled, offline) and the evaluation-run reader."""

from __future__ import annotations

import json
import math
import random
import sqlite3

import pytest

from confidence_router.calibration import (
    calibrate_run,
    calibrate_threshold,
    load_scores_from_run,
)
from confidence_router.errors import InvalidArgumentError, InvalidTypeError

# Ten rows, sorted by score for readability. y = local correct, z = cloud correct.
S = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
Y = [0, 0, 1, 0, 1, 0, 1, 1, 1, 1]
Z = [1, 1, 1, 0, 1, 1, 1, 1, 0, 1]


# -- target call rate ----------------------------------------------------------------------


def test_rate_target_hand_computed():
    r = calibrate_threshold(S, Y, target_rate=0.3)
    # floor(0.3 * 10) = 3 rows escalated: s < 0.3. Kept: y over rows 3..9 = 5 of 7.
    assert (r.threshold, r.expected_call_rate) == (0.3, 0.3)
    assert r.expected_accuracy == pytest.approx(5 / 7)
    assert r.accuracy_kind == "kept_local" and r.reachable and r.target_kind == "call_rate"
    assert (r.n, r.n_missing, r.target) == (10, 0, 0.3)


def test_rate_target_with_cloud_labels_reports_system_accuracy():
    r = calibrate_threshold(S, Y, target_rate=0.3, cloud_labels=Z)
    # escalated rows 0..2 -> z = 1, 1, 1; kept rows 3..9 -> y sum 5. (3 + 5) / 10.
    assert r.expected_accuracy == pytest.approx(0.8) and r.accuracy_kind == "system"


def test_rate_target_label_free():
    r = calibrate_threshold(S, target_rate=0.25)
    assert (r.threshold, r.expected_call_rate, r.expected_accuracy) == (0.2, 0.2, None)
    assert r.accuracy_kind is None


def test_rate_target_ties_are_reported():
    r = calibrate_threshold([0.2, 0.5, 0.5, 0.5, 0.9], target_rate=0.6)
    # budget 3 rows; escalating the 0.5 tie would make it 4 -> stop at 1 row.
    assert (r.threshold, r.expected_call_rate) == (0.5, 0.2)
    assert "ties at score 0.5" in r.note and "0.8" in r.note


def test_rate_target_extremes():
    r0 = calibrate_threshold(S, target_rate=0.0)
    assert (r0.threshold, r0.expected_call_rate) == (0.05, 0.0)
    r1 = calibrate_threshold(S, Y, target_rate=1.0)
    assert r1.threshold == math.inf and r1.expected_call_rate == 1.0
    assert r1.expected_accuracy is None  # nothing kept, no cloud labels


# -- target accuracy -----------------------------------------------------------------------


def test_accuracy_target_kept_answers():
    r = calibrate_threshold(S, Y, target_accuracy=0.8)
    # Kept accuracy by escalated count e: e=0 6/10, 1 6/9, 2 6/8, 3 5/7, 4 5/6 -> first >= 0.8.
    assert (r.threshold, r.expected_call_rate) == (0.4, 0.4)
    assert r.expected_accuracy == pytest.approx(5 / 6) and r.reachable


def test_accuracy_target_system():
    r = calibrate_threshold(S, Y, target_accuracy=0.9, cloud_labels=Z)
    # A(e) = (sum y kept + sum z escalated)/10: e=0 .6, 1 .7, 2-5 .8, 6 .9
    assert (r.threshold, r.expected_call_rate, r.expected_accuracy) == (0.6, 0.6, 0.9)


def test_accuracy_target_exactly_met_counts():
    r = calibrate_threshold([0.1, 0.9], [0, 1], target_accuracy=1.0)
    assert r.reachable and r.threshold == 0.9 and r.expected_accuracy == 1.0


def test_accuracy_target_unreachable_is_reported_not_guessed():
    r = calibrate_threshold(S, Y, target_accuracy=0.95, cloud_labels=Z)
    assert not r.reachable and r.threshold is None and r.expected_call_rate is None
    assert "not reachable" in r.note and "0.9" in r.note
    with pytest.raises(ValueError, match="not reachable"):
        r.require_threshold()


def test_accuracy_target_kept_mode_never_uses_escalate_all():
    # Every local answer wrong: no kept subset reaches 0.5; "escalate all" is not scored.
    r = calibrate_threshold([0.1, 0.2], [0, 0], target_accuracy=0.5)
    assert not r.reachable and "without cloud labels" in r.note


def test_missing_scores_are_excluded_and_counted():
    r = calibrate_threshold([None, 0.2, float("nan"), 0.8], [None, 0, 1, 1], target_rate=0.5)
    assert (r.n, r.n_missing, r.threshold) == (2, 2, 0.8)
    assert "2 rows without a score excluded" in r.note


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([0.1],), {}, "exactly one"),
        (([0.1],), {"target_rate": 0.1, "target_accuracy": 0.5}, "exactly one"),
        (([0.1],), {"target_rate": 1.5}, r"\[0, 1\]"),
        (([0.1],), {"target_accuracy": 0.5}, "needs labels"),
        (([0.1, 0.2], [1]), {"target_rate": 0.5}, "labels has 1 rows"),
        (([0.1], [2]), {"target_rate": 0.5}, "0/1"),
        (([float("inf")], [1]), {"target_rate": 0.5}, "finite"),
        (([None], [1]), {"target_rate": 0.5}, "no row has a known score"),
        (([0.1],), {"target_rate": 0.5, "cloud_labels": [1]}, "need labels"),
    ],
)
def test_validation(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_threshold(*args, **kwargs)


def test_matches_evaluation_metrics_on_random_data():
    np = pytest.importorskip("numpy")
    from confidence_router.evaluation.metrics import call_rate, system_accuracy

    rng = random.Random(3)
    s = [round(rng.random(), 2) for _ in range(300)]  # rounding creates ties
    y = [int(rng.random() < v) for v in s]
    z = [int(rng.random() < 0.8) for _ in s]
    for target in (0.55, 0.6, 0.65, 0.7, 0.75):
        r = calibrate_threshold(s, y, target_accuracy=target, cloud_labels=z)
        if not r.reachable:
            continue
        assert r.expected_call_rate == pytest.approx(call_rate(np.array(s), r.threshold))
        assert r.expected_accuracy == pytest.approx(
            system_accuracy(np.array(y), np.array(z), np.array(s), r.threshold)
        )
        # No threshold with a lower call rate reaches the target.
        for tau in sorted(set(s)):
            if call_rate(np.array(s), tau) < r.expected_call_rate:
                assert system_accuracy(np.array(y), np.array(z), np.array(s), tau) < target


# -- evaluation-run reader -----------------------------------------------------------------


def _results_table(conn: sqlite3.Connection, with_runs: bool) -> None:
    run_col = "run_id INTEGER NOT NULL," if with_runs else ""
    conn.execute(
        f"""CREATE TABLE results ({run_col} item_id TEXT, position INTEGER, correct INTEGER,
        confidence REAL, min_confidence REAL, error TEXT, extras TEXT NOT NULL DEFAULT '{{}}',
        cloud_correct INTEGER, cloud_error TEXT)"""
    )


ROWS = [
    # item, pos, correct, confidence, min_conf, error, extras, cloud_correct, cloud_error
    ("a", 0, 0, 0.2, 0.1, None, {"gsa": {"p_yes": 0.3}}, 1, None),
    ("b", 1, 1, 0.9, 0.5, None, {"gsa": {"p_yes": 0.8}}, 1, None),
    ("c", 2, None, None, None, "local: ResponseError: boom", {}, None, None),
    ("d", 3, 1, None, None, None, {"gsa": {"error": "x"}}, 0, None),
    ("e", 4, 0, 0.4, 0.3, None, {"gsa": {"p_yes": 0.6}}, 1, None),
    ("f", 5, 1, 0.7, 0.6, None, {"gsa": {"p_yes": 0.9}}, 1, None),
]


def _insert(conn: sqlite3.Connection, rows, run_id: int | None) -> None:
    for item, pos, correct, conf, min_conf, error, extras, cloud, cloud_error in rows:
        values = [item, pos, correct, conf, min_conf, error, json.dumps(extras), cloud, cloud_error]
        cols = (
            "item_id, position, correct, confidence, min_confidence, error, extras, "
            "cloud_correct, cloud_error"
        )
        if run_id is not None:
            cols, values = "run_id, " + cols, [run_id, *values]
        conn.execute(
            f"INSERT INTO results ({cols}) VALUES ({', '.join('?' * len(values))})", values
        )


@pytest.fixture
def run_db(tmp_path):
    path = tmp_path / "run.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE runs (run_id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO runs VALUES (1, 'trivia__qwen'), (2, 'other')")
    _results_table(conn, with_runs=True)
    _insert(conn, ROWS, 1)
    _insert(conn, [("z", 0, 1, 0.99, 0.99, None, {}, 1, None)], 2)
    conn.commit()
    conn.close()
    return path


def test_load_scores_from_run(run_db):
    data = load_scores_from_run(run_db, run="trivia__qwen")
    assert data.scores == [0.2, 0.9, None, 0.4, 0.7]  # failure row "c" excluded
    assert data.labels == [0, 1, 1, 0, 1]
    assert data.cloud_labels == [1, 1, 0, 1, 1]
    assert (data.n_errors, data.run, data.signal) == (1, "trivia__qwen", "confidence")
    assert load_scores_from_run(run_db, "min_logprob", run=1).scores == [0.1, 0.5, None, 0.3, 0.6]
    assert load_scores_from_run(run_db, "gsa.p_yes", run=1).scores == [0.3, 0.8, None, 0.6, 0.9]


def test_load_scores_requires_a_run_choice_when_ambiguous(run_db):
    with pytest.raises(ValueError, match="holds 2 runs"):
        load_scores_from_run(run_db)
    with pytest.raises(ValueError, match="no run 'nope'"):
        load_scores_from_run(run_db, run="nope")
    with pytest.raises(ValueError, match="unknown signal"):
        load_scores_from_run(run_db, "entropy", run=1)


def test_load_scores_is_read_only(run_db):
    before = run_db.read_bytes()
    load_scores_from_run(run_db, run=1)
    assert run_db.read_bytes() == before


def test_results_only_database(tmp_path):
    path = tmp_path / "plain.sqlite"
    conn = sqlite3.connect(path)
    _results_table(conn, with_runs=False)
    _insert(conn, ROWS, None)
    conn.commit()
    conn.close()
    data = load_scores_from_run(path)
    assert data.run is None and data.scores == [0.2, 0.9, None, 0.4, 0.7]


def test_missing_labels_and_cloud_labels(tmp_path):
    path = tmp_path / "unlabelled.sqlite"
    conn = sqlite3.connect(path)
    _results_table(conn, with_runs=False)
    _insert(conn, [("a", 0, None, 0.2, 0.2, None, {}, None, None),
                   ("b", 1, 1, 0.6, 0.6, None, {}, 1, "cloud: ThrottlingException")], None)  # fmt: skip
    conn.commit()
    conn.close()
    data = load_scores_from_run(path)
    assert data.labels is None and data.cloud_labels is None
    assert calibrate_run(path, target_rate=0.5).threshold == 0.6
    with pytest.raises(ValueError, match="lack labels"):
        calibrate_run(path, target_accuracy=0.5)


def test_missing_file_and_bad_tables(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_scores_from_run(tmp_path / "none.sqlite")
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).close()
    with pytest.raises(ValueError, match="no 'results' table"):
        load_scores_from_run(path)


def test_calibrate_run_end_to_end(run_db):
    r = calibrate_run(run_db, run="trivia__qwen", target_rate=0.5)
    # known scores 0.2 0.4 0.7 0.9 (one missing): floor(2) -> escalate 0.2, 0.4
    assert (r.threshold, r.expected_call_rate, r.n_missing) == (0.7, 0.5, 1)
    assert r.accuracy_kind == "system" and r.expected_accuracy == 1.0
    r = calibrate_run(run_db, run=1, target_accuracy=1.0, use_cloud_labels=False)
    assert (r.threshold, r.expected_call_rate) == (0.7, 0.5)


def test_reads_the_evaluation_runner_schema(tmp_path):
    pytest.importorskip("numpy")
    runner = pytest.importorskip("confidence_router.evaluation.runner")
    path = tmp_path / "eval.sqlite"
    conn = runner.connect(path)
    conn.execute(
        "INSERT INTO runs (run_id, name, dataset, model, prompt_set, prompt_templates, grader, "
        "signals, model_options, library_version, started_at, host, config) VALUES "
        "(1, 'r', 'triviaqa', 'm', 'p', '{}', 'g', '[]', '{}', 'v', 't', '{}', '{}')"
    )
    for i, (conf, correct, error) in enumerate(
        [(0.3, 0, None), (0.8, 1, None), (None, None, "local: TimeoutError: x")]
    ):
        conn.execute(
            "INSERT INTO results (run_id, item_id, position, dataset, question, gold_answers, "
            "correct, confidence, error, completed_at) VALUES (1, ?, ?, 'triviaqa', 'q', '[]', "
            "?, ?, ?, 't')",
            (f"i{i}", i, correct, conf, error),
        )
    conn.commit()
    conn.close()
    data = load_scores_from_run(path)
    assert data.scores == [0.3, 0.8] and data.labels == [0, 1] and data.n_errors == 1
    assert data.cloud_labels is None


# ---- attack round: the arrays users actually have ----------------------------------------------


def test_numpy_arrays_and_generators_are_accepted():
    # Found: SignalArrays / numpy inputs were refused: "labels[0] must be 0/1 (or a bool), got
    # np.int64(0)" and "scores[0] must be a number, got np.float32(0.1)"; a generator raised
    # "object of type 'generator' has no len()".
    np = pytest.importorskip("numpy")
    scores = [0.1, 0.4, 0.6, 0.9]
    labels = [0, 0, 1, 1]
    expected = calibrate_threshold(scores, labels, target_accuracy=1.0)
    assert calibrate_threshold(np.array(scores), np.array(labels), target_accuracy=1.0) == expected
    assert calibrate_threshold(np.array(scores), np.array(labels, dtype=bool),
                               target_accuracy=1.0) == expected
    got = calibrate_threshold(np.array(scores, dtype=np.float32), labels, target_accuracy=1.0)
    assert got.threshold == pytest.approx(0.6) and got.expected_call_rate == 0.5
    assert calibrate_threshold((s for s in scores), (y for y in labels),
                               target_accuracy=1.0) == expected
    # A NaN of any float type is a missing score, as documented.
    with_nan = calibrate_threshold([np.float32("nan"), *scores], [None, *labels],
                                   target_accuracy=1.0)
    assert with_nan.n_missing == 1 and with_nan.threshold == expected.threshold


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: calibrate_threshold([0.1, 0.2], [0, 2], target_rate=0.5),
         InvalidArgumentError, r"labels\[1\]"),
        (lambda: calibrate_threshold([0.1, float("inf")], target_rate=0.5),
         InvalidArgumentError, r"scores\[1\].*finite"),
        (lambda: calibrate_threshold(["0.1"], target_rate=0.5), InvalidTypeError, r"scores\[0\]"),
        (lambda: calibrate_threshold([0.1], [0, 1], target_rate=0.5),
         InvalidArgumentError, "rows"),
        (lambda: calibrate_threshold([], target_rate=0.5), InvalidArgumentError, "no row"),
        (lambda: calibrate_threshold([0.1], target_rate=1.5), InvalidArgumentError, "1.5"),
        (lambda: calibrate_threshold([0.1], target_rate=True), InvalidTypeError, "True"),
    ],
)
def test_bad_input_is_a_typed_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
