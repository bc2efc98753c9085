"""Async calls to a synchronous cloud client (ChatBedrockConverse, ChatBedrock).

Awaited, LangChain runs these clients in the event loop's shared default executor (6 threads
on 2 cores), where escalations queued and their ``cloud_timeout`` ran out before they were
sent. The router runs each such call in a thread of its own; these tests hold it to what that
promises: no queueing behind the loop's executor, callbacks still on the caller's loop, the
thread gone when the caller stops reading or the call times out, errors as in a sync call.
Everything is counted at the fake Bedrock server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, UsageMetadataCallbackHandler

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import CloudEscalationError
from confidence_router.retry import RetryPolicy

QUERY = "Name one noble gas."
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def doubtful(ollama_chat, ollama_backend):
    """A local model that is never sure: every query escalates."""
    ollama_backend.set_default("perhaps argon", logprobs=-2.5)
    return ollama_chat()


def _tier_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "confidence-router-tier"]


async def _until_no_tier_threads(limit: float = 5.0) -> list[threading.Thread]:
    """The router's tier threads still alive after waiting up to ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while _tier_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _tier_threads()


async def _entry(router: ConfidenceRoutedLLM, entry: str, query: str = QUERY, **kwargs: Any):
    if entry == "ainvoke":
        return await router.ainvoke(query, **kwargs)
    chunks = [chunk async for chunk in router.astream(query, **kwargs)]
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_escalations_do_not_queue_in_the_loops_default_executor(entry, doubtful,
                                                                      cloud_factory,
                                                                      bedrock_server):
    # One thread in the loop's default executor: calls waiting their turn there would take
    # 8 x 0.4 s, and every one after the second would run out of its 1.5 s cloud_timeout.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
    bedrock_server.set_default("Argon.", latency=0.4)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_timeout=1.5, cloud_retry=NO_RETRY)
    results = await asyncio.gather(*(_entry(router, entry, f"{QUERY} #{i}") for i in range(8)),
                                   return_exceptions=True)
    assert [getattr(r, "text", r) for r in results] == ["Argon."] * 8
    assert len(bedrock_server.requests) == 8
    assert {r.response_metadata["routing"]["decision"] for r in results} == {"cloud"}
    assert await _until_no_tier_threads() == []


class _LoopBoundHandler(AsyncCallbackHandler):
    """Feeds its events to an ``asyncio.Queue`` read by another task (as a web handler
    streaming a response does): works only if its events run on the caller's loop."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, Any, str]] = asyncio.Queue()
        self.threads: set[int] = set()

    def _put(self, event: str, run_id: Any, text: str) -> None:
        self.threads.add(threading.get_ident())
        self.queue.put_nowait((event, run_id, text))

    async def on_chat_model_start(self, serialized, messages, *, run_id, **kwargs):
        self._put("start", run_id, kwargs.get("name") or "")

    async def on_llm_new_token(self, token, *, chunk=None, run_id, **kwargs):
        self._put("token", run_id, chunk.message.text if chunk is not None else str(token))

    async def on_llm_end(self, response, *, run_id, **kwargs):
        self._put("end", run_id, response.generations[0][0].message.text)


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_async_handlers_run_on_the_callers_loop(entry, doubtful, cloud_factory,
                                                      bedrock_server):
    bedrock_server.add_answer(None, ["Ar", "gon", " is", " noble."], piece_delay=0.02)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=NO_RETRY)
    handler = _LoopBoundHandler()
    received: list[tuple[str, Any, str]] = []

    async def read_until_the_cloud_run_ends() -> None:
        cloud_run = None
        while True:
            event, run_id, text = await handler.queue.get()
            received.append((event, run_id, text))
            if event == "start" and text == "cloud":
                cloud_run = run_id
            if event == "end" and run_id == cloud_run:
                return

    # A queue fed from another thread would not wake its reader: this wait would time out.
    reader = asyncio.create_task(read_until_the_cloud_run_ends())
    message = await _entry(router, entry, config={"callbacks": [handler]})
    await asyncio.wait_for(reader, 5.0)
    assert message.text == "Argon is noble."
    assert handler.threads == {threading.get_ident()}
    (cloud_run,) = [run for event, run, text in received if event == "start" and text == "cloud"]
    cloud_events = [(event, text) for event, run, text in received if run == cloud_run]
    assert cloud_events[-1] == ("end", "Argon is noble.")
    if entry == "astream":  # the cloud's tokens, each once, in order, before its end
        tokens = "".join(text for event, text in cloud_events if event == "token")
        assert tokens == "Argon is noble."
    assert len(bedrock_server.requests) == 1


async def test_sync_usage_handler_counts_the_cloud_once_in_async_calls(doubtful, cloud_factory,
                                                                       bedrock_server):
    bedrock_server.set_default("Argon.", input_tokens=11, output_tokens=3)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=NO_RETRY)
    usage = UsageMetadataCallbackHandler()
    await router.ainvoke(QUERY, config={"callbacks": [usage]})
    cloud_usage = [u for name, u in usage.usage_metadata.items() if "sonnet" in name]
    assert [(u["input_tokens"], u["output_tokens"]) for u in cloud_usage] == [(11, 3)]


async def test_astream_events_show_the_cloud_answer_streaming(doubtful, cloud_factory,
                                                              bedrock_server):
    bedrock_server.add_answer(None, ["Ar", "gon."])
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=NO_RETRY)
    events = [e async for e in router.astream_events(QUERY, version="v2")]
    cloud_tokens = [
        e["data"]["chunk"].text for e in events
        if e["event"] == "on_chat_model_stream" and e["name"] == "cloud"
    ]
    assert "".join(cloud_tokens) == "Argon."
    ends = [e for e in events if e["event"] == "on_chat_model_end" and e["name"] == "cloud"]
    assert len(ends) == 1


async def test_a_cloud_stream_the_caller_stops_reading_ends_its_thread(doubtful, cloud_factory,
                                                                       bedrock_server):
    pieces = [f" w{i}" for i in range(60)]
    bedrock_server.add_answer(None, pieces, piece_delay=0.05)  # 3 s when read to the end
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=400),
                                 cloud_retry=NO_RETRY)
    stream = router.astream(QUERY)
    seen = []
    async for chunk in stream:
        if chunk.content:
            seen.append(chunk.content)
        if len(seen) == 2:
            break
    await stream.aclose()
    started = time.monotonic()
    assert await _until_no_tier_threads() == []
    assert time.monotonic() - started < 2.0  # far less than the 3 s the stream would take
    assert len(bedrock_server.requests) == 1


async def test_a_timed_out_cloud_call_leaves_no_thread_and_says_so(doubtful, cloud_factory,
                                                                   bedrock_server):
    bedrock_server.set_default("Argon.", latency=3.0)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_timeout=0.4, cloud_retry=NO_RETRY)
    started = time.monotonic()
    with pytest.raises(CloudEscalationError, match="timed out"):
        await router.ainvoke(QUERY)
    assert time.monotonic() - started < 2.5
    # botocore's read_timeout (the router sets it to cloud_timeout) ends the thread.
    assert await _until_no_tier_threads(limit=3.0) == []
    assert len(bedrock_server.requests) == 1


@pytest.mark.parametrize("entry", ["ainvoke", "astream"])
async def test_cloud_errors_in_async_calls_are_recorded_as_in_sync_calls(entry, doubtful,
                                                                         cloud_factory,
                                                                         bedrock_server):
    bedrock_server.fail(None, "ValidationException")
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=NO_RETRY, on_cloud_error="local")
    if entry == "ainvoke":
        sync_message = router.invoke(QUERY)
    else:
        chunks = list(router.stream(QUERY))
        sync_message = chunks[0]
        for chunk in chunks[1:]:
            sync_message = sync_message + chunk
    sync_routing = sync_message.response_metadata["routing"]
    async_routing = (await _entry(router, entry)).response_metadata["routing"]
    keys = ("decision", "cloud_error_kind", "cloud_attempts", "cloud_error")
    assert {k: async_routing.get(k) for k in keys} == {k: sync_routing.get(k) for k in keys}
    assert async_routing["decision"] == "local"
    assert len(bedrock_server.requests) == 2


async def test_a_closed_loop_never_leaves_a_tier_thread_waiting(doubtful, cloud_factory,
                                                                bedrock_server):
    """A call abandoned with its event loop: the thread's pending events are dropped."""
    bedrock_server.add_answer(None, ["Ar", "gon."], latency=0.3)
    router = ConfidenceRoutedLLM(local=doubtful, cloud=cloud_factory(max_tokens=40),
                                 cloud_retry=NO_RETRY)
    handler = _LoopBoundHandler()

    def abandon() -> None:
        async def main() -> None:
            task = asyncio.create_task(router.ainvoke(QUERY, config={"callbacks": [handler]}))
            await asyncio.sleep(0.15)  # the cloud call is in flight in its thread
            task.cancel()

        asyncio.run(main())

    await asyncio.to_thread(abandon)
    assert await _until_no_tier_threads() == []
