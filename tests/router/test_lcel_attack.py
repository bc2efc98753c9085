"""ConfidenceRoutedLLM as a Runnable in real LCEL chains, attacked: tools and structured output
through both tiers, knobs through every LangChain configuration channel, streams the consumer
abandons, and message shapes a chain can hand it. Every test counts what the fake Ollama and
Bedrock servers actually received."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableLambda, RunnableParallel
from langchain_core.tools import tool
from langchain_core.tracers.base import BaseTracer
from pydantic import BaseModel

from confidence_router import ConfidenceRoutedLLM, tier_clients
from confidence_router.budget import CloudBudget
from confidence_router.calibration import RollingQuantileThreshold
from confidence_router.errors import (
    CloudEscalationError,
    ConfidenceRouterError,
    InvalidInputError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy
from confidence_router.stats import RoutingStats

NO_RETRY = RetryPolicy(max_attempts=1)


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"noon in {city}"


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


@pytest.fixture
def router(ollama_chat, bedrock_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                               cloud_retry=NO_RETRY)


@pytest.fixture
def invoke_router(ollama_chat, bedrock_invoke_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_invoke_chat(max_tokens=50),
                               cloud_retry=NO_RETRY)


def _local(ollama_server) -> list[dict]:
    return [r["body"] for r in ollama_server.requests_to("/api/chat")]


def _local_tools(body: dict) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools") or []]


def _converse_tools(body: dict) -> list[str]:
    return [t["toolSpec"]["name"] for t in (body.get("toolConfig") or {}).get("tools", [])]


def _routing(message) -> dict:
    return message.response_metadata["routing"]


def _joined(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


# =============================================================================================
# 1. tools and structured output
# =============================================================================================

WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_bare_local_tool_call_has_unknown_confidence_and_escalates_with_the_tools_once(
    router, ollama_backend, ollama_server, bedrock_server
):
    # Ollama sends no logprobs for tool-call tokens: a call without text cannot be scored.
    ollama_backend.add_answer("weather", "", tool_calls=[WEATHER_CALL])
    bedrock_server.add_answer("weather", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}, "toolUseId": "tu1"}])
    message = router.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    routing = _routing(message)
    assert routing["confidence"] is None and routing["reason"] == Reason.CONFIDENCE_UNKNOWN
    assert routing["decision"] == "cloud" and routing["local_answer"] is not None
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "tu1", "type": "tool_call"}]
    (local,) = _local(ollama_server)
    assert _local_tools(local) == ["get_weather"]
    (cloud,) = bedrock_server.requests
    assert _converse_tools(cloud["body"]) == ["get_weather"]


def test_local_tool_call_with_scored_text_is_kept_on_its_text(router, ollama_backend,
                                                               ollama_server, bedrock_server):
    ollama_backend.add_answer("weather", "Let me check.", logprobs=-0.01,
                              tool_calls=[WEATHER_CALL])
    message = router.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    routing = _routing(message)
    assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENT
    assert routing["signals"]["token_count"] == 3    # "Let", " me", " check." scored
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert len(_local(ollama_server)) == 1 and bedrock_server.requests == []


@pytest.mark.parametrize("entry", ["invoke", "stream"])
def test_parallel_local_tool_calls_are_all_kept(router, ollama_backend, ollama_server,
                                                bedrock_server, entry):
    ollama_backend.add_answer("both", "", tool_calls=[
        WEATHER_CALL, {"name": "get_time", "arguments": {"city": "Rome"}}])
    bound = router.bind_tools([get_weather, get_time])
    if entry == "invoke":
        message = bound.invoke("Weather in Paris and time in Rome, both", on_unknown="local")
    else:
        message = _joined(list(bound.stream("Weather in Paris and time in Rome, both",
                                            on_unknown="local")))
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    assert message.invalid_tool_calls == []
    routing = _routing(message)
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["reason"] == Reason.CONFIDENCE_UNKNOWN
    assert len(_local(ollama_server)) == 1 and bedrock_server.requests == []


def test_tool_message_round_trip_escalates_with_tools_and_results(router, ollama_backend,
                                                                   ollama_server,
                                                                   bedrock_server):
    ollama_backend.set_default("It is probably sunny.", logprobs=-3.0)
    bedrock_server.set_default("It is sunny in Paris.")
    history = [
        HumanMessage("What's the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"},
                                   "id": "tu1"}]),
        ToolMessage("sunny in Paris", tool_call_id="tu1"),
    ]
    message = router.bind_tools([get_weather]).invoke(history)
    assert message.content == "It is sunny in Paris."
    (local,) = _local(ollama_server)
    assert [m["role"] for m in local["messages"]] == ["user", "assistant", "tool"]
    assert _local_tools(local) == ["get_weather"]
    (cloud,) = bedrock_server.requests
    assert _converse_tools(cloud["body"]) == ["get_weather"]
    blocks = [b for m in cloud["body"]["messages"] for b in m["content"]]
    assert [b["toolUse"]["toolUseId"] for b in blocks if "toolUse" in b] == ["tu1"]
    assert [b["toolResult"]["toolUseId"] for b in blocks if "toolResult" in b] == ["tu1"]


@pytest.mark.parametrize("entry", ["invoke", "stream"])
def test_agent_step_after_a_cloud_tool_call_is_answered_locally(router, invoke_router,
                                                                ollama_backend, ollama_server,
                                                                bedrock_server, entry):
    # Step 1: the local model cannot score its bare tool call, the cloud makes it. Step 2: the
    # tool's result comes back; the cloud's message (Bedrock-native content blocks) is in the
    # history, and the local model must still be able to answer it.
    ollama_backend.add_answer(lambda request: any(m.get("role") == "tool"
                                                  for m in request.messages),
                              "It is sunny in Paris.", logprobs=-0.01)
    ollama_backend.add_answer("weather", "", tool_calls=[WEATHER_CALL])
    bedrock_server.add_answer("weather", "Let me check.", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    for routed in (router, invoke_router):
        bound = routed.bind_tools([get_weather])
        if entry == "invoke":
            step = bound.invoke("What's the weather in Paris?")
        else:
            step = _joined(list(bound.stream("What's the weather in Paris?")))
        assert _routing(step)["decision"] == "cloud"
        (call,) = step.tool_calls
        assert call["args"] == {"city": "Paris"}
        ollama_server.clear_requests()
        bedrock_server.clear_requests()
        answer = bound.invoke([HumanMessage("What's the weather in Paris?"), step,
                               ToolMessage("sunny in Paris", tool_call_id=call["id"])])
        assert answer.text == "It is sunny in Paris." and _routing(answer)["decision"] == "local"
        (local,) = _local(ollama_server)
        assert [m["role"] for m in local["messages"]] == ["user", "assistant", "tool"]
        assert local["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert bedrock_server.requests == []


@pytest.mark.parametrize(("choice", "converse", "anthropic"), [
    ("get_weather", {"tool": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ("any", {"any": {}}, {"type": "any"}),
])
def test_tool_choice_reaches_each_cloud_class_once(router, invoke_router, ollama_backend,
                                                    ollama_server, bedrock_server, choice,
                                                    converse, anthropic):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.add_answer(None, "", tool_use=[{"name": "get_weather", "input": {"city": "Oslo"}}])
    for routed in (router, invoke_router):
        bedrock_server.clear_requests()
        message = routed.bind_tools([get_weather], tool_choice=choice).invoke("Weather in Oslo?")
        assert message.tool_calls[0]["args"] == {"city": "Oslo"}
        (cloud,) = bedrock_server.requests
        body = cloud["body"]
        if cloud["operation"] == "converse":
            assert _converse_tools(body) == ["get_weather"]
            assert body["toolConfig"]["toolChoice"] == converse
        else:
            assert [t["name"] for t in body["tools"]] == ["get_weather"]
            assert body["tool_choice"] == anthropic
    assert [_local_tools(b) for b in _local(ollama_server)] == [["get_weather"]] * 2


def test_a_second_bind_tools_replaces_the_first_on_both_tiers(router, ollama_backend,
                                                              ollama_server, bedrock_server):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.add_answer(None, "", tool_use=[{"name": "get_time", "input": {"city": "Oslo"}}])
    router.bind_tools([get_weather]).bind_tools([get_time]).invoke("Time in Oslo?")
    assert [_local_tools(b) for b in _local(ollama_server)] == [["get_time"]]
    assert [_converse_tools(r["body"]) for r in bedrock_server.requests] == [["get_time"]]


@pytest.mark.parametrize("entry", ["invoke", "stream", "astream"])
async def test_parallel_cloud_tool_calls_arrive_once_on_both_cloud_classes(
    router, invoke_router, ollama_backend, ollama_server, bedrock_server, entry
):
    ollama_backend.add_answer("weather", "", tool_calls=[WEATHER_CALL])   # unknown: escalates
    bedrock_server.add_answer(None, "Checking.", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}},
        {"name": "get_weather", "input": {"city": "Rome"}}])
    for routed in (router, invoke_router):
        bound = routed.bind_tools([get_weather])
        if entry == "invoke":
            message = bound.invoke("weather in Paris and Rome?")
        elif entry == "stream":
            message = _joined(list(bound.stream("weather in Paris and Rome?")))
        else:
            message = _joined([c async for c in bound.astream("weather in Paris and Rome?")])
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
        assert message.invalid_tool_calls == [] and message.text == "Checking."
        assert _routing(message)["decision"] == "cloud"
    assert [r["operation"].startswith("converse") for r in bedrock_server.requests] == [
        True, False]
    assert len(_local(ollama_server)) == 2


@pytest.mark.parametrize("kwargs", [{"tool_choice": "any"}, {"parallel_tool_calls": False}])
def test_tool_kwargs_per_call_never_buy_a_cloud_call(router, ollama_backend, ollama_server,
                                                     bedrock_server, kwargs):
    ollama_backend.add_answer("weather", "Let me check.", logprobs=-0.01,
                              tool_calls=[WEATHER_CALL])
    bedrock_server.set_default("cloud answer")
    bound = router.bind_tools([get_weather])
    try:
        message = bound.invoke("What's the weather in Paris?", **kwargs)
    except RoutingConfigError:
        assert _local(ollama_server) == []
    else:
        assert _routing(message)["decision"] == "local"
        assert [_local_tools(b) for b in _local(ollama_server)] == [["get_weather"]]
    assert bedrock_server.requests == []


def test_bind_tools_accepts_strict_like_both_tiers(router, ollama_backend, ollama_server,
                                                   bedrock_server):
    ollama_backend.add_answer("weather", "Let me check.", logprobs=-0.01,
                              tool_calls=[WEATHER_CALL])
    message = router.bind_tools([get_weather], strict=True).invoke("What's the weather in Paris?")
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert [_local_tools(b) for b in _local(ollama_server)] == [["get_weather"]]
    assert bedrock_server.requests == []


def test_structured_output_after_bind_tools_asks_both_tiers_for_the_schema(
    router, ollama_backend, ollama_server, bedrock_server
):
    # Before the fix the earlier binding's tools were re-bound over the schema's: Ollama got
    # tools=['get_weather'], Converse toolConfig ['get_weather'] without toolChoice, and the
    # parser waited for a 'Capital' call neither tier had been offered.
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}])
    structured = router.bind_tools([get_weather]).with_structured_output(Capital)
    assert structured.invoke("Capital of Kenya?") == Capital(country="Kenya", capital="Nairobi")
    assert [_local_tools(b) for b in _local(ollama_server)] == [["Capital"]]
    (cloud,) = bedrock_server.requests
    assert _converse_tools(cloud["body"]) == ["Capital"]
    assert "toolChoice" in cloud["body"]["toolConfig"]


def test_a_forced_tool_choice_is_honoured_whoever_answers(router, ollama_backend,
                                                          bedrock_server):
    ollama_backend.add_answer("weather", "It is sunny.", logprobs=-0.01)
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    bound = router.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What's the weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert len(bedrock_server.requests) == 1


def test_structured_output_never_returns_none_for_a_local_answer_without_the_tool(
    router, ollama_backend, bedrock_server
):
    ollama_backend.add_answer("Kenya", '{"country": "Kenya", "capital": "Nairobi"}',
                              logprobs=-0.01)
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}])
    try:
        result = router.with_structured_output(Capital).invoke("Capital of Kenya?")
    except ConfidenceRouterError:
        return
    assert result == Capital(country="Kenya", capital="Nairobi")
    assert len(bedrock_server.requests) == 1


def test_json_schema_output_after_bind_tools_sends_no_tools(router, ollama_backend,
                                                           ollama_server, bedrock_server):
    # Before the fix the earlier tools rode along with the schema: Ollama got tools AND
    # format, Converse toolConfig AND outputConfig.
    ollama_backend.set_default('{"country": "Kenya", "capital": "Mombasa"}', logprobs=-3.0)
    bedrock_server.set_default('{"country": "Kenya", "capital": "Nairobi"}')
    structured = router.bind_tools([get_weather]).with_structured_output(
        Capital, method="json_schema")
    assert structured.invoke("Capital of Kenya?") == Capital(country="Kenya", capital="Nairobi")
    (local,) = _local(ollama_server)
    assert _local_tools(local) == [] and local["format"]["required"] == ["country", "capital"]
    (cloud,) = bedrock_server.requests
    assert "toolConfig" not in cloud["body"] and "outputConfig" in cloud["body"]


def test_structured_output_keeps_other_kwargs_bound_on_a_tier(ollama_chat, bedrock_chat,
                                                              ollama_backend, ollama_server,
                                                              bedrock_server):
    # A tier's own non-tool kwargs (here Ollama's keep_alive) survive with_structured_output.
    router = ConfidenceRoutedLLM(local=ollama_chat().bind(keep_alive="7m"),
                                 cloud=bedrock_chat(max_tokens=50), cloud_retry=NO_RETRY)
    ollama_backend.add_answer(None, "ok", logprobs=-0.01, tool_calls=[
        {"name": "Capital", "arguments": {"country": "Italy", "capital": "Rome"}}])
    result = router.with_structured_output(Capital).invoke("Capital of Italy?")
    assert result == Capital(country="Italy", capital="Rome")
    (local,) = _local(ollama_server)
    assert local["keep_alive"] == "7m" and _local_tools(local) == ["Capital"]
    assert bedrock_server.requests == []


def test_malformed_local_tool_arguments_escalate_and_are_explained(router, ollama_backend,
                                                                     ollama_server,
                                                                     bedrock_server):
    # Ollama hands back arguments the client cannot parse as JSON: a local failure, escalated
    # once, with the tools; the record says why.
    ollama_backend.add_answer("weather", "", tool_calls=[
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
    original = ollama_backend.chat

    def broken_arguments(request):
        reply = original(request)
        reply.tool_calls = [{"function": {"name": "get_weather", "arguments": '{"city": "Par'}}]
        return reply

    ollama_backend.chat = broken_arguments  # the wire carries a JSON string cut short
    bedrock_server.add_answer("weather", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    message = router.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    routing = _routing(message)
    assert routing["decision"] == "cloud"
    # The ollama client refuses the reply (arguments must be an object): a local error.
    assert routing["reason"] == Reason.LOCAL_ERROR and "ChatResponse" in routing["local_error"]
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert len(_local(ollama_server)) == 1
    (cloud,) = bedrock_server.requests
    assert _converse_tools(cloud["body"]) == ["get_weather"]


# =============================================================================================
# 2. knobs through every configuration channel; the router inside LCEL combinators
# =============================================================================================


def test_precedence_constructor_then_configurable_then_bind_then_call(router, ollama_backend,
                                                                       ollama_server,
                                                                       bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.3)   # confidence ~0.9 on mean_min
    bedrock_server.set_default("cloud answer")
    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    at_99 = {"configurable": {"threshold": 0.99}}

    def threshold(message):
        return _routing(message)["threshold"]

    assert threshold(configurable.invoke("hi")) == router.threshold
    assert threshold(configurable.invoke("hi", at_99)) == 0.99
    assert threshold(configurable.bind(threshold=0.5).invoke("hi", at_99)) == 0.5
    assert threshold(configurable.bind(threshold=0.5).invoke("hi", at_99, threshold=0.6)) == 0.6
    assert threshold(configurable.with_config(at_99).invoke("hi")) == 0.99
    # In a chain, the config reaches the router; a RunnableConfig dict works as well.
    chain = ChatPromptTemplate.from_template("{q}") | configurable | StrOutputParser()
    assert chain.invoke({"q": "hi"}, at_99) == "cloud answer"
    assert chain.invoke({"q": "hi"}) == "Paris"
    assert len(_local(ollama_server)) == 7 and len(bedrock_server.requests) == 3


class _Runs(BaseTracer):
    """A tracer keeping every finished run."""

    def __init__(self):
        super().__init__()
        self.runs = []

    def _persist_run(self, run):
        self.runs.append(run)

    def flat(self):
        pending, out = list(self.runs), []
        while pending:
            run = pending.pop(0)
            out.append(run)
            pending.extend(run.child_runs)
        return out


async def test_run_config_names_tags_and_metadata_reach_every_run(router, ollama_backend,
                                                                  ollama_server,
                                                                  bedrock_server):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.01)
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("Nairobi")
    named = router.with_config(run_name="router", tags=["mine"])
    for entry in ("invoke", "stream", "astream", "batch", "abatch"):
        runs = _Runs()
        config = {"callbacks": [runs], "metadata": {"user": "u1"}}
        if entry == "invoke":
            named.invoke("Capital of Kenya?", config)
        elif entry == "stream":
            list(named.stream("Capital of Kenya?", config))
        elif entry == "astream":
            [c async for c in named.astream("Capital of Kenya?", config)]
        elif entry == "batch":
            named.batch(["Capital of France?", "Capital of Kenya?"], config)
        else:
            await named.abatch(["Capital of France?", "Capital of Kenya?"], config)
        flat = runs.flat()
        routers = [r for r in flat if r.name == "router"]
        decisions = sorted(r.extra["metadata"]["routing_decision"] for r in routers)
        assert decisions == (["cloud", "local"] if "batch" in entry else ["cloud"]), entry
        for run in flat:   # the caller's tags and metadata reach the tiers' child runs too
            assert "mine" in run.tags and run.extra["metadata"]["user"] == "u1", entry
        assert sorted(r.name for r in flat if r.name != "router") == (
            ["cloud", "local", "local"] if "batch" in entry else ["cloud", "local"]), entry
    assert len(bedrock_server.requests) == 5


def test_misspelt_configurable_field_is_a_routing_config_error(router):
    with pytest.raises(RoutingConfigError, match="threshold"):
        router.configurable_fields(treshold=ConfigurableField(id="threshold"))


@pytest.mark.parametrize("then", ["with_structured_output", "bind_tools"])
def test_a_bound_privacy_knob_survives_tools_and_structured_output(router, ollama_backend,
                                                                   ollama_server,
                                                                   bedrock_server, then):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}])
    private = router.bind(allow_escalation=False)
    if then == "with_structured_output":
        routed = private.with_structured_output(Capital, include_raw=True)
        message = routed.invoke("Capital of Kenya? Reply to jane.doe@example.com")["raw"]
    else:
        routed = private.bind_tools([get_weather])
        message = routed.invoke("Capital of Kenya? Reply to jane.doe@example.com")
    routing = _routing(message)
    assert routing["policy"]["allow_escalation"] is False and routing["decision"] == "local"
    assert len(_local(ollama_server)) == 1 and bedrock_server.requests == []


@pytest.mark.parametrize("then", ["with_structured_output", "bind_tools"])
def test_configurable_knobs_survive_tools_and_structured_output(router, ollama_backend,
                                                                bedrock_server, then):
    ollama_backend.set_default('{"country": "Kenya", "capital": "Mombasa"}', logprobs=-0.3)
    bedrock_server.set_default('{"country": "Kenya", "capital": "Nairobi"}')
    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    at_99 = {"configurable": {"threshold": 0.99}}
    if then == "with_structured_output":
        out = configurable.with_structured_output(Capital, method="json_schema",
                                                  include_raw=True).invoke("Kenya?", at_99)
        message = out["raw"]
    else:
        message = configurable.bind_tools([get_weather]).invoke("Kenya?", at_99)
    assert _routing(message)["threshold"] == 0.99 and _routing(message)["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


def test_batch_takes_one_config_per_input(router, ollama_backend, ollama_server,
                                          bedrock_server):
    ollama_backend.set_default("Mombasa", logprobs=-0.3)
    bedrock_server.set_default("Nairobi")
    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    results = configurable.batch(["Kenya?", "Kenya?"],
                                 config=[{"configurable": {"threshold": 0.99}}, {}])
    assert [(_routing(m)["threshold"], m.text) for m in results] == [
        (0.99, "Nairobi"), (router.threshold, "Mombasa")]
    assert len(_local(ollama_server)) == 2 and len(bedrock_server.requests) == 1


@pytest.mark.parametrize("bad", ["false", 0, None])
def test_wrong_type_through_with_config_is_typed_before_any_request(router, ollama_server,
                                                                    bedrock_server, bad):
    configurable = router.configurable_fields(
        allow_escalation=ConfigurableField(id="allow_escalation"))
    with pytest.raises(RoutingConfigError, match="allow_escalation"):
        configurable.invoke("hi", {"configurable": {"allow_escalation": bad}})
    with pytest.raises(RoutingConfigError, match="allow_escalation"):
        list(configurable.stream("hi", {"configurable": {"allow_escalation": bad}}))
    assert _local(ollama_server) == [] and bedrock_server.requests == []


def test_configured_threshold_wins_over_the_calibrator(ollama_chat, bedrock_chat,
                                                       ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.3)
    bedrock_server.set_default("cloud answer")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                                 calibrator=RollingQuantileThreshold(target_rate=0.3),
                                 cloud_retry=NO_RETRY)
    assert _routing(router.invoke("hi", threshold=0.99))["threshold"] == 0.99  # holds today
    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    message = configurable.invoke("hi", {"configurable": {"threshold": 0.99}})
    assert _routing(message)["threshold"] == 0.99
    assert message.content == "cloud answer"


def test_with_retry_reruns_the_whole_route_and_counts_each_attempt(ollama_chat, bedrock_chat,
                                                                   ollama_backend,
                                                                   ollama_server,
                                                                   bedrock_server):
    stats = RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                                 cloud_retry=NO_RETRY, stats=stats)
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.fail(None, "ThrottlingException", times=1)
    bedrock_server.set_default("cloud answer")
    retried = router.with_retry(stop_after_attempt=2, wait_exponential_jitter=False,
                                retry_if_exception_type=(CloudEscalationError,))
    assert retried.invoke("hi").content == "cloud answer"
    assert len(_local(ollama_server)) == 2 and len(bedrock_server.requests) == 2
    assert stats.snapshot()["calls"] == 2
    # Bad input is not retried into requests: typed, and nothing is sent.
    with pytest.raises(InvalidInputError):
        retried.invoke("   ")
    assert len(_local(ollama_server)) == 2 and len(bedrock_server.requests) == 2


def test_with_fallbacks_takes_over_only_when_the_router_fails(router, ollama_chat,
                                                             ollama_backend, ollama_server,
                                                             bedrock_server):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.fail("broken", "ValidationException")
    bedrock_server.set_default("cloud answer")
    fallback = RunnableLambda(lambda _: AIMessage("fallback answer"))
    chain = router.with_fallbacks([fallback]) | StrOutputParser()
    assert chain.invoke("a broken question") == "fallback answer"
    assert chain.invoke("a fine question") == "cloud answer"
    assert len(_local(ollama_server)) == 2 and len(bedrock_server.requests) == 2


def test_runnable_parallel_with_the_router_twice_keeps_two_records(router, ollama_backend,
                                                                   ollama_server,
                                                                   bedrock_server):
    stats = RoutingStats()
    router.stats = stats
    ollama_backend.set_default("Paris", logprobs=-0.3)
    bedrock_server.set_default("cloud answer")
    both = RunnableParallel(lenient=router, strict=router.bind(threshold=0.99))
    out = both.invoke("Capital of France?")
    assert (_routing(out["lenient"])["decision"], _routing(out["strict"])["decision"]) == (
        "local", "cloud")
    assert out["lenient"].content == "Paris" and out["strict"].content == "cloud answer"
    assert len(_local(ollama_server)) == 2 and len(bedrock_server.requests) == 1
    assert stats.snapshot()["calls"] == 2


async def test_batch_return_exceptions_keeps_every_slot(router, ollama_backend, ollama_server,
                                                        bedrock_server):
    ollama_backend.add_answer("France", "Paris", logprobs=-0.01)
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.fail("Atlantis", "ValidationException")
    bedrock_server.set_default("cloud answer")
    inputs = ["Capital of France?", "   ", "Capital of Atlantis?", 42, "Capital of Peru?"]
    for results in (router.batch(inputs, return_exceptions=True),
                    await router.abatch(inputs, return_exceptions=True)):
        assert [type(r).__name__ for r in results] == [
            "AIMessage", "InvalidInputError", "CloudEscalationError", "InvalidTypeError",
            "AIMessage"]
        assert results[0].content == "Paris" and results[4].content == "cloud answer"
        assert all(isinstance(r, ConfidenceRouterError) for r in results[1:4])
        assert results[2].routing["reason"] == Reason.LOW_CONFIDENCE
    # Per batch: France, Atlantis and Peru reach the local tier; Atlantis and Peru the cloud.
    assert len(_local(ollama_server)) == 6 and len(bedrock_server.requests) == 4


async def test_abatch_honours_max_concurrency(router, ollama_backend, ollama_server,
                                              bedrock_server):
    in_flight, peak = 0, 0
    original = ollama_backend.chat

    def counted(request):
        nonlocal in_flight, peak
        reply = original(request)
        tokens = reply.tokens

        def tracked():
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                yield from tokens
            finally:
                in_flight -= 1

        reply.tokens = tracked()
        return reply

    ollama_backend.chat = counted
    ollama_backend.set_default("Paris", logprobs=-0.01)
    ollama_backend.delay(None, 0.05)
    results = await router.abatch([f"question {i}" for i in range(6)],
                                  config={"max_concurrency": 1})
    assert [r.content for r in results] == ["Paris"] * 6
    assert peak == 1 and len(_local(ollama_server)) == 6 and bedrock_server.requests == []


# =============================================================================================
# 3. streams the consumer abandons; events, logs and callbacks count once
# =============================================================================================


@pytest.fixture
def budgeted(ollama_chat, bedrock_chat, ollama_backend, bedrock_server):
    """An unsure local answer, a slow cloud stream, a budget and stats."""
    ollama_backend.set_default("unsure maybe", logprobs=-3.0)
    bedrock_server.add_answer(None, "a b c d e f g h i j", piece_delay=0.02)
    budget, stats = CloudBudget(max_usd=1.0), RoutingStats()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                                 budget=budget, stats=stats, cloud_retry=NO_RETRY)
    return router, budget, stats


def _settled_once(budget, stats, ollama_server, bedrock_server, calls=1):
    snapshot = budget.snapshot()
    assert snapshot["reserved_usd"] == 0 and snapshot["pending"] == 0
    assert snapshot["granted"] == calls and budget.spent > 0
    assert stats.snapshot()["calls"] == calls
    assert len(_local(ollama_server)) == calls and len(bedrock_server.requests) == calls


@pytest.mark.parametrize("how", ["close", "garbage-collected", "chain break"])
def test_sync_stream_abandoned_after_the_first_chunk(budgeted, ollama_server, bedrock_server,
                                                     how):
    router, budget, stats = budgeted
    if how == "chain break":
        chain = ChatPromptTemplate.from_template("{q}") | router | StrOutputParser()
        for _ in chain.stream({"q": "question"}):
            break
    else:
        stream = router.stream("question")
        next(stream)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    _settled_once(budget, stats, ollama_server, bedrock_server)


@pytest.mark.parametrize("how", ["aclose", "garbage-collected"])
async def test_async_stream_abandoned_after_the_first_chunk(budgeted, ollama_server,
                                                            bedrock_server, how):
    router, budget, stats = budgeted
    stream = router.astream("question")
    await anext(stream)
    if how == "aclose":
        await stream.aclose()
    else:
        del stream
        gc.collect()
        for _ in range(500):  # the loop runs the finaliser of the abandoned generator
            if budget.snapshot()["pending"] == 0:
                break
            await asyncio.sleep(0.01)
    _settled_once(budget, stats, ollama_server, bedrock_server)


async def test_async_chain_abandoned_after_the_first_chunk_settles_when_collected(
    budgeted, ollama_server, bedrock_server
):
    # LangChain's atransform never closes the router's astream when a chain's consumer stops
    # (async generators are not closed with their consumer), so the call is settled when the
    # abandoned generators are collected -- once, as a call whose stream was dropped.
    router, budget, stats = budgeted
    chain = ChatPromptTemplate.from_template("{q}") | router | StrOutputParser()
    stream = chain.astream({"q": "question"})
    async for _ in stream:
        break
    await stream.aclose()
    del stream
    gc.collect()
    for _ in range(500):  # the loop runs the finalisers of the abandoned generators
        if budget.snapshot()["pending"] == 0:
            break
        await asyncio.sleep(0.01)
    _settled_once(budget, stats, ollama_server, bedrock_server)


async def test_astream_events_show_one_decision_and_usage_once(budgeted, ollama_server,
                                                               bedrock_server):
    router, budget, stats = budgeted
    events = [e async for e in router.astream_events("question", version="v2")]
    decisions = [e for e in events if e["event"] == "on_custom_event"]
    assert [e["name"] for e in decisions] == ["routing_decision"]
    assert decisions[0]["data"]["decision"] == "cloud"
    ends = {e["name"]: e["data"]["output"] for e in events if e["event"] == "on_chat_model_end"}
    assert set(ends) == {"local", "cloud", "ConfidenceRoutedLLM"}
    routing = _routing(ends["ConfidenceRoutedLLM"])
    # Each tier's usage is reported by its own run, once; the router's run adds none.
    assert ends["ConfidenceRoutedLLM"].usage_metadata is None
    assert ends["local"].usage_metadata["output_tokens"] == routing["usage"]["local"][
        "output_tokens"]
    assert ends["cloud"].usage_metadata["output_tokens"] == routing["usage"]["cloud"][
        "output_tokens"]
    _settled_once(budget, stats, ollama_server, bedrock_server)


async def test_astream_log_carries_the_routed_answer_once(budgeted, ollama_server,
                                                          bedrock_server):
    router, budget, stats = budgeted
    patches = [p async for p in router.astream_log("question")]
    state = _joined(patches).state
    assert "".join(state["streamed_output"][i].text for i in range(
        len(state["streamed_output"]))) == "a b c d e f g h i j"
    assert _routing(state["final_output"])["decision"] == "cloud"
    _settled_once(budget, stats, ollama_server, bedrock_server)


async def test_usage_callback_counts_each_tier_once_on_every_entry_point(budgeted,
                                                                         ollama_server,
                                                                         bedrock_server):
    router, _, _ = budgeted

    async def via(entry, handler):
        config = {"callbacks": [handler]}
        if entry == "invoke":
            return router.invoke("question", config)
        if entry == "ainvoke":
            return await router.ainvoke("question", config)
        if entry == "stream":
            return _joined(list(router.stream("question", config)))
        if entry == "astream":
            return _joined([c async for c in router.astream("question", config)])
        return router.batch(["question"], config)[0]

    for entry in ("invoke", "ainvoke", "stream", "astream", "batch"):
        handler = UsageMetadataCallbackHandler()
        message = await via(entry, handler)
        usage = _routing(message)["usage"]
        counted = {model: u["total_tokens"] for model, u in handler.usage_metadata.items()}
        assert counted == {"scripted-local": usage["local"]["total_tokens"],
                           _routing(message)["models"]["cloud"]: usage["cloud"][
                               "total_tokens"]}, entry
        # What the caller holds is the answering tier's usage, once.
        assert message.usage_metadata["total_tokens"] == usage["cloud"]["total_tokens"], entry


def test_a_kept_local_answers_metadata_is_plain_json(router, ollama_backend):
    ollama_backend.set_default("Paris", logprobs=-0.01)
    message = router.invoke("Capital of France?")
    assert _routing(message)["decision"] == "local"
    assert json.loads(json.dumps(message.response_metadata))["routing"]["decision"] == "local"


# =============================================================================================
# 4. message shapes a chain can hand the router
# =============================================================================================

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")
QUESTION = {"type": "text", "text": "What is this?"}

#: Shapes both tiers can take: answered locally when the local model is sure.
ANSWERED = {
    "name fields": [SystemMessage("Be brief.", name="policy"),
                    HumanMessage("What is this?", name="alice")],
    "ChatPromptValue": ChatPromptValue(messages=[HumanMessage("What is this?")]),
    "StringPromptValue": StringPromptValue(text="What is this?"),
    "a bare string": "What is this?",
    "an image without text": [HumanMessage(content=[
        {"type": "image", "base64": PNG, "mime_type": "image/png"}])],
    "an empty human turn before the question": [HumanMessage(""), HumanMessage("What is this?")],
}


async def test_shapes_both_tiers_take_are_answered_on_every_entry_point(
    router, ollama_backend, ollama_server, bedrock_server
):
    # One test over all shapes: building the router's Bedrock client dominates a test's time.
    ollama_backend.set_default("A pixel.", logprobs=-0.01)
    for shape, given in ANSWERED.items():
        ollama_server.clear_requests()
        answers = [router.invoke(given), await router.ainvoke(given),
                   _joined(list(router.stream(given))),
                   _joined([c async for c in router.astream(given)])]
        assert [a.text for a in answers] == ["A pixel."] * 4, shape
        assert {_routing(a)["reason"] for a in answers} == {Reason.CONFIDENT}, shape
        sent = _local(ollama_server)
        assert len(sent) == 4, shape
        for body in sent:   # never an empty request: the question (or the image) is in it
            assert any(m.get("content", "").strip() or m.get("images")
                       for m in body["messages"]), shape
    assert bedrock_server.requests == []


@pytest.mark.parametrize("cloud_class", ["converse", "invoke"])
def test_shapes_both_tiers_take_are_escalated_intact(request, ollama_backend, ollama_server,
                                                     bedrock_server, cloud_class):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("A single pixel.")
    routed = request.getfixturevalue("router" if cloud_class == "converse" else "invoke_router")
    for shape, given in ANSWERED.items():
        ollama_server.clear_requests()
        bedrock_server.clear_requests()
        message = routed.invoke(given)
        assert message.text == "A single pixel.", shape
        assert _routing(message)["decision"] == "cloud", shape
        assert len(_local(ollama_server)) == 1, shape
        (cloud,) = bedrock_server.requests
        sent = json.dumps(cloud["body"]["messages"])
        assert "What is this?" in sent or PNG[:40] in sent, shape
        for turn in cloud["body"]["messages"]:     # Bedrock rejects an empty turn
            assert turn["content"] not in ("", []), (shape, turn)


#: Shapes neither tier can read: a typed error, and never a request to the cloud.
UNREADABLE = {
    "a block without a type that is not text": [HumanMessage(content=[QUESTION,
                                                                      {"foo": "bar"}])],
    "only a block without a type": [HumanMessage(content=[{"foo": "bar"}])],
    "a dict": {"role": "user", "content": "What is this?"},
    "an image behind an http URL": [HumanMessage(content=[QUESTION, {
        "type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])],
}


def test_shapes_neither_tier_reads_are_typed_errors_without_a_cloud_request(
    router, invoke_router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    for shape, given in UNREADABLE.items():
        for routed in (router, invoke_router):
            with pytest.raises(ConfidenceRouterError):
                routed.invoke(given)
                pytest.fail(shape)
    assert _local(ollama_server) == [] and bedrock_server.requests == []


def test_remove_message_is_invalid_input(router, ollama_server, bedrock_server):
    with pytest.raises(InvalidInputError):
        router.invoke([HumanMessage("What is this?"), RemoveMessage(id="m1")])
    assert _local(ollama_server) == [] and bedrock_server.requests == []


def test_chat_message_with_a_standard_role_is_escalated(router, invoke_router, ollama_backend,
                                                        ollama_server, bedrock_server):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("A single pixel.")
    for routed in (router, invoke_router):
        message = routed.invoke([ChatMessage(role="user", content="What is this?")])
        assert message.text == "A single pixel."
    assert len(bedrock_server.requests) == 2
    with pytest.raises(InvalidInputError):
        router.invoke([ChatMessage(role="critic", content="What is this?")])
    assert len(_local(ollama_server)) == 2


def test_reasoning_blocks_in_history_do_not_lock_the_conversation_in_the_cloud(
    router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.set_default("Paris", logprobs=-0.01)
    history = [
        HumanMessage("Hi"),
        AIMessage(content=[
            {"type": "reasoning_content",
             "reasoning_content": {"text": "greet back", "signature": "sig"}},
            {"type": "text", "text": "Hello!"}]),
        HumanMessage("Capital of France?"),
    ]
    message = router.invoke(history)
    assert _routing(message)["decision"] == "local", _routing(message).get("local_error")
    (local,) = _local(ollama_server)
    assert local["messages"][1] == {"role": "assistant", "content": "Hello!"}
    assert bedrock_server.requests == []


# Bedrock's Anthropic API refuses a conversation with an empty turn ("all messages must have
# non-empty content except for the optional final assistant message"; whitespace-only text
# blocks likewise), and ChatBedrock sends such a turn as it is. The router does not rewrite the
# conversation: the query stays local (flagged, the record says why) and nothing is sent.
EMPTY_TURNS = {
    "empty first human turn": [HumanMessage(""), AIMessage("Hello?"),
                               HumanMessage("What is this?")],
    "whitespace-only AI turn": [HumanMessage("Hi"), AIMessage(" \n "),
                                HumanMessage("What is this?")],
    "tab-only human turn after a system prompt": [
        SystemMessage("Be brief."), HumanMessage("\t"), AIMessage("Hello?"),
        HumanMessage("What is this?")],
}


@pytest.mark.parametrize("conversation", EMPTY_TURNS.values(), ids=EMPTY_TURNS)
def test_an_empty_turn_never_reaches_chat_bedrock(invoke_router, ollama_backend, ollama_server,
                                                  bedrock_server, conversation):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    message = invoke_router.invoke(conversation)
    routing = _routing(message)
    assert message.text == "hmm"
    assert (routing["decision"], routing["flagged"], routing["would_escalate"]) == (
        "local", True, True)
    assert "would reach Bedrock empty" in routing["escalation_skipped"], routing
    assert routing["cloud_attempts"] == 0
    assert bedrock_server.requests == []
    assert len(_local(ollama_server)) == 1


def test_an_empty_turn_stays_local_on_every_entry_point(invoke_router, ollama_backend,
                                                        bedrock_server):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    conversation = EMPTY_TURNS["empty first human turn"]
    streamed = _joined(list(invoke_router.stream(conversation)))
    awaited = asyncio.run(invoke_router.ainvoke(conversation))

    async def astreamed():
        return _joined([chunk async for chunk in invoke_router.astream(conversation)])

    for message in (streamed, awaited, asyncio.run(astreamed())):
        assert message.text == "hmm"
        assert "would reach Bedrock empty" in _routing(message)["escalation_skipped"]
    assert bedrock_server.requests == []


def test_an_empty_turn_with_a_failed_local_model_is_a_typed_error(
    invoke_router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.fail(None, status=500)
    bedrock_server.set_default("cloud answer")
    with pytest.raises(LocalModelError) as caught:
        invoke_router.invoke([HumanMessage(""), AIMessage("Hello?"), HumanMessage("What?")])
    assert "would reach Bedrock empty" in caught.value.routing["escalation_skipped"]
    assert bedrock_server.requests == []


def test_turns_that_carry_something_still_escalate_to_chat_bedrock(
    invoke_router, ollama_backend, bedrock_server
):
    """An AI turn of only tool calls, a tool result and an empty final assistant turn (a
    prefill Bedrock accepts) are not empty turns."""
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    message = invoke_router.invoke([
        HumanMessage("Weather?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {}, "id": "t1"}]),
        ToolMessage("sunny", tool_call_id="t1"),
        HumanMessage("And tomorrow?"),
        AIMessage(""),
    ])
    assert _routing(message)["decision"] == "cloud", _routing(message)
    (cloud,) = bedrock_server.requests
    assert [turn["role"] for turn in cloud["body"]["messages"]] == [
        "user", "assistant", "user", "assistant"]


def test_a_blank_text_block_chat_bedrock_pads_itself_still_escalates(
    invoke_router, ollama_backend, bedrock_server
):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    message = invoke_router.invoke([HumanMessage("Hi"),
                                    AIMessage(content=[{"type": "text", "text": "  "}]),
                                    HumanMessage("What is this?")])
    assert _routing(message)["decision"] == "cloud", _routing(message)
    (cloud,) = bedrock_server.requests
    assert all(block["text"].strip() for block in cloud["body"]["messages"][1]["content"])


def test_converse_pads_empty_turns_itself_so_the_query_escalates(
    router, ollama_backend, bedrock_server
):
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    message = router.invoke([HumanMessage(""), AIMessage("Hello?"), HumanMessage("What is this?")])
    assert _routing(message)["decision"] == "cloud"
    (cloud,) = bedrock_server.requests
    for turn in cloud["body"]["messages"]:
        assert turn["content"] and all(
            str(block.get("text", "x")).strip() for block in turn["content"]), turn


def test_a_conversation_chat_bedrock_cannot_format_stays_local_unsent(
    invoke_router, router, ollama_backend, bedrock_server
):
    """A system message between turns: ChatBedrock (Anthropic) raises before sending, so the
    query stays local with the reason; Converse sends it and the query escalates."""
    ollama_backend.set_default("hmm", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    conversation = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."),
                    SystemMessage("Now in French."), HumanMessage("What is this?")]
    message = invoke_router.invoke(conversation)
    routing = _routing(message)
    assert (message.text, routing["decision"], routing["cloud_attempts"]) == ("hmm", "local", 0)
    assert "non-consecutive system messages" in routing["escalation_skipped"]
    assert bedrock_server.requests == []
    assert _routing(router.invoke(conversation))["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


def test_a_block_no_tier_can_send_is_a_typed_error_with_nothing_sent(router, bedrock_server):
    """Ollama's client refuses the block, so the local tier fails; Converse's formatter would
    raise before sending: a LocalModelError naming both, 0 cloud attempts (it said 1)."""
    weird = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                  {"type": "hologram", "data": "..."}])
    with pytest.raises(LocalModelError) as caught:
        router.invoke([weird])
    routing = caught.value.routing
    assert "cannot format the conversation" in routing["escalation_skipped"], routing
    assert routing["cloud_attempts"] == 0
    assert bedrock_server.requests == []


def test_the_conversation_check_formats_as_each_bedrock_client_does(bedrock_invoke_chat,
                                                                   bedrock_chat):
    empty_turn = [HumanMessage(""), AIMessage("Hello?"), HumanMessage("What is this?")]
    between = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."),
               SystemMessage("French."), HumanMessage("What?")]
    invoke_check = tier_clients.conversation_check(bedrock_invoke_chat())
    converse_check = tier_clients.conversation_check(bedrock_chat())
    assert "would reach Bedrock empty" in invoke_check(empty_turn)
    assert "non-consecutive system messages" in invoke_check(between)
    assert converse_check(empty_turn) is None  # Converse pads blank text itself
    assert converse_check(between) is None
    assert invoke_check([HumanMessage("Hi")]) is converse_check([HumanMessage("Hi")]) is None
    assert tier_clients.conversation_check(
        bedrock_invoke_chat(model_id="meta.llama3-8b-instruct-v1:0")) is None
