"""Attacker's round on threshold calibration and calibrated confidence: numbers no float can
hold, corrupted state and calibration files, degenerate fits, bad arguments, many threads."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import zlib
from pathlib import Path

import pytest

from confidence_router.calibration import (
    EvalDatabaseError,
    RollingQuantileThreshold,
    calibrate_run,
    calibrate_threshold,
    load_scores_from_run,
    read_json_state,
)
from confidence_router.correctness import (
    CalibrationFitError,
    ConfidenceCalibration,
    split_holdout,
)
from confidence_router.errors import InvalidArgumentError, InvalidStateError, InvalidTypeError

HUGE = 10**400  # an int no float can hold: math.isfinite / math.isnan raise OverflowError on it
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON nesting deeper than the parser's recursion


# -- numbers too large for a float -------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: RollingQuantileThreshold(0.3).observe(HUGE),
        lambda: RollingQuantileThreshold(HUGE),
        lambda: RollingQuantileThreshold(0.3, window=10, min_samples=5, initial_threshold=-HUGE),
        lambda: calibrate_threshold([0.1, HUGE], target_rate=0.5),
        lambda: calibrate_threshold([0.1, 0.2], target_rate=HUGE),
    ],
    ids=["observe", "target_rate", "initial_threshold", "score", "target"],
)
def test_ints_beyond_the_float_range_are_typed_errors(call):
    # Before: OverflowError ("int too large to convert to float") from math.isfinite/isnan.
    with pytest.raises(InvalidArgumentError, match="must be finite"):
        call()


def test_observe_of_a_huge_int_leaves_the_calibrator_untouched():
    rq = RollingQuantileThreshold(0.5, window=4, min_samples=1)
    rq.observe(0.4)
    with pytest.raises(InvalidArgumentError):
        rq.observe(-HUGE)
    assert rq.n_known == 1 and rq.state()["scores"] == [0.4]


def test_state_file_with_a_huge_integer_score_is_an_invalid_state(tmp_path):
    rq = RollingQuantileThreshold(0.5, window=4, min_samples=1)
    rq.observe(0.4)
    path = tmp_path / "rq.json"
    rq.save(path)
    # Corrupt the file by hand: a 400-digit integer is valid JSON and parses to a Python int.
    path.write_text(path.read_text().replace("0.4", "1" + "0" * 400))
    with pytest.raises(InvalidStateError, match=r"rq\.json.*'scores' entry must be finite"):
        RollingQuantileThreshold.load(path)


# -- corrupted files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [(b'{"kind": "\xff\xfe"}', "not valid JSON"), (DEEP.encode(), "nested too deeply")],
    ids=["invalid-utf8", "deep-nesting"],
)
def test_corrupt_state_files_are_invalid_state(tmp_path, content, match):
    # Before: UnicodeDecodeError and RecursionError escaped read_json_state (and so
    # RollingQuantileThreshold.load and CloudBudget's state loading).
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(InvalidStateError, match=match):
        read_json_state(path)
    with pytest.raises(InvalidStateError, match="state.json"):
        RollingQuantileThreshold.load(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b'{"format": "\xff"}', "not UTF-8 JSON"), (DEEP.encode(), "nested too deeply")],
    ids=["invalid-utf8", "deep-nesting"],
)
def test_corrupt_calibration_files_are_calibration_fit_errors(tmp_path, content, match):
    path = tmp_path / "calibration.json"
    path.write_bytes(content)
    with pytest.raises(CalibrationFitError, match=match):
        ConfidenceCalibration.load(path)


@pytest.fixture
def fitted() -> ConfidenceCalibration:
    return ConfidenceCalibration.fit([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1], signal="mean_logprob")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: {**d, "n_train": math.inf},
        lambda d: {**d, "n_train_correct": -math.inf},
        lambda d: {**d, "knots_x": [HUGE] * len(d["knots_x"])},
        lambda d: {**d, "method": "platt", "knots_x": [], "knots_y": [], "a": HUGE, "b": 0.0},
    ],
    ids=["n_train-inf", "n_train_correct-inf", "huge-knots", "huge-platt-a"],
)
def test_calibration_data_beyond_the_float_range_is_a_calibration_fit_error(fitted, mutate):
    # Before: OverflowError from int(inf) / float(10**400) escaped from_dict.
    with pytest.raises(
        CalibrationFitError, match="invalid calibration data|must be an integer >= 0, got -?inf"
    ):
        ConfidenceCalibration.from_dict(mutate(fitted.as_dict()))


def test_calibration_file_round_trip_is_exact(fitted, tmp_path):
    path = fitted.save(tmp_path / "sub" / "cal.json")
    loaded = ConfidenceCalibration.load(path)
    assert loaded == fitted
    assert json.loads(path.read_text()) == fitted.as_dict()


# -- fitting on degenerate data --------------------------------------------------------------------


def test_fit_with_a_huge_int_score_is_a_calibration_fit_error():
    # Before: OverflowError from math.isnan(10**400) in the score check.
    with pytest.raises(CalibrationFitError, match="scores must lie in"):
        ConfidenceCalibration.fit([0.2, HUGE], [0, 1], signal="mean_logprob")


@pytest.mark.parametrize("source", [3, "run-1", ["a", "b"]])
def test_fit_with_a_source_that_is_not_a_mapping_is_a_calibration_fit_error(source):
    # Before: dict(3) raised TypeError ('int' object is not iterable); dict("run-1") raised
    # ValueError; both after the whole fit had run.
    with pytest.raises(CalibrationFitError, match="source must be a mapping"):
        ConfidenceCalibration.fit([0.2, 0.8], [0, 1], signal="mean_logprob", source=source)


@pytest.mark.parametrize("method", ["isotonic", "platt"])
@pytest.mark.parametrize(
    ("scores", "labels"),
    [([0.5], [1]), ([0.3, 0.6, 0.9], [1, 1, 1]), ([0.3, 0.6], [0, 0]), ([0.5, math.nan], [0, 1])],
    ids=["one-sample", "all-correct", "all-wrong", "nan-score"],
)
def test_degenerate_fits_are_refused_with_the_reason(scores, labels, method):
    with pytest.raises(CalibrationFitError, match="one class|must be numbers"):
        ConfidenceCalibration.fit(scores, labels, signal="mean_logprob", method=method)


def test_isotonic_fit_on_all_tied_scores_is_the_base_rate():
    cal = ConfidenceCalibration.fit([0.5] * 4, [1, 0, 1, 1], signal="mean_logprob")
    assert cal.knots_x == (0.5,) and cal.knots_y == (0.75,)
    assert cal.p_correct(0.0) == cal.p_correct(1.0) == 0.75
    assert cal.threshold_for_accuracy(0.7) == 0.0 and cal.threshold_for_accuracy(0.8) is None


def test_calibrate_threshold_on_degenerate_rows():
    one = calibrate_threshold([0.4], [1], target_accuracy=1.0)
    assert (one.threshold, one.expected_call_rate, one.reachable) == (0.4, 0.0, True)
    wrong = calibrate_threshold([0.2, 0.5, 0.9], [0, 0, 0], target_accuracy=0.5)
    assert (wrong.threshold, wrong.reachable) == (None, False)
    # All tied: the only achievable rates are 0 and 1; 0.99 is a budget, never exceeded.
    tied = calibrate_threshold([0.5] * 5, target_rate=0.99)
    assert (tied.threshold, tied.expected_call_rate) == (0.5, 0.0)
    nan = calibrate_threshold([math.nan, 0.3, math.nan, 0.7], target_rate=0.5)
    assert (nan.threshold, nan.expected_call_rate, nan.n, nan.n_missing) == (0.7, 0.5, 2, 2)
    with pytest.raises(InvalidArgumentError, match="no row has a known score"):
        calibrate_threshold([math.nan, None], target_rate=0.5)


# -- split_holdout ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((10, "0.3"), InvalidTypeError, "holdout"),
        ((10, None), InvalidTypeError, "holdout"),
        ((10, math.nan), InvalidArgumentError, "holdout"),
        (("10", 0.3), InvalidTypeError, "n must be"),
        ((2.5, 0.3), InvalidTypeError, "n must be"),
        ((-3, 0.3), InvalidArgumentError, "n must be"),
    ],
)
def test_split_holdout_bad_arguments_are_typed_errors(args, error, match):
    # Before: a raw TypeError ('<' not supported...), a plain ValueError, and for n=-3 an empty
    # split returned silently.
    with pytest.raises(error, match=match):
        split_holdout(*args)


# -- concurrency -----------------------------------------------------------------------------------


def test_rolling_quantile_exact_when_threads_observe_and_save_at_once(tmp_path):
    rq = RollingQuantileThreshold(0.25, window=200, min_samples=20)
    n_threads, per_thread = 12, 300
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads + 1)

    def observe(worker: int) -> None:
        start.wait()
        try:
            for i in range(per_thread):
                rq.observe(None if i % 10 == 0 else ((worker * 7919 + i * 104729) % 1000) / 1000)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def save() -> None:
        start.wait()
        try:
            for k in range(20):
                rq.save(tmp_path / "rq.json")
                loaded = RollingQuantileThreshold.load(tmp_path / "rq.json")
                state = loaded.state()
                if len(state["scores"]) != len(state["escalated"]):
                    errors.append(AssertionError(f"inconsistent saved state at {k}"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=observe, args=(w,)) for w in range(n_threads)]
    threads.append(threading.Thread(target=save))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    unknown = n_threads * (per_thread // 10)
    assert rq.n_unknown == unknown
    snap = rq.snapshot()
    assert snap["n_known_total"] == n_threads * per_thread - unknown
    state = rq.state()
    assert len(state["scores"]) == len(state["escalated"]) == 200
    assert rq.threshold == sorted(state["scores"])[50]  # floor(0.25 * 200)
    rq.save(tmp_path / "final.json")
    again = RollingQuantileThreshold.load(tmp_path / "final.json")
    assert again.state() == state and again.snapshot() == snap


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scores": [0.1, 0.5], "labels": {"a": 1, "b": 0}, "target_accuracy": 0.5},
        {"scores": [0.1, 0.5], "labels": {1: 1, 2: 0}, "target_accuracy": 0.5},
        {"scores": {0: 0.1, 1: 0.5}, "target_rate": 0.5},
        {"scores": [0.1, 0.5], "labels": [1, 0], "cloud_labels": {0: 1, 1: 1},
         "target_accuracy": 0.5},
    ],
    ids=["str-keys", "shifted-int-keys", "scores-dict", "cloud-labels-dict"],
)
def test_calibrate_threshold_refuses_mappings_as_rows(kwargs):
    # Before: rows were read as values[i], so a dict raised a raw KeyError (or, keyed by
    # 0..n-1 in any order, paired each score with whatever label had that key).
    with pytest.raises(InvalidTypeError, match="one value per row, got a dict"):
        calibrate_threshold(**kwargs)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: {**d, "n_train": -5}, "n_train must be an integer >= 0"),
        (lambda d: {**d, "n_train": 2.7}, "n_train must be an integer"),
        (lambda d: {**d, "n_train": "4"}, "n_train must be an integer"),
        (lambda d: {**d, "n_train_correct": True}, "n_train_correct must be an integer"),
        (lambda d: {**d, "n_train_correct": 9}, r"n_train_correct \(9\) exceeds n_train \(4\)"),
    ],
    ids=["negative", "fraction", "string", "bool", "more-correct-than-rows"],
)
def test_calibration_file_with_impossible_row_counts_is_refused(fitted, mutate, match):
    # Before: int() truncated 2.7 to 2, turned "4" and True into numbers, and a negative count
    # or more correct rows than rows loaded as if valid.
    with pytest.raises(CalibrationFitError, match=match):
        ConfidenceCalibration.from_dict(mutate(fitted.as_dict()))


def test_calibration_file_counts_written_as_whole_floats_still_load(fitted):
    loaded = ConfidenceCalibration.from_dict({**fitted.as_dict(), "n_train": 4.0})
    assert loaded == fitted and isinstance(loaded.n_train, int)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"run_db": Path("run.sqlite")}, "source must hold JSON values"),
        ({"holdout": math.nan}, "source must hold JSON values"),
        ({1: "first run"}, "would not load back"),
        ({"split": ("train", "test")}, "would not load back"),
    ],
    ids=["path", "nan", "int-key", "tuple"],
)
def test_fit_refuses_a_source_that_cannot_be_saved_and_loaded_back(tmp_path, source, match):
    # Before: the fit succeeded; save() then raised a raw TypeError/ValueError from json.dumps
    # (a Path, NaN), or the file loaded back as a different calibration ({1: ...} -> {"1": ...}).
    with pytest.raises(CalibrationFitError, match=match):
        ConfidenceCalibration.fit([0.2, 0.8], [0, 1], signal="mean_logprob", source=source)


def test_fit_source_round_trips_through_a_file(tmp_path):
    source = {"run_db": "run.sqlite", "run": None, "holdout": 0.3, "tags": ["a", {"b": True}]}
    cal = ConfidenceCalibration.fit([0.2, 0.8], [0, 1], signal="mean_logprob", source=source)
    assert ConfidenceCalibration.load(cal.save(tmp_path / "cal.json")) == cal


# -- evaluation databases with damaged rows ------------------------------------------------------


def _results_db(path, *, tokens=None, extras=None):
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE results (correct INTEGER, error TEXT, tokens BLOB, answer TEXT, extras TEXT)"
    )
    conn.execute("INSERT INTO results VALUES (0, 'Timeout', NULL, NULL, NULL)")  # a failure row
    conn.execute("INSERT INTO results VALUES (1, NULL, ?, 'Paris', ?)", (tokens, extras))
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    "tokens",
    [
        b"not zlib at all",
        zlib.compress(b"\xff\xfe"),
        zlib.compress(json.dumps({"v": 1}).encode()),
        zlib.compress(b"[1, 2]"),
        "a text value where the blob belongs",
    ],
    ids=["not-zlib", "not-utf8", "missing-keys", "not-an-object", "text"],
)
def test_a_damaged_tokens_blob_is_an_eval_database_error_naming_file_and_row(tmp_path, tokens):
    # Before: zlib.error, UnicodeDecodeError, KeyError('t'), a plain ValueError or TypeError
    # escaped load_scores_from_run (and the CLI's calibrate).
    path = _results_db(tmp_path / "run.sqlite", tokens=tokens)
    with pytest.raises(EvalDatabaseError, match=r"run\.sqlite: column 'tokens' of result row 2"):
        load_scores_from_run(path, "mean_logprob")
    with pytest.raises(EvalDatabaseError, match="cannot be decoded"):
        calibrate_run(path, signal="sum_logprob", target_rate=0.5)


def test_too_deeply_nested_extras_count_as_missing_like_other_unreadable_extras(tmp_path):
    # Before: RecursionError from json.loads; unreadable (non-JSON) extras are already missing.
    path = _results_db(tmp_path / "run.sqlite", extras="[" * 100_000 + "]" * 100_000)
    data = load_scores_from_run(path, "gsa.p_yes")
    assert (data.scores, data.labels, data.n_errors) == ([None], [1], 1)


def _rq_state() -> dict:
    rq = RollingQuantileThreshold(0.5, window=4, min_samples=1)
    for score in (0.1, None, 0.2, 0.3):
        rq.observe(score)
    return rq.state()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.update(n_known_total=50), r"'scores' holds 3 entries.*expected 4"),
        (lambda s: s.update(scores=[0.3], escalated=[False]), r"'scores' holds 1 entries"),
        (lambda s: s.update(recent_unknown=[False] * 4, scores=[0.1, 0.2, 0.3],
                            n_known_total=3), "marks 4 known observations"),
    ],
    ids=["window-not-full", "scores-dropped", "more-known-than-kept"],
)  # fmt: skip
def test_inconsistent_rolling_state_is_refused(tmp_path, mutate, match):
    # Before: these loaded; the threshold then came from a window that could not have been
    # observed (3 scores after 50 known ones with window=4) and unknown_rate was made up.
    state = _rq_state()
    mutate(state)
    path = tmp_path / "rq.json"
    path.write_text(json.dumps(state))
    with pytest.raises(InvalidStateError, match=match):
        RollingQuantileThreshold.load(path)


def test_consistent_rolling_states_still_load_after_the_window_fills(tmp_path):
    rq = RollingQuantileThreshold(0.5, window=3, min_samples=1)
    for score in (0.5, None, 0.1, None, None, 0.9, 0.4, None, 0.2):
        rq.observe(score)
        rq.save(tmp_path / "rq.json")
        assert RollingQuantileThreshold.load(tmp_path / "rq.json").state() == rq.state()
