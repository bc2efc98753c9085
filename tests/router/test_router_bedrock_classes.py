"""The cloud tier's guarantees hold for both Bedrock classes LangChain offers:
``ChatBedrockConverse`` (Converse API) and ``ChatBedrock`` (InvokeModel, Anthropic messages
body) — answers, streaming, usage and cost, retries counted once, budget, privacy guard on the
wire, refusals, tool calls and failure policy — each checked against what the fake
bedrock-runtime server received."""

from __future__ import annotations

import json
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.errors import CloudEscalationError, RoutingConfigError
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


# -- a cloud model built on your own boto3 client ----------------------------------------------


MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def _own_client(bedrock_server, **config):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=bedrock_server.url,
        aws_access_key_id="test", aws_secret_access_key="test",
        config=Config(retries={"total_max_attempts": 1}, **config),
    )


def _on_own_client(api, client, **fields):
    from langchain_aws import ChatBedrock, ChatBedrockConverse

    if api == "converse":
        return ChatBedrockConverse(model=MODEL, client=client, **fields)
    return ChatBedrock(model_id=MODEL, client=client, **fields)


@pytest.fixture
def no_aws_region(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")


def test_own_client_without_settings_of_the_model_is_used_as_given(
    api, unsure_local, bedrock_server, no_aws_region
):
    """The model names no region (its client has one): the router kept failing to build a
    client of its own from the settings, a RoutingConfigError at construction."""
    client = _own_client(bedrock_server)
    bedrock_server.set_default("cloud answer")
    router = ConfidenceRoutedLLM(local=unsure_local,
                                 cloud=_on_own_client(api, client, max_tokens=32))
    message = router.invoke("Second president of Kenya?")
    assert message.text == "cloud answer"
    assert message.response_metadata["routing"]["cloud_attempts"] == 1
    assert [r["operation"] for r in bedrock_server.requests] == [OPERATIONS[api][0]]


def test_cloud_timeout_longer_than_own_client_can_bound_is_a_config_error(
    api, unsure_local, bedrock_server, no_aws_region
):
    client = _own_client(bedrock_server)  # botocore's defaults: 60 s to connect and per read
    with pytest.raises(RoutingConfigError, match=r"cloud_timeout=2 .*read_timeout=60"):
        ConfidenceRoutedLLM(local=unsure_local, cloud_timeout=2,
                            cloud=_on_own_client(api, client, max_tokens=32))
    assert bedrock_server.requests == []


def test_own_client_with_timeouts_in_its_config_bounds_a_hung_cloud(
    api, unsure_local, bedrock_server, no_aws_region
):
    client = _own_client(bedrock_server, read_timeout=0.5, connect_timeout=0.5)
    bedrock_server.set_default("too late")
    bedrock_server.delay(None, 5.0)
    router = ConfidenceRoutedLLM(local=unsure_local, cloud_timeout=1.0, cloud_retry=None,
                                 on_cloud_error="local",
                                 cloud=_on_own_client(api, client, max_tokens=32))
    started = time.monotonic()
    message = router.invoke("Second president of Kenya?")
    assert time.monotonic() - started < 4.0  # not the 5 s hang
    routing = message.response_metadata["routing"]
    assert (message.text, routing["reason"], routing["cloud_error_kind"]) == (
        "Jomo", Reason.CLOUD_ERROR, "timeout")
    assert len(bedrock_server.requests) == 1
