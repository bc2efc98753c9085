"""ConfidenceCalibration (pure) and ``confidence-router calibrate --fit`` on a real eval run."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from confidence_router.cli import main
from confidence_router.correctness import (
    CalibrationFitError,
    ConfidenceCalibration,
    split_holdout,
)
from confidence_router.errors import ConfidenceRouterError

# ---- fitting by hand ------------------------------------------------------------------------------


def test_isotonic_pools_violators_and_interpolates_between_blocks():
    # scores 0.1..0.6 with labels 0 1 0 1 1 1: the (1, 0) violation pools to 0.5
    cal = ConfidenceCalibration.fit([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0, 1, 0, 1, 1, 1],
                                    signal="mean_logprob")
    assert cal.knots_x == (0.1, 0.2, 0.3, 0.4, 0.6)
    assert cal.knots_y == (0.0, 0.5, 0.5, 1.0, 1.0)
    assert cal.p_correct(0.05) == 0.0 and cal.p_correct(0.99) == 1.0  # flat outside
    assert cal.p_correct(0.25) == 0.5
    assert cal.p_correct(0.35) == pytest.approx(0.75)  # linear between 0.3 and 0.4
    assert cal.threshold_for_accuracy(0.75) == pytest.approx(0.35)
    assert cal.threshold_for_accuracy(0.5) == pytest.approx(0.2)
    assert (cal.n_train, cal.n_train_correct) == (6, 4)


def test_tied_scores_get_one_value():
    cal = ConfidenceCalibration.fit([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1], signal="min_logprob")
    assert cal.p_correct(0.5) == pytest.approx(1 / 3)


def test_platt_is_a_monotone_sigmoid_and_inverts_to_a_threshold():
    rng = random.Random(1)
    scores = [rng.random() for _ in range(400)]
    labels = [int(rng.random() < s) for s in scores]  # P(correct) = score: well calibrated
    cal = ConfidenceCalibration.fit(scores, labels, signal="sum_logprob", method="platt")
    assert cal.a == pytest.approx(1.0, abs=0.35) or cal.a > 0
    probs = [cal.p_correct(x / 100) for x in range(101)]
    assert all(0.0 < p < 1.0 for p in probs)
    assert probs == sorted(probs)
    t = cal.threshold_for_accuracy(0.6)
    assert cal.p_correct(t) == pytest.approx(0.6, abs=1e-9)


def test_unknown_score_has_no_probability():
    cal = ConfidenceCalibration.fit([0.2, 0.8], [0, 1], signal="mean_logprob")
    assert cal.p_correct(None) is None  # never 0.5


def test_unreachable_and_trivial_targets():
    cal = ConfidenceCalibration.fit([0.2, 0.4, 0.8], [0, 1, 1], signal="mean_logprob")
    # p rises linearly from 0 at 0.2 to 1 at 0.4
    assert cal.threshold_for_accuracy(0.99) == pytest.approx(0.398)
    low = ConfidenceCalibration.fit([0.2, 0.4, 0.8, 0.9], [1, 0, 0, 1], signal="mean_logprob")
    assert low.knots_y == pytest.approx((1 / 3, 1 / 3, 1.0))
    assert low.threshold_for_accuracy(0.51) == pytest.approx(0.8 + (0.51 - 1 / 3) * 0.1 / (2 / 3))
    easy = ConfidenceCalibration.fit([0.2, 0.4], [1, 0], signal="mean_logprob")
    assert easy.knots_y == (0.5, 0.5) and easy.threshold_for_accuracy(0.4) == 0.0
    assert easy.threshold_for_accuracy(0.6) is None


def test_a_backwards_platt_fit_refuses_to_give_a_threshold():
    cal = ConfidenceCalibration.fit([0.1, 0.2, 0.8, 0.9] * 5, [1, 1, 0, 0] * 5,
                                    signal="mean_logprob", method="platt")
    assert cal.a < 0
    with pytest.raises(CalibrationFitError, match="slope"):
        cal.threshold_for_accuracy(0.5)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [1], "length"),
        ([], [], "no rows"),
        ([0.1, 0.2], [1, 1], "one class"),
        ([0.1, 1.5], [0, 1], r"\[0, 1\]"),
        ([0.1, float("nan")], [0, 1], "numbers"),
        ([0.1, 0.2], [0, 2], "0 or 1"),
    ],
)
def test_bad_fit_input_is_a_typed_error(scores, labels, match):
    with pytest.raises(CalibrationFitError, match=match) as info:
        ConfidenceCalibration.fit(scores, labels, signal="mean_logprob")
    assert isinstance(info.value, ConfidenceRouterError)


def test_bad_signal_method_and_scores():
    with pytest.raises(CalibrationFitError, match="unknown signal"):
        ConfidenceCalibration.fit([0.1, 0.9], [0, 1], signal="vibes")
    with pytest.raises(CalibrationFitError, match="method"):
        ConfidenceCalibration.fit([0.1, 0.9], [0, 1], signal="mean_logprob", method="beta")
    cal = ConfidenceCalibration.fit([0.1, 0.9], [0, 1], signal="mean_logprob")
    for bad in (1.2, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError):
            cal.p_correct(bad)  # type: ignore[arg-type]
    for bad in (0.0, 1.0, 2):
        with pytest.raises(ValueError, match="target"):
            cal.threshold_for_accuracy(bad)


@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=2, max_size=80),
    st.sampled_from(["isotonic", "platt"]),
)
def test_fitted_maps_are_bounded_and_monotone(rows, method):
    labels = [y for _, y in rows]
    if len(set(labels)) < 2:
        return
    cal = ConfidenceCalibration.fit([s for s, _ in rows], labels, signal="mean_logprob",
                                    method=method)
    grid = [cal.p_correct(x / 50) for x in range(51)]
    assert all(0.0 <= p <= 1.0 for p in grid)
    if method == "isotonic" or cal.a >= 0:
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(grid))
    if method == "isotonic":
        # in-sample the isotonic fit is calibrated on average: mean p equals accuracy
        fitted = [cal.p_correct(s) for s, _ in rows]
        assert sum(fitted) / len(fitted) == pytest.approx(sum(labels) / len(labels), abs=0.35)


@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=2, max_size=60),
       st.floats(0.05, 0.95))
# two knots one float apart: interpolation used to round down onto the lower knot (p = 0)
@example(rows=[(1.0, 1), (0.9999999999999999, 0)], target=0.25)
def test_threshold_keeps_exactly_the_answers_reaching_the_target(rows, target):
    labels = [y for _, y in rows]
    if len(set(labels)) < 2:
        return
    cal = ConfidenceCalibration.fit([s for s, _ in rows], labels, signal="mean_logprob")
    t = cal.threshold_for_accuracy(target)
    if t is None:
        assert cal.p_correct(1.0) < target
    else:
        assert cal.p_correct(t) >= target - 1e-9
        if t > 1e-9:
            assert cal.p_correct(max(0.0, t - 1e-6)) < target + 1e-6


# ---- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_save_load_round_trip(tmp_path, method):
    cal = ConfidenceCalibration.fit([0.1, 0.3, 0.5, 0.7, 0.9], [0, 0, 1, 0, 1],
                                    signal="sum_logprob", method=method,
                                    source={"run": "wikidata__x", "n_heldout": 3})
    path = cal.save(tmp_path / "sub" / "cal.json")
    loaded = ConfidenceCalibration.load(path)
    assert loaded == cal
    assert all(loaded.p_correct(x / 10) == cal.p_correct(x / 10) for x in range(11))
    data = json.loads(path.read_text())
    assert data["format"] == "confidence-router/confidence-calibration" and data["version"] == 1
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "something-else"}),
        json.dumps({"format": "confidence-router/confidence-calibration", "version": 9}),
        json.dumps({"format": "confidence-router/confidence-calibration", "version": 1,
                    "signal": "mean_logprob", "method": "isotonic",
                    "knots_x": [0.1, 0.5], "knots_y": [0.9, 0.2]}),  # decreasing
        json.dumps({"format": "confidence-router/confidence-calibration", "version": 1,
                    "signal": "mean_logprob", "method": "platt", "a": None, "b": 1}),
        json.dumps({"format": "confidence-router/confidence-calibration", "version": 1}),
    ],
)
def test_corrupt_files_are_typed_errors(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationFitError):
        ConfidenceCalibration.load(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        ConfidenceCalibration.load("/nonexistent/cal.json")


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_holdout(100, 0.3, seed=7)
    assert len(held) == 30 and not set(train) & set(held)
    assert sorted(train + held) == list(range(100))
    assert split_holdout(100, 0.3, seed=7) == (train, held)
    with pytest.raises(ValueError):
        split_holdout(10, 1.0)


# ---- the command line on a real evaluation run -----------------------------------------------------


def _eval_run(ollama_backend, ollama_server, tmp_path, capsys):
    """120 questions answered by the scripted server through the real ChatOllama; the
    answer's logprob falls with i and P(correct) falls with it (seeded noise)."""
    rng = random.Random(3)
    rows = []
    for i in range(120):
        lp = -0.02 * (i + 1)
        right = rng.random() < math.exp(lp * 1.5)
        rows.append({"question": f"Fit question {i}?", "answers": ["right" if right else "x"]})
        ollama_backend.add_answer(
            f"Fit question {i}?", [" right"],
            # a proper distribution: the runner-up takes half of the remaining mass
            top_logprobs=[{" right": lp, " wrong": math.log((1.0 - math.exp(lp)) / 2.0)}],
        )
    data = tmp_path / "fit.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    db = tmp_path / "fit.sqlite"
    assert main(["eval", "--dataset", str(data), "--ollama-url", ollama_server.url,
                 "--model", "scripted-local", "--db", str(db), "--no-progress"]) == 0
    capsys.readouterr()
    return db


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrate_fit_reports_heldout_ece_and_brier_and_saves(
    ollama_backend, ollama_server, tmp_path, capsys, method
):
    db = _eval_run(ollama_backend, ollama_server, tmp_path, capsys)
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--fit", str(db), "--signal", "sum_logprob", "--method", method,
                 "--out", str(out), "--target-accuracy", "0.6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_train"], report["n_heldout"]) == (84, 36)
    for key in ("ece_before", "ece_after", "brier_before", "brier_after"):
        assert 0.0 <= report[key] <= 1.0
    # the raw exp(sum) scores are far from P(correct) here; the fit must improve Brier
    assert report["brier_after"] < report["brier_before"]
    cal = ConfidenceCalibration.load(out)
    assert cal.signal == "sum_logprob" and cal.method == method and cal.n_train == 84
    assert report["threshold"] == cal.threshold_for_accuracy(0.6)
    assert cal.source["n_heldout"] == 36
    # plain-text output names the numbers too
    assert main(["calibrate", "--fit", str(db), "--signal", "min_margin", "--out",
                 str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "held-out ECE" in text and "held-out Brier" in text and "min_margin" in text


def test_calibrate_threshold_mode_accepts_every_signal(
    ollama_backend, ollama_server, tmp_path, capsys
):
    db = _eval_run(ollama_backend, ollama_server, tmp_path, capsys)
    for signal in ("sum_logprob", "min_margin", "max_entropy", "length", "confidence"):
        assert main(["calibrate", str(db), "--signal", signal, "--target-rate", "0.25",
                     "--json"]) == 0, signal
        result = json.loads(capsys.readouterr().out)
        if signal == "length":  # every answer is one token: all tied, nothing separates them
            assert result["n"] == 120
        else:
            assert result["expected_call_rate"] == pytest.approx(0.25), signal
    # exp(sum) of the one-token answers: escalating the lowest 30 keeps i < 90
    assert main(["calibrate", str(db), "--signal", "sum_logprob", "--target-rate", "0.25",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(math.exp(-0.02 * 90))


def test_calibrate_fit_errors(ollama_backend, ollama_server, tmp_path, capsys):
    db = _eval_run(ollama_backend, ollama_server, tmp_path, capsys)
    assert main(["calibrate", "--fit", str(db), "--signal", "nonsense"]) == 2
    assert "unknown signal" in capsys.readouterr().err
    assert main(["calibrate", "--fit", str(db), "--target-rate", "0.3"]) == 2
    assert main(["calibrate", "--fit", str(tmp_path / "none.sqlite")]) == 2
    assert main(["calibrate"]) == 2
    assert "--fit" in capsys.readouterr().err


# ---- attack round: numpy inputs, generators, typed errors ----------------------------------------


def test_fit_and_p_correct_take_numpy_values_and_generators():
    # Found: float32 scores were refused ("scores must be numbers, got np.float32(0.1)"), so
    # was p_correct(np.float32(0.5)); generators raised "object of type 'generator' has no
    # len()".
    np = pytest.importorskip("numpy")
    scores = [0.1, 0.3, 0.6, 0.9] * 10
    labels = [0, 0, 1, 1] * 10
    ref = ConfidenceCalibration.fit(scores, labels, signal="mean_logprob")
    f32 = ConfidenceCalibration.fit(np.array(scores, dtype=np.float32),
                                    np.array(labels, dtype=bool), signal="mean_logprob")
    gen = ConfidenceCalibration.fit((s for s in scores), iter(labels), signal="mean_logprob")
    assert gen.as_dict() == ref.as_dict()
    assert f32.p_correct(0.9) == pytest.approx(ref.p_correct(0.9))
    assert ref.p_correct(np.float32(0.9)) == pytest.approx(ref.p_correct(0.9))
    assert ref.p_correct(np.float64(0.9)) == ref.p_correct(0.9)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.p_correct(float("nan")), "score"),
        (lambda c: c.p_correct(1.5), "score"),
        (lambda c: c.p_correct("0.5"), "score"),
        (lambda c: c.threshold_for_accuracy(1.5), "target accuracy"),
        (lambda c: c.threshold_for_accuracy(float("nan")), "target accuracy"),
    ],
)
def test_bad_scores_and_targets_are_typed_errors(call, match):
    # Found: plain ValueError (not a ConfidenceRouterError).
    calibration = ConfidenceCalibration.fit([0.1, 0.9] * 20, [0, 1] * 20, signal="mean_logprob")
    with pytest.raises(ConfidenceRouterError, match=match) as info:
        call(calibration)
    assert isinstance(info.value, ValueError)
