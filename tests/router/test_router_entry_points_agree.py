"""The four entry points (invoke, ainvoke, stream, astream) share one routing flow; their two
drivers (sync, async) differ only by ``await``. This test fails when they drift: the same
scenario must give the same answer and the same routing record through each of them."""

from __future__ import annotations

import asyncio

import pytest

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.guards import PIIGuard
from confidence_router.retry import RetryPolicy

VOLATILE = {"latency_s", "cost_usd", "cloud_cost_usd", "all_cloud_cost_usd", "local_cost_usd",
            "all_cloud_estimated", "cost_unknown_reason", "budget_reserved_usd"}


def _stable(routing: dict) -> dict:
    # Error texts name the API operation (Converse vs ConverseStream): compare kinds and codes.
    stable = {k: v for k, v in routing.items() if k not in VOLATILE | {"cloud_error"}}
    if "cloud_retries" in stable:
        stable["cloud_retries"] = [
            {k: v for k, v in retry.items() if k != "error"} for retry in stable["cloud_retries"]
        ]
    return stable


def _join(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


SCENARIOS = {
    "confident": ({}, "capital of France?"),
    "low confidence": ({}, "second president of Kenya?"),
    "local error escalates": ({}, "broken local question"),
    "cloud error falls back": ({"on_cloud_error": "local"}, "cloud down question"),
    "guarded": ({"escalation_guard": PIIGuard()}, "mail a@b.io about Kenya?"),
    "not allowed": ({"allow_escalation": False}, "second president of Kenya?"),
    "early exit": ({"early_exit": True, "signal": "min_logprob"}, "second president of Kenya?"),
    "throttled then served": ({}, "throttled question"),
    "budget exhausted": ({"budget": "tiny"}, "second president of Kenya?"),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_entry_points_agree(scenario, ollama_chat, bedrock_chat, ollama_backend, bedrock_server):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    ollama_backend.add_answer("Kenya", ["Jomo", " Kenyatta"], logprobs=[-0.2, -3.0])
    ollama_backend.fail("broken local", status=500)
    ollama_backend.set_default("not sure at all", logprobs=-3.0)
    bedrock_server.fail("cloud down", "ServiceUnavailableException")
    bedrock_server.set_default("cloud answer")
    extra, question = SCENARIOS[scenario]

    def build() -> ConfidenceRoutedLLM:
        kwargs = dict(extra)
        if kwargs.get("budget") == "tiny":
            kwargs["budget"] = CloudBudget(max_usd=1e-9)
        return ConfidenceRoutedLLM(
            local=ollama_chat(), cloud=bedrock_chat(max_tokens=20),
            cloud_retry=RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False), **kwargs
        )

    results = {}
    for name, run in {
        "invoke": lambda r: r.invoke(question),
        "ainvoke": lambda r: asyncio.run(r.ainvoke(question)),
        "stream": lambda r: _join(list(r.stream(question))),
        "astream": lambda r: _join(asyncio.run(_collect(r.astream(question)))),
    }.items():
        if scenario == "throttled then served":
            bedrock_server.fail("throttled", "ThrottlingException", times=1)
        message = run(build())
        results[name] = (message.text, _stable(message.response_metadata["routing"]))
    text, reference = results["invoke"]
    for name, (other_text, record) in results.items():
        assert other_text == text, f"{name} answered differently in scenario {scenario!r}"
        differing = {
            k: (reference.get(k), record.get(k))
            for k in set(reference) | set(record)
            if reference.get(k) != record.get(k)
        }
        assert not differing, f"{name} differs from invoke in {scenario!r}: {differing}"


async def _collect(stream):
    return [chunk async for chunk in stream]
