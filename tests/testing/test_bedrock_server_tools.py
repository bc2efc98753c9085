"""FakeBedrockServer refuses what Bedrock refuses in tools, and streams tool input in pieces.

Plain boto3 ``bedrock-runtime`` calls (Converse and InvokeModel), so the bodies are exactly
those written here; each refused request is still recorded and uses up no answer rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from confidence_router.errors import InvalidArgumentError
from confidence_router.testing import FakeBedrockServer

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.fixture(scope="module")
def runtime(_bedrock_server_session: FakeBedrockServer) -> Iterator[Any]:
    client = boto3.client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=_bedrock_server_session.url,
        aws_access_key_id="test", aws_secret_access_key="test",
        config=Config(retries={"total_max_attempts": 1}, read_timeout=5),
    )
    yield client
    client.close()


def spec(name: str) -> dict[str, Any]:
    return {"toolSpec": {"name": name, "inputSchema": {"json": SCHEMA}}}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"text": text}]}


TOOL_TURNS = [
    user("weather?"),
    {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}}}]},
]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"toolConfig": {"tools": [spec("get weather")]}}, "must match the pattern"),
        ({"toolConfig": {"tools": [spec("x" * 65)]}}, "must match the pattern"),
        ({"toolConfig": {"tools": [spec("get_weather")],
                         "toolChoice": {"tool": {"name": "get_time"}}}}, "is not defined"),
        ({"messages": [*TOOL_TURNS, {"role": "user", "content": [
            {"toolResult": {"toolUseId": "t2", "content": [{"text": "sunny"}]}}]}]},
         "answers no toolUse"),
    ],
)
def test_converse_refuses_bad_tools(bedrock_server, runtime, kwargs, message):
    rule = bedrock_server.add_answer(None, "never")
    request = {"messages": [user("weather?")], **kwargs}
    with pytest.raises(runtime.exceptions.ValidationException, match=message):
        runtime.converse(modelId=MODEL, **request)
    assert rule.calls == 0 and len(bedrock_server.requests) == 1


def test_converse_accepts_good_tools_and_matching_results(bedrock_server, runtime):
    bedrock_server.add_answer(None, "Sunny.")
    reply = runtime.converse(modelId=MODEL, messages=[*TOOL_TURNS, {"role": "user", "content": [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}}]}],
        toolConfig={"tools": [spec("get_weather"), spec("get-time_2")],
                    "toolChoice": {"tool": {"name": "get-time_2"}}})
    assert reply["output"]["message"]["content"] == [{"text": "Sunny."}]


def anthropic(**extra: Any) -> str:
    tools = [{"name": "get_weather", "input_schema": SCHEMA}]
    return json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "weather?"}],
                       "tools": tools, **extra})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (anthropic(tools=[{"name": "get weather!", "input_schema": SCHEMA}]), "pattern"),
        (anthropic(tool_choice={"type": "tool", "name": "none"}), "is not defined"),
        (anthropic(tool_choice={"weird": 1}), "unknown type"),
        (anthropic(messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t9", "content": "sunny"}]}]),
         "answers no tool_use"),
    ],
)
def test_invoke_refuses_bad_tools(bedrock_server, runtime, body, message):
    rule = bedrock_server.add_answer(None, "never")
    with pytest.raises(runtime.exceptions.ValidationException, match=message):
        runtime.invoke_model(modelId=MODEL, body=body)
    assert rule.calls == 0 and len(bedrock_server.requests) == 1


def test_invoke_accepts_none_any_and_defined_tool_choices(bedrock_server, runtime):
    bedrock_server.add_answer(None, "ok")
    for choice in ({"type": "none"}, {"type": "any"}, {"type": "tool", "name": "get_weather"}):
        reply = json.loads(runtime.invoke_model(modelId=MODEL, body=anthropic(
            tool_choice=choice))["body"].read())
        assert reply["content"][0]["text"] == "ok"


def test_tool_input_streams_in_pieces(bedrock_server, runtime):
    tool_input = {"city": "Rio de Janeiro"}
    bedrock_server.add_answer(None, "", tool_use=[{"name": "get_weather", "input": tool_input}],
                              tool_input_chunk=5)
    events = runtime.converse_stream(modelId=MODEL, messages=[user("weather?")],
                                     toolConfig={"tools": [spec("get_weather")]})["stream"]
    pieces = [e["contentBlockDelta"]["delta"]["toolUse"]["input"]
              for e in events if "contentBlockDelta" in e]
    assert "".join(pieces) == json.dumps(tool_input)
    assert len(pieces) == -(-len(json.dumps(tool_input)) // 5)
    assert all(len(piece) <= 5 for piece in pieces)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_tool_input_chunk_is_validated(bad):
    with pytest.raises(InvalidArgumentError, match="tool_input_chunk"):
        FakeBedrockServer().add_answer(None, "", tool_input_chunk=bad)
