"""The router's input and configuration promises, attacked: odd but valid message shapes are
answered (and reach the tier that answers intact), bad input and bad knobs are typed errors
before any request, failing backends never lose a request silently, and per-call knobs work
through bind, with_config and LCEL. Counts what the fake servers received."""

from __future__ import annotations

import json
import math

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import (
    CloudEscalationError,
    ConfidenceRouterError,
    InvalidInputError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
       "rkJggg==")
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def router(ollama_chat, bedrock_chat, ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)   # confident: kept local at 0.7
    bedrock_server.set_default("cloud answer")
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                               cloud_retry=NO_RETRY)


def _local_requests(ollama_server):
    return [r["body"] for r in ollama_server.requests_to("/api/chat")]


def _no_requests(ollama_server, bedrock_server):
    assert _local_requests(ollama_server) == [] and bedrock_server.requests == []


# -- odd but valid shapes: answered, and sent intact -------------------------------------------

TOOL_CALL = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}
VALID_SHAPES = {
    "text blocks": [HumanMessage(content=[{"type": "text", "text": "capital"},
                                          {"type": "text", "text": "of France?"}])],
    "plain strings in a block list": [HumanMessage(content=["capital", "of France?"])],
    "tool call history": [HumanMessage("weather?"), AIMessage("", tool_calls=[TOOL_CALL]),
                          ToolMessage("sunny", tool_call_id="call_1")],
    "tool history then a question": [HumanMessage("weather?"),
                                     AIMessage("", tool_calls=[TOOL_CALL]),
                                     ToolMessage("sunny", tool_call_id="call_1"),
                                     HumanMessage("and tomorrow?")],
    "prefill: the last message is the assistant's": [HumanMessage("capital of France?"),
                                                      AIMessage("The capital is")],
    "system message only": [SystemMessage("Greet the user.")],
    "several system messages": [SystemMessage("Be brief."), SystemMessage("Be kind."),
                                HumanMessage("hi")],
    "empty earlier turns": [HumanMessage(""), AIMessage(""), HumanMessage("hi")],
    "an empty block list in an earlier turn": [HumanMessage(content=[]), HumanMessage("hi")],
    "OpenAI-style dicts": [{"role": "user", "content": "hi"}],
    "(role, text) tuples": [("system", "be brief"), ("human", "hi")],
}


async def test_odd_but_valid_shapes_are_answered_locally(router, ollama_server, bedrock_server):
    # One test over all shapes: building the router's Bedrock client dominates a test's time.
    for shape, messages in VALID_SHAPES.items():
        for message in (router.invoke(messages), await router.ainvoke(messages)):
            assert message.content == "Paris", shape
            assert message.response_metadata["routing"]["reason"] == Reason.CONFIDENT, shape
        assert "".join(c.text for c in router.stream(messages)) == "Paris", shape
    assert len(_local_requests(ollama_server)) == 3 * len(VALID_SHAPES)
    assert bedrock_server.requests == []


IMAGE_BLOCKS = {
    "image_url data URL": {"type": "image_url",
                           "image_url": {"url": "data:image/png;base64," + PNG}},
    "standard base64 image block": {"type": "image", "base64": PNG, "mime_type": "image/png"},
    "legacy source_type block": {"type": "image", "source_type": "base64", "data": PNG,
                                 "mime_type": "image/png"},
}


@pytest.mark.parametrize("block", IMAGE_BLOCKS)
@pytest.mark.parametrize("cloud_class", ["converse", "invoke"])
def test_images_reach_both_tiers(ollama_chat, bedrock_chat, bedrock_invoke_chat, ollama_backend,
                                 ollama_server, bedrock_server, block, cloud_class):
    ollama_backend.set_default("a dot", logprobs=-3.0)      # unsure: escalates
    bedrock_server.set_default("a single pixel")
    cloud = bedrock_chat() if cloud_class == "converse" else bedrock_invoke_chat()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, cloud_retry=NO_RETRY)
    message = router.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                                   IMAGE_BLOCKS[block]])])
    assert message.content == "a single pixel"
    assert _local_requests(ollama_server)[-1]["messages"][-1]["images"] == [PNG]
    assert len(bedrock_server.requests) == 1
    assert PNG.rstrip("=")[:40] in json.dumps(bedrock_server.requests[0]["body"])


def test_input_longer_than_the_local_context_is_answered_by_the_cloud(router, ollama_backend,
                                                                      ollama_server,
                                                                      bedrock_server):
    # What the embedded llama.cpp server answers when the prompt exceeds its window.
    ollama_backend.fail(lambda request: len(json.dumps(request.messages)) > 100_000, status=400,
                        message="prompt is 60001 tokens; the context window is 1024")
    message = router.invoke("word " * 60_000)
    routing = message.response_metadata["routing"]
    assert message.content == "cloud answer"
    assert routing["reason"] == Reason.LOCAL_ERROR and routing["decision"] == "cloud"
    assert "context window" in routing["local_error"]
    assert len(_local_requests(ollama_server)) == 1 and len(bedrock_server.requests) == 1
    assert len(json.dumps(bedrock_server.requests[0]["body"])) > 300_000  # the whole input


# -- bad input: typed errors before any request --------------------------------------------------

EMPTY_INPUTS = {
    "no messages": [],
    "empty string": "",
    "only whitespace": " \n\t ",
    "whitespace text blocks": [HumanMessage(content=[{"type": "text", "text": "  "}])],
    "an empty block list": [HumanMessage(content=[])],
    "every turn empty": [SystemMessage(""), HumanMessage(" "), AIMessage("")],
    "dict with None content": [{"role": "user", "content": None}],
}


async def test_nothing_to_answer_is_invalid_input_on_every_entry_point(router, ollama_server,
                                                                       bedrock_server):
    for case, bad in EMPTY_INPUTS.items():
        with pytest.raises(InvalidInputError):
            router.invoke(bad)
            pytest.fail(case)
        with pytest.raises(InvalidInputError):
            await router.ainvoke(bad)
        with pytest.raises(InvalidInputError):
            list(router.stream(bad))
        with pytest.raises(InvalidInputError):
            [chunk async for chunk in router.astream(bad)]
    _no_requests(ollama_server, bedrock_server)


BAD_KWARGS = {
    "misspelt knob": {"allow_escalaton": False},
    "misspelt threshold": {"treshold": 0.9},
    "tier sampling kwarg": {"temperature": 0.1},
    "threshold above 1": {"threshold": 1.01},
    "negative threshold": {"threshold": -0.1},
    "nan threshold": {"threshold": math.nan},
    "infinite threshold": {"threshold": math.inf},
    "threshold as a string": {"threshold": "0.9"},
    "threshold None": {"threshold": None},
    "precheck_threshold above 1": {"precheck_threshold": 2},
    "unknown signal": {"signal": "vibes"},
    "on_unknown typo": {"on_unknown": "locale"},
    "on_cloud_error typo": {"on_cloud_error": "ignore"},
    "allow_escalation as a string": {"allow_escalation": "false"},
    "early_exit as an int": {"early_exit": 1},
}


async def test_bad_call_kwargs_are_routing_config_errors_before_any_request(router,
                                                                            ollama_server,
                                                                            bedrock_server):
    for case, kwargs in BAD_KWARGS.items():
        for call in (lambda kw=kwargs: router.invoke("hi", **kw),
                     lambda kw=kwargs: list(router.stream("hi", **kw)),
                     lambda kw=kwargs: router.bind(**kw).invoke("hi"),
                     lambda kw=kwargs: router.batch(["hi", "ho"], **kw)):
            with pytest.raises(RoutingConfigError):
                call()
                pytest.fail(case)
        with pytest.raises(RoutingConfigError):
            await router.ainvoke("hi", **kwargs)
    _no_requests(ollama_server, bedrock_server)


def test_misspelt_knob_names_the_closest_knob(router):
    with pytest.raises(RoutingConfigError, match="did you mean 'on_cloud_error'"):
        router.invoke("hi", on_cloud_eror="local")


@pytest.mark.parametrize(
    "fields",
    [{"thresold": 0.9}, {"threshold": 1.5}, {"threshold": math.nan}, {"signal": "vibes"},
     {"local_timeout": 0}, {"local_timeout": -1}, {"local_timeout": math.inf},
     {"cloud_timeout": math.nan}, {"local_timeout": "soon"}, {"stop": "\n"},
     {"cloud_retry": 3}, {"target_accuracy": 0.9}],
)
def test_bad_constructor_fields_are_routing_config_errors(ollama_chat, fields):
    with pytest.raises(RoutingConfigError):
        ConfidenceRoutedLLM(local=ollama_chat(), **fields)


@pytest.mark.parametrize(
    "fields",
    [{"threshold": "0.5"}, {"local_timeout": True}, {"allow_escalation": 1},
     {"early_exit": "yes"}, {"precheck_threshold": "0.2"}],
)
def test_wrong_types_in_constructor_fields_are_rejected_not_coerced(ollama_chat, fields):
    with pytest.raises(RoutingConfigError):
        ConfidenceRoutedLLM(local=ollama_chat(), **fields)


def test_configurable_threshold_of_the_wrong_type_is_rejected(router, ollama_server,
                                                              bedrock_server):
    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    with pytest.raises(RoutingConfigError):
        configurable.with_config(configurable={"threshold": "0.99"}).invoke("hi")
    _no_requests(ollama_server, bedrock_server)


@pytest.mark.parametrize("bad", [42, None, [None], [42]])
def test_input_of_the_wrong_type_is_a_typed_error(router, ollama_server, bedrock_server, bad):
    with pytest.raises(ConfidenceRouterError):
        router.invoke(bad)
    _no_requests(ollama_server, bedrock_server)


def test_stop_of_the_wrong_type_is_rejected_before_any_request(router, ollama_server,
                                                               bedrock_server):
    with pytest.raises(ConfidenceRouterError):
        router.invoke("hi", stop=[1])
    _no_requests(ollama_server, bedrock_server)


# -- knobs through bind, with_config and LCEL -----------------------------------------------------


async def test_knobs_through_bind_configurable_and_lcel(router, ollama_server, bedrock_server):
    strict = router.bind(threshold=0.99)
    assert strict.invoke("hi").response_metadata["routing"]["threshold"] == 0.99
    # A later bind adds to the earlier one; a call kwarg wins over both.
    kept = strict.bind(allow_escalation=False).invoke("hi").response_metadata["routing"]
    assert kept["decision"] == "local" and kept["escalation_skipped"] == "allow_escalation=False"
    assert strict.invoke("hi", threshold=0.5).response_metadata["routing"]["decision"] == "local"

    configurable = router.configurable_fields(threshold=ConfigurableField(id="threshold"))
    assert configurable.invoke("hi").content == "Paris"
    cfg = {"configurable": {"threshold": 0.99}}
    assert configurable.with_config(cfg).invoke("hi").content == "cloud answer"
    assert (await configurable.ainvoke("hi", cfg)).content == "cloud answer"
    assert "".join(c.text for c in configurable.stream("hi", cfg)) == "cloud answer"

    chain = ChatPromptTemplate.from_template("Answer: {q}") | configurable | StrOutputParser()
    assert chain.invoke({"q": "x"}, cfg) == "cloud answer"
    assert chain.invoke({"q": "x"}) == "Paris"
    # A bad value through with_config is a typed error before any request.
    before = len(ollama_server.requests)
    for bad in (5, math.nan, -1):
        with pytest.raises(RoutingConfigError):
            configurable.with_config(configurable={"threshold": bad}).invoke("hi")
    assert len(ollama_server.requests) == before


def test_lcel_batch_keeps_good_answers_and_types_the_bad_one(router, ollama_server,
                                                             bedrock_server):
    chain = ChatPromptTemplate.from_template("{q}") | router | StrOutputParser()
    results = chain.batch([{"q": "capital?"}, {"q": "   "}], return_exceptions=True)
    assert results[0] == "Paris" and isinstance(results[1], InvalidInputError)
    assert len(_local_requests(ollama_server)) == 1 and bedrock_server.requests == []


# -- answers that must not pass as confident, backends that fail -----------------------------------


def test_whitespace_answer_kept_by_on_unknown_local_is_flagged(router, ollama_backend,
                                                               bedrock_server):
    ollama_backend.add_answer("blank", ["  ", "\n"], logprobs=-0.001)
    routing = router.invoke("blank please", on_unknown="local").response_metadata["routing"]
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["reason"] == Reason.CONFIDENCE_UNKNOWN and routing["confidence"] is None
    assert bedrock_server.requests == []


@pytest.mark.parametrize("on_cloud_error", ["raise", "local"])
def test_both_tiers_failing_is_a_typed_error_with_the_record(router, ollama_backend,
                                                             bedrock_server, on_cloud_error):
    ollama_backend.fail(None, status=500, message="local down")
    bedrock_server.fail(None, "ValidationException", message="cloud refuses")
    with pytest.raises((CloudEscalationError, LocalModelError)) as raised:
        router.invoke("hi", on_cloud_error=on_cloud_error)
    routing = raised.value.routing
    assert routing["reason"] == Reason.LOCAL_ERROR and "local down" in routing["local_error"]
    assert "cloud refuses" in str(routing.get("cloud_error"))
    assert routing["cloud_attempts"] == 1 and len(bedrock_server.requests) == 1


def test_failing_local_without_a_cloud_is_a_local_model_error(ollama_chat, ollama_backend):
    ollama_backend.fail(None, status=503, message="overloaded")
    router = ConfidenceRoutedLLM(local=ollama_chat())
    with pytest.raises(LocalModelError, match="overloaded") as raised:
        list(router.stream("hi"))
    assert raised.value.routing["reason"] == Reason.LOCAL_ERROR


def test_system_only_input_escalated_to_converse_is_answered(ollama_chat, bedrock_chat,
                                                             ollama_backend, bedrock_server):
    ollama_backend.set_default("hi", logprobs=-3.0)
    bedrock_server.set_default("Hello!")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), cloud_retry=NO_RETRY)
    message = router.invoke([SystemMessage("Greet the user.")])
    assert message.content == "Hello!" and len(bedrock_server.requests) == 1
    assert bedrock_server.requests[0]["body"]["messages"], "Converse needs a user turn"


def test_system_only_input_escalated_to_chat_bedrock_fails_typed(ollama_chat,
                                                                  bedrock_invoke_chat,
                                                                  ollama_backend, bedrock_server):
    """ChatBedrock (InvokeModel) sends a system-only conversation without any message, which
    Bedrock rejects (ChatBedrockConverse adds a user turn itself). The router does not rewrite
    the conversation: the caller gets a typed error that says what the cloud answered."""
    ollama_backend.set_default("hi", logprobs=-3.0)
    bedrock_server.set_default("Hello!")
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_invoke_chat(),
                                 cloud_retry=NO_RETRY)
    with pytest.raises(CloudEscalationError, match="ValidationException") as raised:
        router.invoke([SystemMessage("Greet the user.")])
    assert raised.value.routing["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1
