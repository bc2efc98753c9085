"""Structured output honours ``method`` on both tiers: function calling, JSON schema, JSON mode.

The unchanged ChatOllama and ChatBedrockConverse talk HTTP to the test bed; each test checks
what each fake server received (tools vs ``format`` vs ``outputConfig``), how many requests it
got, the routing decision, and the parsed result. Every test runs twice: through
``structured_router(router, ...)`` and through ``router.with_structured_output(...)`` (the same
code once the router delegates to it).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from confidence_router import ConfidenceRoutedLLM, RoutingConfigError
from confidence_router.structured import structured_router

ITALY = "What is the capital of Italy?"
KENYA = "What is the capital of Kenya?"
ITALY_JSON = '{"country": "Italy", "capital": "Rome"}'
KENYA_JSON = '{"country": "Kenya", "capital": "Nairobi"}'
NO_TOOLS = "registry.ollama.ai/library/gemma3:270m does not support tools"


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


class CapitalDict(TypedDict):
    """The capital city of a country."""

    country: str
    capital: str


CAPITAL_SCHEMA: dict[str, Any] = {
    "title": "Capital",
    "description": "The capital city of a country.",
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
}

METHODS = ["function_calling", "json_schema", "json_mode"]
VIA = ["structured_router", "with_structured_output"]


def structured(router: ConfidenceRoutedLLM, schema: Any, via: str, **kwargs: Any):
    if via == "structured_router":
        return structured_router(router, schema, **kwargs)
    return router.with_structured_output(schema, **kwargs)


@pytest.fixture
def router(ollama_chat, bedrock_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())


def script_local(
    backend, method: str, match: str, payload: dict, *, logprobs: float, name: str = "Capital"
):
    """The local model answers ``payload`` as a tool call or as JSON text, per ``method``."""
    if method == "function_calling":
        return backend.add_answer(
            match, "ok", logprobs=logprobs, tool_calls=[{"name": name, "arguments": payload}]
        )
    return backend.add_answer(match, json.dumps(payload), logprobs=logprobs)


def script_cloud(server, method: str, match: str, payload: dict, name: str = "Capital"):
    if method == "function_calling":
        return server.add_answer(match, "", tool_use=[{"name": name, "input": payload}])
    return server.add_answer(match, json.dumps(payload))


def chat_requests(ollama_server) -> list[dict]:
    return [r["body"] for r in ollama_server.requests_to("/api/chat")]


def types(schema: dict) -> dict:
    """Property name -> JSON type (pydantic adds titles; the shape is what matters)."""
    return {name: prop["type"] for name, prop in schema["properties"].items()}


def assert_local_request(body: dict, method: str, schema: dict, name: str = "Capital") -> None:
    if method == "function_calling":
        assert [t["function"]["name"] for t in body["tools"]] == [name]
        assert not body.get("format")
    elif method == "json_schema":
        assert not body.get("tools")
        assert types(body["format"]) == types(schema)
        assert set(body["format"]["required"]) == {"country", "capital"}
    else:
        assert not body.get("tools")
        assert body["format"] == "json"


def assert_cloud_request(body: dict, method: str, name: str = "Capital") -> None:
    if method == "function_calling":
        assert body["toolConfig"]["tools"][0]["toolSpec"]["name"] == name
        assert "outputConfig" not in body
    else:
        # Bedrock's native JSON-schema output (it has no schema-less JSON mode).
        assert "toolConfig" not in body
        text_format = body["outputConfig"]["textFormat"]
        assert text_format["type"] == "json_schema"
        sent = json.loads(text_format["structure"]["jsonSchema"]["schema"])
        assert types(sent) == types(CAPITAL_SCHEMA)
        assert sent["additionalProperties"] is False


# -- each method, each tier ------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("method", METHODS)
def test_confident_local_answer_is_kept_and_parsed(
    router, ollama_backend, ollama_server, bedrock_server, method, via
):
    script_local(
        ollama_backend, method, "Italy", {"country": "Italy", "capital": "Rome"}, logprobs=-0.02
    )
    out = structured(router, Capital, via, method=method, include_raw=True).invoke(ITALY)
    assert out["parsed"] == Capital(country="Italy", capital="Rome")
    assert out["parsing_error"] is None
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["escalated"]) == ("local", False)
    assert routing["confidence"] > 0.9
    bodies = chat_requests(ollama_server)
    assert len(bodies) == 1
    assert_local_request(bodies[0], method, CAPITAL_SCHEMA)
    assert bedrock_server.requests == []


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("method", METHODS)
def test_unsure_local_answer_escalates_and_cloud_answer_is_parsed(
    router, ollama_backend, ollama_server, bedrock_server, method, via
):
    script_local(
        ollama_backend, method, "Kenya", {"country": "Kenya", "capital": "Mombasa"}, logprobs=-4.0
    )
    script_cloud(bedrock_server, method, "Kenya", {"country": "Kenya", "capital": "Nairobi"})
    out = structured(router, Capital, via, method=method, include_raw=True).invoke(KENYA)
    assert out["parsed"] == Capital(country="Kenya", capital="Nairobi")
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["reason"]) == ("cloud", "low_confidence")
    assert len(chat_requests(ollama_server)) == 1
    assert len(bedrock_server.requests) == 1
    assert_local_request(chat_requests(ollama_server)[0], method, CAPITAL_SCHEMA)
    assert_cloud_request(bedrock_server.requests[0]["body"], method)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("schema", [CapitalDict, CAPITAL_SCHEMA], ids=["typeddict", "json-schema"])
@pytest.mark.parametrize("method", METHODS)
def test_dict_schemas_give_dicts_on_both_tiers(
    router, ollama_backend, ollama_server, bedrock_server, method, schema, via
):
    name = convert_to_openai_tool(schema)["function"]["name"]  # "CapitalDict" / "Capital"
    script_local(
        ollama_backend,
        method,
        "Italy",
        {"country": "Italy", "capital": "Rome"},
        logprobs=-0.02,
        name=name,
    )
    script_local(
        ollama_backend,
        method,
        "Kenya",
        {"country": "Kenya", "capital": "Mombasa"},
        logprobs=-4.0,
        name=name,
    )
    script_cloud(
        bedrock_server, method, "Kenya", {"country": "Kenya", "capital": "Nairobi"}, name=name
    )
    chain = structured(router, schema, via, method=method)
    assert chain.invoke(ITALY) == {"country": "Italy", "capital": "Rome"}
    assert chain.invoke(KENYA) == {"country": "Kenya", "capital": "Nairobi"}
    bodies = chat_requests(ollama_server)
    assert len(bodies) == 2
    for body in bodies:
        assert_local_request(body, method, CAPITAL_SCHEMA, name)
    assert len(bedrock_server.requests) == 1
    assert_cloud_request(bedrock_server.requests[0]["body"], method, name)


# -- a local model without tool support --------------------------------------------------------


@pytest.fixture
def no_tool_support(ollama_backend):
    """Like Ollama serving a model without a tool template: any request with tools is a 400."""
    return ollama_backend.fail(lambda request: bool(request.tools), status=400, message=NO_TOOLS)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_json_methods_work_with_a_local_model_without_tools(
    router, ollama_backend, ollama_server, bedrock_server, no_tool_support, method, via
):
    ollama_backend.add_answer("Italy", ITALY_JSON, logprobs=-0.02)
    out = structured(router, Capital, via, method=method, include_raw=True).invoke(ITALY)
    assert out["parsed"] == Capital(country="Italy", capital="Rome")
    assert out["raw"].response_metadata["routing"]["decision"] == "local"
    assert no_tool_support.calls == 0
    assert bedrock_server.requests == []


@pytest.mark.parametrize("via", VIA)
def test_function_calling_on_a_local_model_without_tools_escalates(
    router, ollama_backend, bedrock_server, no_tool_support, via
):
    # What used to happen for every method: the local model refuses tools, every query
    # escalates (and with no cloud, fails).
    script_cloud(
        bedrock_server, "function_calling", "Italy", {"country": "Italy", "capital": "Rome"}
    )
    out = structured(router, Capital, via, method="function_calling", include_raw=True).invoke(
        ITALY
    )
    assert out["parsed"] == Capital(country="Italy", capital="Rome")
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["reason"]) == ("cloud", "local_error")
    assert NO_TOOLS in routing["local_error"]
    assert no_tool_support.calls == 1
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("via", VIA)
def test_json_mode_without_schema_on_a_local_only_router(
    ollama_chat, ollama_backend, ollama_server, via
):
    router = ConfidenceRoutedLLM(local=ollama_chat())
    ollama_backend.add_answer("Italy", '{"capital": "Rome", "population_m": 2.8}', logprobs=-0.02)
    out = structured(router, None, via, method="json_mode").invoke(ITALY + " Answer in JSON.")
    assert out == {"capital": "Rome", "population_m": 2.8}
    assert chat_requests(ollama_server)[0]["format"] == "json"


# -- streaming, async, fallbacks -----------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
async def test_async_escalated_json_schema(router, ollama_backend, bedrock_server, via):
    ollama_backend.add_answer("Kenya", '{"country": "Kenya", "capital": "Mombasa"}', logprobs=-4.0)
    bedrock_server.add_answer("Kenya", KENYA_JSON)
    out = await structured(router, Capital, via, method="json_schema", include_raw=True).ainvoke(
        KENYA
    )
    assert out["parsed"] == Capital(country="Kenya", capital="Nairobi")
    assert out["raw"].response_metadata["routing"]["decision"] == "cloud"
    assert bedrock_server.requests[0]["operation"] == "converse"


@pytest.mark.parametrize("via", VIA)
def test_streamed_json_schema_ends_with_the_parsed_object(
    router, ollama_backend, bedrock_server, via
):
    ollama_backend.add_answer("Kenya", '{"country": "Kenya", "capital": "Mombasa"}', logprobs=-4.0)
    bedrock_server.add_answer("Kenya", KENYA_JSON)
    parts = list(structured(router, CAPITAL_SCHEMA, via, method="json_schema").stream(KENYA))
    assert parts[-1] == {"country": "Kenya", "capital": "Nairobi"}
    # The escalated stream never contains the local answer's values.
    assert all(part.get("capital") != "Mombasa" for part in parts)
    assert bedrock_server.requests[0]["operation"] == "converse-stream"
    assert "outputConfig" in bedrock_server.requests[0]["body"]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("method", METHODS)
async def test_concurrent_mixed_calls_each_get_their_own_tier(
    router, ollama_backend, ollama_server, bedrock_server, method, via
):
    script_local(
        ollama_backend, method, "Italy", {"country": "Italy", "capital": "Rome"}, logprobs=-0.02
    )
    script_local(
        ollama_backend, method, "Kenya", {"country": "Kenya", "capital": "Mombasa"}, logprobs=-4.0
    )
    script_cloud(bedrock_server, method, "Kenya", {"country": "Kenya", "capital": "Nairobi"})
    chain = structured(router, Capital, via, method=method, include_raw=True)
    questions = [ITALY, KENYA] * 4
    outs = await chain.abatch(questions)
    for question, out in zip(questions, outs):
        expected = ("local", "Rome") if question == ITALY else ("cloud", "Nairobi")
        assert (
            out["raw"].response_metadata["routing"]["decision"],
            out["parsed"].capital,
        ) == expected
    assert len(chat_requests(ollama_server)) == 8
    assert len(bedrock_server.requests) == 4


@pytest.mark.parametrize("via", VIA)
def test_streamed_escalated_tool_call_is_parsed(router, ollama_backend, bedrock_server, via):
    script_local(
        ollama_backend,
        "function_calling",
        "Kenya",
        {"country": "Kenya", "capital": "Mombasa"},
        logprobs=-4.0,
    )
    script_cloud(
        bedrock_server, "function_calling", "Kenya", {"country": "Kenya", "capital": "Nairobi"}
    )
    parts = list(structured(router, Capital, via, method="function_calling").stream(KENYA))
    assert parts[-1] == Capital(country="Kenya", capital="Nairobi")
    assert bedrock_server.requests[0]["operation"] == "converse-stream"


@pytest.mark.parametrize("via", VIA)
def test_cloud_failure_falls_back_to_the_parsed_local_answer(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server, via
):
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(), on_cloud_error="local", cloud_retry=None
    )
    ollama_backend.add_answer("Kenya", '{"country": "Kenya", "capital": "Mombasa"}', logprobs=-4.0)
    bedrock_server.fail("Kenya", "ServiceUnavailableException")
    out = structured(router, Capital, via, method="json_schema", include_raw=True).invoke(KENYA)
    assert out["parsed"] == Capital(country="Kenya", capital="Mombasa")
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["reason"], routing["flagged"]) == (
        "local",
        "cloud_error",
        True,
    )
    assert len(bedrock_server.requests) == 1


# -- bad input and bad output ----------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
def test_confident_invalid_json_escalates_as_unusable(router, ollama_backend, bedrock_server,
                                                      via):
    ollama_backend.add_answer("Italy", '{"country": "Italy", "capital": ', logprobs=-0.02)
    bedrock_server.set_default(ITALY_JSON)
    out = structured(router, Capital, via, method="json_schema", include_raw=True).invoke(ITALY)
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["reason"]) == ("cloud", "unusable_answer")
    assert routing["unusable_answer"].startswith("the answer does not parse as Capital")
    assert out["parsed"] == Capital(country="Italy", capital="Rome")
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("via", VIA)
def test_invalid_json_served_locally_is_a_parsing_error_with_the_routed_raw_message(
    ollama_chat, ollama_backend, bedrock_server, via
):
    # Nowhere to escalate to: the unusable local answer is served, flagged, and the parser's
    # error reaches the caller with the routed raw message.
    router = ConfidenceRoutedLLM(local=ollama_chat())
    ollama_backend.add_answer("Italy", '{"country": "Italy", "capital": ', logprobs=-0.02)
    out = structured(router, Capital, via, method="json_schema", include_raw=True).invoke(ITALY)
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParserException)
    routing = out["raw"].response_metadata["routing"]
    assert (routing["decision"], routing["reason"], routing["flagged"]) == (
        "local", "unusable_answer", True)
    with pytest.raises(OutputParserException):
        structured(router, Capital, via, method="json_schema").invoke(ITALY)
    assert bedrock_server.requests == []


@pytest.mark.parametrize("via", VIA)
def test_json_not_matching_the_model_is_a_parsing_error(router, ollama_backend, via):
    ollama_backend.add_answer("Italy", '{"country": "Italy"}', logprobs=-0.02)
    with pytest.raises(OutputParserException):
        structured(router, Capital, via, method="json_mode").invoke(ITALY)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize(
    ("schema", "kwargs", "message"),
    [
        (Capital, {"method": "xml"}, "method must be one of"),
        (None, {"method": "json_schema"}, "needs a schema"),
        (None, {"method": "function_calling"}, "needs a schema"),
        ("Capital", {"method": "json_schema"}, "schema must be"),
        (Capital, {"method": "json_schema", "temperature": 0}, "unsupported"),
        (Capital, {"method": "json_schema", "include_raw": "yes"}, "include_raw"),
    ],
)
def test_bad_arguments_raise_routing_config_error(
    router, bedrock_server, ollama_server, schema, kwargs, message, via
):
    with pytest.raises(RoutingConfigError, match=message):
        structured(router, schema, via, **kwargs)
    assert bedrock_server.requests == [] and ollama_server.requests == []


@pytest.mark.parametrize("via", VIA)
def test_json_mode_without_schema_names_the_bedrock_limit(router, via):
    with pytest.raises(RoutingConfigError, match="cloud tier .*ChatBedrockConverse.* no JSON mode"):
        structured(router, None, via, method="json_mode")


def test_structured_binding_keeps_the_router_configuration(ollama_chat, bedrock_chat):
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(), threshold=0.9, on_cloud_error="local"
    )
    chain = structured_router(router, Capital, method="json_schema")
    routed = chain.first
    assert isinstance(routed, ConfidenceRoutedLLM) and routed is not router
    assert (routed.threshold, routed.on_cloud_error) == (0.9, "local")
    # The local tier still asks for logprobs (the confidence needs them).
    assert routed.local.bound.logprobs is True
    assert routed.local.kwargs["format"]["title"] == "Capital"
    assert "output_config" in routed.cloud.kwargs
    # The original router is untouched.
    assert not hasattr(router.local, "kwargs")


def test_chatbedrock_cloud_tier_offers_function_calling_only(ollama_chat, bedrock_server):
    # langchain_aws.ChatBedrock (InvokeModel) structures output with tool calls only: the
    # JSON methods fail at construction, naming the tier, instead of silently calling tools.
    from langchain_aws import ChatBedrock

    cloud = ChatBedrock(model_id="anthropic.claude-3-5-haiku-20241022-v1:0",
                        region_name="us-east-1", endpoint_url=bedrock_server.url)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud)
    for method in ("json_schema", "json_mode"):
        with pytest.raises(RoutingConfigError, match=r"cloud tier \(ChatBedrock\)"):
            structured_router(router, Capital, method=method)
    routed = structured_router(router, Capital, method="function_calling").first
    assert routed.cloud.bound is router.cloud  # the router's configured copy of it
    assert routed.cloud.kwargs["tools"][0]["name"] == "Capital"
    assert bedrock_server.requests == []
