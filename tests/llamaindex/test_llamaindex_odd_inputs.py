"""ConfidenceRoutedLlamaIndexLLM attacked with odd inputs, kwargs and fields on all eight entry
points: every mistake is a typed ConfidenceRouterError raised at the call (streams too, not at
the first ``next()``) with nothing sent; odd but valid shapes (images, prefill, system only)
are answered. Counts what the test bed received."""

from __future__ import annotations

import base64
import json

import pytest
from langchain_ollama import ChatOllama
from llama_index.core.base.llms.types import AudioBlock, ImageBlock, TextBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import InvalidInputError, InvalidTypeError, RoutingConfigError
from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
HI = [ChatMessage(role=MessageRole.USER, content="hi")]


@pytest.fixture
def router(ollama_server, bedrock_chat):
    local = ChatOllama(model="scripted-local", base_url=ollama_server.url, temperature=0)
    return ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(max_tokens=50))


@pytest.fixture
def llm(router, ollama_backend, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)
    bedrock_server.set_default("cloud answer")
    return ConfidenceRoutedLlamaIndexLLM(router=router)


def _nothing_sent(ollama_server, bedrock_server):
    assert ollama_server.requests_to("/api/chat") == [] and bedrock_server.requests == []


def _chat_calls(llm, messages, **kwargs):
    """The four chat entry points, each returning what the call itself returned (a stream is
    not iterated: a mistake must surface at the call)."""
    return {
        "chat": lambda: llm.chat(messages, **kwargs),
        "stream_chat": lambda: llm.stream_chat(messages, **kwargs),
        "achat": lambda: llm.achat(messages, **kwargs),
        "astream_chat": lambda: llm.astream_chat(messages, **kwargs),
    }


def _complete_calls(llm, prompt, **kwargs):
    return {
        "complete": lambda: llm.complete(prompt, **kwargs),
        "stream_complete": lambda: llm.stream_complete(prompt, **kwargs),
        "acomplete": lambda: llm.acomplete(prompt, **kwargs),
        "astream_complete": lambda: llm.astream_complete(prompt, **kwargs),
    }


async def _call(make):
    result = make()
    if hasattr(result, "__await__"):
        result = await result
    return result


BAD_CHATS = {
    "no messages": ([], {}, InvalidInputError, "no messages"),
    "only whitespace": ([ChatMessage(role=MessageRole.USER, content=" \n ")], {},
                        InvalidInputError, "empty or whitespace"),
    "content None": ([ChatMessage(role=MessageRole.USER, content=None)], {},
                     InvalidInputError, "empty or whitespace"),
    "misspelt knob": (HI, {"threshhold": 0.9}, RoutingConfigError, "did you mean 'threshold'"),
    "unknown kwarg": (HI, {"temperature": 0.2}, RoutingConfigError, "temperature"),
    "threshold out of range": (HI, {"threshold": 1.5}, RoutingConfigError, "threshold"),
    "threshold nan": (HI, {"threshold": float("nan")}, RoutingConfigError, "threshold"),
    "allow_escalation as a string": (HI, {"allow_escalation": "no"}, RoutingConfigError,
                                     "allow_escalation"),
    # was a plain ValueError
    "tool result without an id": (
        [*HI, ChatMessage(role=MessageRole.TOOL, content="sunny")], {}, InvalidInputError,
        "tool_call_id"),
    "audio block": ([ChatMessage(role=MessageRole.USER,
                                 blocks=[TextBlock(text="listen"), AudioBlock(audio=b"RIFF0000")])],
                    {}, InvalidInputError, "AudioBlock"),
    "image given by URL only": ([ChatMessage(role=MessageRole.USER,
                                             blocks=[ImageBlock(url="http://example.invalid/a.png")])],
                                {}, InvalidInputError, "url"),
}


async def test_bad_chat_input_is_a_typed_error_at_the_call(llm, ollama_server, bedrock_server):
    # One test over all cases: building the router's Bedrock client dominates a test's time.
    for case, (messages, kwargs, error, needle) in BAD_CHATS.items():
        for name, make in _chat_calls(llm, messages, **kwargs).items():
            with pytest.raises(error, match=needle):
                await _call(make)
                pytest.fail(f"{case}: {name} raised nothing")
    _nothing_sent(ollama_server, bedrock_server)


BAD_COMPLETIONS = {
    "empty prompt": ("", {}, InvalidInputError),
    "whitespace prompt": ("\t ", {}, InvalidInputError),
    "None prompt": (None, {}, InvalidTypeError),            # was a pydantic ValidationError
    "int prompt": (5, {}, InvalidTypeError),
    "misspelt knob": ("hi", {"allow_escalaton": False}, RoutingConfigError),
    "bad signal": ("hi", {"signal": "vibes"}, RoutingConfigError),
}


async def test_bad_completion_input_is_a_typed_error_at_the_call(llm, ollama_server,
                                                                 bedrock_server):
    for case, (prompt, kwargs, error) in BAD_COMPLETIONS.items():
        for name, make in _complete_calls(llm, prompt, **kwargs).items():
            with pytest.raises(error):
                await _call(make)
                pytest.fail(f"{case}: {name} raised nothing")
    _nothing_sent(ollama_server, bedrock_server)


def test_unknown_constructor_field_is_an_error_not_ignored(router):
    # LlamaIndex LLMs ignore unknown fields: this used to route at the default 0.7.
    with pytest.raises(RoutingConfigError, match="router_kwargs"):
        ConfidenceRoutedLlamaIndexLLM(router=router, threshold=0.9)
    with pytest.raises(RoutingConfigError, match="did you mean 'router_kwargs'"):
        ConfidenceRoutedLlamaIndexLLM(router=router, router_kwarg={"threshold": 0.9})


def test_misspelt_router_kwargs_fail_at_construction(router, ollama_server):
    # Used to be accepted, then fail at every call.
    with pytest.raises(RoutingConfigError, match="did you mean 'threshold'"):
        ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"threshhold": 0.9})
    assert ollama_server.requests == []


async def test_image_blocks_reach_both_tiers(router, ollama_backend, ollama_server,
                                             bedrock_server, tmp_path):
    """Images used to be refused ("sends text only"); both tiers take them."""
    ollama_backend.set_default("a red dot", logprobs=-2.5)   # unsure: escalates
    bedrock_server.set_default("a single pixel")
    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    path = tmp_path / "dot.png"
    path.write_bytes(PNG)
    for image in (ImageBlock(image=PNG), ImageBlock(path=path, image_mimetype="image/png")):
        messages = [ChatMessage(role=MessageRole.USER,
                                blocks=[TextBlock(text="What is this?"), image])]
        reply = await llm.achat(messages)
        assert reply.message.content == "a single pixel"
        assert reply.additional_kwargs["routing"]["decision"] == "cloud"
        sent = ollama_server.requests_to("/api/chat")[-1]["body"]["messages"][-1]
        assert base64.b64decode(sent["images"][0]) == PNG
        assert "What is this?" in sent["content"]
        cloud_blocks = bedrock_server.requests[-1]["body"]["messages"][-1]["content"]
        assert [b["image"]["format"] for b in cloud_blocks if "image" in b] == ["png"]
    assert len(bedrock_server.requests) == 2


def test_odd_but_valid_conversations_are_answered(llm, ollama_server, bedrock_server):
    shapes = [
        [ChatMessage(role=MessageRole.SYSTEM, content="Say hi.")],                 # system only
        [ChatMessage(role=MessageRole.SYSTEM, content="a"),
         ChatMessage(role=MessageRole.DEVELOPER, content="b"), *HI],              # two systems
        [*HI, ChatMessage(role=MessageRole.ASSISTANT, content="Hello, I")],       # prefill
        [ChatMessage(role=MessageRole.USER, content=""),
         ChatMessage(role=MessageRole.ASSISTANT, content=None), *HI],             # empty turns
        [ChatMessage(role=MessageRole.USER, content=[TextBlock(text="a"), TextBlock(text="b")])],
    ]
    for messages in shapes:
        assert llm.chat(messages).message.content == "Paris"
        assert [r.delta for r in llm.stream_chat(messages)][-1] == ""
    assert len(ollama_server.requests_to("/api/chat")) == 2 * len(shapes)
    assert bedrock_server.requests == []


def test_knobs_and_tier_kwargs_in_router_kwargs_and_per_call(router, ollama_backend,
                                                             ollama_server, bedrock_server):
    ollama_backend.set_default("Paris", logprobs=-0.05)
    bedrock_server.set_default("cloud answer")
    strict = ConfidenceRoutedLlamaIndexLLM(router=router,
                                           router_kwargs={"threshold": 1.0, "stop": ["\n"]})
    reply = strict.complete("hi")
    assert reply.text == "cloud answer"
    assert reply.additional_kwargs["routing"]["policy"]["threshold"] == 1.0
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["options"]["stop"] == ["\n"]
    # A call's knob wins over router_kwargs; config= is the LangChain RunnableConfig.
    reply = strict.complete("hi", threshold=0.5, config={"tags": ["t"]})
    assert reply.text == "Paris"
    assert json.loads(json.dumps(reply.additional_kwargs["routing"]["policy"]))["threshold"] == 0.5


def test_bad_tools_and_tool_choices_are_typed_errors_before_any_request(llm, ollama_server,
                                                                        bedrock_server):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    tool = FunctionTool.from_defaults(get_weather)
    with pytest.raises(InvalidTypeError, match="LlamaIndex tool"):   # was a plain TypeError
        llm.chat_with_tools([5], user_msg="weather in Paris?")
    with pytest.raises(InvalidTypeError, match="LlamaIndex tool"):
        llm.chat(HI, tools=["get_weather"])
    # A tool the call does not offer: the local tier ignored the choice and answered.
    with pytest.raises(RoutingConfigError, match="not one of the tools"):
        llm.chat_with_tools([tool], user_msg="weather in Paris?", tool_choice="get_wether")
    with pytest.raises(InvalidInputError):
        llm.chat_with_tools([tool], user_msg="   ")
    with pytest.raises(InvalidInputError):
        llm.predict_and_call([tool], user_msg="")
    _nothing_sent(ollama_server, bedrock_server)
    # A named choice that is one of the tools goes through.
    llm.chat_with_tools([tool], user_msg="weather in Paris?", tool_choice="get_weather")
    assert ollama_server.requests_to("/api/chat")[-1]["body"]["tools"][0]["function"]["name"] == (
        "get_weather")
