import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confidence_router.signals import (
    compute_signals,
    confidence_to_logprob,
    logprob_to_confidence,
    score_for,
)

logprob = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False)


@pytest.mark.parametrize(
    ("mean", "expected"),
    # The paper's table (method.md section 2.1).
    [(0, 0.9526), (-0.25, 0.9241), (-0.5, 0.8808), (-0.75, 0.8176), (-1.0, 0.7311),
     (-1.5, 0.5), (-2.0, 0.2689), (-2.5, 0.1192), (-3.0, 0.0474), (-4.0, 0.0067)],
)
def test_mapping_matches_paper_table(mean, expected):
    assert logprob_to_confidence(mean) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(
    ("threshold", "mean"), [(0.5, -1.5), (0.6, -1.297), (0.7, -1.076), (0.8, -0.807), (0.9, -0.401)]
)
def test_threshold_equivalence(threshold, mean):
    assert confidence_to_logprob(threshold) == pytest.approx(mean, abs=5e-4)


def test_signals_of_known_answer():
    s = compute_signals([-0.1, -0.5, -2.4])
    assert s.known
    assert s.token_count == 3
    assert s.mean_logprob == pytest.approx(-1.0)
    assert s.min_logprob == pytest.approx(-2.4)
    assert s.confidence == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert s.min_confidence == pytest.approx(1 / (1 + math.exp(-(2 * -2.4 + 3))))
    assert s.unknown_reason is None


@pytest.mark.parametrize("value", [None, []])
def test_missing_logprobs_are_unknown_not_half(value):
    s = compute_signals(value)
    assert not s.known
    assert s.confidence is None and s.mean_logprob is None
    assert s.unknown_reason == "no_logprobs"


@pytest.mark.parametrize("bad", [[float("nan")], [-1.0, float("-inf")], [0.5]])
def test_invalid_logprobs_are_unknown(bad):
    s = compute_signals(bad)
    assert not s.known
    assert s.unknown_reason == "invalid_logprobs"


def test_confidence_to_logprob_rejects_out_of_range():
    with pytest.raises(ValueError, match="confidence"):
        confidence_to_logprob(1.0)


def test_score_for_unknown_signal_name():
    with pytest.raises(ValueError, match="unknown signal"):
        score_for(compute_signals([-1.0]), "entropy")


@given(st.lists(logprob, min_size=1, max_size=50))
def test_bounded(values):
    s = compute_signals(values)
    assert 0.0 <= s.confidence <= 1 / (1 + math.exp(-3)) + 1e-12
    assert 0.0 <= s.min_confidence <= s.confidence + 1e-12
    assert s.min_logprob <= s.mean_logprob + 1e-9


@given(logprob, logprob)
def test_monotonic(a, b):
    lo, hi = sorted((a, b))
    assert logprob_to_confidence(lo) <= logprob_to_confidence(hi)


@given(st.lists(logprob, min_size=1, max_size=20), st.floats(min_value=0.01, max_value=5))
def test_lowering_any_token_never_raises_confidence(values, drop):
    lowered = [values[0] - drop, *values[1:]]
    assert compute_signals(lowered).confidence <= compute_signals(values).confidence


@given(st.floats(min_value=0.001, max_value=0.999))
def test_inverse_roundtrip(c):
    assert logprob_to_confidence(confidence_to_logprob(c)) == pytest.approx(c, rel=1e-9)
