import pytest

from confidence_router.errors import RoutingConfigError
from confidence_router.policy import (
    RoutingPolicy,
    decide_after_generation,
    decide_precheck,
)
from confidence_router.signals import compute_signals


def test_keep_at_or_above_threshold():
    # mean -1.076 is the 0.7 boundary; slightly above keeps, slightly below escalates.
    policy = RoutingPolicy(threshold=0.7)
    assert decide_after_generation(policy, compute_signals([-1.07])).reason == "confident"
    low = decide_after_generation(policy, compute_signals([-1.08]))
    assert low.escalate and low.reason == "low_confidence"
    assert low.score == pytest.approx(0.6988, abs=1e-3)


def test_min_signal_routes_on_worst_token():
    signals = compute_signals([-0.01, -0.01, -3.0])  # mean -1.0 (0.73) but min -3 (0.047)
    assert not decide_after_generation(RoutingPolicy(signal="mean_logprob"), signals).escalate
    assert decide_after_generation(RoutingPolicy(signal="min_logprob"), signals).escalate
    # The default, mean_min, averages the two: (0.728 + 0.047) / 2 = 0.39 < 0.7.
    default = decide_after_generation(RoutingPolicy(), signals)
    assert default.escalate and default.score == pytest.approx((0.7284 + 0.0474) / 2, abs=1e-3)


def test_default_signal_equals_the_papers_mean_when_tokens_are_equally_sure():
    signals = compute_signals([-0.4, -0.4, -0.4])
    default = decide_after_generation(RoutingPolicy(), signals)
    paper = decide_after_generation(RoutingPolicy(signal="mean_logprob"), signals)
    assert default == paper


def test_unknown_policy():
    unknown = compute_signals(None)
    d = decide_after_generation(RoutingPolicy(), unknown)
    assert d.escalate and d.reason == "confidence_unknown" and d.score is None
    d = decide_after_generation(RoutingPolicy(on_unknown="local"), unknown)
    assert not d.escalate and d.reason == "confidence_unknown"


def test_precheck():
    assert decide_precheck(RoutingPolicy(precheck_threshold=0.5), 0.49).reason == "precheck"
    assert not decide_precheck(RoutingPolicy(precheck_threshold=0.5), 0.5).escalate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.7"}, "threshold"),
        ({"precheck_threshold": -0.1}, "precheck_threshold"),
        ({"signal": "entropy"}, "signal"),
        ({"on_unknown": "ignore"}, "on_unknown"),
        ({"on_cloud_error": "retry"}, "on_cloud_error"),
        ({"allow_escalation": "no"}, "allow_escalation"),
    ],
)
def test_invalid_knobs(kwargs, match):
    with pytest.raises(RoutingConfigError, match=match):
        RoutingPolicy(**kwargs)


def test_overrides():
    p = RoutingPolicy().with_overrides({"threshold": 0.9})
    assert p.threshold == 0.9
    with pytest.raises(RoutingConfigError, match="unknown routing knob"):
        RoutingPolicy().with_overrides({"treshold": 0.9})
    assert isinstance(RoutingConfigError("x"), ValueError)
