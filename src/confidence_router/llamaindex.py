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

import contextvars
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.structured_llm import StructuredLLM
from pydantic import Field, ValidationError, model_validator

from confidence_router.errors import (
    InvalidArgumentError,
    InvalidInputError,
    InvalidTypeError,
    RoutingConfigError,
)
from confidence_router.policy import RoutingPolicy, unknown_names_message
from confidence_router.router import ConfidenceRoutedLLM, check_call_kwargs, check_input
from confidence_router.tier_clients import model_name as _model_name

if TYPE_CHECKING:
    from langchain_core.runnables import Runnable
    from llama_index.core.tools.types import BaseTool

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_NUM_OUTPUT",
    "ConfidenceRoutedLlamaIndexLLM",
    "RoutedStructuredLLM",
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

#: Call kwargs that are neither knobs nor tier kwargs but legitimate: ``stop`` (both tiers)
#: and ``config`` (the LangChain RunnableConfig).
_CALL_KWARGS = frozenset({"stop", "config"})


# Routing records of the calls made while a RoutedStructuredLLM call runs (see _capture).
_CAPTURED: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "confidence_router_llamaindex_routing", default=None
)


class ConfidenceRoutedLlamaIndexLLM(FunctionCallingLLM):
    """A LlamaIndex ``FunctionCallingLLM`` that answers locally and escalates to the cloud when
    the local answer's confidence is below the threshold (a :class:`ConfidenceRoutedLLM`
    underneath).

    Every response carries the routing decision: ``response.raw`` is the LangChain
    ``response_metadata`` of the returned message (including ``"routing"``) and
    ``response.additional_kwargs["routing"]`` is the routing record. Streams buffer the local
    answer until the decision, so an escalated stream contains only cloud text; the decision
    is on the **last** yielded response (its ``delta`` is ``""``).

    Tools go through both tiers (``router.bind_tools``: each tier formats them for its own
    provider) and the decision is taken on the tool-calling answer, so LlamaIndex agents
    (``FunctionAgent``, ``AgentWorkflow``) and function-calling programs work; the routing
    is on every ``AgentOutput.raw["routing"]``. ``as_structured_llm(Model)`` keeps the
    routing record in the structured response's ``additional_kwargs["routing"]``.

    Per-call knobs go in the call's kwargs (or, for every call, in ``router_kwargs``) and are
    validated when the call is made, streams included, before anything is sent
    (:class:`~confidence_router.errors.RoutingConfigError` on a bad value or an unknown or
    misspelt name): ``threshold``, ``signal``, ``on_unknown``, ``on_cloud_error``,
    ``precheck_threshold``, ``allow_escalation``, ``on_budget_exceeded``, ``early_exit``.
    ``config=`` is passed on as the LangChain ``RunnableConfig`` (callbacks, tags); ``stop``
    and the router's tier kwargs (``format``, ``tool_choice``, ...) go to both tiers. User
    messages may carry images (``ImageBlock`` with bytes, a local path or a ``data:`` URL).

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

            from llama_index.core.agent.workflow import FunctionAgent
            agent = FunctionAgent(tools=[get_weather], llm=llm)
            result = await agent.run(user_msg="Weather in Paris?")  # result.raw["routing"]

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

    def __init__(self, **data: Any) -> None:
        # Invalid fields are a RoutingConfigError naming the problem (pydantic would wrap it
        # in a ValidationError), as for ConfidenceRoutedLLM.
        try:
            super().__init__(**data)
        except ValidationError as error:
            for detail in error.errors():
                cause = (detail.get("ctx") or {}).get("error")
                if isinstance(cause, RoutingConfigError):
                    raise cause from None
            raise RoutingConfigError(f"invalid ConfidenceRoutedLlamaIndexLLM: {error}") from error

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        # LlamaIndex LLMs ignore unknown fields; here ``threshold=0.9`` would silently route
        # at the default threshold. Knobs go in ``router_kwargs`` (or on the router).
        if isinstance(data, dict):
            unknown = set(data) - set(cls.model_fields) - {"class_name"}
            if unknown:
                message = unknown_names_message(
                    unknown, sorted(cls.model_fields), what="ConfidenceRoutedLlamaIndexLLM field"
                )
                knobs = sorted(unknown & set(RoutingPolicy.knob_names()))
                if knobs:
                    message += (f"; routing knobs go in router_kwargs={{{knobs[0]!r}: ...}} "
                                "or on the router")
                raise RoutingConfigError(message)
        return data

    @model_validator(mode="after")
    def _check_router_kwargs(self) -> ConfidenceRoutedLlamaIndexLLM:
        # Bad defaults (values and names) fail at construction, not at the first query.
        self._call_kwargs({})
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

        ``fields`` are this class's fields (``router_kwargs``, ``context_window``, ...); any
        other keyword goes to :meth:`ConfidenceRoutedLLM.from_settings`, where it overrides a
        setting (``local_model``, ``threshold``, ...) or sets a router field.

        Example: ``ConfidenceRoutedLlamaIndexLLM.from_settings("router.toml", threshold=0.8)``
        """
        if "router" in fields:
            raise RoutingConfigError(
                "from_settings builds the router from the settings: pass settings or router "
                "fields as keywords, or construct ConfidenceRoutedLlamaIndexLLM(router=...)"
            )
        own = {k: v for k, v in fields.items() if k in cls.model_fields}
        overrides = {k: v for k, v in fields.items() if k not in cls.model_fields}
        router = ConfidenceRoutedLLM.from_settings(path, environ=environ, **overrides)
        return cls(router=router, **own)

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
            # Tools are bound on both tiers (router.bind_tools).
            is_function_calling_model=True,
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
        model, call = self._target(kwargs)
        return _noted(_chat_response(model.invoke(to_langchain_messages(messages), **call)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat` (``router.ainvoke``; does not block the event loop)."""
        model, call = self._target(kwargs)
        message = await model.ainvoke(to_langchain_messages(messages), **call)
        return _noted(_chat_response(message))

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
        lc_messages = _checked(to_langchain_messages(messages))
        model, call = self._target(kwargs)

        def gen() -> ChatResponseGen:
            stream = _Stream()
            for chunk in model.stream(lc_messages, **call):
                if stream.add(chunk):
                    yield stream.chat_delta(chunk)
            yield _noted(stream.chat_final())

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat` (``router.astream``)."""
        lc_messages = _checked(to_langchain_messages(messages))
        model, call = self._target(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            stream = _Stream()
            async for chunk in model.astream(lc_messages, **call):
                if stream.add(chunk):
                    yield stream.chat_delta(chunk)
            yield _noted(stream.chat_final())

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
        return _completion_response(self.router.invoke(_prompt_messages(prompt), **call))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async :meth:`complete` (``router.ainvoke``)."""
        call = self._call_kwargs(kwargs)
        message = await self.router.ainvoke(_prompt_messages(prompt), **call)
        return _completion_response(message)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream a completion; the last response has ``delta == ""`` and the routing."""
        call = self._call_kwargs(kwargs)
        lc_messages = _checked(_prompt_messages(prompt))

        def gen() -> CompletionResponseGen:
            stream = _Stream()
            for chunk in self.router.stream(lc_messages, **call):
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
        lc_messages = _checked(_prompt_messages(prompt))

        async def gen() -> CompletionResponseAsyncGen:
            stream = _Stream()
            async for chunk in self.router.astream(lc_messages, **call):
                if stream.add(chunk):
                    yield stream.completion_delta(chunk)
            yield stream.completion_final()

        return gen()

    # -- tools (FunctionCallingLLM) -------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` kwargs for a tool-calling turn: the history, the new user message, and
        the tools (bound on both tiers by :meth:`chat`)."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        return {
            "messages": messages,
            "tools": list(tools),
            "tool_required": tool_required,
            "tool_choice": tool_choice,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel tool calls are allowed."""
        if allow_parallel_tool_calls:
            return response
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if len(calls) > 1:
            response.message.blocks = [
                b for b in response.message.blocks if not isinstance(b, ToolCallBlock)
            ] + calls[:1]
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The tool calls of a (possibly escalated) answer, as LlamaIndex ``ToolSelection`` objects.

        Raises:
            ValueError: no tool call and ``error_on_no_tool_call`` (LlamaIndex's contract).
        """
        selections = []
        for i, block in enumerate(response.message.blocks):
            if not isinstance(block, ToolCallBlock):
                continue
            args = _as_tool_call(block.tool_name, block.tool_kwargs, block.tool_call_id)["args"]
            selections.append(
                ToolSelection(
                    tool_id=block.tool_call_id or f"call_{i}",
                    tool_name=block.tool_name,
                    tool_kwargs=args,
                )
            )
        if not selections and error_on_no_tool_call:
            raise InvalidArgumentError("expected at least one tool call in the response, got none")
        return selections

    def as_structured_llm(self, output_cls: type, **kwargs: Any) -> RoutedStructuredLLM:
        """A structured LLM (LlamaIndex ``StructuredLLM``) whose responses keep the routing:
        ``response.raw`` is the ``output_cls`` instance and
        ``response.additional_kwargs["routing"]`` the routing record of the call.

        Example:
            .. code-block:: python

                sllm = llm.as_structured_llm(Capital)
                response = sllm.chat([ChatMessage(role="user", content="Capital of Kenya?")])
                response.raw, response.additional_kwargs["routing"]["decision"]
        """
        return RoutedStructuredLLM(llm=self, output_cls=output_cls, **kwargs)

    # -- helpers ------------------------------------------------------------------------------

    def _target(self, kwargs: dict[str, Any]) -> tuple[Runnable[Any, Any], dict[str, Any]]:
        """The runnable to call (the router, or the router with tools bound on both tiers)
        and the validated call kwargs."""
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        tool_required = kwargs.pop("tool_required", False)
        call = self._call_kwargs(kwargs)
        choice = _tool_choice(tool_choice, tool_required)
        if not tools or choice == "none":
            return self.router, call
        specs = [_openai_tool(tool) for tool in tools]
        names = {(spec.get("function") or {}).get("name") for spec in specs}
        if choice not in (None, "any", "none") and choice not in names:
            # A tier that ignores tool_choice would answer as if it had not been asked.
            raise RoutingConfigError(
                f"tool_choice names {choice!r}, which is not one of the tools {sorted(map(str, names))}"
            )
        return self.router.bind_tools(specs, tool_choice=choice), call

    def _policy(self, kwargs: dict[str, Any]) -> RoutingPolicy:
        """The router's policy with the knobs in ``kwargs`` applied (raises RoutingConfigError).

        The router validates again when it runs; doing it here too makes streaming calls fail
        at the call, not at the first ``next()``.
        """
        knobs = RoutingPolicy.knob_names()
        base = RoutingPolicy(**{name: getattr(self.router, name) for name in knobs})
        return base.with_overrides({k: v for k, v in kwargs.items() if k in knobs})

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``router_kwargs`` with the call's kwargs on top, validated (names and knob values)
        here, so that streams fail at the call rather than at the first ``next()``."""
        merged = {**self.router_kwargs, **kwargs}
        check_call_kwargs(merged, _CALL_KWARGS)
        self._policy(merged)
        return merged


def _prompt_messages(prompt: Any) -> list[BaseMessage]:
    """A completion prompt as one user message."""
    if not isinstance(prompt, str):
        raise InvalidTypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return [HumanMessage(content=prompt)]


def _checked(messages: list[BaseMessage]) -> list[BaseMessage]:
    """``messages``, after the router's own input check (nothing to answer is an
    InvalidInputError), run at the call so that a stream fails before it is returned."""
    check_input(messages)
    return messages


# -- message conversion ------------------------------------------------------------------------


def to_langchain_messages(messages: Sequence[ChatMessage]) -> list[BaseMessage]:
    """Convert LlamaIndex chat messages to LangChain messages (text, tool calls, tool results).

    Roles: system/developer -> ``SystemMessage``; user -> ``HumanMessage``; assistant (also
    chatbot/model) -> ``AIMessage`` (``ToolCallBlock`` blocks become ``tool_calls``);
    tool/function -> ``ToolMessage`` (needs ``additional_kwargs["tool_call_id"]``).
    Text blocks are joined with newlines, as ``ChatMessage.content`` does.

    Tool calls an assistant message keeps in ``additional_kwargs["tool_calls"]`` (LlamaIndex
    integrations and chat histories from before ``ToolCallBlock``: OpenAI's ``{"id",
    "function": {"name", "arguments"}}``, Ollama's with the arguments as an object,
    Anthropic's ``{"id", "name", "input"}``) are sent as tool calls too (once, when a
    ``ToolCallBlock`` has the same id). Other ``additional_kwargs`` are provider extras,
    not part of the conversation, and are not sent. Left out as well: a ``ThinkingBlock`` in
    an assistant message (the model's earlier reasoning) and ``CachePoint`` (a provider
    cache hint).

    Images (``ImageBlock`` with bytes, a local ``path`` or a ``data:`` URL) become LangChain
    image blocks, which both tiers send (Ollama's ``images``, Bedrock's image content block).

    Raises:
        InvalidInputError (a ``ValueError``): a block the tiers cannot take (audio, video,
            document, citations, an image given only by a URL other than ``data:``, a
            ``ThinkingBlock`` outside an assistant message), tool calls outside an assistant
            message, a tool call without a tool name, a legacy ``function_call``, a tool
            result without a ``tool_call_id``, or a role no tier has: dropping them silently
            would change the question.
        InvalidTypeError (a ``TypeError``): ``messages`` is not a sequence of
            ``ChatMessage``, a tool call whose arguments are not a JSON object, or a tool
            result whose ``tool_call_id`` / ``name`` is not a str.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidTypeError(
            f"messages must be a sequence of ChatMessage, got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise InvalidTypeError(
                f"messages[{i}] must be a ChatMessage, got {type(message).__name__}"
            )
    return [_to_langchain(message) for message in messages]


def _to_langchain(message: ChatMessage) -> BaseMessage:
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    tool_calls: list[ToolCall] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ImageBlock) and message.role in _USER_ROLES:
            images.append(_image(block))
        elif isinstance(block, ToolCallBlock) and message.role in _ASSISTANT_ROLES:
            tool_calls.append(
                _sent_tool_call(block.tool_name, block.tool_kwargs, block.tool_call_id)
            )
        elif isinstance(block, CachePoint) or (
            isinstance(block, ThinkingBlock) and message.role in _ASSISTANT_ROLES
        ):
            # Provider cache hints and the model's earlier reasoning are not what is asked.
            continue
        else:
            raise InvalidInputError(
                f"ConfidenceRoutedLlamaIndexLLM sends text (and images in user messages) "
                f"only; a {_role_name(message.role)} message has a {type(block).__name__}"
            )
    tool_calls = _with_legacy_tool_calls(message, tool_calls)
    text = "\n".join(texts)
    role = message.role
    if role in _SYSTEM_ROLES:
        return SystemMessage(content=text)
    if role in _USER_ROLES and images:
        blocks: list[str | dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        return HumanMessage(content=[*blocks, *images])
    if role in _USER_ROLES:
        return HumanMessage(content=text)
    if role in _ASSISTANT_ROLES:
        return AIMessage(content=text, tool_calls=tool_calls)
    if role in _TOOL_ROLES:
        tool_call_id = message.additional_kwargs.get("tool_call_id")
        if not tool_call_id:
            raise InvalidInputError(
                f"a {_role_name(role)} message needs additional_kwargs['tool_call_id'] (the id "
                "of the tool call it answers)"
            )
        name = message.additional_kwargs.get("name")
        if not isinstance(tool_call_id, (str, int)) or not isinstance(name, (str, type(None))):
            raise InvalidTypeError(
                f"a {_role_name(role)} message's additional_kwargs['tool_call_id'] must be a "
                f"str and ['name'] a str, got {tool_call_id!r} and {name!r}"
            )
        return ToolMessage(content=text, tool_call_id=str(tool_call_id), name=name)
    raise InvalidInputError(f"unsupported message role {_role_name(role)!r}")


def _role_name(role: Any) -> str:
    """The role as text: ``ChatMessage`` validates its role when built, not when assigned."""
    return str(getattr(role, "value", role))


def _with_legacy_tool_calls(message: ChatMessage, tool_calls: list[ToolCall]) -> list[ToolCall]:
    """``tool_calls`` plus those kept in ``additional_kwargs["tool_calls"]`` (see
    :func:`to_langchain_messages`), each call once."""
    extra = message.additional_kwargs
    if extra.get("function_call"):
        raise InvalidInputError(
            "additional_kwargs['function_call'] (OpenAI's legacy function calling) is not "
            "supported: give the call as a ToolCallBlock"
        )
    legacy = extra.get("tool_calls")
    if not legacy:
        return tool_calls
    if message.role not in _ASSISTANT_ROLES:
        raise InvalidInputError(
            f"a {_role_name(message.role)} message has additional_kwargs['tool_calls']: only "
            "assistant messages make tool calls"
        )
    if isinstance(legacy, (str, bytes, Mapping)) or not isinstance(legacy, Sequence):
        raise InvalidTypeError(
            f"additional_kwargs['tool_calls'] must be a list, got {type(legacy).__name__}"
        )
    seen = {_call_key(call) for call in tool_calls}
    merged = list(tool_calls)
    for i, item in enumerate(legacy):
        dump = getattr(item, "model_dump", None)  # OpenAI's / Ollama's pydantic objects
        data = dump() if callable(dump) else item
        if not isinstance(data, Mapping):
            raise InvalidTypeError(
                f"additional_kwargs['tool_calls'][{i}] must be an object, got {type(item).__name__}"
            )
        function = data.get("function")
        spec = function if isinstance(function, Mapping) else data
        name = spec.get("name")
        args: Any = next((spec[key] for key in ("arguments", "input", "args") if key in spec), {})
        call_id = data.get("id")
        call = _sent_tool_call(name, args, None if call_id is None else str(call_id))
        if _call_key(call) not in seen:
            seen.add(_call_key(call))
            merged.append(call)
    return merged


def _call_key(call: ToolCall) -> str:
    if call.get("id"):
        return f"id:{call['id']}"
    return "call:" + json.dumps([call["name"], call["args"]], sort_keys=True, default=str)


def _image(block: ImageBlock) -> dict[str, Any]:
    """A LangChain image block (base64 data) from a LlamaIndex ``ImageBlock`` with bytes, a
    local path or a ``data:`` URL (which holds the bytes)."""
    url = str(block.url) if block.url is not None else ""
    if block.image is None and block.path is None and not url.startswith("data:"):
        # resolve_image() would download it here; neither tier fetches URLs either.
        raise InvalidInputError(
            "an ImageBlock given only by url cannot be sent: give its bytes (image=...), a "
            "local path (path=...) or a data: URL"
        )
    try:
        data = block.resolve_image(as_base64=True).read()
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"cannot read the ImageBlock: {error}") from error
    mime = block.image_mimetype
    if not mime:
        raise InvalidInputError("the ImageBlock's image type is unknown: set image_mimetype")
    return {"type": "image", "base64": data.decode("ascii"), "mime_type": mime}


def _sent_tool_call(name: Any, args: Any, call_id: str | None) -> ToolCall:
    """A tool call of the conversation, to be sent: it must name its tool (Bedrock refuses a
    call without a name, after the local model has been asked)."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"a tool call in the conversation names no tool ({name!r})")
    return _as_tool_call(name, args, call_id)


def _as_tool_call(name: str, args: Any, call_id: str | None) -> ToolCall:
    if isinstance(args, str):
        # LlamaIndex keeps un-parsed (streamed) arguments as a JSON string.
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"tool call {name!r} has invalid JSON args") from error
    if not isinstance(args, dict):
        raise InvalidTypeError(f"tool call {name!r} args must be an object, got {args!r}")
    return ToolCall(name=name, args=args, id=call_id, type="tool_call")


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


def _tool_choice(choice: str | dict[str, Any] | None, required: bool) -> str | None:
    """LlamaIndex's ``tool_choice`` / ``tool_required`` as a LangChain ``bind_tools``
    ``tool_choice``: ``None`` (model decides), ``"any"`` (some tool), ``"none"`` (no tools)
    or a tool name."""
    if isinstance(choice, dict):
        inner = choice.get("function")
        function: dict[str, Any] = inner if isinstance(inner, dict) else choice
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RoutingConfigError(f"tool_choice dict names no tool: {choice!r}")
        return name
    if choice is None or choice == "auto":
        return "any" if required else None
    if not isinstance(choice, str):
        raise RoutingConfigError(f"tool_choice must be a str, a dict or None, got {choice!r}")
    if choice in ("required", "any"):
        return "any"
    return choice


def _openai_tool(tool: Any) -> dict[str, Any]:
    """A LlamaIndex tool as an OpenAI-format tool spec, which both tiers' ``bind_tools`` take."""
    metadata = getattr(tool, "metadata", None)
    if metadata is not None and hasattr(metadata, "to_openai_tool"):
        return dict(metadata.to_openai_tool())
    if isinstance(tool, dict):
        return tool
    raise InvalidTypeError(
        f"expected a LlamaIndex tool (with .metadata), got {type(tool).__name__}"
    )


def _noted(response: ChatResponse) -> ChatResponse:
    """Hand the response's routing record to an enclosing RoutedStructuredLLM call."""
    captured = _CAPTURED.get()
    routing = response.additional_kwargs.get("routing")
    if captured is not None and routing is not None:
        captured.append(routing)
    return response


@contextmanager
def _capture() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    token = _CAPTURED.set(records)
    try:
        yield records
    finally:
        _CAPTURED.reset(token)


def _with_routing(response: ChatResponse, records: list[dict[str, Any]]) -> ChatResponse:
    if records:
        # The last routed call produced the answer (earlier ones, if any, were retries).
        response.additional_kwargs["routing"] = records[-1]
    return response


class RoutedStructuredLLM(StructuredLLM):
    """LlamaIndex's ``StructuredLLM`` over a :class:`ConfidenceRoutedLlamaIndexLLM`, keeping
    the routing: ``chat``/``achat``/``complete``/``acomplete`` responses carry
    ``additional_kwargs["routing"]`` (``raw`` stays the structured object, as in LlamaIndex).

    Build it with ``llm.as_structured_llm(OutputModel)``.
    """

    @classmethod
    def class_name(cls) -> str:
        return "RoutedStructuredLLM"

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Structured chat; ``additional_kwargs["routing"]`` is the call's routing record."""
        with _capture() as records:
            response = super().chat(messages, **kwargs)
        return _with_routing(response, records)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`."""
        with _capture() as records:
            response = await super().achat(messages, **kwargs)
        return _with_routing(response, records)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Structured completion (the prompt as one user message), with the routing."""
        response = self.chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)
        return _structured_completion(response)

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async :meth:`complete`."""
        response = await self.achat(
            [ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs
        )
        return _structured_completion(response)


def _structured_completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        raw=response.raw,
        additional_kwargs=dict(response.additional_kwargs),
    )


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
