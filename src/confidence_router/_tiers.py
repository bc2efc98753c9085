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
    if not run_manager.inheritable_handlers:
        return None  # nobody traces this call: no child runs to create (the common case)
    manager_cls = (
        AsyncCallbackManager
        if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
        else CallbackManager
    )
    manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(list(run_manager.inheritable_handlers), inherit=True)
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


def attach(message: BaseMessage, routing: dict[str, Any], *, keep_usage: bool = False) -> AIMessage:
    """The chosen tier's message with the routing record added to its response metadata.

    Token usage is left off: the tiers' own (child) runs report it to the callbacks, and the
    router's run reporting it again would count it twice. The router's ``invoke``/``stream``
    put the answering tier's usage back on what the caller receives. ``keep_usage``: nobody
    listens to this run (no callbacks), so nothing can count twice.
    """
    metadata = {**message.response_metadata, "routing": routing}
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


def without_usage(chunk: AIMessageChunk) -> AIMessageChunk:
    """``chunk`` without ``usage_metadata`` (see :func:`attach`)."""
    if chunk.usage_metadata is None:
        return chunk
    return chunk.model_copy(update={"usage_metadata": None})


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
