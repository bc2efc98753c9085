"""CloudBudget: reservations, rolling window, exactness under 32 threads and asyncio, state."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
from fractions import Fraction

import pytest

from confidence_router.budget import (
    BudgetLike,
    CloudBudget,
    Reservation,
    ReservationLike,
    ReservationStateError,
    estimate_escalation_cost,
    estimate_tokens,
)
from confidence_router.calibration import InvalidStateError
from confidence_router.costs import Price
from confidence_router.errors import BudgetExceededError, ConfidenceRouterError


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_reserve_commit_release_hand_computed():
    budget = CloudBudget(1.0, window_s=60, clock=FakeClock())
    r1 = budget.reserve(0.4)
    r2 = budget.reserve(0.4)
    assert r1 is not None and r2 is not None
    assert budget.reserve(0.3) is None  # 0.8 reserved + 0.3 > 1.0
    assert budget.reserved == pytest.approx(0.8) and budget.remaining == pytest.approx(0.2)
    r1.commit(0.25)  # actual below the estimate frees the difference
    r2.release()
    assert budget.spent == 0.25 and budget.reserved == 0.0 and budget.remaining == 0.75
    assert (r1.state, r2.state) == ("committed", "released")
    snap = budget.snapshot()
    assert (snap["granted"], snap["denied"], snap["pending"]) == (2, 1, 0)


def test_exact_decimal_arithmetic():
    budget = CloudBudget(1.0)
    granted = 0
    while (r := budget.reserve(0.1)) is not None:
        r.commit()
        granted += 1
    assert granted == 10  # float sums would stop at 9 or let an 11th through
    assert budget.spent == 1.0 and budget.remaining == 0.0
    assert budget.reserve(0.0) is not None  # a free call always fits


def test_rolling_window_expiry():
    clock = FakeClock(0.0)
    budget = CloudBudget(1.0, window_s=100, clock=clock)
    budget.reserve(0.6).commit()
    clock.now = 50.0
    budget.reserve(0.4).commit()
    assert budget.reserve(0.01) is None
    clock.now = 99.9
    assert budget.spent == 1.0
    clock.now = 100.0  # the first commit is exactly window_s old: expired
    assert budget.spent == pytest.approx(0.4)
    assert budget.reserve(0.6) is not None
    clock.now = 150.0
    assert budget.spent == 0.0


def test_rolling_window_never_allows_more_than_max_in_any_span():
    clock = FakeClock(0.0)
    budget = CloudBudget(1.0, window_s=10, clock=clock)
    commits = []
    rng = random.Random(5)
    for _ in range(2000):
        clock.now += rng.uniform(0, 0.5)
        cost = round(rng.uniform(0.01, 0.3), 3)
        r = budget.reserve(cost)
        if r is not None:
            r.commit()
            commits.append((clock.now, Fraction(str(cost))))
    for start, _ in commits:
        in_span = sum(a for t, a in commits if start <= t < start + 10)
        assert in_span <= 1


def test_hold_raises_budget_exceeded():
    budget = CloudBudget(0.5, window_s=3600)
    budget.hold(0.4).commit()
    with pytest.raises(BudgetExceededError) as info:
        budget.hold(0.2)
    error = info.value
    assert isinstance(error, ConfidenceRouterError)
    assert error.requested_usd == 0.2 and error.remaining_usd == pytest.approx(0.1)
    assert (error.max_usd, error.window_s) == (0.5, 3600)
    assert "cloud budget exceeded" in str(error)


def test_context_manager():
    budget = CloudBudget(1.0)
    with budget.hold(0.3) as r:
        assert isinstance(r, Reservation) and r.state == "pending"
    assert r.state == "committed" and budget.spent == pytest.approx(0.3)  # default: estimate
    with pytest.raises(RuntimeError, match="cloud down"), budget.hold(0.3) as r2:
        raise RuntimeError("cloud down")
    assert r2.state == "released" and budget.spent == pytest.approx(0.3)
    with budget.hold(0.3) as r3:
        r3.commit(0.1)  # explicit settle inside the block wins
    assert budget.spent == pytest.approx(0.4)


def test_settling_twice_is_an_error():
    budget = CloudBudget(1.0)
    r = budget.reserve(0.2)
    r.commit()
    with pytest.raises(ReservationStateError, match="already committed"):
        r.release()
    with pytest.raises(ReservationStateError):
        r.commit()
    assert budget.spent == pytest.approx(0.2) and budget.reserved == 0.0


def test_invalid_commit_leaves_reservation_pending():
    budget = CloudBudget(1.0)
    r = budget.reserve(0.2)
    with pytest.raises(ValueError):
        r.commit(-0.1)
    assert r.state == "pending" and budget.reserved == pytest.approx(0.2)
    r.release()


def test_overrun_is_recorded_in_full():
    budget = CloudBudget(1.0)
    budget.reserve(0.5).commit(1.2)  # the estimate was too low: the money is spent anyway
    snap = budget.snapshot()
    assert snap["spent_usd"] == 1.2 and snap["remaining_usd"] == 0.0
    assert snap["overruns"] == 1 and snap["overrun_usd"] == pytest.approx(0.7)
    assert budget.reserve(0.0) is None  # over the cap: nothing fits until it expires


def test_record_spend_without_reservation():
    budget = CloudBudget(1.0)
    budget.record_spend(0.7)
    assert budget.reserve(0.4) is None and budget.reserve(0.3) is not None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_usd": -1.0}, ValueError),
        ({"max_usd": float("inf")}, ValueError),
        ({"max_usd": "10"}, TypeError),
        ({"max_usd": 1.0, "window_s": 0}, ValueError),
        ({"max_usd": 1.0, "window_s": True}, TypeError),
    ],
)
def test_constructor_validation(kwargs, error):
    with pytest.raises(error):
        CloudBudget(**kwargs)


@pytest.mark.parametrize(("value", "error"), [(-0.1, ValueError), (float("nan"), ValueError),
                                              (None, TypeError), (True, TypeError)])  # fmt: skip
def test_reserve_validation(value, error):
    with pytest.raises(error):
        CloudBudget(1.0).reserve(value)


def test_protocols():
    budget = CloudBudget(1.0)
    assert isinstance(budget, BudgetLike)
    assert isinstance(budget.reserve(0.1), ReservationLike)


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize(("max_usd", "cost"), [(1.0, 0.03), (10.0, 0.0041), (0.5, 0.5), (2.0, 3.0)])
def test_32_threads_equal_costs_exact(max_usd, cost):
    budget = CloudBudget(max_usd, window_s=3600)
    barrier = threading.Barrier(32)
    granted = []
    committed = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        while True:
            r = budget.reserve(cost)
            if r is None:
                return
            with lock:
                granted.append(r)
            r.commit(cost)
            with lock:
                committed.append(cost)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = math.floor(Fraction(str(max_usd)) / Fraction(str(cost)))
    assert len(granted) == expected
    assert sum(Fraction(str(c)) for c in committed) <= Fraction(str(max_usd))
    assert budget.snapshot()["pending"] == 0


def test_32_threads_mixed_costs_commit_and_release_never_exceed():
    budget = CloudBudget(5.0, window_s=3600)
    barrier = threading.Barrier(33)
    violations = []
    done = threading.Event()
    committed: list[Fraction] = []
    lock = threading.Lock()

    def monitor() -> None:
        barrier.wait()
        while not done.is_set():
            snap = budget.snapshot()
            if snap["spent_usd"] + snap["reserved_usd"] > 5.0 + 1e-12:
                violations.append(snap)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(300):
            estimate = round(rng.uniform(0.001, 0.05), 4)
            r = budget.reserve(estimate)
            if r is None:
                continue
            if rng.random() < 0.3:
                r.release()  # the cloud call failed: not billed
            else:
                actual = round(rng.uniform(0, estimate), 4)
                r.commit(actual)
                with lock:
                    committed.append(Fraction(str(actual)))

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not violations
    assert sum(committed) <= 5
    assert budget.spent == float(sum(committed))
    assert budget.reserved == 0.0


async def test_asyncio_gather_equal_costs_exact():
    budget = CloudBudget(1.0, window_s=3600)
    granted = 0

    async def escalation() -> None:
        nonlocal granted
        r = budget.reserve(0.07)
        if r is None:
            return
        granted += 1
        await asyncio.sleep(0)  # the cloud call: others interleave here
        r.commit()

    await asyncio.gather(*(escalation() for _ in range(100)))
    assert granted == 14  # floor(1.0 / 0.07)
    assert budget.spent == pytest.approx(0.98)


# -- persistence ---------------------------------------------------------------------------


def test_state_round_trip_ages_entries(tmp_path):
    clock = FakeClock(500.0)
    wall = FakeClock(1_700_000_000.0)
    budget = CloudBudget(1.0, window_s=100, clock=clock)
    budget.reserve(0.3).commit()  # at t=500
    clock.now = 560.0
    budget.reserve(0.2).commit(0.15)  # at t=560
    pending = budget.reserve(0.1)  # saved as spent (conservative)
    state = budget.state(wall_clock=wall)
    assert state["entries"] == [[60.0, "3/10"], [0.0, "3/20"], [0.0, "1/10"]]
    assert pending is not None

    wall.now += 30  # 30 s pass before the restart
    new_clock = FakeClock(7.0)  # another process: another monotonic origin
    again = CloudBudget.from_state(state, clock=new_clock, wall_clock=wall)
    assert again.spent == pytest.approx(0.55) and again.max_usd == 1.0
    new_clock.now += 10  # the 0.3 entry is now 60 + 30 + 10 = 100 s old: expired
    assert again.spent == pytest.approx(0.25)

    wall.now += 1000
    assert CloudBudget.from_state(state, wall_clock=wall).spent == 0.0  # all expired


def test_save_load_and_overrides(tmp_path):
    budget = CloudBudget(2.0, window_s=3600)
    budget.reserve(0.5).commit()
    path = tmp_path / "budget.json"
    budget.save(path)
    assert json.loads(path.read_text())["kind"] == "confidence_router.CloudBudget"
    again = CloudBudget.load(path)
    assert again.max_usd == 2.0 and again.spent == 0.5
    smaller = CloudBudget.load(path, max_usd=0.6, window_s=7200)
    assert (smaller.max_usd, smaller.window_s) == (0.6, 7200)
    assert smaller.reserve(0.2) is None and smaller.reserve(0.1) is not None


def _state() -> dict:
    budget = CloudBudget(1.0)
    budget.reserve(0.1).commit()
    return budget.state()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(kind="x"), "kind"),
        (lambda s: s.update(version=2), "version"),
        (lambda s: s.pop("entries"), "missing keys"),
        (lambda s: s.update(max_usd=1.0), "fraction string"),
        (lambda s: s.update(max_usd="-1"), ">= 0"),
        (lambda s: s.update(max_usd="abc"), "Invalid literal"),
        (lambda s: s.update(window_s=-5), "window_s"),
        (lambda s: s.update(entries={}), "must be a list"),
        (lambda s: s.update(entries=[[1.0]]), "age_s"),
        (lambda s: s.update(entries=[[-1.0, "1/10"]]), "age"),
        (lambda s: s.update(entries=[[1.0, "1/0"]]), "invalid CloudBudget state"),
        (lambda s: s.update(entries=[[1.0, "-1/10"]]), "amount"),
        (lambda s: s.update(saved_at_unix="now"), "saved_at_unix"),
    ],
)
def test_from_state_rejects_bad_state(mutate, message):
    state = _state()
    mutate(state)
    with pytest.raises(InvalidStateError, match=message):
        CloudBudget.from_state(state)


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "budget.json"
    path.write_text("{truncated")
    with pytest.raises(InvalidStateError, match="budget.json"):
        CloudBudget.load(path)
    path.write_text('{"kind": "confidence_router.RollingQuantileThreshold", "version": 1}')
    with pytest.raises(InvalidStateError, match="not a CloudBudget state"):
        CloudBudget.load(path)


# -- estimation ----------------------------------------------------------------------------


def test_estimate_tokens():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens(["ab", "cd", "e"]) == 2
    assert estimate_tokens(10, chars_per_token=2.0) == 5
    with pytest.raises(ValueError):
        estimate_tokens(-1)
    with pytest.raises(ValueError):
        estimate_tokens("x", chars_per_token=0)
    with pytest.raises(TypeError):
        estimate_tokens(3.5)  # type: ignore[arg-type]


def test_estimate_escalation_cost_hand_computed():
    sonnet = Price(3.0, 15.0)
    # 4000 chars -> 1000 input tokens; 512 output tokens: 0.003 + 0.00768
    assert estimate_escalation_cost("x" * 4000, 512, sonnet) == pytest.approx(0.01068)
    # conservative 2 chars/token doubles the input share
    assert estimate_escalation_cost(4000, 512, sonnet, chars_per_token=2) == pytest.approx(0.01368)
    with pytest.raises(TypeError, match="unknown model"):
        estimate_escalation_cost("x", 10, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        estimate_escalation_cost("x", -1, sonnet)
