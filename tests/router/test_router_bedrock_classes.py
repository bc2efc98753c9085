"""The cloud tier's guarantees hold for both Bedrock classes LangChain offers:
``ChatBedrockConverse`` (Converse API) and ``ChatBedrock`` (InvokeModel, Anthropic messages
body) — answers, streaming, usage and cost, retries counted once, budget, privacy guard on the
wire, refusals, tool calls and failure policy — each checked against what the fake
bedrock-runtime server received."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.errors import CloudEscalationError
from confidence_router.guards import PIIGuard
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False)
OPERATIONS = {
    "converse": ("converse", "converse-stream"),
    "invoke": ("invoke", "invoke-with-response-stream"),
}


@pytest.fixture
def unsure_local(ollama_chat, ollama_backend):
    ollama_backend.add_answer("Kenya", "Jomo", logprobs=-3.0, prompt_tokens=6)
    ollama_backend.add_answer("France", "Paris", logprobs=-0.05)
    ollama_backend.set_default("not sure", logprobs=-3.0)
    return ollama_chat()


def _join(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def test_escalates_invoke_and_stream_with_usage_and_cost(api, cloud_factory, unsure_local,
                                                         bedrock_server):
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(max_tokens=64))
    invoked = router.invoke("Second president of Kenya?")
    streamed = _join(list(router.stream("Second president of Kenya?")))
    for message in (invoked, streamed):
        routing = message.response_metadata["routing"]
        assert message.text == "Daniel arap Moi"
        assert routing["decision"] == "cloud" and routing["reason"] == Reason.LOW_CONFIDENCE
        assert routing["usage"]["cloud"]["input_tokens"] == 11
        assert routing["usage"]["cloud"]["output_tokens"] == 4
        assert routing["cloud_cost_usd"] == pytest.approx(11 * 3e-6 + 4 * 15e-6)
        assert routing["local_answer"] == "Jomo"
        assert routing["cloud_attempts"] == 1
    assert [r["operation"] for r in bedrock_server.requests] == list(OPERATIONS[api])
    # Kept local: the cloud is never asked.
    assert router.invoke("Capital of France?").response_metadata["routing"]["decision"] == "local"
    assert len(bedrock_server.requests) == 2


def test_one_layer_retries_and_counts(api, cloud_factory, unsure_local, bedrock_server):
    bedrock_server.fail("Kenya", "ThrottlingException", times=2)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    # No max_retries on the client: botocore would retry too; the router switches that off.
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(max_retries=None),
                                 cloud_retry=FAST_RETRY)
    routing = router.invoke("Kenya?").response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert routing["cloud_attempts"] == 3 == len(bedrock_server.requests)
    assert [r["kind"] for r in routing["cloud_retries"]] == ["throttled", "throttled"]


def test_permanent_error_is_not_retried_and_policy_applies(api, cloud_factory, unsure_local,
                                                           bedrock_server):
    bedrock_server.fail("Kenya", "ValidationException")
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(),
                                 cloud_retry=FAST_RETRY)
    with pytest.raises(CloudEscalationError) as raised:
        router.invoke("Kenya?")
    assert raised.value.routing["cloud_error_kind"] == "permanent"
    assert raised.value.local_message.text == "Jomo"
    kept = router.invoke("Kenya?", on_cloud_error="local")
    assert kept.text == "Jomo" and kept.response_metadata["routing"]["flagged"] is True
    assert len(bedrock_server.requests) == 2  # one each, never retried


def test_budget_cap_is_exact(api, cloud_factory, unsure_local, bedrock_server):
    from confidence_router.budget import upper_bound_request_cost
    from confidence_router.costs import Price

    question = "Kenya, which president came second?"
    bound = upper_bound_request_cost([HumanMessage(question)], max_output_tokens=32,
                                     price=Price(3.0, 15.0))
    bedrock_server.set_default("an answer")
    budget = CloudBudget(max_usd=bound * 3.5)  # room for three upper bounds
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(max_tokens=32),
                                 budget=budget)
    results = router.batch([question] * 8, config={"max_concurrency": 8})
    decisions = sorted(r.response_metadata["routing"]["decision"] for r in results)
    assert decisions.count("cloud") >= 3  # actual costs are below the bound: room remains
    assert len(bedrock_server.requests) == decisions.count("cloud")
    assert budget.spent <= budget.max_usd and budget.reserved == 0


def test_guard_judges_the_body_as_sent(api, cloud_factory, unsure_local, bedrock_server):
    class LastMessageOnly(PIIGuard):  # deliberately blind to the history
        def __call__(self, messages):
            return self.find(messages[-1].text)

    bedrock_server.set_default("cloud answer")
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(),
                                 escalation_guard=LastMessageOnly())
    history = [
        HumanMessage("hello"),
        AIMessage("", tool_calls=[{"name": "mail", "args": {"to": "jane@example.com"},
                                   "id": "toolu_1"}]),
        ToolMessage("sent", tool_call_id="toolu_1"),
        HumanMessage("an obscure question?"),
    ]
    routing = router.invoke(history).response_metadata["routing"]
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["escalation_skipped"].startswith("escalation guard:")
    assert bedrock_server.requests == []


def test_refusal_is_an_answer(api, cloud_factory, unsure_local, bedrock_server):
    reason = "content_filtered" if api == "converse" else "refusal"
    bedrock_server.add_answer("Kenya", "I can't help with that.", stop_reason=reason)
    router = ConfidenceRoutedLLM(local=unsure_local, cloud=cloud_factory(),
                                 cloud_retry=FAST_RETRY)
    routing = router.invoke("Kenya?").response_metadata["routing"]
    assert routing["refusal"] and routing["flagged"] is True
    assert len(bedrock_server.requests) == 1


def test_tool_call_from_the_cloud(api, cloud_factory, ollama_chat, ollama_backend,
                                  bedrock_server):
    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.add_answer("Weather", "", tool_use=[{"name": "get_weather",
                                                        "input": {"city": "Paris"}}])
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory())
    message = router.bind_tools([get_weather]).invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert message.response_metadata["routing"]["decision"] == "cloud"
    sent = json.dumps(bedrock_server.requests[0]["body"])
    assert "get_weather" in sent
