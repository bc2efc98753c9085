"""The routing proxy: an ASGI app (Starlette) that routes every request through one router.

Fronts:

* OpenAI-compatible: ``POST /v1/chat/completions`` (JSON or SSE stream), ``GET /v1/models``.
* Ollama-compatible: ``POST /api/chat`` (NDJSON stream or one object), ``GET /api/tags``,
  ``GET /api/version``.
* ``GET /healthz`` (the process is up), ``GET /readyz`` (the router is built and Redis, when
  configured, answers), ``GET /v1/routing/stats`` (routing stats, budget and calibrator).

Every answer carries the decision: a ``routing`` field (the router's record) and the headers
``x-confidence-router-decision`` / ``-reason`` / ``-confidence`` / ``-tier`` (the model that
answered). Routing knobs per request: see :mod:`confidence_router.proxy.knobs`.

A client that hangs up cancels its routed call, before the answer starts too (the models stop
generating, the budget is settled). Error messages and the routing record never quote the
addresses of the models or of Redis (``<address>`` stands in).

Usage (tests, or embedding the app in your own ASGI server)::

    from confidence_router import ConfidenceRoutedLLM
    from confidence_router.proxy import ProxyConfig, create_app

    app = create_app(ConfidenceRoutedLLM.from_settings(), config=ProxyConfig(api_keys=("k",)))
    # uvicorn.run(app, host="127.0.0.1", port=8080)

From the command line: ``confidence-router proxy --port 8080 --workers 4``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessageChunk, BaseMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from confidence_router._aio import cancel_and_wait
from confidence_router.errors import (
    BudgetExceededError,
    CloudEscalationError,
    ConfidenceRouterError,
    InvalidArgumentError,
    InvalidInputError,
    InvalidTypeError,
    LocalModelError,
    RoutingConfigError,
)
from confidence_router.proxy import formats
from confidence_router.proxy.config import ProxyConfig
from confidence_router.proxy.knobs import KnobError, parse_knobs
from confidence_router.serving.http import loads_json
from confidence_router.serving.protocol import (
    OLLAMA_VERSION,
    ProtocolError,
    model_card,
    now_iso,
    ollama_chunk,
    parse_chat_request,
)

__all__ = ["SharedState", "build_router", "create_app", "create_app_from_env"]

logger = logging.getLogger("confidence_router.proxy")

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_REQUEST_ERROR_CODES = {413: "request_too_large", 408: "request_timeout"}
_LEASE_MARGIN_S = 30.0


# ---------------------------------------------------------------------------------------------
# Building the router and its shared state
# ---------------------------------------------------------------------------------------------


class SharedState:
    """The budget, stats and calibrator a proxy's router uses (Redis-backed when configured).

    Attributes:
        budget / stats / calibrator: the objects handed to the router (``None`` when off).
        redis: the Redis client when ``redis_url`` is set (used by the readiness check).
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.redis: Any = None
        self.budget: Any = None
        self.calibrator: Any = None
        if config.redis_url:
            from confidence_router.redis_state import (
                RedisCloudBudget,
                RedisRollingQuantileThreshold,
                RedisRoutingStats,
                redis_client,
            )

            self.redis = redis_client(config.redis_url)
            prefix = config.redis_prefix
            self.stats: Any = RedisRoutingStats(
                self.redis, prefix=prefix, target_rate=config.target_rate
            )
            if config.budget_usd is not None:
                # No request outlives timeout_s: a reservation older than that belongs to a
                # call that was cancelled (timeout, disconnect) or a worker that died.
                self.budget = RedisCloudBudget(
                    self.redis, config.budget_usd, config.budget_window_s, prefix=prefix,
                    lease_s=config.timeout_s + _LEASE_MARGIN_S,
                )
            if config.target_rate is not None:
                self.calibrator = RedisRollingQuantileThreshold(
                    self.redis, config.target_rate, prefix=prefix
                )
        else:
            from confidence_router.budget import CloudBudget
            from confidence_router.calibration import RollingQuantileThreshold
            from confidence_router.stats import RoutingStats

            self.stats = RoutingStats(target_rate=config.target_rate)
            if config.budget_usd is not None:
                self.budget = CloudBudget(config.budget_usd, config.budget_window_s)
            if config.target_rate is not None:
                self.calibrator = RollingQuantileThreshold(config.target_rate)

    def router_fields(self) -> dict[str, Any]:
        """The constructor fields to give the router."""
        fields = {"stats": self.stats}
        if self.budget is not None:
            fields["budget"] = self.budget
        if self.calibrator is not None:
            fields["calibrator"] = self.calibrator
        return fields


def build_router(
    config: ProxyConfig,
    settings_path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Any, SharedState]:
    """``ConfidenceRoutedLLM.from_settings(settings_path)`` with the proxy's shared state.

    Raises:
        RoutingConfigError: invalid settings.
    """
    from confidence_router.router import ConfidenceRoutedLLM
    from confidence_router.settings import RouterSettings

    env = None if environ is None else dict(environ)
    settings = RouterSettings.load(settings_path, env)  # invalid settings fail before Redis
    shared = SharedState(config)
    fields = shared.router_fields()
    if config.chroma_url:
        fields.update(knowledge_store=_chroma_store(config, settings.ollama_host),
                      learn_from_escalations=True)
    router = ConfidenceRoutedLLM.from_settings(settings_path, environ=env, **fields)
    return router, shared


def _chroma_store(config: ProxyConfig, ollama_host: str) -> Any:
    """A KnowledgeStore on the configured Chroma server, embedding with Ollama."""
    from urllib.parse import urlparse

    import chromadb
    from chromadb.config import Settings
    from langchain_ollama import OllamaEmbeddings

    from confidence_router.knowledge import KnowledgeStore

    url = urlparse(str(config.chroma_url))
    client = chromadb.HttpClient(
        host=url.hostname or "127.0.0.1", port=url.port or (443 if url.scheme == "https" else 8000),
        ssl=url.scheme == "https", settings=Settings(anonymized_telemetry=False),
    )
    embeddings = OllamaEmbeddings(model=str(config.embedding_model), base_url=ollama_host)
    return KnowledgeStore(embeddings, client=client)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class _HTTPError(ConfidenceRouterError):
    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_


# Upstream and Redis client errors quote where they tried to connect (botocore: "... from
# endpoint URL: http://10.0.3.7:8080/model/...", redis: "Timeout reading from 10.0.3.9:6379"):
# the deployment's internal addresses, which a client has no business learning.
_ADDRESS_RES = (
    re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]+"),  # URLs
    re.compile(r"\[[0-9a-fA-F:.]+\](?::\d+)?"),  # [IPv6]:port
    re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"),  # IPv4[:port]
    re.compile(r"\b(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+):\d{2,5}\b"),  # host:port
)


def _scrub(text: str) -> str:
    """``text`` with URLs and network addresses replaced by ``<address>``."""
    for pattern in _ADDRESS_RES:
        text = pattern.sub("<address>", text)
    return text


#: The routing record's fields that quote a client error (the answer, model ids and the
#: other fields are sent as they are).
_ERROR_FIELDS = frozenset({"local_error", "cloud_error", "escalation_skipped"})


def _public(routing: Any) -> Any:
    """A routing record as sent to a client: the fields quoting a client error scrubbed of
    internal addresses."""
    if not isinstance(routing, Mapping) or not _ERROR_FIELDS.intersection(routing):
        return routing
    return {key: _scrub(value) if key in _ERROR_FIELDS and isinstance(value, str) else value
            for key, value in routing.items()}


def _from_router_error(error: BaseException) -> _HTTPError:
    """The HTTP error for a failed routed call, its message scrubbed of internal addresses."""
    http_error = _router_http_error(error)
    if http_error.status >= 500 or http_error.status == 429:  # not about the client's input
        http_error.message = _scrub(http_error.message)
    return http_error


def _router_http_error(error: BaseException) -> _HTTPError:
    """The HTTP status and error code of a failed routed call (no prompt in the message)."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return _HTTPError(504, "the request took longer than the proxy's time limit",
                          code="timeout", type_="timeout_error")
    if isinstance(error, BudgetExceededError):
        return _HTTPError(429, str(error), code="budget_exceeded", type_="insufficient_quota")
    if isinstance(error, CloudEscalationError):
        return _HTTPError(502, str(error), code="cloud_error", type_="upstream_error")
    if isinstance(error, LocalModelError):
        return _HTTPError(502, str(error), code="local_error", type_="upstream_error")
    if isinstance(error, RoutingConfigError):
        return _HTTPError(400, str(error), code="invalid_routing_knob")
    if isinstance(error, InvalidInputError):
        # Nothing to answer (e.g. only whitespace): the client's mistake, rejected before any
        # model was called, so a 4xx and not an upstream 502.
        return _HTTPError(400, str(error), code="invalid_input")
    if isinstance(error, (InvalidArgumentError, InvalidTypeError)):
        return _HTTPError(400, str(error), code="invalid_request")
    if type(error).__module__.split(".")[0] == "redis":
        # The shared budget/calibrator is unreachable: refuse rather than spend without a cap.
        return _HTTPError(503, "shared routing state (Redis) is unavailable",
                          code="shared_state_unavailable", type_="server_error")
    if isinstance(error, ConfidenceRouterError):
        return _HTTPError(502, str(error), code="routing_error", type_="upstream_error")
    return _HTTPError(500, "internal error while routing the request", code="internal_error",
                      type_="server_error")


class _ClientGone(_HTTPError):
    """The client closed its connection before the answer started: the routed call was
    cancelled (no model keeps generating for nobody); the answer is never read."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection before the answer",
                         code="client_closed_request", type_="client_error")


async def _client_disconnected(request: Request) -> None:
    """Return when the client has closed its connection (the body was already read, so the
    next ASGI message is ``http.disconnect``, sent when the connection goes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _step(work: Awaitable[Any], timeout: float, request: Request | None = None) -> Any:
    """Await one step of a routed call (the whole answer, or the next chunk of a stream)
    within ``timeout`` seconds, and, with ``request`` (no byte of the answer sent yet), only
    while the client is connected.

    The step runs in a task of its own, awaited with :func:`asyncio.wait`, not
    ``asyncio.wait_for``: a time limit, a client that hangs up and a cancellation of this
    coroutine all cancel it through :func:`~confidence_router._aio.cancel_and_wait`, which
    makes sure it has ended; the router's cancellation closes the tier's connection (the
    model stops generating) and settles the budget.

    Raises:
        asyncio.TimeoutError: the step took longer than ``timeout``.
        _ClientGone: the client closed its connection first.
    """
    task = asyncio.ensure_future(work)
    watcher = (asyncio.ensure_future(_client_disconnected(request))
               if request is not None else None)
    waiting: set[asyncio.Future[Any]] = {task} if watcher is None else {task, watcher}
    try:
        await asyncio.wait(waiting, timeout=max(timeout, 0.0),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(task)
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
    if not task.cancelled():
        return task.result()
    if watcher is not None and watcher.done() and not watcher.cancelled():
        raise _ClientGone
    raise asyncio.TimeoutError


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def _error_response(path: str, error: _HTTPError, headers: Mapping[str, str] | None = None) -> Response:
    if _is_ollama(path):
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)
    return JSONResponse(
        formats.openai_error(error.message, type_=error.type, param=error.param, code=error.code),
        status_code=error.status,
        headers=headers,
    )


def _endpoint(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Turn request and routing failures into clean 4xx/5xx answers in the front's shape."""

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except _HTTPError as error:
            response = _error_response(request.url.path, error)
        except KnobError as error:
            response = _error_response(
                request.url.path, _HTTPError(400, str(error), code="invalid_routing_knob",
                                             param=error.param))
        except (formats.RequestError, ProtocolError) as error:
            status = getattr(error, "status", 400)
            response = _error_response(
                request.url.path,
                _HTTPError(status, str(error), param=getattr(error, "param", None),
                           code=_REQUEST_ERROR_CODES.get(status, "invalid_request")),
            )
        except Exception as error:  # noqa: BLE001 - every failure becomes an HTTP answer
            http_error = _from_router_error(error)
            if http_error.status == 500:
                # The type only: exception messages may quote the request.
                logger.error("proxy: %s failed with %s", request.url.path, type(error).__name__)
            response = _error_response(request.url.path, http_error)
        # Decision facts and timing only: never the body, the answer or the key.
        logger.info(
            "proxy %s %s -> %s decision=%s reason=%s %.3fs",
            request.method, request.url.path, response.status_code,
            response.headers.get("x-confidence-router-decision", "-"),
            response.headers.get("x-confidence-router-reason", "-"),
            time.perf_counter() - started,
        )
        return response

    return wrapped


# ---------------------------------------------------------------------------------------------
# Middleware: API keys
# ---------------------------------------------------------------------------------------------


class _APIKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>`` names a configured key (constant-time)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys]

    def _authorised(self, scope: Scope) -> bool:
        value = b""
        for name, raw in scope.get("headers", ()):
            if name == b"authorization":
                value = raw
                break
        scheme, _, token = value.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare with every key, so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope["path"] in _OPEN_PATHS
            or self._authorised(scope)
        ):
            await self.app(scope, receive, send)
            return
        error = _HTTPError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")
        response = _error_response(scope["path"], error, {"www-authenticate": "Bearer"})
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class _DecisionListener(AsyncCallbackHandler):
    """Receives the router's ``routing_decision`` event, sent before the first streamed chunk."""

    def __init__(self) -> None:
        self.decision: dict[str, Any] | None = None

    async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == "routing_decision" and isinstance(data, Mapping):
            self.decision = dict(data)


class _Proxy:
    def __init__(self, router: Any, config: ProxyConfig, shared: SharedState | None) -> None:
        self.router = router
        self.config = config
        self.shared = shared

    # -- helpers ---------------------------------------------------------------------------------

    def _tier(self, decision: str | None) -> str | None:
        try:
            names = self.router._identifying_params
        except Exception:  # noqa: BLE001 - the header then falls back to the decision
            return decision
        name = names.get(decision) if decision in ("local", "cloud") else None
        return str(name) if name else decision

    def _headers(self, routing: Mapping[str, Any] | None) -> dict[str, str]:
        decision = (routing or {}).get("decision")
        return formats.routing_headers(routing, self._tier(decision))

    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise formats.RequestError(f"request body larger than {limit} bytes", status=413)
        chunks: list[bytes] = []

        async def receive() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise formats.RequestError(f"request body larger than {limit} bytes",
                                               status=413)
                chunks.append(chunk)

        try:
            # A client that sends half a body and stalls must not hold the request forever.
            await asyncio.wait_for(receive(), self.config.timeout_s)
        except asyncio.TimeoutError:
            raise formats.RequestError(
                f"request body not received within {self.config.timeout_s:g} s", status=408
            ) from None
        raw = b"".join(chunks)
        try:
            # As Ollama reads it: no NaN/Infinity, a lone surrogate escape is U+FFFD.
            body = loads_json(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise formats.RequestError(f"invalid JSON body: {error}") from None
        except RecursionError:  # e.g. "[[[[..." nested deeper than the parser's stack
            raise formats.RequestError("invalid JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise formats.RequestError("the request body must be a JSON object")
        return body

    def _runnable(
        self, tools: list[dict[str, Any]], tool_choice: Any, schema: dict[str, Any] | None
    ) -> Any:
        if schema is not None:
            name = str(schema.get("title") or "response")
            spec = {"type": "function", "function": {
                "name": name, "description": str(schema.get("description") or "the answer"),
                "parameters": {k: v for k, v in schema.items() if k not in ("title", "description")},
            }}
            return self.router.bind_tools([spec], tool_choice="any")
        if tools and tool_choice != "none":
            choice: str | None = None
            if tool_choice == "required":
                choice = "any"  # the tiers' name for "some tool"
            elif isinstance(tool_choice, dict):
                choice = (tool_choice.get("function") or {}).get("name")
            return self.router.bind_tools(formats.tool_specs(tools), tool_choice=choice)
        return self.router

    async def _invoke(self, request: Request, runnable: Any, messages: list[BaseMessage],
                      kwargs: dict[str, Any]) -> BaseMessage:
        return await _step(  # type: ignore[no-any-return]
            runnable.ainvoke(messages, **kwargs), self.config.timeout_s, request)

    @staticmethod
    def _structured_text(message: BaseMessage) -> str:
        calls = getattr(message, "tool_calls", None) or []
        if calls:
            return json.dumps(calls[0].get("args") or {})
        text = message.text.strip()
        try:
            json.loads(text)
        except ValueError:
            raise _HTTPError(502, "the model did not return the requested structured output",
                             code="structured_output_failed", type_="upstream_error") from None
        return text

    async def _open_stream(
        self, request: Request, runnable: Any, messages: list[BaseMessage],
        kwargs: dict[str, Any],
    ) -> tuple[AsyncIterator[AIMessageChunk], AIMessageChunk | None, dict[str, Any] | None, float]:
        """Start a routed stream and wait for its first chunk (the decision is made by then),
        so a failure before any output is still an HTTP error status."""
        listener = _DecisionListener()
        deadline = asyncio.get_running_loop().time() + self.config.timeout_s
        stream = runnable.astream(messages, config={"callbacks": [listener]}, **kwargs)
        iterator = stream.__aiter__()
        try:
            first = await _step(anext(iterator, None), self.config.timeout_s, request)
        except BaseException:
            with contextlib.suppress(Exception):
                await iterator.aclose()
            raise
        decision = listener.decision
        if first is not None and first.response_metadata.get("routing"):
            decision = first.response_metadata["routing"]
        decision = _public(decision)
        return iterator, first, decision, deadline

    @staticmethod
    async def _chunks(
        iterator: AsyncIterator[AIMessageChunk], first: AIMessageChunk | None, deadline: float
    ) -> AsyncIterator[AIMessageChunk]:
        try:
            if first is None:
                return
            yield first
            loop = asyncio.get_running_loop()
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                chunk = await _step(anext(iterator, None), remaining)
                if chunk is None:
                    return
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]

    # -- OpenAI front ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await self._read_json(request)
        parsed = formats.parse_openai_request(body)
        knobs = parse_knobs(body, request.headers)
        schema = (formats.structured_schema(parsed.response_format)
                  if parsed.response_format is not None else None)
        runnable = self._runnable(parsed.tools, parsed.tool_choice, schema)
        kwargs: dict[str, Any] = dict(knobs)
        if parsed.stop:
            kwargs["stop"] = parsed.stop
        if parsed.stream and schema is None:
            return await self._openai_stream(request, runnable, parsed, kwargs)
        message = await self._invoke(request, runnable, parsed.messages, kwargs)
        routing = _public(message.response_metadata.get("routing"))
        content = self._structured_text(message) if schema is not None else None
        model = self._tier((routing or {}).get("decision")) or parsed.model
        reply = formats.openai_response(message, routing, model=model, content=content)
        if schema is not None:
            reply["choices"][0]["message"].pop("tool_calls", None)
            reply["choices"][0]["finish_reason"] = "stop"
        if not parsed.stream:
            return JSONResponse(reply, headers=self._headers(routing))
        # A structured answer is produced whole; stream it as one chunk for stream=True clients.
        return StreamingResponse(
            self._single_chunk_stream(reply, parsed.include_usage),
            media_type="text/event-stream", headers=self._headers(routing),
        )

    @staticmethod
    async def _single_chunk_stream(reply: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
        choice = reply["choices"][0]
        delta = {"role": "assistant", "content": choice["message"]["content"]}
        yield _sse(formats.openai_chunk(reply["id"], reply["created"], reply["model"], delta=delta))
        yield _sse(formats.openai_chunk(reply["id"], reply["created"], reply["model"],
                                        finish=choice["finish_reason"], routing=reply["routing"]))
        if include_usage:
            yield _sse(formats.openai_chunk(reply["id"], reply["created"], reply["model"],
                                            usage=reply["usage"], with_choice=False))
        yield b"data: [DONE]\n\n"

    async def _openai_stream(
        self, request: Request, runnable: Any, parsed: formats.OpenAIRequest,
        kwargs: dict[str, Any],
    ) -> Response:
        iterator, first, decision, deadline = await self._open_stream(
            request, runnable, parsed.messages, kwargs
        )
        model = self._tier((decision or {}).get("decision")) or parsed.model
        completion_id = formats.new_completion_id()
        created = int(time.time())

        async def events() -> AsyncIterator[bytes]:
            routing: dict[str, Any] | None = None
            total: AIMessageChunk | None = None
            sent_first = False
            try:
                async for chunk in self._chunks(iterator, first, deadline):
                    total = chunk if total is None else total + chunk
                    if chunk.response_metadata.get("routing"):
                        routing = _public(chunk.response_metadata["routing"])
                    delta = formats.chunk_delta(chunk, first=not sent_first)
                    if delta is not None:
                        sent_first = True
                        yield _sse(formats.openai_chunk(completion_id, created, model, delta=delta))
                finish = formats.finish_reason(total) if total is not None else "stop"
                yield _sse(formats.openai_chunk(completion_id, created, model, finish=finish,
                                                routing=routing or decision or {}))
                if parsed.include_usage:
                    usage = formats.openai_usage(total) if total is not None else None
                    yield _sse(formats.openai_chunk(completion_id, created, model, usage=usage,
                                                    with_choice=False))
                yield b"data: [DONE]\n\n"
            except Exception as error:  # noqa: BLE001 - headers are out: report in-stream
                http_error = _from_router_error(error)
                logger.warning("proxy: stream failed with %s", type(error).__name__)
                yield _sse(formats.openai_error(http_error.message, type_=http_error.type,
                                                code=http_error.code))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**self._headers(decision), "cache-control": "no-cache"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_id, "object": "model", "created": 0,
            "owned_by": "confidence-router",
        }]})

    # -- Ollama front ----------------------------------------------------------------------------

    async def ollama_chat(self, request: Request) -> Response:
        body = await self._read_json(request)
        parsed = parse_chat_request(body)
        knobs = parse_knobs(body, request.headers)
        messages = formats.ollama_messages(parsed)
        schema = formats.ollama_schema(parsed)
        runnable = self._runnable(formats.tool_specs(parsed.tools) if parsed.tools else [],
                                  None, schema)
        stop = parsed.options.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
        ):
            raise formats.RequestError("options.stop must be a string or a list of strings")
        kwargs: dict[str, Any] = dict(knobs)
        if stop:
            kwargs["stop"] = stop
        started = time.perf_counter_ns()
        created = now_iso()
        if parsed.stream and schema is None:
            return await self._ollama_stream(request, runnable, parsed.model, messages, kwargs,
                                             started)
        message = await self._invoke(request, runnable, messages, kwargs)
        routing = _public(message.response_metadata.get("routing"))
        if schema is not None:
            obj = ollama_chunk(parsed.model, created, self._structured_text(message), done=True)
        else:
            obj = ollama_chunk(parsed.model, created, message.text, done=True,
                               tool_calls=formats.ollama_tool_calls(message))
        obj.update(formats.ollama_final_fields(message, started))
        obj["routing"] = formats.jsonable(dict(routing or {}))
        if parsed.stream:  # structured output, produced whole: one line
            return Response(json.dumps(obj) + "\n", media_type="application/x-ndjson",
                            headers=self._headers(routing))
        return JSONResponse(obj, headers=self._headers(routing))

    async def _ollama_stream(
        self, request: Request, runnable: Any, model: str, messages: list[BaseMessage],
        kwargs: dict[str, Any], started: int,
    ) -> Response:
        iterator, first, decision, deadline = await self._open_stream(request, runnable,
                                                                      messages, kwargs)
        created = now_iso()

        async def lines() -> AsyncIterator[bytes]:
            routing: dict[str, Any] | None = None
            total: AIMessageChunk | None = None
            try:
                async for chunk in self._chunks(iterator, first, deadline):
                    total = chunk if total is None else total + chunk
                    if chunk.response_metadata.get("routing"):
                        routing = _public(chunk.response_metadata["routing"])
                    if chunk.text:
                        yield _ndjson(ollama_chunk(model, created, chunk.text))
                if total is not None and total.tool_calls:
                    yield _ndjson(ollama_chunk(model, created, "",
                                               tool_calls=formats.ollama_tool_calls(total)))
                final = ollama_chunk(model, created, "", done=True)
                if total is not None:
                    final.update(formats.ollama_final_fields(total, started))
                final["routing"] = formats.jsonable(dict(routing or decision or {}))
                yield _ndjson(final)
            except Exception as error:  # noqa: BLE001 - headers are out: Ollama's error line
                logger.warning("proxy: stream failed with %s", type(error).__name__)
                yield _ndjson({"error": _from_router_error(error).message})

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers=self._headers(decision))

    async def ollama_tags(self, request: Request) -> Response:
        return JSONResponse({"models": [model_card(self.config.model_id)]})

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    # -- operations ------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {"router": "ok" if self.router is not None else "not built"}
        redis = self.shared.redis if self.shared is not None else None
        if redis is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(redis.ping), 2.0)
                checks["redis"] = "ok"
            except Exception as error:  # noqa: BLE001 - reported, not raised
                checks["redis"] = f"unavailable ({type(error).__name__})"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                            status_code=200 if ready else 503)

    async def routing_stats(self, request: Request) -> Response:
        router = self.router

        def snapshot(obj: Any) -> Any:
            return formats.jsonable(obj.snapshot()) if obj is not None else None

        return JSONResponse({
            "stats": snapshot(getattr(router, "stats", None)),
            "budget": snapshot(getattr(router, "budget", None)),
            "calibrator": snapshot(getattr(router, "calibrator", None)),
        })


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _ndjson(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def create_app(
    router: Any = None,
    *,
    config: ProxyConfig | None = None,
    settings_path: str | None = None,
    shared: SharedState | None = None,
) -> Starlette:
    """The proxy as an ASGI app.

    Args:
        router: the router to serve (any object with the ``ConfidenceRoutedLLM`` API); by
            default one is built with :func:`build_router` from the settings (``settings_path``
            or ``$CONFIDENCE_ROUTER_CONFIG``, and the environment) and ``config``'s shared state.
        config: limits, API keys and shared-state settings (default: from the environment).
        settings_path: the router's settings file when ``router`` is not given.
        shared: the shared state ``router`` uses, for the readiness check (optional).

    Raises:
        RoutingConfigError: invalid settings or configuration (at construction, not at the
            first request).
    """
    config = config if config is not None else ProxyConfig.from_env()
    if router is None:
        router, shared = build_router(config, settings_path)
    proxy = _Proxy(router, config, shared)
    routes = [
        Route("/v1/chat/completions", _endpoint(proxy.chat_completions), methods=["POST"]),
        Route("/v1/models", _endpoint(proxy.models), methods=["GET"]),
        Route("/v1/routing/stats", _endpoint(proxy.routing_stats), methods=["GET"]),
        Route("/api/chat", _endpoint(proxy.ollama_chat), methods=["POST"]),
        Route("/api/tags", _endpoint(proxy.ollama_tags), methods=["GET"]),
        Route("/api/version", _endpoint(proxy.ollama_version), methods=["GET"]),
        Route("/healthz", proxy.healthz, methods=["GET"]),
        Route("/readyz", proxy.readyz, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.proxy = proxy
    app.add_middleware(_APIKeyMiddleware, keys=config.api_keys)
    return app


def create_app_from_env() -> Starlette:
    """App factory for uvicorn workers: everything from the environment (each worker process
    builds its own router; Redis, when configured, is what they share)."""
    return create_app()
