"""``ChatBedrock`` (InvokeModel, Anthropic messages body) as the cloud tier, attacked where it
hurts: a hung cloud on every entry point, a stream that stalls after some chunks, throttling
inside the ``invoke-with-response-stream`` event stream before and after text, a cloud stream
the caller stops reading (break, ``aclose``, garbage collection) and 30 escalations at once.

The promises are those the Converse tier keeps: each call ends in bounded time with exactly one
request per attempt, no ``confidence-router-*`` thread is left, a request that may have been
billed (a read timeout, a stream with output) keeps its budget reservation as spent and one
refused by the service releases it, and a stream the caller abandons stops at the server.
Everything is counted at the fake bedrock-runtime server (requests per operation, streamed
pieces) and in the budget.

Each test gets a fake server of its own: a hung request's handler sleeps on after the test
and must not write into the next test's counters.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget, upper_bound_request_cost
from confidence_router.costs import Price
from confidence_router.errors import CloudEscalationError
from confidence_router.record import Reason
from confidence_router.retry import ErrorKind, RetryPolicy
from confidence_router.testing import FakeBedrockServer
from confidence_router.testing.bedrock_server import encode_event_frame

QUESTION = "an obscure question"
MAX_TOKENS = 50
SONNET_PRICE = Price(3.0, 15.0)
NO_RETRY = RetryPolicy(max_attempts=1)
#: Retries every kind a hung or throttled cloud produces, without waiting.
RETRY_ALL = RetryPolicy(max_attempts=3, base_delay=0.0, jitter=False,
                        retry_on=frozenset({ErrorKind.THROTTLED, ErrorKind.TRANSIENT,
                                            ErrorKind.TIMEOUT, ErrorKind.DISCONNECTED}))
CLOUD_TIMEOUT = 0.5
#: How long the hung cloud holds a request: 8x the timeout.
HANG = 4.0
#: Generous "not hung" bound for one call on a loaded 2-core machine (well under ``HANG``).
NOT_HUNG = 3.0
INVOKE, STREAM = "invoke", "invoke-with-response-stream"


@pytest.fixture
def bedrock_server() -> Iterator[FakeBedrockServer]:
    """A fake bedrock-runtime of this test alone (overrides the session-wide one, so the
    ``bedrock_invoke_chat`` factory points at it)."""
    with FakeBedrockServer() as server:
        yield server


@pytest.fixture
def unsure(ollama_backend) -> None:
    """Every local answer is unsure: every query escalates."""
    ollama_backend.set_default("unsure", logprobs=-3.0)


def bound(question: str = QUESTION) -> float:
    """The reservation of one cloud request for ``question``: its upper-bound cost."""
    return upper_bound_request_cost([HumanMessage(question)], max_output_tokens=MAX_TOKENS,
                                    price=SONNET_PRICE)


def _router(ollama_chat, bedrock_invoke_chat, **fields: Any) -> ConfidenceRoutedLLM:
    fields.setdefault("cloud_retry", NO_RETRY)
    return ConfidenceRoutedLLM(local=ollama_chat(),
                               cloud=bedrock_invoke_chat(max_tokens=MAX_TOKENS), **fields)


def _router_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("confidence-router-")]


def _live_threads() -> int:
    """Live threads, not counting the fake servers' request handlers."""
    return sum(
        1 for t in threading.enumerate()
        if getattr(getattr(t, "_target", None), "__name__", "") != "process_request_thread"
    )


def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(0.02)
    return True


async def _aeventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        await asyncio.sleep(0.02)
    return True


def _settled_count(read, timeout: float = 5.0) -> int:
    """A server-side counter once it stops changing (the stream ended or was closed)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        count = read()
        if count == last:
            return int(count)
        last = count
        time.sleep(0.25)
    return int(read())


async def _read_stream(router: ConfidenceRoutedLLM, entry: str, seen: list[str]) -> None:
    """Read ``router``'s answer to QUESTION with ``stream`` (in a thread) or ``astream``,
    appending each chunk's text to ``seen`` as it arrives (kept when the stream fails)."""
    if entry == "stream":
        def read() -> None:
            for chunk in router.stream(QUESTION):
                seen.append(chunk.text)

        await asyncio.to_thread(read)
    else:
        async for chunk in router.astream(QUESTION):
            seen.append(chunk.text)


def _join(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _operations(bedrock_server: FakeBedrockServer) -> list[str]:
    return [r["operation"] for r in bedrock_server.requests]


# -- a hung cloud: every entry point ends at cloud_timeout, one request, spent, no thread ----


def _assert_timed_out_and_kept_local(message, attempts: int = 1) -> None:
    routing = message.response_metadata["routing"]
    assert message.text == "unsure"
    assert routing["decision"] == "local" and routing["reason"] == Reason.CLOUD_ERROR
    assert routing["flagged"] is True
    assert routing["cloud_error_kind"] == "timeout"
    assert routing["cloud_attempts"] == attempts
    assert routing["budget_settlement"] == "committed"
    assert routing["cloud_cost_usd"] == pytest.approx(attempts * bound())


@pytest.mark.parametrize("entry", ["invoke", "stream", "batch"])
def test_hung_chatbedrock_sync_entry_points_end_at_the_timeout(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.delay(None, HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local")
    baseline = _live_threads()
    started = time.monotonic()
    if entry == "invoke":
        messages = [router.invoke(QUESTION)]
    elif entry == "stream":
        messages = [_join(list(router.stream(QUESTION)))]
    else:
        messages = router.batch([QUESTION] * 3, config={"max_concurrency": 3})
    assert time.monotonic() - started < NOT_HUNG
    for message in messages:
        _assert_timed_out_and_kept_local(message)
    operation = STREAM if entry == "stream" else INVOKE
    assert _operations(bedrock_server) == [operation] * len(messages)
    # A read timeout may have been billed: each reservation is kept as spent.
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(len(messages) * bound())
    assert _router_threads() == []
    assert _eventually(lambda: _live_threads() <= baseline)


@pytest.mark.parametrize("entry", ["ainvoke", "astream", "abatch"])
async def test_hung_chatbedrock_async_entry_points_end_at_the_timeout(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.delay(None, HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local")
    tasks_before = len(asyncio.all_tasks())
    started = time.monotonic()
    if entry == "ainvoke":
        messages = [await router.ainvoke(QUESTION)]
    elif entry == "astream":
        messages = [_join([c async for c in router.astream(QUESTION)])]
    else:
        messages = await router.abatch([QUESTION] * 3, config={"max_concurrency": 3})
    assert time.monotonic() - started < NOT_HUNG
    for message in messages:
        _assert_timed_out_and_kept_local(message)
    operation = STREAM if entry == "astream" else INVOKE
    assert _operations(bedrock_server) == [operation] * len(messages)
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(len(messages) * bound())
    # botocore's read_timeout (the router sets it to cloud_timeout) ends each tier thread.
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)
    assert len(asyncio.all_tasks()) == tasks_before


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke", "astream"])
async def test_hung_chatbedrock_retried_on_timeout_sends_one_request_per_attempt(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.delay(None, HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local",
                     cloud_retry=RETRY_ALL)
    started = time.monotonic()
    if entry == "invoke":
        message = await asyncio.to_thread(router.invoke, QUESTION)
    elif entry == "stream":
        message = await asyncio.to_thread(lambda: _join(list(router.stream(QUESTION))))
    elif entry == "ainvoke":
        message = await router.ainvoke(QUESTION)
    else:
        message = _join([c async for c in router.astream(QUESTION)])
    assert time.monotonic() - started < 2 * NOT_HUNG  # three attempts, each bounded
    _assert_timed_out_and_kept_local(message, attempts=3)
    assert [r["kind"] for r in message.response_metadata["routing"]["cloud_retries"]] == [
        "timeout", "timeout"]
    operation = STREAM if "stream" in entry else INVOKE
    assert _operations(bedrock_server) == [operation] * 3
    assert budget.reserved == 0 and budget.spent == pytest.approx(3 * bound())
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


def _lookup(city: str) -> str:
    """Look a city up."""
    return city


@pytest.mark.parametrize("how", ["config with long timeouts", "cloud_timeout set later",
                                 "cloud set later", "tools bound on the router",
                                 "tools bound on the model"])
async def test_hung_chatbedrock_is_bounded_however_model_and_timeout_are_set(
    how, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    from botocore.config import Config

    bedrock_server.delay(None, HANG)
    fields: dict[str, Any] = {"max_tokens": MAX_TOKENS}
    if how == "config with long timeouts":  # your settings; the router's timeout wins
        fields["config"] = Config(read_timeout=60, connect_timeout=60)
    cloud = bedrock_invoke_chat(**fields)
    if how == "tools bound on the model":
        cloud = cloud.bind_tools([_lookup])
    router = ConfidenceRoutedLLM(
        local=ollama_chat(), cloud=cloud if how != "cloud set later" else None,
        cloud_timeout=None if how == "cloud_timeout set later" else CLOUD_TIMEOUT,
        on_cloud_error="local", cloud_retry=NO_RETRY)
    if how == "cloud_timeout set later":
        router.cloud_timeout = CLOUD_TIMEOUT
    elif how == "cloud set later":
        router.cloud = cloud
    runnable: Any = router.bind_tools([_lookup]) if how == "tools bound on the router" else router
    started = time.monotonic()
    invoked = await asyncio.to_thread(runnable.invoke, QUESTION)
    streamed = _join([c async for c in runnable.astream(QUESTION)])
    assert time.monotonic() - started < 2 * NOT_HUNG
    for message in (invoked, streamed):
        routing = message.response_metadata["routing"]
        assert routing["decision"] == "local" and routing["cloud_error_kind"] == "timeout"
        assert routing["cloud_attempts"] == 1
    assert _operations(bedrock_server) == [INVOKE, STREAM]
    if "tools" in how:
        assert all("_lookup" in str(r["body"].get("tools")) for r in bedrock_server.requests)
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


# -- a stream that stalls after some chunks -----------------------------------------------------


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_chatbedrock_stream_stalling_after_chunks_fails_typed_and_is_not_retried(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    # The first piece at once, then the stream stalls for HANG before each next one.
    bedrock_server.add_answer(None, ["Ar", "gon", " is", " noble."], piece_delay=HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local",
                     cloud_retry=RETRY_ALL)
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(CloudEscalationError, match="after 1 chunks") as raised:
        await _read_stream(router, entry, seen)
    assert time.monotonic() - started < NOT_HUNG
    # Never a mix of two models' text: the caller saw the cloud's first piece, nothing else.
    assert "".join(seen) == "Ar"
    routing = raised.value.routing
    assert routing["cloud_error_kind"] == "timeout"
    assert routing["cloud_attempts"] == 1 and "cloud_retries" not in routing
    assert _operations(bedrock_server) == [STREAM]
    assert bedrock_server.sent_pieces == 1
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_chatbedrock_stream_stalling_before_any_text_is_retried_then_falls_back(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    # The stream opens (message_start, an empty text delta), then stalls: nothing to show yet,
    # so the attempt is a plain timeout (retried under RETRY_ALL), and the local answer serves.
    bedrock_server.add_answer(None, ["", "Ar", "gon."], piece_delay=HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local",
                     cloud_retry=RETRY_ALL)
    started = time.monotonic()
    if entry == "stream":
        chunks = await asyncio.to_thread(lambda: list(router.stream(QUESTION)))
    else:
        chunks = [c async for c in router.astream(QUESTION)]
    assert time.monotonic() - started < 2 * NOT_HUNG  # three attempts, each bounded
    message = _join(chunks)
    _assert_timed_out_and_kept_local(message, attempts=3)
    assert _operations(bedrock_server) == [STREAM] * 3
    assert bedrock_server.sent_pieces == 3  # the empty piece of each attempt, nothing more
    assert budget.reserved == 0 and budget.spent == pytest.approx(3 * bound())
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


#: An answer that never goes silent for a whole ``CLOUD_TIMEOUT`` yet takes 20 x 0.2 = 4 s.
CRAWL_PIECES = 20


def _crawling_answer(bedrock_server: FakeBedrockServer) -> None:
    bedrock_server.add_answer(None, [f" w{i}" for i in range(CRAWL_PIECES)], piece_delay=0.2)


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_crawling_chatbedrock_stream_ends_at_the_attempts_deadline(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    _crawling_answer(bedrock_server)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local",
                     cloud_retry=RETRY_ALL)
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(CloudEscalationError) as raised:
        await _read_stream(router, entry, seen)
    assert time.monotonic() - started < NOT_HUNG
    assert "".join(seen).startswith(" w0") and " w0" not in "".join(seen)[3:]
    routing = raised.value.routing
    assert routing["cloud_error_kind"] == "timeout" and routing["cloud_attempts"] == 1
    assert _operations(bedrock_server) == [STREAM]
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    # The thread and the server stop well before the 4 s the answer would take.
    assert await _aeventually(lambda: _router_threads() == [], timeout=2.0)
    sent = await asyncio.to_thread(_settled_count, lambda: bedrock_server.sent_pieces)
    assert sent < CRAWL_PIECES // 2, sent


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
async def test_streaming_cloud_model_crawling_through_invoke_ends_at_the_deadline(
    entry, api, cloud_factory, ollama_chat, unsure, bedrock_server
):
    """``ChatBedrock(streaming=True)`` (also ``ChatBedrockConverse``) answers ``invoke`` with
    a stream: a cloud_timeout must bound that attempt as it bounds ``router.stream``."""
    _crawling_answer(bedrock_server)
    budget = CloudBudget(max_usd=1.0)
    router = ConfidenceRoutedLLM(local=ollama_chat(),
                                 cloud=cloud_factory(max_tokens=MAX_TOKENS, streaming=True),
                                 budget=budget, cloud_timeout=CLOUD_TIMEOUT,
                                 on_cloud_error="local", cloud_retry=NO_RETRY)
    started = time.monotonic()
    if entry == "invoke":
        message = await asyncio.to_thread(router.invoke, QUESTION)
    else:
        message = await router.ainvoke(QUESTION)
    elapsed = time.monotonic() - started
    assert [r["operation"] for r in bedrock_server.requests] == [
        "converse-stream" if api == "converse" else STREAM]
    threads_gone = await _aeventually(lambda: _router_threads() == [], timeout=2.0)
    sent = await asyncio.to_thread(_settled_count, lambda: bedrock_server.sent_pieces)
    assert elapsed < NOT_HUNG, elapsed
    _assert_timed_out_and_kept_local(message)
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert threads_gone
    assert sent < CRAWL_PIECES // 2, sent


def test_chatbedrock_on_the_converse_api_is_bounded_too(
    ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    """``ChatBedrock(beta_use_converse_api=True)`` sends Converse requests through a
    ChatBedrockConverse of its own, on the client the router configured."""
    bedrock_server.delay(None, HANG)
    router = ConfidenceRoutedLLM(
        local=ollama_chat(),
        cloud=bedrock_invoke_chat(max_tokens=MAX_TOKENS, beta_use_converse_api=True),
        cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local", cloud_retry=NO_RETRY)
    started = time.monotonic()
    invoked = router.invoke(QUESTION)
    streamed = _join(list(router.stream(QUESTION)))
    assert time.monotonic() - started < 2 * NOT_HUNG
    for message in (invoked, streamed):
        routing = message.response_metadata["routing"]
        assert message.text == "unsure" and routing["cloud_error_kind"] == "timeout"
        assert routing["cloud_attempts"] == 1
    assert _operations(bedrock_server) == ["converse", "converse-stream"]


# -- throttling inside the invoke-with-response-stream event stream -----------------------------


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_chatbedrock_in_stream_throttling_before_text_is_retried_like_invoke(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, ["Ar", "gon."], input_tokens=10, output_tokens=2)
    bedrock_server.fail(None, "ThrottlingException", after_pieces=0, times=1)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget, cloud_retry=RETRY_ALL)
    if entry == "stream":
        chunks = await asyncio.to_thread(lambda: list(router.stream(QUESTION)))
    else:
        chunks = [c async for c in router.astream(QUESTION)]
    message = _join(chunks)
    routing = message.response_metadata["routing"]
    assert message.text == "Argon."
    assert routing["decision"] == "cloud"
    assert routing["cloud_attempts"] == 2
    assert [r["kind"] for r in routing["cloud_retries"]] == ["throttled"]
    assert _operations(bedrock_server) == [STREAM, STREAM]
    # The refused attempt is released; the answer is spent at its real cost.
    cost = 10 * 3e-6 + 2 * 15e-6
    assert routing["cloud_cost_usd"] == pytest.approx(cost)
    assert budget.reserved == 0 and budget.spent == pytest.approx(cost)
    assert await _aeventually(lambda: _router_threads() == [])


def test_chatbedrock_in_stream_throttling_is_retried_the_same_as_on_invoke(
    ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    """The same throttle, once as an HTTP 429 to InvokeModel and once inside the event
    stream: the two routing records agree (kind, attempts, retries)."""
    bedrock_server.add_answer(None, "Argon.")
    router = _router(ollama_chat, bedrock_invoke_chat, cloud_retry=RETRY_ALL)
    bedrock_server.fail(lambda r: r["operation"] == INVOKE, "ThrottlingException", times=1)
    invoked = router.invoke(QUESTION).response_metadata["routing"]
    bedrock_server.fail(None, "ThrottlingException", after_pieces=0, times=1)
    streamed = _join(list(router.stream(QUESTION))).response_metadata["routing"]
    keys = ("decision", "cloud_attempts")
    assert {k: streamed[k] for k in keys} == {k: invoked[k] for k in keys} == {
        "decision": "cloud", "cloud_attempts": 2}
    assert [r["kind"] for r in streamed["cloud_retries"]] == [
        r["kind"] for r in invoked["cloud_retries"]] == ["throttled"]
    assert _operations(bedrock_server) == [INVOKE, INVOKE, STREAM, STREAM]


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_chatbedrock_in_stream_throttling_after_text_is_a_partial_stream_error(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, ["Ar", "gon", " is", " noble."])
    bedrock_server.fail(None, "ThrottlingException", after_pieces=2)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget, cloud_retry=RETRY_ALL,
                     on_cloud_error="local")
    seen: list[str] = []
    with pytest.raises(CloudEscalationError, match="after 2 chunks") as raised:
        await _read_stream(router, entry, seen)
    assert "".join(seen) == "Argon"  # the cloud's two pieces, never the local answer
    routing = raised.value.routing
    assert routing["cloud_error_kind"] == "throttled"
    assert routing["cloud_attempts"] == 1 and "cloud_retries" not in routing
    assert raised.value.local_message.text == "unsure"
    assert _operations(bedrock_server) == [STREAM]  # not retried: text was out
    assert bedrock_server.sent_pieces == 2
    # The cloud produced output: its reservation is spent.
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert await _aeventually(lambda: _router_threads() == [])


# -- a cloud stream the caller stops reading ------------------------------------------------------

N_PIECES = 60


def _long_answer(bedrock_server: FakeBedrockServer) -> None:
    # 3 s when read to the end.
    bedrock_server.add_answer(None, [f" w{i}" for i in range(N_PIECES)], piece_delay=0.05)


def _assert_stopped_and_settled(bedrock_server, budget: CloudBudget) -> None:
    sent = _settled_count(lambda: bedrock_server.sent_pieces)
    assert sent < N_PIECES // 3, sent  # the server stopped sending
    assert _eventually(lambda: budget.reserved == 0)
    assert budget.spent == pytest.approx(bound())  # it was streaming: billed
    assert _operations(bedrock_server) == [STREAM]


@pytest.mark.parametrize("how", ["break", "close", "garbage"])
def test_chatbedrock_sync_stream_the_caller_stops_reading_stops_at_the_server(
    how, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    """(Not a sync LCEL chain: langchain-core's ``_transform_stream_with_config`` reads the
    rest of its input stream, the router's answer, to the end when its consumer stops.)"""
    _long_answer(bedrock_server)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget)
    seen: list[str] = []
    if how == "break":
        for chunk in router.stream(QUESTION):
            if chunk.text:
                seen.append(chunk.text)
            if len(seen) == 2:
                break
    else:
        stream = router.stream(QUESTION)
        while len(seen) < 2:
            chunk = next(stream)
            if chunk.text:
                seen.append(chunk.text)
        assert budget.reserved == pytest.approx(bound())  # in flight: held
        if how == "close":
            stream.close()
        else:
            del stream, chunk
            gc.collect()
    assert seen == [" w0", " w1"]
    _assert_stopped_and_settled(bedrock_server, budget)


@pytest.mark.parametrize("how", ["break", "aclose", "garbage", "chain break"])
async def test_chatbedrock_async_stream_the_caller_stops_reading_stops_at_the_server(
    how, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    _long_answer(bedrock_server)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget)
    seen: list[str] = []
    if how == "break":
        async for chunk in router.astream(QUESTION):
            if chunk.text:
                seen.append(chunk.text)
            if len(seen) == 2:
                break
    elif how == "chain break":
        # LangChain's atransform leaves the router's astream open when the chain's consumer
        # stops: it is closed when the abandoned generators are collected.
        chained = (router | StrOutputParser()).astream(QUESTION)
        async for text in chained:
            if text:
                seen.append(text)
            if len(seen) == 2:
                break
        await chained.aclose()
        del chained
        gc.collect()
    else:
        stream = router.astream(QUESTION)
        while len(seen) < 2:
            chunk = await anext(stream)
            if chunk.text:
                seen.append(chunk.text)
        assert budget.reserved == pytest.approx(bound())
        if how == "aclose":
            await stream.aclose()
        else:
            del stream, chunk
            gc.collect()
    assert seen == [" w0", " w1"]
    assert await _aeventually(lambda: budget.reserved == 0)
    assert await _aeventually(lambda: _router_threads() == [])
    sent = await asyncio.to_thread(_settled_count, lambda: bedrock_server.sent_pieces)
    assert sent < N_PIECES // 3, sent
    assert budget.spent == pytest.approx(bound())
    assert _operations(bedrock_server) == [STREAM]


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["ainvoke", "astream", "abatch", "batch"])
async def test_30_concurrent_chatbedrock_escalations_are_all_answered(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.set_default("Argon.", latency=0.3)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget, cloud_timeout=2.0)
    queries = [f"{QUESTION} #{i}" for i in range(30)]

    async def one(query: str):
        if entry == "ainvoke":
            return await router.ainvoke(query)
        return _join([c async for c in router.astream(query)])

    if entry == "batch":
        results = await asyncio.to_thread(router.batch, queries, {"max_concurrency": 30},
                                          return_exceptions=True)
    elif entry == "abatch":
        results = await router.abatch(queries, {"max_concurrency": 30}, return_exceptions=True)
    else:
        results = await asyncio.gather(*(one(q) for q in queries), return_exceptions=True)
    assert [getattr(r, "text", r) for r in results] == ["Argon."] * 30
    assert {r.response_metadata["routing"]["decision"] for r in results} == {"cloud"}
    assert {r.response_metadata["routing"]["cloud_attempts"] for r in results} == {1}
    operation = STREAM if entry == "astream" else INVOKE
    assert _operations(bedrock_server) == [operation] * 30
    assert sorted(r["last_user_text"] for r in bedrock_server.requests) == sorted(queries)
    assert budget.reserved == 0
    assert await _aeventually(lambda: _router_threads() == [])


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_30_concurrent_escalations_to_a_hung_chatbedrock_all_end_at_the_timeout(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.delay(None, HANG)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget,
                     cloud_timeout=CLOUD_TIMEOUT, on_cloud_error="local")

    async def one(i: int):
        query = f"{QUESTION} #{i}"
        if entry == "ainvoke":
            return await router.ainvoke(query)
        return _join([c async for c in router.astream(query)])

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(30)), return_exceptions=True)
    assert time.monotonic() - started < NOT_HUNG
    assert [getattr(r, "text", r) for r in results] == ["unsure"] * 30
    kinds = {r.response_metadata["routing"]["cloud_error_kind"] for r in results}
    assert kinds == {"timeout"}
    assert {r.response_metadata["routing"]["cloud_attempts"] for r in results} == {1}
    assert _operations(bedrock_server) == [STREAM if entry == "astream" else INVOKE] * 30
    assert budget.reserved == 0
    assert budget.spent == pytest.approx(sum(bound(f"{QUESTION} #{i}") for i in range(30)))
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_hung_chatbedrock_requests_hold_up_none_of_the_others(
    entry, ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    """20 requests hang on their connections (more than botocore's pool of 10) while 10
    others are answered at once: none waits behind a hung one for a connection or a thread."""
    bedrock_server.delay("hung", HANG)
    bedrock_server.set_default("Argon.", latency=0.1)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget, cloud_timeout=1.0,
                     on_cloud_error="local")
    queries = [f"hung {QUESTION} #{i}" for i in range(20)] + [
        f"fast {QUESTION} #{i}" for i in range(10)]

    async def one(query: str):
        if entry == "ainvoke":
            return await router.ainvoke(query)
        return _join([c async for c in router.astream(query)])

    started = time.monotonic()
    results = await asyncio.gather(*(one(q) for q in queries), return_exceptions=True)
    assert time.monotonic() - started < NOT_HUNG
    routings = [r.response_metadata["routing"] for r in results]
    assert [r.text for r in results] == ["unsure"] * 20 + ["Argon."] * 10
    assert {r["cloud_error_kind"] for r in routings[:20]} == {"timeout"}
    assert {r["decision"] for r in routings[20:]} == {"cloud"}
    assert len(bedrock_server.requests) == 30
    assert budget.reserved == 0
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


async def test_chatbedrock_astream_cancelled_before_the_cloud_answers_stops_at_the_server(
    ollama_chat, bedrock_invoke_chat, unsure, bedrock_server
):
    bedrock_server.add_answer(None, [f" w{i}" for i in range(N_PIECES)], latency=0.6,
                              piece_delay=0.05)
    budget = CloudBudget(max_usd=1.0)
    router = _router(ollama_chat, bedrock_invoke_chat, budget=budget)
    seen: list[str] = []

    async def consume() -> None:
        async for chunk in router.astream(QUESTION):
            seen.append(chunk.text)

    task = asyncio.create_task(consume())
    assert await _aeventually(lambda: len(bedrock_server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "".join(seen) == ""
    # Sent, so it may be billed: spent at once, not when the thread gets the first byte.
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    # The thread closes the stream at its first chunk: the server stops sending.
    assert await _aeventually(lambda: _router_threads() == [], timeout=3.0)
    sent = await asyncio.to_thread(_settled_count, lambda: bedrock_server.sent_pieces)
    assert sent < N_PIECES // 3, sent
    assert _operations(bedrock_server) == [STREAM]


# -- what the fake server cannot do: a body that stalls, a dropped connection, no counts --------


def _chunk_frame(event: dict[str, Any]) -> bytes:
    data = base64.b64encode(json.dumps(event).encode()).decode()
    return encode_event_frame({":event-type": "chunk", ":content-type": "application/json",
                               ":message-type": "event"}, json.dumps({"bytes": data}).encode())


class _RawInvoke(BaseHTTPRequestHandler):
    """InvokeModel / InvokeModelWithResponseStream misbehaving as ``server.mode`` says:
    ``"stall"`` sends the headers and 10 bytes of the body, then stalls for ``HANG``;
    ``"drop"`` reads the request and closes the connection without answering;
    ``"no counts"`` answers in full (the Anthropic body with its ``usage``) but without the
    ``x-amzn-bedrock-*-token-count`` headers, as a gateway that drops them would."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(self.path.rsplit("/", 1)[-1])  # type: ignore[attr-defined]
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "drop":
            self.close_connection = True
            return
        if mode == "tool stall":  # a tool call starts streaming, then the stream stalls
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.amazon.eventstream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in (
                {"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 12, "output_tokens": 1}}},
                {"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": "toolu_1", "name": "_lookup", "input": {}}},
                {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "input_json_delta", "partial_json": '{"city": "Par'}},
            ):
                frame = _chunk_frame(event)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                self.wfile.flush()
            time.sleep(HANG)
            return
        if self.path.endswith("/invoke-with-response-stream"):
            events = [
                {"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                    "content": [], "stop_reason": None, "stop_sequence": None}},
                {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}},
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "cloud answer"}},
                {"type": "content_block_stop", "index": 0},
                {"type": "message_delta",
                 "delta": {"stop_reason": "end_turn", "stop_sequence": None}},
                {"type": "message_stop"},
            ]
            body = b"".join(_chunk_frame(e) for e in events)
            content_type = "application/vnd.amazon.eventstream"
        else:
            body = json.dumps({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": "cloud answer"}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 12, "output_tokens": 3},
            }).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "stall":
            self.wfile.write(body[:10])
            self.wfile.flush()
            time.sleep(HANG)
            body = body[10:]
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def raw_invoke(ollama_chat, unsure):
    """``raw_invoke(mode, **router_fields)`` -> (router, requests received) on a
    :class:`_RawInvoke` server (ChatBedrock, a budget of 1 USD)."""
    from langchain_aws import ChatBedrock

    servers: list[ThreadingHTTPServer] = []

    def build(mode: str, **fields: Any):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _RawInvoke)
        server.daemon_threads = True
        server.mode, server.received = mode, []  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        cloud = ChatBedrock(
            model_id="us.anthropic.claude-sonnet-4-5-20250929-v1:0", region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            aws_access_key_id="test", aws_secret_access_key="test", max_retries=0,
            max_tokens=MAX_TOKENS)
        router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, **fields)
        return router, server.received  # type: ignore[attr-defined]

    yield build
    for server in servers:
        server.shutdown()
        server.server_close()


async def _answer(router: ConfidenceRoutedLLM, entry: str):
    if entry == "invoke":
        return await asyncio.to_thread(router.invoke, QUESTION)
    if entry == "stream":
        return await asyncio.to_thread(lambda: _join(list(router.stream(QUESTION))))
    if entry == "ainvoke":
        return await router.ainvoke(QUESTION)
    return _join([c async for c in router.astream(QUESTION)])


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke", "astream"])
async def test_chatbedrock_body_stalling_after_the_headers_ends_at_the_timeout(
    entry, raw_invoke
):
    budget = CloudBudget(max_usd=1.0)
    router, received = raw_invoke("stall", budget=budget, cloud_timeout=CLOUD_TIMEOUT,
                                  on_cloud_error="local", cloud_retry=NO_RETRY)
    started = time.monotonic()
    message = await _answer(router, entry)
    assert time.monotonic() - started < NOT_HUNG
    _assert_timed_out_and_kept_local(message)
    assert received == [STREAM if "stream" in entry else INVOKE]
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke", "astream"])
async def test_chatbedrock_connection_dropped_after_sending_is_spent_and_not_resent(
    entry, raw_invoke
):
    budget = CloudBudget(max_usd=1.0)
    # The router's default cloud_retry (throttled and transient only).
    router, received = raw_invoke("drop", budget=budget, on_cloud_error="local")
    message = await _answer(router, entry)
    routing = message.response_metadata["routing"]
    assert message.text == "unsure" and routing["cloud_error_kind"] == "disconnected"
    assert routing["cloud_attempts"] == 1
    assert received == [STREAM if "stream" in entry else INVOKE]
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert routing["cloud_cost_usd"] == pytest.approx(bound())


@pytest.mark.parametrize("entry", [
    "invoke",  # ChatBedrock reads the counts from headers only and reports 0/0 without them
    "stream",
])
def test_chatbedrock_answer_without_token_counts_is_spent_at_its_bound(entry, raw_invoke):
    budget = CloudBudget(max_usd=1.0)
    router, received = raw_invoke("no counts", budget=budget)
    if entry == "invoke":
        message = router.invoke(QUESTION)
    else:
        message = _join(list(router.stream(QUESTION)))
    routing = message.response_metadata["routing"]
    assert message.text == "cloud answer" and routing["decision"] == "cloud"
    assert received == [STREAM if entry == "stream" else INVOKE]
    # The request ran and was billed: with no counts to price it, it is spent at its bound.
    assert budget.reserved == 0 and budget.spent == pytest.approx(bound())
    assert routing["cloud_cost_usd"] == pytest.approx(bound())


@pytest.mark.parametrize("entry", ["stream", "astream"])
async def test_chatbedrock_stream_stalling_inside_a_tool_call_is_a_partial_stream_error(
    entry, raw_invoke
):
    """Part of a tool call already reached the caller: no retry, no fall-back to the local
    answer (which would follow half a cloud tool call)."""
    budget = CloudBudget(max_usd=1.0)
    router, received = raw_invoke("tool stall", budget=budget, cloud_timeout=CLOUD_TIMEOUT,
                                  on_cloud_error="local", cloud_retry=RETRY_ALL)
    tooled = router.bind_tools([_lookup])
    seen: list[Any] = []
    started = time.monotonic()
    with pytest.raises(CloudEscalationError, match="cloud stream failed after") as raised:
        if entry == "stream":
            await asyncio.to_thread(lambda: seen.extend(tooled.stream(QUESTION)))
        else:
            async for chunk in tooled.astream(QUESTION):
                seen.append(chunk)
    assert time.monotonic() - started < NOT_HUNG
    assert any(c.tool_call_chunks for c in seen)
    assert "".join(c.text for c in seen) == ""  # never the local answer after it
    routing = raised.value.routing
    assert routing["cloud_error_kind"] == "timeout" and routing["cloud_attempts"] == 1
    assert received == [STREAM]
    # Its reservation (the bound with the tool definitions sent) is kept as spent.
    assert budget.reserved == 0 and budget.spent > bound()
    assert budget.spent == pytest.approx(routing["budget_reserved_usd"])
    assert await _aeventually(lambda: _router_threads() == [], timeout=HANG - 1.0)
