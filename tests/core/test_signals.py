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
    # The paper's table (docs/how-it-works.md §2.1).
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


# ---- Signals v2: the library over tokens with top-k alternatives ---------------------------------

from confidence_router.extraction import TokenLogprob
from confidence_router.signals import (
    PAPER_SIGNAL,
    SIGNAL_DESCRIPTIONS,
    SIGNAL_SCORERS,
    answer_signals,
    rank_average,
)


def _tok(lp: float, *alts: float, text: str = "x") -> TokenLogprob:
    """A token whose top list is the chosen logprob then the given alternatives."""
    return TokenLogprob(text, lp, tuple((f"t{i}", v) for i, v in enumerate((lp, *alts))))


def test_every_scorer_is_described_and_the_paper_signal_is_first():
    assert next(iter(SIGNAL_SCORERS)) == PAPER_SIGNAL == "mean_logprob"
    assert set(SIGNAL_DESCRIPTIONS) == set(SIGNAL_SCORERS)


def test_hand_computed_values_of_every_signal():
    # Two tokens: p = 0.8 then 0.5; alternatives 0.1 and 0.3 (the rest of the mass: 0.1, 0.2).
    tokens = [_tok(math.log(0.8), math.log(0.1)), _tok(math.log(0.5), math.log(0.3))]
    s = compute_signals(tokens)
    mean = (math.log(0.8) + math.log(0.5)) / 2
    h1 = -(0.8 * math.log(0.8) + 0.1 * math.log(0.1) + 0.1 * math.log(0.1))
    h2 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    expected = {
        "mean_logprob": 1 / (1 + math.exp(-(2 * mean + 3))),
        "min_logprob": 1 / (1 + math.exp(-(2 * math.log(0.5) + 3))),
        "sum_logprob": 0.4,
        "first_token": 0.8,
        "length": 0.5,
        "mean_margin": (0.7 + 0.2) / 2,
        "min_margin": 0.2,
        "mean_entropy": 1 - ((h1 + h2) / 2) / math.log(3),
        "max_entropy": 1 - h2 / math.log(3),
        "sum_min": math.sqrt(0.4 * 0.5),
        "margin_sum": (0.2 + 0.4) / 2,
    }
    expected["mean_min"] = (expected["mean_logprob"] + expected["min_logprob"]) / 2
    assert set(expected) == set(SIGNAL_SCORERS)
    for name, value in expected.items():
        assert score_for(s, name) == pytest.approx(value, abs=1e-12), name
    assert s.top_k == 2 and s.token_count == 2
    assert s.sum_logprob == pytest.approx(math.log(0.4))
    assert s.as_dict()["min_margin"] == pytest.approx(0.2)


def test_floats_and_tokens_without_alternatives_agree_and_leave_top_k_unknown():
    values = [-0.3, -1.2, -0.01]
    from_floats = compute_signals(values)
    from_tokens = compute_signals([TokenLogprob("a", v) for v in values])
    assert from_floats == from_tokens
    for name in ("mean_margin", "min_margin", "mean_entropy", "max_entropy", "margin_sum"):
        assert score_for(from_floats, name) is None  # unknown, not 0.5
    assert score_for(from_floats, "sum_logprob") == pytest.approx(math.exp(sum(values)))


def test_one_alternative_gives_entropy_but_no_margin():
    s = compute_signals([_tok(math.log(0.6))])
    assert s.top_k == 1 and s.min_margin is None
    expected = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
    assert s.max_entropy == pytest.approx(expected)
    assert score_for(s, "max_entropy") == pytest.approx(1 - expected / math.log(2))


@pytest.mark.parametrize(
    "tops",
    [
        ((("a", float("nan")),),),  # invalid alternative
        ((("a", -0.1), ("a", -0.1), ("b", -0.2)),),  # more than all the probability mass
    ],
)
def test_unusable_alternatives_leave_only_top_k_signals_unknown(tops):
    s = compute_signals([TokenLogprob("a", -0.1, tops[0])])
    assert s.known and score_for(s, "mean_logprob") is not None
    assert score_for(s, "min_margin") is None and score_for(s, "max_entropy") is None


def test_a_single_token_without_alternatives_makes_top_k_unknown_for_the_answer():
    s = compute_signals([_tok(-0.1, -3.0), TokenLogprob("b", -0.2)])
    assert s.known and s.top_k == 0
    assert score_for(s, "min_margin") is None and score_for(s, "mean_entropy") is None


@pytest.mark.parametrize("bad", [[TokenLogprob("a", float("nan"))], [object()], [True]])
def test_invalid_tokens_are_unknown(bad):
    s = compute_signals(bad)
    assert not s.known and s.unknown_reason == "invalid_logprobs"
    assert all(score_for(s, name) is None for name in SIGNAL_SCORERS)


def test_blank_answer_is_unknown_whatever_its_tokens():
    s = answer_signals(" \n", [_tok(-0.01, -5.0)])
    assert not s.known and s.unknown_reason == "empty_answer"
    assert all(score_for(s, name) is None for name in SIGNAL_SCORERS)
    assert answer_signals(" Paris", [_tok(-0.01, -5.0)]).known


_token = st.builds(
    lambda lp, gaps: _tok(lp, *sorted((lp - g for g in gaps), reverse=True)),
    st.floats(min_value=-8.0, max_value=0.0),
    st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=0, max_size=6),
)


def _is_distribution(token: TokenLogprob) -> bool:
    return sum(math.exp(v) for _, v in token.top_logprobs) <= 1.0 + 1e-6


@given(st.lists(_token, min_size=1, max_size=12))
def test_every_score_is_in_unit_interval_or_unknown(tokens):
    s = compute_signals(tokens)
    assert s.known
    for name in SIGNAL_SCORERS:
        value = score_for(s, name)
        if value is not None:
            assert 0.0 <= value <= 1.0, (name, value)
    if all(_is_distribution(t) and len(t.top_logprobs) >= 2 for t in tokens):
        assert score_for(s, "min_margin") is not None
        assert score_for(s, "min_margin") <= score_for(s, "mean_margin") + 1e-12
        assert score_for(s, "max_entropy") <= score_for(s, "mean_entropy") + 1e-12


@given(
    st.lists(logprob, min_size=1, max_size=20),
    st.integers(min_value=0, max_value=19),
    st.floats(min_value=0.01, max_value=5),
)
def test_lowering_any_token_never_raises_a_probability_score(values, index, drop):
    index %= len(values)
    lowered = list(values)
    lowered[index] -= drop
    before, after = compute_signals(values), compute_signals(lowered)
    for name in ("mean_logprob", "min_logprob", "sum_logprob", "first_token", "mean_min",
                 "sum_min"):
        assert score_for(after, name) <= score_for(before, name) + 1e-12, name


@given(st.lists(logprob, min_size=1, max_size=20), logprob)
def test_a_longer_answer_never_scores_higher_on_length_or_answer_probability(values, extra):
    longer = compute_signals([*values, extra])
    shorter = compute_signals(values)
    assert score_for(longer, "length") < score_for(shorter, "length")
    assert score_for(longer, "sum_logprob") <= score_for(shorter, "sum_logprob") + 1e-12


@given(st.floats(min_value=1e-6, max_value=0.4), st.floats(min_value=1e-6, max_value=0.4))
def test_a_less_likely_runner_up_means_a_wider_margin(p_a, p_b):
    chosen = math.log(0.6)
    small, big = sorted((p_a, p_b))
    wide = compute_signals([_tok(chosen, math.log(small))])
    narrow = compute_signals([_tok(chosen, math.log(big))])
    assert score_for(wide, "min_margin") >= score_for(narrow, "min_margin")
    assert score_for(wide, "min_margin") == pytest.approx(0.6 - small)


def test_rank_average_hand_computed_ties_and_unknowns():
    assert rank_average([[0.1, 0.9, 0.5], [0.2, 0.3, 0.1]]) == [0.25, 1.0, 0.25]
    # ties share the average rank; a row with any unknown score is unknown (never 0.5)
    assert rank_average([[0.3, 0.3, 0.9, None]]) == [0.25, 0.25, 1.0, None]
    assert rank_average([[None, None]]) == [None, None]
    with pytest.raises(ValueError):
        rank_average([[0.1], [0.1, 0.2]])
    with pytest.raises(ValueError):
        rank_average([])


@given(st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=2, max_size=30))
def test_rank_average_is_bounded_and_order_preserving_for_one_column(rows):
    columns = [list(c) for c in zip(*rows)]
    combined = rank_average(columns)
    assert all(0.0 <= v <= 1.0 for v in combined)
    single = rank_average([columns[0]])
    for i in range(len(rows)):
        for j in range(len(rows)):
            if columns[0][i] < columns[0][j]:
                assert single[i] < single[j]


# Any float a client might report (NaN, infinities, positives, -0.0) and ints: the fast path
# for plain floats must give exactly what the per-token path gives.
_any_value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-30.0, max_value=1e-5),
    st.just(-0.0),
    st.integers(min_value=-5, max_value=1),
)


@given(st.lists(_any_value, min_size=1, max_size=12))
def test_plain_float_path_equals_the_token_path(values):
    from_values = compute_signals(values)
    from_tokens = compute_signals([TokenLogprob("t", float(v)) for v in values])
    assert repr(from_values) == repr(from_tokens)  # repr: NaN-safe and keeps -0.0 apart


def test_logprobs_whose_sum_overflows_are_invalid_not_a_crash():
    huge = -8.98846567431158e307  # finite, but two of them overflow a float sum
    assert compute_signals([huge, huge]).unknown_reason == "invalid_logprobs"
    assert compute_signals([TokenLogprob("a", huge)] * 2).unknown_reason == "invalid_logprobs"


@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(min_value=-30.0, max_value=1e-5), st.just(-0.0)),
                min_size=1, max_size=12))
def test_all_float_fast_path_equals_the_token_path(values):
    # Only floats: compute_signals takes its vectorised path (the routing hot path).
    from_values = compute_signals(values)
    from_tokens = compute_signals([TokenLogprob("t", v) for v in values])
    assert repr(from_values) == repr(from_tokens)
