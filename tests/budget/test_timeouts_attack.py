"""Timeouts must cancel the work: a hung or crawling local model (the unchanged ``ChatOllama``
against the project's Ollama-compatible server) never starves the cloud tier, the fall-back
comes about ``local_timeout`` after the call starts, and nothing is left running afterwards —
counted as live threads, asyncio tasks and generations still in flight on the server. The cloud
tier they fall back on is each Bedrock class in turn (``ChatBedrockConverse``, ``ChatBedrock``)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.errors import LocalModelError
from confidence_router.testing import InFlightBackend

LOCAL_TIMEOUT = 0.3
#: Generous slack over the timeout for a loaded 2-core machine; the hang itself is 10x longer.
FALLBACK_LIMIT = 1.5
HANG = 4.0


@pytest.fixture
def backend(ollama_server) -> InFlightBackend:
    backend = InFlightBackend()
    ollama_server.backend = backend
    return backend


@pytest.fixture
def cloud(cloud_factory, bedrock_server):
    """The cloud tier, over both Bedrock classes (ChatBedrockConverse and ChatBedrock)."""
    bedrock_server.set_default("cloud answer")
    return cloud_factory(max_tokens=50)


def _live_threads() -> int:
    """Live threads, not counting the test servers' request handlers."""
    return sum(
        1
        for t in threading.enumerate()
        if getattr(getattr(t, "_target", None), "__name__", "") != "process_request_thread"
    )


def _settles(read, expected, timeout: float = 2.0) -> bool:
    """Whether ``read()`` reaches ``expected`` within ``timeout`` (well under the hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read() == expected:
            return True
        time.sleep(0.02)
    return read() == expected


def test_hung_local_model_in_sync_streams_falls_back_and_stops_the_generation(
    ollama_chat, cloud, backend, bedrock_server
):
    backend.delay("hang", HANG)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, local_timeout=LOCAL_TIMEOUT)
    baseline = _live_threads()

    def call(_: int) -> tuple[str, float]:
        started = time.perf_counter()
        text = "".join(chunk.text for chunk in router.stream("hang please"))
        return text, time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    assert [text for text, _ in results] == ["cloud answer"] * 16
    assert len(bedrock_server.requests) == 16  # the hung tier starved nobody
    assert max(seconds for _, seconds in results) < FALLBACK_LIMIT
    assert backend.started == 16
    # The server noticed every client hang up and stopped "thinking" (not after 4 s).
    assert _settles(lambda: backend.in_flight, 0)
    assert _live_threads() <= baseline


async def test_hung_local_model_in_async_streams_leaves_no_task_and_no_generation(
    ollama_chat, cloud, backend, bedrock_server
):
    backend.delay("hang", HANG)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, local_timeout=LOCAL_TIMEOUT)
    tasks_before = len(asyncio.all_tasks())

    async def call() -> tuple[str, float]:
        started = time.perf_counter()
        text = "".join([chunk.text async for chunk in router.astream("hang please")])
        return text, time.perf_counter() - started

    results = await asyncio.gather(*(call() for _ in range(24)))
    assert [text for text, _ in results] == ["cloud answer"] * 24
    assert max(seconds for _, seconds in results) < FALLBACK_LIMIT
    assert len(bedrock_server.requests) == 24
    assert len(asyncio.all_tasks()) == tasks_before
    deadline = time.monotonic() + 2.0
    while backend.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert backend.in_flight == 0


@pytest.mark.parametrize("entry", ["stream", "ainvoke", "astream"])
async def test_crawling_local_model_falls_back_at_the_deadline(
    entry, ollama_chat, cloud, backend, bedrock_server
):
    # Never silent for a whole timeout, yet it would take 40 x 0.15 = 6 s to answer.
    backend.add_answer("crawl", " slow" * 40, logprobs=-0.05, token_delay=0.15)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, local_timeout=LOCAL_TIMEOUT)
    started = time.perf_counter()
    if entry == "stream":
        text = await asyncio.to_thread(
            lambda: "".join(chunk.text for chunk in router.stream("crawl please"))
        )
    elif entry == "ainvoke":
        text = (await router.ainvoke("crawl please")).text
    else:
        text = "".join([chunk.text async for chunk in router.astream("crawl please")])
    elapsed = time.perf_counter() - started
    assert text == "cloud answer"
    assert elapsed < FALLBACK_LIMIT
    deadline = time.monotonic() + 2.0
    while backend.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert backend.in_flight == 0  # the crawl was stopped, not left to finish
    assert backend.generated_tokens < 40


def test_crawling_local_model_sync_invoke_falls_back_at_the_deadline(
    ollama_chat, cloud, backend, bedrock_server
):
    backend.add_answer("crawl", " slow" * 30, logprobs=-0.05, token_delay=0.15)  # 4.5 s
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, local_timeout=LOCAL_TIMEOUT)
    started = time.perf_counter()
    message = router.invoke("crawl please")
    elapsed = time.perf_counter() - started
    assert message.text == "cloud answer"
    assert elapsed < FALLBACK_LIMIT


def test_hung_local_model_with_no_budget_left_fails_fast_and_typed(
    ollama_chat, cloud_factory, backend, bedrock_server
):
    backend.delay("hang", HANG)
    budget = CloudBudget(max_usd=1e-9)  # no escalation fits
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud_factory(max_tokens=50),
                                 budget=budget, local_timeout=LOCAL_TIMEOUT)
    started = time.perf_counter()
    with pytest.raises(LocalModelError) as raised:
        router.invoke("hang please")
    assert time.perf_counter() - started < FALLBACK_LIMIT
    routing = raised.value.routing
    assert routing["local_error_kind"] == "timeout"
    assert routing["escalation_skipped"] == "cloud budget exhausted"
    assert backend.started == 1  # the hung model was not asked again
    assert bedrock_server.requests == []
    assert _settles(lambda: backend.in_flight, 0)


def test_hung_local_model_sync_invoke_stops_the_server_side_generation(
    ollama_chat, cloud, backend, bedrock_server
):
    backend.delay("hang", HANG)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, local_timeout=LOCAL_TIMEOUT)
    baseline = _live_threads()
    results = router.batch(["hang please"] * 12, config={"max_concurrency": 12})
    assert [r.text for r in results] == ["cloud answer"] * 12
    assert _settles(lambda: backend.in_flight, 0)
    assert _live_threads() <= baseline


@pytest.mark.filterwarnings("ignore::confidence_router.gsa.GsaExtractionWarning")
@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
async def test_hung_local_server_behind_a_precheck_probe_falls_back_at_the_deadline(
    entry, ollama_chat, cloud, backend, bedrock_server
):
    from confidence_router.probe import SelfAssessmentProbe

    backend.delay("hang", HANG)  # the probe's request hangs like the answer's would
    local = ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, local_timeout=LOCAL_TIMEOUT,
                                 precheck=SelfAssessmentProbe(model=local))
    started = time.perf_counter()
    if entry == "invoke":
        message = await asyncio.to_thread(router.invoke, "hang please")
    else:
        message = await router.ainvoke("hang please")
    elapsed = time.perf_counter() - started
    assert message.text == "cloud answer"
    assert elapsed < 2 * FALLBACK_LIMIT  # probe and local stage each bounded by the timeout


def test_the_answer_deadline_keeps_your_event_hooks_and_is_set_up_once(ollama_chat, backend):
    """The sync client's whole-answer deadline is an httpx event hook: your own hooks still
    run, and a model configured again (a router rebuilt, a timeout assigned) gets one
    deadline, the new one."""
    from confidence_router import tier_clients

    seen: list[str] = []
    mine = ollama_chat().model_copy(
        update={"client_kwargs": {"event_hooks": {"request": [lambda r: seen.append("req")]}}}
    )
    once = tier_clients.configure_local(mine, 5.0)
    twice = tier_clients.configure_local(once, LOCAL_TIMEOUT)
    hooks = twice.sync_client_kwargs["event_hooks"]
    assert len(hooks["request"]) == 2 and len(hooks["response"]) == 1  # yours + one deadline
    backend.add_answer("crawl", " slow" * 40, logprobs=-0.05, token_delay=0.15)
    started = time.perf_counter()
    with pytest.raises(Exception, match="no complete answer within 0.3 s"):
        twice.invoke("crawl please")
    assert time.perf_counter() - started < FALLBACK_LIMIT
    assert seen == ["req"]
