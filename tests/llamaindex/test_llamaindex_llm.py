"""ConfidenceRoutedLlamaIndexLLM end to end: LlamaIndex's eight LLM entry points, Settings.llm,
query engines and chat engines, over the real ChatOllama / ChatBedrockConverse clients talking
HTTP to the project's test bed on 127.0.0.1."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_ollama import ChatOllama
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.core.llms import LLM, ChatMessage, MessageRole
from pydantic import PrivateAttr

from confidence_router import ConfidenceRoutedLLM, RoutingConfigError
from confidence_router.llamaindex import (
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_NUM_OUTPUT,
    ConfidenceRoutedLlamaIndexLLM,
    to_langchain_messages,
    to_llamaindex_message,
)
from confidence_router.testing import hashing_embedding

CLOUD_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
FRANCE = "What is the capital of France?"
KENYA = "Who was the second president of Kenya?"


# -- fixtures (the router pattern of tests/router/test_router_routing.py) --------------------


@pytest.fixture
def local(ollama_server):
    return ChatOllama(model="scripted-local", base_url=ollama_server.url, temperature=0)


@pytest.fixture
def cloud(bedrock_chat):
    return bedrock_chat()


@pytest.fixture
def router(local, cloud):
    return ConfidenceRoutedLLM(local=local, cloud=cloud)


@pytest.fixture
def llm(router):
    return ConfidenceRoutedLlamaIndexLLM(router=router)


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    """One question the local model is sure about (conf 0.943), one it is not (conf 0.011)."""
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
    bedrock_server.add_answer("capital of France", "Paris (cloud)")


class _HashingEmbedding(BaseEmbedding):
    """Deterministic, offline embeddings with surface-overlap similarity (so retrieval picks
    the document that shares words with the question, unlike a constant MockEmbedding)."""

    dim: int = 64

    @classmethod
    def class_name(cls) -> str:
        return "HashingEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return hashing_embedding(query, self.dim)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return hashing_embedding(query, self.dim)

    def _get_text_embedding(self, text: str) -> list[float]:
        return hashing_embedding(text, self.dim)


class _ChatEndEvents(BaseEventHandler):
    """Collects LlamaIndex's LLMChatEndEvent: how engines expose the LLM's raw response."""

    _events: list[LLMChatEndEvent] = PrivateAttr(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "ChatEndEvents"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent):
            self._events.append(event)

    @property
    def routings(self) -> list[dict[str, Any]]:
        return [e.response.additional_kwargs["routing"] for e in self._events if e.response]


@pytest.fixture
def llama_settings(llm) -> Iterator[type[Any]]:
    """Settings.llm = the routed LLM and an offline embedding; the globals are restored after.

    Unset, Settings.llm / embed_model resolve to OpenAI, which fails offline.
    """
    saved = {f.name: getattr(Settings, f.name) for f in dataclasses.fields(Settings)}
    Settings.llm = llm
    Settings.embed_model = _HashingEmbedding()
    try:
        yield Settings
    finally:
        for name, value in saved.items():
            setattr(Settings, name, value)


@pytest.fixture
def chat_end_events() -> Iterator[_ChatEndEvents]:
    handler = _ChatEndEvents()
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        yield handler
    finally:
        root.event_handlers.remove(handler)


DOCS = [
    Document(text="The Eiffel Tower in Paris was completed in 1889 for the World's Fair."),
    Document(text="Mount Kilimanjaro in Tanzania is the highest mountain in Africa."),
]


@pytest.fixture
def index(llama_settings) -> VectorStoreIndex:
    return VectorStoreIndex.from_documents(DOCS)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def _last_ollama_messages(ollama_server) -> list[dict[str, Any]]:
    return ollama_server.requests[-1]["body"]["messages"]


# -- construction and metadata ----------------------------------------------------------------


def test_is_a_native_llamaindex_chat_llm(llm):
    assert isinstance(llm, LLM)
    meta = llm.metadata
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True  # tools go through both tiers
    assert meta.model_name == f"confidence-router(local=scripted-local, cloud={CLOUD_MODEL})"
    assert meta.context_window == DEFAULT_CONTEXT_WINDOW
    assert meta.num_output == DEFAULT_NUM_OUTPUT


def test_metadata_follows_local_model_and_overrides(ollama_server, cloud):
    local = ChatOllama(model="m", base_url=ollama_server.url, num_ctx=8192, num_predict=512)
    router = ConfidenceRoutedLLM(local=local, cloud=None)
    derived = ConfidenceRoutedLlamaIndexLLM(router=router)
    assert derived.metadata.context_window == 8192
    assert derived.metadata.num_output == 512
    assert derived.metadata.model_name == "confidence-router(local=m, cloud=none)"
    explicit = ConfidenceRoutedLlamaIndexLLM(router=router, context_window=32000, num_output=64)
    assert (explicit.metadata.context_window, explicit.metadata.num_output) == (32000, 64)


def test_invalid_default_knobs_fail_at_construction(router):
    with pytest.raises(ValueError, match="signal must be one of"):
        ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"signal": "vibes"})
    with pytest.raises(ValueError, match="context_window"):
        ConfidenceRoutedLlamaIndexLLM(router=router, context_window=0)


def test_serialisation_leaves_out_the_router_and_its_credentials(llm):
    dumped = llm.to_dict()
    assert "router" not in dumped
    assert dumped["class_name"] == "ConfidenceRoutedLlamaIndexLLM"
    assert "aws_secret_access_key" not in llm.to_json()
    payload = llm.to_payload()
    assert payload["routing_policy"]["threshold"] == 0.7
    assert payload["model_name"].startswith("confidence-router(")


# -- chat / achat -----------------------------------------------------------------------------


def test_chat_kept_local(llm, scripted, ollama_server, bedrock_server):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), _user(FRANCE)]
    response = llm.chat(messages)
    routing = response.additional_kwargs["routing"]
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == "Paris"
    assert routing["decision"] == "local"
    assert routing["reason"] == "confident"
    assert response.raw["routing"] == routing
    assert response.raw["model_name"] == "scripted-local"  # raw is the LangChain metadata
    assert response.raw["usage_metadata"]["output_tokens"] == 1
    # The routing record stays off the message (chat memories keep messages).
    assert "routing" not in response.message.additional_kwargs
    assert _last_ollama_messages(ollama_server) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": FRANCE},
    ]
    assert bedrock_server.requests == []


def test_chat_escalated(llm, scripted, bedrock_server):
    response = llm.chat([_user(KENYA)])
    routing = response.raw["routing"]
    assert response.message.content == "Daniel arap Moi"
    assert routing["decision"] == "cloud"
    assert routing["reason"] == "low_confidence"
    assert routing["local_answer"] == "Jomo Kenyatta was"
    assert response.additional_kwargs["routing"] is routing
    assert response.raw["usage_metadata"]["output_tokens"] == 4  # the cloud answer's usage
    assert len(bedrock_server.requests) == 1


async def test_achat_both_paths(llm, scripted):
    kept = await llm.achat([_user(FRANCE)])
    escalated = await llm.achat([_user(KENYA)])
    assert kept.message.content == "Paris"
    assert kept.additional_kwargs["routing"]["decision"] == "local"
    assert escalated.message.content == "Daniel arap Moi"
    assert escalated.raw["routing"]["decision"] == "cloud"


def test_multi_turn_roles_reach_both_tiers(llm, scripted, ollama_server, bedrock_server):
    history = [
        ChatMessage(role=MessageRole.SYSTEM, content="You are a historian."),
        _user("Who was the first president of Kenya?"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Jomo Kenyatta."),
        _user("And the second president of Kenya?"),
    ]
    assert llm.chat(history).message.content == "Daniel arap Moi"
    assert [m["role"] for m in _last_ollama_messages(ollama_server)] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    body = bedrock_server.requests[-1]["body"]
    assert body["system"] == [{"text": "You are a historian."}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


# -- complete / acomplete ---------------------------------------------------------------------


def test_complete_both_paths(llm, scripted, ollama_server):
    kept = llm.complete(FRANCE)
    assert kept.text == "Paris"
    assert kept.additional_kwargs["routing"]["decision"] == "local"
    assert kept.raw["routing"]["decision"] == "local"
    # A chat model completes a prompt as a single user message.
    assert _last_ollama_messages(ollama_server) == [{"role": "user", "content": FRANCE}]
    escalated = llm.complete(KENYA, formatted=True)
    assert escalated.text == "Daniel arap Moi"
    assert escalated.additional_kwargs["routing"]["decision"] == "cloud"


async def test_acomplete_both_paths(llm, scripted):
    kept = await llm.acomplete(FRANCE)
    escalated = await llm.acomplete(KENYA)
    assert (kept.text, kept.raw["routing"]["decision"]) == ("Paris", "local")
    assert (escalated.text, escalated.raw["routing"]["decision"]) == ("Daniel arap Moi", "cloud")


# -- streaming --------------------------------------------------------------------------------


def test_stream_chat_kept_local_streams_tokens(llm, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Hamlet", "William Shakespeare wrote it", logprobs=-0.02)
    responses = list(llm.stream_chat([_user("Who wrote Hamlet?")]))
    deltas = [r.delta for r in responses[:-1]]
    assert "".join(deltas) == "William Shakespeare wrote it"
    assert len(deltas) >= 4 and all(deltas)  # token by token, no empty deltas mid-stream
    # LlamaIndex convention: message.content is the text so far.
    assert responses[1].message.content == deltas[0] + deltas[1]
    final = responses[-1]
    assert final.delta == ""
    assert final.message.content == "William Shakespeare wrote it"
    assert final.additional_kwargs["routing"]["decision"] == "local"
    assert final.raw["routing"] == final.additional_kwargs["routing"]
    assert final.raw["model_name"] == "scripted-local"
    assert final.raw["usage_metadata"]["output_tokens"] == 4
    assert all("routing" not in r.additional_kwargs for r in responses[:-1])
    assert bedrock_server.requests == []


def test_stream_chat_escalated_contains_no_local_text(llm, scripted):
    responses = list(llm.stream_chat([_user(KENYA)]))
    assert "".join(r.delta or "" for r in responses) == "Daniel arap Moi"
    for response in responses:
        assert "Kenyatta" not in (response.message.content or "")
    final = responses[-1]
    assert final.message.content == "Daniel arap Moi"
    assert final.additional_kwargs["routing"]["decision"] == "cloud"
    assert final.raw["routing"]["local_answer"] == "Jomo Kenyatta was"


async def test_astream_chat_both_paths(llm, scripted):
    kept = [r async for r in await llm.astream_chat([_user(FRANCE)])]
    escalated = [r async for r in await llm.astream_chat([_user(KENYA)])]
    assert "".join(r.delta or "" for r in kept) == "Paris"
    assert kept[-1].additional_kwargs["routing"]["decision"] == "local"
    assert "".join(r.delta or "" for r in escalated) == "Daniel arap Moi"
    assert all("Kenyatta" not in (r.message.content or "") for r in escalated)
    assert escalated[-1].raw["routing"]["decision"] == "cloud"


def test_stream_complete_both_paths(llm, scripted):
    kept = list(llm.stream_complete(FRANCE))
    escalated = list(llm.stream_complete(KENYA))
    assert kept[-1].text == "Paris" and kept[-1].delta == ""
    assert kept[-1].additional_kwargs["routing"]["decision"] == "local"
    assert "".join(r.delta or "" for r in escalated) == "Daniel arap Moi"
    assert all("Kenyatta" not in r.text for r in escalated)
    assert escalated[-1].raw["routing"]["decision"] == "cloud"


async def test_astream_complete_both_paths(llm, scripted):
    kept = [r async for r in await llm.astream_complete(FRANCE)]
    escalated = [r async for r in await llm.astream_complete(KENYA)]
    assert kept[-1].text == "Paris"
    assert kept[-1].additional_kwargs["routing"]["decision"] == "local"
    assert escalated[-1].text == "Daniel arap Moi"
    assert all("Kenyatta" not in r.text for r in escalated)
    assert escalated[-1].additional_kwargs["routing"]["decision"] == "cloud"


# -- per-call knobs ---------------------------------------------------------------------------


def test_threshold_kwarg_flips_the_decision(llm, scripted):
    # confidence 0.943 passes the default 0.7 but not 0.95; 0.011 passes 0.0
    assert llm.chat([_user(FRANCE)]).message.content == "Paris"
    strict = llm.chat([_user(FRANCE)], threshold=0.95)
    assert strict.message.content == "Paris (cloud)"
    assert strict.raw["routing"]["threshold"] == 0.95
    assert llm.complete(FRANCE, threshold=0.95).text == "Paris (cloud)"
    lenient = list(llm.stream_chat([_user(KENYA)], threshold=0.0))
    assert lenient[-1].message.content == "Jomo Kenyatta was"
    assert lenient[-1].additional_kwargs["routing"]["decision"] == "local"


async def test_threshold_kwarg_async(llm, scripted):
    assert (await llm.achat([_user(FRANCE)], threshold=0.95)).message.content == "Paris (cloud)"
    assert (await llm.acomplete(KENYA, threshold=0.0)).text == "Jomo Kenyatta was"
    streamed = [r async for r in await llm.astream_complete(FRANCE, threshold=0.95)]
    assert streamed[-1].text == "Paris (cloud)"


def test_default_knobs_and_call_override(router, scripted):
    strict = ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"threshold": 0.95})
    assert strict.chat([_user(FRANCE)]).message.content == "Paris (cloud)"
    assert strict.chat([_user(FRANCE)], threshold=0.5).message.content == "Paris"
    assert router.threshold == 0.7  # the wrapped router is not modified


def test_other_kwargs_go_to_the_tiers(llm, scripted, ollama_server):
    llm.chat([_user(FRANCE)], stop=["\n\n"])
    assert ollama_server.requests[-1]["body"]["options"]["stop"] == ["\n\n"]


def test_invalid_knob_is_a_clear_error_before_any_request(llm, scripted, ollama_server):
    with pytest.raises(RoutingConfigError, match="threshold"):
        llm.chat([_user(FRANCE)], threshold=1.7)
    with pytest.raises(RoutingConfigError, match="on_unknown"):
        llm.complete(FRANCE, on_unknown="maybe")
    # Streams fail at the call, not at the first next().
    with pytest.raises(RoutingConfigError, match="threshold"):
        llm.stream_chat([_user(FRANCE)], threshold=-1)
    with pytest.raises(RoutingConfigError, match="signal"):
        llm.stream_complete(FRANCE, signal="vibes")
    assert ollama_server.requests == []


async def test_invalid_knob_async(llm, scripted):
    with pytest.raises(RoutingConfigError):
        await llm.achat([_user(FRANCE)], threshold="high")
    with pytest.raises(RoutingConfigError):
        await llm.astream_chat([_user(FRANCE)], allow_escalation="no")


# -- message conversion -----------------------------------------------------------------------


def test_message_conversion_roles_and_tool_calls():
    converted = to_langchain_messages(
        [
            ChatMessage(role=MessageRole.DEVELOPER, content="rules"),
            ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="a"), TextBlock(text="b")]),
            ChatMessage(
                role=MessageRole.ASSISTANT,
                blocks=[
                    ToolCallBlock(tool_call_id="c1", tool_name="weather", tool_kwargs='{"q": 1}')
                ],
            ),
            ChatMessage(
                role=MessageRole.TOOL, content="sunny", additional_kwargs={"tool_call_id": "c1"}
            ),
        ]
    )
    system, human, ai, tool = converted
    assert isinstance(system, SystemMessage) and system.content == "rules"
    assert isinstance(human, HumanMessage) and human.content == "a\nb"
    assert isinstance(ai, AIMessage)
    assert ai.tool_calls == [{"name": "weather", "args": {"q": 1}, "id": "c1", "type": "tool_call"}]
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "c1"

    back = to_llamaindex_message(AIMessage(content="", tool_calls=ai.tool_calls))
    assert back.role == MessageRole.ASSISTANT
    call = next(b for b in back.blocks if isinstance(b, ToolCallBlock))
    assert (call.tool_name, call.tool_kwargs, call.tool_call_id) == ("weather", {"q": 1}, "c1")


def test_message_conversion_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match="ImageBlock"):
        to_langchain_messages(
            [ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(url="http://x/y.png")])]
        )
    with pytest.raises(ValueError, match="tool_call_id"):
        to_langchain_messages([ChatMessage(role=MessageRole.TOOL, content="result")])


# -- as Settings.llm: query engines and chat engines ------------------------------------------


def test_query_engine_sends_retrieved_context(
    index, ollama_backend, ollama_server, bedrock_server, chat_end_events
):
    ollama_backend.add_answer("Eiffel Tower completed", "In 1889.", logprobs=-0.05)
    response = index.as_query_engine(similarity_top_k=1).query(
        "When was the Eiffel Tower completed?"
    )
    assert str(response) == "In 1889."
    assert "completed in 1889" in response.source_nodes[0].node.get_content()
    # The prompt the router sent contains the retrieved chunk, and only that one.
    prompt = "\n".join(m["content"] for m in _last_ollama_messages(ollama_server))
    assert "The Eiffel Tower in Paris was completed in 1889" in prompt
    assert "Kilimanjaro" not in prompt
    # Query engines call llm.predict -> chat(); the decision is on LlamaIndex's events.
    assert [r["decision"] for r in chat_end_events.routings] == ["local"]
    assert bedrock_server.requests == []


def test_streaming_query_engine_escalates_with_context(
    index, ollama_backend, ollama_server, bedrock_server, chat_end_events
):
    ollama_backend.add_answer("highest mountain", "Maybe Kenya", logprobs=[-2.5, -2.9])
    bedrock_server.add_answer("highest mountain", "Kilimanjaro, in Tanzania.")
    engine = index.as_query_engine(similarity_top_k=1, streaming=True)
    response = engine.query("Which is the highest mountain in Africa?")
    tokens = list(response.response_gen)
    assert "".join(tokens) == "Kilimanjaro, in Tanzania."
    assert "Maybe" not in "".join(tokens)  # the buffered local answer never leaks
    local_prompt = "\n".join(m["content"] for m in _last_ollama_messages(ollama_server))
    assert "Mount Kilimanjaro in Tanzania is the highest mountain" in local_prompt
    cloud_prompt = str(bedrock_server.requests[-1]["body"]["messages"])
    assert "Mount Kilimanjaro in Tanzania is the highest mountain" in cloud_prompt
    assert chat_end_events.routings[-1]["decision"] == "cloud"


async def test_async_query_engine(index, ollama_backend, ollama_server):
    ollama_backend.add_answer("Eiffel Tower completed", "In 1889.", logprobs=-0.05)
    response = await index.as_query_engine(similarity_top_k=1).aquery(
        "When was the Eiffel Tower completed?"
    )
    assert str(response) == "In 1889."
    assert "completed in 1889" in _last_ollama_messages(ollama_server)[-1]["content"]


def test_simple_chat_engine_keeps_history(llama_settings, scripted, ollama_server, chat_end_events):
    from llama_index.core.chat_engine import SimpleChatEngine

    engine = SimpleChatEngine.from_defaults()  # uses Settings.llm
    assert str(engine.chat(FRANCE)) == "Paris"
    assert str(engine.chat(KENYA)) == "Daniel arap Moi"
    sent = _last_ollama_messages(ollama_server)
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == "Paris"
    assert [r["decision"] for r in chat_end_events.routings] == ["local", "cloud"]
    # The memory holds plain assistant messages, without the routing record.
    assert all("routing" not in m.additional_kwargs for m in engine.chat_history)


def test_context_chat_engine_puts_retrieved_context_in_the_prompt(
    index, ollama_backend, ollama_server, chat_end_events
):
    ollama_backend.add_answer("Eiffel Tower", "It was completed in 1889.", logprobs=-0.05)
    engine = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
    response = engine.chat("When was the Eiffel Tower completed?")
    assert str(response) == "It was completed in 1889."
    sent = _last_ollama_messages(ollama_server)
    assert sent[0]["role"] == "system"
    assert "The Eiffel Tower in Paris was completed in 1889" in sent[0]["content"]
    assert sent[-1] == {"role": "user", "content": "When was the Eiffel Tower completed?"}
    assert chat_end_events.routings[-1]["decision"] == "local"


def test_context_chat_engine_streaming(index, ollama_backend, bedrock_server, chat_end_events):
    ollama_backend.add_answer("highest mountain", "Maybe Kenya", logprobs=[-2.5, -2.9])
    bedrock_server.add_answer("highest mountain", "Kilimanjaro, in Tanzania.")
    engine = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
    response = engine.stream_chat("Which is the highest mountain in Africa?")
    assert "".join(response.response_gen) == "Kilimanjaro, in Tanzania."
    cloud_body = bedrock_server.requests[-1]["body"]
    assert "Mount Kilimanjaro in Tanzania" in str(cloud_body["system"])
    assert chat_end_events.routings[-1]["decision"] == "cloud"


async def test_async_context_chat_engine(index, ollama_backend):
    ollama_backend.add_answer("Eiffel Tower", "It was completed in 1889.", logprobs=-0.05)
    engine = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
    response = await engine.achat("When was the Eiffel Tower completed?")
    assert str(response) == "It was completed in 1889."


def test_token_counting_handler_sees_the_returned_tiers_usage(llama_settings, llm, scripted):
    counter = TokenCountingHandler()
    llm.callback_manager = CallbackManager([counter])
    llm.chat([_user(KENYA)])
    assert counter.completion_llm_token_count == 4  # the cloud answer's output tokens
    assert counter.prompt_llm_token_count == 11


# -- from_settings: settings and router overrides next to this class's own fields ------------


def test_from_settings_takes_setting_overrides_and_its_own_fields(
    ollama_backend, ollama_server, bedrock_server
):
    # Keywords that are not this class's fields were refused; they now override settings
    # (validated as settings) or set router fields, as ConfidenceRoutedLLM.from_settings does.
    ollama_backend.add_answer("Peru", "Lima", logprobs=-0.2)
    llm = ConfidenceRoutedLlamaIndexLLM.from_settings(
        environ={"CONFIDENCE_ROUTER_LOCAL_MODEL": "from-env"},
        local_model="explicit-local", ollama_host=ollama_server.url,
        bedrock_endpoint=bedrock_server.url, threshold=0.5, local_timeout=30,
        context_window=2048,
    )
    assert (llm.router.threshold, llm.context_window) == (0.5, 2048)
    answer = llm.chat([ChatMessage(role=MessageRole.USER, content="Capital of Peru?")])
    assert answer.message.content == "Lima"
    assert [r["body"]["model"] for r in ollama_server.requests_to("/api/chat")] == [
        "explicit-local"
    ]
    assert bedrock_server.requests == []


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"threshold": 1.5}, "threshold"), ({"local_model": ""}, "local_model"),
     ({"treshold": 0.9}, "threshold"), ({"router": None}, "builds the router")],
)
def test_from_settings_refuses_bad_overrides(fields, match, ollama_server, bedrock_server):
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLlamaIndexLLM.from_settings(environ={}, **fields)
    assert ollama_server.requests == [] and bedrock_server.requests == []
