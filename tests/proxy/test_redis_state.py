"""Redis-backed budget, stats and calibrator against a real redis-server process."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time

import pytest

from confidence_router.budget import CloudBudget, ReservationStateError
from confidence_router.calibration import RollingQuantileThreshold
from confidence_router.errors import BudgetExceededError, RoutingConfigError
from confidence_router.redis_state import (
    RedisCloudBudget,
    RedisRollingQuantileThreshold,
    RedisRoutingStats,
    redis_client,
)
from confidence_router.stats import RoutingStats

# -- budget ----------------------------------------------------------------------------------


def test_budget_reserve_commit_release(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=0.01, window_s=3600)
    r = budget.reserve(0.004)
    assert r is not None and budget.reserved == pytest.approx(0.004)
    r.commit(0.0031)
    assert budget.spent == pytest.approx(0.0031) and budget.reserved == 0
    assert budget.reserve(0.007) is None  # 0.0031 + 0.007 > 0.01
    released = budget.reserve(0.006)
    released.release()
    assert budget.remaining == pytest.approx(0.0069)
    with pytest.raises(ReservationStateError):
        released.commit()
    with pytest.raises(ReservationStateError):
        r.release()
    with pytest.raises(BudgetExceededError):
        budget.hold(0.5)
    snap = budget.snapshot()
    assert (snap["granted"], snap["denied"], snap["pending"]) == (2, 2, 0)
    assert snap["spent_usd"] == pytest.approx(0.0031)


def test_budget_is_exact_in_decimal_amounts(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=1.0)
    granted = [budget.reserve(0.1) for _ in range(11)]
    assert sum(r is not None for r in granted) == 10  # never an 11th through round-off


def test_budget_overrun_and_context_manager(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=1.0)
    with budget.hold(0.2) as r:
        r.commit(0.5)
    assert budget.snapshot()["overruns"] == 1
    assert budget.snapshot()["overrun_usd"] == pytest.approx(0.3)
    with pytest.raises(RuntimeError), budget.hold(0.2):
        raise RuntimeError("cloud failed")
    assert budget.spent == pytest.approx(0.5) and budget.reserved == 0


def test_budget_window_expires_spend(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=1.0, window_s=0.3)
    budget.reserve(1.0).commit()
    assert budget.reserve(0.1) is None
    time.sleep(0.4)
    assert budget.spent == 0 and budget.reserve(0.1) is not None


def test_abandoned_reservation_is_charged_after_its_lease(redis_url):
    client = redis_client(redis_url)
    crashed = RedisCloudBudget(client, max_usd=1.0, lease_s=0.3)
    assert crashed.reserve(1.0) is not None  # the worker "dies" without settling
    other = RedisCloudBudget(client, max_usd=1.0)
    assert other.reserve(0.5) is None
    time.sleep(0.4)
    # Its call may have been billed: the lease's amount becomes spend, it is not freed.
    assert other.reserve(0.5) is None
    snapshot = other.snapshot()
    assert snapshot["expired"] == 1 and snapshot["pending"] == 0
    assert snapshot["spent_usd"] == pytest.approx(1.0) and snapshot["reserved_usd"] == 0


def test_budget_prefixes_are_isolated(redis_url):
    client = redis_client(redis_url)
    a = RedisCloudBudget(client, max_usd=1.0, prefix="prod")
    b = RedisCloudBudget(client, max_usd=1.0, prefix="staging")
    a.reserve(1.0).commit()
    assert a.reserve(0.1) is None and b.reserve(0.1) is not None
    assert any(k.startswith("prod:budget:default:") for k in client.keys("*"))
    with pytest.raises(RoutingConfigError):
        RedisCloudBudget(client, 1.0, prefix="has space")


def test_budget_cap_is_exact_under_thread_concurrency(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=0.37)
    granted: list[object] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            r = budget.reserve(0.01)
            if r is not None:
                with lock:
                    granted.append(r)
                r.commit(0.01 if random.random() < 0.5 else 0.007)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = budget.snapshot()
    assert snap["spent_usd"] <= 0.37 + 1e-12
    assert snap["granted"] == len(granted) and snap["granted"] + snap["denied"] == 200
    assert snap["pending"] == 0


def _reserve_in_process(url: str, n: int, queue) -> None:
    budget = RedisCloudBudget(redis_client(url), max_usd=0.5)
    count = 0
    for _ in range(n):
        r = budget.reserve(0.01)
        if r is not None:
            count += 1
            r.commit()
    queue.put(count)


def test_budget_cap_holds_exactly_across_processes(redis_url):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_reserve_in_process, args=(redis_url, 40, queue))
                 for _ in range(4)]
    for p in processes:
        p.start()
    counts = [queue.get(timeout=60) for _ in processes]
    for p in processes:
        p.join(timeout=60)
    assert sum(counts) == 50  # 160 attempts, exactly 0.50 / 0.01 granted
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=0.5)
    assert budget.spent == pytest.approx(0.5) and budget.snapshot()["granted"] == 50


def test_redis_budget_matches_in_process_budget(redis_url):
    local = CloudBudget(max_usd=0.05)
    shared = RedisCloudBudget(redis_client(redis_url), max_usd=0.05)
    rng = random.Random(7)
    for _ in range(60):
        amount = round(rng.uniform(0, 0.01), 6)
        actual = round(amount * rng.uniform(0.5, 1.0), 6)
        a, b = local.reserve(amount), shared.reserve(amount)
        assert (a is None) == (b is None)
        if a is not None:
            a.commit(actual)
            b.commit(actual)
    assert shared.spent == pytest.approx(local.spent, abs=1e-8)


# -- stats -----------------------------------------------------------------------------------

RECORDS = [
    {"decision": "local", "reason": "confident", "escalated": False, "confidence": 0.9,
     "signals": {}, "latency_s": {"total": 0.2}, "usage": {"local": {"input_tokens": 10,
     "output_tokens": 3}}, "cost_usd": 0.0, "all_cloud_cost_usd": 0.004},
    {"decision": "cloud", "reason": "low_confidence", "escalated": True, "confidence": 0.3,
     "signals": {}, "latency_s": {"total": 1.5}, "cost_usd": 0.005, "cloud_cost_usd": 0.005,
     "all_cloud_cost_usd": 0.005, "usage": {"cloud": {"input_tokens": 12, "output_tokens": 4}}},
    {"decision": "local", "reason": "confidence_unknown", "escalated": False, "confidence": None,
     "signals": {"n_tokens": 0}, "flagged": True, "latency_s": {"total": 0.1}},
    {"decision": "cloud", "reason": "local_error", "escalated": True, "local_error": "X: y",
     "local_error_kind": "timeout", "latency_s": {"total": 2.0}, "cost_usd": 0.002},
]


def test_stats_across_instances_equal_the_in_process_counts(redis_url):
    client = redis_client(redis_url)
    workers = [RedisRoutingStats(client, target_rate=0.5, prefix="p") for _ in range(3)]
    reference = RoutingStats(target_rate=0.5)
    for i in range(40):
        record = RECORDS[i % len(RECORDS)]
        workers[i % 3].record(record)
        reference.record(record)
    shared, expected = workers[0].snapshot(), reference.snapshot()
    assert shared.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert shared[key] == pytest.approx(value), key
        else:
            assert shared[key] == value, key
    workers[1].reset()
    assert workers[2].snapshot()["calls"] == 0


def test_stats_records_concurrently_without_losing_any(redis_url):
    client = redis_client(redis_url)
    stats = RedisRoutingStats(client)

    def worker() -> None:
        for i in range(50):
            stats.record(RECORDS[i % 2])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["calls"] == 300 and snap["local"] == 150 and snap["escalated"] == 150
    assert snap["cost_usd"] == pytest.approx(150 * 0.005)


# -- calibrator ------------------------------------------------------------------------------


def test_calibrator_matches_the_in_process_one(redis_url):
    client = redis_client(redis_url)
    shared = [RedisRollingQuantileThreshold(client, 0.3, window=50, min_samples=10)
              for _ in range(2)]
    reference = RollingQuantileThreshold(0.3, window=50, min_samples=10)
    rng = random.Random(3)
    for i in range(200):
        score = None if rng.random() < 0.1 else rng.random()
        escalated = None if i % 3 else rng.random() < 0.5
        shared[i % 2].observe(score, escalated=escalated)
        reference.observe(score, escalated=escalated)
        assert shared[(i + 1) % 2].threshold == reference.threshold
    assert shared[0].snapshot() == pytest.approx(reference.snapshot())
    assert shared[1].in_window_rate(0.5) == reference.in_window_rate(0.5)
    assert shared[1].in_window_rate() == reference.in_window_rate()
    assert shared[0].n_unknown == reference.n_unknown
    with pytest.raises(ValueError):
        shared[0].observe(float("nan"))
    with pytest.raises(ValueError):
        RedisRollingQuantileThreshold(client, 1.5)


def test_calibrator_keeps_full_precision(redis_url):
    calibrator = RedisRollingQuantileThreshold(redis_client(redis_url), 0.5, window=4,
                                               min_samples=1)
    value = 0.12345678901234567
    calibrator.observe(value)
    assert calibrator.threshold == value
    assert calibrator.in_window_rate(value) == 0.0


def test_router_with_redis_state_shared_by_two_routers(redis_url, ollama_chat, bedrock_chat,
                                                       ollama_backend, bedrock_server):
    """Two routers (as in two workers) share one budget: the cap admits exactly K calls."""
    from confidence_router import ConfidenceRoutedLLM

    ollama_backend.add_answer("question", " unsure", logprobs=-3.0)
    bedrock_server.add_answer("question", "cloud", input_tokens=10, output_tokens=10)
    client = redis_client(redis_url)
    # What one escalation reserves (every question has the same length): measured, not guessed.
    probe = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=100),
                                budget=CloudBudget(max_usd=1.0))
    measured = probe.invoke("question 0").response_metadata["routing"]
    estimate, actual = measured["budget_reserved_usd"], measured["cloud_cost_usd"]
    assert 0 < actual < estimate
    bedrock_server.clear_requests()
    # Sequential calls: the k-th escalation fits iff k * actual + estimate <= cap: k = 0..3.
    cap = estimate + 3.5 * actual

    def router() -> ConfidenceRoutedLLM:
        return ConfidenceRoutedLLM(
            local=ollama_chat(), cloud=bedrock_chat(max_tokens=100),
            budget=RedisCloudBudget(client, max_usd=cap),
            stats=RedisRoutingStats(client),
        )

    a, b = router(), router()
    decisions = [(a if i % 2 else b).invoke(f"question {i}").response_metadata["routing"]
                 for i in range(10)]
    escalated = [d for d in decisions if d["decision"] == "cloud"]
    assert len(escalated) == 4 == len(bedrock_server.requests)
    assert sum(d["reason"] == "budget_exceeded" for d in decisions) == 6
    stats = RedisRoutingStats(client).snapshot()
    assert stats["calls"] == 10 and stats["cloud"] == 4
