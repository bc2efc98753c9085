"""Calling a tier that has no async implementation from async code, in a thread of its own.

``ChatBedrockConverse`` and ``ChatBedrock`` are synchronous clients. Awaited, LangChain runs
them in the event loop's *default executor*: ``min(32, cpus + 4)`` threads shared with
everything else on the loop (6 on a 2-core machine), and a streamed answer queues there once
per chunk. Under concurrency the calls wait for a thread, and a ``cloud_timeout`` that counts
the wait fails requests that were never sent (measured on 2 cores, 40 concurrent escalations
behind a hung local model: 22 ``ainvoke`` and all 40 ``astream`` calls timed out unsent). The router instead runs the tier's synchronous call in
a new thread per call, so a call starts when it is made and its timeout measures the request;
the client's own timeouts (botocore's ``read_timeout``/``connect_timeout``, set by the router)
bound the thread.

Callbacks keep LangChain's async semantics: an async handler (``astream_events``, an
``AsyncIteratorCallbackHandler`` feeding a web response) is still run on the caller's event
loop, and the tier's thread waits for it; synchronous handlers run in the tier's thread, as in
a synchronous call.

Private to :mod:`confidence_router.router`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    BaseCallbackHandler,
    BaseCallbackManager,
    CallbackManager,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig
from langchain_core.tracers import _streaming

from confidence_router.tier_clients import unwrap

__all__ = ["async_calls"]

#: LangChain's marker of handlers of its v2 event protocol (newer langchain-core only).
_V2_STREAMING: type | None = getattr(_streaming, "_V2StreamingCallbackHandler", None)

#: Seconds between checks, while a tier's thread waits for a handler on the caller's loop,
#: that the loop is still running (a loop closed meanwhile would never run the handler).
_LOOP_CHECK_SECONDS = 0.5


def async_calls(model: Any) -> tuple[Callable[..., Awaitable[Any]], Callable[..., AsyncIterator[Any]]]:
    """How to await ``model``: its own ``ainvoke``/``astream``; for a synchronous client, its
    ``invoke``/``stream`` each in a thread of its own."""
    if needs_thread(model):
        return functools.partial(invoke_in_thread, model), functools.partial(stream_in_thread, model)
    return model.ainvoke, model.astream


def needs_thread(model: Any) -> bool:
    """Whether awaiting ``model`` would run it in the event loop's shared default executor:
    the chat model inside its wrappers implements neither ``_agenerate`` nor ``_astream``."""
    inner = type(unwrap(model))
    return (
        issubclass(inner, BaseChatModel)
        and inner._agenerate is BaseChatModel._agenerate
        and inner._astream is BaseChatModel._astream
    )


async def invoke_in_thread(
    model: Any, messages: Any, config: RunnableConfig | None, **kwargs: Any
) -> Any:
    """``model.invoke(messages, config, **kwargs)`` in a new thread, awaited.

    Cancelling the await does not stop the thread: the client's own timeouts end it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    config = _for_thread(config, loop)

    def work() -> None:
        try:
            value = model.invoke(messages, config, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's task
            _post(loop, _settle, done, None, error)
        else:
            _post(loop, _settle, done, value, None)

    _start(work)
    return await done


async def stream_in_thread(
    model: Any, messages: Any, config: RunnableConfig | None, **kwargs: Any
) -> AsyncIterator[Any]:
    """``model.stream(messages, config, **kwargs)`` in a new thread, as an async iterator.

    When the iterator is closed (or its ``__anext__`` cancelled), the thread closes the tier's
    stream after the chunk it is reading, so the server stops generating.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    stop = threading.Event()
    config = _for_thread(config, loop)

    def work() -> None:
        try:
            stream: Iterator[Any] = iter(model.stream(messages, config, **kwargs))
            try:
                for chunk in stream:
                    _post(loop, chunks.put_nowait, (False, chunk))
                    if stop.is_set():
                        break
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's task
            _post(loop, chunks.put_nowait, (True, error))
        else:
            _post(loop, chunks.put_nowait, (True, None))

    _start(work)
    try:
        while True:
            last, item = await chunks.get()
            if last:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()


def _start(work: Callable[[], None]) -> None:
    # The caller's context (tracing context variables) goes with the call, as with
    # LangChain's own executor. A daemon thread: a call stuck past its client's timeouts
    # must not keep the interpreter from exiting.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name="confidence-router-tier",
                     daemon=True).start()


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody waits for this result any more


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting (timeout, cancellation)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


# -- callbacks -----------------------------------------------------------------------------


def _for_thread(
    config: RunnableConfig | None, loop: asyncio.AbstractEventLoop
) -> RunnableConfig | None:
    """``config`` with its callback manager made synchronous: async handlers are wrapped so
    that each event still runs on ``loop``."""
    if config is None or not isinstance(config.get("callbacks"), BaseCallbackManager):
        return config
    source: BaseCallbackManager = config["callbacks"]  # type: ignore[assignment]
    wrapped: dict[int, BaseCallbackHandler] = {}

    def on_loop(handler: BaseCallbackHandler) -> BaseCallbackHandler:
        if not isinstance(handler, AsyncCallbackHandler):
            return handler
        if id(handler) not in wrapped:
            wrapped[id(handler)] = _OnLoop.around(handler, loop)
        return wrapped[id(handler)]

    manager = CallbackManager(
        handlers=[on_loop(h) for h in source.handlers],
        inheritable_handlers=[on_loop(h) for h in source.inheritable_handlers],
        parent_run_id=source.parent_run_id,
        tags=list(source.tags),
        inheritable_tags=list(source.inheritable_tags),
        metadata=dict(source.metadata),
        inheritable_metadata=dict(source.inheritable_metadata),
    )
    return {**config, "callbacks": manager}


class _OnLoop(BaseCallbackHandler):
    """A synchronous stand-in for an async handler: each event runs on the caller's loop and
    the calling thread waits for it (so events keep their order, and a handler bound to its
    loop, e.g. feeding an ``asyncio.Queue``, works as in LangChain's own async path)."""

    def __init__(self, handler: AsyncCallbackHandler, loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._loop = loop

    @staticmethod
    def around(handler: AsyncCallbackHandler, loop: asyncio.AbstractEventLoop) -> _OnLoop:
        # LangChain asks handlers by type whether they want streamed tokens (astream_events,
        # and the v2 event protocol): the stand-in answers as its handler does.
        streaming = hasattr(handler, "tap_output_iter") and hasattr(handler, "tap_output_aiter")
        v2 = _V2_STREAMING is not None and isinstance(handler, _V2_STREAMING)
        return _STAND_INS[streaming, v2](handler, loop)

    def __getattr__(self, name: str) -> Any:
        # Anything else (the handler's name, its own attributes) is the handler's. Read
        # without __getattr__: before __init__ (a copy) there is no handler, not a recursion.
        return getattr(object.__getattribute__(self, "_handler"), name)

    def _run(self, event: str, /, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._handler, event)(*args, **kwargs)
        if not asyncio.iscoroutine(result):
            return result
        try:
            pending = asyncio.run_coroutine_threadsafe(result, self._loop)
        except RuntimeError:  # the loop is closed: nobody listens any more
            result.close()
            return None
        while True:
            try:
                return pending.result(timeout=_LOOP_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if self._loop.is_closed() or not self._loop.is_running():
                    pending.cancel()
                    return None


class _StreamingOnLoop(_OnLoop):
    def tap_output_iter(self, run_id: Any, output: Iterator[Any]) -> Iterator[Any]:
        return self._handler.tap_output_iter(run_id, output)  # type: ignore[attr-defined,no-any-return]

    def tap_output_aiter(self, run_id: Any, output: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return self._handler.tap_output_aiter(run_id, output)  # type: ignore[attr-defined,no-any-return]


_STAND_INS: dict[tuple[bool, bool], type[_OnLoop]] = {
    (False, False): _OnLoop,
    (True, False): _StreamingOnLoop,
}
if _V2_STREAMING is not None:
    _STAND_INS[False, True] = type("_V2OnLoop", (_OnLoop, _V2_STREAMING), {})
    _STAND_INS[True, True] = type("_V2StreamingOnLoop", (_StreamingOnLoop, _V2_STREAMING), {})


def _forwarder(event: str) -> Callable[..., Any]:
    # Events take keyword arguments of any name (``name=`` is the run's name): the event's own
    # name is bound here, never passed by keyword.
    def forward(self: _OnLoop, /, *args: Any, **kwargs: Any) -> Any:
        return self._run(event, *args, **kwargs)

    forward.__name__ = event
    return forward


def _flag(name: str) -> property:
    return property(lambda self: getattr(self._handler, name))


for _name in dir(AsyncCallbackHandler):
    if _name.startswith("on_"):
        setattr(_OnLoop, _name, _forwarder(_name))
    elif _name.startswith("ignore_") or _name in ("raise_error", "run_inline"):
        setattr(_OnLoop, _name, _flag(_name))
del _name
