"""The router calls a tier's ``_generate`` directly when LangChain's ``invoke()`` would add only
bookkeeping nobody observes (no callbacks, no cache, no rate limiter): the same request must
reach the server and the same answer come back; wherever ``invoke()`` would do more, it runs.

Everything is checked at the fake servers (what they received) and against the unchanged
clients called the usual way.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.rate_limiters import BaseRateLimiter
from langchain_core.tools import tool

from confidence_router import ConfidenceRoutedLLM
from confidence_router.tier_clients import ainvoke_directly, invoke_directly

Q = "What is the capital of France?"


@tool
def lookup(city: str) -> str:
    """Look a city up."""
    return city


def _received(server: Any) -> list[Any]:
    """The request bodies the server received, oldest first."""
    return list(server.requests)


def _comparable(message: Any) -> dict[str, Any]:
    """What the caller reads from an answer (the id names the run that made it)."""
    meta = {k: v for k, v in message.response_metadata.items()
            if k != "created_at" and not k.endswith("_duration")}  # the server's clock
    return {"type": type(message).__name__, "content": message.content, "meta": meta,
            "usage": message.usage_metadata, "tool_calls": message.tool_calls,
            "kwargs": message.additional_kwargs}


_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()

CONVERSATIONS = {
    "one question": [HumanMessage(Q)],
    "system and turns": [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."),
                         HumanMessage(Q)],
    "tool round trip": [
        HumanMessage("Look up Paris."),
        AIMessage("", tool_calls=[{"name": "lookup", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Paris is in France.", tool_call_id="c1"),
        HumanMessage(Q),
    ],
    # A LangChain v0 data block: invoke() normalises it before the client formats it.
    "v0 image block": [HumanMessage(content=[
        {"type": "text", "text": Q},
        {"type": "image", "source_type": "base64", "mime_type": "image/png", "data": _PNG},
    ])],
}

WRAPPINGS = {
    "plain": lambda m: m,
    "bind_tools": lambda m: m.bind_tools([lookup]),
    "bound kwargs": lambda m: m.bind(format="json").bind(format={"type": "object"}),
    "bound stop": lambda m: m.bind(stop=["never"]),  # invoke's stop=None replaces it
    "structured-output kwargs": lambda m: m.bind(
        ls_structured_output_format={"schema": {"type": "object"}}, format="json"),
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_direct_call_sends_and_returns_what_invoke_does(
    ollama_chat, ollama_backend, ollama_server, conversation, wrapping
):
    ollama_backend.add_answer("", " Paris", logprobs=-0.1)
    model = WRAPPINGS[wrapping](ollama_chat(logprobs=True))
    messages = CONVERSATIONS[conversation]

    usual = model.invoke(messages, None, stop=["\n\n"], options={"temperature": 0.0})
    sent_usual = _received(ollama_server)
    ollama_server.clear_requests()
    direct = invoke_directly(model, messages, None, ["\n\n"], {"options": {"temperature": 0.0}})

    assert _received(ollama_server) == sent_usual and len(sent_usual) == 1
    assert _comparable(direct) == _comparable(usual)
    assert usual.id and usual.id.startswith("lc_run-")
    assert direct.id is None  # named by the router's own run


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_direct_async_call_sends_and_returns_what_ainvoke_does(
    ollama_chat, ollama_backend, ollama_server, conversation
):
    ollama_backend.add_answer("", " Paris", logprobs=-0.1)
    model = ollama_chat(logprobs=True).bind_tools([lookup])
    messages = CONVERSATIONS[conversation]

    async def both() -> tuple[Any, Any, list[Any]]:
        usual = await model.ainvoke(messages, None, stop=["\n\n"])
        sent = _received(ollama_server)
        ollama_server.clear_requests()
        direct = await ainvoke_directly(model, model.ainvoke, messages, None, ["\n\n"], {})
        return usual, direct, sent

    usual, direct, sent_usual = asyncio.run(both())
    assert _received(ollama_server) == sent_usual and len(sent_usual) == 1
    assert _comparable(direct) == _comparable(usual)


@pytest.mark.parametrize("after_tokens", [0, 2])
def test_a_failing_direct_call_raises_the_clients_error(
    ollama_chat, ollama_backend, after_tokens
):
    """A server error before or during the answer: the client's own error, as from invoke()."""
    ollama_backend.add_answer("", [" Par", "is", "."], logprobs=-0.1)
    ollama_backend.fail("", status=503, message="overloaded", after_tokens=after_tokens)
    model = ollama_chat(logprobs=True)
    with pytest.raises(Exception) as usual:
        model.invoke([HumanMessage(Q)])
    with pytest.raises(type(usual.value)) as direct:
        invoke_directly(model, [HumanMessage(Q)], None, None, {})
    assert str(direct.value) == str(usual.value)


# -- where invoke() does more, it runs -----------------------------------------------------------


class _Starts(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts = 0

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1


class _CountingLimiter(BaseRateLimiter):
    def __init__(self) -> None:
        self.acquired = 0

    def acquire(self, *, blocking: bool = True) -> bool:
        self.acquired += 1
        return True

    async def aacquire(self, *, blocking: bool = True) -> bool:
        self.acquired += 1
        return True


@pytest.fixture
def confident(ollama_backend):
    ollama_backend.add_answer("", " Paris", logprobs=-0.01)
    return ollama_backend


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_callbacks_on_the_local_model_still_see_its_runs(ollama_chat, confident, entry):
    handler = _Starts()
    router = ConfidenceRoutedLLM(local=ollama_chat(callbacks=[handler]))
    for _ in range(3):
        _call(router, entry)
    assert handler.starts == 3


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_callbacks_bound_with_config_still_see_the_local_runs(ollama_chat, confident, entry):
    handler = _Starts()
    router = ConfidenceRoutedLLM(local=ollama_chat().with_config(callbacks=[handler]))
    _call(router, entry)
    assert handler.starts == 1


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_callbacks_of_the_call_still_see_the_local_runs(ollama_chat, confident, entry):
    handler = _Starts()
    router = ConfidenceRoutedLLM(local=ollama_chat())
    _call(router, entry, config={"callbacks": [handler]})
    assert handler.starts == 2  # the router's run and its local child run


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_the_local_models_rate_limiter_still_applies(ollama_chat, confident, entry):
    limiter = _CountingLimiter()
    router = ConfidenceRoutedLLM(local=ollama_chat(rate_limiter=limiter))
    _call(router, entry)
    _call(router, entry)
    assert limiter.acquired == 2


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_a_global_llm_cache_still_serves_the_local_tier(
    ollama_chat, confident, ollama_server, entry
):
    from langchain_core.caches import InMemoryCache

    set_llm_cache(InMemoryCache())
    try:
        # The router's own run is not cached (cache=False): only its local tier is.
        router = ConfidenceRoutedLLM(local=ollama_chat(), cache=False)
        first = _call(router, entry)
        second = _call(router, entry)
    finally:
        set_llm_cache(None)
    assert len(ollama_server.requests) == 1  # the second answer came from the cache
    assert second.content == first.content == " Paris"


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_the_local_models_own_cache_still_serves_it(ollama_chat, confident, ollama_server, entry):
    from langchain_core.caches import InMemoryCache

    router = ConfidenceRoutedLLM(local=ollama_chat(cache=InMemoryCache()))
    answers = [_call(router, entry) for _ in range(3)]
    assert len(ollama_server.requests) == 1
    assert {a.content for a in answers} == {" Paris"}


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_the_answer_is_named_by_the_routers_run(ollama_chat, confident, entry):
    router = ConfidenceRoutedLLM(local=ollama_chat())
    answers = [_call(router, entry) for _ in range(2)]
    assert all(a.id and a.id.startswith("lc_run-") for a in answers)
    assert answers[0].id != answers[1].id


def _call(router: Any, entry: str, config: dict[str, Any] | None = None) -> Any:
    if entry == "invoke":
        return router.invoke(Q, config)
    return asyncio.run(router.ainvoke(Q, config))


# -- the cloud tier ------------------------------------------------------------------------------


def test_direct_cloud_call_sends_the_body_invoke_sends(cloud_factory, bedrock_server):
    bedrock_server.add_answer(None, "Paris.")
    model = cloud_factory(max_tokens=64).bind_tools([lookup])
    messages = [SystemMessage("Be brief."), *CONVERSATIONS["tool round trip"]]

    usual = model.invoke(messages, None, stop=None)
    sent_usual = [(r["operation"], r["body"]) for r in bedrock_server.requests]
    bedrock_server.clear_requests()
    direct = invoke_directly(model, messages, None, None, {})

    assert [(r["operation"], r["body"]) for r in bedrock_server.requests] == sent_usual
    assert len(sent_usual) == 1
    assert direct.content == usual.content and direct.usage_metadata == usual.usage_metadata
    assert direct.response_metadata.keys() == usual.response_metadata.keys()
