"""Acceptance audit of issue 9 (router core v2): its three high-severity promises and its
retry and usage promises, re-tested the way an outside acceptance tester would — other data
(SSNs, IBANs, phone and card numbers, not only emails), other message shapes, both Bedrock
classes, every entry point and LCEL chains — always counting what the fake servers received.

1. the privacy guard judges everything the cloud would receive, for both Bedrock classes;
2. the spending cap is never exceeded (timeouts, throttling, streams the caller drops,
   concurrency, wrapped cloud models);
3. a hung local model never starves the cloud tier;
4. one layer retries and the routing record counts the real HTTP attempts;
5. usage is counted once in LangChain callbacks, the parent run names the answering model.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.config import Config
from langchain_core.callbacks import UsageMetadataCallbackHandler, get_usage_metadata_callback
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.tools import tool
from langchain_core.tracers.base import BaseTracer

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.costs import PriceTable
from confidence_router.errors import CloudEscalationError, LocalModelError, RoutingConfigError
from confidence_router.guards import PIIGuard
from confidence_router.record import Reason
from confidence_router.retry import RetryPolicy
from confidence_router.settings import RouterSettings

SSN = "078-05-1120"
IBAN = "GB82 WEST 1234 5698 7654 32"
PHONE = "+33 1 42 68 53 00"
CARD_INT = 5555555555554444  # Mastercard test number, Luhn-valid
EMAIL = "m.curie@sorbonne.fr"
PLAIN = "Name one noble gas."
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=False)
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def doubtful(ollama_chat, ollama_backend, bedrock_server):
    """A local model that is never sure (every query wants the cloud); a cloud that answers."""
    ollama_backend.set_default("perhaps argon", logprobs=-2.5)
    bedrock_server.set_default("Argon.")
    return ollama_chat()


def _sent(bedrock_server) -> str:
    return json.dumps([r["body"] for r in bedrock_server.requests], ensure_ascii=False)


def _join(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _routing_of(call, value):
    """The routing record of one call, also when the local model could not read the shape."""
    try:
        return call(value).response_metadata["routing"]
    except LocalModelError as error:
        return error.routing


# =============================================================================================
# 1. the privacy guard judges everything the cloud would receive
# =============================================================================================


def _turns(*middle):
    return [HumanMessage("Hi, I need help."), *middle, HumanMessage(PLAIN)]


PII_SHAPES = {
    # An earlier turn's tool call: an SSN as a string, and a card number as a JSON number (the
    # clients send it as a number: {"card": 5555555555554444}).
    "ssn in tool call args": _turns(
        AIMessage("", tool_calls=[{"name": "verify", "args": {"ssn": SSN}, "id": "c1"}]),
        ToolMessage("verified", tool_call_id="c1"),
    ),
    "card number as an integer in tool call args": _turns(
        AIMessage("", tool_calls=[{"name": "charge", "args": {"card": CARD_INT, "eur": 12},
                                   "id": "c2"}]),
        ToolMessage("charged", tool_call_id="c2"),
    ),
    "card number as an integer in a json tool result": _turns(
        AIMessage("", tool_calls=[{"name": "wallet", "args": {}, "id": "c3"}]),
        ToolMessage(content=[{"type": "json", "json": {"cards": [CARD_INT]}}],
                    tool_call_id="c3"),
    ),
    "phone number under a phone key in tool call args": _turns(
        AIMessage("", tool_calls=[{"name": "sms", "args": {"mobilePhone": "4155550123",
                                                          "text": "on my way"}, "id": "c6"}]),
        ToolMessage("queued", tool_call_id="c6"),
    ),
    "phone number as an integer under a tel key in a json tool result": _turns(
        AIMessage("", tool_calls=[{"name": "contact", "args": {}, "id": "c7"}]),
        ToolMessage(content=[{"type": "json", "json": {"name": "M. Curie",
                                                       "tel": 33142685300}}],
                    tool_call_id="c7"),
    ),
    "iban in a tool result string": _turns(
        AIMessage("", tool_calls=[{"name": "account", "args": {}, "id": "c4"}]),
        ToolMessage(f"account: {IBAN}", tool_call_id="c4"),
    ),
    "phone in an untyped (Bedrock-native) text block of an AI turn": _turns(
        AIMessage(content=[{"text": f"Noted, I will ring {PHONE}."}]),
    ),
    "iban in an untyped text block of the system prompt": [
        SystemMessage(content=[{"text": f"Customer account {IBAN}."}]), HumanMessage(PLAIN),
    ],
    "ssn in reasoning_content (additional_kwargs)": _turns(
        AIMessage("ok", additional_kwargs={"reasoning_content": f"their SSN is {SSN}"}),
    ),
    "email in a v1 standard reasoning block": _turns(
        AIMessage(content=[{"type": "reasoning", "reasoning": f"user mail {EMAIL}"},
                           {"type": "text", "text": "ok"}]),
    ),
    "phone in an anthropic thinking block": _turns(
        AIMessage(content=[{"type": "thinking", "thinking": f"call back on {PHONE}",
                            "signature": "c2lnbmF0dXJlLXZhbHVl"},
                           {"type": "text", "text": "ok"}]),
    ),
    "email in an anthropic tool_use block's input": _turns(
        AIMessage(content=[{"type": "tool_use", "id": "c5", "name": "mail",
                            "input": {"to": EMAIL}}],
                  tool_calls=[{"name": "mail", "args": {"to": EMAIL}, "id": "c5"}]),
        ToolMessage("sent", tool_call_id="c5"),
    ),
    "unreadable v1 file block": [
        HumanMessage(content=[{"type": "text", "text": PLAIN},
                              {"type": "file", "base64": "JVBERi0xLjQ=",
                               "mime_type": "application/pdf"}]),
    ],
    "unreadable audio block": [
        HumanMessage(content=[{"type": "text", "text": PLAIN},
                              {"type": "audio", "base64": "UklGRg==", "mime_type": "audio/wav"}]),
    ],
}


@pytest.mark.parametrize("shape", sorted(PII_SHAPES))
def test_pii_anywhere_in_the_conversation_never_reaches_either_bedrock_api(
    shape, cloud_factory, doubtful, bedrock_server
):
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 escalation_guard=PIIGuard())
    routing = _routing_of(router.invoke, PII_SHAPES[shape])
    assert bedrock_server.requests == [], f"leaked: {_sent(bedrock_server)}"
    assert routing["decision"] == "local" and routing["flagged"] is True
    assert routing["escalation_skipped"].startswith("escalation guard:"), routing
    assert routing["cloud_attempts"] == 0
    # Not a blanket refusal: the plain question escalates through the same router.
    assert router.invoke(PLAIN).response_metadata["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1


def test_tool_arguments_with_bound_tools_are_judged_as_the_numbers_they_are_sent_as(
    cloud_factory, doubtful, bedrock_server
):
    """With tools bound, Converse sends a toolUse block (JSON input), not a text rendering of
    the tool call: a card number stored as an integer must still be caught."""

    @tool
    def charge(card: int, eur: int) -> str:
        """Charge a payment card."""
        return "charged"

    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 escalation_guard=PIIGuard())
    routing = _routing_of(router.bind_tools([charge]).invoke,
                          PII_SHAPES["card number as an integer in tool call args"])
    assert str(CARD_INT) not in _sent(bedrock_server)
    assert bedrock_server.requests == []
    assert routing["escalation_skipped"] == "escalation guard: credit card number"


def test_numbers_that_are_not_personal_data_still_escalate(cloud_factory, doubtful,
                                                           bedrock_server):
    """Judging numbers does not block ordinary ones (amounts, ids, timestamps, versions)."""
    history = _turns(
        AIMessage("", tool_calls=[{"name": "order", "args": {
            "order_id": 20240517, "qty": 3, "eur": 1249.99, "ts": 1715950800, "ok": True},
            "id": "c9"}]),
        ToolMessage(content=[{"type": "json", "json": {"status": 200, "items": [1, 2, 3]}}],
                    tool_call_id="c9"),
    )
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 escalation_guard=PIIGuard())
    routing = _routing_of(router.invoke, history)
    assert routing["decision"] == "cloud", routing
    assert len(bedrock_server.requests) == 1


# One conversation carrying personal data in places a text-only reader misses.
HIDDEN = _turns(
    AIMessage(content=[{"type": "text", "text": "Let me check."}],
              tool_calls=[{"name": "lookup", "args": {"who": {"ssn": SSN}}, "id": "h1"}]),
    ToolMessage(content=[{"type": "text", "text": "found"}], tool_call_id="h1"),
)


def _chain(router):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You answer in one word."), MessagesPlaceholder("history")]
    )
    return prompt | router | StrOutputParser()


def _entry_results(entry, router, messages):
    """Run ``messages`` through one entry point; the routing records it produced."""
    if entry == "invoke":
        return [router.invoke(messages)]
    if entry == "ainvoke":
        return [asyncio.run(router.ainvoke(messages))]
    if entry == "stream":
        return [_join(list(router.stream(messages)))]
    if entry == "astream":
        async def collect():
            return [c async for c in router.astream(messages)]
        return [_join(asyncio.run(collect()))]
    if entry == "batch":
        return router.batch([messages] * 3, config={"max_concurrency": 3})
    if entry == "abatch":
        return asyncio.run(router.abatch([messages] * 3, config={"max_concurrency": 3}))
    raise AssertionError(entry)


ENTRIES = ["invoke", "ainvoke", "stream", "astream", "batch", "abatch"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_of_both_apis_guards_hidden_fields(entry, cloud_factory, doubtful,
                                                             bedrock_server):
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 escalation_guard=PIIGuard())
    for message in _entry_results(entry, router, HIDDEN):
        routing = message.response_metadata["routing"]
        assert routing["escalation_skipped"] == "escalation guard: US SSN", routing
    assert bedrock_server.requests == [] and SSN not in _sent(bedrock_server)
    clean = _entry_results(entry, router, [HumanMessage(PLAIN)])
    assert all(m.response_metadata["routing"]["decision"] == "cloud" for m in clean)
    assert len(bedrock_server.requests) == len(clean)


@pytest.mark.parametrize("entry", ["invoke", "stream", "batch", "ainvoke", "astream"])
def test_lcel_chain_is_guarded_on_both_apis(entry, cloud_factory, doubtful, bedrock_server):
    chain = _chain(ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                       escalation_guard=PIIGuard()))
    inputs = {"history": HIDDEN}
    if entry == "invoke":
        answers = [chain.invoke(inputs)]
    elif entry == "stream":
        answers = ["".join(chain.stream(inputs))]
    elif entry == "batch":
        answers = chain.batch([inputs, inputs])
    elif entry == "ainvoke":
        answers = [asyncio.run(chain.ainvoke(inputs))]
    else:
        async def collect():
            return "".join([c async for c in chain.astream(inputs)])
        answers = [asyncio.run(collect())]
    assert answers and all(a == "perhaps argon" for a in answers)  # the local answer
    assert bedrock_server.requests == []
    assert chain.invoke({"history": [HumanMessage(PLAIN)]}) == "Argon."
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("field", ["system", "additional_model_request_fields"])
@pytest.mark.parametrize("kind", ["PIIGuard", "plain function"])
def test_converse_model_fields_with_personal_data_are_judged(field, kind, doubtful,
                                                             bedrock_chat, bedrock_server):
    """The README's list: the cloud model's ``system`` and ``additional_model_request_fields``
    are judged by every guard, a plain function too."""
    detector = PIIGuard()
    guard = detector if kind == "PIIGuard" else (lambda messages: detector(messages))
    value = ([f"The customer's IBAN is {IBAN}."] if field == "system"
             else {"metadata": {"iban": IBAN}})
    router = ConfidenceRoutedLLM(local=doubtful, cloud=bedrock_chat(max_tokens=40, **{field: value}),
                                 escalation_guard=guard)
    routing = router.invoke(PLAIN).response_metadata["routing"]
    assert bedrock_server.requests == []
    assert routing["escalation_skipped"] == "escalation guard: IBAN"


def test_plain_function_guard_sees_request_fields_the_model_sends(doubtful, bedrock_chat,
                                                                  bedrock_server):
    """A guard that is a plain function (README: "Every guard (a plain function too ...)")
    must judge everything the request carries: the Converse ``requestMetadata`` field and stop
    sequences are sent in the body too."""
    detector = PIIGuard()

    def my_guard(messages):
        return detector(messages)

    cloud = bedrock_chat(max_tokens=40, request_metadata={"customer": EMAIL})
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, escalation_guard=my_guard)
    router.invoke(PLAIN)
    router.invoke(PLAIN, stop=[f"mail {EMAIL}"])
    assert EMAIL not in _sent(bedrock_server)


def test_pii_guard_with_your_own_boto3_client_sees_request_fields(doubtful, bedrock_server):
    """Without the wire check (a cloud model on your own boto3 client) the guard still has to
    judge the model's request fields that reach the body (``request_metadata``)."""
    import boto3
    from langchain_aws import ChatBedrockConverse

    client = boto3.client("bedrock-runtime", region_name="eu-west-3",
                          endpoint_url=bedrock_server.url, aws_access_key_id="mine",
                          aws_secret_access_key="mine",
                          config=Config(retries={"total_max_attempts": 1}))
    cloud = ChatBedrockConverse(model="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                                client=client, max_tokens=40,
                                request_metadata={"customer": EMAIL})
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, escalation_guard=PIIGuard())
    router.invoke(PLAIN)
    assert EMAIL not in _sent(bedrock_server)


# =============================================================================================
# 2. the spending cap is never exceeded
# =============================================================================================

BILLED_ANSWER = "Argon is a noble gas."


def _one_request_budget(router, question: str = PLAIN) -> tuple[CloudBudget, float]:
    """A budget with room for exactly one reservation of ``question`` on ``router``."""
    from confidence_router._record import RoutingTrace

    trace = RoutingTrace(router._base_policy(), [HumanMessage(question)],
                         router._collaborators())
    one = trace._estimate()
    return CloudBudget(max_usd=one * 1.5), one


def test_cloud_timeouts_on_chat_bedrock_never_exceed_the_cap_from_threads(
    cloud_factory, doubtful, bedrock_server
):
    """Timed-out requests run on at the server: each counts as spent, retries included,
    from 8 threads at once, on both Bedrock classes."""
    bedrock_server.set_default(BILLED_ANSWER, latency=0.8)
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False,
                        retry_on=frozenset({"throttled", "transient", "timeout"}))
    probe = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                budget=CloudBudget(max_usd=1.0))
    budget, one = _one_request_budget(probe)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 budget=budget, cloud_timeout=0.25, cloud_retry=retry,
                                 on_cloud_error="local")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: router.invoke(PLAIN), range(8)))
    time.sleep(1.0)  # whatever reached the server has been served by now
    assert len(bedrock_server.requests) == 1
    assert budget.spent == pytest.approx(one) and budget.reserved == 0
    reasons = sorted(r.response_metadata["routing"]["reason"] for r in results)
    assert reasons == sorted([Reason.CLOUD_ERROR] + [Reason.BUDGET_EXCEEDED] * 7)


async def test_cloud_timeouts_from_asyncio_never_exceed_the_cap(cloud_factory, doubtful,
                                                                bedrock_server):
    bedrock_server.set_default(BILLED_ANSWER, latency=0.8)
    retry = RetryPolicy(max_attempts=4, base_delay=0.0, jitter=False,
                        retry_on=frozenset({"timeout"}))
    probe = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                budget=CloudBudget(max_usd=1.0))
    budget, one = _one_request_budget(probe)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 budget=budget, cloud_timeout=0.25, cloud_retry=retry,
                                 on_cloud_error="local")
    results = await asyncio.gather(*(router.ainvoke(PLAIN) for _ in range(6)))
    await asyncio.sleep(1.0)
    assert len(bedrock_server.requests) == 1
    assert budget.spent == pytest.approx(one) and budget.reserved == 0
    assert all(r.response_metadata["routing"]["decision"] == "local" for r in results)


@pytest.mark.parametrize("how", ["sync", "async"])
def test_cloud_stream_timing_out_mid_answer_is_spent(how, cloud_factory, doubtful,
                                                     bedrock_server):
    """The cloud stalls after its first pieces: the attempt times out mid-stream, was billed,
    and is never retried into a second request."""
    bedrock_server.add_answer(None, ["Argon", " is", " a", " noble", " gas", "."],
                              piece_delay=0.5)
    budget = CloudBudget(max_usd=1.0)
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False,
                        retry_on=frozenset({"timeout", "throttled"}))
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 budget=budget, cloud_timeout=0.3, cloud_retry=retry)

    def run():
        if how == "sync":
            return list(router.stream(PLAIN))

        async def collect():
            return [c async for c in router.astream(PLAIN)]

        return asyncio.run(collect())

    with pytest.raises(CloudEscalationError) as raised:
        run()
    routing = raised.value.routing
    assert len(bedrock_server.requests) == 1 == routing["cloud_attempts"]
    assert budget.reserved == 0 and budget.spent > 0
    assert routing.get("budget_settlement") == "committed"


@pytest.mark.parametrize("how", ["close", "garbage-collected", "aclose", "async-gc",
                                 "chain-break"])
def test_streams_the_caller_drops_settle_on_both_apis(how, cloud_factory, doubtful,
                                                      bedrock_server):
    bedrock_server.add_answer(None, "Argon is the third noble gas by abundance.",
                              piece_delay=0.03)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 budget=budget, cloud_retry=NO_RETRY)
    if how in ("close", "garbage-collected"):
        stream = router.stream(PLAIN)
        next(stream)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    elif how == "chain-break":
        for _ in (ChatPromptTemplate.from_template("{q}") | router).stream({"q": PLAIN}):
            break
        gc.collect()
    else:
        async def drop():
            stream = router.astream(PLAIN)
            await anext(stream)
            if how == "aclose":
                await stream.aclose()
                return
            del stream
            gc.collect()
            for _ in range(300):
                if budget.snapshot()["pending"] == 0:
                    return
                await asyncio.sleep(0.01)

        asyncio.run(drop())
    snapshot = budget.snapshot()
    assert snapshot["pending"] == 0 and snapshot["reserved_usd"] == 0
    assert budget.spent > 0  # a stream that started may be billed: never released
    assert len(bedrock_server.requests) == 1


def test_throttling_never_spends_and_cap_holds_under_concurrency(cloud_factory, doubtful,
                                                                 bedrock_server):
    """Throttled requests are not billed (released, so others may use the room); the served
    ones are, within the cap, however 12 threads and their retries interleave."""
    throttles = bedrock_server.fail(None, "ThrottlingException", times=4)
    probe = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                budget=CloudBudget(max_usd=1.0))
    _, one = _one_request_budget(probe)
    budget = CloudBudget(max_usd=one * 3.5)  # room for three reservations at a time
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 budget=budget, cloud_retry=FAST_RETRY, on_cloud_error="local")
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: router.invoke(PLAIN), range(12)))
    records = [r.response_metadata["routing"] for r in results]
    served = [r for r in records if r["decision"] == "cloud"]
    assert throttles.calls == 4
    assert len(bedrock_server.requests) - throttles.calls == len(served) >= 1
    assert sum(r["cloud_attempts"] for r in records) == len(bedrock_server.requests)
    assert budget.reserved == 0
    # Only served requests are spent, each at its actual (scripted, small) cost.
    assert budget.spent == pytest.approx(sum(r["cloud_cost_usd"] for r in served))
    assert budget.spent <= budget.max_usd


def test_max_tokens_bound_through_a_binding_is_what_the_request_carries(
    bedrock_chat, bedrock_invoke_chat, doubtful, bedrock_server
):
    """A cloud whose max_tokens comes from ``.bind(max_tokens=...)`` is accepted with a
    budget, and the limit the budget reserved for is the one that reaches the wire."""
    for cloud in (bedrock_chat().bind(max_tokens=24), bedrock_invoke_chat().bind(max_tokens=24)):
        router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, budget=CloudBudget(1.0))
        router.invoke(PLAIN)
    bodies = [r["body"] for r in bedrock_server.requests]
    assert bodies[0]["inferenceConfig"]["maxTokens"] == 24
    assert bodies[1]["max_tokens"] == 24


def test_cloud_without_max_tokens_is_refused_for_both_apis(bedrock_chat, bedrock_invoke_chat,
                                                           doubtful, bedrock_server):
    for cloud in (bedrock_chat(), bedrock_invoke_chat(),
                  bedrock_chat(additional_model_request_fields={"top_k": 5})):
        with pytest.raises(RoutingConfigError, match="max_tokens"):
            ConfidenceRoutedLLM(local=doubtful, cloud=cloud, budget=CloudBudget(1.0))
    assert bedrock_server.requests == []


# A tool-using turn whose data is mostly numbers, booleans and nesting (sensor readings, a
# matrix): what the request carries is far more than its letters.
NUMERIC_TURN = [
    HumanMessage("Summarise the sensor log."),
    AIMessage("", tool_calls=[{"name": "read_log", "id": "n1", "args": {
        "channels": [0, 1, 2, 3], "window": [[0, 9], [10, 19]] * 40, "raw": True}}]),
    ToolMessage(content=[{"type": "json", "json": {
        "readings": [i % 10 for i in range(600)],
        "flags": [None, False, True] * 150,
        "grid": [[0, 1], [1, 0], []] * 150,
    }}], tool_call_id="n1"),
    HumanMessage("What is the trend?"),
]


def test_reservation_covers_every_byte_of_numeric_tool_data(cloud_factory, doubtful,
                                                           bedrock_server):
    """README: "every byte the request carries counted as a token". Numbers, booleans, nulls
    and the JSON around them are bytes the request carries too (before the fix they counted
    for nothing: the reservation was a fraction of what was sent)."""
    from confidence_router.budget import upper_bound_input_tokens

    @tool
    def read_log(channels: list[int], window: list[list[int]], raw: bool) -> str:
        """Read the sensor log."""
        return ""

    cloud = cloud_factory(max_tokens=40)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud.bind_tools([read_log]),
                                 budget=CloudBudget(max_usd=5.0))
    routing = _routing_of(router.invoke, NUMERIC_TURN)
    assert routing["decision"] == "cloud", routing
    (sent,) = bedrock_server.requests
    sent_bytes = len(json.dumps(sent["body"], ensure_ascii=False).encode("utf-8"))
    tools = router.cloud.kwargs["tools"]
    assert upper_bound_input_tokens(NUMERIC_TURN, tools=tools) >= sent_bytes
    reserved_for = routing["budget_reserved_usd"] / (3.0 / 1e6)  # tokens at $3 per Mtok,
    assert reserved_for >= sent_bytes  # (output at most 40 tokens: counted on top)


def test_cloud_wrapped_in_with_retry_cannot_multiply_billed_requests(doubtful, bedrock_chat,
                                                                     bedrock_server):
    bedrock_server.set_default(BILLED_ANSWER, latency=0.6)
    base = bedrock_chat(max_retries=None,
                        config=Config(read_timeout=0.2, retries={"total_max_attempts": 1}))
    cloud = base.bind(max_tokens=40).with_retry(stop_after_attempt=4,
                                                wait_exponential_jitter=False)
    prices = PriceTable({"RunnableRetry": (3.0, 15.0),
                         "us.anthropic.claude-sonnet-4-5-20250929-v1:0": (3.0, 15.0)})
    try:
        router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, prices=prices,
                                     budget=CloudBudget(max_usd=1.0), on_cloud_error="local")
    except RoutingConfigError:
        return  # refusing the combination at construction keeps the promise too
    budget, _ = _one_request_budget(router)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, prices=prices, budget=budget,
                                 on_cloud_error="local")
    routing = router.invoke(PLAIN).response_metadata["routing"]
    time.sleep(0.8)
    assert len(bedrock_server.requests) <= 1, "requests served beyond the cap"
    assert routing["cloud_attempts"] == len(bedrock_server.requests)


# =============================================================================================
# 3. a hung local model never starves the cloud tier
# =============================================================================================


def _live_threads() -> int:
    """Live threads, not counting the test servers' request handlers."""
    return sum(
        1
        for t in threading.enumerate()
        if getattr(getattr(t, "_target", None), "__name__", "") != "process_request_thread"
    )


def test_hung_local_model_from_40_threads_never_starves_the_cloud(ollama_chat, ollama_backend,
                                                                  cloud_factory,
                                                                  bedrock_server):
    ollama_backend.delay(None, 5.0)
    bedrock_server.set_default("Argon.", latency=0.05)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=40),
                                 local_timeout=0.3, cloud_timeout=3.0)
    baseline = _live_threads()
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: router.invoke(f"{PLAIN} #{i}"), range(40)))
    assert [r.content for r in results] == ["Argon."] * 40
    assert {r.response_metadata["routing"]["local_error_kind"] for r in results} == {"timeout"}
    assert len(bedrock_server.requests) == 40
    time.sleep(0.2)
    assert _live_threads() <= baseline


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_hung_local_model_from_80_tasks_never_starves_the_cloud(entry, ollama_chat,
                                                                      ollama_backend,
                                                                      cloud_factory,
                                                                      bedrock_server):
    ollama_backend.delay(None, 5.0)
    # A healthy cloud: 0.5 s, a quarter of cloud_timeout. The margin is for this process
    # itself, which serves the 80 requests and sends them, all under one GIL on 2 busy cores
    # (in CI, 3 of 80 round trips took over 1 s); queued in the loop's default executor, as
    # they were, 60 of 80 (ainvoke) and all 80 (astream) still ran out of it.
    bedrock_server.set_default("Argon.", latency=0.5)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=40),
                                 local_timeout=0.3, cloud_timeout=2.0)
    before = len(asyncio.all_tasks())

    async def one(i):
        if entry == "ainvoke":
            return await router.ainvoke(f"{PLAIN} #{i}")
        return _join([c async for c in router.astream(f"{PLAIN} #{i}")])

    results = await asyncio.gather(*(one(i) for i in range(80)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed == [], f"{len(failed)} of 80 failed; server got {len(bedrock_server.requests)}"
    assert len(bedrock_server.requests) == 80
    assert sum(r.response_metadata["routing"]["cloud_attempts"] for r in results) == 80
    assert len(asyncio.all_tasks()) == before


def test_hung_local_model_behind_tools_and_structured_output_falls_back(ollama_chat,
                                                                       ollama_backend,
                                                                       bedrock_chat,
                                                                       bedrock_server):
    from pydantic import BaseModel

    class Gas(BaseModel):
        name: str

    ollama_backend.delay(None, 5.0)
    bedrock_server.add_answer(None, "", tool_use=[{"name": "Gas", "input": {"name": "argon"}}])
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=40),
                                 local_timeout=0.3)
    started = time.monotonic()
    gas = router.with_structured_output(Gas).invoke(PLAIN)
    assert gas == Gas(name="argon")
    assert time.monotonic() - started < 3.0  # far below the 5 s hang
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("wrap", ["with_retry", "with_fallbacks"])
def test_hung_local_model_wrapped_by_the_user_still_times_out(wrap, ollama_chat,
                                                              ollama_backend, bedrock_chat,
                                                              bedrock_server):
    ollama_backend.delay(None, 4.0)
    local = (ollama_chat().with_retry(stop_after_attempt=1) if wrap == "with_retry"
             else ollama_chat().with_fallbacks([ollama_chat()]))
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(max_tokens=40),
                                 local_timeout=0.3)
    for call in (router.invoke, lambda q: _join(list(router.stream(q)))):
        started = time.monotonic()
        message = call(PLAIN)
        assert message.response_metadata["routing"].get("local_error_kind") == "timeout"
        assert time.monotonic() - started < 2.0


def test_confident_answer_of_a_wrapped_local_model_stays_local(ollama_chat, ollama_backend,
                                                               bedrock_chat, bedrock_server):
    ollama_backend.set_default("Neon", logprobs=-0.01)
    router = ConfidenceRoutedLLM(local=ollama_chat().with_retry(stop_after_attempt=2),
                                 cloud=bedrock_chat(max_tokens=40))
    routing = router.invoke(PLAIN).response_metadata["routing"]
    assert routing["decision"] == "local", routing["reason"]
    assert bedrock_server.requests == []


def test_default_local_timeout_is_the_documented_finite_one(ollama_chat):
    """README: ``local_timeout`` defaults to 60 s, also from settings."""
    assert ConfidenceRoutedLLM(local=ollama_chat()).local_timeout == 60
    assert RouterSettings.from_mapping({}).local_timeout == 60


# =============================================================================================
# 4. one layer retries; the record counts the real HTTP attempts
# =============================================================================================


@pytest.mark.parametrize("entry", ["invoke", "ainvoke", "stream", "astream"])
def test_throttled_escalation_counts_every_request_on_both_apis(entry, cloud_factory,
                                                                doubtful, bedrock_server):
    bedrock_server.fail(None, "ThrottlingException", times=2)
    # No max_retries and no config: botocore would retry on its own if nobody switched it off.
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40,
                                                                     max_retries=None),
                                 cloud_retry=FAST_RETRY)
    message = _entry_results(entry, router, [HumanMessage(PLAIN)])[0]
    routing = message.response_metadata["routing"]
    assert message.text == "Argon."
    assert len(bedrock_server.requests) == 3 == routing["cloud_attempts"]
    assert [r["kind"] for r in routing["cloud_retries"]] == ["throttled", "throttled"]


@pytest.mark.parametrize("entry", ["invoke", "stream"])
def test_throttling_that_never_ends_is_bounded_by_the_router_alone(entry, cloud_factory,
                                                                   doubtful, bedrock_server):
    bedrock_server.fail(None, "ThrottlingException")
    router = ConfidenceRoutedLLM(
        local=doubtful,
        cloud=cloud_factory(max_tokens=40, max_retries=None,
                            config=Config(retries={"max_attempts": 6, "mode": "adaptive"})),
        cloud_retry=FAST_RETRY,
    )
    with pytest.raises(CloudEscalationError) as raised:
        _entry_results(entry, router, [HumanMessage(PLAIN)])
    assert len(bedrock_server.requests) == 3 == raised.value.routing["cloud_attempts"]


def test_chat_bedrock_on_the_converse_api_retries_once_per_layer(bedrock_invoke_chat, doubtful,
                                                                 bedrock_server):
    bedrock_server.fail(None, "ThrottlingException", times=2)
    cloud = bedrock_invoke_chat(max_tokens=40, max_retries=None, beta_use_converse_api=True)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, cloud_retry=FAST_RETRY)
    routing = router.invoke(PLAIN).response_metadata["routing"]
    assert len(bedrock_server.requests) == 3 == routing["cloud_attempts"]


def test_throttling_reported_inside_the_stream_is_retried_by_invoke(cloud_factory, doubtful,
                                                                    bedrock_server):
    """The same scripted throttling, answered to a non-streaming request: retried, counted."""
    bedrock_server.fail(None, "ThrottlingException", after_pieces=0, times=2)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=FAST_RETRY)
    message = router.invoke(PLAIN)
    assert message.text == "Argon."
    assert len(bedrock_server.requests) == 3 == message.response_metadata["routing"][
        "cloud_attempts"]


@pytest.mark.parametrize("entry", ["stream", "astream"])
def test_throttling_reported_inside_the_stream_before_any_text_is_retried(entry, cloud_factory,
                                                                         doubtful,
                                                                         bedrock_server):
    bedrock_server.fail(None, "ThrottlingException", after_pieces=0, times=2)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=FAST_RETRY)
    message = _entry_results(entry, router, [HumanMessage(PLAIN)])[0]
    assert message.text == "Argon."
    assert len(bedrock_server.requests) == 3 == message.response_metadata["routing"][
        "cloud_attempts"]


def test_wrapped_cloud_retries_do_not_stack(doubtful, bedrock_chat, bedrock_server):
    bedrock_server.fail(None, "ThrottlingException")
    cloud = bedrock_chat(max_tokens=40).with_retry(stop_after_attempt=3,
                                                   wait_exponential_jitter=False)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, cloud_retry=FAST_RETRY,
                                 on_cloud_error="local")
    routing = router.invoke(PLAIN).response_metadata["routing"]
    assert routing["cloud_attempts"] == len(bedrock_server.requests)
    assert len(bedrock_server.requests) <= 3


# =============================================================================================
# 5. usage counted once; the parent run names the answering model
# =============================================================================================


@pytest.fixture
def escalating(ollama_chat, ollama_backend, bedrock_server, cloud_factory):
    """'noble' escalates (cloud usage 17/5), 'capital' is kept locally."""
    ollama_backend.add_answer("noble", "perhaps argon", logprobs=-2.5, prompt_tokens=7)
    ollama_backend.add_answer("capital", "Paris", logprobs=-0.02, prompt_tokens=5)
    bedrock_server.add_answer("noble", "Argon.", input_tokens=17, output_tokens=5)
    cloud = cloud_factory(max_tokens=40)
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud), cloud


def _via(entry, runnable, value, config):
    if entry == "invoke":
        return runnable.invoke(value, config)
    if entry == "stream":
        return _join(list(runnable.stream(value, config)))
    if entry == "batch":
        return runnable.batch([value], config)[0]
    if entry == "ainvoke":
        return asyncio.run(runnable.ainvoke(value, config))
    async def collect():
        return [c async for c in runnable.astream(value, config)]
    return _join(asyncio.run(collect()))


USAGE_ENTRIES = ["invoke", "stream", "batch", "ainvoke", "astream"]


@pytest.mark.parametrize("entry", USAGE_ENTRIES)
def test_get_usage_metadata_callback_counts_each_tier_once(entry, escalating):
    router, _ = escalating
    with get_usage_metadata_callback() as callback:
        message = _via(entry, router, "Which noble gas is most abundant?", None)
    routing = message.response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert callback.usage_metadata["scripted-local"]["input_tokens"] == 7
    cloud_usage = callback.usage_metadata[routing["models"]["cloud"]]
    assert (cloud_usage["input_tokens"], cloud_usage["output_tokens"]) == (17, 5)
    assert len(callback.usage_metadata) == 2  # the router's own run adds nothing
    # The caller's message carries the answering tier's usage; the local one stays visible.
    assert message.usage_metadata["input_tokens"] == 17
    assert routing["usage"]["local"]["input_tokens"] == 7
    assert routing["usage"]["cloud"]["input_tokens"] == 17


@pytest.mark.parametrize("entry", USAGE_ENTRIES)
def test_a_kept_local_answer_is_counted_once(entry, escalating):
    router, _ = escalating
    with get_usage_metadata_callback() as callback:
        message = _via(entry, router, "What is the capital of France?", None)
    assert message.response_metadata["routing"]["decision"] == "local"
    assert set(callback.usage_metadata) == {"scripted-local"}
    assert callback.usage_metadata["scripted-local"]["input_tokens"] == 5
    assert message.usage_metadata["input_tokens"] == 5


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke"])
def test_usage_through_an_lcel_chain_is_counted_once(entry, escalating):
    router, _ = escalating
    chain = ChatPromptTemplate.from_template("Q: {q}") | router
    handler = UsageMetadataCallbackHandler()
    message = _via(entry, chain, {"q": "Which noble gas is most abundant?"},
                   {"callbacks": [handler]})
    totals = sum(u["input_tokens"] for u in handler.usage_metadata.values())
    assert totals == 7 + 17
    assert message.usage_metadata["input_tokens"] == 17


def test_usage_handler_given_to_the_constructor_counts_the_call_once(ollama_chat,
                                                                    ollama_backend,
                                                                    bedrock_chat,
                                                                    bedrock_server):
    ollama_backend.add_answer("noble", "perhaps argon", logprobs=-2.5, prompt_tokens=7)
    bedrock_server.add_answer("noble", "Argon.", input_tokens=17, output_tokens=5)
    handler = UsageMetadataCallbackHandler()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=40),
                                 callbacks=[handler])
    router.invoke("Which noble gas is most abundant?")
    totals = sum(u["input_tokens"] for u in handler.usage_metadata.values())
    assert totals == 7 + 17


class _Runs(BaseTracer):
    def __init__(self):
        super().__init__()
        self.runs = []

    def _persist_run(self, run):
        self.runs.append(run)


def _router_runs(tracer):
    """The router's run(s): found in the persisted trees by run type and name."""
    found = []
    pending = list(tracer.runs)
    while pending:
        run = pending.pop()
        if run.name == "ConfidenceRoutedLLM":
            found.append(run)
        pending.extend(run.child_runs)
    return found


@pytest.mark.parametrize("entry", USAGE_ENTRIES)
def test_parent_run_names_the_model_that_answered_on_every_entry_point(entry, escalating):
    router, cloud = escalating
    cloud_name = getattr(cloud, "model_id", None) or cloud.model
    for question, expected in (("Which noble gas is most abundant?", cloud_name),
                               ("What is the capital of France?", "scripted-local")):
        tracer = _Runs()
        _via(entry, router, question, {"callbacks": [tracer]})
        (run,) = _router_runs(tracer)
        assert run.extra["metadata"]["ls_model_name"] == expected, (entry, question)


def test_parent_run_in_a_chain_names_the_cloud_model(escalating):
    router, cloud = escalating
    cloud_name = getattr(cloud, "model_id", None) or cloud.model
    tracer = _Runs()
    chain = ChatPromptTemplate.from_template("Q: {q}") | router | StrOutputParser()
    assert chain.invoke({"q": "Which noble gas is most abundant?"},
                        {"callbacks": [tracer]}) == "Argon."
    (run,) = _router_runs(tracer)
    assert run.extra["metadata"]["ls_model_name"] == cloud_name


@pytest.mark.parametrize("question", ["Which noble gas is most abundant?",
                                      "What is the capital of France?"])
def test_astream_events_end_of_the_router_run_names_the_answering_model(question, escalating):
    """The router's run as ``astream_events`` reports it: its end event's metadata names the
    model whose answer it returns (the start event cannot know it yet)."""
    router, cloud = escalating
    cloud_name = getattr(cloud, "model_id", None) or cloud.model

    async def events():
        return [e async for e in router.astream_events(question, version="v2")]

    collected = asyncio.run(events())
    (end,) = [e for e in collected
              if e["event"] == "on_chat_model_end" and e["name"] == "ConfidenceRoutedLLM"]
    decision = end["data"]["output"].response_metadata["routing"]["decision"]
    expected = cloud_name if decision == "cloud" else "scripted-local"
    assert (decision == "cloud") == question.startswith("Which")
    assert end["metadata"]["ls_model_name"] == expected
    assert end["metadata"]["routing_decision"] == decision
    (start,) = [e for e in collected
                if e["event"] == "on_chat_model_start" and e["name"] == "ConfidenceRoutedLLM"]
    assert start["metadata"]["ls_model_name"] == "confidence-router"  # not rewritten later


def test_streaming_router_invoke_counts_usage_once(ollama_chat, ollama_backend, bedrock_chat,
                                                   bedrock_server):
    """``streaming=True`` sends invoke through the stream path: still counted once."""
    ollama_backend.add_answer("noble", "perhaps argon", logprobs=-2.5, prompt_tokens=7)
    bedrock_server.add_answer("noble", "Argon.", input_tokens=17, output_tokens=5)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=40),
                                 streaming=True)
    with get_usage_metadata_callback() as callback:
        message = router.invoke("Which noble gas is most abundant?")
    assert sum(u["input_tokens"] for u in callback.usage_metadata.values()) == 7 + 17
    assert message.usage_metadata["input_tokens"] == 17
    assert message.response_metadata["routing"]["usage"]["local"]["input_tokens"] == 7


def test_cloud_wrapped_in_with_retry_is_named_and_priced_as_its_model(doubtful, bedrock_chat,
                                                                      bedrock_server):
    cloud = bedrock_chat(max_tokens=40).with_retry(stop_after_attempt=2)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud)
    tracer = _Runs()
    routing = router.invoke(PLAIN, config={"callbacks": [tracer]}).response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert routing["models"]["cloud"] == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert routing["cloud_cost_usd"] is not None and routing["cloud_cost_usd"] > 0
    (run,) = _router_runs(tracer)
    assert run.extra["metadata"]["ls_model_name"] == routing["models"]["cloud"]


def test_budget_refuses_a_binding_that_removes_max_tokens_from_the_request(doubtful,
                                                                          bedrock_chat,
                                                                          bedrock_server):
    high = {"reasoningConfig": {"type": "enabled", "maxReasoningEffort": "high"}}
    cloud = bedrock_chat(max_tokens=40).bind(additional_model_request_fields=high)
    try:
        router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud, budget=CloudBudget(1.0))
    except RoutingConfigError:
        return  # refused at construction, as for the same field set on the model itself
    router.invoke(PLAIN)
    (sent,) = bedrock_server.requests
    assert sent["body"].get("inferenceConfig", {}).get("maxTokens") == 40


def _run_usage(run) -> int:
    """Input tokens a trace viewer would add up for ``run`` and its descendants."""
    total = 0
    for generations in (run.outputs or {}).get("generations", []):
        for generation in generations:
            message = generation.get("message") if isinstance(generation, dict) else None
            kwargs = message.get("kwargs", {}) if isinstance(message, dict) else {}
            usage = kwargs.get("usage_metadata") or {}
            total += usage.get("input_tokens", 0)
    return total + sum(_run_usage(child) for child in run.child_runs)


@pytest.mark.parametrize("entry", USAGE_ENTRIES)
def test_a_trace_adds_up_each_tiers_tokens_once(entry, escalating):
    """What LangSmith sums over a trace: the router's run reports none, its children theirs."""
    router, _ = escalating
    tracer = _Runs()
    _via(entry, router, "Which noble gas is most abundant?", {"callbacks": [tracer]})
    (root,) = tracer.runs
    assert _run_usage(root) == 7 + 17
    (router_run,) = _router_runs(tracer)
    assert {child.name for child in router_run.child_runs} == {"local", "cloud"}
