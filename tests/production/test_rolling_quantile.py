"""RollingQuantileThreshold: quantile definition, window, unknowns, drift, concurrency, state."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confidence_router.calibration import (
    InvalidStateError,
    RollingQuantileThreshold,
    calibrate_threshold,
    write_json_atomic,
)


def filled(target: float, scores: list[float], **kwargs) -> RollingQuantileThreshold:
    rq = RollingQuantileThreshold(target, window=kwargs.pop("window", max(1, len(scores))),
                                  min_samples=kwargs.pop("min_samples", 1), **kwargs)  # fmt: skip
    for s in scores:
        rq.observe(s)
    return rq


# -- the quantile, by hand ------------------------------------------------------------------


def test_warm_up_uses_initial_threshold():
    rq = RollingQuantileThreshold(0.3, window=10, min_samples=3, initial_threshold=0.65)
    rq.observe(0.1)
    rq.observe(0.2)
    assert rq.threshold == 0.65 and not rq.ready
    rq.observe(0.9)
    # n=3, k=floor(0.9)=0 -> the smallest score; nothing escalated (0 <= 0.3 * 3).
    assert rq.ready and rq.threshold == 0.1


def test_hand_computed_quantile():
    scores = [0.9, 0.2, 0.6, 0.4, 0.8, 0.7, 0.3, 0.5]  # sorted: .2 .3 .4 .5 .6 .7 .8 .9
    assert filled(0.25, scores).threshold == 0.4  # k = 2 -> x[2]; 2/8 escalated
    assert filled(0.3, scores).threshold == 0.4  # k = floor(2.4) = 2
    assert filled(0.5, scores).threshold == 0.6  # k = 4
    assert filled(0.99, scores).threshold == 0.9  # k = 7 (never past the last score)
    assert filled(0.01, scores).threshold == 0.2  # k = 0: escalate nothing
    rq = filled(0.25, scores)
    assert rq.in_window_rate() == 0.25


def test_float_product_slack():
    # 0.29 * 100 = 28.999999999999996 must give k = 29, as in operating_points.
    rq = filled(0.29, [i / 100 for i in range(100)])
    assert rq.threshold == 0.29 and rq.in_window_rate() == 0.29


def test_ties_never_exceed_target():
    # sorted: 0.1 0.5 0.5 0.5 0.5 0.9 ; target 0.5 -> k = 3 -> x[3] = 0.5 -> only 0.1 escalated
    rq = filled(0.5, [0.5, 0.1, 0.5, 0.9, 0.5, 0.5])
    assert rq.threshold == 0.5
    assert rq.in_window_rate() == pytest.approx(1 / 6)


def test_window_evicts_oldest():
    rq = RollingQuantileThreshold(0.5, window=4, min_samples=1)
    for s in (0.1, 0.2, 0.3, 0.4):
        rq.observe(s)
    assert rq.threshold == 0.3  # k = 2 of [.1 .2 .3 .4]
    rq.observe(0.9)  # evicts 0.1 -> [.2 .3 .4 .9]
    rq.observe(0.8)  # evicts 0.2 -> [.3 .4 .8 .9]
    assert rq.n_known == 4
    assert rq.threshold == 0.8
    assert rq.state()["scores"] == [0.3, 0.4, 0.9, 0.8]


def test_duplicate_eviction_keeps_sorted_copy_consistent():
    rq = RollingQuantileThreshold(0.5, window=3, min_samples=1)
    for s in (0.5, 0.5, 0.2, 0.5, 0.7, 0.7, 0.1):
        rq.observe(s)
    state = rq.state()
    assert state["scores"] == [0.7, 0.7, 0.1]
    assert rq.threshold == 0.7  # sorted [.1 .7 .7], k = 1


def test_unknown_scores_are_counted_not_quantiled():
    rq = RollingQuantileThreshold(0.5, window=4, min_samples=2)
    rq.observe(None)
    rq.observe(0.2)
    rq.observe(None)
    rq.observe(0.8)
    assert rq.n_known == 2 and rq.n_unknown == 2
    assert rq.threshold == 0.8
    assert rq.unknown_rate == 0.5
    for s in (0.3, 0.4, 0.5, 0.6):  # the last 4 observations are all known
        rq.observe(s)
    assert rq.unknown_rate == 0.0 and rq.n_unknown == 2


def test_realised_rate_and_drift_from_actual_decisions():
    rq = RollingQuantileThreshold(0.25, window=4, min_samples=4, initial_threshold=0.5)
    for s in (0.1, 0.2, 0.6, 0.7):  # warm-up threshold 0.5: two escalated
        rq.observe(s)
    assert rq.realised_rate == 0.5
    assert rq.drift == pytest.approx(0.25)
    # Explicit decisions win over the recomputed comparison.
    rq.observe(0.9, escalated=True)  # window: .2 .6 .7 .9 with flags T F F T
    assert rq.realised_rate == 0.5
    rq.observe(0.95, escalated=False)
    rq.observe(0.97, escalated=False)
    assert rq.realised_rate == 0.25 and rq.drift == 0.0


def test_empty_readings_are_none():
    rq = RollingQuantileThreshold(0.3)
    assert rq.realised_rate is None and rq.drift is None
    assert rq.unknown_rate is None and rq.in_window_rate() is None
    snap = rq.snapshot()
    assert snap["threshold"] == 0.7 and snap["ready"] is False and snap["drift"] is None


def test_reset():
    rq = filled(0.5, [0.1, 0.2, 0.3])
    rq.observe(None)
    rq.reset()
    assert rq.n_known == 0 and rq.n_unknown == 0 and rq.threshold == 0.7


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"target_rate": 0.0}, ValueError),
        ({"target_rate": 1.0}, ValueError),
        ({"target_rate": float("nan")}, ValueError),
        ({"target_rate": True}, TypeError),
        ({"target_rate": "0.3"}, TypeError),
        ({"target_rate": 0.3, "window": 0}, ValueError),
        ({"target_rate": 0.3, "window": 2.5}, TypeError),
        ({"target_rate": 0.3, "window": 10, "min_samples": 11}, ValueError),
        ({"target_rate": 0.3, "initial_threshold": float("inf")}, ValueError),
    ],
)
def test_constructor_validation(kwargs, error):
    with pytest.raises(error):
        RollingQuantileThreshold(**kwargs)


def test_observe_validation():
    rq = RollingQuantileThreshold(0.3)
    with pytest.raises(ValueError, match="finite"):
        rq.observe(float("nan"))
    with pytest.raises(TypeError):
        rq.observe("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="escalated"):
        rq.observe(0.5, escalated=1)  # type: ignore[arg-type]
    assert rq.n_known == 0  # nothing recorded by a rejected call


# -- properties ----------------------------------------------------------------------------

targets = st.floats(min_value=0.01, max_value=0.99)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300, unique=True), targets)
def test_in_window_rate_on_continuous_data(scores, target):
    rq = filled(target, scores)
    n = len(scores)
    rate = rq.in_window_rate()
    assert target - 1 / n - 1e-9 < rate <= target + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8]), min_size=1, max_size=200),
    targets,
)
def test_in_window_rate_with_ties(scores, target):
    rq = filled(target, scores)
    n = len(scores)
    tie_share = scores.count(rq.threshold) / n
    rate = rq.in_window_rate()
    assert target - 1 / n - tie_share - 1e-9 < rate <= target + 1e-9


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200), targets, targets)
def test_threshold_monotone_in_target(scores, a, b):
    low, high = sorted((a, b))
    assert filled(low, scores).threshold <= filled(high, scores).threshold


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200), targets)
def test_agrees_with_offline_calibration(scores, target):
    # Same definition online and offline: the largest achievable rate not above the target.
    assert (
        filled(target, scores).threshold
        == calibrate_threshold(scores, target_rate=target).threshold
    )


def test_online_realised_rate_tracks_target_on_stationary_traffic():
    rng = random.Random(7)
    rq = RollingQuantileThreshold(0.3, window=500, min_samples=100)
    for _ in range(5000):
        rq.observe(rng.betavariate(5, 2))
    assert abs(rq.drift) < 0.06  # sampling noise of a 500-query window is about 0.02
    assert 0.3 - 1 / 500 < rq.in_window_rate() <= 0.3


def test_drift_shows_a_distribution_shift():
    rng = random.Random(1)
    rq = RollingQuantileThreshold(0.2, window=200, min_samples=50)
    for _ in range(400):
        rq.observe(rng.uniform(0.5, 1.0))
    # Out-of-distribution burst: much lower scores. The threshold lags, so the realised rate
    # overshoots before the window adapts.
    for _ in range(50):
        rq.observe(rng.uniform(0.0, 0.5))
    assert rq.drift > 0.1


# -- concurrency ---------------------------------------------------------------------------


def test_32_threads_observe_consistently():
    rq = RollingQuantileThreshold(0.3, window=256, min_samples=10)
    barrier = threading.Barrier(32)
    per_thread = 200

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for i in range(per_thread):
            rq.observe(None if i % 10 == 0 else rng.random())
            _ = rq.threshold

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = rq.state()
    assert state["n_known_total"] == 32 * 180 and state["n_unknown_total"] == 32 * 20
    assert len(state["scores"]) == 256
    # The sorted copy matches the arrival-order window exactly.
    rebuilt = RollingQuantileThreshold.from_state(state)
    assert rebuilt.threshold == rq.threshold
    assert rq.realised_rate == sum(state["escalated"]) / 256


async def test_asyncio_gather_observers():
    rq = RollingQuantileThreshold(0.5, window=1000, min_samples=1)

    async def worker(offset: int) -> None:
        for i in range(50):
            rq.observe((offset * 50 + i) / 1000)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(k) for k in range(20)))
    assert rq.n_known == 1000
    assert rq.threshold == 0.5  # k = 500 of 0.000 .. 0.999
    assert rq.in_window_rate() == 0.5


# -- persistence ---------------------------------------------------------------------------


def test_state_round_trip(tmp_path):
    rq = RollingQuantileThreshold(0.3, window=5, min_samples=2, initial_threshold=0.6)
    for s in (0.9, None, 0.1, 0.5, 0.5, None, 0.7, 0.2):
        rq.observe(s)
    path = tmp_path / "calib.json"
    rq.save(path)
    again = RollingQuantileThreshold.load(path)
    assert again.state() == rq.state()
    assert again.threshold == rq.threshold and again.drift == rq.drift
    assert json.loads(path.read_text())["kind"] == "confidence_router.RollingQuantileThreshold"
    assert [p.name for p in tmp_path.iterdir()] == ["calib.json"]  # no temp files left


def _good_state() -> dict:
    rq = filled(0.5, [0.1, 0.2, 0.3], window=4)
    rq.observe(None)
    return rq.state()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(kind="other"), "kind"),
        (lambda s: s.update(version=99), "version"),
        (lambda s: s.pop("scores"), "missing keys"),
        (lambda s: s.update(scores="0.1"), "must be a list"),
        (lambda s: s.update(scores=[0.1, "x", 0.3]), "number"),
        (lambda s: s.update(scores=[0.1, 0.2]), "same length"),
        (lambda s: s.update(escalated=[0, 1, 0]), "booleans"),
        (lambda s: s.update(target_rate=1.5), "target_rate"),
        (lambda s: s.update(window=2), "more than window"),
        (lambda s: s.update(n_known_total=1), "totals"),
        (lambda s: s.update(n_unknown_total=-1), "n_unknown_total"),
    ],
)
def test_from_state_rejects_bad_state(mutate, message):
    state = _good_state()
    mutate(state)
    with pytest.raises(InvalidStateError, match=message):
        RollingQuantileThreshold.from_state(state)


def test_from_state_rejects_non_mapping():
    with pytest.raises(InvalidStateError):
        RollingQuantileThreshold.from_state([1, 2])  # type: ignore[arg-type]
    assert issubclass(InvalidStateError, ValueError)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"kind": "confidence_router.RollingQuantileThreshold"}', "version"),
    ],
)
def test_load_corrupt_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidStateError, match=message) as info:
        RollingQuantileThreshold.load(path)
    assert "bad.json" in str(info.value)


def test_load_nan_score_in_file(tmp_path):
    state = _good_state()
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(state).replace("0.2", "NaN"))  # Python's json accepts NaN
    with pytest.raises(InvalidStateError, match="finite"):
        RollingQuantileThreshold.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        RollingQuantileThreshold.load(tmp_path / "nope.json")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})  # not valid JSON: refused
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_repr_mentions_threshold():
    assert "threshold=0.7" in repr(RollingQuantileThreshold(0.3))
    assert math.isfinite(RollingQuantileThreshold(0.3).threshold)
