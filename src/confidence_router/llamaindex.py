"""``ConfidenceRoutedLlamaIndexLLM``: the confidence router as a native LlamaIndex ``LLM``.

It wraps a :class:`~confidence_router.router.ConfidenceRoutedLLM` (the LangChain router) and
implements LlamaIndex's eight entry points (``chat`` / ``complete``, sync / async, plain /
streaming) on top of ``router.invoke`` / ``ainvoke`` / ``stream`` / ``astream``. Unlike
LlamaIndex's generic ``LangChainLLM`` adapter it keeps the routing decision (every response
carries ``raw["routing"]`` and ``additional_kwargs["routing"]``), its async methods are really
async, and its metadata describes the local model the query is first answered by.

Import it explicitly (``import confidence_router`` does not load LlamaIndex)::

    from langchain_aws import ChatBedrockConverse
    from langchain_ollama import ChatOllama
    from llama_index.core import Settings, VectorStoreIndex

    from confidence_router import ConfidenceRoutedLLM
    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

    router = ConfidenceRoutedLLM(
        local=ChatOllama(model="qwen2.5:7b"),
        cloud=ChatBedrockConverse(model="us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    )
    Settings.llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    answer = VectorStoreIndex.from_documents(docs).as_query_engine().query("...")

Do not assign the LangChain router itself to ``Settings.llm``: LlamaIndex then wraps it in
``LangChainLLM``, which needs extra packages and drops the routing decision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.ai import add_ai_message_chunks

from confidence_router._extras import require_extra

# One clear error naming the extra, instead of a bare ModuleNotFoundError from the line below.
require_extra("llamaindex", "ConfidenceRoutedLlamaIndexLLM (confidence_router.llamaindex)")

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import Field, model_validator

from confidence_router._tiers import model_name as _model_name
from confidence_router.policy import RoutingPolicy
from confidence_router.router import ConfidenceRoutedLLM

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_NUM_OUTPUT",
    "ConfidenceRoutedLlamaIndexLLM",
    "to_langchain_messages",
    "to_llamaindex_message",
]

#: Context window reported when neither ``context_window`` nor the local model's ``num_ctx`` is
#: set: Ollama's default context length on machines with < 24 GiB of VRAM (4k tokens).
DEFAULT_CONTEXT_WINDOW = 4096
#: Output budget reported when neither ``num_output`` nor the local model's ``num_predict`` is
#: set (LlamaIndex's own default; prompt packing reserves this many tokens for the answer).
DEFAULT_NUM_OUTPUT = 256

_SYSTEM_ROLES = (MessageRole.SYSTEM, MessageRole.DEVELOPER)
_USER_ROLES = (MessageRole.USER,)
# CHATBOT (Cohere) and MODEL (Gemini) are other providers' names for the assistant.
_ASSISTANT_ROLES = (MessageRole.ASSISTANT, MessageRole.CHATBOT, MessageRole.MODEL)
# FUNCTION is LlamaIndex's legacy name for a tool result; both become a ToolMessage.
_TOOL_ROLES = (MessageRole.TOOL, MessageRole.FUNCTION)


class ConfidenceRoutedLlamaIndexLLM(LLM):
    """A LlamaIndex ``LLM`` that answers locally and escalates to the cloud when the local
    answer's confidence is below the threshold (a :class:`ConfidenceRoutedLLM` underneath).

    Every response carries the routing decision: ``response.raw`` is the LangChain
    ``response_metadata`` of the returned message (including ``"routing"``) and
    ``response.additional_kwargs["routing"]`` is the routing record. Streams buffer the local
    answer until the decision, so an escalated stream contains only cloud text; the decision
    is on the **last** yielded response (its ``delta`` is ``""``).

    Per-call knobs go in the call's kwargs and are validated before anything is sent
    (:class:`~confidence_router.errors.RoutingConfigError` on a bad value): ``threshold``,
    ``signal``, ``on_unknown``, ``on_cloud_error``, ``precheck_threshold``,
    ``allow_escalation``. ``config=`` is passed on as the LangChain ``RunnableConfig``
    (callbacks, tags); any other kwarg goes to both tiers (e.g. ``stop``).

    Example:
        .. code-block:: python

            from llama_index.core.llms import ChatMessage
            from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

            llm = ConfidenceRoutedLlamaIndexLLM(router=router)  # router: ConfidenceRoutedLLM
            response = llm.chat([ChatMessage(role="user", content="Capital of France?")])
            response.additional_kwargs["routing"]["decision"]  # "local" or "cloud"
            llm.complete("Capital of France?", threshold=0.9)  # stricter, for this call only

            for part in llm.stream_chat(messages):
                print(part.delta, end="")
            part.additional_kwargs["routing"]  # on the last response only

            strict = ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"threshold": 0.9})

    Args / fields:
        router: the LangChain router doing the work.
        router_kwargs: kwargs sent with every call (knobs or tier kwargs); call kwargs win.
        context_window: tokens the model sees per call; default: the local model's
            ``num_ctx`` if set, else :data:`DEFAULT_CONTEXT_WINDOW`. Every query is answered
            by the local model first, so its window is the one that must fit the prompt.
        num_output: tokens reserved for the answer; default: the local model's
            ``num_predict`` if set, else :data:`DEFAULT_NUM_OUTPUT`.
    """

    # Excluded from serialisation: dumping it would include the tiers' HTTP clients and cloud
    # credentials, and LlamaIndex serialises LLMs into traces and stored settings.
    router: ConfidenceRoutedLLM = Field(
        exclude=True, description="The LangChain ConfidenceRoutedLLM that routes each call."
    )
    router_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Kwargs sent with every call (routing knobs or tier kwargs); call kwargs win.",
    )
    context_window: int | None = Field(
        default=None, gt=0, description="Context window; default: the local model's num_ctx."
    )
    num_output: int | None = Field(
        default=None, gt=0, description="Answer token budget; default: local num_predict."
    )

    @model_validator(mode="after")
    def _check_router_kwargs(self) -> ConfidenceRoutedLlamaIndexLLM:
        # Bad defaults fail at construction, not at the first query.
        self._policy(self.router_kwargs)
        return self

    @classmethod
    def from_settings(
        cls,
        path: str | None = None,
        *,
        environ: dict[str, str] | None = None,
        **fields: Any,
    ) -> ConfidenceRoutedLlamaIndexLLM:
        """Build the router from a settings file / environment and wrap it.

        ``fields`` are this class's fields (``router_kwargs``, ``context_window``, ...).

        Example: ``ConfidenceRoutedLlamaIndexLLM.from_settings("router.toml")``
        """
        return cls(router=ConfidenceRoutedLLM.from_settings(path, environ=environ), **fields)

    @classmethod
    def class_name(cls) -> str:
        return "ConfidenceRoutedLlamaIndexLLM"

    # -- metadata -----------------------------------------------------------------------------

    @property
    def metadata(self) -> LLMMetadata:
        """Chat-model metadata sized for the local tier (see ``context_window``)."""
        cloud = self.router.cloud
        return LLMMetadata(
            context_window=self.context_window
            or _local_option(self.router, "num_ctx")
            or DEFAULT_CONTEXT_WINDOW,
            num_output=self.num_output
            or _local_option(self.router, "num_predict")
            or DEFAULT_NUM_OUTPUT,
            is_chat_model=True,
            # LlamaIndex tool calling needs a FunctionCallingLLM; not offered here.
            is_function_calling_model=False,
            model_name=(
                f"confidence-router(local={_model_name(self.router.local)}, "
                f"cloud={_model_name(cloud) if cloud is not None else 'none'})"
            ),
            system_role=MessageRole.SYSTEM,
        )

    def to_payload(self) -> dict[str, Any]:
        """Observability payload: the metadata plus the default routing policy (no secrets)."""
        policy = self._policy(self.router_kwargs)
        return {**super().to_payload(), "routing_policy": dict(policy.__dict__)}

    # -- chat ---------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation; ``kwargs``: routing knobs (``threshold=0.9``) or tier kwargs.

        Example: ``llm.chat([ChatMessage(role="user", content="Hi")]).raw["routing"]``
        """
        call = self._call_kwargs(kwargs)
        return _chat_response(self.router.invoke(to_langchain_messages(messages), **call))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat` (``router.ainvoke``; does not block the event loop)."""
        call = self._call_kwargs(kwargs)
        message = await self.router.ainvoke(to_langchain_messages(messages), **call)
        return _chat_response(message)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer: one response per router chunk, then a final one with the routing.

        Example:
            .. code-block:: python

                for part in llm.stream_chat(messages):
                    print(part.delta, end="")
                part.additional_kwargs["routing"]["decision"]
        """
        # Convert and validate now, so bad input raises here and not at the first next().
        lc_messages = to_langchain_messages(messages)
        call = self._call_kwargs(kwargs)

        def gen() -> ChatResponseGen:
            stream = _Stream()
            for chunk in self.router.stream(lc_messages, **call):
                if stream.add(chunk):
                    yield stream.chat_delta(chunk)
            yield stream.chat_final()

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat` (``router.astream``)."""
        lc_messages = to_langchain_messages(messages)
        call = self._call_kwargs(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            stream = _Stream()
            async for chunk in self.router.astream(lc_messages, **call):
                if stream.add(chunk):
                    yield stream.chat_delta(chunk)
            yield stream.chat_final()

        return gen()

    # -- complete -----------------------------------------------------------------------------
    # A chat model completes a prompt by sending it as one user message. ``formatted`` only
    # matters for text-completion models (it skips ``completion_to_prompt``), so it is ignored.

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete a prompt (sent as one user message); ``kwargs`` as for :meth:`chat`.

        Example: ``llm.complete("Capital of France?", threshold=0.9).additional_kwargs["routing"]``
        """
        call = self._call_kwargs(kwargs)
        return _completion_response(self.router.invoke([HumanMessage(content=prompt)], **call))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async :meth:`complete` (``router.ainvoke``)."""
        call = self._call_kwargs(kwargs)
        message = await self.router.ainvoke([HumanMessage(content=prompt)], **call)
        return _completion_response(message)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream a completion; the last response has ``delta == ""`` and the routing."""
        call = self._call_kwargs(kwargs)

        def gen() -> CompletionResponseGen:
            stream = _Stream()
            for chunk in self.router.stream([HumanMessage(content=prompt)], **call):
                if stream.add(chunk):
                    yield stream.completion_delta(chunk)
            yield stream.completion_final()

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """Async :meth:`stream_complete` (``router.astream``)."""
        call = self._call_kwargs(kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            stream = _Stream()
            async for chunk in self.router.astream([HumanMessage(content=prompt)], **call):
                if stream.add(chunk):
                    yield stream.completion_delta(chunk)
            yield stream.completion_final()

        return gen()

    # -- helpers ------------------------------------------------------------------------------

    def _policy(self, kwargs: dict[str, Any]) -> RoutingPolicy:
        """The router's policy with the knobs in ``kwargs`` applied (raises RoutingConfigError).

        The router validates again when it runs; doing it here too makes streaming calls fail
        at the call, not at the first ``next()``.
        """
        knobs = RoutingPolicy.knob_names()
        base = RoutingPolicy(**{name: getattr(self.router, name) for name in knobs})
        return base.with_overrides({k: v for k, v in kwargs.items() if k in knobs})

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.router_kwargs, **kwargs}
        self._policy(merged)
        return merged


# -- message conversion ------------------------------------------------------------------------


def to_langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    """Convert LlamaIndex chat messages to LangChain messages (text, tool calls, tool results).

    Roles: system/developer -> ``SystemMessage``; user -> ``HumanMessage``; assistant (also
    chatbot/model) -> ``AIMessage`` (``ToolCallBlock`` blocks become ``tool_calls``);
    tool/function -> ``ToolMessage`` (needs ``additional_kwargs["tool_call_id"]``).
    Text blocks are joined with newlines, as ``ChatMessage.content`` does.

    Raises:
        ValueError: a non-text block (image, audio, document, ...) or a tool result without a
            ``tool_call_id``: dropping them silently would change the question.
        TypeError: a tool call whose arguments are not a JSON object.
    """
    return [_to_langchain(message) for message in messages]


def _to_langchain(message: ChatMessage) -> BaseMessage:
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolCallBlock) and message.role in _ASSISTANT_ROLES:
            tool_calls.append(_tool_call(block))
        elif isinstance(block, (ThinkingBlock, CachePoint)):
            # Earlier reasoning and provider cache hints are not part of what is asked.
            continue
        else:
            raise ValueError(
                f"ConfidenceRoutedLlamaIndexLLM sends text only; a {message.role.value} message "
                f"has a {type(block).__name__}"
            )
    text = "\n".join(texts)
    role = message.role
    if role in _SYSTEM_ROLES:
        return SystemMessage(content=text)
    if role in _USER_ROLES:
        return HumanMessage(content=text)
    if role in _ASSISTANT_ROLES:
        return AIMessage(content=text, tool_calls=tool_calls)
    if role in _TOOL_ROLES:
        tool_call_id = message.additional_kwargs.get("tool_call_id")
        if not tool_call_id:
            raise ValueError(
                f"a {role.value} message needs additional_kwargs['tool_call_id'] (the id of "
                "the tool call it answers)"
            )
        name = message.additional_kwargs.get("name")
        return ToolMessage(content=text, tool_call_id=str(tool_call_id), name=name)
    raise ValueError(f"unsupported message role {role.value!r}")


def _tool_call(block: ToolCallBlock) -> ToolCall:
    args = block.tool_kwargs
    if isinstance(args, str):
        # LlamaIndex keeps un-parsed (streamed) arguments as a JSON string.
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"tool call {block.tool_name!r} has invalid JSON args") from error
    if not isinstance(args, dict):
        raise TypeError(f"tool call {block.tool_name!r} args must be an object, got {args!r}")
    return ToolCall(name=block.tool_name, args=args, id=block.tool_call_id, type="tool_call")


def to_llamaindex_message(message: BaseMessage) -> ChatMessage:
    """Convert the router's answer to a LlamaIndex assistant message (text and tool calls).

    The routing record is deliberately not put on the message: chat engines keep messages in
    memory and some LlamaIndex LLMs send ``additional_kwargs`` back to their provider.
    """
    blocks: list[Any] = [TextBlock(text=message.text)]
    for call in getattr(message, "tool_calls", None) or []:
        blocks.append(
            ToolCallBlock(
                tool_call_id=call.get("id"), tool_name=call["name"], tool_kwargs=call["args"]
            )
        )
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


# -- responses ---------------------------------------------------------------------------------


def _raw(message: BaseMessage) -> dict[str, Any]:
    """``response_metadata`` (with ``routing``), plus the usage if the provider left it out.

    LangChain keeps token usage in ``usage_metadata``, outside ``response_metadata``; LlamaIndex's
    ``TokenCountingHandler`` looks for it in ``raw["usage"]`` / ``raw["usage_metadata"]``.
    """
    raw = dict(message.response_metadata)
    usage = getattr(message, "usage_metadata", None)
    if usage and "usage" not in raw and "usage_metadata" not in raw:
        raw["usage_metadata"] = dict(usage)
    return raw


def _routing_kwargs(message: BaseMessage) -> dict[str, Any]:
    routing = message.response_metadata.get("routing")
    return {} if routing is None else {"routing": routing}


def _chat_response(message: BaseMessage, delta: str | None = None) -> ChatResponse:
    return ChatResponse(
        message=to_llamaindex_message(message),
        raw=_raw(message),
        delta=delta,
        additional_kwargs=_routing_kwargs(message),
    )


def _completion_response(message: BaseMessage, delta: str | None = None) -> CompletionResponse:
    return CompletionResponse(
        text=message.text,
        raw=_raw(message),
        delta=delta,
        additional_kwargs=_routing_kwargs(message),
    )


class _Stream:
    """Accumulates the router's chunks into LlamaIndex stream responses.

    Mid-stream responses carry the cumulative text and the chunk's own metadata; the final
    one is built from all chunks merged (so it has the routing record, which the router sends
    in a last, empty chunk, and the usage).
    """

    def __init__(self) -> None:
        self.chunks: list[AIMessageChunk] = []
        self.text = ""

    def add(self, chunk: BaseMessage) -> bool:
        """Record ``chunk``; True when it has text (worth a response of its own)."""
        if not isinstance(chunk, AIMessageChunk):
            chunk = AIMessageChunk(content=chunk.content)
        self.chunks.append(chunk)
        self.text += chunk.text
        # Chunks without text (usage, stop reason, tool-call pieces, the routing chunk) are
        # only merged into the final response, not yielded as empty deltas.
        return bool(chunk.text)

    def chat_delta(self, chunk: BaseMessage) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=self.text),
            delta=chunk.text,
            raw=dict(chunk.response_metadata),
        )

    def completion_delta(self, chunk: BaseMessage) -> CompletionResponse:
        return CompletionResponse(
            text=self.text, delta=chunk.text, raw=dict(chunk.response_metadata)
        )

    def _total(self) -> AIMessageChunk:
        if not self.chunks:
            return AIMessageChunk(content="")
        # One merge at the end: adding chunk by chunk would copy the text n times.
        return add_ai_message_chunks(self.chunks[0], *self.chunks[1:])

    def chat_final(self) -> ChatResponse:
        return _chat_response(self._total(), delta="")

    def completion_final(self) -> CompletionResponse:
        return _completion_response(self._total(), delta="")


def _local_option(router: ConfidenceRoutedLLM, name: str) -> int | None:
    """A positive int option (``num_ctx``, ``num_predict``) of the local model, if set."""
    model: Any = router.local
    while hasattr(model, "bound"):  # unwrap bind() / bind_tools() bindings
        model = model.bound
    value = getattr(model, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class LangChainEmbeddingAdapter(BaseEmbedding):
    """Use any LangChain ``Embeddings`` (e.g. ``OllamaEmbeddings``) as a LlamaIndex embedding.

    LlamaIndex's own Ollama embedding lives in a separate package; this thin adapter lets the
    same embedding model serve the router's knowledge store and a LlamaIndex index.

    Example:
        .. code-block:: python

            from langchain_ollama import OllamaEmbeddings
            from llama_index.core import Settings

            Settings.embed_model = LangChainEmbeddingAdapter(
                embeddings=OllamaEmbeddings(model="nomic-embed-text")
            )
    """

    embeddings: Any = Field(description="A LangChain Embeddings instance.")

    @classmethod
    def class_name(cls) -> str:
        return "LangChainEmbeddingAdapter"

    def _get_query_embedding(self, query: str) -> list[float]:
        return list(self.embeddings.embed_query(query))

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return list(await self.embeddings.aembed_query(query))

    def _get_text_embedding(self, text: str) -> list[float]:
        return list(self.embeddings.embed_documents([text])[0])

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [list(v) for v in self.embeddings.embed_documents(texts)]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return list((await self.embeddings.aembed_documents([text]))[0])
