"""Structured output attacked where answers do not parse, over both Bedrock classes.

README ("Structured output"): a confident local answer that does not parse into the schema
(or, with ``function_calling``, makes no call of the schema's tool) escalates with reason
``unusable_answer``, "and only when it cannot escalate is it served (flagged, with the parsing
error)". The tests hold every entry point (invoke, ainvoke, stream, astream, batch) to that,
and to the same for a cloud answer that does not parse; they check that an unsure local
answer that parses still escalates with the schema on the cloud request, that an escalated
structured stream is the cloud's alone even when its tool input arrives in many pieces, and
that personal data in the question or in the schema keeps the query local. What each fake
server received is counted.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import TypedDict

from confidence_router import ConfidenceRoutedLLM, PIIGuard

ENTRY_POINTS = ["invoke", "ainvoke", "stream", "astream", "batch"]
KENYA = "What is the capital of Kenya?"


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
SCHEMAS = {"pydantic": Capital, "typeddict": CapitalDict, "json-schema": CAPITAL_SCHEMA}
TOOL = {"pydantic": "Capital", "typeddict": "CapitalDict", "json-schema": "Capital"}


def expected(kind: str, country: str, capital: str) -> Any:
    values = {"country": country, "capital": capital}
    return Capital(**values) if kind == "pydantic" else values


async def run(chain: Any, how: str, value: Any) -> Any:
    """The output of one call; for streams, the last output (the parsed object)."""
    if how == "invoke":
        return chain.invoke(value)
    if how == "ainvoke":
        return await chain.ainvoke(value)
    if how == "batch":
        return chain.batch([value])[0]
    if how == "stream":
        parts = list(chain.stream(value))
    else:
        parts = [part async for part in chain.astream(value)]
    assert parts, f"{how}: the stream ended without output or error"
    return parts[-1]


# -- a served answer that does not parse -------------------------------------------------------


@pytest.fixture
def local_only(ollama_chat):
    """Nowhere to escalate to: unusable answers are served."""
    return ConfidenceRoutedLLM(local=ollama_chat())


@pytest.mark.parametrize("kind", SCHEMAS)
async def test_a_served_answer_without_the_tool_call_comes_with_the_parsing_error(
    local_only, ollama_backend, ollama_server, kind
):
    # It used to be parsed as None, with parsing_error None: no sign that it did not parse.
    ollama_backend.add_answer("Kenya", "Nairobi is the capital.", logprobs=-0.01)
    raw = local_only.with_structured_output(SCHEMAS[kind], include_raw=True).invoke(KENYA)
    assert raw["parsed"] is None
    assert isinstance(raw["parsing_error"], OutputParserException)
    assert TOOL[kind] in str(raw["parsing_error"])
    record = raw["raw"].response_metadata["routing"]
    assert (record["decision"], record["reason"], record["flagged"]) == (
        "local", "unusable_answer", True)
    assert record["unusable_answer"] == f"no call of the tool {TOOL[kind]!r}"
    chain = local_only.with_structured_output(SCHEMAS[kind])
    for how in ENTRY_POINTS:
        with pytest.raises(OutputParserException, match=TOOL[kind]):
            await run(chain, how, KENYA)
    assert len(ollama_server.requests_to("/api/chat")) == 1 + len(ENTRY_POINTS)


@pytest.mark.parametrize(
    ("method", "answer", "tool_calls", "error"),
    [
        # A tool call missing a required field.
        ("function_calling", "ok", [{"name": "Capital", "arguments": {"country": "Kenya"}}],
         ValidationError),
        # JSON cut short: its streamed partial ({"country": "Kenya"}) was the last output.
        ("json_schema", '{"country": "Kenya", "capital": ', None, OutputParserException),
        ("json_mode", '{"country": "Kenya"}', None, OutputParserException),
    ],
    ids=["function_calling", "json_schema", "json_mode"],
)
async def test_every_entry_point_reports_a_served_answer_that_does_not_parse(
    local_only, ollama_backend, method, answer, tool_calls, error
):
    ollama_backend.add_answer("Kenya", answer, logprobs=-0.01, tool_calls=tool_calls)
    chain = local_only.with_structured_output(Capital, method=method)
    for how in ENTRY_POINTS:
        with pytest.raises(error):
            await run(chain, how, KENYA)
    raw = local_only.with_structured_output(Capital, method=method, include_raw=True).invoke(KENYA)
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], error)


@pytest.mark.parametrize("how", ["stream", "astream"])
async def test_a_stream_that_parses_ends_with_the_object_once(local_only, ollama_backend, how):
    ollama_backend.add_answer("Kenya", "ok", logprobs=-0.01, tool_calls=[
        {"name": "Capital", "arguments": {"country": "Kenya", "capital": "Nairobi"}}])
    chain = local_only.with_structured_output(Capital)
    if how == "stream":
        parts = list(chain.stream(KENYA))
    else:
        parts = [part async for part in chain.astream(KENYA)]
    assert parts == [Capital(country="Kenya", capital="Nairobi")]


# -- the cloud's answer ----------------------------------------------------------------------------


@pytest.fixture
def router(ollama_chat, cloud_factory):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory())


def unsure_local(backend, name: str = "Capital") -> None:
    backend.add_answer("Kenya", "ok", logprobs=-4.0, tool_calls=[
        {"name": name, "arguments": {"country": "Kenya", "capital": "Mombasa"}}])


async def test_a_cloud_answer_without_the_tool_call_is_a_parsing_error(
    router, ollama_backend, bedrock_server
):
    unsure_local(ollama_backend)
    bedrock_server.add_answer("Kenya", "I would rather not use tools.")
    raw = router.with_structured_output(Capital, include_raw=True).invoke(KENYA)
    assert raw["raw"].response_metadata["routing"]["decision"] == "cloud"
    assert raw["parsed"] is None
    assert isinstance(raw["parsing_error"], OutputParserException)
    for how in ENTRY_POINTS:
        with pytest.raises(OutputParserException, match="Capital"):
            await run(router.with_structured_output(Capital), how, KENYA)
    assert len(bedrock_server.requests) == 1 + len(ENTRY_POINTS)


async def test_a_cloud_tool_call_with_bad_arguments_is_a_parsing_error(
    router, ollama_backend, bedrock_server
):
    unsure_local(ollama_backend)
    bedrock_server.add_answer("Kenya", "", tool_use=[{"name": "Capital", "input": {"country": 7}}])
    raw = router.with_structured_output(Capital, include_raw=True).invoke(KENYA)
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], ValidationError)
    for how in ENTRY_POINTS:
        with pytest.raises(ValidationError):
            await run(router.with_structured_output(Capital), how, KENYA)
    assert len(bedrock_server.requests) == 1 + len(ENTRY_POINTS)


@pytest.mark.parametrize("kind", SCHEMAS)
async def test_an_unsure_parsed_answer_escalates_with_the_schema_as_a_forced_tool(
    router, api, ollama_backend, ollama_server, bedrock_server, kind
):
    name = TOOL[kind]
    unsure_local(ollama_backend, name)
    bedrock_server.add_answer("Kenya", "", tool_use=[
        {"name": name, "input": {"country": "Kenya", "capital": "Nairobi"}}])
    chain = router.with_structured_output(SCHEMAS[kind])
    for how in ENTRY_POINTS:
        assert await run(chain, how, KENYA) == expected(kind, "Kenya", "Nairobi"), how
    raw = router.with_structured_output(SCHEMAS[kind], include_raw=True).invoke(KENYA)
    record = raw["raw"].response_metadata["routing"]
    assert (record["decision"], record["reason"]) == ("cloud", "low_confidence")
    assert record["local_answer"] is not None
    assert len(bedrock_server.requests) == len(ollama_server.requests_to("/api/chat")) == 6
    for request in bedrock_server.requests:
        body = request["body"]
        if api == "converse":
            config = body["toolConfig"]
            assert [t["toolSpec"]["name"] for t in config["tools"]] == [name]
            assert config["toolChoice"] == {"tool": {"name": name}}
            schema = config["tools"][0]["toolSpec"]["inputSchema"]["json"]
        else:
            assert [t["name"] for t in body["tools"]] == [name]
            assert body["tool_choice"] == {"type": "tool", "name": name}
            schema = body["tools"][0]["input_schema"]
        assert set(schema["required"]) == {"country", "capital"}


async def test_an_escalated_structured_stream_in_many_pieces_is_the_clouds_alone(
    router, api, ollama_backend, bedrock_server
):
    unsure_local(ollama_backend)
    capital = "Nairobi, on the Athi River"
    bedrock_server.add_answer("Kenya", "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": capital}}],
        tool_input_chunk=2)
    chain = router.with_structured_output(CAPITAL_SCHEMA)
    for parts in (list(chain.stream(KENYA)), [p async for p in chain.astream(KENYA)]):
        assert parts[-1] == {"country": "Kenya", "capital": capital}
        assert len(parts) > 3  # the object grew as the pieces came
        assert not any("Mombasa" in json.dumps(part) for part in parts)
        # Every partial is a prefix state of the final object (never the local one).
        for part in parts:
            assert set(part) <= {"country", "capital"}
            assert capital.startswith(part.get("capital", ""))
    operation = "converse-stream" if api == "converse" else "invoke-with-response-stream"
    assert [r["operation"] for r in bedrock_server.requests] == [operation, operation]


# -- personal data in the structured request -------------------------------------------------------


class Contact(BaseModel):
    """The capital, to be mailed to jane.doe@example.com."""

    capital: str = Field(description="the capital city")


class Account(BaseModel):
    """A country's capital."""

    capital: str = Field(description="send a copy to IBAN DE89370400440532013000")


@pytest.mark.parametrize(
    ("schema", "question", "kind"),
    [(Capital, KENYA + " Reply to bob@example.org", "email"),
     (Contact, KENYA, "email"), (Account, KENYA, "IBAN")],
    ids=["question", "schema-docstring", "field-description"],
)
async def test_personal_data_in_the_structured_request_never_leaves(
    ollama_chat, cloud_factory, ollama_backend, bedrock_server, schema, question, kind
):
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(),
                                 escalation_guard=PIIGuard())
    name = schema.__name__
    arguments = {"country": "Kenya", "capital": "Mombasa"} if schema is Capital else {
        "capital": "Mombasa"}
    ollama_backend.add_answer("Kenya", "ok", logprobs=-4.0,
                              tool_calls=[{"name": name, "arguments": arguments}])
    bedrock_server.set_default("should never be asked")
    for how in ENTRY_POINTS:
        assert await run(router.with_structured_output(schema), how, question) == schema(
            **arguments), how
    raw = router.with_structured_output(schema, include_raw=True).invoke(question)
    record = raw["raw"].response_metadata["routing"]
    assert (record["decision"], record["would_escalate"]) == ("local", True)
    assert record["escalation_skipped"].startswith("escalation guard:")
    assert kind.lower() in record["escalation_skipped"].lower()
    assert bedrock_server.requests == []


# -- include_raw: the parsing error is returned, on every entry point -----------------------------


async def raw_outputs(chain: Any, how: str, value: Any) -> dict[str, Any]:
    """The include_raw dict of one call; a stream's parts added up (as LangChain does)."""
    if how not in ("stream", "astream"):
        return await run(chain, how, value)
    parts = (list(chain.stream(value)) if how == "stream"
             else [part async for part in chain.astream(value)])
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


@pytest.mark.parametrize(
    ("method", "answer", "tool_calls"),
    [("function_calling", "Nairobi.", None),
     ("json_schema", '{"country": "Kenya", "capital": ', None)],
    ids=["no-tool-call", "cut-json"],
)
async def test_include_raw_returns_the_parsing_error_in_streams_too(
    local_only, ollama_backend, method, answer, tool_calls
):
    # A stream used to raise it: the fallback that fills parsing_error cannot catch an
    # error raised after the raw chunks went out.
    ollama_backend.add_answer("Kenya", answer, logprobs=-0.01, tool_calls=tool_calls)
    chain = local_only.with_structured_output(Capital, method=method, include_raw=True)
    for how in ENTRY_POINTS:
        out = await raw_outputs(chain, how, KENYA)
        assert out["parsed"] is None, how
        assert isinstance(out["parsing_error"], OutputParserException), how
        assert out["raw"].text == answer, how
        assert out["raw"].response_metadata["routing"]["reason"] == "unusable_answer", how


async def test_include_raw_streams_the_escalated_answer_and_its_parse(
    router, ollama_backend, bedrock_server
):
    unsure_local(ollama_backend)
    bedrock_server.add_answer("Kenya", "", tool_use=[
        {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}],
        tool_input_chunk=4)
    chain = router.with_structured_output(Capital, include_raw=True)
    for how in ENTRY_POINTS:
        out = await raw_outputs(chain, how, KENYA)
        assert (out["parsed"], out["parsing_error"]) == (
            Capital(country="Kenya", capital="Nairobi"), None), how
        assert out["raw"].response_metadata["routing"]["decision"] == "cloud", how
    assert len(bedrock_server.requests) == len(ENTRY_POINTS)


CARD_SCHEMA: dict[str, Any] = {
    "title": "Card", "type": "object", "required": ["capital"],
    "properties": {"capital": {"type": "string", "description": "charge 4111 1111 1111 1111"}},
}


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_personal_data_in_a_json_output_schema_never_leaves(
    ollama_chat, bedrock_chat, ollama_backend, bedrock_server, method
):
    # The JSON methods send the schema as Bedrock's outputConfig, not as a tool.
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(),
                                 escalation_guard=PIIGuard())
    ollama_backend.add_answer("Kenya", '{"capital": "Mombasa"}', logprobs=-4.0)
    bedrock_server.set_default('{"capital": "Nairobi"}')
    for schema, kind in ((Contact, "email"), (Account, "IBAN"), (CARD_SCHEMA, "card")):
        out = router.with_structured_output(schema, method=method, include_raw=True).invoke(KENYA)
        record = out["raw"].response_metadata["routing"]
        assert kind.lower() in (record["escalation_skipped"] or "").lower(), kind
        assert record["decision"] == "local"
    assert bedrock_server.requests == []
    # Without personal data the same request escalates (with the schema as outputConfig).
    out = router.with_structured_output(Capital, method=method, include_raw=True).invoke(
        "What is the capital of Kenya? (JSON)")
    assert out["raw"].response_metadata["routing"]["decision"] == "cloud"
    assert "outputConfig" in bedrock_server.requests[0]["body"]
