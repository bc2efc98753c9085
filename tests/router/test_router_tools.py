"""Tool calling and structured output pass through both tiers."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import RoutingConfigError


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


@pytest.fixture
def router(ollama_chat, bedrock_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())


def test_bind_tools_binds_each_tier_in_its_own_format(router, ollama_backend, bedrock_server,
                                                      ollama_server):
    # The local model calls the tool but is unsure (low logprobs): the cloud's call is used.
    ollama_backend.add_answer("weather", "calling", logprobs=-3.0,
                              tool_calls=[{"name": "get_weather", "arguments": {"city": "Pariss"}}])
    bedrock_server.add_answer("weather", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}, "toolUseId": "t1"}])
    message = router.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    assert message.response_metadata["routing"]["decision"] == "cloud"
    ollama_tools = ollama_server.requests[-1]["body"]["tools"]
    assert ollama_tools[0]["function"]["name"] == "get_weather"
    tool_config = bedrock_server.requests[-1]["body"]["toolConfig"]
    assert tool_config["tools"][0]["toolSpec"]["name"] == "get_weather"


def test_confident_local_tool_call_is_kept(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("weather", "calling", logprobs=-0.01,
                              tool_calls=[{"name": "get_weather", "arguments": {"city": "Rome"}}])
    message = router.bind_tools([get_weather]).invoke("What's the weather in Rome?")
    assert message.tool_calls[0]["args"] == {"city": "Rome"}
    assert message.response_metadata["routing"]["decision"] == "local"
    assert bedrock_server.requests == []


def test_streamed_tool_call_is_kept(router, ollama_backend):
    ollama_backend.add_answer("weather", "calling", logprobs=-0.01,
                              tool_calls=[{"name": "get_weather", "arguments": {"city": "Rome"}}])
    chunks = list(router.bind_tools([get_weather]).stream("What's the weather in Rome?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.tool_calls[0]["args"] == {"city": "Rome"}


def test_with_structured_output(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Italy", "ok", logprobs=-0.02, tool_calls=[
        {"name": "Capital", "arguments": {"country": "Italy", "capital": "Rome"}}])
    result = router.with_structured_output(Capital).invoke("Capital of Italy?")
    assert result == Capital(country="Italy", capital="Rome")


def test_with_structured_output_escalated(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Kenya", "hmm", logprobs=-4.0, tool_calls=[
        {"name": "Capital", "arguments": {"country": "Kenya", "capital": "Mombasa"}}])
    bedrock_server.add_answer("Kenya", "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}])
    raw = router.with_structured_output(Capital, include_raw=True).invoke("Capital of Kenya?")
    assert raw["parsed"] == Capital(country="Kenya", capital="Nairobi")
    assert raw["raw"].response_metadata["routing"]["decision"] == "cloud"


# -- tool_choice as the tiers get it (checked before anything is bound or sent) ------------------

_TOOLS = [{"name": "lookup", "description": "Look up.", "parameters": {"type": "object"}},
          {"name": "convert", "description": "Convert.", "parameters": {"type": "object"}}]


@pytest.mark.parametrize(("choice", "bedrock_gets", "other_gets"), [
    (None, None, None),
    ("auto", "auto", "auto"),
    ("any", "any", "any"),
    ("required", "any", "required"),
    ("lookup", "lookup", "lookup"),
    ({"type": "function", "function": {"name": "convert"}},) * 3,
    ({"type": "tool", "name": "lookup"},) * 3,
    ({"tool": {"name": "convert"}},) * 3,
    ({"any": {}},) * 3,
    ("none", RoutingConfigError, "none"),
    ("lokup", RoutingConfigError, RoutingConfigError),
    ({"type": "function", "function": {"name": "nope"}}, RoutingConfigError, RoutingConfigError),
    (True, RoutingConfigError, RoutingConfigError),  # several tools: which one?
    (5, RoutingConfigError, RoutingConfigError),
])
def test_checked_tool_choice(bedrock_chat, ollama_chat, choice, bedrock_gets, other_gets):
    from confidence_router.tier_clients import checked_tool_choice

    for cloud, expected in ((bedrock_chat(), bedrock_gets), (ollama_chat(), other_gets)):
        if expected is RoutingConfigError:
            with pytest.raises(RoutingConfigError, match="tool_choice"):
                checked_tool_choice(cloud, _TOOLS, choice)
        else:
            assert checked_tool_choice(cloud, _TOOLS, choice) == expected


def test_tool_choice_true_forces_the_one_bound_tool(bedrock_chat):
    from confidence_router.tier_clients import checked_tool_choice

    assert checked_tool_choice(bedrock_chat(), _TOOLS[:1], True) == "lookup"


@pytest.mark.parametrize("tool", [{"not": "a tool"}, 5, None])
def test_a_tool_langchain_cannot_format_is_a_routing_config_error(bedrock_chat, tool):
    from confidence_router.tier_clients import checked_tool_choice

    with pytest.raises(RoutingConfigError, match="cannot use .* as a tool"):
        checked_tool_choice(bedrock_chat(), [tool], None)


# -- tool results Bedrock would refuse (checked before sending) -----------------------------------

_CALL = {"name": "lookup", "args": {"q": "x"}, "id": "c1"}


@pytest.mark.parametrize(("messages", "refused"), [
    ([HumanMessage("q"), AIMessage("", tool_calls=[_CALL]), ToolMessage("r", tool_call_id="c1")],
     False),
    ([HumanMessage("q"), AIMessage("", tool_calls=[_CALL]), ToolMessage("r", tool_call_id="c2")],
     True),
    ([HumanMessage("q"), ToolMessage("r", tool_call_id="c1")], True),
    # Consecutive assistant messages are one turn; a system message is not a turn.
    ([HumanMessage("q"), AIMessage("", tool_calls=[_CALL]), AIMessage("thinking aloud"),
      SystemMessage("s"), ToolMessage("r", tool_call_id="c1")], False),
    # A call answered in a later turn than the one after it: Bedrock refuses it.
    ([HumanMessage("q"), AIMessage("", tool_calls=[_CALL]), ToolMessage("r", tool_call_id="c1"),
      AIMessage("ok"), HumanMessage("more"), ToolMessage("r", tool_call_id="c1")], True),
    # Calls kept as Anthropic content blocks count too.
    ([HumanMessage("q"), AIMessage([{"type": "tool_use", "id": "t9", "name": "lookup",
                                     "input": {}}]), ToolMessage("r", tool_call_id="t9")], False),
])
def test_bedrock_conversation_check_refuses_tool_results_answering_no_call(
    bedrock_chat, bedrock_invoke_chat, ollama_chat, messages, refused
):
    from confidence_router.tier_clients import conversation_check

    for cloud in (bedrock_chat(), bedrock_invoke_chat()):
        why = conversation_check(cloud)(messages)  # type: ignore[misc]
        assert (why is not None and "answers tool call" in why) is refused, (cloud, why)
    assert conversation_check(ollama_chat()) is None
