"""ConfidenceRoutedLlamaIndexLLM attacked as a LlamaIndex user would: every message shape
llama_index.core can build, the privacy guard through LlamaIndex messages, hung and failing
tiers, consumers that stop reading a stream, concurrent calls, and per-call knobs.

Each promise is checked where it matters, at the test bed: what the scripted Ollama server
and the fake Bedrock server received (real ChatOllama / ChatBedrockConverse clients over
HTTP). The rule for odd input: converted faithfully, or a typed error before any request,
never content silently left out of what is sent.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CacheControl,
    CachePoint,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from confidence_router import ConfidenceRoutedLLM
from confidence_router.budget import CloudBudget
from confidence_router.errors import (
    BudgetExceededError,
    CloudEscalationError,
    ConfidenceRouterError,
    InvalidInputError,
    InvalidTypeError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.guards import PIIGuard
from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM
from confidence_router.testing import FakeBedrockServer, InFlightBackend
from confidence_router.testing.bedrock_server import _BedrockHandler

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
FRANCE = "What is the capital of France?"
KENYA = "Who was the second president of Kenya?"
#: Generous "not hung" bound for one call on a loaded 2-core machine (the hang is 5 s).
NOT_HUNG_S = 3.0
HANG_S = 5.0
LOCAL_TIMEOUT = 0.3

CHAT_ENTRIES = ("chat", "stream_chat", "achat", "astream_chat")
COMPLETE_ENTRIES = ("complete", "stream_complete", "acomplete", "astream_complete")
ALL_ENTRIES = CHAT_ENTRIES + COMPLETE_ENTRIES


def _user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    """FRANCE: the local model is sure (kept); KENYA: unsure (escalated to the cloud)."""
    ollama_backend.add_answer("capital of France", "Paris", logprobs=-0.05)
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    ollama_backend.set_default("not sure", logprobs=-3.0)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    bedrock_server.add_answer("capital of France", "Paris (cloud)")
    bedrock_server.set_default("cloud answer")


def _router(ollama_chat, bedrock_chat, **fields: Any) -> ConfidenceRoutedLLM:
    return ConfidenceRoutedLLM(local=ollama_chat(temperature=0),
                               cloud=bedrock_chat(max_tokens=50), **fields)


@pytest.fixture
def llm(ollama_chat, bedrock_chat, scripted) -> ConfidenceRoutedLlamaIndexLLM:
    return ConfidenceRoutedLlamaIndexLLM(router=_router(ollama_chat, bedrock_chat))


def _ollama_chats(ollama_server) -> list[dict[str, Any]]:
    return [r["body"] for r in ollama_server.requests_to("/api/chat")]


def _nothing_sent(ollama_server, bedrock_server) -> None:
    assert ollama_server.requests_to("/api/chat") == []
    assert bedrock_server.requests == []


async def _run(llm, entry: str, arg: Any, **kwargs: Any) -> list[Any]:
    """Call one of the eight entry points and drain it: the responses it gave, in order."""
    result = getattr(llm, entry)(arg, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    if hasattr(result, "__aiter__"):
        return [r async for r in result]
    if hasattr(result, "__next__"):
        return list(result)
    return [result]


async def _call_only(llm, entry: str, arg: Any, **kwargs: Any) -> Any:
    """Call an entry point without iterating a stream: a mistake must surface at the call."""
    result = getattr(llm, entry)(arg, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _arg(entry: str, messages: list[ChatMessage]) -> Any:
    """The argument for ``entry``: the messages, or for completions the user's text."""
    if entry in CHAT_ENTRIES:
        return messages
    return messages[-1].content


def _text(entry: str, response: Any) -> str:
    return response.message.content if entry in CHAT_ENTRIES else response.text


# == 1. message shapes: converted faithfully, or refused before any request ==================

TOOL_CALL_OPENAI = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def _tool_result(text: str = "Sunny, 24 C", call_id: str = "call_1") -> ChatMessage:
    return ChatMessage(role=MessageRole.TOOL, content=text,
                       additional_kwargs={"tool_call_id": call_id, "name": "get_weather"})


def _refused_shapes(tmp_path) -> dict[str, tuple[list[ChatMessage], type[Exception], str]]:
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF-1.4 fake")
    with_role = ChatMessage(role=MessageRole.USER, content="hi")
    with_role.role = "narrator"  # LlamaIndex validates roles at construction only
    user_thinking = ChatMessage(role=MessageRole.USER, blocks=[
        ThinkingBlock(content="my card is 4111 1111 1111 1111"), TextBlock(text="hi")])
    return {
        "image by http url": (
            [ChatMessage(role=MessageRole.USER, blocks=[
                TextBlock(text="what is it?"), ImageBlock(url="http://example.invalid/a.png")])],
            InvalidInputError, "url"),
        "data: URL without an image type": (
            [ChatMessage(role=MessageRole.USER, blocks=[
                TextBlock(text="what is it?"),
                ImageBlock(url="data:;base64," + base64.b64encode(PNG).decode())])],
            InvalidInputError, "image type"),
        "image in an assistant message": (
            [_user("draw"), ChatMessage(role=MessageRole.ASSISTANT,
                                        blocks=[ImageBlock(image=PNG)]), _user("again")],
            InvalidInputError, "ImageBlock"),
        "image in a system message": (
            [ChatMessage(role=MessageRole.SYSTEM, blocks=[ImageBlock(image=PNG)]), _user("hi")],
            InvalidInputError, "ImageBlock"),
        "image in a tool result": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, blocks=[
                ToolCallBlock(tool_call_id="call_1", tool_name="get_weather",
                              tool_kwargs={"city": "Paris"})]),
             ChatMessage(role=MessageRole.TOOL, blocks=[ImageBlock(image=PNG)],
                         additional_kwargs={"tool_call_id": "call_1"})],
            InvalidInputError, "ImageBlock"),
        "audio": ([ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="listen"), AudioBlock(audio=b"RIFF0000", format="wav")])],
            InvalidInputError, "AudioBlock"),
        "video": ([ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="watch"), VideoBlock(video=b"\x00\x00\x00\x18ftypmp42")])],
            InvalidInputError, "VideoBlock"),
        "document": ([ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="summarise"), DocumentBlock(path=doc)])],
            InvalidInputError, "DocumentBlock"),
        "citable block": ([ChatMessage(role=MessageRole.USER, blocks=[
            CitableBlock(content=[TextBlock(text="Paris is the capital")], title="t",
                         source="s"), TextBlock(text="cite it")])],
            InvalidInputError, "CitableBlock"),
        "citation in an assistant message": (
            [_user("q"), ChatMessage(role=MessageRole.ASSISTANT, blocks=[
                TextBlock(text="Paris"),
                CitationBlock(cited_content=TextBlock(text="Paris is the capital"),
                              source="s", title="t", additional_location_info={})]),
             _user("sure?")],
            InvalidInputError, "CitationBlock"),
        "tool call in a user message": (
            [ChatMessage(role=MessageRole.USER, blocks=[
                TextBlock(text="hi"), ToolCallBlock(tool_call_id="c", tool_name="x",
                                                    tool_kwargs={})])],
            InvalidInputError, "ToolCallBlock"),
        "tool call with arguments that are not JSON": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={
                "tool_calls": [{**TOOL_CALL_OPENAI, "function": {
                    "name": "get_weather", "arguments": "{city: Paris"}}]}), _tool_result()],
            InvalidInputError, "JSON"),
        "tool call without a name": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(
                tool_call_id="call_1", tool_name="", tool_kwargs={})]), _tool_result()],
            InvalidInputError, "names no tool"),
        "additional_kwargs tool call without a name": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={
                "tool_calls": [{"id": "call_1", "function": {"arguments": "{}"}}]}),
             _tool_result()],
            InvalidInputError, "names no tool"),
        "additional_kwargs tool_calls not a list": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, content="",
                                      additional_kwargs={"tool_calls": TOOL_CALL_OPENAI})],
            InvalidTypeError, "must be a list"),
        "tool calls in a user message's additional_kwargs": (
            [ChatMessage(role=MessageRole.USER, content="hi",
                         additional_kwargs={"tool_calls": [TOOL_CALL_OPENAI]})],
            InvalidInputError, "only assistant messages"),
        "tool result with a non-str name": (
            [_user("w?"), ChatMessage(role=MessageRole.TOOL, content="sunny",
                                      additional_kwargs={"tool_call_id": "call_1", "name": 5})],
            InvalidTypeError, "name"),
        "tool result with an object as id": (
            [_user("w?"), ChatMessage(role=MessageRole.TOOL, content="sunny",
                                      additional_kwargs={"tool_call_id": {"id": "call_1"}})],
            InvalidTypeError, "tool_call_id"),
        "tool result without an id": (
            [_user("w?"), ChatMessage(role=MessageRole.TOOL, content="sunny")],
            InvalidInputError, "tool_call_id"),
        "legacy function_call": (
            [_user("w?"), ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}),
             _user("and?")],
            InvalidInputError, "function_call"),
        "thinking in a user message": ([user_thinking], InvalidInputError, "ThinkingBlock"),
        "only an empty message": ([_user("")], InvalidInputError, "empty"),
        "only a None message": ([ChatMessage(role=MessageRole.USER, content=None)],
                                InvalidInputError, "empty"),
        "unknown role": ([with_role], InvalidInputError, "narrator"),
    }


async def test_refused_shapes_are_typed_errors_at_every_chat_entry_before_any_request(
    llm, ollama_server, bedrock_server, tmp_path
):
    for case, (messages, error, needle) in _refused_shapes(tmp_path).items():
        for entry in CHAT_ENTRIES:
            try:
                await _call_only(llm, entry, messages)
            except error as raised:
                assert needle in str(raised), (case, entry, str(raised))
            except Exception as raised:  # noqa: BLE001 - reported with the case
                pytest.fail(f"{case}: {entry} raised {type(raised).__name__}: {raised}")
            else:
                pytest.fail(f"{case}: {entry} raised nothing")
    _nothing_sent(ollama_server, bedrock_server)


def test_text_images_cache_points_and_system_reach_the_local_model(llm, ollama_server, tmp_path):
    path = tmp_path / "dot.png"
    path.write_bytes(PNG)
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, blocks=[TextBlock(text="Be brief."),
                                                     CachePoint(cache_control=CacheControl(
                                                         type="ephemeral"))]),
        ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="What is the capital of France?"),
            TextBlock(text="And what are these?"),
            ImageBlock(image=PNG),                                   # raw bytes
            ImageBlock(image=base64.b64encode(PNG)),                 # already base64
            ImageBlock(path=path, image_mimetype="image/png"),       # a local file
            ImageBlock(url=DATA_URL),                                # a data: URL (was refused)
            CachePoint(cache_control=CacheControl(type="ephemeral")),
        ]),
    ]
    reply = llm.chat(messages)
    assert reply.message.content == "Paris"
    (body,) = _ollama_chats(ollama_server)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["role"] == "user"
    # ChatOllama starts each text part of a list content with a line break (its own format).
    assert user["content"].lstrip("\n") == "What is the capital of France?\nAnd what are these?"
    assert [base64.b64decode(image) for image in user["images"]] == [PNG] * 4


def test_a_data_url_image_reaches_the_cloud(llm, ollama_server, bedrock_server):
    messages = [ChatMessage(role=MessageRole.USER, blocks=[
        TextBlock(text=KENYA), ImageBlock(url=DATA_URL)])]
    assert llm.chat(messages).message.content == "Daniel arap Moi"
    (sent,) = _ollama_chats(ollama_server)
    assert [base64.b64decode(i) for i in sent["messages"][0]["images"]] == [PNG]
    (cloud,) = bedrock_server.requests
    images = [b["image"] for b in cloud["body"]["messages"][0]["content"] if "image" in b]
    assert [(i["format"], base64.b64decode(i["source"]["bytes"])) for i in images] == [
        ("png", PNG)]


class _OpenAIFunction(BaseModel):
    name: str
    arguments: str


class _OpenAIToolCall(BaseModel):
    """The shape of openai's ChatCompletionMessageToolCall, which LlamaIndex's OpenAI
    integration kept in additional_kwargs."""

    id: str
    type: str = "function"
    function: _OpenAIFunction


def _tool_conversation(tool_calls_where: str) -> list[ChatMessage]:
    """A tool-calling turn as LlamaIndex keeps it: ToolCallBlocks (0.14) or, as older
    integrations and other LLMs' chat histories have them, ``additional_kwargs["tool_calls"]``."""
    if tool_calls_where == "blocks":
        assistant = ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            TextBlock(text="Let me look."),
            ToolCallBlock(tool_call_id="call_1", tool_name="get_weather",
                          tool_kwargs={"city": "Paris"})])
    elif tool_calls_where == "openai additional_kwargs":
        assistant = ChatMessage(role=MessageRole.ASSISTANT, content="Let me look.",
                                additional_kwargs={"tool_calls": [TOOL_CALL_OPENAI]})
    elif tool_calls_where == "anthropic additional_kwargs":
        assistant = ChatMessage(role=MessageRole.ASSISTANT, content="Let me look.",
                                additional_kwargs={"tool_calls": [
                                    {"id": "call_1", "type": "tool_use", "name": "get_weather",
                                     "input": {"city": "Paris"}}]})
    elif tool_calls_where == "pydantic objects":
        assistant = ChatMessage(role=MessageRole.ASSISTANT, content="Let me look.",
                                additional_kwargs={"tool_calls": [_OpenAIToolCall(
                                    id="call_1", function=_OpenAIFunction(
                                        name="get_weather", arguments='{"city": "Paris"}'))]})
    else:  # llama-index-llms-ollama keeps Ollama's form: arguments as an object
        assistant = ChatMessage(role=MessageRole.ASSISTANT, content="Let me look.",
                                additional_kwargs={"tool_calls": [
                                    {"id": "call_1", "function": {
                                        "name": "get_weather", "arguments": {"city": "Paris"}}}]})
    return [
        ChatMessage(role=MessageRole.SYSTEM, content="You answer weather questions."),
        _user("What's the weather in Paris, in Kenya terms?"),
        assistant,
        _tool_result(),
    ]


@pytest.mark.parametrize("where", ["blocks", "openai additional_kwargs", "ollama additional_kwargs",
                                   "anthropic additional_kwargs", "pydantic objects"])
def test_tool_calls_and_results_reach_both_tiers(llm, ollama_server, bedrock_server, where):
    """The assistant's tool call and the tool's result reach the local model and, escalated,
    the cloud, wherever LlamaIndex keeps the call (was: additional_kwargs calls dropped, so
    the cloud got a tool result answering no call)."""
    reply = llm.chat(_tool_conversation(where))
    assert reply.additional_kwargs["routing"]["decision"] == "cloud"
    (body,) = _ollama_chats(ollama_server)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool"]
    assistant, tool = body["messages"][2:]
    assert assistant["content"] == "Let me look."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in assistant["tool_calls"]] \
        == [("get_weather", {"city": "Paris"})]
    assert tool["content"] == "Sunny, 24 C"
    (cloud,) = bedrock_server.requests
    # Without tools bound, ChatBedrockConverse sends a past call and its result as text
    # (Bedrock refuses toolUse blocks without a toolConfig): both are in the request.
    assistant_turn, result_turn = cloud["body"]["messages"][1:]
    assert assistant_turn["role"] == "assistant"
    assert [b["text"] for b in assistant_turn["content"]] == [
        "Let me look.", '[Called get_weather with parameters: {"city": "Paris"}]']
    assert result_turn == {"role": "user", "content": [{"text": "[Tool output: Sunny, 24 C]"}]}


def test_tool_call_both_in_blocks_and_additional_kwargs_is_sent_once(llm, ollama_server):
    assistant = ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=[ToolCallBlock(tool_call_id="call_1", tool_name="get_weather",
                              tool_kwargs={"city": "Paris"})],
        additional_kwargs={"tool_calls": [TOOL_CALL_OPENAI]},
    )
    llm.chat([_user("w?"), assistant, _tool_result()])
    (body,) = _ollama_chats(ollama_server)
    assert len(body["messages"][1]["tool_calls"]) == 1


def test_every_role_is_converted_or_refused(llm, ollama_server):
    """All of LlamaIndex's roles: none is silently dropped or crashes untyped."""
    sent_as = {}
    for role in MessageRole:
        extra = {"tool_call_id": "call_1"} if role in (MessageRole.TOOL,
                                                       MessageRole.FUNCTION) else {}
        messages = [_user("hi"), ChatMessage(role=role, content=f"from {role.value}",
                                             additional_kwargs=extra), _user("France?")]
        try:
            llm.chat(messages)
        except ConfidenceRouterError as error:
            sent_as[role.value] = f"refused: {type(error).__name__}"
            continue
        middle = _ollama_chats(ollama_server)[-1]["messages"][1]
        assert middle["content"] == f"from {role.value}"
        sent_as[role.value] = middle["role"]
    assert sent_as == {
        "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
        "chatbot": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
    }


def test_empty_and_none_turns_next_to_real_ones_are_sent_as_empty(llm, ollama_server):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content=""),
                ChatMessage(role=MessageRole.USER, content=None),
                ChatMessage(role=MessageRole.ASSISTANT, content=None),
                _user("What is the capital of France?")]
    assert llm.chat(messages).message.content == "Paris"
    (body,) = _ollama_chats(ollama_server)
    # ChatOllama leaves out an empty content.
    assert [(m["role"], m.get("content", "")) for m in body["messages"]] == [
        ("system", ""), ("user", ""), ("assistant", ""),
        ("user", "What is the capital of France?")]


def test_earlier_reasoning_in_assistant_turns_is_left_out_as_documented(llm, ollama_server,
                                                                        bedrock_server):
    """A ThinkingBlock is the model's earlier reasoning, not part of the question: it is
    left out (documented in to_langchain_messages), and so never reaches the cloud."""
    messages = [_user("q1"), ChatMessage(role=MessageRole.ASSISTANT, blocks=[
        ThinkingBlock(content="SECRET-REASONING"), TextBlock(text="a1")]), _user(KENYA)]
    reply = llm.chat(messages)
    assert reply.additional_kwargs["routing"]["decision"] == "cloud"
    assert "SECRET-REASONING" not in json.dumps(_ollama_chats(ollama_server))
    assert "SECRET-REASONING" not in json.dumps([r["body"] for r in bedrock_server.requests])
    assert _ollama_chats(ollama_server)[0]["messages"][1] == {"role": "assistant",
                                                              "content": "a1"}


# == 2. the privacy guard through LlamaIndex messages =========================================

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"


def _pii_conversations() -> dict[str, list[ChatMessage]]:
    call = {"id": "call_9", "type": "function",
            "function": {"name": "pay", "arguments": json.dumps({"card": CARD})}}
    return {
        "email in a second text block": [ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="Who was Kenya's second president?"),
            TextBlock(text=f"Reply to {EMAIL}")])],
        "email split across text blocks": [ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text="Kenya question, mail jane.doe@"), TextBlock(text="example.com")])],
        "card in a ToolCallBlock": [
            _user("Pay my Kenya trip"),
            ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(
                tool_call_id="call_9", tool_name="pay", tool_kwargs={"card": CARD})]),
            _tool_result("paid", "call_9"), _user("Kenya: done?")],
        "card in additional_kwargs tool_calls": [
            _user("Pay my Kenya trip"),
            ChatMessage(role=MessageRole.ASSISTANT, content="",
                        additional_kwargs={"tool_calls": [call]}),
            _tool_result("paid", "call_9"), _user("Kenya: done?")],
        "IBAN in a tool result": [
            _user("Kenya account?"),
            ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(
                tool_call_id="call_2", tool_name="account", tool_kwargs={})]),
            _tool_result("DE89 3704 0044 0532 0130 00", "call_2"), _user("Kenya: and?")],
        "SSN in the system message": [
            ChatMessage(role=MessageRole.SYSTEM, content="The user's SSN is 078-05-1120."),
            _user(KENYA)],
        "an image (unreadable)": [ChatMessage(role=MessageRole.USER, blocks=[
            TextBlock(text=KENYA), ImageBlock(image=PNG)])],
    }


async def test_personal_data_in_llamaindex_messages_never_reaches_the_cloud(
    ollama_chat, bedrock_chat, scripted, ollama_server, bedrock_server
):
    router = _router(ollama_chat, bedrock_chat, escalation_guard=PIIGuard())
    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    conversations = _pii_conversations()
    for case, messages in conversations.items():
        for entry in CHAT_ENTRIES:
            responses = await _run(llm, entry, messages)
            routing = responses[-1].additional_kwargs["routing"]
            assert routing["decision"] == "local", (case, entry, routing)
            assert routing["would_escalate"] is True, (case, entry)
            assert routing["escalation_skipped"].startswith("escalation guard"), (case, entry)
            assert responses[-1].message.content == "not sure" or "Kenyatta" in (
                responses[-1].message.content), (case, entry)
    assert bedrock_server.requests == []
    assert len(ollama_server.requests_to("/api/chat")) == len(conversations) * 4


async def test_guard_judges_completions_too(ollama_chat, bedrock_chat, scripted, bedrock_server):
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, escalation_guard=PIIGuard()))
    for entry in COMPLETE_ENTRIES:
        responses = await _run(llm, entry, f"{KENYA} Mail {EMAIL}")
        assert responses[-1].additional_kwargs["routing"]["decision"] == "local"
    assert bedrock_server.requests == []


def test_additional_kwargs_that_are_not_sent_do_not_leak(ollama_chat, bedrock_chat, scripted,
                                                         ollama_server, bedrock_server):
    """Provider extras on a user message are not part of the question: they go to neither
    tier (so nothing in them can reach the cloud), and the question still escalates."""
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, escalation_guard=PIIGuard()))
    message = ChatMessage(role=MessageRole.USER, content=KENYA,
                          additional_kwargs={"name": EMAIL, "metadata": {"card": CARD}})
    reply = llm.chat([message])
    assert reply.additional_kwargs["routing"]["decision"] == "cloud"
    assert len(bedrock_server.requests) == 1
    for sent in (bedrock_server.requests[0]["body"], _ollama_chats(ollama_server)):
        assert EMAIL not in json.dumps(sent) and "4111" not in json.dumps(sent)


# == 3. faults ================================================================================


def _live_threads() -> int:
    """Live threads, not counting the test servers' request handlers."""
    return sum(
        1
        for t in threading.enumerate()
        if getattr(getattr(t, "_target", None), "__name__", "") != "process_request_thread"
    )


def _settles(condition, timeout: float = 3.0) -> bool:
    """Whether ``condition()`` becomes true within ``timeout`` (well under any hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


async def test_hung_local_model_falls_back_to_the_cloud_on_every_entry_point(
    ollama_chat, bedrock_chat, scripted, ollama_backend, bedrock_server
):
    ollama_backend.delay("hang", HANG_S)
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, local_timeout=LOCAL_TIMEOUT))
    baseline = _live_threads()
    tasks_before = len(asyncio.all_tasks())
    entries = ("chat", "stream_chat", "achat", "astream_chat", "complete", "acomplete",
               "stream_complete", "astream_complete")
    for n, entry in enumerate(entries, start=1):
        started = time.monotonic()
        responses = await _run(llm, entry, _arg(entry, [_user("hang please")]))
        assert time.monotonic() - started < NOT_HUNG_S, entry
        final = responses[-1]
        assert _text(entry, final) == "cloud answer", entry
        routing = final.additional_kwargs["routing"]
        assert (routing["decision"], routing["reason"], routing["local_error_kind"]) == (
            "cloud", "local_error", "timeout"), entry
        assert final.raw["routing"] == routing
        assert len(bedrock_server.requests) == n, entry  # exactly one cloud request each
    assert len(asyncio.all_tasks()) == tasks_before
    # The cloud's thread of an async stream ends just after its last chunk.
    for _ in range(150):  # polled on the loop: asyncio.to_thread would add a thread itself
        if _live_threads() <= baseline:
            break
        await asyncio.sleep(0.02)
    assert _live_threads() <= baseline


async def test_hung_local_model_that_may_not_escalate_is_a_typed_error(
    ollama_chat, bedrock_chat, scripted, ollama_backend, bedrock_server
):
    ollama_backend.delay("hang", HANG_S)
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, local_timeout=LOCAL_TIMEOUT))
    for entry in ALL_ENTRIES:
        started = time.monotonic()
        with pytest.raises(LocalModelError) as caught:
            await _run(llm, entry, _arg(entry, [_user("hang please")]), allow_escalation=False)
        assert time.monotonic() - started < NOT_HUNG_S, entry
        routing = caught.value.routing
        assert (routing["local_error_kind"], routing["escalated"]) == ("timeout", False), entry
    assert bedrock_server.requests == []


@pytest.mark.parametrize("entry", ["achat", "astream_chat", "acomplete", "astream_complete"])
async def test_cancelling_an_async_call_stops_the_local_generation(
    ollama_chat, bedrock_chat, ollama_server, bedrock_server, entry
):
    """A LlamaIndex caller that gives up (``asyncio.wait_for``, a cancelled request handler)
    while the local model is still thinking: the model's request is closed at once, nothing
    escalates, no task is left behind."""
    backend = InFlightBackend()
    ollama_server.backend = backend
    backend.delay(None, HANG_S)
    llm = ConfidenceRoutedLlamaIndexLLM(router=_router(ollama_chat, bedrock_chat))
    tasks_before = len(asyncio.all_tasks())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_run(llm, entry, _arg(entry, [_user("slow one")])), 0.5)
    assert backend.started == 1
    for _ in range(100):  # the server notices the hang-up within its 50 ms poll
        if backend.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert backend.in_flight == 0  # not after the 5 s the model would have "thought"
    assert len(asyncio.all_tasks()) == tasks_before
    assert bedrock_server.requests == []


async def test_cloud_failure_is_a_typed_error_with_the_routing_record(
    ollama_chat, bedrock_chat, scripted, bedrock_server
):
    bedrock_server.fail("Kenya", "AccessDeniedException")
    llm = ConfidenceRoutedLlamaIndexLLM(router=_router(ollama_chat, bedrock_chat))
    for n, entry in enumerate(ALL_ENTRIES, start=1):
        with pytest.raises(CloudEscalationError) as caught:
            await _run(llm, entry, _arg(entry, [_user(KENYA)]))
        routing = caught.value.routing
        assert routing["cloud_error_code"] == "AccessDeniedException", entry
        assert (routing["decision"], routing["cloud_attempts"]) == ("cloud", 1), entry
        assert routing["local_answer"] == "Jomo Kenyatta was", entry
        assert caught.value.local_message.text == "Jomo Kenyatta was"
        assert len(bedrock_server.requests) == n, entry
    # on_cloud_error="local" per call: the local answer, flagged, with the record.
    for entry in ALL_ENTRIES:
        responses = await _run(llm, entry, _arg(entry, [_user(KENYA)]), on_cloud_error="local")
        routing = responses[-1].additional_kwargs["routing"]
        assert _text(entry, responses[-1]) == "Jomo Kenyatta was", entry
        assert (routing["decision"], routing["reason"], routing["flagged"]) == (
            "local", "cloud_error", True), entry
    assert len(bedrock_server.requests) == 2 * len(ALL_ENTRIES)


async def test_hung_cloud_is_a_typed_error_in_bounded_time(ollama_chat, bedrock_chat, scripted,
                                                           bedrock_server):
    bedrock_server.delay("Kenya", HANG_S)
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, cloud_timeout=0.5, cloud_retry=None))
    baseline = _live_threads()
    for n, entry in enumerate(ALL_ENTRIES, start=1):
        started = time.monotonic()
        with pytest.raises(CloudEscalationError) as caught:
            await _run(llm, entry, _arg(entry, [_user(KENYA)]))
        assert time.monotonic() - started < NOT_HUNG_S, entry
        routing = caught.value.routing
        assert (routing["cloud_error_kind"], routing["cloud_attempts"]) == ("timeout", 1), (
            entry, routing)
        assert caught.value.local_message.text == "Jomo Kenyatta was"
        assert len(bedrock_server.requests) == n, entry
    for _ in range(150):  # the Bedrock clients' own read timeouts end their threads
        if _live_threads() <= baseline:
            break
        await asyncio.sleep(0.02)
    assert _live_threads() <= baseline


async def test_cloud_stream_failing_midway_is_typed_with_the_record(
    ollama_chat, bedrock_chat, scripted, bedrock_server
):
    bedrock_server.add_answer("Kenya", "Daniel arap Moi was the second", times=None)
    bedrock_server.fail("Kenya", "ThrottlingException", after_pieces=2)
    llm = ConfidenceRoutedLlamaIndexLLM(router=_router(ollama_chat, bedrock_chat))
    for entry in ("stream_chat", "astream_chat"):
        deltas: list[str] = []
        with pytest.raises(CloudEscalationError) as caught:
            result = await _call_only(llm, entry, [_user(KENYA)])
            if hasattr(result, "__aiter__"):
                async for response in result:
                    deltas.append(response.delta)
            else:
                for response in result:
                    deltas.append(response.delta)
        assert "".join(deltas) == "Daniel arap", entry  # two pieces, no local text
        assert caught.value.routing["decision"] == "cloud", entry
    assert len(bedrock_server.requests) == 2  # no retry once text was out


async def test_exhausted_budget_through_llamaindex(ollama_chat, bedrock_chat, scripted,
                                                   bedrock_server):
    """``on_budget_exceeded`` per call: the local answer flagged (default) or the typed error
    with the record; either way nothing is sent to the cloud."""
    llm = ConfidenceRoutedLlamaIndexLLM(
        router=_router(ollama_chat, bedrock_chat, budget=CloudBudget(max_usd=1e-9)))
    for entry in ALL_ENTRIES:
        responses = await _run(llm, entry, _arg(entry, [_user(KENYA)]))
        routing = responses[-1].additional_kwargs["routing"]
        assert _text(entry, responses[-1]) == "Jomo Kenyatta was", entry
        assert (routing["decision"], routing["reason"], routing["flagged"]) == (
            "local", "budget_exceeded", True), entry
        with pytest.raises(BudgetExceededError) as caught:
            await _run(llm, entry, _arg(entry, [_user(KENYA)]), on_budget_exceeded="raise")
        assert caught.value.routing["reason"] == "budget_exceeded", entry
    assert bedrock_server.requests == []


class _CountingHandler(_BedrockHandler):
    def _write_chunk(self, data: bytes) -> None:
        super()._write_chunk(data)
        owner = self.owner
        with owner.count_lock:
            owner.chunks_written += 1


class CountingBedrockServer(FakeBedrockServer):
    """The fake Bedrock, counting the stream events it actually wrote to a client."""

    _handler_class = _CountingHandler

    def __init__(self) -> None:
        super().__init__()
        self.count_lock = threading.Lock()
        self.chunks_written = 0


@pytest.fixture(scope="module")
def counting_bedrock():
    with CountingBedrockServer() as server:
        yield server


N_PIECES = 40


@pytest.fixture
def slow_cloud(counting_bedrock, bedrock_chat, ollama_chat, ollama_backend):
    counting_bedrock.reset()
    counting_bedrock.chunks_written = 0
    counting_bedrock.add_answer(None, [f" w{i}" for i in range(N_PIECES)], piece_delay=0.05)
    ollama_backend.set_default("unsure", logprobs=-3.0)
    cloud = bedrock_chat(endpoint_url=counting_bedrock.url, max_tokens=50)
    router = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud)
    return ConfidenceRoutedLlamaIndexLLM(router=router)


def _settled(read, timeout: float = 3.0) -> int:
    """``read()`` once it stops changing (checked every 0.2 s, for at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


@pytest.mark.parametrize("entry", ["stream_chat", "stream_complete"])
def test_breaking_out_of_a_stream_closes_the_cloud_stream(slow_cloud, counting_bedrock, entry):
    baseline = _live_threads()
    for n, response in enumerate(getattr(slow_cloud, entry)(_arg(entry, [_user("q")]))):
        if n == 1:
            assert response.delta == " w1"
            break
    written = _settled(lambda: counting_bedrock.chunks_written)
    # 40 pieces take 2 s to send; the server stopped after a few more writes.
    assert written < N_PIECES // 2, written
    assert len(counting_bedrock.requests) == 1
    assert _settles(lambda: _live_threads() <= baseline)


@pytest.mark.parametrize("entry", ["astream_chat", "astream_complete"])
async def test_breaking_out_of_an_async_stream_closes_the_cloud_stream(
    slow_cloud, counting_bedrock, entry
):
    tasks_before = len(asyncio.all_tasks())
    stream = await getattr(slow_cloud, entry)(_arg(entry, [_user("q")]))
    n = 0
    async for response in stream:
        if n == 1:
            assert response.delta == " w1"
            break
        n += 1
    del stream, response
    # An abandoned async generator is closed by the event loop's finaliser: give it turns.
    for _ in range(20):
        await asyncio.sleep(0.05)
    written = await asyncio.to_thread(_settled, lambda: counting_bedrock.chunks_written)
    assert written < N_PIECES // 2, written
    assert len(counting_bedrock.requests) == 1
    assert len(asyncio.all_tasks()) == tasks_before


async def test_aclose_of_an_async_stream_closes_the_cloud_stream(slow_cloud, counting_bedrock):
    """``await stream.aclose()`` (what ``async with aclosing(...)`` does) while the stream is
    still referenced closes the tier's stream too."""
    stream = await slow_cloud.astream_chat([_user("q")])
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    written = await asyncio.to_thread(_settled, lambda: counting_bedrock.chunks_written)
    assert written < N_PIECES // 2, written


# == 4. concurrency ===========================================================================


def _check_answers(questions: list[str], responses: list[Any], entry: str = "chat") -> None:
    for question, response in zip(questions, responses, strict=True):
        routing = response.additional_kwargs["routing"]
        if "France" in question:
            assert (_text(entry, response), routing["decision"]) == ("Paris", "local")
        else:
            assert (_text(entry, response), routing["decision"]) == ("Daniel arap Moi", "cloud")
        assert routing["threshold"] == 0.7


async def test_concurrent_achat_and_astream_chat(llm, ollama_server, bedrock_server):
    questions = [FRANCE if i % 2 else f"{KENYA} #{i}" for i in range(24)]
    responses = await asyncio.gather(*(llm.achat([_user(q)]) for q in questions))
    _check_answers(questions, responses)
    assert len(ollama_server.requests_to("/api/chat")) == 24
    assert len(bedrock_server.requests) == 12

    async def streamed(question: str) -> Any:
        return [r async for r in await llm.astream_chat([_user(question)])][-1]

    finals = await asyncio.gather(*(streamed(q) for q in questions))
    _check_answers(questions, finals)
    assert len(ollama_server.requests_to("/api/chat")) == 48
    assert len(bedrock_server.requests) == 24


def test_threaded_chat_and_complete(llm, ollama_server, bedrock_server):
    questions = [FRANCE if i % 2 else f"{KENYA} #{i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        chats = list(pool.map(lambda q: llm.chat([_user(q)]), questions))
        completions = list(pool.map(llm.complete, questions))
        streams = list(pool.map(lambda q: list(llm.stream_chat([_user(q)]))[-1], questions))
    _check_answers(questions, chats)
    _check_answers(questions, completions, "complete")
    _check_answers(questions, streams)
    assert len(ollama_server.requests_to("/api/chat")) == 72
    assert len(bedrock_server.requests) == 36


async def test_concurrent_calls_with_different_knobs_do_not_mix(llm, bedrock_server):
    """Per-call knobs belong to their call, also when calls overlap."""
    thresholds = [0.0, 1.0] * 12
    responses = await asyncio.gather(
        *(llm.achat([_user(FRANCE)], threshold=t) for t in thresholds))
    for threshold, response in zip(thresholds, responses, strict=True):
        routing = response.additional_kwargs["routing"]
        assert routing["threshold"] == threshold
        assert routing["decision"] == ("cloud" if threshold == 1.0 else "local")
    assert len(bedrock_server.requests) == 12


# == 5. configuration =========================================================================


async def test_knobs_as_call_kwargs_work_on_every_entry_point(llm, ollama_server,
                                                              bedrock_server):
    for entry in ALL_ENTRIES:
        strict = await _run(llm, entry, _arg(entry, [_user(FRANCE)]), threshold=1.0)
        assert _text(entry, strict[-1]) == "Paris (cloud)", entry
        assert strict[-1].additional_kwargs["routing"]["policy"]["threshold"] == 1.0
        kept = await _run(llm, entry, _arg(entry, [_user(KENYA)]), allow_escalation=False)
        routing = kept[-1].additional_kwargs["routing"]
        assert _text(entry, kept[-1]) == "Jomo Kenyatta was", entry
        assert (routing["decision"], routing["would_escalate"], routing["flagged"]) == (
            "local", True, True), entry
        lenient = await _run(llm, entry, _arg(entry, [_user(KENYA)]), threshold=0.0,
                             signal="min_logprob")
        assert lenient[-1].additional_kwargs["routing"]["signal"] == "min_logprob"
        assert lenient[-1].additional_kwargs["routing"]["decision"] == "local", entry
    assert len(bedrock_server.requests) == len(ALL_ENTRIES)
    assert len(ollama_server.requests_to("/api/chat")) == 3 * len(ALL_ENTRIES)


BAD_KWARGS = [
    ({"threshhold": 0.9}, "did you mean 'threshold'"),
    ({"allow_escalaton": False}, "allow_escalation"),
    ({"on_cloud_eror": "local"}, "on_cloud_error"),
    ({"local_timeout": 1.0}, "local_timeout"),   # construction-only
    ({"escalation_guard": PIIGuard()}, "escalation_guard"),  # construction-only
    ({"threshold": True}, "threshold"),
    ({"early_exit": "yes"}, "early_exit"),
]


async def test_misspelt_or_construction_only_knobs_fail_before_any_request(
    llm, ollama_server, bedrock_server
):
    for kwargs, needle in BAD_KWARGS:
        for entry in ALL_ENTRIES:
            with pytest.raises(RoutingConfigError, match=needle):
                await _call_only(llm, entry, _arg(entry, [_user(FRANCE)]), **kwargs)
                pytest.fail(f"{kwargs}: {entry} raised nothing")
    _nothing_sent(ollama_server, bedrock_server)


def test_knobs_through_chat_with_tools_and_predict_and_call(llm, ollama_backend, ollama_server,
                                                            bedrock_server):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    tool = FunctionTool.from_defaults(get_weather)
    with pytest.raises(RoutingConfigError, match="did you mean 'threshold'"):
        llm.chat_with_tools([tool], user_msg="Weather in Paris?", threshhold=1.0)
    with pytest.raises(RoutingConfigError, match="did you mean 'threshold'"):
        llm.predict_and_call([tool], user_msg="Weather in Paris?", threshhold=1.0)
    _nothing_sent(ollama_server, bedrock_server)
    ollama_backend.add_answer("Weather in Paris", "It is sunny.", logprobs=-0.05)
    response = llm.chat_with_tools([tool], user_msg="Weather in Paris?", threshold=1.0)
    assert response.additional_kwargs["routing"]["policy"]["threshold"] == 1.0
    assert response.additional_kwargs["routing"]["decision"] == "cloud"
    assert bedrock_server.requests[-1]["body"]["toolConfig"]["tools"][0]["toolSpec"]["name"] == (
        "get_weather")


async def test_routing_record_on_every_path(llm):
    for entry in ALL_ENTRIES:
        for question, decision in ((FRANCE, "local"), (KENYA, "cloud")):
            responses = await _run(llm, entry, _arg(entry, [_user(question)]))
            final = responses[-1]
            routing = final.additional_kwargs["routing"]
            assert routing["decision"] == decision, (entry, question)
            assert final.raw["routing"] == routing, entry
            assert json.loads(json.dumps(routing))["decision"] == decision  # plain data
            if len(responses) > 1:  # streams: the record on the last response only
                assert final.delta == ""
                assert all("routing" not in r.additional_kwargs for r in responses[:-1])


async def test_messages_that_are_not_chat_messages_are_typed_errors(llm, ollama_server,
                                                                   bedrock_server):
    # Only a list of dicts gets here: LlamaIndex's callback wrapper refuses other non-messages
    # (a str, None, [..., "hi"]) with pydantic's ValidationError before the adapter runs.
    for messages in ([{"role": "user", "content": "hi"}], [_user("hi"), {"role": "user"}]):
        for entry in CHAT_ENTRIES:
            with pytest.raises(InvalidTypeError):
                await _call_only(llm, entry, messages)
                pytest.fail(f"{messages!r}: {entry} raised nothing")
    _nothing_sent(ollama_server, bedrock_server)
