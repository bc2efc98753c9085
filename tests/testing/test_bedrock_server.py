"""FakeBedrockServer against the real ChatBedrockConverse, ChatBedrock and boto3 clients."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from langchain_aws import ChatBedrock, ChatBedrockConverse
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field

from confidence_router.testing import BEDROCK_ERROR_STATUS, FakeBedrockServer, encode_event_frame

# A streaming-capable provider: for unknown providers ChatBedrockConverse silently falls back
# to the non-streaming Converse API when .stream() is called.
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
# botocore counts ``max_attempts`` as retries (1 → two attempts); total_max_attempts is exact.
NO_RETRY = Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5)


def _client_kwargs(server: FakeBedrockServer) -> dict[str, object]:
    return {
        "region_name": "us-east-1",
        "endpoint_url": server.url,
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
        "config": NO_RETRY,
    }


@pytest.fixture(scope="module")
def cloud(_bedrock_server_session: FakeBedrockServer) -> ChatBedrockConverse:
    """One ChatBedrockConverse for the module (each instance builds boto3 clients, ~0.15 s)."""
    return ChatBedrockConverse(model=MODEL, **_client_kwargs(_bedrock_server_session))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runtime(_bedrock_server_session: FakeBedrockServer) -> Iterator[object]:
    """A plain boto3 bedrock-runtime client pointed at the fake."""
    client = boto3.client("bedrock-runtime", **_client_kwargs(_bedrock_server_session))  # type: ignore[call-overload]
    yield client
    client.close()


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str = Field(description="City name")


# =============================================================================================
# Event-stream framing
# =============================================================================================


def test_event_frame_is_parsed_by_botocore() -> None:
    frame = encode_event_frame(
        {":event-type": "messageStart", ":message-type": "event"}, b'{"role":"assistant"}'
    )
    buffer = EventStreamBuffer()
    buffer.add_data(frame[:7])  # partial frames wait for more data
    assert list(buffer) == []
    buffer.add_data(frame[7:])
    (message,) = list(buffer)
    assert message.headers == {":event-type": "messageStart", ":message-type": "event"}
    assert message.payload == b'{"role":"assistant"}'


def test_corrupted_frame_fails_the_crc_check() -> None:
    frame = bytearray(encode_event_frame({":event-type": "x"}, b"{}"))
    frame[-5] ^= 0xFF  # flip a payload byte
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(frame))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


# =============================================================================================
# ChatBedrockConverse
# =============================================================================================


def test_invoke_returns_text_usage_and_records_the_request(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    rule = bedrock_server.add_answer(
        "capital of France", "Paris.", input_tokens=12, output_tokens=2
    )
    reply = cloud.invoke(
        [SystemMessage("Be brief."), HumanMessage("What is the capital of France?")]
    )

    assert reply.content == "Paris."
    assert reply.usage_metadata is not None
    assert (reply.usage_metadata["input_tokens"], reply.usage_metadata["output_tokens"]) == (12, 2)
    assert reply.usage_metadata["total_tokens"] == 14
    assert reply.response_metadata["stopReason"] == "end_turn"
    assert isinstance(reply.response_metadata["metrics"]["latencyMs"], list)  # a list on invoke
    assert rule.calls == 1

    (request,) = bedrock_server.requests
    assert request["model_id"] == MODEL  # URL-decoded (":" travels as "%3A")
    assert request["operation"] == "converse"
    assert request["last_user_text"] == "What is the capital of France?"
    assert request["body"]["system"] == [{"text": "Be brief."}]
    assert request["body"]["messages"][-1]["content"] == [
        {"text": "What is the capital of France?"}
    ]


def test_usage_defaults_to_word_counts(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer(None, "one two three")
    reply = cloud.invoke([SystemMessage("sys prompt"), HumanMessage("four words in here")])
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == 6
    assert reply.usage_metadata["output_tokens"] == 3


def test_stream_yields_pieces_in_order_then_stop_and_metadata(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer("count", ["one", " two", " three"], output_tokens=3)
    chunks = list(cloud.stream("count to three"))

    texts = [c.text for c in chunks if c.text]
    assert texts == ["one", " two", " three"]
    stop = [c for c in chunks if "stopReason" in c.response_metadata]
    assert [c.response_metadata["stopReason"] for c in stop] == ["end_turn"]
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    assert total.text == "one two three"
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 3
    assert isinstance(total.response_metadata["metrics"]["latencyMs"], int)  # an int on stream
    assert bedrock_server.requests[-1]["operation"] == "converse-stream"


def test_piece_delay_streams_incrementally(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer(None, "a b c", piece_delay=0.15)
    started = time.perf_counter()
    arrivals = [time.perf_counter() - started for c in cloud.stream("x") if c.text]
    assert len(arrivals) == 3
    assert arrivals[2] - arrivals[0] >= 0.25  # pieces arrive as produced, not all at the end


async def test_ainvoke_and_astream(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer("France", "Paris is the capital.")
    assert (await cloud.ainvoke("France?")).content == "Paris is the capital."
    texts = [c.text async for c in cloud.astream("France?") if c.text]
    assert texts == ["Paris", " is", " the", " capital."]


def test_default_answer_and_strict_mode(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    assert cloud.invoke("anything").content == "This is the scripted Bedrock answer."
    assert bedrock_server.default_calls == 1
    bedrock_server.set_default(None)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        cloud.invoke("a typo")
    assert excinfo.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "a typo" in excinfo.value.response["Error"]["Message"]


def test_rules_match_by_model_regex_and_times(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer(None, "other model", model="amazon.nova-lite-v1:0")
    once = bedrock_server.add_answer(re.compile(r"capital of \w+"), "first", times=1)
    bedrock_server.add_answer(
        lambda r: r["body"]["inferenceConfig"].get("temperature") == 0, "cold"
    )
    assert cloud.invoke("capital of Peru").content == "first"
    assert cloud.invoke("capital of Peru").content == "This is the scripted Bedrock answer."
    assert cloud.bind(temperature=0).invoke("capital of Peru").content == "cold"
    assert once.calls == 1 and once.exhausted


# =============================================================================================
# Tool use
# =============================================================================================


def test_tool_use_round_trip_invoke(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer(
        "weather", tool_use=[{"name": "GetWeather", "input": {"city": "Paris"}}], times=1
    )
    bedrock_server.add_answer("weather", "It is sunny in Paris.")
    llm = cloud.bind_tools([GetWeather])

    question = HumanMessage("What is the weather in Paris?")
    call = llm.invoke([question])
    assert [(tc["name"], tc["args"]) for tc in call.tool_calls] == [
        ("GetWeather", {"city": "Paris"})
    ]
    assert call.response_metadata["stopReason"] == "tool_use"
    tool_config = bedrock_server.requests[-1]["body"]["toolConfig"]
    assert tool_config["tools"][0]["toolSpec"]["name"] == "GetWeather"

    result = ToolMessage("sunny, 24C", tool_call_id=call.tool_calls[0]["id"])
    final = llm.invoke([question, call, result])
    assert final.content == "It is sunny in Paris."
    last = bedrock_server.requests[-1]
    # The toolResult turn is a user message without text: matching still sees the question.
    assert last["last_user_text"] == "What is the weather in Paris?"
    assert "toolResult" in last["body"]["messages"][-1]["content"][0]


def test_tool_use_in_stream(bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse) -> None:
    bedrock_server.add_answer(
        None,
        "Let me check.",
        tool_use=[
            {"name": "GetWeather", "input": {"city": "Oslo"}, "toolUseId": "tool-1"},
            {"name": "GetWeather", "input": {"city": "Rome"}},
        ],
    )
    total: Any = None
    for chunk in cloud.bind_tools([GetWeather]).stream("weather in Oslo and Rome"):
        total = chunk if total is None else total + chunk
    assert total is not None
    assert total.text == "Let me check."
    assert [tc["args"] for tc in total.tool_calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert total.tool_calls[0]["id"] == "tool-1"  # given explicitly
    assert str(total.tool_calls[1]["id"]).startswith("tooluse_")  # generated
    assert total.response_metadata["stopReason"] == "tool_use"


# =============================================================================================
# Errors
# =============================================================================================


@pytest.mark.parametrize(
    ("error_type", "status"),
    [
        ("ThrottlingException", 429),
        ("ServiceUnavailableException", 503),
        ("ValidationException", 400),
        ("AccessDeniedException", 403),
        ("InternalServerException", 500),
        ("ModelErrorException", 424),
    ],
)
def test_errors_raise_the_modelled_botocore_exception(
    bedrock_server: FakeBedrockServer,
    cloud: ChatBedrockConverse,
    runtime: object,
    error_type: str,
    status: int,
) -> None:
    bedrock_server.fail("fail me", error_type, message="scripted")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        cloud.invoke("please fail me")
    assert type(excinfo.value).__name__ == error_type
    error = excinfo.value.response["Error"]
    assert (error["Code"], error["Message"]) == (error_type, "scripted")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert BEDROCK_ERROR_STATUS[error_type] == status

    modelled = getattr(runtime.exceptions, error_type)  # type: ignore[attr-defined]
    with pytest.raises(modelled):
        runtime.converse(  # type: ignore[attr-defined]
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": "fail me"}]}]
        )


def test_failure_before_stream_starts(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.fail(None, "ServiceUnavailableException")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        list(cloud.stream("x"))
    assert type(excinfo.value).__name__ == "ServiceUnavailableException"
    assert bedrock_server.requests[-1]["operation"] == "converse-stream"


def test_fail_times_then_succeed(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    rule = bedrock_server.fail("busy", "ThrottlingException", times=1)
    answer = bedrock_server.add_answer("busy", "done")
    with pytest.raises(botocore.exceptions.ClientError):
        cloud.invoke("busy?")
    assert cloud.invoke("busy?").content == "done"
    assert (rule.calls, answer.calls) == (1, 1)  # the failure did not use up the answer


def test_mid_stream_exception_event(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse
) -> None:
    bedrock_server.add_answer("story", "once upon a time")
    bedrock_server.fail("story", "ThrottlingException", message="slow down", after_pieces=2)
    received: list[str] = []
    with pytest.raises(botocore.exceptions.EventStreamError) as excinfo:
        for chunk in cloud.stream("tell a story"):
            received.append(chunk.text)
    assert "".join(received) == "once upon"
    assert excinfo.value.response["Error"] == {
        "Code": "throttlingException",
        "Message": "slow down",
    }


def test_latency_makes_a_short_read_timeout_fire(bedrock_server: FakeBedrockServer) -> None:
    bedrock_server.add_answer("slow", "eventually", latency=1.5)
    impatient = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=bedrock_server.url,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"total_max_attempts": 1}, read_timeout=0.2),
    )
    started = time.perf_counter()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        impatient.converse(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": "slow"}]}]
        )
    assert time.perf_counter() - started < 1.2  # the client gave up before the answer
    impatient.close()


def test_plain_boto3_converse_stream(bedrock_server: FakeBedrockServer, runtime: object) -> None:
    bedrock_server.add_answer(None, "hi there", input_tokens=3, output_tokens=2)
    response = runtime.converse_stream(  # type: ignore[attr-defined]
        modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hello"}]}]
    )
    events = list(response["stream"])
    assert [next(iter(e)) for e in events] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert events[-1]["metadata"]["usage"] == {
        "inputTokens": 3,
        "outputTokens": 2,
        "totalTokens": 5,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"error_type": "TeapotException"}, "unknown error_type 'TeapotException'"),
        ({"error_type": "AccessDeniedException", "after_pieces": 1}, "cannot be sent inside"),
        ({"status": 200}, "HTTP error status"),
        ({"times": 0}, "times must be a positive integer"),
    ],
)
def test_fail_validates_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        FakeBedrockServer().fail("x", **kwargs)  # type: ignore[arg-type]


def test_add_answer_validates_arguments() -> None:
    server = FakeBedrockServer()
    with pytest.raises(ValueError, match="input_tokens must be a non-negative int"):
        server.add_answer("x", "y", input_tokens=-1)
    with pytest.raises(TypeError, match="tool_use"):
        server.add_answer("x", tool_use={"name": "f"})  # type: ignore[arg-type]


def test_unknown_operation_and_bad_body(bedrock_server: FakeBedrockServer) -> None:
    import urllib.error
    import urllib.request

    def post(path: str, data: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
        request = urllib.request.Request(bedrock_server.url + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers), json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.load(io.BytesIO(error.read()))

    status, headers, body = post("/model/x/invoke-async", b"{}")
    assert (status, headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")
    status, headers, body = post("/model/x/converse", b'{"messages": "nope"}')
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert body == {"message": "messages must be a list"}


def test_lifecycle() -> None:
    server = FakeBedrockServer()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    with server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
    assert not server.running


# =============================================================================================
# ChatBedrock: InvokeModel / InvokeModelWithResponseStream with Anthropic's messages body
# =============================================================================================


@pytest.fixture(scope="module")
def invoke_cloud(_bedrock_server_session: FakeBedrockServer) -> ChatBedrock:
    """One unchanged ChatBedrock (InvokeModel API) for the module."""
    return ChatBedrock(model_id=MODEL, **_client_kwargs(_bedrock_server_session))  # type: ignore[arg-type]


def _anthropic_events(bedrock_server: FakeBedrockServer, runtime: object, text: str) -> list:
    response = runtime.invoke_model_with_response_stream(  # type: ignore[attr-defined]
        modelId=MODEL,
        body=json.dumps({
            "anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
            "messages": [{"role": "user", "content": text}],
        }),
    )
    return [json.loads(event["chunk"]["bytes"]) for event in response["body"]]


def test_chat_bedrock_invoke_text_usage_and_request(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    rule = bedrock_server.add_answer("capital of France", "Paris.", input_tokens=12,
                                     output_tokens=2)
    reply = invoke_cloud.invoke(
        [SystemMessage("Be brief."), HumanMessage("What is the capital of France?")]
    )

    assert reply.content == "Paris."
    assert reply.usage_metadata is not None
    assert (reply.usage_metadata["input_tokens"], reply.usage_metadata["output_tokens"],
            reply.usage_metadata["total_tokens"]) == (12, 2, 14)
    assert reply.additional_kwargs["stop_reason"] == "end_turn"
    assert reply.response_metadata["stop_reason"] == "end_turn"
    assert rule.calls == 1
    (request,) = bedrock_server.requests
    assert (request["model_id"], request["operation"]) == (MODEL, "invoke")
    assert request["last_user_text"] == "What is the capital of France?"
    body = request["body"]
    assert body["anthropic_version"] == "bedrock-2023-05-31"
    assert body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert body["max_tokens"] == 1024  # ChatBedrock's default; the fake insists on one


def test_chat_bedrock_usage_defaults_to_word_counts(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer(None, "one two three")
    reply = invoke_cloud.invoke([SystemMessage("sys prompt"), HumanMessage("four words in here")])
    assert reply.usage_metadata is not None
    assert (reply.usage_metadata["input_tokens"], reply.usage_metadata["output_tokens"]) == (6, 3)


def test_chat_bedrock_stream_pieces_stop_reason_and_usage(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer("count", ["one", " two", " three"], input_tokens=4, output_tokens=3)
    chunks = list(invoke_cloud.stream("count to three"))

    assert [c.text for c in chunks if c.text] == ["one", " two", " three"]
    stops = [c.response_metadata["stop_reason"] for c in chunks
             if c.response_metadata.get("stop_reason")]
    assert stops == ["end_turn"]
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    assert total.text == "one two three"
    assert total.usage_metadata is not None
    assert (total.usage_metadata["input_tokens"], total.usage_metadata["output_tokens"]) == (4, 3)
    assert bedrock_server.requests[-1]["operation"] == "invoke-with-response-stream"


def test_invoke_stream_wire_events_in_anthropic_order(
    bedrock_server: FakeBedrockServer, runtime: object
) -> None:
    bedrock_server.add_answer(
        None, "hi there", input_tokens=3, output_tokens=5,
        tool_use=[{"name": "GetWeather", "input": {"city": "Oslo"}, "toolUseId": "toolu_x"}],
    )
    events = _anthropic_events(bedrock_server, runtime, "hello")
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == 3
    assert events[5]["content_block"] == {"type": "tool_use", "id": "toolu_x",
                                          "name": "GetWeather", "input": {}}
    assert json.loads(events[6]["delta"]["partial_json"]) == {"city": "Oslo"}
    assert events[8]["delta"]["stop_reason"] == "tool_use"
    assert events[8]["usage"] == {"output_tokens": 5}
    metrics = events[9]["amazon-bedrock-invocationMetrics"]
    assert (metrics["inputTokenCount"], metrics["outputTokenCount"]) == (3, 5)


def test_plain_boto3_invoke_model_reply_and_headers(
    bedrock_server: FakeBedrockServer, runtime: object
) -> None:
    bedrock_server.add_answer("hello", "hi", input_tokens=7, output_tokens=1)
    response = runtime.invoke_model(  # type: ignore[attr-defined]
        modelId=MODEL,
        body=json.dumps({
            "anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
            "system": [{"type": "text", "text": "Be kind."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        }),
    )
    body = json.loads(response["body"].read())
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "hi"}]
    assert (body["stop_reason"], body["usage"]) == ("end_turn",
                                                    {"input_tokens": 7, "output_tokens": 1})
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert (headers["x-amzn-bedrock-input-token-count"],
            headers["x-amzn-bedrock-output-token-count"]) == ("7", "1")


def test_chat_bedrock_tool_use_round_trip(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer(
        "weather", tool_use=[{"name": "GetWeather", "input": {"city": "Paris"}}], times=1
    )
    bedrock_server.add_answer("weather", "It is sunny in Paris.")
    llm = invoke_cloud.bind_tools([GetWeather])

    question = HumanMessage("What is the weather in Paris?")
    call = llm.invoke([question])
    assert [(tc["name"], tc["args"]) for tc in call.tool_calls] == [
        ("GetWeather", {"city": "Paris"})
    ]
    assert str(call.tool_calls[0]["id"]).startswith("toolu_")
    assert call.additional_kwargs["stop_reason"] == "tool_use"
    tools = bedrock_server.requests[-1]["body"]["tools"]
    assert [t["name"] for t in tools] == ["GetWeather"]
    assert tools[0]["input_schema"]["properties"]["city"]["type"] == "string"

    result = ToolMessage("sunny, 24C", tool_call_id=call.tool_calls[0]["id"])
    final = llm.invoke([question, call, result])
    assert final.content == "It is sunny in Paris."
    last = bedrock_server.requests[-1]
    # The tool_result turn is a user message without text: matching still sees the question.
    assert last["last_user_text"] == "What is the weather in Paris?"
    blocks = last["body"]["messages"][-1]["content"]
    assert blocks[0]["type"] == "tool_result"
    assert blocks[0]["tool_use_id"] == call.tool_calls[0]["id"]


def test_chat_bedrock_tool_use_in_stream(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer(
        None,
        "Let me check.",
        tool_use=[
            {"name": "GetWeather", "input": {"city": "Oslo"}, "toolUseId": "toolu_1"},
            {"name": "GetWeather", "input": {"city": "Rome"}},
        ],
    )
    total: Any = None
    for chunk in invoke_cloud.bind_tools([GetWeather]).stream("weather in Oslo and Rome"):
        total = chunk if total is None else total + chunk
    assert total is not None
    assert total.text == "Let me check."
    assert [tc["args"] for tc in total.tool_calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert total.tool_calls[0]["id"] == "toolu_1"
    assert str(total.tool_calls[1]["id"]).startswith("toolu_")


@pytest.mark.parametrize(
    ("scripted", "anthropic"),
    [("content_filtered", "refusal"), ("refusal", "refusal"), ("max_tokens", "max_tokens")],
)
def test_chat_bedrock_stop_reasons(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock, scripted: str, anthropic: str
) -> None:
    bedrock_server.add_answer(None, "I can't help with that.", stop_reason=scripted)
    assert invoke_cloud.invoke("x").additional_kwargs["stop_reason"] == anthropic
    streamed = [c.response_metadata["stop_reason"] for c in invoke_cloud.stream("x")
                if c.response_metadata.get("stop_reason")]
    assert streamed == [anthropic]


def test_guardrail_intervention_is_reported_in_the_body(
    bedrock_server: FakeBedrockServer, runtime: object
) -> None:
    bedrock_server.add_answer(None, "Sorry, blocked.", stop_reason="guardrail_intervened")
    response = runtime.invoke_model(  # type: ignore[attr-defined]
        modelId=MODEL,
        body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8,
                         "messages": [{"role": "user", "content": "x"}]}),
    )
    body = json.loads(response["body"].read())
    assert body["amazon-bedrock-guardrailAction"] == "INTERVENED"
    assert body["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    ("error_type", "status"),
    [("ThrottlingException", 429), ("ServiceUnavailableException", 503),
     ("InternalServerException", 500), ("ValidationException", 400)],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "stream"])
def test_chat_bedrock_errors_raise_the_modelled_exception(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock, error_type: str, status: int,
    streaming: bool,
) -> None:
    rule = bedrock_server.fail("fail me", error_type, message="scripted")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        if streaming:
            list(invoke_cloud.stream("please fail me"))
        else:
            invoke_cloud.invoke("please fail me")
    assert type(excinfo.value).__name__ == error_type
    assert excinfo.value.response["Error"]["Message"] == "scripted"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert rule.calls == 1  # no client retries: exactly one request reached the server
    operation = "invoke-with-response-stream" if streaming else "invoke"
    assert [r["operation"] for r in bedrock_server.requests] == [operation]


def test_chat_bedrock_fail_times_then_succeed(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    rule = bedrock_server.fail("busy", "ThrottlingException", times=1)
    answer = bedrock_server.add_answer("busy", "done")
    with pytest.raises(botocore.exceptions.ClientError):
        invoke_cloud.invoke("busy?")
    assert invoke_cloud.invoke("busy?").content == "done"
    assert (rule.calls, answer.calls) == (1, 1)


def test_chat_bedrock_mid_stream_exception_event(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer("story", "once upon a time")
    bedrock_server.fail("story", "ThrottlingException", message="slow down", after_pieces=2)
    received: list[str] = []
    with pytest.raises(botocore.exceptions.EventStreamError) as excinfo:
        for chunk in invoke_cloud.stream("tell a story"):
            received.append(chunk.text)
    assert "".join(received) == "once upon"
    assert excinfo.value.response["Error"] == {"Code": "throttlingException",
                                               "Message": "slow down"}


async def test_chat_bedrock_ainvoke_and_astream(
    bedrock_server: FakeBedrockServer, invoke_cloud: ChatBedrock
) -> None:
    bedrock_server.add_answer("France", "Paris is the capital.")
    assert (await invoke_cloud.ainvoke("France?")).content == "Paris is the capital."
    texts = [c.text async for c in invoke_cloud.astream("France?") if c.text]
    assert "".join(texts) == "Paris is the capital."
    assert [r["operation"] for r in bedrock_server.requests] == [
        "invoke", "invoke-with-response-stream"
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": []}, "anthropic_version"),
        ({"anthropic_version": "bedrock-2023-05-31", "messages": []}, "max_tokens"),
        ({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 0, "messages": []},
         "max_tokens"),
        ({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5,
          "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": "x"},
         "messages must be a list"),
    ],
)
def test_invoke_rejects_malformed_bodies_and_records_them(
    bedrock_server: FakeBedrockServer, runtime: object, body: dict[str, object], message: str
) -> None:
    rule = bedrock_server.add_answer(None, "never")
    with pytest.raises(runtime.exceptions.ValidationException, match=message):  # type: ignore[attr-defined]
        runtime.invoke_model(modelId=MODEL, body=json.dumps(body))  # type: ignore[attr-defined]
    assert rule.calls == 0
    (request,) = bedrock_server.requests
    assert (request["operation"], request["body"]) == ("invoke", body)


def test_converse_and_invoke_share_rules_and_the_request_log(
    bedrock_server: FakeBedrockServer, cloud: ChatBedrockConverse, invoke_cloud: ChatBedrock
) -> None:
    rule = bedrock_server.add_answer("shared", "same answer", times=2)
    assert cloud.invoke("shared rule").content == "same answer"
    assert invoke_cloud.invoke("shared rule").content == "same answer"
    assert rule.exhausted
    assert [r["operation"] for r in bedrock_server.requests] == ["converse", "invoke"]


def test_bedrock_invoke_chat_fixture_has_no_retries_and_streams(
    bedrock_server: FakeBedrockServer, bedrock_invoke_chat: Any
) -> None:
    llm = bedrock_invoke_chat()
    assert isinstance(llm, ChatBedrock) and not llm.beta_use_converse_api
    throttle = bedrock_server.fail(None, "ThrottlingException", times=1)
    with pytest.raises(botocore.exceptions.ClientError):
        llm.invoke("x")
    assert throttle.calls == 1 and len(bedrock_server.requests) == 1  # botocore did not retry
    bedrock_server.add_answer(None, "a b")
    assert "".join(c.text for c in llm.stream("x")) == "a b"
    assert bedrock_server.requests[-1]["operation"] == "invoke-with-response-stream"
    assert bedrock_server.requests[-1]["model_id"] == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
