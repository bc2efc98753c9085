"""The spending cap on a shared Redis, attacked: two routers (two workers) from many threads
against one cap, workers that die holding a reservation, a lease shorter than the cloud call,
and Redis going away or hanging before and during an escalation.

A real redis-server (started by the fixtures on a free loopback port) and the fake Bedrock
server; the tests count the requests Bedrock received and the money the budget holds."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.messages import HumanMessage

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import upper_bound_input_tokens, upper_bound_request_cost
from confidence_router.costs import Price
from confidence_router.errors import BudgetExceededError
from confidence_router.record import Reason
from confidence_router.redis_state import RedisCloudBudget, redis_client

pytest.importorskip("redis")

MAX_TOKENS = 50
QUESTION = "an obscure question"
ONE = upper_bound_request_cost([HumanMessage(QUESTION)], max_output_tokens=MAX_TOKENS,
                               price=Price(3.0, 15.0))


@pytest.fixture
def unsure(ollama_backend):
    ollama_backend.set_default("unsure", logprobs=-3.0)


def _bill_the_bound(bedrock_server, **kwargs) -> None:
    """Each request billed at its upper bound: the cap admits an exact number of requests."""
    bedrock_server.add_answer(QUESTION, "cloud answer",
                              input_tokens=upper_bound_input_tokens([HumanMessage(QUESTION)]),
                              output_tokens=MAX_TOKENS, **kwargs)


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- two workers, many threads, one cap -------------------------------------------------------


def test_two_routers_from_32_threads_share_the_cap_exactly(
    redis_url, ollama_chat, bedrock_chat, unsure, bedrock_server
):
    _bill_the_bound(bedrock_server, piece_delay=0.01)
    admitted = 5
    cap = admitted * ONE + ONE / 2

    def worker() -> ConfidenceRoutedLLM:  # its own client and budget object, as a process
        return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                   budget=RedisCloudBudget(redis_client(redis_url), cap))

    a, b = worker(), worker()

    def call(i: int) -> str:
        router = a if i % 2 else b
        if i % 4 < 2:
            return "".join(chunk.text for chunk in router.stream(QUESTION))
        return router.invoke(QUESTION).text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(32)))
    assert len(bedrock_server.requests) == admitted
    assert answers.count("cloud answer") == admitted
    budget = RedisCloudBudget(redis_client(redis_url), cap)
    snapshot = budget.snapshot()
    assert snapshot["spent_usd"] == pytest.approx(admitted * ONE)
    assert snapshot["spent_usd"] <= cap and snapshot["reserved_usd"] == 0
    assert snapshot["granted"] == admitted and snapshot["denied"] == 32 - admitted


# -- reservations whose lease runs out ----------------------------------------------------------


def test_a_dead_workers_reservation_is_charged_not_freed(redis_url):
    client = redis_client(redis_url)
    crashed = RedisCloudBudget(client, max_usd=1.0, lease_s=0.2)
    assert crashed.reserve(0.6) is not None  # the worker dies mid-call: its call may be billed
    time.sleep(0.3)
    other = RedisCloudBudget(client, max_usd=1.0)
    assert other.reserve(0.5) is None  # 0.6 charged + 0.5 > 1.0
    snapshot = other.snapshot()
    assert snapshot["spent_usd"] == pytest.approx(0.6)
    assert snapshot["reserved_usd"] == 0 and snapshot["pending"] == 0
    assert snapshot["expired"] == 1
    assert other.reserve(0.4) is not None


def test_late_settlements_replace_the_charge_of_a_lease_that_ran_out(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=1.0, lease_s=0.2)
    committed, released = budget.reserve(0.3), budget.reserve(0.4)
    time.sleep(0.3)
    assert budget.spent == pytest.approx(0.7)  # both charged at their reserved amounts
    committed.commit(0.1)  # the real cost arrives late
    released.release()  # known not billed after all
    assert budget.spent == pytest.approx(0.1)
    assert budget.reserved == 0
    committed_again = budget.reserve(0.9)
    assert committed_again is not None


def test_charge_of_a_lease_that_ran_out_leaves_with_the_window(redis_url):
    budget = RedisCloudBudget(redis_client(redis_url), max_usd=1.0, window_s=0.4, lease_s=0.1)
    late = budget.reserve(1.0)
    time.sleep(0.2)
    assert budget.spent == pytest.approx(1.0) and budget.reserve(0.1) is None
    time.sleep(0.4)  # the charge, dated at the lease's expiry, has left the window
    assert budget.spent == 0
    late.commit(0.25)  # settled after its charge expired: recorded as new spend
    assert budget.spent == pytest.approx(0.25)


def test_lease_shorter_than_the_cloud_call_never_lets_another_worker_overspend(
    redis_url, ollama_chat, bedrock_chat, unsure, bedrock_server
):
    _bill_the_bound(bedrock_server, latency=0.8)
    cap = 1.5 * ONE  # room for one request
    slow = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
        budget=RedisCloudBudget(redis_client(redis_url), cap, lease_s=0.2),
    )
    other = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                budget=RedisCloudBudget(redis_client(redis_url), cap))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(slow.invoke, QUESTION)
        _wait_until(lambda: len(bedrock_server.requests) == 1)
        time.sleep(0.3)  # the first call's lease has run out while it is still in flight
        refused = other.invoke(QUESTION).response_metadata["routing"]
        assert first.result().text == "cloud answer"
    assert refused["reason"] == Reason.BUDGET_EXCEEDED
    assert len(bedrock_server.requests) == 1
    budget = RedisCloudBudget(redis_client(redis_url), cap)
    assert budget.spent == pytest.approx(ONE) and budget.spent <= cap


# -- Redis goes away -------------------------------------------------------------------------


def test_redis_gone_before_the_call_fails_closed(own_redis, ollama_chat, bedrock_chat, unsure,
                                                 bedrock_server, caplog):
    budget = RedisCloudBudget(redis_client(own_redis.url, socket_timeout=0.5,
                                           socket_connect_timeout=0.5), max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    assert router.invoke(QUESTION).response_metadata["routing"]["decision"] == "cloud"
    own_redis.stop()
    message = router.invoke(QUESTION)
    routing = message.response_metadata["routing"]
    assert message.text == "unsure"  # the local answer, flagged: no spend without a cap
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["reason"] == Reason.BUDGET_EXCEEDED
    with pytest.raises(BudgetExceededError) as raised:
        router.invoke(QUESTION, on_budget_exceeded="raise")
    assert raised.value.remaining_usd == 0
    assert len(bedrock_server.requests) == 1  # only the call made while Redis was up
    assert "cloud budget unavailable" in caplog.text


def test_redis_hanging_during_the_cloud_call_keeps_the_answer_and_the_charge(
    own_redis, ollama_chat, bedrock_chat, unsure, bedrock_server, caplog
):
    _bill_the_bound(bedrock_server, latency=0.5)
    client = redis_client(own_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    budget = RedisCloudBudget(client, max_usd=1.0, lease_s=1.5)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(router.invoke, QUESTION)
        _wait_until(lambda: len(bedrock_server.requests) == 1)  # reserved, request in flight
        os.kill(own_redis.pid, signal.SIGSTOP)  # Redis hangs: the commit cannot get through
        try:
            message = call.result(timeout=30)
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
    assert message.text == "cloud answer"  # the caller keeps what was paid for
    assert "could not settle" in caplog.text
    # The unsettled reservation stays held, then is charged: the cap never forgets it.
    observer = RedisCloudBudget(redis_client(own_redis.url), max_usd=1.0)
    assert observer.reserved + observer.spent == pytest.approx(ONE)
    _wait_until(lambda: observer.reserved == 0, timeout=10)
    assert observer.spent == pytest.approx(ONE)
    assert len(bedrock_server.requests) == 1


def test_redis_errors_that_are_bugs_still_raise(redis_url):
    import redis

    client = redis_client(redis_url)
    budget = RedisCloudBudget(client, max_usd=1.0)
    client.set(budget._keys[0], "not a hash")  # another program clobbered the key
    with pytest.raises(redis.ResponseError):
        budget.reserve(0.1)


def test_reserving_from_many_threads_while_redis_disappears_never_overspends(
    own_redis, caplog
):
    budget = RedisCloudBudget(redis_client(own_redis.url, socket_timeout=0.5,
                                           socket_connect_timeout=0.5), max_usd=1.0)
    granted: list[object] = []
    lock = threading.Lock()
    stop_at = threading.Event()

    def reserve_all() -> None:
        for _ in range(40):
            r = budget.reserve(0.05)
            if r is not None:
                with lock:
                    granted.append(r)
            if len(granted) == 10:
                stop_at.set()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(reserve_all) for _ in range(8)]
        stop_at.wait(10)
        own_redis.stop()
        for f in futures:
            f.result()
    assert 10 <= len(granted) <= 20  # never more than the cap allows, no exception escaped


def test_redis_gone_with_all_shared_state_still_answers_locally(
    own_redis, ollama_chat, bedrock_chat, unsure, bedrock_server, caplog
):
    from confidence_router.redis_state import RedisRollingQuantileThreshold, RedisRoutingStats

    client = redis_client(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
        budget=RedisCloudBudget(client, max_usd=1.0), stats=RedisRoutingStats(client),
        calibrator=RedisRollingQuantileThreshold(client, target_rate=0.3, min_samples=5),
    )
    assert router.invoke(QUESTION).response_metadata["routing"]["decision"] == "cloud"
    own_redis.stop()
    message = router.invoke(QUESTION)  # budget, stats and calibrator all unreachable
    routing = message.response_metadata["routing"]
    assert message.text == "unsure" and routing["flagged"] is True
    assert routing["reason"] == Reason.BUDGET_EXCEEDED
    # Said as it is: the budget could not be checked, not "exhausted".
    assert routing["escalation_skipped"].startswith(
        "cloud budget unavailable: Redis unreachable"), routing["escalation_skipped"]
    assert routing["threshold"] == 0.7  # the calibrator's initial threshold
    assert len(bedrock_server.requests) == 1
    assert "calibrator unavailable" in caplog.text
