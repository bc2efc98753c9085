"""A long-running process must not accumulate threads, sockets, tasks or clients per call.

``benchmarks/soak.py`` runs thousands of calls and reports growth; these tests pin what it
found with a few hundred calls each, counting (never timing): live threads of the router, open
file descriptors, live asyncio tasks, live objects of the project's classes, and live HTTP
clients, before and after. Both fake servers run in this process (the session fixtures), so
the counts leave out the servers' own request-handler threads and allow a few pooled
keep-alive connections; a leak of one thing per call is far above that slack.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel

from confidence_router import ConfidenceRoutedLLM, RoutingStats

#: Kept-alive connections and client pools that may legitimately appear once.
SLACK = 6


class Capital(BaseModel):
    """The capital city of a country."""

    country: str
    capital: str


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _router_threads() -> int:
    """Live threads the router started (tier calls, Chroma operations)."""
    return sum(t.name.startswith("confidence-router") for t in threading.enumerate())


def _live(*type_names: str) -> int:
    gc.collect()
    return sum(type(o).__name__ in type_names for o in gc.get_objects())


def _ours() -> collections.Counter[str]:
    """Live objects of the project's classes by class name, not counting the in-process test
    servers' (``confidence_router.testing`` / ``.serving``: their request logs grow by design)."""
    gc.collect()
    counts: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        module = type(obj).__dict__.get("__module__", "")
        if isinstance(module, str) and module.startswith("confidence_router") and not (
            module.startswith(("confidence_router.testing", "confidence_router.serving"))
        ):
            counts[type(obj).__qualname__] += 1
    return counts


def _settle(loop: asyncio.AbstractEventLoop | None = None, seconds: float = 10.0) -> None:
    """Wait (bounded) for abandoned tier calls to end: a local call past ``local_timeout``
    finishes in its thread when the scripted delay is over; server handlers then close."""
    deadline = time.monotonic() + seconds
    while _router_threads() and time.monotonic() < deadline:
        if loop is not None:
            loop.run_until_complete(asyncio.sleep(0.05))
        else:
            time.sleep(0.05)
    gc.collect()


SLOW_S = 0.4


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    ollama_backend.add_answer("LOCALOK", "Paris is the capital of France.", logprobs=-0.05)
    ollama_backend.add_answer("UNSURE", "Maybe Lyon.", logprobs=-3.0)
    ollama_backend.add_answer("CLOUDFAIL", "Maybe Lyon.", logprobs=-3.0)
    ollama_backend.fail("LOCALFAIL", status=500)
    ollama_backend.add_answer("SLOW", "too late", logprobs=-0.05, latency=SLOW_S)
    bedrock_server.fail("CLOUDFAIL", "ValidationException")
    bedrock_server.set_default("Canberra.")
    return ollama_backend


def _workload(router: ConfidenceRoutedLLM, loop: asyncio.AbstractEventLoop, i: int) -> None:
    """One call of the soak's mix (errors are part of it)."""
    marker = ("LOCALOK", "UNSURE", "LOCALFAIL", "SLOW", "CLOUDFAIL")[i % 5]
    question = f"Question {i} ({marker})?"
    kind = (i // 5) % 6
    try:
        if kind == 0:
            router.invoke(question)
        elif kind == 1:
            stream = router.stream(question)
            next(iter(stream), None)  # abandoned after the first chunk
            stream.close()
        elif kind == 2:
            loop.run_until_complete(router.ainvoke(question))
        elif kind == 3:
            async def abandon() -> None:
                stream = router.astream(question)
                async for _chunk in stream:
                    break
                await stream.aclose()
            loop.run_until_complete(abandon())
        elif kind == 4:
            router.batch([question, f"Another {i} (LOCALOK)?"], return_exceptions=True)
        else:
            router.invoke(question, threshold=0.99, early_exit=True)
    except Exception:  # noqa: BLE001, S110 - local and cloud failures are scripted
        pass


def test_a_mixed_workload_returns_threads_fds_tasks_and_objects_to_the_baseline(
    scripted, ollama_chat, bedrock_chat, ollama_server, bedrock_server
):
    stats = RoutingStats(latency_window=20)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat(), local_timeout=0.1,
                                 stats=stats)
    loop = asyncio.new_event_loop()
    try:
        for i in range(30):  # warm-up: connection pools, lazily built classes
            _workload(router, loop, i)
        _settle(loop)
        threads, fds, ours = _router_threads(), _fds(), _ours()
        tasks = len(asyncio.all_tasks(loop))
        for i in range(30, 330):
            _workload(router, loop, i)
        _settle(loop)
        assert _router_threads() == threads == 0
        assert len(asyncio.all_tasks(loop)) == tasks == 0
        assert _fds() <= fds + SLACK
        grown = {k: n - ours[k] for k, n in _ours().items() if n > ours[k]}
        assert sum(grown.values()) <= SLACK, grown
    finally:
        loop.close()
    # The calls really went out: every one reached the local server (batch: two requests).
    assert len(ollama_server.requests_to("/api/chat")) >= 330
    assert len(bedrock_server.requests) > 100
    # The stats keep their latency windows bounded, not one entry per call.
    assert stats.snapshot()["calls"] >= 330
    assert all(len(window) <= 20 for window in stats._latency.values())


async def test_per_call_tool_bindings_do_not_pile_up_clients_on_a_long_lived_loop(
    ollama_chat, ollama_backend, ollama_server
):
    ollama_backend.add_answer("France", "ok", logprobs=-0.01, tool_calls=[
        {"name": "Capital", "arguments": {"country": "France", "capital": "Paris"}}])
    router = ConfidenceRoutedLLM(local=ollama_chat())
    question = "What is the capital of France?"

    async def call(i: int) -> Any:
        if i % 2:
            return await router.with_structured_output(Capital).ainvoke(question)
        return await router.bind_tools([Capital]).ainvoke(question)

    for i in range(4):
        await call(i)
    clients, models, fds = _live("AsyncClient"), _live("ChatOllama"), _fds()
    results = [await call(i) for i in range(60)]
    assert sum(isinstance(r, Capital) for r in results) == 30
    assert len(ollama_server.requests_to("/api/chat")) == 64
    assert _live("ChatOllama") <= models + 2
    assert _live("AsyncClient") <= clients + 2
    assert _fds() <= fds + SLACK


async def test_routers_made_per_request_leave_no_clients_on_the_loop(
    ollama_chat, ollama_backend, ollama_server
):
    ollama_backend.add_answer("France", "Paris.", logprobs=-0.01)

    async def one_request() -> Any:
        return await ConfidenceRoutedLLM(local=ollama_chat()).ainvoke("Capital of France?")

    for _ in range(3):
        await one_request()
    models, clients, fds = _live("ChatOllama"), _live("Client", "AsyncClient"), _fds()
    answers = [(await one_request()).text for _ in range(40)]
    assert answers == ["Paris."] * 40
    assert len(ollama_server.requests_to("/api/chat")) == 43
    assert _live("ChatOllama") <= models
    assert _live("Client", "AsyncClient") <= clients
    assert _fds() <= fds + SLACK
