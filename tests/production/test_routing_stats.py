"""RoutingStats: counters, costs and savings, drift, latency percentiles, concurrency."""

from __future__ import annotations

import asyncio
import threading

import pytest

from confidence_router.costs import PriceTable
from confidence_router.stats import RoutingStats, StatsSink, nearest_rank

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def record(
    decision="local",
    reason="confident",
    *,
    escalated=False,
    confidence=0.9,
    signals=True,
    total=0.5,
    local_usage=None,
    cloud_usage=None,
    **extra,
):
    """A routing record shaped like the router's ``_Trace.record``."""
    usage = {}
    if local_usage is not None:
        usage["local"] = local_usage
    if cloud_usage is not None:
        usage["cloud"] = cloud_usage
    return {
        "decision": decision,
        "reason": reason,
        "confidence": confidence,
        "threshold": 0.7,
        "signal": "mean_logprob",
        "signals": {"n_tokens": 3} if signals else None,
        "latency_s": {"local": total, "total": total},
        "usage": usage,
        "escalated": escalated,
        "would_escalate": escalated or extra.pop("would_escalate", False),
        "flagged": extra.pop("flagged", False),
        **extra,
    }


def test_is_a_stats_sink():
    assert isinstance(RoutingStats(), StatsSink)

    class Collector:
        def __init__(self):
            self.records = []

        def record(self, routing):
            self.records.append(routing)

    assert isinstance(Collector(), StatsSink)


def test_hand_computed_snapshot():
    stats = RoutingStats(target_rate=0.25)
    stats.record(record(total=0.1, cost_usd=0.0, all_cloud_cost_usd=0.002))
    stats.record(record(total=0.3, cost_usd=0.0, all_cloud_cost_usd=0.004))
    stats.record(
        record("cloud", "low_confidence", escalated=True, confidence=0.4, total=2.0,
               cost_usd=0.01, cloud_cost_usd=0.01, all_cloud_cost_usd=0.01)
    )  # fmt: skip
    stats.record(
        record("local", "confidence_unknown", confidence=None, flagged=True, would_escalate=True,
               total=0.2, cost_usd=0.0, all_cloud_cost_usd=None)
    )  # fmt: skip
    s = stats.snapshot()
    assert (s["calls"], s["local"], s["cloud"], s["escalated"]) == (4, 3, 1, 1)
    assert s["escalation_rate"] == 0.25
    assert s["by_reason"] == {"confident": 2, "low_confidence": 1, "confidence_unknown": 1}
    assert (s["flagged"], s["would_escalate"], s["unknown_confidence"]) == (1, 2, 1)
    assert s["cost_usd"] == pytest.approx(0.01) and s["cost_unknown_calls"] == 0
    assert s["cloud_cost_usd"] == pytest.approx(0.01)
    # Savings only over the 3 calls whose all-cloud cost is known: 0.016 vs 0.01 paid.
    assert s["all_cloud_cost_usd"] == pytest.approx(0.016) and s["savings_calls"] == 3
    assert s["savings_usd"] == pytest.approx(0.006)
    assert s["savings_rate"] == pytest.approx(0.375)
    assert (s["target_rate"], s["realised_rate"], s["drift"]) == (0.25, 0.25, 0.0)
    assert s["latency_s"]["local"] == {"n": 3, "p50": 0.2, "p95": 0.3}
    assert s["latency_s"]["cloud"] == {"n": 1, "p50": 2.0, "p95": 2.0}
    assert s["latency_s"]["all"] == {"n": 4, "p50": 0.2, "p95": 2.0}


def test_empty_snapshot_has_no_fake_zeros():
    s = RoutingStats().snapshot()
    assert s["calls"] == 0 and s["escalation_rate"] is None
    assert s["savings_usd"] is None and s["savings_rate"] is None
    assert s["all_cloud_cost_usd"] is None and s["realised_rate"] is None
    assert s["drift"] is None and s["latency_s"]["all"] == {"n": 0, "p50": None, "p95": None}


def test_unknown_cost_is_counted_not_zeroed():
    stats = RoutingStats()
    stats.record(record(cost_usd=None, all_cloud_cost_usd=0.5))
    stats.record(record(cost_usd=0.1, all_cloud_cost_usd=0.3))
    s = stats.snapshot()
    assert s["cost_unknown_calls"] == 1 and s["cost_usd"] == pytest.approx(0.1)
    assert s["savings_calls"] == 1 and s["savings_usd"] == pytest.approx(0.2)
    assert s["all_cloud_cost_usd"] == pytest.approx(0.8)


def test_errors_by_kind():
    stats = RoutingStats()
    stats.record(
        record("cloud", "local_error", escalated=True, signals=False, confidence=None,
               local_error="ResponseError: model not found")
    )  # fmt: skip
    stats.record(
        record("local", "cloud_error", escalated=True, flagged=True,
               cloud_error="ThrottlingException: Rate exceeded", cloud_error_kind="throttled")
    )  # fmt: skip
    stats.record(record(precheck={"error": "TimeoutError: probe"}))
    s = stats.snapshot()
    assert s["errors"] == {
        "local:ResponseError": 1,
        "cloud:throttled": 1,
        "precheck:TimeoutError": 1,
    }
    # A local failure has no scored local answer: not an "unknown confidence".
    assert s["unknown_confidence"] == 0
    assert s["escalated"] == 2 and s["cloud"] == 1 and s["local"] == 2


def test_tokens_are_summed():
    stats = RoutingStats()
    stats.record(record(local_usage={"input_tokens": 10, "output_tokens": 3}))
    stats.record(
        record("cloud", escalated=True, local_usage={"input_tokens": 5, "output_tokens": 2},
               cloud_usage={"input_tokens": 7, "output_tokens": 9})
    )  # fmt: skip
    assert stats.snapshot()["tokens"] == {
        "local": {"input": 15, "output": 5},
        "cloud": {"input": 7, "output": 9},
    }


def test_costs_computed_from_prices_when_record_has_none():
    stats = RoutingStats(prices=PriceTable(), cloud_model=SONNET)
    stats.record(record(local_usage={"input_tokens": 100, "output_tokens": 20}))
    stats.record(
        record("cloud", "low_confidence", escalated=True,
               local_usage={"input_tokens": 100, "output_tokens": 20},
               cloud_usage={"input_tokens": 100, "output_tokens": 40})
    )  # fmt: skip
    s = stats.snapshot()
    cloud = 100 * 3e-6 + 40 * 15e-6  # 0.0009
    estimate = 100 * 3e-6 + 20 * 15e-6  # 0.0006, the kept query priced at cloud rates
    assert s["cost_usd"] == pytest.approx(cloud)
    assert s["all_cloud_cost_usd"] == pytest.approx(cloud + estimate)
    assert s["all_cloud_estimated_calls"] == 1
    assert s["savings_rate"] == pytest.approx(estimate / (cloud + estimate))


def test_realised_rate_uses_a_rolling_window():
    stats = RoutingStats(target_rate=0.5, window=4)
    for escalated in (True, True, True, True, False, False):
        stats.record(record(escalated=escalated))
    s = stats.snapshot()
    assert s["escalation_rate"] == pytest.approx(4 / 6)  # lifetime
    assert s["realised_rate"] == 0.5 and s["drift"] == 0.0  # last 4: T T F F


def test_latency_window_is_bounded():
    stats = RoutingStats(latency_window=3)
    for total in (9.0, 9.0, 1.0, 2.0, 3.0):
        stats.record(record(total=total))
    assert stats.snapshot()["latency_s"]["local"] == {"n": 3, "p50": 2.0, "p95": 3.0}


def test_tolerates_sparse_records_and_rejects_non_mappings():
    stats = RoutingStats()
    stats.record({})
    stats.record({"decision": "cloud", "latency_s": {"total": float("nan")}, "usage": None})
    s = stats.snapshot()
    assert s["calls"] == 2 and s["cloud"] == 1 and s["by_reason"] == {"None": 2}
    assert s["latency_s"]["all"]["n"] == 0 and s["cost_unknown_calls"] == 2
    with pytest.raises(TypeError):
        stats.record([("decision", "local")])  # type: ignore[arg-type]


def test_reset():
    stats = RoutingStats(target_rate=0.3)
    stats.record(record(escalated=True, cost_usd=1.0))
    stats.reset()
    s = stats.snapshot()
    assert s["calls"] == 0 and s["cost_usd"] == 0.0 and s["target_rate"] == 0.3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"target_rate": 1.5}, ValueError),
        ({"target_rate": "0.3"}, TypeError),
        ({"window": 0}, ValueError),
        ({"latency_window": 1.0}, TypeError),
    ],
)
def test_validation(kwargs, error):
    with pytest.raises(error):
        RoutingStats(**kwargs)


def test_nearest_rank():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert nearest_rank(values, 0.5) == 10.0  # rank ceil(10) = 10
    assert nearest_rank(values, 0.95) == 19.0  # rank ceil(19) = 19
    assert nearest_rank([5.0], 0.95) == 5.0 and nearest_rank([], 0.5) is None
    assert nearest_rank(values, 0.0) == 1.0


# -- concurrency ---------------------------------------------------------------------------


def test_32_threads_hammering():
    stats = RoutingStats(target_rate=0.5, window=100_000)
    per_thread = 500
    barrier = threading.Barrier(32)

    def worker(index: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            escalated = (i + index) % 2 == 0
            stats.record(
                record("cloud" if escalated else "local", escalated=escalated, total=0.001 * i,
                       cost_usd=0.001 if escalated else 0.0, all_cloud_cost_usd=0.001,
                       local_usage={"input_tokens": 1, "output_tokens": 1})
            )  # fmt: skip
            if i % 50 == 0:
                stats.snapshot()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = stats.snapshot()
    total = 32 * per_thread
    assert s["calls"] == total and s["escalated"] == total // 2
    assert s["local"] + s["cloud"] == total
    assert s["tokens"]["local"] == {"input": total, "output": total}
    assert s["cost_usd"] == pytest.approx(0.001 * total / 2)
    assert s["savings_rate"] == pytest.approx(0.5)
    assert s["realised_rate"] == 0.5 and s["drift"] == 0.0
    assert s["latency_s"]["all"]["n"] == 1000  # bounded window


async def test_asyncio_gather_records():
    stats = RoutingStats()

    async def worker(index: int) -> None:
        for i in range(100):
            stats.record(record(escalated=i % 4 == 0, reason=f"r{index % 3}"))
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(k) for k in range(30)))
    s = stats.snapshot()
    assert s["calls"] == 3000 and s["escalated"] == 750
    assert s["by_reason"] == {"r0": 1000, "r1": 1000, "r2": 1000}
