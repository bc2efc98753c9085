"""Production routing through the real clients and the test bed: costs, stats, budgets,
privacy guard, retries, timeouts, refusals, threshold calibration, and quiet logs."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from langchain_aws import ChatBedrockConverse

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget, estimate_tokens
from confidence_router.calibration import RollingQuantileThreshold
from confidence_router.errors import BudgetExceededError, CloudEscalationError
from confidence_router.guards import PIIGuard
from confidence_router.retry import RetryPolicy
from confidence_router.stats import RoutingStats

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, jitter=False)


@pytest.fixture
def local(ollama_chat):
    return ollama_chat()


@pytest.fixture
def cloud(bedrock_chat):
    return bedrock_chat(max_tokens=100)


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05, prompt_tokens=12)
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta", logprobs=-2.5, prompt_tokens=12)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)


def test_cost_of_each_response(local, cloud, scripted):
    router = ConfidenceRoutedLLM(local=local, cloud=cloud)
    escalated = router.invoke("Who was the second president of Kenya?")
    routing = escalated.response_metadata["routing"]
    assert routing["cloud_cost_usd"] == pytest.approx(11 * 3e-6 + 4 * 15e-6)
    assert routing["cost_usd"] == pytest.approx(11 * 3e-6 + 4 * 15e-6)  # local is free
    kept = router.invoke("What is the capital of France?").response_metadata["routing"]
    assert kept["cost_usd"] == 0.0
    # What all-cloud would have cost: the local usage at cloud prices (an estimate).
    assert kept["all_cloud_cost_usd"] == pytest.approx(12 * 3e-6 + 1 * 15e-6)
    assert kept["all_cloud_estimated"] is True


def test_stats_consistent_under_concurrency(local, cloud, scripted):
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, stats=stats)
    questions = ["What is the capital of France?", "Who was the second president of Kenya?"] * 20
    results = asyncio.run(router.abatch(questions, config={"max_concurrency": 8}))
    results += router.batch(questions[:10], config={"max_concurrency": 4})
    snap = stats.snapshot()
    assert snap["calls"] == 50
    assert snap["escalated"] == 25
    assert snap["escalation_rate"] == pytest.approx(0.5)
    assert snap["by_reason"] == {"confident": 25, "low_confidence": 25}
    expected_cost = sum(r.response_metadata["routing"]["cost_usd"] for r in results)
    assert snap["cost_usd"] == pytest.approx(expected_cost)
    assert snap["cost_usd"] == pytest.approx(25 * (11 * 3e-6 + 4 * 15e-6))
    assert 0 < snap["savings_usd"] and 0 < snap["savings_rate"] < 1


def _exact_cost_answer(bedrock_server, question: str, max_tokens: int) -> float:
    """Script the cloud so its billed usage equals the router's reservation estimate."""
    n_in = estimate_tokens([question])
    bedrock_server.add_answer(question, "answer", input_tokens=n_in, output_tokens=max_tokens)
    return n_in * 3e-6 + max_tokens * 15e-6


def test_budget_enforced_exactly_under_concurrency(local, cloud, ollama_backend, bedrock_server):
    question = "Name an obscure fact."
    ollama_backend.add_answer(question, "unsure", logprobs=-3.0)
    cost = _exact_cost_answer(bedrock_server, question, 100)
    budget = CloudBudget(max_usd=5 * cost + cost / 2, window_s=3600)
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, budget=budget, stats=stats)
    results = asyncio.run(router.abatch([question] * 20, config={"max_concurrency": 10}))
    decisions = [r.response_metadata["routing"] for r in results]
    assert sum(d["decision"] == "cloud" for d in decisions) == 5
    assert len(bedrock_server.requests) == 5  # the sixth never reached the cloud
    refused = [d for d in decisions if d["decision"] == "local"]
    assert len(refused) == 15
    assert all(d["reason"] == "budget_exceeded" and d["flagged"] for d in refused)
    assert [r.content for r in results].count("unsure") == 15
    assert budget.spent == pytest.approx(5 * cost)
    assert budget.spent <= budget.max_usd


def test_budget_policy_raise(local, cloud, ollama_backend, bedrock_server):
    question = "Name an obscure fact."
    ollama_backend.add_answer(question, "unsure", logprobs=-3.0)
    cost = _exact_cost_answer(bedrock_server, question, 100)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud,
                                 budget=CloudBudget(max_usd=cost * 1.5, window_s=60))
    assert router.invoke(question).response_metadata["routing"]["decision"] == "cloud"
    with pytest.raises(BudgetExceededError) as caught:
        router.invoke(question, on_budget_exceeded="raise")
    assert caught.value.local_message.content == "unsure"
    assert caught.value.routing["reason"] == "budget_exceeded"
    # streaming with the default policy serves the buffered local answer, flagged
    chunks = list(router.stream(question))
    assert "".join(c.text for c in chunks) == "unsure"
    assert chunks[-1].response_metadata["routing"]["reason"] == "budget_exceeded"


def test_budget_needs_a_known_price(local, bedrock_server):
    unknown = ChatBedrockConverse(model="acme.mystery-model-v1:0", region_name="us-east-1",
                                  endpoint_url=bedrock_server.url, aws_access_key_id="t",
                                  aws_secret_access_key="t")
    with pytest.raises(ValueError, match="needs a price"):
        ConfidenceRoutedLLM(local=local, cloud=unknown, budget=CloudBudget(max_usd=1.0))


def test_guarded_queries_never_reach_the_cloud_under_concurrency(
    local, cloud, ollama_backend, bedrock_server
):
    ollama_backend.set_default("not sure", logprobs=-3.0)  # everything wants to escalate
    bedrock_server.set_default("cloud answer")
    private = [f"Draft a reply to customer{i}@example.com about order {i}" for i in range(15)]
    public = [f"What happened in the year {1500 + i}?" for i in range(15)]
    questions = [q for pair in zip(private, public) for q in pair]
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, escalation_guard=PIIGuard())
    results = asyncio.run(router.abatch(questions, config={"max_concurrency": 10}))
    sent = " ".join(json.dumps(r["body"]) for r in bedrock_server.requests)
    assert "@example.com" not in sent
    assert len(bedrock_server.requests) == 15
    for question, result in zip(questions, results):
        routing = result.response_metadata["routing"]
        if "@" in question:
            assert routing["decision"] == "local" and routing["flagged"]
            assert routing["escalation_skipped"] == "escalation guard: email address"
        else:
            assert routing["decision"] == "cloud"


def test_failing_guard_fails_closed(local, cloud, ollama_backend, bedrock_server):
    ollama_backend.set_default("not sure", logprobs=-3.0)

    def broken(messages):
        raise RuntimeError("detector offline")

    routing = ConfidenceRoutedLLM(local=local, cloud=cloud, escalation_guard=broken).invoke(
        "anything").response_metadata["routing"]
    assert routing["decision"] == "local"
    assert "detector offline" in routing["escalation_skipped"]
    assert bedrock_server.requests == []


def test_throttling_is_retried_with_backoff(local, cloud, scripted, bedrock_server):
    bedrock_server.fail("Kenya", "ThrottlingException", times=2)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, cloud_retry=FAST_RETRY)
    message = router.invoke("Who was the second president of Kenya?")
    assert message.content == "Daniel arap Moi"
    assert len(bedrock_server.requests) == 3


def test_transient_errors_retried_then_reported(local, cloud, scripted, bedrock_server):
    bedrock_server.fail("Kenya", "ServiceUnavailableException")
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, cloud_retry=FAST_RETRY)
    with pytest.raises(CloudEscalationError) as caught:
        router.invoke("Who was the second president of Kenya?")
    assert len(bedrock_server.requests) == 3
    assert caught.value.routing["cloud_error_kind"] == "transient"
    assert caught.value.routing["cloud_attempts"] == 3


@pytest.mark.parametrize("error", ["ValidationException", "AccessDeniedException"])
def test_permanent_errors_are_not_retried(local, cloud, scripted, bedrock_server, error):
    bedrock_server.fail("Kenya", error)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, cloud_retry=FAST_RETRY)
    message = router.invoke("Who was the second president of Kenya?", on_cloud_error="local")
    routing = message.response_metadata["routing"]
    assert len(bedrock_server.requests) == 1
    assert routing["cloud_error_kind"] == "permanent"
    assert routing["reason"] == "cloud_error" and message.content == "Jomo Kenyatta"


def test_stream_retries_before_first_chunk(local, cloud, scripted, bedrock_server):
    bedrock_server.fail("Kenya", "ThrottlingException", times=1)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, cloud_retry=FAST_RETRY)
    chunks = list(router.stream("Who was the second president of Kenya?"))
    assert "".join(c.text for c in chunks) == "Daniel arap Moi"
    assert len(bedrock_server.requests) == 2


def test_local_timeout_escalates(local, cloud, ollama_backend, bedrock_server):
    ollama_backend.add_answer("slow", "late", latency=2.0)
    bedrock_server.add_answer("slow", "fast")
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, local_timeout=0.3)
    for message in (router.invoke("slow one"), asyncio.run(router.ainvoke("slow one"))):
        routing = message.response_metadata["routing"]
        assert message.content == "fast"
        assert routing["reason"] == "local_error"
        assert routing["local_error_kind"] == "timeout"
        assert routing["latency_s"]["local"] < 1.5


def test_cloud_timeout_is_retried_then_falls_back(local, cloud, scripted, bedrock_server):
    bedrock_server.delay("Kenya", 2.0)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, cloud_timeout=0.3,
                                 cloud_retry=RetryPolicy(max_attempts=2, base_delay=0.01,
                                                         jitter=False))
    message = router.invoke("Who was the second president of Kenya?", on_cloud_error="local")
    routing = message.response_metadata["routing"]
    assert message.content == "Jomo Kenyatta"
    assert routing["cloud_error_kind"] == "timeout" and routing["cloud_attempts"] == 2
    assert routing["latency_s"]["cloud"] < 1.5


def test_refusal_is_an_answer_not_an_error(local, cloud, ollama_backend, bedrock_server):
    ollama_backend.add_answer("forbidden", "hmm", logprobs=-3.0)
    bedrock_server.add_answer("forbidden", "I can't help with that.",
                              stop_reason="content_filtered")
    message = ConfidenceRoutedLLM(local=local, cloud=cloud).invoke("a forbidden request")
    routing = message.response_metadata["routing"]
    assert message.content == "I can't help with that."
    assert routing["decision"] == "cloud"
    assert routing["refusal"] == "content_filtered" and routing["flagged"] is True
    assert "cloud_error" not in routing
    assert len(bedrock_server.requests) == 1


def test_rolling_threshold_tracks_a_target_rate(local, cloud, ollama_backend, bedrock_server):
    # 100 questions whose confidences spread evenly; target: escalate 30%.
    for i in range(100):
        ollama_backend.add_answer(f"question number {i}?", "answer", logprobs=-(i + 1) / 40)
    bedrock_server.set_default("cloud")
    calibrator = RollingQuantileThreshold(target_rate=0.3, window=100, min_samples=20)
    stats = RoutingStats(target_rate=0.3)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, calibrator=calibrator, stats=stats)
    order = [(i * 37) % 100 for i in range(100)]  # a fixed shuffle
    for _ in range(2):
        for i in order:
            router.invoke(f"question number {i}?")
    # The threshold settled at the 30% quantile of the window's confidences...
    assert calibrator.in_window_rate() == pytest.approx(0.3, abs=0.02)
    # ...and over the second pass the realised rate tracked the target.
    assert calibrator.realised_rate == pytest.approx(0.3, abs=0.05)
    assert abs(stats.snapshot()["drift"]) < 0.1
    # A per-call threshold still wins over the calibrated one.
    assert router.invoke("question number 0?", threshold=0.99).response_metadata["routing"][
        "threshold"] == 0.99


def test_our_logs_carry_no_prompts_or_credentials(local, bedrock_server, scripted, caplog):
    cloud = ChatBedrockConverse(
        model=SONNET, region_name="us-east-1", endpoint_url=bedrock_server.url,
        aws_access_key_id="AKIAUNIQUEKEYID", aws_secret_access_key="uniqueSecretValue123",
        max_retries=0,
    )
    caplog.set_level(logging.DEBUG, logger="confidence_router")
    router = ConfidenceRoutedLLM(local=local, cloud=cloud)
    router.invoke("Who was the second president of Kenya?")
    ours = [r for r in caplog.records if r.name.startswith("confidence_router")]
    text = "\n".join(r.getMessage() for r in ours)
    assert "routed decision=cloud reason=low_confidence" in text
    for secret in ("second president of Kenya", "Daniel arap Moi", "Jomo",
                   "uniqueSecretValue123", "AKIAUNIQUEKEYID"):
        assert secret not in text
