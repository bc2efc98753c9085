"""Setting up the tiers' LangChain clients: logprobs, timeouts, retries, the wire guard.

The one home of everything the library knows about ``ChatOllama``, ``ChatBedrockConverse`` and
``ChatBedrock`` as clients. The router never changes the objects you pass: it works on copies
made here, with fresh HTTP clients configured so that

* a timeout **cancels** the request in the client itself (httpx for Ollama, botocore
  ``connect_timeout``/``read_timeout`` for Bedrock): the connection is closed and nothing keeps
  running or holds a thread;
* exactly one layer retries: the router (its ``cloud_retry``), so botocore's own retries are
  switched off and the routing record counts the real HTTP attempts;
* the escalation guard also sees the request exactly as botocore serialised it, and can stop
  it before it leaves the process (:class:`~confidence_router.errors.EscalationBlockedError`).

Models of other classes are used as given (the router then applies its timeouts between
streamed chunks and by asyncio cancellation only).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableBinding
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.runnables.retry import RunnableRetry

from confidence_router._loop_cache import per_loop_copy
from confidence_router.errors import (
    EscalationBlockedError,
    IncompleteAnswerError,
    RoutingConfigError,
)
from confidence_router.signals import NEEDS_TOP_LOGPROBS

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "ainvoke_directly",
    "bound_kwargs",
    "client_timeouts",
    "configure_cloud",
    "configure_local",
    "configure_store",
    "conversation_check",
    "invoke_directly",
    "is_bedrock",
    "is_ollama",
    "model_name",
    "per_loop",
    "require_final_chunk",
    "top_logprobs_kwargs",
    "unwrap",
    "with_logprobs",
    "without_retries",
]

#: Alternatives per generated token requested from the local tier (for the top-k signals).
TOP_LOGPROBS = 5

#: Seconds to wait for a TCP connection before giving up (capped by the tier's timeout).
DEFAULT_CONNECT_TIMEOUT = 10.0


def unwrap(model: Any) -> Any:
    """The model inside its wrappers: ``bind()`` / ``bind_tools()`` / ``with_retry()`` (any
    level) and ``with_fallbacks()`` (its primary model); or the model itself."""
    while True:
        if isinstance(model, RunnableBindingBase):
            model = model.bound
        elif isinstance(model, RunnableWithFallbacks):
            model = model.runnable
        else:
            return model


def bound_kwargs(model: Any) -> dict[str, Any]:
    """The call kwargs ``model``'s ``bind()`` wrappers add to every call (an outer binding's
    value wins, as when LangChain merges them)."""
    merged: dict[str, Any] = {}
    while True:
        if isinstance(model, RunnableBindingBase):
            for key, value in (model.kwargs or {}).items():
                merged.setdefault(key, value)
            model = model.bound
        elif isinstance(model, RunnableWithFallbacks):
            model = model.runnable
        else:
            return merged


def without_retries(model: Any) -> Any:
    """``model`` without the ``with_retry()`` wrappers around it (or its fallbacks): the
    router retries the cloud itself (``cloud_retry``), one layer, each attempt counted in the
    record and reserved in the budget; retries stacked under it would resend requests unseen."""
    if isinstance(model, RunnableRetry):
        return without_retries(model.bound)
    if isinstance(model, RunnableBindingBase):
        inner = without_retries(model.bound)
        return model if inner is model.bound else model.model_copy(update={"bound": inner})
    if isinstance(model, RunnableWithFallbacks):
        primary = without_retries(model.runnable)
        fallbacks = [without_retries(f) for f in model.fallbacks]
        if primary is model.runnable and all(map(operator.is_, fallbacks, model.fallbacks)):
            return model
        return model.model_copy(update={"runnable": primary, "fallbacks": fallbacks})
    return model


#: Fields of a chat model whose values go into every request body (a system prompt, extra
#: request fields): besides the messages, what a request may carry from settings.
_REQUEST_FIELDS = (
    "model_kwargs", "additional_model_request_fields", "system", "stop_sequences",
    "request_metadata", "guardrail_config", "guardrails", "output_config", "raw_blocks",
)


def request_extras(model: Any) -> list[Any]:
    """What every request of ``model`` carries besides the messages, as JSON-like values.

    The kwargs bound at every level of wrappers (``bind``/``bind_tools``/
    ``with_structured_output`` and ``with_retry``; every model of ``with_fallbacks``): tools,
    tool choice, response formats and schemas; and the models' own request fields
    (``model_kwargs``, ``additional_model_request_fields``, ``system``, ``request_metadata``,
    stop sequences, guardrail and output settings). The escalation guard
    judges these with the messages, whatever client sends them.
    """
    extras: list[Any] = []
    pending, seen = [model], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RunnableBindingBase):
            if current.kwargs:
                extras.append(dict(current.kwargs))
            pending.append(current.bound)
        elif isinstance(current, RunnableWithFallbacks):
            pending.extend([current.runnable, *current.fallbacks])
        else:
            extras.extend(
                value for name in _REQUEST_FIELDS
                if (value := getattr(current, name, None)) and not _is_default(current, name, value)
            )
    return extras


def _is_default(model: Any, name: str, value: Any) -> bool:
    """A field left at its default (e.g. ChatBedrock's empty ``guardrails`` settings, which
    send nothing)."""
    field = getattr(type(model), "model_fields", {}).get(name)
    try:
        return field is not None and value == field.get_default(call_default_factory=True)
    except Exception:  # noqa: BLE001 - a default that cannot be built: judge the value
        return False


def _rewrap(model: Any, inner: Any) -> Any:
    """``model``'s wrappers (see :func:`unwrap`) around ``inner`` instead of its model."""
    if isinstance(model, RunnableBindingBase):
        bound = _rewrap(model.bound, inner)
        return model if bound is model.bound else model.model_copy(update={"bound": bound})
    if isinstance(model, RunnableWithFallbacks):
        primary = _rewrap(model.runnable, inner)
        return model if primary is model.runnable else model.model_copy(
            update={"runnable": primary})
    return inner


def model_name(model: Any) -> str:
    """The model id a tier reports (``model``, ``model_id`` or ``model_name``)."""
    model = unwrap(model)
    for attr in ("model", "model_id", "model_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def is_ollama(model: Any) -> bool:
    return type(unwrap(model)).__name__ == "ChatOllama"


def is_bedrock(model: Any) -> bool:
    return type(unwrap(model)).__name__ in {"ChatBedrockConverse", "ChatBedrock"}


def conversation_check(model: Any) -> Callable[[Sequence[Any]], str | None] | None:
    """A check of whether the cloud tier's client can send a conversation as it is.

    The check formats the messages as the client will and returns why they cannot be sent,
    or ``None``:

    * what the client's formatter refuses before sending (it raises ``ValueError``): content
      blocks the API has no counterpart for, an image given by a web URL; and, for
      ``ChatBedrock`` on an Anthropic model, system messages between turns;
    * for ``ChatBedrock`` on an Anthropic model (the invoke API), also a turn that would go
      out empty: it sends a blank message as ``{"role": "user", "content": ""}``, which
      Bedrock refuses ("all messages must have non-empty content except for the optional
      final assistant message"; whitespace-only text blocks likewise). ``ChatBedrockConverse``
      pads blank text itself.

    * for both Bedrock clients, a tool result (``ToolMessage``) answering a call the turn
      before did not make: Bedrock refuses it ("Expected toolResult blocks ... for the
      following Ids").

    ``None`` (no check) for other clients (Ollama takes what it is given). The router does
    not rewrite conversations: such a query is not escalated.
    """
    formatting = _bedrock_formatting_check(model)
    if formatting is None:
        return None

    def check(messages: Sequence[Any]) -> str | None:
        return _unanswered_tool_result(messages) or formatting(messages)

    return check


def _unanswered_tool_result(messages: Sequence[Any]) -> str | None:
    """Why a tool result answers no call of the assistant turn before it, or ``None``.

    Consecutive assistant messages form one turn (the clients merge them); system messages
    are not turns.
    """
    calls: set[Any] = set()
    in_assistant_turn = False
    for position, message in enumerate(messages):
        kind = getattr(message, "type", None)
        if kind == "system":
            continue
        if kind == "ai":
            if not in_assistant_turn:
                calls, in_assistant_turn = set(), True
            calls.update(call.get("id") for call in getattr(message, "tool_calls", None) or ())
            content = getattr(message, "content", None)
            if isinstance(content, list):  # calls kept as content blocks (Anthropic's form)
                calls.update(
                    block.get("id") for block in content
                    if isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call")
                )
            continue
        in_assistant_turn = False
        if kind == "tool" and getattr(message, "tool_call_id", None) not in calls:
            return (
                f"message {position} (tool) answers tool call "
                f"{getattr(message, 'tool_call_id', None)!r}, which the assistant turn before "
                "it did not make; Bedrock refuses that"
            )
    return None


def _bedrock_formatting_check(model: Any) -> Callable[[Sequence[Any]], str | None] | None:
    """The formatting part of :func:`conversation_check` (a no-op check for a Bedrock client
    whose formatting is not checked); ``None`` for other clients."""
    inner = unwrap(model)
    kind = type(inner).__name__
    if kind == "ChatBedrockConverse" and getattr(inner, "raw_blocks", None) is None:
        from langchain_aws.chat_models.bedrock_converse import _messages_to_bedrock

        def converse(messages: Sequence[Any]) -> list[dict[str, Any]]:
            return _messages_to_bedrock(  # type: ignore[no-any-return]
                list(messages), inner.system, model_id=inner._get_base_model(),
                provider=inner.provider,
            )[0]

        return _formatting_check(converse, kind, empty_turns=False)
    if kind == "ChatBedrockConverse":
        return _no_refusal
    if kind != "ChatBedrock":
        return None
    if getattr(inner, "beta_use_converse_api", False):
        return _no_refusal
    try:
        anthropic = bool(inner._model_is_anthropic)
    except Exception:  # noqa: BLE001 - an ARN without provider: the client raises on its own
        return None
    if not anthropic:
        return None  # other providers' formats on the invoke API: not checked
    from langchain_aws.chat_models.bedrock import ChatPromptAdapter

    def invoke(messages: Sequence[Any]) -> list[dict[str, Any]]:
        return ChatPromptAdapter.format_messages("anthropic", list(messages))[1]  # type: ignore[return-value]

    return _formatting_check(invoke, kind, empty_turns=True)


def _no_refusal(messages: Sequence[Any]) -> str | None:
    return None


def _formatting_check(
    format_messages: Callable[[Sequence[Any]], list[dict[str, Any]]], client: str,
    *, empty_turns: bool,
) -> Callable[[Sequence[Any]], str | None]:
    def check(messages: Sequence[Any]) -> str | None:
        try:
            formatted = format_messages(messages)
        except ValueError as error:  # what the client raises, before sending, for such input
            return f"{client} cannot format the conversation ({error})"
        except Exception:  # noqa: BLE001 - anything else: the client reports it on the call
            return None
        if not empty_turns:
            return None
        for position, turn in enumerate(formatted):
            final_assistant = position == len(formatted) - 1 and turn.get("role") == "assistant"
            if not final_assistant and _is_empty_turn(turn.get("content")):
                return (
                    f"message {position} ({turn.get('role')}) would reach Bedrock empty, "
                    "which it refuses"
                )
        return None

    return check


def _is_empty_turn(content: Any) -> bool:
    """An Anthropic turn's content that Bedrock refuses: blank text, no blocks, or a text
    block without visible text."""
    if isinstance(content, str):
        return not content.strip()
    if not isinstance(content, list) or not content:
        return True
    return any(
        isinstance(block, dict) and block.get("type") == "text"
        and not str(block.get("text") or "").strip()
        for block in content
    )


# Fields that hold clients built by the model's validator: rebuilt, never copied.
_CLIENT_FIELDS = ("client", "bedrock_client", "async_client")


def _rebuild(model: Any, **changes: Any) -> Any:
    """A new instance of the same pydantic model with ``changes``: its validators run again,
    so it creates fresh HTTP clients (``model_copy`` would share the old ones)."""
    values = {
        name: getattr(model, name)
        for name in model.model_fields_set
        if name not in _CLIENT_FIELDS
    }
    values.update(changes)
    return type(model).model_validate(values)


def with_logprobs(model: Any) -> Any:
    """``model`` set up to report per-token logprobs.

    ``ChatOllama`` and ``ChatOpenAI`` both expose a ``logprobs`` field; when it is unset we take
    a cheap copy with it switched on (the top alternatives are asked for per call, only when
    the routing signal needs them: :func:`top_logprobs_kwargs`). Other models are returned unchanged: their confidence is
    then unknown, and the ``on_unknown`` policy applies.
    """
    inner = unwrap(model)
    model_fields = getattr(type(inner), "model_fields", {})
    update: dict[str, Any] = {}
    if "logprobs" in model_fields and not getattr(inner, "logprobs", None):
        update["logprobs"] = True
    if not update:
        return model
    return _rewrap(model, inner.model_copy(update=update))


def top_logprobs_kwargs(model: Any, signal: str) -> dict[str, Any]:
    """Extra call kwargs for the local tier: the top alternatives per token when ``signal``
    reads them (margins, entropies) and the model can return them but was not set up to."""
    inner = unwrap(model)
    if signal not in NEEDS_TOP_LOGPROBS or getattr(inner, "top_logprobs", None):
        return {}
    if "top_logprobs" not in getattr(type(inner), "model_fields", {}):
        return {}
    return {"top_logprobs": TOP_LOGPROBS}


def configure_local(model: Any, timeout: float | None) -> Any:
    """The local tier as the router uses it: logprobs on and, for ``ChatOllama``, an httpx
    client whose connect/read timeout is ``timeout`` (a hung server fails the read instead of
    blocking forever; the connection is closed). Every model of a ``with_fallbacks()`` is set
    up alike."""
    return _fallbacks_set_up(
        _configure_local_model(model, timeout), lambda f: configure_local(f, timeout)
    )


def _fallbacks_set_up(model: Any, set_up: Callable[[Any], Any]) -> Any:
    """``model`` with ``set_up`` applied to the fallbacks of every ``with_fallbacks()`` among
    its wrappers (the primary model is set up through :func:`unwrap` / :func:`_rewrap`)."""
    if isinstance(model, RunnableBindingBase):
        bound = _fallbacks_set_up(model.bound, set_up)
        return model if bound is model.bound else model.model_copy(update={"bound": bound})
    if isinstance(model, RunnableWithFallbacks):
        primary = _fallbacks_set_up(model.runnable, set_up)
        fallbacks = [set_up(fallback) for fallback in model.fallbacks]
        if primary is model.runnable and all(map(operator.is_, fallbacks, model.fallbacks)):
            return model
        return model.model_copy(update={"runnable": primary, "fallbacks": fallbacks})
    return model


def _configure_local_model(model: Any, timeout: float | None) -> Any:
    model = with_logprobs(model)
    inner = unwrap(model)
    if timeout is None or not is_ollama(inner):
        return model
    client_kwargs = dict(inner.client_kwargs or {})
    timeout = _in_force(client_kwargs, timeout)
    client_kwargs["timeout"] = _httpx_timeout(timeout)
    # The sync client also gets a deadline for the whole answer (the async paths have one of
    # their own): a model that keeps producing tokens slowly cannot hold a sync invoke past
    # the timeout either.
    sync_kwargs = dict(inner.sync_client_kwargs or {})
    hooks: dict[str, list[Any]] = {"request": [], "response": []}
    # The sync client's hooks replace the shared ones: carry yours over (each once, also
    # when a model is configured again, which gets one deadline, the new one).
    for source in (client_kwargs.get("event_hooks"), sync_kwargs.get("event_hooks")):
        for event, callbacks in (source or {}).items():
            kept = hooks.setdefault(event, [])
            kept.extend(
                c for c in callbacks
                if c not in kept and not isinstance(getattr(c, "__self__", None), _AnswerDeadline)
            )
    deadline = _AnswerDeadline(timeout)
    hooks["request"].append(deadline.start)
    hooks["response"].append(deadline.watch)
    sync_kwargs["event_hooks"] = hooks
    return _rewrap(
        model, _rebuild(inner, client_kwargs=client_kwargs, sync_client_kwargs=sync_kwargs)
    )


def _in_force(client_kwargs: dict[str, Any], timeout: float) -> float:
    """The timeout in force: a client's own numeric ``timeout`` when it is stricter."""
    own = client_kwargs.get("timeout")
    if isinstance(own, (int, float)) and not isinstance(own, bool) and 0 < own < timeout:
        return float(own)
    return timeout


def configure_probe(probe: Any, timeout: float | None) -> Any:
    """The pre-check probe with the local tier's timeout on its ``ChatOllama`` (the same
    server as the local tier: a hung one fails the probe instead of holding the call) and on
    its knowledge store's ``OllamaEmbeddings`` (a hung embedding server fails the search)."""
    model = getattr(probe, "model", None)
    if timeout is None or model is None or not hasattr(probe, "model_post_init"):
        return probe
    update: dict[str, Any] = {}
    if is_ollama(model):
        configured = configure_local(model, timeout)
        if configured is not model:
            update["model"] = configured
    store = getattr(probe, "store", None)
    configured_store = configure_store(store, timeout)
    if configured_store is not store:
        update["store"] = configured_store
    if not update:
        return probe
    probe = probe.model_copy(update=update)
    probe.model_post_init(None)  # the probe builds its own copy of the model there
    return probe


def configure_store(store: Any, timeout: float | None) -> Any:
    """A knowledge store with ``timeout`` on its ``OllamaEmbeddings`` (a hung embedding
    server fails the search or the add instead of holding the call); the store itself when
    its embedder is of another kind or has a stricter timeout of its own. The copy shares
    the store's Chroma collection."""
    embeddings = getattr(store, "embeddings", None)
    if (timeout is None or type(embeddings).__name__ != "OllamaEmbeddings"
            or not hasattr(store, "with_embeddings")):
        return store
    client_kwargs = dict(embeddings.client_kwargs or {})  # type: ignore[union-attr]
    if _in_force(client_kwargs, timeout) != timeout:  # its own, stricter one holds
        return store
    client_kwargs["timeout"] = _httpx_timeout(timeout)
    return store.with_embeddings(_rebuild(embeddings, client_kwargs=client_kwargs))


def client_attempts(model: Any) -> int | None:
    """How many HTTP attempts the Bedrock client of ``model`` makes per call, if it sets it.

    1 for the clients the router configures (botocore retries off). For your own boto3
    client, its ``Config(retries=...)``: ``total_max_attempts``, or ``max_attempts`` + 1;
    ``None`` when it relies on botocore's defaults (several attempts). Models other than
    Bedrock's: 1 (no client retries the router knows of).
    """
    config = _client_config(model)
    if config is _NOT_BEDROCK:
        return 1
    retries = getattr(config, "retries", None) or {}
    total = retries.get("total_max_attempts")
    if isinstance(total, int):
        return total
    extra = retries.get("max_attempts")
    return extra + 1 if isinstance(extra, int) else None


def client_timeouts(model: Any) -> tuple[float | None, float | None]:
    """``(connect_timeout, read_timeout)`` of the Bedrock client of ``model`` in seconds
    (``(None, None)`` for other models). The clients the router configures have the tier's
    timeout; your own boto3 client has its ``Config``'s (botocore's default: 60 s each)."""
    config = _client_config(model)
    return getattr(config, "connect_timeout", None), getattr(config, "read_timeout", None)


_NOT_BEDROCK = object()


def _client_config(model: Any) -> Any:
    """The botocore ``Config`` of the Bedrock client of ``model`` (``None`` if unreadable),
    or ``_NOT_BEDROCK``."""
    inner = unwrap(model)
    if not is_bedrock(inner):
        return _NOT_BEDROCK
    return getattr(getattr(getattr(inner, "client", None), "meta", None), "config", None)


class _AnswerDeadline:
    """httpx event hooks: a response body still streaming ``timeout`` seconds after its
    request started fails with ``httpx.ReadTimeout`` (closing the connection, so the server
    stops generating)."""

    _KEY = "confidence_router_deadline"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def start(self, request: Any) -> None:
        request.extensions[self._KEY] = time.monotonic() + self.timeout

    def watch(self, response: Any) -> None:
        deadline = response.request.extensions.get(self._KEY)
        if deadline is not None:
            response.stream = _deadline_stream_class()(
                response.stream, deadline, self.timeout, response.request
            )


@functools.cache
def _deadline_stream_class() -> type:
    """``_DeadlineStream``, built on first use (httpx is imported only then)."""
    import httpx

    class _DeadlineStream(httpx.SyncByteStream):
        """A sync response byte stream that raises ``httpx.ReadTimeout`` past its deadline."""

        def __init__(self, stream: Any, deadline: float, timeout: float, request: Any) -> None:
            self._stream, self._deadline = stream, deadline
            self._timeout, self._request = timeout, request

        def __iter__(self) -> Any:
            for chunk in self._stream:
                if time.monotonic() > self._deadline:
                    raise httpx.ReadTimeout(
                        f"no complete answer within {self._timeout:g} s", request=self._request
                    )
                yield chunk

        def close(self) -> None:
            self._stream.close()

    return _DeadlineStream


def _httpx_timeout(timeout: float) -> Any:
    import httpx

    return httpx.Timeout(timeout, connect=min(timeout, DEFAULT_CONNECT_TIMEOUT))


def configure_cloud(
    model: Any,
    timeout: float | None,
    wire_guard: Callable[[list[str], list[str]], str | None] | None = None,
) -> Any:
    """The cloud tier as the router uses it.

    For ``ChatBedrockConverse`` / ``ChatBedrock`` built from settings (not from your own boto3
    ``client``): a fresh boto3 client with botocore retries off (the router retries) and, with
    ``timeout``, ``read_timeout=timeout`` and ``connect_timeout=min(timeout, 10)``; with
    ``wire_guard``, every request body is checked just before it is sent.
    """
    inner = unwrap(model)
    if not is_bedrock(inner):
        return model
    from botocore.config import Config

    override: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    if timeout is not None:
        override.update(
            read_timeout=timeout, connect_timeout=min(timeout, DEFAULT_CONNECT_TIMEOUT)
        )
    config = Config(**override)
    if inner.config is not None:
        config = inner.config.merge(config)
    # max_retries/timeout fields would be merged over our config by the client: drop them.
    try:
        rebuilt = _rebuild(inner, config=config, max_retries=None, timeout=None)
    except ValueError:
        # Built around your own boto3 client, and the model's settings cannot build one (no
        # region or credentials of their own): keep yours as it is.
        return model
    if _endpoint(rebuilt.client) != _endpoint(inner.client):
        # Built around your own boto3 client (another region, endpoint or credentials):
        # keep it as it is; its own timeouts and retries apply.
        return model
    if wire_guard is not None:
        rebuilt.client.meta.events.register(
            "before-call.bedrock-runtime", _WireGuard(wire_guard), unique_id="confidence-router"
        )
    return _rewrap(model, rebuilt)


def _endpoint(client: Any) -> tuple[Any, ...]:
    """What identifies where and as whom a boto3 client calls: region, endpoint, credentials
    (their source, and the key id of static credentials; refreshable ones are not touched, so
    nothing is fetched)."""
    meta = getattr(client, "meta", None)
    creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    key = getattr(creds, "access_key", None) if type(creds).__name__ == "Credentials" else None
    return (
        getattr(meta, "region_name", None),
        getattr(meta, "endpoint_url", None),
        type(creds).__name__,
        getattr(creds, "method", None),
        key,
    )


class _WireGuard:
    """botocore ``before-call`` hook: the guard judges the serialised request body."""

    def __init__(self, check: Callable[[list[str], list[str]], str | None]) -> None:
        self.check = check

    def __call__(self, params: dict[str, Any], **_: Any) -> None:
        from confidence_router.guards import json_strings

        body = params.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body).decode("utf-8", errors="replace")
        try:
            payload = json.loads(body) if body else {}
        except (TypeError, ValueError):
            raise EscalationBlockedError("request body is not JSON the guard can read") from None
        strings, unreadable = json_strings(payload)
        try:
            verdict = self.check(strings, unreadable)
        except Exception as error:
            raise EscalationBlockedError(
                f"guard failed ({type(error).__name__}: {error})"
            ) from error
        if verdict:
            raise EscalationBlockedError(verdict)


# -- one async client per event loop ---------------------------------------------------------

_LOOP_ATTRIBUTE = "_confidence_router_clients"


def per_loop(model: Any) -> Any:
    """``model`` with async HTTP clients usable on the running event loop.

    An httpx ``AsyncClient`` keeps connections bound to the loop that opened them; after that
    loop closes (a second ``asyncio.run()``), they fail. The ``ChatOllama`` inside ``model``
    gets a copy with fresh clients per loop (:func:`~confidence_router._loop_cache.
    per_loop_copy`), keyed by the ChatOllama itself rather than its binding:
    ``bind_tools`` / ``with_structured_output`` make a new binding per call around the same
    model (the proxy binds per request), which must not add a copy each.
    """
    if not is_ollama(model):
        return model
    return _rewrap(model, per_loop_copy(unwrap(model), _LOOP_ATTRIBUTE, _rebuild))


def bind_tools(model: Any, tools: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``model.bind_tools(tools)``, keeping any kwargs already bound on it."""
    target = unwrap(model)
    if not hasattr(target, "bind_tools"):
        from confidence_router.errors import InvalidTypeError

        raise InvalidTypeError(f"{type(target).__name__} does not support bind_tools")
    # The tier's earlier tools and tool choice are replaced, as a second bind_tools on the
    # model itself would replace them.
    return keep_bound_kwargs(target.bind_tools(tools, **kwargs), model, TOOL_KWARGS)


def keep_bound_kwargs(bound: Any, model: Any, replaced: frozenset[str]) -> Any:
    """``bound`` (a new binding of ``model``'s inner model) with the other kwargs ``model``
    had bound (e.g. Ollama's ``keep_alive``), except those in ``replaced`` or set anew: bound
    outside, they would override the new binding's own (an outer binding's kwargs win)."""
    if not isinstance(model, RunnableBinding) or not model.kwargs:
        return bound
    new = getattr(bound, "kwargs", {})
    kept = {k: v for k, v in model.kwargs.items() if k not in new and k not in replaced}
    return bound.bind(**kept) if kept else bound


#: Tool names Bedrock accepts (Converse's ``toolSpec.name``; Anthropic's on InvokeModel).
_BEDROCK_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def checked_tool_choice(cloud: Any, tools: Sequence[Any], tool_choice: Any) -> Any:
    """``tool_choice`` as the tiers get it for ``tools``, checked before anything is bound or
    sent: a :class:`~confidence_router.errors.RoutingConfigError` for a tool LangChain cannot
    format, a tool name a Bedrock cloud would refuse, or a choice the tiers cannot honour.

    * ``None``, ``"auto"``: the model decides; a tool's name (or a dict naming one, in
      OpenAI's, Anthropic's or Converse's form): that tool must be called;
    * ``"any"`` / ``"required"``: some tool must be called (``"any"`` on Bedrock, whose
      clients would read ``"required"`` as a tool of that name);
    * ``True``: the one bound tool must be called (LangChain's meaning: an error with several);
    * ``"none"``: refused with a Bedrock cloud, which has no such choice (bind no tools instead).

    >>> checked_tool_choice(None, [{"name": "lookup", "parameters": {}}], True)
    'lookup'
    """
    from langchain_core.utils.function_calling import convert_to_openai_tool

    names: list[str] = []
    for tool in tools:
        try:
            names.append(convert_to_openai_tool(tool)["function"]["name"])
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise RoutingConfigError(f"cannot use {tool!r} as a tool: {error}") from error
    bedrock = cloud is not None and is_bedrock(unwrap(cloud))
    if bedrock:
        refused = [n for n in names if not _BEDROCK_TOOL_NAME.fullmatch(n)]
        if refused:
            raise RoutingConfigError(
                f"Bedrock refuses the tool names {refused}: 1-64 letters, digits, '_' or '-'"
            )
    if tool_choice is None or tool_choice == "auto":
        return tool_choice
    if tool_choice is True:
        if len(names) != 1:
            raise RoutingConfigError(
                f"tool_choice=True forces the one bound tool, but {len(names)} are bound: "
                "name the tool, or use 'any'"
            )
        return names[0]
    if tool_choice in ("any", "required"):
        return "any" if bedrock else tool_choice
    if tool_choice == "none" and not bedrock:
        return tool_choice
    named = _forced_name(tool_choice)
    if named is None and isinstance(tool_choice, dict):
        return tool_choice  # a form that names no tool ({"any": {}}, {"type": "any"}, ...)
    if named not in names:
        raise RoutingConfigError(
            f"tool_choice {tool_choice!r} is not one the tiers can honour: use None, 'auto', "
            f"'any', 'required' or the name of a bound tool ({', '.join(names) or 'none bound'})"
        )
    return tool_choice


def _forced_name(tool_choice: Any) -> str | None:
    """The tool a choice names: a string, or a dict in OpenAI's (``function.name``),
    Anthropic's (``name``) or Converse's (``tool.name``) form."""
    if isinstance(tool_choice, str):
        return tool_choice
    if not isinstance(tool_choice, dict):
        return None
    for holder in (tool_choice.get("function"), tool_choice, tool_choice.get("tool")):
        name = holder.get("name") if isinstance(holder, dict) else None
        if isinstance(name, str):
            return name
    return None


#: Kwargs a ``bind_tools`` sets on a model (replaced, never merged, by a later one).
TOOL_KWARGS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "tool_config"})


def forced_tool_check(tool_choice: Any) -> Callable[[Any], str | None] | None:
    """The answer check for ``bind_tools(tools, tool_choice=...)``: when the choice forces a
    tool call (a tool's name, ``"any"``, ``"required"``, ``True``, or a dict naming a tool),
    a check that returns why an answer without that call cannot be used; else ``None``.

    ``ChatOllama`` cannot force a tool call (it ignores ``tool_choice``); the router checks
    the local answer instead and escalates one that did not make the call.

    >>> check = forced_tool_check("get_weather")
    >>> check(type("M", (), {"tool_calls": []})())
    "no call of the forced tool 'get_weather'"
    """
    name: str | None
    if tool_choice in ("any", "required") or tool_choice is True:
        name = None
    elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", ""):
        name = tool_choice
    elif isinstance(tool_choice, dict):
        name = _forced_name(tool_choice)
        if name is None:
            return None
    else:
        return None

    def check(message: Any) -> str | None:
        calls = [call.get("name") for call in getattr(message, "tool_calls", None) or ()]
        if name is None:
            return None if calls else "no tool call, although one was forced (tool_choice)"
        return None if name in calls else f"no call of the forced tool {name!r}"

    return check


# -- calling a tier without LangChain's per-call machinery ---------------------------------------

#: Call kwargs LangChain's ``generate()`` takes for LangSmith and never passes to the provider.
_TRACING_KWARGS = ("ls_structured_output_format", "structured_output_format")


@functools.cache
def _langchain_steps() -> tuple[Callable[..., Any], Callable[..., Any], Callable[[], Any]] | None:
    """The three steps of ``BaseChatModel.invoke`` that change what is sent or returned, from
    langchain-core itself (so they cannot drift from it): input normalisation, the answer's
    ``response_metadata``, the global LLM cache. ``None`` where this langchain-core lacks one
    (then every call goes through ``invoke()``)."""
    try:
        from langchain_core.globals import get_llm_cache
        from langchain_core.language_models._utils import _normalize_messages
        from langchain_core.language_models.chat_models import _gen_info_and_msg_metadata
    except ImportError:  # pragma: no cover - a langchain-core that moved them
        return None
    return _normalize_messages, _gen_info_and_msg_metadata, get_llm_cache


def _direct_target(
    model: Any, config: Any, kwargs: dict[str, Any], *, async_api: bool
) -> tuple[Any, dict[str, Any]] | None:
    """The chat model to call ``_generate``/``_agenerate`` on, and its merged call kwargs, when
    its ``invoke()`` would add nothing but bookkeeping; else ``None``.

    ``invoke()`` costs ~0.3 ms of CPU per call on top of the request (callback managers, run
    ids, LangSmith parameters, signature inspection) even when nobody listens: a third of what
    a local answer from a fast server costs. It is skipped only when it would do nothing else:
    no callbacks anywhere (the router's run has none: ``config`` is ``None``; the model has no
    ``callbacks`` and is not ``verbose``), no LLM cache (the model's or the global one), no
    rate limiter, no streaming inside invoke, the default output format, and wrappers that are
    plain ``bind()`` kwargs (``bind_tools`` and the like).
    """
    if config is not None or "stream" in kwargs:
        return None
    steps = _langchain_steps()
    if steps is None:
        return None
    bound: dict[str, Any] = {}
    while isinstance(model, RunnableBinding):
        kind = type(model)
        if (
            kind.invoke is not RunnableBinding.invoke
            or kind.ainvoke is not RunnableBinding.ainvoke
            or model.config
            or model.config_factories
        ):
            return None
        for key, value in model.kwargs.items():
            bound.setdefault(key, value)  # the outer binding wins, as in LangChain
        model = model.bound
    if not isinstance(model, BaseChatModel):
        return None
    values = model.__dict__
    if (
        values.get("callbacks")
        or values.get("verbose")
        or values.get("rate_limiter") is not None
        or values.get("streaming") is True
        or values.get("output_version") not in (None, "v0")
        or (values.get("cache") is not False
            and (values.get("cache") is not None or steps[2]() is not None))
    ):
        return None
    if async_api and type(model)._agenerate is BaseChatModel._agenerate:
        return None  # LangChain would run the sync client in its executor: keep that path
    merged = {**bound, **kwargs} if bound else dict(kwargs)
    # invoke() is always given the call's ``stop``, which replaces a bound one (even None).
    for key in ("stop", *_TRACING_KWARGS):
        merged.pop(key, None)
    return model, merged


def _answer_message(result: Any) -> Any:
    """The message of a ``_generate`` result, with the ``response_metadata`` ``invoke()`` gives
    it (the generation's info and the result's ``llm_output`` merged in)."""
    generation = result.generations[0]
    message = generation.message
    message.response_metadata = _langchain_steps()[1](generation)  # type: ignore[index]
    if len(result.generations) == 1 and result.llm_output is not None:
        message.response_metadata = {**result.llm_output, **message.response_metadata}
    return message


def require_final_chunk(model: Any, answer: Any) -> None:
    """Refuse a ``ChatOllama`` answer that did not end with Ollama's final chunk (``done``).

    Ollama streams an answer as JSON lines and ends it with a ``"done": true`` line.
    ``ChatOllama`` (stream or invoke, which streams too) accepts a body that simply ends: a
    connection closed mid-answer without chunked framing (a proxy, a crashed server) gives
    the text so far, with its logprobs, as if it were the whole answer, and a confident
    prefix would be served. Such an answer is a failed one.

    ``answer`` is the answer message, or the list of its streamed chunks.

    Raises:
        IncompleteAnswerError: the answer has no final chunk (classified ``disconnected``).

    >>> from langchain_core.messages import AIMessage
    >>> require_final_chunk(object(), AIMessage("Paris"))  # not a ChatOllama: not checked
    """
    if not is_ollama(model):
        return
    parts = answer if isinstance(answer, Sequence) else (answer,)
    for part in reversed(parts):  # the final chunk is (one of) the last
        metadata = getattr(part, "response_metadata", None)
        if isinstance(metadata, Mapping) and metadata.get("done") is True:
            return
    raise IncompleteAnswerError(
        "the answer ended before Ollama's final chunk (\"done\": true): the connection "
        "closed mid-answer, so the partial answer is not used"
    )


def invoke_directly(
    model: Any, messages: Sequence[Any], config: Any, stop: list[str] | None, kwargs: dict[str, Any]
) -> Any:
    """``model.invoke(messages, config, stop=stop, **kwargs)``: the same request and the same
    answer, without LangChain's per-call bookkeeping when nothing would observe it (see
    :func:`_direct_target`). The answer's ``id`` is left unset: the router's own run names it."""
    target = _direct_target(model, config, kwargs, async_api=False)
    if target is None:
        return model.invoke(messages, config, stop=stop, **kwargs)
    inner, merged = target
    normalise = _langchain_steps()[0]  # type: ignore[index]
    return _answer_message(inner._generate(normalise(messages), stop=stop, **merged))


def ainvoke_directly(
    model: Any,
    ainvoke: Callable[..., Any],
    messages: Sequence[Any],
    config: Any,
    stop: list[str] | None,
    kwargs: dict[str, Any],
) -> Any:
    """The awaitable of :func:`invoke_directly`; ``ainvoke`` is how the model is awaited
    otherwise (its own ``ainvoke``, or in a thread of its own)."""
    target = _direct_target(model, config, kwargs, async_api=True)
    if target is None:
        return ainvoke(messages, config, stop=stop, **kwargs)
    inner, merged = target
    normalise = _langchain_steps()[0]  # type: ignore[index]
    return _agenerate_message(inner._agenerate(normalise(messages), stop=stop, **merged))


async def _agenerate_message(result: Any) -> Any:
    return _answer_message(await result)
