"""Early exit must never change a decision it claims to know (property tests with hypothesis).

The reference is the real post-generation decision: ``decide_after_generation`` on
``compute_signals`` of the *complete* answer.
"""

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confidence_router.early_exit import early_exit_index, should_exit_early
from confidence_router.errors import RoutingConfigError
from confidence_router.extraction import TokenLogprob
from confidence_router.policy import RoutingPolicy, decide_after_generation
from confidence_router.signals import compute_signals, sigmoid

# Valid generated-token logprobs: finite, <= 0; include exact zeros and very negative values.
logprob = st.one_of(
    st.floats(min_value=-30.0, max_value=0.0, allow_nan=False, allow_infinity=False),
    st.just(0.0),
    st.floats(min_value=-1e-3, max_value=0.0),
)
answers = st.lists(logprob, min_size=1, max_size=60)
thresholds = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False), st.sampled_from([0.5, 0.7, 0.9])
)


def full_decision_escalates(signal: str, threshold: float, values: list[float]) -> bool:
    policy = RoutingPolicy(threshold=threshold, signal=signal)
    return decide_after_generation(policy, compute_signals(values)).escalate


@settings(max_examples=600, deadline=None)
@given(values=answers, threshold=thresholds)
def test_min_logprob_early_exit_is_identical_to_running_to_the_end(values, threshold):
    exit_at = early_exit_index("min_logprob", threshold, values)
    escalates = full_decision_escalates("min_logprob", threshold, values)
    if exit_at is not None:
        assert escalates  # an exit is only taken when the full answer would escalate
        # ... and it is the first token whose own score is below the threshold.
        scores = [sigmoid(2 * min(v, 0.0) + 3) for v in values]
        assert scores[exit_at - 1] < threshold
        assert all(s >= threshold - 1e-9 for s in scores[: exit_at - 1])
    else:
        # No exit: the answer is kept, or escalation hinges on a score within the float margin.
        assert not escalates or sigmoid(2 * min(values) + 3) >= threshold - 1e-9


@settings(max_examples=600, deadline=None)
@given(
    values=answers,
    threshold=thresholds,
    extra_cap=st.integers(min_value=0, max_value=40),
)
def test_mean_logprob_with_the_true_cap_never_changes_the_decision(values, threshold, extra_cap):
    cap = len(values) + extra_cap  # num_predict: the answer stopped at or before it
    exit_at = early_exit_index("mean_logprob", threshold, values, max_tokens=cap)
    if exit_at is not None:
        assert full_decision_escalates("mean_logprob", threshold, values)
        assert exit_at <= len(values)


@settings(max_examples=300, deadline=None)
@given(prefix=answers, threshold=thresholds, data=st.data())
def test_a_positive_decision_holds_for_every_continuation(prefix, threshold, data):
    # Once should_exit_early says yes (with the true remaining cap), no continuation within
    # the cap can end with "keep local", including the best one (all certain tokens).
    remaining = data.draw(st.integers(min_value=0, max_value=30))
    for signal in ("min_logprob", "mean_logprob"):
        if not should_exit_early(signal, threshold, prefix, max_remaining_tokens=remaining):
            continue
        best = prefix + [0.0] * remaining
        random_tail = data.draw(st.lists(logprob, max_size=remaining))
        assert full_decision_escalates(signal, threshold, best)
        assert full_decision_escalates(signal, threshold, prefix + random_tail)


def test_min_logprob_first_low_token_decides():
    # sigmoid(2 * -1.2 + 3) = 0.646 < 0.7, sigmoid(2 * -0.9 + 3) = 0.769 >= 0.7
    assert early_exit_index("min_logprob", 0.7, [-0.1, -0.9, -1.2, -0.1, -5.0]) == 3
    assert early_exit_index("min_logprob", 0.7, [-0.1, -0.9, -0.3]) is None
    assert should_exit_early("min_logprob", 0.7, [-0.1, -0.9, -1.2])
    assert not should_exit_early("min_logprob", 0.7, [-0.1, -0.9])


def test_mean_logprob_rule_uses_the_remaining_cap():
    values = [-1.0, -1.0]  # mean -1.0 scores sigmoid(1) = 0.731
    assert not should_exit_early("mean_logprob", 0.75, values)  # no cap: never
    # Even 0 more tokens cannot lift 0.731 to 0.75:
    assert should_exit_early("mean_logprob", 0.75, values, max_remaining_tokens=0)
    # Two certain tokens would lift the mean to -0.5 (score 0.881 >= 0.75): keep going.
    assert not should_exit_early("mean_logprob", 0.75, values, max_remaining_tokens=2)
    # A mean so low that even 10 certain tokens keep it below: -30 / 12 = -2.5 -> 0.12
    assert should_exit_early("mean_logprob", 0.7, [-15.0, -15.0], max_remaining_tokens=10)
    assert early_exit_index("mean_logprob", 0.7, [-15.0, -15.0, -0.1], max_tokens=12) == 1


def test_accepts_token_objects_and_wire_entries():
    @dataclass
    class Generated:
        text: str
        logprob: float

    tokens = [TokenLogprob(" Paris", -0.05), {"token": "!", "logprob": -4.0}]
    assert should_exit_early("min_logprob", 0.7, tokens)
    assert not should_exit_early("min_logprob", 0.7, [Generated(" Paris", -0.05)])
    with pytest.raises(TypeError, match="logprob"):
        should_exit_early("min_logprob", 0.7, [{"token": "x"}])
    with pytest.raises(TypeError, match="logprob"):
        should_exit_early("min_logprob", 0.7, ["-0.5"])


def test_unknown_signals_and_invalid_values_never_exit():
    low = [-10.0, -10.0]
    assert not should_exit_early("some_new_signal", 0.7, low, max_remaining_tokens=0)
    assert early_exit_index("some_new_signal", 0.99, low, max_tokens=2) is None
    assert not should_exit_early("min_logprob", 0.7, [])  # nothing generated yet
    # An invalid value makes the final confidence unknown (on_unknown decides), so no exit.
    for bad in (math.nan, -math.inf, 0.5):
        assert not should_exit_early("min_logprob", 0.7, [-10.0, bad])
    # So does a sum that overflows a float (compute_signals says invalid_logprobs).
    huge = [-8.98846567431158e307] * 2
    for signal in ("min_logprob", "mean_logprob", "mean_min"):
        assert not should_exit_early(signal, 0.7, huge, max_remaining_tokens=3)


def test_threshold_edges_agree_with_the_full_decision():
    values = [-40.0]  # score underflows towards 0
    assert not should_exit_early("min_logprob", 0.0, values)  # threshold 0 keeps everything
    assert not full_decision_escalates("min_logprob", 0.0, values)
    assert should_exit_early("min_logprob", 1.0, [0.0])  # sigmoid(3) = 0.95 < 1
    assert full_decision_escalates("min_logprob", 1.0, [0.0])


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(RoutingConfigError, match="threshold"):
        should_exit_early("min_logprob", math.nan, [-1.0])
    with pytest.raises(RoutingConfigError, match="threshold"):
        should_exit_early("min_logprob", "0.7", [-1.0])  # type: ignore[arg-type]
    with pytest.raises(RoutingConfigError, match="max_remaining_tokens"):
        should_exit_early("mean_logprob", 0.7, [-1.0], max_remaining_tokens=-1)
    with pytest.raises(RoutingConfigError, match="max_tokens"):
        early_exit_index("mean_logprob", 0.7, [-1.0, -1.0], max_tokens=1)


@settings(max_examples=200, deadline=None)
@given(values=answers, threshold=thresholds)
def test_no_cap_mean_never_exits(values, threshold):
    assert early_exit_index("mean_logprob", threshold, values) is None


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.lists(st.floats(-8.0, 0.0), min_size=1, max_size=12),
    rest=st.lists(st.floats(-8.0, 0.0), max_size=12),
    threshold=st.floats(0.05, 0.95),
    capped=st.booleans(),
)
def test_mean_min_bound_never_exits_on_an_answer_that_would_be_kept(prefix, rest, threshold,
                                                                    capped):
    """Sound: when the rule exits after ``prefix``, no continuation (within the cap) reaches
    the threshold."""
    from confidence_router.signals import compute_signals, score_for

    cap = len(rest) if capped else None
    if should_exit_early("mean_min", threshold, prefix, max_remaining_tokens=cap):
        final = score_for(compute_signals(prefix + rest), "mean_min")
        assert final < threshold


def test_early_exit_index_with_a_horizon_exits_earlier_than_with_the_cap():
    from confidence_router.errors import RoutingConfigError

    logprobs = [-1.5, -0.01, -0.01, -0.01, -0.01, -0.01]  # kept: mean -0.258 scores 0.92
    assert early_exit_index("mean_logprob", 0.7, logprobs, max_tokens=8) is None
    assert early_exit_index("mean_logprob", 0.7, logprobs, horizon=0) == 1  # a wrong guess
    with pytest.raises(RoutingConfigError, match="horizon"):
        early_exit_index("mean_logprob", 0.7, logprobs, horizon=-1)


# -- ExitTracker: the same rule at a constant cost per token ------------------------------------

_any_value = st.one_of(
    logprob,
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1e-7, -8.98846567431158e307, -1e308]),
)


@settings(max_examples=400, deadline=None)
@given(
    values=st.lists(_any_value, min_size=0, max_size=30),
    threshold=thresholds,
    signal=st.sampled_from(["min_logprob", "mean_logprob", "mean_min", "sum_logprob", "sum_min",
                            "some_new_signal"]),
    cap_extra=st.one_of(st.none(), st.integers(min_value=-3, max_value=10)),
    chunk=st.integers(min_value=1, max_value=4),
)
def test_exit_tracker_agrees_with_should_exit_early_after_every_chunk(
    values, threshold, signal, cap_extra, chunk
):
    from confidence_router.early_exit import ExitTracker

    cap = None if cap_extra is None else max(len(values) + cap_extra, 0)
    tracker = ExitTracker(signal, threshold, max_tokens=cap)
    assert tracker.should_exit() is False
    for end in range(chunk, len(values) + chunk, chunk):
        seen = values[:end]
        remaining = None if cap is None else max(cap - len(seen), 0)
        got = tracker.add(values[end - chunk:end])
        assert got is should_exit_early(signal, threshold, seen, max_remaining_tokens=remaining)
        assert tracker.count == len(seen)


def test_exit_tracker_reads_token_objects_and_refuses_bad_arguments():
    from confidence_router.early_exit import ExitTracker

    tracker = ExitTracker("sum_logprob", 0.5)
    assert tracker.add([TokenLogprob(" a", -0.1), {"token": "b", "logprob": -0.2}]) is False
    assert tracker.add([{"token": "c", "logprob": -1.0}]) is True  # exp(-1.3) = 0.27
    with pytest.raises(TypeError, match="logprob"):
        tracker.add([{"token": "x"}])
    with pytest.raises(RoutingConfigError, match="threshold"):
        ExitTracker("min_logprob", math.nan)
    with pytest.raises(RoutingConfigError, match="max_tokens"):
        ExitTracker("mean_logprob", 0.7, max_tokens=-1)
