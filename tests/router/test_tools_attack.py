"""Tool calling through the router, attacked over both Bedrock classes (``api``: Converse and
InvokeModel) with the unchanged ChatOllama / ChatBedrockConverse / ChatBedrock clients.

Promises under test (README "Structured output", "LlamaIndex agents and tools", "Privacy"):

* a local answer that is only a tool call has unknown confidence (Ollama gives no logprobs for
  tool-call tokens): ``on_unknown`` decides, escalate by default;
* ``bind_tools(tools, tool_choice=<a tool name, "any" or "required">)``: a local answer without
  the forced call escalates (``unusable_answer``) and the cloud request carries the tools and
  the choice (Bedrock honours ``tool_choice``);
* ``PIIGuard`` reads tool calls, their arguments and tool results: personal data there keeps
  the query local, nothing is sent;
* streaming buffers the local answer until the decision, then emits one tier's chunks only.

Everything is counted at the fake servers. The fake Bedrock refuses what Bedrock refuses in
tools (names outside ``[a-zA-Z0-9_-]{1,64}``, a forced tool that is not defined, a tool result
answering no tool use).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

from confidence_router import ConfidenceRoutedLLM, PIIGuard
from confidence_router.errors import (
    ConfidenceRouterError,
    RoutingConfigError,
)

ENTRY_POINTS = ["invoke", "ainvoke", "stream", "astream", "batch"]


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"noon in {city}"


@pytest.fixture
def router(ollama_chat, cloud_factory):
    """A router over the ``api`` under test (tests asking for it run over both)."""
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory())


@pytest.fixture
def converse_router(ollama_chat, bedrock_chat):
    """For what the cloud class does not change (how the local answer is judged)."""
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())


async def call(runnable: Any, how: str, value: Any) -> AIMessage:
    """One answer through ``how``; streams are added up (the routing is on the last chunk)."""
    if how == "invoke":
        return runnable.invoke(value)
    if how == "ainvoke":
        return await runnable.ainvoke(value)
    if how == "batch":
        (message,) = runnable.batch([value])
        return message
    chunks: list[AIMessageChunk] = (
        list(runnable.stream(value)) if how == "stream"
        else [chunk async for chunk in runnable.astream(value)]
    )
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def routing(message: AIMessage) -> dict[str, Any]:
    return message.response_metadata["routing"]


def cloud_tools(body: dict[str, Any], api: str) -> list[str]:
    """Names of the tools a cloud request carried."""
    if api == "converse":
        return [t["toolSpec"]["name"] for t in body["toolConfig"]["tools"]]
    return [t["name"] for t in body["tools"]]


def cloud_choice(body: dict[str, Any], api: str) -> Any:
    if api == "converse":
        return body["toolConfig"].get("toolChoice")
    return body.get("tool_choice")


def forced(name: str | None, api: str) -> dict[str, Any]:
    """How each API writes a forced call of ``name`` (``None``: any tool)."""
    if api == "converse":
        return {"any": {}} if name is None else {"tool": {"name": name}}
    return {"type": "any"} if name is None else {"type": "tool", "name": name}


def local_chats(ollama_server) -> list[dict[str, Any]]:
    return [r["body"] for r in ollama_server.requests_to("/api/chat")]


# -- how a tool-calling local answer is judged ----------------------------------------------------


async def test_a_tool_call_only_answer_has_unknown_confidence_and_escalates(
    router, api, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.add_answer("weather", "", tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Pariss"}}])
    bedrock_server.add_answer("weather", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    bound = router.bind_tools([get_weather, get_time])
    for sent, how in enumerate(ENTRY_POINTS, start=1):
        message = await call(bound, how, "What is the weather in Paris?")
        record = routing(message)
        assert (record["decision"], record["reason"], record["confidence"]) == (
            "cloud", "confidence_unknown", None), how
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            ("get_weather", {"city": "Paris"})], how
        assert len(local_chats(ollama_server)) == len(bedrock_server.requests) == sent, how
        assert cloud_tools(bedrock_server.requests[-1]["body"], api) == ["get_weather", "get_time"]


async def test_on_unknown_local_keeps_the_tool_call_flagged(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server
):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), on_unknown="local")
    ollama_backend.add_answer("weather", "", tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}])
    for how in ENTRY_POINTS:
        message = await call(router.bind_tools([get_weather]), how, "What is the weather in Paris?")
        record = routing(message)
        assert (record["decision"], record["reason"], record["flagged"]) == (
            "local", "confidence_unknown", True), how
        assert message.tool_calls[0]["args"] == {"city": "Paris"}, how
    assert bedrock_server.requests == []


def test_text_beside_the_tool_call_is_what_is_scored(converse_router, ollama_backend,
                                                     bedrock_server):
    # Only the text tokens carry logprobs: one unsure token (-4.0) escalates although the
    # tool call itself looks fine; the same call with sure text is kept.
    ollama_backend.add_answer("Rome", ["I", " think"], logprobs=[-0.01, -4.0], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Rome"}}])
    ollama_backend.add_answer("Oslo", ["Checking"], logprobs=[-0.01], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Oslo"}}])
    bedrock_server.add_answer("Rome", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Rome"}}])
    bound = converse_router.bind_tools([get_weather])
    unsure, sure = bound.invoke("What is the weather in Rome?"), bound.invoke("What is the weather in Oslo?")
    assert (routing(unsure)["decision"], routing(unsure)["reason"]) == ("cloud", "low_confidence")
    assert routing(unsure)["signals"]["token_count"] == 2
    assert (routing(sure)["decision"], sure.tool_calls[0]["args"]) == ("local", {"city": "Oslo"})
    assert len(bedrock_server.requests) == 1


# -- escalating a tool-calling turn ------------------------------------------------------------------


@pytest.mark.parametrize(("tool_choice", "name"), [("get_time", "get_time"), ("any", None)])
async def test_forced_choice_escalates_with_the_tools_and_the_choice(
    router, api, ollama_backend, ollama_server, bedrock_server, tool_choice, name
):
    # A confident answer without the forced call is unusable: the cloud gets the tools and
    # the choice, in its own API's form.
    ollama_backend.add_answer("time", "It is noon.", logprobs=-0.01)
    bedrock_server.add_answer("time", "", tool_use=[{"name": "get_time", "input": {"city": "Lima"}}])
    bound = router.bind_tools([get_weather, get_time], tool_choice=tool_choice)
    for sent, how in enumerate(ENTRY_POINTS, start=1):
        message = await call(bound, how, "What time is it in Lima?")
        assert (routing(message)["decision"], routing(message)["reason"]) == (
            "cloud", "unusable_answer"), how
        assert message.tool_calls[0]["name"] == "get_time", how
        assert len(bedrock_server.requests) == sent, how
        body = bedrock_server.requests[-1]["body"]
        assert cloud_tools(body, api) == ["get_weather", "get_time"], how
        assert cloud_choice(body, api) == forced(name, api), how
    # Ollama cannot force a call: it got the tools, never a tool_choice.
    locals_ = local_chats(ollama_server)
    assert len(locals_) == len(ENTRY_POINTS)
    for local in locals_:
        assert [t["function"]["name"] for t in local["tools"]] == ["get_weather", "get_time"]
        assert "tool_choice" not in local


def test_a_forced_call_the_local_model_made_is_kept(converse_router, ollama_backend,
                                                    bedrock_server):
    ollama_backend.add_answer("time", "ok", logprobs=-0.01, tool_calls=[
        {"name": "get_time", "arguments": {"city": "Lima"}}])
    message = converse_router.bind_tools([get_weather, get_time], tool_choice="get_time").invoke(
        "What time is it in Lima?")
    assert routing(message)["decision"] == "local"
    assert message.tool_calls[0]["name"] == "get_time"
    assert bedrock_server.requests == []


def test_required_reaches_bedrock_as_any(router, api, ollama_backend, bedrock_server):
    ollama_backend.add_answer("time", "It is noon.", logprobs=-0.01)
    bedrock_server.add_answer("time", "", tool_use=[{"name": "get_time", "input": {"city": "Lima"}}])
    message = router.bind_tools([get_weather, get_time], tool_choice="required").invoke(
        "What time is it in Lima?")
    assert message.tool_calls[0]["name"] == "get_time"
    assert cloud_choice(bedrock_server.requests[0]["body"], api) == forced(None, api)


def test_a_tool_choice_the_cloud_cannot_send_fails_at_bind_time(
    router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.add_answer("time", "maybe", logprobs=-3.0)
    for tool_choice in ("none", "get_tmie", True, 5):
        with pytest.raises(ConfidenceRouterError, match="tool_choice"):
            router.bind_tools([get_weather, get_time], tool_choice=tool_choice).invoke(
                "What time is it in Lima?")
        assert ollama_server.requests == [] and bedrock_server.requests == [], tool_choice


# -- tools the cloud refuses ------------------------------------------------------------------------

BAD_NAME = {"type": "function", "function": {
    "name": "get weather!", "description": "Weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_a_tool_name_bedrock_refuses_is_refused_at_bind_time(
    router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.add_answer("weather", "maybe", logprobs=-3.0)
    for name in ("get weather!", "x" * 65, "naïve"):
        tool = {"type": "function", "function": {**BAD_NAME["function"], "name": name}}
        with pytest.raises(RoutingConfigError, match="Bedrock refuses the tool names"):
            router.bind_tools([tool])
    assert ollama_server.requests == [] and bedrock_server.requests == []
    # 64 characters of the allowed alphabet are fine.
    router.bind_tools([{"type": "function",
                        "function": {**BAD_NAME["function"], "name": "a-Z_9" + "x" * 59}}])


def test_a_refused_escalation_falls_back_to_the_local_answer(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server
):
    """Bedrock refuses the request (ValidationException): not retried, and with
    on_cloud_error="local" the local answer is served, flagged."""
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                 on_cloud_error="local")
    ollama_backend.add_answer("weather", "maybe", logprobs=-3.0)
    bedrock_server.fail("weather", "ValidationException")
    message = router.bind_tools([get_weather]).invoke(conversation("sunny"))
    assert (routing(message)["decision"], routing(message)["reason"]) == ("local", "cloud_error")
    assert message.content == "maybe" and routing(message)["flagged"] is True
    assert routing(message)["cloud_attempts"] == 1 and len(bedrock_server.requests) == 1


def test_a_tool_name_bedrock_refuses_is_never_sent(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("weather", "maybe", logprobs=-3.0)
    with pytest.raises(RoutingConfigError, match="get weather!"):
        router.bind_tools([BAD_NAME]).invoke("What is the weather in Paris?")
    assert bedrock_server.requests == []


def test_an_unconvertible_tool_is_a_typed_error(converse_router, ollama_server, bedrock_server):
    for bad in ({"not": "a tool"}, 5):
        with pytest.raises(ConfidenceRouterError):
            converse_router.bind_tools([bad])
    assert ollama_server.requests == [] and bedrock_server.requests == []


# -- conversations with tool results ------------------------------------------------------------------


def conversation(result: Any, *, args: dict[str, Any] | None = None,
                 result_id: str = "call_1") -> list[Any]:
    return [
        HumanMessage("What's the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": args or {"city": "Paris"},
                                   "id": "call_1"}]),
        ToolMessage(result, tool_call_id=result_id),
    ]


async def test_a_tool_result_turn_escalates_with_matching_ids(
    router, api, ollama_backend, bedrock_server
):
    ollama_backend.add_answer("weather", "It is sunny", logprobs=-3.0)
    bedrock_server.add_answer("weather", "Sunny in Paris.")
    for how in ENTRY_POINTS:
        message = await call(router.bind_tools([get_weather]), how, conversation("sunny, 24C"))
        assert (routing(message)["decision"], message.text) == ("cloud", "Sunny in Paris."), how
    assert len(bedrock_server.requests) == len(ENTRY_POINTS)
    # Every entry point sent the same conversation.
    assert len({json.dumps(r["body"]["messages"]) for r in bedrock_server.requests}) == 1
    sent = bedrock_server.requests[0]["body"]["messages"]
    if api == "converse":
        use = sent[1]["content"][0]["toolUse"]
        result = sent[2]["content"][0]["toolResult"]
        assert (use["toolUseId"], result["toolUseId"]) == ("call_1", "call_1")
        assert result["content"] == [{"text": "sunny, 24C"}]
    else:
        use, result = sent[1]["content"][0], sent[2]["content"][0]
        assert (use["type"], use["id"]) == ("tool_use", "call_1")
        assert (result["type"], result["tool_use_id"], result["content"]) == (
            "tool_result", "call_1", "sunny, 24C")
    assert use["input"] == {"city": "Paris"}


async def test_a_tool_result_answering_no_call_is_never_sent(
    router, ollama_backend, ollama_server, bedrock_server
):
    """Bedrock refuses a tool result answering no call of the turn before: the query stays
    local, flagged, nothing sent (it failed after one refused request)."""
    ollama_backend.add_answer("weather", "It is sunny", logprobs=-3.0)
    for how in ENTRY_POINTS:
        message = await call(router.bind_tools([get_weather]), how,
                             conversation("sunny", result_id="call_9"))
        record = routing(message)
        assert record["decision"] == "local" and record["flagged"] is True, how
        assert "'call_9'" in record["escalation_skipped"], how
        assert "cloud cannot send it" in record["escalation_skipped"], how
    assert bedrock_server.requests == []
    assert len(local_chats(ollama_server)) == len(ENTRY_POINTS)


PII_RESULTS = [
    ("sunny; write to jane.doe@example.com", {}, "email"),
    ([{"type": "text", "text": "paid with 4111 1111 1111 1111"}], {}, "card"),
    ('{"iban": "DE89370400440532013000"}', {}, "IBAN"),
    ("sunny", {"city": "bob@example.org"}, "email"),  # in the earlier call's arguments
]


async def test_personal_data_in_tool_turns_never_leaves(
    ollama_chat, cloud_factory, ollama_backend, bedrock_server
):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(),
                                 escalation_guard=PIIGuard())
    ollama_backend.add_answer("weather", "It is sunny", logprobs=-3.0)
    bedrock_server.set_default("should never be asked")
    bound = router.bind_tools([get_weather])
    for result, args, kind in PII_RESULTS:
        for how in ENTRY_POINTS:
            message = await call(bound, how, conversation(result, args=args))
            record = routing(message)
            assert (record["decision"], record["would_escalate"], record["escalated"]) == (
                "local", True, False), (how, kind)
            assert record["escalation_skipped"].startswith("escalation guard:")
            assert kind.lower() in record["escalation_skipped"].lower(), (how, kind)
            assert message.text == "It is sunny"
    assert bedrock_server.requests == []
    # The same turn without personal data does escalate (the guard is what kept them local).
    assert routing(bound.invoke(conversation("sunny")))["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


# -- parallel and streamed tool calls ------------------------------------------------------------


async def test_parallel_tool_calls_from_either_tier(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Oslo", "Checking both", logprobs=-0.01, tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_time", "arguments": {"city": "Oslo"}}])
    ollama_backend.add_answer("Lima", "Checking both", logprobs=-3.0, tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Lma"}},
        {"name": "get_time", "arguments": {"city": "Lma"}}])
    bedrock_server.add_answer("Lima", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Lima"}},
        {"name": "get_time", "input": {"city": "Lima"}}], tool_input_chunk=4)
    bound = router.bind_tools([get_weather, get_time])
    for how in ENTRY_POINTS:
        kept = await call(bound, how, "The weather and time in Oslo?")
        escalated = await call(bound, how, "The weather and time in Lima?")
        assert routing(kept)["decision"] == "local", how
        assert [(c["name"], c["args"]) for c in kept.tool_calls] == [
            ("get_weather", {"city": "Oslo"}), ("get_time", {"city": "Oslo"})], how
        assert routing(escalated)["decision"] == "cloud", how
        assert [(c["name"], c["args"]) for c in escalated.tool_calls] == [
            ("get_weather", {"city": "Lima"}), ("get_time", {"city": "Lima"})], how
        ids = [c["id"] for c in escalated.tool_calls]
        assert len(set(ids)) == 2 and all(ids), how
    assert len(bedrock_server.requests) == len(ENTRY_POINTS)


async def test_a_tool_call_streamed_in_many_pieces_is_whole_and_only_the_clouds(
    router, api, ollama_backend, bedrock_server
):
    # The local answer (an unsure token, a call with a wrong city) is buffered and dropped;
    # the cloud's call arrives in 3-character pieces of its input JSON and adds up whole.
    ollama_backend.add_answer("Rome", ["Calling", " maybe"], logprobs=[-0.01, -5.0], tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Roma-local"}}])
    city = "Rome, Lazio, Italia"
    bedrock_server.add_answer("Rome", "", tool_use=[
        {"name": "get_weather", "input": {"city": city, "units": "metric"}}], tool_input_chunk=3)
    bound = router.bind_tools([get_weather])
    check_streamed_call(list(bound.stream("What is the weather in Rome?")), city)
    check_streamed_call([chunk async for chunk in bound.astream("What is the weather in Rome?")],
                        city)
    operation = "converse-stream" if api == "converse" else "invoke-with-response-stream"
    assert [r["operation"] for r in bedrock_server.requests] == [operation, operation]


def check_streamed_call(chunks: list[AIMessageChunk], city: str) -> None:
    pieces = [c for chunk in chunks for c in chunk.tool_call_chunks]
    assert len(pieces) >= len(json.dumps({"city": city, "units": "metric"})) // 3
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [
        ("get_weather", {"city": city, "units": "metric"})]
    assert routing(total)["decision"] == "cloud"
    assert not any("Roma-local" in json.dumps(chunk.tool_call_chunks) or "maybe" in chunk.text
                   for chunk in chunks)


async def test_batch_of_tool_turns_each_gets_its_own_tier(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Oslo", "", logprobs=-0.01, tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Oslo"}}])  # unknown confidence
    ollama_backend.add_answer("Rome", "Sunny", logprobs=-0.01)      # confident text
    bedrock_server.add_answer("Oslo", "", tool_use=[{"name": "get_weather", "input": {"city": "Oslo"}}])
    bound = router.bind_tools([get_weather])
    questions = ["What is the weather in Oslo?", "What is the weather in Rome?"] * 3
    outs = await bound.abatch(questions)
    assert [routing(m)["decision"] for m in outs] == ["cloud", "local"] * 3
    assert all(m.tool_calls[0]["args"] == {"city": "Oslo"} for m in outs[::2])
    assert len(bedrock_server.requests) == 3


async def test_early_exit_on_a_tool_calling_turn_escalates_with_the_tools(
    ollama_chat, cloud_factory, api, ollama_backend, bedrock_server
):
    # The unsure second token ends the local answer at once; the cloud gets the tools and
    # its call is the only one streamed.
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(), early_exit=True,
                                 signal="min_logprob")
    ollama_backend.add_answer("Rome", ["I", " think", " so", " yes"],
                              logprobs=[-0.01, -6.0, -0.01, -0.01],
                              tool_calls=[{"name": "get_weather", "arguments": {"city": "Roma"}}])
    bedrock_server.add_answer("Rome", "", tool_use=[
        {"name": "get_weather", "input": {"city": "Rome"}}])
    bound = router.bind_tools([get_weather, get_time])
    for how in ENTRY_POINTS:
        message = await call(bound, how, "What is the weather in Rome?")
        record = routing(message)
        assert (record["decision"], record["reason"]) == ("cloud", "early_exit"), how
        assert record["early_exit"]["tokens"] == 2, how
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            ("get_weather", {"city": "Rome"})], how
    assert len(bedrock_server.requests) == len(ENTRY_POINTS)
    for request in bedrock_server.requests:
        assert cloud_tools(request["body"], api) == ["get_weather", "get_time"]


def test_kept_unknown_answers_must_still_make_the_forced_call(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server
):
    # on_unknown="local" keeps a tool-call-only answer, but not one calling the wrong tool.
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), on_unknown="local")
    ollama_backend.add_answer("Oslo", "", tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Oslo"}}])
    bedrock_server.add_answer("Oslo", "", tool_use=[{"name": "get_time", "input": {"city": "Oslo"}}])
    forced_time = router.bind_tools([get_weather, get_time], tool_choice="get_time")
    message = forced_time.invoke("What time is it in Oslo?")
    assert (routing(message)["decision"], routing(message)["reason"]) == ("cloud", "unusable_answer")
    assert message.tool_calls[0]["name"] == "get_time"
    free = router.bind_tools([get_weather, get_time]).invoke("What time is it in Oslo?")
    assert (routing(free)["decision"], routing(free)["flagged"]) == ("local", True)
    assert len(bedrock_server.requests) == 1
