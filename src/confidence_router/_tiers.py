"""Tier plumbing of the router: child runs for tracing, and message/chunk conversions.

Private to :mod:`confidence_router.router`; nothing here decides anything. Client set-up
(timeouts, retries, logprobs) lives in :mod:`confidence_router.tier_clients`.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.runnables import RunnableConfig

ChildManager = CallbackManager | AsyncCallbackManager

# The stream path of BaseChatModel (langchain-core 1.x) does not pass ``run_manager`` to
# ``_stream``; the router's ``stream()``/``astream()`` put the child-run manager here instead.
STREAM_CHILDREN: contextvars.ContextVar[ChildManager | None] = contextvars.ContextVar(
    "confidence_router_stream_children", default=None
)

# The async drivers of streams opened by ``astream()``: LangChain does not close the inner
# ``_astream`` generator when the caller closes the stream, so ``astream()`` closes them itself
# (the call's reservation is settled and the tier's stream closed at once, not at GC time).
OPEN_DRIVERS: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "confidence_router_open_drivers", default=None
)

#: Run name and tag of each stage's child run (what a trace viewer shows).
TIER_RUNS: dict[str, dict[str, str]] = {
    "local": {"name": "local", "tag": "route:local-attempt"},
    "cloud": {"name": "cloud", "tag": "route:escalated"},
    "precheck": {"name": "precheck", "tag": "route:precheck"},
}


# -- tracing --------------------------------------------------------------------------------


def child_manager(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> ChildManager | None:
    """A callback manager whose runs are children of the router's run.

    ``CallbackManagerForLLMRun`` has no ``get_child()``; we build the child manager by hand from
    the run's inheritable handlers, tags and metadata.
    """
    if run_manager is None:
        return STREAM_CHILDREN.get()
    if not run_manager.handlers and not run_manager.inheritable_handlers:
        return None  # nobody traces this call: no child runs to create (the common case)
    manager_cls = (
        AsyncCallbackManager
        if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
        else CallbackManager
    )
    manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(list(run_manager.inheritable_handlers), inherit=True)
    # The router's own handlers (its constructor's callbacks) see the tier runs too: the
    # router's run carries no usage, so that is where they count the tokens (once).
    for handler in run_manager.handlers:
        if handler not in run_manager.inheritable_handlers:
            manager.add_handler(handler, inherit=False)
    manager.add_tags(list(run_manager.inheritable_tags), inherit=True)
    manager.add_metadata(dict(run_manager.inheritable_metadata), inherit=True)
    return manager


def stream_children(
    config: RunnableConfig, run_id: uuid.UUID, manager_cls: type[ChildManager]
) -> ChildManager:
    """The child-run manager for a streamed call whose run id is fixed in advance."""
    manager = manager_cls.configure(
        config.get("callbacks"), None, False, config.get("tags"), None, config.get("metadata")
    )
    manager.parent_run_id = run_id
    return manager


def child_config(children: ChildManager | None, stage: str) -> RunnableConfig | None:
    """Config for one stage's call: a named, tagged child run of the router's run (``None``
    when nothing traces the call)."""
    if children is None:
        return None
    run = TIER_RUNS[stage]
    return {"run_name": run["name"], "tags": [run["tag"]], "callbacks": children}


# -- messages and chunks --------------------------------------------------------------------


def last_user_text(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if message.type == "human":
            return message.text.strip()
    return ""


#: Content blocks holding a model's reasoning (Converse, Anthropic, LangChain standard).
REASONING_BLOCKS = frozenset({"reasoning", "reasoning_content", "thinking", "redacted_thinking"})


def _is_reasoning(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") in REASONING_BLOCKS


def without_reasoning(messages: list[BaseMessage]) -> list[BaseMessage]:
    """``messages`` with the reasoning blocks of earlier AI turns left out (the same list when
    there are none). A turn left with only text blocks becomes that text."""
    out: list[BaseMessage] | None = None
    for index, message in enumerate(messages):
        content = message.content
        if message.type != "ai" or not isinstance(content, list) or not any(
            map(_is_reasoning, content)
        ):
            continue
        kept = [block for block in content if not _is_reasoning(block)]
        if all(isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text") for b in kept):
            kept_content: Any = "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in kept)
        else:
            kept_content = kept
        out = list(messages) if out is None else out
        out[index] = message.model_copy(update={"content": kept_content})
    return messages if out is None else out


def attach(message: BaseMessage, routing: dict[str, Any], *, keep_usage: bool = False) -> AIMessage:
    """The chosen tier's message with the routing record added to its response metadata.

    Token usage is left off: the tiers' own (child) runs report it to the callbacks, and the
    router's run reporting it again would count it twice. The router's ``invoke``/``stream``
    put the answering tier's usage back on what the caller receives. ``keep_usage``: nobody
    listens to this run (no callbacks), so nothing can count twice.
    """
    metadata = {**message.response_metadata, "routing": routing}
    plain = _plain_logprobs(metadata)
    if plain is not None:
        metadata["logprobs"] = plain
    if isinstance(message, AIMessageChunk):
        message = AIMessage(
            content=message.content,
            additional_kwargs=message.additional_kwargs,
            tool_calls=message.tool_calls,
            invalid_tool_calls=message.invalid_tool_calls,
            id=message.id,
            response_metadata=metadata,
            usage_metadata=message.usage_metadata if keep_usage else None,
        )
        return message
    if isinstance(message, AIMessage):
        update: dict[str, Any] = {"response_metadata": metadata}
        if not keep_usage:
            update["usage_metadata"] = None
        return message.model_copy(update=update)
    return AIMessage(content=message.content, response_metadata=metadata)


def _plain_logprobs(metadata: Any) -> list[Any] | None:
    """The metadata's logprobs as plain JSON when they are ollama's ``Logprob`` objects (the
    router turned logprobs on), so callers can log or store them; ``None`` when they are
    plain already or absent."""
    logprobs = metadata.get("logprobs")
    if isinstance(logprobs, list) and logprobs and type(logprobs[0]) is not dict:
        return [_plain_token(item) for item in logprobs]
    return None


def _plain_token(item: Any) -> Any:
    """One token's logprob entry (ollama's ``Logprob``) as a dict of its fields."""
    fields = getattr(item, "__dict__", None)  # a pydantic model's field values
    if isinstance(item, dict) or not isinstance(fields, dict) or "logprob" not in fields:
        return item
    plain = dict(fields)
    tops = plain.get("top_logprobs")
    if tops:
        plain["top_logprobs"] = [_plain_token(top) for top in tops]
    return plain


def without_usage(chunk: AIMessageChunk) -> AIMessageChunk:
    """``chunk`` as the caller gets it: without ``usage_metadata`` (see :func:`attach`), its
    logprobs as plain JSON."""
    update: dict[str, Any] = {}
    if chunk.usage_metadata is not None:
        update["usage_metadata"] = None
    plain = _plain_logprobs(chunk.response_metadata)
    if plain is not None:
        update["response_metadata"] = {**chunk.response_metadata, "logprobs": plain}
    return chunk.model_copy(update=update) if update else chunk


def carries_output(chunk: AIMessageChunk) -> bool:
    """Whether a streamed chunk shows the caller part of an answer: text, a tool call or any
    other block (reasoning, an image). Empty start, stop and metadata chunks do not: after
    only those, a failed cloud stream can still be retried or fall back."""
    if chunk.tool_call_chunks:
        return True
    content = chunk.content
    if isinstance(content, str):
        return bool(content)
    return any(
        (bool(block) if isinstance(block, str)
         else not (isinstance(block, dict) and block.get("type") == "text"
                   and not block.get("text")))
        for block in content
    )


def as_chunk(message: BaseMessage) -> AIMessageChunk:
    if isinstance(message, AIMessageChunk):
        return message
    if isinstance(message, AIMessage):
        return AIMessageChunk(
            content=message.content,
            id=message.id,
            response_metadata=message.response_metadata,
            usage_metadata=message.usage_metadata,
            tool_call_chunks=[
                tool_call_chunk(
                    name=tc["name"], args=json.dumps(tc["args"]), id=tc["id"], index=i
                )
                for i, tc in enumerate(message.tool_calls)
            ],
        )
    return AIMessageChunk(content=message.content)
