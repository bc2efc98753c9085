"""The privacy guard under attack: personal data placed where a guard that reads only message
text would miss it (tool definitions, structured-output schemas, provider-native blocks,
obfuscated spellings, data split across blocks), over both Bedrock classes and every entry
point. Each test counts what the fake bedrock-runtime server actually received."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import ConfidenceRouterError, LocalModelError
from confidence_router.guards import PIIGuard

EMAIL = "jane.doe@example.com"
IBAN = "DE89 3704 0044 0532 0130 00"
CARD = "4111 1111 1111 1111"
QUESTION = "what is an obscure fact?"


@pytest.fixture
def cloud(api, bedrock_chat, bedrock_invoke_chat):
    return bedrock_chat(max_tokens=50) if api == "converse" else bedrock_invoke_chat(max_tokens=50)


@pytest.fixture
def unsure(ollama_chat, ollama_backend, bedrock_server):
    """Every query wants to escalate; the cloud answers anything."""
    ollama_backend.set_default("not sure", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    return ollama_chat()


def _sent(bedrock_server) -> str:
    return json.dumps([r["body"] for r in bedrock_server.requests], ensure_ascii=False)


def _routing(run, messages):
    try:
        return run(messages).response_metadata["routing"]
    except LocalModelError as error:  # ChatOllama cannot read some shapes: no local answer
        return error.routing


def _assert_kept_local(routing, bedrock_server, kind=None):
    assert len(bedrock_server.requests) == 0, f"leaked: {_sent(bedrock_server)}"
    assert routing["decision"] == "local", routing
    assert routing["flagged"] is True
    assert routing["escalation_skipped"].startswith("escalation guard:"), routing
    if kind is not None:
        assert routing["escalation_skipped"] == f"escalation guard: {kind}"
    assert routing.get("cloud_attempts", 0) == 0


# -- 1. what the request carries besides the messages ------------------------------------------


def _tool_with_pii_description():
    @tool
    def send_invoice(amount: float) -> str:
        """Send the invoice to jane.doe@example.com."""
        return "sent"

    return send_invoice


class Transfer(BaseModel):
    """A bank transfer."""

    amount: float = Field(description=f"amount to pay into {IBAN}")


TOOL_SHAPES = {
    "tool description": ([_tool_with_pii_description()], "email address"),
    "parameter description": (
        [{"name": "transfer", "description": "Transfer money.",
          "input_schema": {"type": "object", "properties": {
              "amount": {"type": "number", "description": f"amount to pay into {IBAN}"}}}}],
        "IBAN",
    ),
    "enum value": (
        [{"name": "charge", "description": "Charge a card.",
          "input_schema": {"type": "object", "properties": {
              "card": {"type": "string", "enum": [CARD.replace(" ", "-"), "none"]}}}}],
        "credit card number",
    ),
    "pydantic schema field": ([Transfer], "IBAN"),
}


@pytest.mark.parametrize("shape", sorted(TOOL_SHAPES))
def test_bound_tool_definitions_are_judged(shape, api, cloud, unsure, bedrock_server):
    tools, kind = TOOL_SHAPES[shape]
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    bound = router.bind_tools(tools)
    _assert_kept_local(_routing(bound.invoke, QUESTION), bedrock_server, kind)
    # The same tools without personal data escalate: the guard is not blanket.
    clean = router.bind_tools([{"name": "charge", "description": "Charge a card.",
                                "input_schema": {"type": "object", "properties": {}}}])
    assert clean.invoke(QUESTION).response_metadata["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_schema_is_judged(method, api, cloud, unsure, ollama_backend,
                                            bedrock_server):
    if api == "invoke" and method == "json_schema":
        pytest.skip("ChatBedrock has no json_schema structured output")
    ollama_backend.set_default('{"amount": 12.5}', logprobs=-3.0)
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    structured = router.with_structured_output(Transfer, method=method, include_raw=True)
    try:
        result = structured.invoke(QUESTION)
        routing = result["raw"].response_metadata["routing"]
    except ConfidenceRouterError as error:  # no parseable local answer: still never sent
        routing = error.routing
    _assert_kept_local(routing, bedrock_server, "IBAN")
    assert IBAN not in _sent(bedrock_server)


# -- 2. what the messages carry -----------------------------------------------------------------


def _tool_turn(result_content, **kwargs):
    return [
        HumanMessage("look it up"),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {}, "id": "t1"}]),
        ToolMessage(content=result_content, tool_call_id="t1", **kwargs),
        HumanMessage(QUESTION),
    ]


MESSAGE_SHAPES = {
    "zero-width space inside an email": [HumanMessage("write to jane.doe\u200b@example.com")],
    "zero-width joiner inside a card": [HumanMessage("card 4111\u200d1111\u200d1111\u200d1111")],
    "soft hyphen inside an IBAN": [HumanMessage("pay DE89\u00ad3704\u00ad0044\u00ad0532\u00ad0130\u00ad00")],
    "fullwidth at sign": [HumanMessage("write to jane.doe\uff20example.com")],
    "fullwidth digits in a card": [HumanMessage("card \uff14\uff11\uff11\uff11 1111 1111 1111")],
    "line breaks inside a card": [HumanMessage("card 4111\n1111\n1111\n1111 thanks")],
    "line breaks and tabs inside an IBAN": [HumanMessage("DE89\n3704\t0044\n0532\n0130\n00")],
    "lowercase spaced IBAN": [HumanMessage("pay de89 3704 0044 0532 0130 00")],
    "card with dashes": [HumanMessage("card 4111-1111-1111-1111")],
    "phone with dots": [HumanMessage("call me on +44.20.7946.0958")],
    "email split across two text blocks": [
        HumanMessage(content=[{"type": "text", "text": "write to jane.doe@"},
                              {"type": "text", "text": "example.com please"}])
    ],
    "card split across two text blocks": [
        HumanMessage(content=[{"type": "text", "text": "card 4111 1111"},
                              {"type": "text", "text": " 1111 1111"}])
    ],
    "email split across two human messages": [
        HumanMessage("write to jane.doe@"), HumanMessage("example.com please"),
    ],
    "json tool result": _tool_turn([{"type": "json", "json": {"owner": {"mail": EMAIL}}}]),
    "nested dict tool result": _tool_turn([{"type": "text", "text": "found"},
                                           {"json": {"rows": [{"iban": IBAN}]}}]),
    "tool call arguments nested deep": [
        HumanMessage("pay"),
        AIMessage("", tool_calls=[{"name": "pay", "args": {"to": {"bank": [{"iban": IBAN}]}},
                                   "id": "t1"}]),
        ToolMessage("done", tool_call_id="t1"),
        HumanMessage(QUESTION),
    ],
    "thinking block with signature": [
        HumanMessage("hello"),
        AIMessage(content=[{"type": "thinking", "thinking": f"the user is {EMAIL}",
                            "signature": "c2lnbmF0dXJl"},
                           {"type": "text", "text": "hi"}]),
        HumanMessage(QUESTION),
    ],
    "system prompt as blocks": [
        SystemMessage(content=[{"type": "text", "text": "be brief"},
                               {"type": "text", "text": f"the user is {EMAIL}"}]),
        HumanMessage(QUESTION),
    ],
    "image block (base64)": [
        HumanMessage(content=[{"type": "text", "text": QUESTION},
                              {"type": "image", "source_type": "base64", "data": "aGVsbG8=",
                               "mime_type": "image/png"}])
    ],
    "image block (url)": [
        HumanMessage(content=[{"type": "text", "text": QUESTION},
                              {"type": "image_url",
                               "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])
    ],
    "document block (base64 pdf)": [
        HumanMessage(content=[{"type": "text", "text": QUESTION},
                              {"type": "file", "source_type": "base64", "data": "JVBERi0=",
                               "mime_type": "application/pdf"}])
    ],
    "redacted reasoning": [
        HumanMessage("hello"),
        AIMessage(content=[{"type": "redacted_thinking", "data": "ZW5jcnlwdGVkIHJlYXNvbmluZw=="},
                           {"type": "text", "text": "hi"}]),
        HumanMessage(QUESTION),
    ],
    "email with combining vowel signs": [HumanMessage("लिखें मेल@उदाहरण.भारत पर")],
    "dashed IBAN in tool call arguments": [
        HumanMessage("pay"),
        AIMessage("", tool_calls=[{"name": "pay", "args": {"iban": "DE89-3704-0044-0532-0130-00"},
                                   "id": "t1"}]),
        ToolMessage("done", tool_call_id="t1"),
        HumanMessage(QUESTION),
    ],
    "card grouped by spaced dashes in the system prompt": [
        SystemMessage("the user's card is 4111 - 1111 - 1111 - 1111"), HumanMessage(QUESTION),
    ],
}


@pytest.mark.parametrize("shape", sorted(MESSAGE_SHAPES))
def test_message_shapes_never_reach_the_cloud(shape, api, cloud, unsure, bedrock_server):
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    _assert_kept_local(_routing(router.invoke, MESSAGE_SHAPES[shape]), bedrock_server)


BEDROCK_NATIVE_SHAPES = {
    "guardContent": [HumanMessage(content=[{"type": "text", "text": QUESTION},
                                           {"guardContent": {"text": {"text": EMAIL}}}])],
    "citationsContent": [
        HumanMessage("hello"),
        AIMessage(content=[{"citationsContent": {"content": [{"text": f"by {EMAIL}"}],
                                                 "citations": []}}]),
        HumanMessage(QUESTION),
    ],
    "reasoningContent with signature": [
        HumanMessage("hello"),
        AIMessage(content=[{"type": "reasoning_content",
                            "reasoning_content": {"text": f"user is {EMAIL}",
                                                  "signature": "c2ln"}},
                           {"type": "text", "text": "hi"}]),
        HumanMessage(QUESTION),
    ],
    "redactedContent reasoning": [
        HumanMessage("hello"),
        AIMessage(content=[{"type": "reasoning_content",
                            "reasoning_content": {"redactedContent": b"encrypted"}},
                           {"type": "text", "text": "hi"}]),
        HumanMessage(QUESTION),
    ],
    "document with a text source": [
        HumanMessage(content=[{"type": "text", "text": QUESTION},
                              {"document": {"format": "txt", "name": "notes",
                                            "source": {"text": f"iban {IBAN}"}}}])
    ],
    "image with bytes": [
        HumanMessage(content=[{"type": "text", "text": QUESTION},
                              {"image": {"format": "png", "source": {"bytes": b"\x89PNG"}}}])
    ],
}


@pytest.mark.parametrize("shape", sorted(BEDROCK_NATIVE_SHAPES))
def test_bedrock_native_blocks_never_reach_the_cloud(shape, bedrock_chat, unsure,
                                                     bedrock_server):
    """Converse-native blocks (ChatBedrock's Anthropic body rejects them before sending)."""
    router = ConfidenceRoutedLLM(local=unsure, cloud=bedrock_chat(max_tokens=50),
                                 escalation_guard=PIIGuard())
    _assert_kept_local(_routing(router.invoke, BEDROCK_NATIVE_SHAPES[shape]), bedrock_server)


def test_cache_point_is_not_personal_data(bedrock_chat, unsure, bedrock_server):
    router = ConfidenceRoutedLLM(local=unsure, cloud=bedrock_chat(max_tokens=50),
                                 escalation_guard=PIIGuard())
    messages = [SystemMessage(content=[{"type": "text", "text": "be brief"},
                                       {"cachePoint": {"type": "default"}}]),
                HumanMessage(QUESTION)]
    assert router.invoke(messages).response_metadata["routing"]["decision"] == "cloud"
    assert "cachePoint" in _sent(bedrock_server) and len(bedrock_server.requests) == 1


# -- 3. what is NOT sent must not block (and never leaks) ---------------------------------------

NOT_SENT_SHAPES = {
    "response_metadata of an earlier answer": [
        HumanMessage("hello"), AIMessage("hi", response_metadata={"note": EMAIL}),
        HumanMessage(QUESTION),
    ],
    "a tool result's artifact": _tool_turn("found it", artifact={"raw": {"mail": EMAIL}}),
    "usage_metadata and id": [
        HumanMessage("hello", id=EMAIL),
        AIMessage("hi", usage_metadata={"input_tokens": 4111111111111111, "output_tokens": 1,
                                        "total_tokens": 4111111111111112}),
        HumanMessage(QUESTION),
    ],
}


@pytest.mark.parametrize("shape", sorted(NOT_SENT_SHAPES))
def test_fields_the_client_does_not_send_do_not_block(shape, api, cloud, unsure,
                                                      bedrock_server):
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    routing = router.invoke(NOT_SENT_SHAPES[shape]).response_metadata["routing"]
    assert routing["decision"] == "cloud", routing
    assert len(bedrock_server.requests) == 1
    assert EMAIL not in _sent(bedrock_server)


@pytest.mark.parametrize("field", ["name", "additional_kwargs"])
def test_fields_that_some_clients_send_never_leak(field, api, cloud, unsure, bedrock_server):
    """Bedrock drops ``name`` and unknown ``additional_kwargs``, other providers send them:
    the message-level guard judges them anyway (and nothing leaks)."""
    kwargs = {"name": EMAIL} if field == "name" else {"additional_kwargs": {"note": EMAIL}}
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    router.invoke([HumanMessage(QUESTION, **kwargs)])
    assert EMAIL not in _sent(bedrock_server)


# -- 4. every entry point -----------------------------------------------------------------------


def _run_invoke(router, messages):
    return [router.invoke(messages)]


def _run_ainvoke(router, messages):
    return [asyncio.run(router.ainvoke(messages))]


def _join(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _run_stream(router, messages):
    return [_join(list(router.stream(messages)))]


def _run_astream(router, messages):
    async def collect():
        return [chunk async for chunk in router.astream(messages)]

    return [_join(asyncio.run(collect()))]


def _run_batch(router, messages):
    return router.batch([messages, messages], config={"max_concurrency": 2})


def _run_abatch(router, messages):
    return asyncio.run(router.abatch([messages, messages], config={"max_concurrency": 2}))


ENTRY_POINTS = {
    "invoke": _run_invoke, "ainvoke": _run_ainvoke, "stream": _run_stream,
    "astream": _run_astream, "batch": _run_batch, "abatch": _run_abatch,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_is_guarded(entry, api, cloud, unsure, bedrock_server):
    run = ENTRY_POINTS[entry]
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    # Seen only on the wire (a bound tool) and only after normalisation (zero-width space).
    tooled = router.bind_tools([_tool_with_pii_description()])
    for message in run(tooled, QUESTION):
        _assert_kept_local(message.response_metadata["routing"], bedrock_server,
                           "email address")
    for message in run(router, "write to jane.doe\u200b@example.com"):
        _assert_kept_local(message.response_metadata["routing"], bedrock_server,
                           "email address")
    # Clean queries still escalate through the same entry point.
    results = run(router, QUESTION)
    assert all(m.response_metadata["routing"]["decision"] == "cloud" for m in results)
    assert len(bedrock_server.requests) == len(results)


# -- 5. where the wire check is not installed ----------------------------------------------------


def test_cloud_model_kwargs_are_judged_on_the_wire(unsure, bedrock_invoke_chat, bedrock_server):
    """Fields the client adds to the body from its own settings (here Anthropic's
    ``metadata.user_id``) are judged too: they are in the serialised request."""
    cloud = bedrock_invoke_chat(max_tokens=50, model_kwargs={"metadata": {"user_id": EMAIL}})
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    _assert_kept_local(router.invoke(QUESTION).response_metadata["routing"], bedrock_server,
                       "email address")


def test_own_boto3_client_tool_definitions(unsure, bedrock_server):
    """A ChatBedrockConverse built around your own boto3 client keeps that client as it is
    (no wire check on it); the tools bound to the router are still judged before the
    escalation (before the fix: a tool definition carrying personal data was sent)."""
    import boto3
    from langchain_aws import ChatBedrockConverse

    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          endpoint_url=bedrock_server.url, aws_access_key_id="test",
                          aws_secret_access_key="test")
    cloud = ChatBedrockConverse(model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                                client=client, max_tokens=50)
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    routing = _routing(router.bind_tools([_tool_with_pii_description()]).invoke, QUESTION)
    assert EMAIL not in _sent(bedrock_server)
    _assert_kept_local(routing, bedrock_server, "email address")


def test_plain_callable_guard_tool_definitions(api, cloud, unsure, bedrock_server):
    """A guard that is a plain function is also shown the tools bound to the router: they are
    part of what the cloud receives (before the fix: sent, 1 request per API)."""
    guard = PIIGuard()

    def my_guard(messages):
        return guard(messages)

    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=my_guard)
    routing = _routing(router.bind_tools([_tool_with_pii_description()]).invoke, QUESTION)
    assert EMAIL not in _sent(bedrock_server)
    _assert_kept_local(routing, bedrock_server, "email address")


def test_precheck_escalation_is_guarded(api, cloud, ollama_chat, ollama_backend, bedrock_server):
    """The self-assessment probe sends a query to the cloud without a local answer: the guard
    judges that escalation too, on the messages and on the wire."""
    from confidence_router.probe import SelfAssessmentProbe

    def is_probe(request):
        return "Respond with exactly one token" in request.messages[-1]["content"]

    ollama_backend.add_probe(is_probe, {"NO": -0.1, "YES": -2.5})  # "no": escalate at once
    ollama_backend.set_default("not sure", logprobs=-3.0)
    bedrock_server.set_default("cloud answer")
    local = ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, escalation_guard=PIIGuard(),
                                 precheck=SelfAssessmentProbe(model=local),
                                 precheck_threshold=0.5)
    in_message = router.invoke(f"Who wrote to {EMAIL}?").response_metadata["routing"]
    _assert_kept_local(in_message, bedrock_server, "email address")
    tooled = router.bind_tools([_tool_with_pii_description()]).invoke("Who was Jomo Kenyatta?")
    _assert_kept_local(tooled.response_metadata["routing"], bedrock_server, "email address")
    clean = router.invoke("Who was Jomo Kenyatta?").response_metadata["routing"]
    assert clean["decision"] == "cloud" and clean["reason"] == "precheck"
    assert len(bedrock_server.requests) == 1


def test_chatbedrock_on_the_converse_api_is_judged_on_the_wire(bedrock_invoke_chat, unsure,
                                                               bedrock_server):
    """``ChatBedrock(beta_use_converse_api=True)`` sends through an inner Converse client: the
    wire check covers it too."""
    cloud = bedrock_invoke_chat(max_tokens=50, beta_use_converse_api=True)
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    routing = _routing(router.bind_tools([_tool_with_pii_description()]).invoke, QUESTION)
    _assert_kept_local(routing, bedrock_server, "email address")
    assert router.invoke(QUESTION).response_metadata["routing"]["decision"] == "cloud"
    assert [r["operation"] for r in bedrock_server.requests] == ["converse"]


# -- 6. ordinary requests still escalate --------------------------------------------------------


def test_ordinary_tool_conversation_escalates(api, cloud, unsure, bedrock_server):
    """A realistic request full of numbers, dates, versions and code (system prompt, tools,
    tool calls and results, reasoning with a signature) is not personal data: it escalates,
    as serialised by either client."""

    @tool
    def order_status(order_id: str, since: str = "2024-01-01") -> str:
        """Status of an order by id (e.g. "ORD-2024-000123"), with events since a date."""
        return "shipped"

    system = SystemMessage(
        "You are a support bot for shop v3.11.2 (build 2024.05.17-1432). Prices in EUR, "
        "timestamps in UTC (e.g. 1715950800). Use tools; never guess order data."
    )
    history = [
        system,
        HumanMessage("Where is order ORD-2024-000123? I paid 1,249.99 on 17.05.2024 at 14:30."),
        AIMessage(
            content=[{"type": "text", "text": "Let me check."}],
            tool_calls=[{"name": "order_status",
                         "args": {"order_id": "ORD-2024-000123", "since": "2024-05-17"},
                         "id": "toolu_01A09q90qw90lq917835lq9"}],
        ),
        ToolMessage(
            content=[{"type": "text", "text": json.dumps({
                "status": "shipped", "carrier_ref": "1Z 999 AA1 01 2345 6784",
                "weight_kg": 2.35, "events": ["2024-05-17 10:00-11:30 packed",
                                              "2024-05-18 08:15 left hub 4.21"]})}],
            tool_call_id="toolu_01A09q90qw90lq917835lq9",
        ),
        HumanMessage("Also: my script fails with `pip install numpy==1.26.4` on Python "
                     "3.11.9, CUDA 12.1:\n```\nfor i in range(10):\n    x[i] = i * 1000\n```"),
    ]
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    routing = router.bind_tools([order_status]).invoke(history).response_metadata["routing"]
    assert routing["decision"] == "cloud", routing
    assert len(bedrock_server.requests) == 1
    assert "ORD-2024-000123" in _sent(bedrock_server)


def test_tools_bound_on_the_cloud_model_itself_are_judged(api, cloud, unsure, bedrock_server):
    """Tools bound to the cloud model before it is given to the router (a RunnableBinding)
    are in the request body too."""
    bound_cloud = cloud.bind_tools([_tool_with_pii_description()])
    router = ConfidenceRoutedLLM(local=unsure, cloud=bound_cloud, escalation_guard=PIIGuard())
    _assert_kept_local(_routing(router.invoke, QUESTION), bedrock_server, "email address")


@pytest.mark.parametrize("wrap", ["with_retry", "with_fallbacks"])
def test_wrapped_cloud_model_kwargs(wrap, bedrock_invoke_chat, unsure, bedrock_server):
    """The body fields a wrapped cloud model adds (here Anthropic's ``metadata.user_id``) are
    judged through the wrapper (before the fix: sent, 1 request)."""
    cloud = bedrock_invoke_chat(max_tokens=50, model_kwargs={"metadata": {"user_id": EMAIL}})
    cloud = cloud.with_retry(stop_after_attempt=1) if wrap == "with_retry" \
        else cloud.with_fallbacks([cloud])
    router = ConfidenceRoutedLLM(local=unsure, cloud=cloud, escalation_guard=PIIGuard())
    routing = _routing(router.invoke, QUESTION)
    assert EMAIL not in _sent(bedrock_server)
    _assert_kept_local(routing, bedrock_server, "email address")


def test_tools_passed_with_the_call_are_judged(api, cloud, unsure, bedrock_server):
    """Tools given as a per-call kwarg go to both tiers: the guard judges them before the
    escalation, for a PIIGuard and for a plain function."""
    from functools import partial

    from langchain_core.utils.function_calling import convert_to_openai_tool

    tool_spec = convert_to_openai_tool(_tool_with_pii_description())
    guard = PIIGuard()
    for escalation_guard in (guard, lambda messages: guard(messages)):
        router = ConfidenceRoutedLLM(local=unsure, cloud=cloud,
                                     escalation_guard=escalation_guard)
        routing = _routing(partial(router.invoke, tools=[tool_spec]), QUESTION)
        _assert_kept_local(routing, bedrock_server, "email address")


def test_clean_tools_and_fields_still_escalate(api, cloud, unsure, bedrock_server):
    """Judging the tools and model fields does not block an ordinary tool definition."""

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """Get the weather for a city, in celsius or fahrenheit (version 2.1, 2024-05-17)."""
        return "sunny"

    for escalation_guard in (PIIGuard(), lambda messages: PIIGuard()(messages)):
        router = ConfidenceRoutedLLM(local=unsure, cloud=cloud,
                                     escalation_guard=escalation_guard)
        routing = _routing(router.bind_tools([get_weather]).invoke, QUESTION)
        assert routing["decision"] == "cloud", routing
    assert len(bedrock_server.requests) == 2


def test_bedrock_native_text_blocks_are_input(bedrock_chat, unsure, bedrock_server):
    """A message made only of blocks without a ``type`` (Bedrock-native ``{"text": ...}``,
    which ChatBedrockConverse sends) has content: it is routed, not rejected as empty; a blank
    one still is."""
    from langchain_core.messages import HumanMessage

    from confidence_router.errors import InvalidInputError

    router = ConfidenceRoutedLLM(local=unsure, cloud=bedrock_chat(max_tokens=50))
    message = router.invoke([HumanMessage(content=[{"text": "what is an obscure fact?"}])])
    assert message.response_metadata["routing"]["decision"] == "cloud"
    with pytest.raises(InvalidInputError):
        router.invoke([HumanMessage(content=[{"text": "   "}])])
    assert len(bedrock_server.requests) == 1
