"""What a local answer must do besides being confident, and knobs bound with ``bind``.

A confident local answer that does not do what the request requires (``answer_check``, a
forced tool call, a structured answer that parses) escalates with reason
``unusable_answer``; knobs bound with ``router.bind(...)`` survive ``bind_tools`` and
``with_structured_output``. Every test counts what the fake servers received.
"""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from confidence_router import ConfidenceRoutedLLM
from confidence_router.calibration import RollingQuantileThreshold
from confidence_router.errors import RoutingConfigError
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy

NO_RETRY = RetryPolicy(max_attempts=1)


class Capital(BaseModel):
    country: str
    capital: str


def get_weather(city: str) -> str:
    """Weather of a city."""
    return city


def _routing(message):
    return message.response_metadata["routing"]


@pytest.fixture
def make_router(ollama_chat, bedrock_chat, bedrock_server):
    bedrock_server.set_default("cloud answer")

    def build(**kwargs):
        return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=50),
                                   cloud_retry=NO_RETRY, **kwargs)

    return build


def test_answer_check_rejects_a_confident_answer_which_then_escalates(
    make_router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.set_default("Paris", logprobs=-0.01)
    seen = []

    def must_be_json(message):
        seen.append(message.text)
        return None if message.text.startswith("{") else "not JSON"

    router = make_router(answer_check=must_be_json)
    message = router.invoke("Capital of France, as JSON?")
    routing = _routing(message)
    assert (routing["decision"], routing["reason"]) == ("cloud", Reason.UNUSABLE_ANSWER)
    assert routing["unusable_answer"] == "not JSON"
    assert routing["confidence"] > 0.9  # it was confident: the check decided
    assert message.content == "cloud answer"
    assert seen == ["Paris"]
    assert len(ollama_server.requests_to("/api/chat")) == 1 and len(bedrock_server.requests) == 1


def test_answer_check_that_passes_or_is_not_asked_changes_nothing(
    make_router, ollama_backend, bedrock_server
):
    calls = []
    router = make_router(answer_check=lambda m: calls.append(m.text))  # returns None: usable
    ollama_backend.set_default("Paris", logprobs=-0.01)
    assert _routing(router.invoke("q"))["reason"] == Reason.CONFIDENT
    ollama_backend.set_default("Paris", logprobs=-3.0)  # low confidence: escalates anyway
    assert _routing(router.invoke("q"))["reason"] == Reason.LOW_CONFIDENCE
    assert calls == ["Paris"]  # not consulted when the confidence already escalates
    assert len(bedrock_server.requests) == 1


def test_a_raising_answer_check_rejects_the_answer(make_router, ollama_backend, bedrock_server):
    def broken(message):
        raise KeyError("boom")

    ollama_backend.set_default("Paris", logprobs=-0.01)
    routing = _routing(make_router(answer_check=broken).invoke("q"))
    assert routing["reason"] == Reason.UNUSABLE_ANSWER
    assert routing["unusable_answer"].startswith("answer check failed (KeyError")
    assert len(bedrock_server.requests) == 1


def test_unusable_answer_that_cannot_escalate_is_served_flagged(
    make_router, ollama_backend, bedrock_server
):
    ollama_backend.set_default("Paris", logprobs=-0.01)
    router = make_router(answer_check=lambda m: "not JSON", allow_escalation=False)
    message = router.invoke("q")
    routing = _routing(message)
    assert (routing["decision"], routing["flagged"], routing["would_escalate"]) == (
        "local", True, True)
    assert routing["reason"] == Reason.UNUSABLE_ANSWER
    assert message.content == "Paris" and bedrock_server.requests == []


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke", "astream"])
async def test_forced_tool_call_missing_locally_escalates_on_every_entry_point(
    make_router, ollama_backend, ollama_server, bedrock_server, entry
):
    ollama_backend.set_default("It is sunny.", logprobs=-0.01)  # confident, but no tool call
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    bound = make_router().bind_tools([get_weather], tool_choice="get_weather")
    question = "Weather in Paris?"
    if entry == "invoke":
        message = bound.invoke(question)
    elif entry == "ainvoke":
        message = await bound.ainvoke(question)
    elif entry == "stream":
        chunks = list(bound.stream(question))
        message = chunks[0]
        for chunk in chunks[1:]:
            message = message + chunk
    else:
        chunks = [c async for c in bound.astream(question)]
        message = chunks[0]
        for chunk in chunks[1:]:
            message = message + chunk
    routing = _routing(message)
    assert routing["reason"] == Reason.UNUSABLE_ANSWER
    assert routing["unusable_answer"] == "no call of the forced tool 'get_weather'"
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert len(ollama_server.requests_to("/api/chat")) == 1 and len(bedrock_server.requests) == 1


def test_a_local_call_of_the_forced_tool_is_kept(make_router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("q", "Checking.", logprobs=-0.01, tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Paris"}}])
    for choice in ("get_weather", "any"):
        message = make_router().bind_tools([get_weather], tool_choice=choice).invoke("q")
        assert _routing(message)["decision"] == "local", choice
        assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    assert bedrock_server.requests == []


def test_unforced_tool_choice_adds_no_requirement(make_router, ollama_backend, bedrock_server):
    ollama_backend.set_default("It is sunny.", logprobs=-0.01)
    for choice in (None, "auto"):
        message = make_router().bind_tools([get_weather], tool_choice=choice).invoke("q")
        assert _routing(message)["reason"] == Reason.CONFIDENT
    assert bedrock_server.requests == []


def test_a_later_binding_replaces_the_forced_tool_requirement(
    make_router, ollama_backend, bedrock_server
):
    ollama_backend.set_default("It is sunny.", logprobs=-0.01)
    router = make_router()
    forced = router.bind_tools([get_weather], tool_choice="get_weather")
    # bind_tools on the binding reaches the router copy, which carries the requirement...
    assert _routing(forced.invoke("q"))["reason"] == Reason.UNUSABLE_ANSWER
    # ...a later bind_tools without a forced choice replaces it, as it replaces the tools.
    free = forced.bind_tools([get_weather])
    assert _routing(free.invoke("q"))["reason"] == Reason.CONFIDENT
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_local_answer_that_does_not_parse_escalates(
    make_router, ollama_backend, bedrock_server, method
):
    ollama_backend.set_default("Nairobi, I think.", logprobs=-0.01)  # confident prose
    if method == "function_calling":
        bedrock_server.add_answer(None, "", tool_use=[
            {"name": "Capital", "input": {"country": "Kenya", "capital": "Nairobi"}}])
    else:
        bedrock_server.set_default(json.dumps({"country": "Kenya", "capital": "Nairobi"}))
    out = make_router().with_structured_output(Capital, method=method, include_raw=True).invoke(
        "Capital of Kenya?")
    assert out["parsed"] == Capital(country="Kenya", capital="Nairobi")
    routing = _routing(out["raw"])
    assert routing["reason"] == Reason.UNUSABLE_ANSWER
    assert len(bedrock_server.requests) == 1


def test_structured_local_answer_that_parses_is_kept(make_router, ollama_backend, bedrock_server):
    ollama_backend.set_default(json.dumps({"country": "Kenya", "capital": "Nairobi"}),
                               logprobs=-0.01)
    out = make_router().with_structured_output(Capital, method="json_schema").invoke("q")
    assert out == Capital(country="Kenya", capital="Nairobi")
    assert bedrock_server.requests == []


def test_with_bound_tiers_rejects_an_unknown_tier(make_router):
    with pytest.raises(RoutingConfigError, match="unknown tiers"):
        make_router().with_bound_tiers({"locall": None})


# -- knobs bound with bind() ------------------------------------------------------------------


def test_bound_knob_is_validated_at_bind_time(make_router):
    router = make_router()
    with pytest.raises(RoutingConfigError, match="allow_escalation"):
        router.bind(allow_escalation="no")
    with pytest.raises(RoutingConfigError, match="threshold"):
        router.bind(threshold=2.0)


def test_bound_knobs_apply_to_every_call_and_per_call_kwargs_still_win(
    make_router, ollama_backend, bedrock_server
):
    ollama_backend.set_default("Paris", logprobs=-3.0)  # unsure
    private = make_router().bind(allow_escalation=False)
    routing = _routing(private.invoke("q"))
    assert routing["policy"]["allow_escalation"] is False and routing["decision"] == "local"
    assert bedrock_server.requests == []
    routing = _routing(private.invoke("q", allow_escalation=True))
    assert routing["decision"] == "cloud" and len(bedrock_server.requests) == 1
    # bound knobs accumulate; other bound kwargs stay on the binding
    both = private.bind(threshold=0.1)
    routing = _routing(both.invoke("q"))
    assert routing["policy"]["allow_escalation"] is False and routing["threshold"] == 0.1


def test_bound_threshold_wins_over_the_calibrator(make_router, ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.3)
    router = make_router(calibrator=RollingQuantileThreshold(target_rate=0.3))
    assert _routing(router.invoke("q"))["threshold"] == 0.7  # the calibrator's
    message = router.bind(threshold=0.99).invoke("q")
    assert _routing(message)["threshold"] == 0.99 and message.content == "cloud answer"


def test_misspelt_configurable_field_names_the_field(make_router):
    from langchain_core.runnables import ConfigurableField

    with pytest.raises(RoutingConfigError, match="threshold"):
        make_router().configurable_fields(treshold=ConfigurableField(id="t"))


@pytest.mark.parametrize("kwarg", [{"tool_choice": "any"}, {"parallel_tool_calls": False}])
def test_tool_kwargs_per_call_are_a_config_error_before_any_request(
    make_router, ollama_server, bedrock_server, kwarg
):
    with pytest.raises(RoutingConfigError, match="bind_tools"):
        make_router().bind_tools([get_weather]).invoke("q", **kwarg)
    assert ollama_server.requests_to("/api/chat") == [] and bedrock_server.requests == []


# -- message shapes ---------------------------------------------------------------------------


def test_streamed_and_invoked_local_metadata_is_plain_json(make_router, ollama_backend):
    ollama_backend.set_default("Paris is big", logprobs=-0.01)
    router = make_router()
    message = router.invoke("q")
    assert json.loads(json.dumps(message.response_metadata))["logprobs"][0]["token"] == "Paris"
    for chunk in router.stream("q"):
        json.dumps(chunk.response_metadata)


def test_reasoning_of_an_earlier_cloud_turn_is_not_sent_to_the_local_tier(
    make_router, ollama_backend, ollama_server, bedrock_server
):
    ollama_backend.set_default("Paris", logprobs=-0.01)
    turn = AIMessage(content=[
        {"type": "reasoning_content", "reasoning_content": {"text": "hmm", "signature": "s"}},
        {"type": "text", "text": "Hello!"}])
    message = make_router().invoke([HumanMessage("Hi"), turn, HumanMessage("Capital?")])
    assert _routing(message)["decision"] == "local"
    (sent,) = [r["body"] for r in ollama_server.requests_to("/api/chat")]
    assert sent["messages"][1] == {"role": "assistant", "content": "Hello!"}
    assert bedrock_server.requests == []


def test_forced_tool_check_reads_every_tool_choice_form():
    from confidence_router.tier_clients import forced_tool_check

    class Answer:
        def __init__(self, *names):
            self.tool_calls = [{"name": n, "args": {}} for n in names]

    for free in (None, "auto", "none", "", False):
        assert forced_tool_check(free) is None, free
    for any_tool in ("any", "required", True):
        check = forced_tool_check(any_tool)
        assert check(Answer("x")) is None and "forced" in check(Answer())
    for named in ("get_weather", {"type": "function", "function": {"name": "get_weather"}},
                  {"type": "tool", "name": "get_weather"}):
        check = forced_tool_check(named)
        assert check(Answer("get_weather")) is None
        assert check(Answer("other")) == "no call of the forced tool 'get_weather'"


def test_bind_tools_strict_goes_to_the_cloud_only(make_router, ollama_backend, ollama_server,
                                                  bedrock_server):
    ollama_backend.set_default("hmm", logprobs=-3.0)  # unsure: escalates
    bedrock_server.add_answer(None, "", tool_use=[
        {"name": "get_weather", "input": {"city": "Paris"}}])
    message = make_router().bind_tools([get_weather], strict=True).invoke("Weather in Paris?")
    assert message.tool_calls[0]["args"] == {"city": "Paris"}
    (local,) = [r["body"] for r in ollama_server.requests_to("/api/chat")]
    assert "strict" not in json.dumps(local.get("options") or {})
    (cloud,) = bedrock_server.requests
    assert [t["toolSpec"]["name"] for t in cloud["body"]["toolConfig"]["tools"]] == [
        "get_weather"]
