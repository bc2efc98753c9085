"""Calling one tier: child runs for tracing, timeouts, retries, and message/chunk plumbing.

Private to :mod:`confidence_router.router`; nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.runnables import RunnableBinding, RunnableConfig

T = TypeVar("T")
ChildManager = CallbackManager | AsyncCallbackManager

# The stream path of BaseChatModel (langchain-core 1.x) does not pass ``run_manager`` to
# ``_stream``; the router's ``stream()``/``astream()`` put the child-run manager here instead.
STREAM_CHILDREN: contextvars.ContextVar[ChildManager | None] = contextvars.ContextVar(
    "confidence_router_stream_children", default=None
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


def child_config(children: ChildManager | None, stage: str) -> RunnableConfig:
    """Config for one stage's call: a named, tagged child run of the router's run."""
    run = TIER_RUNS[stage]
    config: RunnableConfig = {"run_name": run["name"], "tags": [run["tag"]]}
    if children is not None:
        config["callbacks"] = children
    return config


# -- timeouts -------------------------------------------------------------------------------

# Sync calls cannot be interrupted; a timed-out call is abandoned to this pool and the caller
# moves on (the HTTP client's own timeout eventually ends it).
_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="confidence-router-timeout")


class TierTimeoutError(TimeoutError):
    """A tier did not answer (or did not produce the next stream chunk) in time."""


def _timeout_error(stage: str, timeout: float) -> TierTimeoutError:
    return TierTimeoutError(f"{stage} tier timed out after {timeout:g} s")


def call_with_timeout(fn: Callable[[], T], timeout: float | None, stage: str) -> T:
    """Run ``fn`` and give up after ``timeout`` seconds (``None``: wait as long as it takes)."""
    if timeout is None:
        return fn()
    context = contextvars.copy_context()
    future = _POOL.submit(context.run, fn)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        future.cancel()
        raise _timeout_error(stage, timeout) from None


async def acall_with_timeout(
    fn: Callable[[], Awaitable[T]], timeout: float | None, stage: str
) -> T:
    if timeout is None:
        return await fn()
    try:
        return await asyncio.wait_for(fn(), timeout)
    except asyncio.TimeoutError:
        raise _timeout_error(stage, timeout) from None


_END = object()


def iterate_with_timeout(iterator: Iterator[T], timeout: float | None, stage: str) -> Iterator[T]:
    """Yield from ``iterator``, failing when any next chunk takes longer than ``timeout``."""
    while True:
        item = call_with_timeout(lambda: next(iterator, _END), timeout, stage)
        if item is _END:
            return
        yield item  # type: ignore[misc]


async def aiterate_with_timeout(
    iterator: AsyncIterator[T], timeout: float | None, stage: str
) -> AsyncIterator[T]:
    while True:
        try:
            item = await acall_with_timeout(lambda: anext(iterator), timeout, stage)
        except StopAsyncIteration:
            return
        yield item


# -- messages and chunks --------------------------------------------------------------------


def with_logprobs(model: Any) -> Any:
    """Return ``model`` set up to report per-token logprobs.

    ``ChatOllama`` and ``ChatOpenAI`` both expose a ``logprobs`` field; when it is unset we take
    a cheap copy with it switched on (``model_copy`` shares the HTTP clients). A ``bind()`` /
    ``bind_tools()`` wrapper is unwrapped and rewrapped. Other models are returned unchanged:
    their confidence is then unknown, and the ``on_unknown`` policy applies.
    """
    if isinstance(model, RunnableBinding):
        inner = with_logprobs(model.bound)
        return model if inner is model.bound else model.model_copy(update={"bound": inner})
    model_fields = getattr(type(model), "model_fields", {})
    if "logprobs" in model_fields and not getattr(model, "logprobs", None):
        return model.model_copy(update={"logprobs": True})
    return model


def unwrap(model: Any) -> Any:
    return model.bound if isinstance(model, RunnableBinding) else model


def model_name(model: Any) -> str:
    model = unwrap(model)
    for attr in ("model", "model_id", "model_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def bind_tools(model: Any, tools: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    target = unwrap(model)
    if not hasattr(target, "bind_tools"):
        raise TypeError(f"{type(target).__name__} does not support bind_tools")
    bound = target.bind_tools(tools, **kwargs)
    if isinstance(model, RunnableBinding) and model.kwargs:
        bound = bound.bind(**model.kwargs)
    return bound


def usage_of(message: BaseMessage | None) -> dict[str, Any] | None:
    usage = getattr(message, "usage_metadata", None)
    return dict(usage) if usage else None


def last_user_text(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if message.type == "human":
            return message.text.strip()
    return ""


def attach(message: BaseMessage, routing: dict[str, Any]) -> AIMessage:
    """The chosen tier's message with the routing record added to its response metadata."""
    metadata = {**message.response_metadata, "routing": routing}
    if isinstance(message, AIMessage):
        return message.model_copy(update={"response_metadata": metadata})
    return AIMessage(content=message.content, response_metadata=metadata)


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


def aggregate(chunks: Sequence[AIMessageChunk]) -> AIMessageChunk:
    if not chunks:
        return AIMessageChunk(content="")
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total
