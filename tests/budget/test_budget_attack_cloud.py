"""The spending cap attacked from the caller's side: cancelled tasks, abandoned streams,
Ctrl-C mid-request, dozens of concurrent callers, a cloud that bills more than it was asked
for, bound tools, and throttling mixed with timeouts.

Every test runs the unchanged LangChain clients against the project's fake servers and counts
what the fake Bedrock server received and what the budget holds; both Bedrock APIs
(``ChatBedrockConverse`` and ``ChatBedrock``) are attacked where the client code differs."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import HumanMessage

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import (
    IMAGE_BLOCK_TOKENS,
    CloudBudget,
    upper_bound_input_tokens,
    upper_bound_request_cost,
)
from confidence_router.costs import Price
from confidence_router.errors import (
    BudgetExceededError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.record import Reason
from confidence_router.retry import ErrorKind, RetryPolicy
from confidence_router.testing.bedrock_server import encode_event_frame

SONNET_PRICE = Price(3.0, 15.0)
MAX_TOKENS = 50
QUESTION = "an obscure question"


class RecordSink:
    """A stats sink keeping every finished routing record."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def record(self, routing: dict) -> None:
        with self._lock:
            self.records.append(dict(routing))


def bound(question: str = QUESTION, max_tokens: int = MAX_TOKENS) -> float:
    """What the router reserves for one request of ``question``: its upper bound."""
    return upper_bound_request_cost([HumanMessage(question)], max_output_tokens=max_tokens,
                                    price=SONNET_PRICE)


def bill_exactly_the_bound(bedrock_server, question: str = QUESTION, **kwargs) -> float:
    """Script the cloud to bill each request at its upper bound (the worst allowed case), so
    the number of requests the cap admits is exact."""
    bedrock_server.add_answer(question, "cloud answer",
                              input_tokens=upper_bound_input_tokens([HumanMessage(question)]),
                              output_tokens=MAX_TOKENS, **kwargs)
    return bound(question)


@pytest.fixture
def unsure(ollama_backend):
    """Every local answer is unsure: every query escalates."""
    ollama_backend.set_default("unsure", logprobs=-3.0)


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- the caller goes away while the cloud request is in flight -------------------------------


async def test_cancelled_ainvoke_mid_cloud_request_counts_as_spent(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.set_default("late cloud answer", latency=0.6)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    task = asyncio.create_task(router.ainvoke(QUESTION))
    await _until(lambda: len(bedrock_server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The request reached the cloud and may be billed: its reservation is spent at once.
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(bound())
    await asyncio.sleep(0.8)  # the server finishes what it received
    assert len(bedrock_server.requests) == 1


async def test_cancelled_ainvoke_record_prices_what_the_budget_committed(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    bedrock_server.set_default("late cloud answer", latency=0.6)
    budget, sink = CloudBudget(max_usd=1.0), RecordSink()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget, stats=sink)
    task = asyncio.create_task(router.ainvoke(QUESTION))
    await _until(lambda: len(bedrock_server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = sink.records
    assert record["budget_settlement"] == "committed"
    # What the stats sink is told the call cost must be what the budget counted as spent.
    assert record["cloud_cost_usd"] == pytest.approx(budget.spent)
    assert record["cloud_cost_estimated"] is True


async def test_16_tasks_cancelled_mid_escalation_never_undercount(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    # Billed at the bound, so whether a request was answered before its caller was cancelled
    # (committed at its usage) or not (committed at its reservation), it counts one bound.
    one = bill_exactly_the_bound(bedrock_server, latency=0.6)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    tasks = [asyncio.create_task(router.ainvoke(QUESTION)) for _ in range(16)]
    await _until(lambda: len(bedrock_server.requests) >= 4)  # some in flight, some queued
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert budget.reserved == 0 and budget.snapshot()["pending"] == 0
    await asyncio.sleep(1.0)  # whatever was sent finishes on the server
    answered = sum(not isinstance(r, BaseException) for r in results)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert answered + cancelled == 16 and cancelled > 0
    # Every request that reached the cloud is counted (never less than what was sent).
    assert budget.spent >= len(bedrock_server.requests) * one - 1e-12


async def test_cancelled_astream_mid_cloud_stream_counts_as_spent(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, "a b c d e f g h i j k l", piece_delay=0.1)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    got: list[str] = []

    async def consume() -> None:
        async for chunk in router.astream(QUESTION):
            got.append(chunk.text)

    task = asyncio.create_task(consume())
    await _until(lambda: len(got) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(bound())
    assert len(bedrock_server.requests) == 1


async def test_async_stream_dropped_without_aclose_settles_on_garbage_collection(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, "a b c d e f g h", piece_delay=0.05)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    stream = router.astream(QUESTION)
    await anext(stream)
    await anext(stream)
    assert budget.reserved == pytest.approx(bound())  # still in flight: held
    del stream  # never closed by the caller
    gc.collect()
    await _until(lambda: budget.reserved == 0)  # the loop's async-generator finaliser ran
    assert budget.spent == pytest.approx(bound())
    assert len(bedrock_server.requests) == 1


def test_event_loop_ending_with_a_cloud_stream_open_settles_it(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, "a b c d e f g h", piece_delay=0.05)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    kept = []

    async def main() -> None:
        stream = router.astream(QUESTION)
        await anext(stream)
        await anext(stream)
        kept.append(stream)  # still referenced, never closed, when the loop ends

    asyncio.run(main())
    assert budget.reserved == 0  # asyncio.run closed the open stream with its loop
    assert budget.spent == pytest.approx(bound())
    assert len(bedrock_server.requests) == 1


def test_sync_stream_dropped_without_close_settles_on_garbage_collection(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, "a b c d e f g h", piece_delay=0.05)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    stream = router.stream(QUESTION)
    next(stream)
    next(stream)
    assert budget.reserved == pytest.approx(bound())
    del stream
    gc.collect()
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(bound())
    assert len(bedrock_server.requests) == 1


def test_ctrl_c_mid_cloud_request_commits_and_the_router_still_works(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    bedrock_server.add_answer(None, "late cloud answer", latency=0.8, times=1)
    bedrock_server.set_default("cloud answer")
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)  # Ctrl-C while the cloud is thinking
        with pytest.raises(KeyboardInterrupt):
            router.invoke(QUESTION)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(bedrock_server.requests) == 1
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(bound())
    # The interrupted connection does not poison the next call.
    message = router.invoke(QUESTION)
    assert message.text == "cloud answer"
    assert len(bedrock_server.requests) == 2
    assert budget.reserved == 0 and budget.snapshot()["granted"] == 2


# -- many callers against a cap that admits N requests ----------------------------------------


def test_32_threads_streaming_and_invoking_never_exceed_the_cap(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    one = bill_exactly_the_bound(bedrock_server, piece_delay=0.01)
    admitted = 4
    budget = CloudBudget(max_usd=admitted * one + one / 2)
    sink = RecordSink()
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget, stats=sink)

    def call(i: int) -> str:
        if i % 2:
            return "".join(chunk.text for chunk in router.stream(QUESTION))
        return router.invoke(QUESTION).text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(32)))
    assert len(bedrock_server.requests) == admitted
    assert answers.count("cloud answer") == admitted
    assert answers.count("unsure") == 32 - admitted
    assert budget.spent == pytest.approx(admitted * one) and budget.spent <= budget.max_usd
    assert budget.reserved == 0
    reasons = [r["reason"] for r in sink.records]
    assert reasons.count(Reason.BUDGET_EXCEEDED) == 32 - admitted
    assert sum(r["cloud_cost_usd"] for r in sink.records) == pytest.approx(budget.spent)


async def test_threads_and_event_loop_share_one_cap(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    one = bill_exactly_the_bound(bedrock_server, piece_delay=0.01)
    admitted = 5
    budget = CloudBudget(max_usd=admitted * one + one / 2)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)

    async def astreamed() -> str:
        return "".join([chunk.text async for chunk in router.astream(QUESTION)])

    async def invoked() -> str:
        return (await router.ainvoke(QUESTION)).text

    with ThreadPoolExecutor(12) as pool:
        threaded = [pool.submit(router.invoke, QUESTION) for _ in range(12)]
        looped = await asyncio.gather(*([astreamed() for _ in range(10)]
                                        + [invoked() for _ in range(10)]))
        answers = list(looped) + [f.result().text for f in threaded]
    assert len(bedrock_server.requests) == admitted
    assert answers.count("cloud answer") == admitted
    assert budget.spent == pytest.approx(admitted * one) and budget.spent <= budget.max_usd
    assert budget.reserved == 0


# -- the cloud bills more than the reservation ------------------------------------------------


def test_cloud_answering_beyond_max_tokens_is_recorded_in_full_and_stops_escalation(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    # A misbehaving endpoint reports 40x the output tokens it was allowed.
    bedrock_server.add_answer(None, "a very long answer", input_tokens=10,
                              output_tokens=40 * MAX_TOKENS)
    actual = SONNET_PRICE.cost(10, 40 * MAX_TOKENS)
    assert actual > bound()
    budget = CloudBudget(max_usd=bound() * 1.5)  # room for one reservation
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS),
                                 budget=budget)
    first = router.invoke(QUESTION).response_metadata["routing"]
    assert first["decision"] == "cloud"
    assert first["cloud_cost_usd"] == pytest.approx(actual)
    assert budget.spent == pytest.approx(actual)  # never clipped to the reservation
    assert budget.snapshot()["overruns"] == 1
    assert budget.remaining == 0
    second = router.invoke(QUESTION).response_metadata["routing"]
    assert second["reason"] == Reason.BUDGET_EXCEEDED
    assert len(bedrock_server.requests) == 1


def test_reservation_covers_the_tool_definitions_that_are_sent(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    def lookup(query: str) -> str:
        """Look a fact up."""
        return query

    lookup.__doc__ = "Look a fact up in the archive. " + "Rules of use: be precise. " * 300
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=CloudBudget(max_usd=1.0)).bind_tools([lookup])
    routing = router.invoke(QUESTION).response_metadata["routing"]
    (sent,) = bedrock_server.requests
    assert "toolConfig" in sent["body"]
    # Everything sent can be billed, at up to one token per byte (the bound's own rule).
    sent_bytes = len(json.dumps(sent["body"], ensure_ascii=False).encode("utf-8"))
    assert routing["budget_reserved_usd"] >= SONNET_PRICE.cost(sent_bytes, MAX_TOKENS)


_PNG_1X1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
            "RU5ErkJggg==")


def test_reservation_covers_an_image_at_its_billed_size(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    text = "what does this picture show?"
    image = {"type": "image", "source_type": "base64", "mime_type": "image/png", "data": _PNG_1X1}
    question = HumanMessage(content=[{"type": "text", "text": text}, image])
    # Billed as Claude bills a full-size image (about 1,600 tokens) plus the text.
    billed_in = IMAGE_BLOCK_TOKENS + upper_bound_input_tokens([HumanMessage(text)])
    bedrock_server.add_answer(None, "a cat", input_tokens=billed_in, output_tokens=MAX_TOKENS)
    worst = SONNET_PRICE.cost(billed_in, MAX_TOKENS)
    budget = CloudBudget(max_usd=worst * 1.5)  # one such request fits, two do not
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    routing = router.invoke([question]).response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert routing["budget_reserved_usd"] >= worst  # the image is inside the bound
    assert budget.snapshot()["overruns"] == 0
    assert router.invoke([question]).response_metadata["routing"]["reason"] == (
        Reason.BUDGET_EXCEEDED)
    assert len(bedrock_server.requests) == 1
    assert budget.spent <= budget.max_usd


def test_bound_counts_opaque_reasoning_sent_back_at_its_bytes():
    from langchain_core.messages import AIMessage

    secret = "Z" * 3000  # encrypted reasoning a client sends back with the history
    turn = AIMessage(content=[{"type": "redacted_thinking", "data": secret},
                              {"type": "text", "text": "ok"}])
    assert upper_bound_input_tokens([HumanMessage("q"), turn, HumanMessage("next")]) >= 3000


def test_document_without_a_cost_bound_is_never_escalated_under_a_budget(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    document = {"type": "file", "source_type": "base64", "mime_type": "application/pdf",
                "data": "JVBERi0xLjQK"}
    question = HumanMessage(content=[{"type": "text", "text": "summarise this"}, document])
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    # ChatOllama cannot send a file block (the local tier fails), and the budget cannot
    # admit it, as an exhausted one could not: a typed error naming both, with the record.
    with pytest.raises(LocalModelError, match="no known upper bound") as failed:
        router.invoke([question])
    assert failed.value.routing["reason"] == Reason.BUDGET_EXCEEDED
    assert "no known upper bound" in failed.value.routing["escalation_skipped"]
    # on_budget_exceeded="raise": the budget's own error.
    with pytest.raises(BudgetExceededError, match="no known upper bound") as refused:
        router.invoke([question], on_budget_exceeded="raise")
    assert refused.value.requested_usd is None
    assert bedrock_server.requests == []  # pages are billed as images: no cap could hold
    assert budget.snapshot()["reserved_usd"] == 0 and budget.spent == 0


def test_document_the_local_tier_answers_is_served_when_the_budget_cannot_admit_it(
    bedrock_chat, bedrock_server
):
    """A local tier that reads documents (any LangChain chat model can be one) answers; the
    escalation the budget cannot bound is refused like an exhausted budget's: the local answer
    is served, flagged (it was lost to an InvalidInputError raised after generating it)."""
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    unsure_answer = AIMessage("It is about cats.", response_metadata={
        "logprobs": [{"token": "It", "logprob": -3.0}, {"token": " is", "logprob": -2.5}]})
    local = GenericFakeChatModel(messages=iter([unsure_answer] * 2))
    document = {"type": "file", "source_type": "base64", "mime_type": "application/pdf",
                "data": "JVBERi0xLjQK"}
    question = HumanMessage(content=[{"type": "text", "text": "summarise this"}, document])
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget)
    message = router.invoke([question])
    routing = message.response_metadata["routing"]
    assert (routing["decision"], routing["reason"], routing["flagged"]) == (
        "local", Reason.BUDGET_EXCEEDED, True)
    assert "no known upper bound" in routing["escalation_skipped"]
    assert message.content == "It is about cats."
    with pytest.raises(BudgetExceededError) as refused:
        router.invoke([question], on_budget_exceeded="raise")
    assert refused.value.local_message is not None
    assert bedrock_server.requests == []
    assert budget.snapshot()["reserved_usd"] == 0


def test_bound_given_the_tool_definitions_covers_every_byte_sent(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    """What the router passes (see the test above): the bound with ``tools=``."""

    def lookup(query: str) -> str:
        """Look a fact up."""
        return query

    lookup.__doc__ = "Look a fact up in the archive. " + "Rules of use: be precise. " * 300
    cloud = bedrock_chat(max_tokens=MAX_TOKENS).bind_tools([lookup])
    ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud).invoke(QUESTION)
    (sent,) = bedrock_server.requests
    sent_bytes = len(json.dumps(sent["body"], ensure_ascii=False).encode("utf-8"))
    messages = [HumanMessage(QUESTION)]
    assert upper_bound_input_tokens(messages) < sent_bytes  # without the tools: too small
    assert upper_bound_input_tokens(messages, tools=cloud.kwargs["tools"]) >= sent_bytes


# -- throttling and timeouts mixed with retries ----------------------------------------------


def _retry(*kinds: ErrorKind, attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, base_delay=0.01, max_delay=0.02, jitter=False,
                       retry_on=frozenset(kinds))


def test_throttled_then_timed_out_is_not_retried_into_a_second_billed_request(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.fail(None, "ThrottlingException", times=1)
    bedrock_server.add_answer(None, "late cloud answer", latency=1.0)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS), budget=budget,
        cloud_timeout=0.3, on_cloud_error="local",
        cloud_retry=_retry(ErrorKind.THROTTLED, ErrorKind.TRANSIENT),  # the default kinds
    )
    routing = router.invoke(QUESTION).response_metadata["routing"]
    time.sleep(1.0)  # the server finishes the timed-out request
    # One throttled request (not billed), one timed out (may be billed), none after it.
    assert len(bedrock_server.requests) == 2 == routing["cloud_attempts"]
    assert routing["cloud_error_kind"] == "timeout"
    assert budget.spent == pytest.approx(bound()) and budget.reserved == 0
    assert routing["cloud_cost_usd"] == pytest.approx(bound())


async def test_async_throttle_timeout_mix_counts_every_request_and_holds_the_cap(
    cloud_factory, ollama_chat, unsure, bedrock_server
):
    bedrock_server.fail(None, "ThrottlingException", times=2)
    bedrock_server.add_answer(None, "late cloud answer", latency=1.0)
    one = bound()
    budget = CloudBudget(max_usd=2.5 * one)  # two timed-out requests fit, a third does not
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=cloud_factory(max_tokens=MAX_TOKENS), budget=budget,
        cloud_timeout=0.3, on_cloud_error="local",
        cloud_retry=_retry(ErrorKind.THROTTLED, ErrorKind.TIMEOUT, attempts=6),
    )
    routing = (await router.ainvoke(QUESTION)).response_metadata["routing"]
    await asyncio.sleep(1.0)
    # throttled, throttled (released), timeout, timeout (committed), then the cap stops it.
    assert len(bedrock_server.requests) == 4 == routing["cloud_attempts"]
    assert routing["retry_stopped"] == "cloud budget exhausted"
    assert budget.spent == pytest.approx(2 * one) and budget.spent <= budget.max_usd
    assert budget.reserved == 0
    assert routing["cloud_cost_usd"] == pytest.approx(2 * one)


async def test_cancelled_during_retry_backoff_charges_nothing_that_was_not_sent(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    bedrock_server.fail(None, "ThrottlingException")  # refused, never billed
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS), budget=budget,
        cloud_retry=RetryPolicy(max_attempts=3, base_delay=2.0, jitter=False),
    )
    task = asyncio.create_task(router.ainvoke(QUESTION))
    await _until(lambda: len(bedrock_server.requests) == 1)
    await asyncio.sleep(0.2)  # throttled, now backing off before the second attempt
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(bedrock_server.requests) == 1
    assert budget.reserved == 0
    assert budget.spent == 0  # one refused request, nothing else left the process


# -- a cloud client whose own retries the router did not switch off --------------------------


def _timing_out_cloud(bedrock_server, bedrock_chat, *, own_client: bool):
    """A ChatBedrockConverse with a 0.2 s read timeout and botocore's default retries, built
    either around the caller's own boto3 client or (own_client=False) from settings."""
    from botocore.config import Config

    config = Config(read_timeout=0.2, connect_timeout=0.2)
    if not own_client:
        return bedrock_chat(max_tokens=MAX_TOKENS, max_retries=None, config=config)
    import boto3

    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          endpoint_url=bedrock_server.url, aws_access_key_id="test",
                          aws_secret_access_key="test", config=config)
    return bedrock_chat(max_tokens=MAX_TOKENS, client=client, max_retries=None,
                        endpoint_url=None, aws_access_key_id=None, aws_secret_access_key=None)


def test_cloud_tier_assigned_after_construction_cannot_multiply_billed_requests(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    bedrock_server.set_default("late cloud answer", latency=0.6)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(max_tokens=MAX_TOKENS),
                                 budget=budget, on_cloud_error="local")
    router.cloud = _timing_out_cloud(bedrock_server, bedrock_chat, own_client=False)
    routing = router.invoke(QUESTION).response_metadata["routing"]
    time.sleep(0.8)  # the server finishes every request it received
    sent = len(bedrock_server.requests)
    assert sent == routing["cloud_attempts"]
    assert budget.spent >= sent * bound()  # every request that may be billed is counted


def test_own_boto3_client_retries_cannot_multiply_billed_requests_under_a_budget(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    bedrock_server.set_default("late cloud answer", latency=0.6)
    budget = CloudBudget(max_usd=1.0)
    cloud = _timing_out_cloud(bedrock_server, bedrock_chat, own_client=True)
    try:
        router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, budget=budget,
                                     on_cloud_error="local")
    except RoutingConfigError as refused:  # refusing the combination is a fix too
        assert "retries" in str(refused)
        return
    router.invoke(QUESTION)
    time.sleep(0.8)
    sent = len(bedrock_server.requests)
    assert sent >= 1
    assert budget.spent >= sent * bound()


# -- a cloud response that reports no usage ---------------------------------------------------


class _NoUsageConverse(BaseHTTPRequestHandler):
    """Answers Converse and ConverseStream like Bedrock, but never reports token usage."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(self.path)  # type: ignore[attr-defined]
        if self.path.endswith("/converse-stream"):
            frames = [
                ("messageStart", {"role": "assistant"}),
                ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "cloud "}}),
                ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "answer"}}),
                ("contentBlockStop", {"contentBlockIndex": 0}),
                ("messageStop", {"stopReason": "end_turn"}),
            ]
            body = b"".join(
                encode_event_frame({":event-type": kind, ":content-type": "application/json",
                                    ":message-type": "event"}, json.dumps(payload).encode())
                for kind, payload in frames
            )
            content_type = "application/vnd.amazon.eventstream"
        else:
            body = json.dumps({
                "output": {"message": {"role": "assistant",
                                       "content": [{"text": "cloud answer"}]}},
                "stopReason": "end_turn",
            }).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def no_usage_cloud():
    """A ChatBedrockConverse on a Converse endpoint that omits ``usage``; ``.received`` lists
    the requests it got."""
    from langchain_aws import ChatBedrockConverse

    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsageConverse)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cloud = ChatBedrockConverse(
        model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
        aws_access_key_id="test", aws_secret_access_key="test", max_retries=0,
        max_tokens=MAX_TOKENS,
    )
    yield cloud, server.received
    server.shutdown()
    server.server_close()


def test_answer_without_usage_is_spent_at_its_bound_and_not_retried(
    no_usage_cloud, ollama_chat, unsure
):
    cloud, received = no_usage_cloud
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, budget=budget,
                                 on_cloud_error="local")
    routing = router.invoke(QUESTION).response_metadata["routing"]
    # The request was processed (the client choked on the missing usage): billed, at most the
    # bound; the failure is not retried into a second billed request.
    assert len(received) == 1 == routing["cloud_attempts"]
    assert budget.spent == pytest.approx(bound()) and budget.reserved == 0
    assert routing["cloud_cost_usd"] == pytest.approx(budget.spent)


def test_streamed_answer_without_usage_is_priced_at_what_the_budget_committed(
    no_usage_cloud, ollama_chat, unsure
):
    cloud, received = no_usage_cloud
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, budget=budget)
    chunks = list(router.stream(QUESTION))
    routing = chunks[-1].response_metadata["routing"]
    assert "".join(c.text for c in chunks) == "cloud answer"
    assert len(received) == 1
    assert budget.spent == pytest.approx(bound()) and budget.reserved == 0
    assert routing["cloud_cost_usd"] == pytest.approx(budget.spent)


# -- the connection drops after the request went out -----------------------------------------


class _DropsAfterReading(BaseHTTPRequestHandler):
    """Reads the whole request, then closes the connection without answering: the service may
    have run (and billed) it."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(self.path)  # type: ignore[attr-defined]
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_connection_dropped_after_sending_is_not_retried_into_more_billed_requests(
    ollama_chat, unsure
):
    from langchain_aws import ChatBedrockConverse

    server = ThreadingHTTPServer(("127.0.0.1", 0), _DropsAfterReading)
    server.received = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cloud = ChatBedrockConverse(
            model="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            aws_access_key_id="test", aws_secret_access_key="test", max_retries=0,
            max_tokens=MAX_TOKENS,
        )
        budget = CloudBudget(max_usd=1.0)
        router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, budget=budget,
                                     on_cloud_error="local")  # the default cloud_retry
        routing = router.invoke(QUESTION).response_metadata["routing"]
    finally:
        server.shutdown()
        server.server_close()
    # One request that may have been billed, counted as spent, and not sent again.
    assert len(server.received) == 1 == routing["cloud_attempts"]
    assert routing["cloud_error_kind"] == "disconnected"
    assert budget.spent == pytest.approx(bound()) and budget.reserved == 0


# -- max_tokens set, yet not sent -------------------------------------------------------------


def test_budget_refuses_a_cloud_tier_that_does_not_send_its_max_tokens(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    cloud = bedrock_chat(max_tokens=MAX_TOKENS, additional_model_request_fields={
        "reasoningConfig": {"type": "enabled", "maxReasoningEffort": "high"}})
    try:
        router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud,
                                     budget=CloudBudget(max_usd=1.0))
    except RoutingConfigError as refused:  # the fix may refuse at construction ...
        assert "max_tokens" in str(refused)
        return
    router.invoke(QUESTION)  # ... or make sure the limit reaches the wire
    (sent,) = bedrock_server.requests
    assert sent["body"]["inferenceConfig"].get("maxTokens") == MAX_TOKENS


def test_a_budget_assigned_later_is_checked_and_a_refusal_leaves_the_router_as_it_was(
    ollama_chat, bedrock_chat, unsure, bedrock_server
):
    bedrock_server.set_default("cloud answer")
    cloud = _timing_out_cloud(bedrock_server, bedrock_chat, own_client=True)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud)  # no budget: fine
    with pytest.raises(RoutingConfigError, match="retries"):
        router.budget = CloudBudget(max_usd=1.0)
    assert router.budget is None
    assert router.invoke(QUESTION).response_metadata["routing"]["decision"] == "cloud"
