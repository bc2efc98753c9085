"""ConfidenceRoutedLlamaIndexLLM as a FunctionCallingLLM: LlamaIndex's FunctionAgent and
AgentWorkflow call a real tool through the router, on the kept (local) path and on the
escalated (cloud) path, over the real ChatOllama / ChatBedrockConverse clients talking HTTP to
the test bed; ``as_structured_llm`` keeps the routing record."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.agent.workflow import (
    AgentOutput,
    AgentWorkflow,
    FunctionAgent,
    ToolCallResult,
)
from llama_index.core.llms import ChatMessage
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from confidence_router import CloudEscalationError, ConfidenceRoutedLLM, RoutingConfigError
from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM, RoutedStructuredLLM
from confidence_router.testing.scripted import last_user_text

PARIS = "What's the weather in Paris?"
NAIROBI = "What's the weather in Nairobi?"


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


class Weather:
    """A real tool that records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_weather(self, city: str) -> str:
        """Get the current weather for a city."""
        self.calls.append(city)
        return f"Sunny, 24 C in {city}"


@pytest.fixture
def weather():
    return Weather()


@pytest.fixture
def tool(weather):
    return FunctionTool.from_defaults(fn=weather.get_weather, name="get_weather")


@pytest.fixture
def llm(ollama_chat, bedrock_chat):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())
    return ConfidenceRoutedLlamaIndexLLM(router=router)


def has_tool_result(request) -> bool:
    """Ollama request (ChatRequest) after a tool ran: a ``tool`` message is in the history."""
    return any(m.get("role") == "tool" for m in request.messages)


def paris_after_tool(request) -> bool:
    return has_tool_result(request) and "Paris" in last_user_text(request.messages)


def bedrock_has_tool_result(record) -> bool:
    return any(
        "toolResult" in block
        for message in record["body"]["messages"]
        for block in message["content"]
    )


@pytest.fixture
def kept_path(ollama_backend):
    """The local model calls the tool confidently, then answers confidently."""
    ollama_backend.add_answer(paris_after_tool, "It is sunny in Paris.", logprobs=-0.05)
    ollama_backend.add_answer(
        "Paris",
        "calling",
        logprobs=-0.02,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )


@pytest.fixture
def escalated_path(ollama_backend, bedrock_server):
    """The local model is unsure at both turns; the cloud calls the tool, then answers."""
    ollama_backend.add_answer("Nairobi", "maybe rain?", logprobs=-4.0)
    bedrock_server.add_answer(bedrock_has_tool_result, "It is sunny in Nairobi.")
    bedrock_server.add_answer(
        "Nairobi",
        "",
        tool_use=[
            {"name": "get_weather", "input": {"city": "Nairobi"}, "toolUseId": "tooluse_nbo"}
        ],
    )


async def run_agent(agent, question: str):
    handler = agent.run(user_msg=question)
    outputs, results = [], []
    async for event in handler.stream_events():
        if isinstance(event, AgentOutput):
            outputs.append(event)
        elif isinstance(event, ToolCallResult):
            results.append(event)
    return await handler, outputs, results


def test_is_a_function_calling_llm(llm):
    assert isinstance(llm, FunctionCallingLLM)
    assert llm.metadata.is_function_calling_model is True


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_kept_path_runs_the_tool_locally(
    llm, tool, weather, kept_path, ollama_server, bedrock_server, streaming
):
    agent = FunctionAgent(tools=[tool], llm=llm, streaming=streaming)
    final, outputs, results = await run_agent(agent, PARIS)
    assert weather.calls == ["Paris"]
    assert [r.tool_output.content for r in results] == ["Sunny, 24 C in Paris"]
    assert str(final.response.content) == "It is sunny in Paris."
    assert [o.raw["routing"]["decision"] for o in outputs] == ["local", "local"]
    chats = ollama_server.requests_to("/api/chat")
    assert len(chats) == 2
    assert chats[0]["body"]["tools"][0]["function"]["name"] == "get_weather"
    tool_messages = [m for m in chats[1]["body"]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["Sunny, 24 C in Paris"]
    assert bedrock_server.requests == []


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_escalated_path_runs_the_clouds_tool_call(
    llm, tool, weather, escalated_path, ollama_server, bedrock_server, streaming
):
    agent = FunctionAgent(tools=[tool], llm=llm, streaming=streaming)
    final, outputs, results = await run_agent(agent, NAIROBI)
    assert weather.calls == ["Nairobi"]
    assert [r.tool_id for r in results] == ["tooluse_nbo"]
    assert str(final.response.content) == "It is sunny in Nairobi."
    assert [o.raw["routing"]["decision"] for o in outputs] == ["cloud", "cloud"]
    assert all(o.raw["routing"]["reason"] == "low_confidence" for o in outputs)
    assert len(ollama_server.requests_to("/api/chat")) == 2
    assert len(bedrock_server.requests) == 2
    first, second = (r["body"] for r in bedrock_server.requests)
    assert first["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    # The tool's output went back to the cloud, answering the cloud's own call.
    results_sent = [
        b["toolResult"] for m in second["messages"] for b in m["content"] if "toolResult" in b
    ]
    assert [r["toolUseId"] for r in results_sent] == ["tooluse_nbo"]
    assert "Sunny, 24 C in Nairobi" in str(results_sent[0]["content"])


async def test_agent_workflow_picks_the_function_agent_and_routes(
    llm, tool, weather, kept_path, escalated_path, bedrock_server
):
    # A plain function, as LlamaIndex users pass them; it becomes a FunctionTool.
    workflow = AgentWorkflow.from_tools_or_functions([weather.get_weather], llm=llm)
    assert all(isinstance(agent, FunctionAgent) for agent in workflow.agents.values())
    final, outputs, _ = await run_agent(workflow, PARIS)
    assert str(final.response.content) == "It is sunny in Paris."
    assert bedrock_server.requests == []
    final, outputs, _ = await run_agent(workflow, NAIROBI)
    assert str(final.response.content) == "It is sunny in Nairobi."
    assert outputs[-1].raw["routing"]["decision"] == "cloud"
    assert weather.calls == ["Paris", "Nairobi"]
    assert len(bedrock_server.requests) == 2


@pytest.mark.parametrize(("on_unknown", "first_step"), [("escalate", "cloud"), ("local", "local")])
async def test_a_bare_local_tool_call_has_unknown_confidence(
    ollama_chat, bedrock_chat, tool, weather, ollama_backend, bedrock_server, on_unknown, first_step
):
    # Real Ollama reports no logprobs for tool-call tokens: a local answer that is only a tool
    # call (no text) has unknown confidence, and on_unknown decides (default: escalate).
    ollama_backend.add_answer(paris_after_tool, "It is sunny in Paris.", logprobs=-0.05)
    ollama_backend.add_answer(
        "Paris", "", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]
    )
    bedrock_server.add_answer(
        "Paris", "", tool_use=[{"name": "get_weather", "input": {"city": "Paris"}}]
    )
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), on_unknown=on_unknown)
    agent = FunctionAgent(tools=[tool], llm=ConfidenceRoutedLlamaIndexLLM(router=router))
    final, outputs, _ = await run_agent(agent, PARIS)
    assert weather.calls == ["Paris"]
    assert str(final.response.content) == "It is sunny in Paris."
    first = outputs[0].raw["routing"]
    assert (first["decision"], first["reason"], first["confidence"]) == (
        first_step,
        "confidence_unknown",
        None,
    )
    assert first["signals"]["unknown_reason"] == "no_logprobs"
    assert outputs[1].raw["routing"]["decision"] == "local"
    assert len(bedrock_server.requests) == (1 if first_step == "cloud" else 0)


async def test_local_failure_after_the_tool_ran_escalates_the_next_step(
    llm, tool, weather, ollama_backend, bedrock_server
):
    # Turn 1 is kept locally; the local model then fails (503) on turn 2, so the router
    # escalates that step alone, and the cloud sees the local tool call and its result.
    ollama_backend.fail(has_tool_result, status=503, message="model overloaded")
    ollama_backend.add_answer(
        "Paris",
        "calling",
        logprobs=-0.02,
        tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}],
    )
    bedrock_server.add_answer(bedrock_has_tool_result, "It is sunny in Paris (cloud).")
    final, outputs, _ = await run_agent(FunctionAgent(tools=[tool], llm=llm), PARIS)
    assert weather.calls == ["Paris"]
    assert str(final.response.content) == "It is sunny in Paris (cloud)."
    assert [(o.raw["routing"]["decision"], o.raw["routing"]["reason"]) for o in outputs] == [
        ("local", "confident"),
        ("cloud", "local_error"),
    ]
    (request,) = bedrock_server.requests
    sent = [b for m in request["body"]["messages"] for b in m["content"]]
    assert any(b.get("toolUse", {}).get("name") == "get_weather" for b in sent)
    assert any("Sunny, 24 C in Paris" in str(b.get("toolResult")) for b in sent)


async def test_cloud_failure_in_an_agent_step_surfaces_as_a_typed_error(
    ollama_chat, bedrock_chat, tool, weather, ollama_backend, bedrock_server
):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), cloud_retry=None)
    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    ollama_backend.add_answer("Nairobi", "maybe rain?", logprobs=-4.0)
    bedrock_server.fail("Nairobi", "AccessDeniedException")
    handler = FunctionAgent(tools=[tool], llm=llm, streaming=False).run(user_msg=NAIROBI)
    with pytest.raises(CloudEscalationError) as caught:
        await handler
    assert caught.value.routing["reason"] == "low_confidence"
    assert caught.value.local_message.text == "maybe rain?"
    assert weather.calls == []
    assert len(bedrock_server.requests) == 1


def test_chat_with_tools_required_forces_a_tool_on_the_cloud(
    llm, tool, escalated_path, bedrock_server
):
    response = llm.chat_with_tools([tool], user_msg=NAIROBI, tool_required=True)
    (call,) = llm.get_tool_calls_from_response(response)
    assert (call.tool_name, call.tool_kwargs, call.tool_id) == (
        "get_weather",
        {"city": "Nairobi"},
        "tooluse_nbo",
    )
    assert response.additional_kwargs["routing"]["decision"] == "cloud"
    assert bedrock_server.requests[0]["body"]["toolConfig"]["toolChoice"] == {"any": {}}


def test_predict_and_call_runs_the_tool(llm, tool, weather, kept_path):
    answer = llm.predict_and_call([tool], user_msg=PARIS)
    assert weather.calls == ["Paris"]
    assert answer.response == "Sunny, 24 C in Paris"


def test_parallel_tool_calls_are_cut_to_one_unless_allowed(llm, tool, ollama_backend):
    ollama_backend.add_answer(
        "two cities",
        "calling",
        logprobs=-0.02,
        tool_calls=[
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "Rome"}},
        ],
    )
    one = llm.chat_with_tools([tool], user_msg="Weather in two cities?")
    both = llm.chat_with_tools(
        [tool], user_msg="Weather in two cities?", allow_parallel_tool_calls=True
    )
    assert [c.tool_kwargs["city"] for c in llm.get_tool_calls_from_response(one)] == ["Paris"]
    assert [c.tool_kwargs["city"] for c in llm.get_tool_calls_from_response(both)] == [
        "Paris",
        "Rome",
    ]


def test_no_tool_call_is_an_error_only_when_asked(llm, tool, ollama_backend):
    ollama_backend.add_answer("Paris", "I will not call tools.", logprobs=-0.02)
    response = llm.chat_with_tools([tool], user_msg=PARIS)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(response)


def test_tool_choice_none_sends_no_tools_and_bad_choice_fails(
    llm, tool, ollama_backend, ollama_server
):
    ollama_backend.add_answer("Paris", "Sunny.", logprobs=-0.02)
    llm.chat_with_tools([tool], user_msg=PARIS, tool_choice="none")
    assert not ollama_server.requests_to("/api/chat")[-1]["body"].get("tools")
    with pytest.raises(RoutingConfigError):
        llm.chat_with_tools([tool], user_msg=PARIS, tool_choice={"type": "function"})
    with pytest.raises(RoutingConfigError):
        llm.chat_with_tools([tool], user_msg=PARIS, threshold=2.0)
    assert len(ollama_server.requests_to("/api/chat")) == 1


# -- as_structured_llm ---------------------------------------------------------------------------


def test_structured_llm_keeps_the_routing_kept_and_escalated(llm, ollama_backend, bedrock_server):
    ollama_backend.add_answer(
        "Italy",
        "ok",
        logprobs=-0.02,
        tool_calls=[{"name": "Capital", "arguments": {"country": "Italy", "capital": "Rome"}}],
    )
    ollama_backend.add_answer(
        "Kenya",
        "ok",
        logprobs=-4.0,
        tool_calls=[{"name": "Capital", "arguments": {"country": "Kenya", "capital": "Mombasa"}}],
    )
    bedrock_server.add_answer(
        "Kenya",
        "",
        tool_use=[{"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}],
    )
    sllm = llm.as_structured_llm(Capital)
    assert isinstance(sllm, RoutedStructuredLLM)
    kept = sllm.chat([ChatMessage(role="user", content="Capital of Italy?")])
    assert kept.raw == Capital(country="Italy", capital="Rome")
    assert kept.additional_kwargs["routing"]["decision"] == "local"
    escalated = sllm.complete("Capital of Kenya?")
    assert Capital.model_validate_json(escalated.text) == Capital(
        country="Kenya", capital="Nairobi"
    )
    assert escalated.additional_kwargs["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


async def test_async_structured_llm_keeps_the_routing(llm, ollama_backend):
    ollama_backend.add_answer(
        "Italy",
        "ok",
        logprobs=-0.02,
        tool_calls=[{"name": "Capital", "arguments": {"country": "Italy", "capital": "Rome"}}],
    )
    sllm = llm.as_structured_llm(Capital)
    response = await sllm.achat([ChatMessage(role="user", content="Capital of Italy?")])
    assert response.raw == Capital(country="Italy", capital="Rome")
    assert response.additional_kwargs["routing"]["decision"] == "local"
    # Outside a structured call nothing is captured (no leak between calls).
    plain = await llm.achat([ChatMessage(role="user", content="Capital of Italy?")])
    assert "routing" in plain.additional_kwargs


def test_streamed_escalated_tool_call_never_shows_local_text(llm, tool, escalated_path):
    parts = list(llm.stream_chat_with_tools([tool], user_msg=NAIROBI))
    assert all("maybe rain" not in part.message.content for part in parts)
    (call,) = llm.get_tool_calls_from_response(parts[-1])
    assert (call.tool_name, call.tool_kwargs) == ("get_weather", {"city": "Nairobi"})
    assert parts[-1].additional_kwargs["routing"]["decision"] == "cloud"


async def test_concurrent_agents_each_route_their_own_steps(
    llm, tool, weather, kept_path, escalated_path, ollama_server, bedrock_server
):
    agent = FunctionAgent(tools=[tool], llm=llm)
    runs = await asyncio.gather(*(run_agent(agent, q) for q in [PARIS, NAIROBI] * 3))
    for question, (final, outputs, _) in zip([PARIS, NAIROBI] * 3, runs):
        city, decision = ("Paris", "local") if question == PARIS else ("Nairobi", "cloud")
        assert str(final.response.content) == f"It is sunny in {city}."
        assert [o.raw["routing"]["decision"] for o in outputs] == [decision, decision]
    assert sorted(weather.calls) == ["Nairobi"] * 3 + ["Paris"] * 3
    assert len(ollama_server.requests_to("/api/chat")) == 12
    assert len(bedrock_server.requests) == 6
