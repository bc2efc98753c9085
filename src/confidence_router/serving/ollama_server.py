"""An Ollama-compatible HTTP server (stdlib only) in front of a :class:`ChatBackend`.

The unchanged ``ChatOllama`` / ``OllamaEmbeddings`` / ``ollama.Client`` talk to it through
``base_url``; it speaks the subset of Ollama's native API that they use, including per-token
``logprobs`` (Ollama >= 0.12.11 wire format, see docs/how-it-works.md §3).

Usage::

    from confidence_router.serving.ollama_server import OllamaCompatibleServer
    from confidence_router.testing import ScriptedBackend
    from langchain_ollama import ChatOllama

    backend = ScriptedBackend(models=["qwen2.5:7b"])
    backend.add_answer("France", " Paris", logprobs=-0.2)
    with OllamaCompatibleServer(backend) as server:          # 127.0.0.1, ephemeral port
        llm = ChatOllama(base_url=server.url, model="qwen2.5:7b", logprobs=True, top_logprobs=2)
        reply = llm.invoke("Capital of France?")
        assert reply.response_metadata["logprobs"][0]["logprob"] == -0.2
        assert server.requests[-1]["body"]["top_logprobs"] == 2

Endpoints: ``POST /api/chat``, ``POST /api/generate`` (streaming NDJSON with chunked transfer,
or one object with ``"stream": false``), ``POST /api/embed``, ``POST /api/embeddings``,
``GET /api/tags``, ``GET /api/version``, ``POST /api/show``, ``GET /api/ps``, ``GET /``.
Bodies are read as Ollama's Go decoder reads them (no ``NaN`` / ``Infinity``; a lone
surrogate escape is U+FFFD: :func:`~confidence_router.serving.http.loads_json`). Errors are ``{"error": message}`` with the status of the backend's :class:`BackendError`
(the ``ollama`` client raises ``ResponseError`` carrying it); an error after tokens were
streamed is sent as an ``{"error": ...}`` line (``ResponseError`` with status ``-1``).

As Ollama: ``/api/show`` reports the backend's ``capabilities(model)`` (``["completion"]``
for a backend without it); an ``/api/generate`` ``suffix`` is refused (400 "does not support
insert") unless they list ``"insert"``; ``raw`` with a ``template``, ``system`` or
``context`` is a 400; ``template`` reaches the backend (:attr:`ChatRequest.template`), which
renders it or refuses it. A ``logprobs`` entry shows a token's own bytes (``bytes``, and
their text with U+FFFD for a partial UTF-8 sequence) when the backend gives them
(:attr:`GeneratedToken.piece`), as the same token among the alternatives. ``/api/embed``
passes ``truncate`` and a client-gone check to a backend ``embed`` that takes them.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict

from confidence_router.errors import InvalidTypeError
from confidence_router.serving.http import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    DISCONNECT_ERRORS,
    BackgroundServer,
    JSONRequestHandler,
    QuietThreadingHTTPServer,
    RequestBodyError,
    dumps_json,
    loads_json,
)
from confidence_router.serving.protocol import (
    OLLAMA_VERSION,
    BackendError,
    ChatBackend,
    ChatReply,
    ChatRequest,
    GeneratedToken,
    ProtocolError,
    backend_capabilities,
    check_message,
    model_card,
    now_iso,
    ollama_chunk,
    parse_chat_request,
    parse_generation_request,
)

__all__ = ["OLLAMA_VERSION", "OllamaCompatibleServer", "RecordedRequest"]

logger = logging.getLogger(__name__)

class RecordedRequest(TypedDict):
    """One entry of :attr:`OllamaCompatibleServer.requests`."""

    method: str
    path: str
    body: Any
    """The parsed JSON body (``None`` for GET requests or an unparsable body)."""


# ---------------------------------------------------------------------------------------------
# Shared plumbing for the fake servers: a ThreadingHTTPServer run on a background thread.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The Ollama-compatible server.
# ---------------------------------------------------------------------------------------------


# A malformed request: reply 400 with the message (the shared protocol's error).
_BadRequest = ProtocolError


def _logprob_entry(token: GeneratedToken, k: int) -> dict[str, Any]:
    # A token's own bytes when the backend gives them (a partial UTF-8 byte token adds "" to
    # the text but is shown as itself, as the same token among the alternatives is).
    own = token.piece if token.piece is not None else token.text.encode("utf-8")
    entry: dict[str, Any] = {
        "token": own.decode("utf-8", errors="replace"),
        "logprob": token.logprob,
        "bytes": list(own),
    }
    if k > 0:
        # Ollama omits the field (omitempty) when top_logprobs is 0.
        pieces = list(token.top_pieces)
        alternatives = []
        for i, (text, logprob) in enumerate(list(token.top_logprobs)[:k]):
            raw = pieces[i] if i < len(pieces) else text.encode("utf-8")
            alternatives.append({"token": raw.decode("utf-8", errors="replace"),
                                 "logprob": logprob, "bytes": list(raw)})
        entry["top_logprobs"] = alternatives
    return entry


def _model_matches(requested: str, available: str) -> bool:
    # Ollama treats "name" and "name:latest" as the same model.
    def norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    return norm(requested) == norm(available)


class _Timer:
    """Collects the durations Ollama reports on the final chunk (nanoseconds)."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.first_token: int | None = None

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter_ns()

    def durations(self) -> dict[str, int]:
        end = time.perf_counter_ns()
        first = self.first_token if self.first_token is not None else end
        return {
            "total_duration": end - self.start,
            "load_duration": 0,
            "prompt_eval_duration": first - self.start,
            "eval_duration": end - first,
        }


class _OllamaHandler(JSONRequestHandler):
    server: QuietThreadingHTTPServer

    @property
    def owner(self) -> OllamaCompatibleServer:
        return self.server.owner  # type: ignore[no-any-return]

    # ---- dispatch --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            raw = self._read_body()
        except RequestBodyError:
            return  # answered (400 / 413); the connection closes
        body: Any = None
        parse_error: str | None = None
        if raw:
            try:
                body = loads_json(raw)
            except ValueError as exc:
                parse_error = f"invalid JSON body: {exc}"
            except RecursionError:  # e.g. "[[[[..." nested deeper than the parser's stack
                parse_error = "invalid JSON body: nested too deeply"
        self.owner._record(RecordedRequest(method=method, path=path, body=body))

        routes: dict[tuple[str, str], Callable[[Any], None]] = {
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
            ("POST", "/api/show"): self._show,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/version"): self._version,
            ("GET", "/api/ps"): self._ps,
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(route_path == path for _, route_path in routes):
                self._send_json(405, {"error": f"method {method} not allowed for {path}"})
            else:
                self._send_json(404, {"error": f"404 page not found: {method} {path}"})
            return
        if parse_error is not None:
            self._send_json(400, {"error": parse_error})
            return
        if method == "POST" and not isinstance(body, dict):
            self._send_json(400, {"error": "request body must be a JSON object"})
            return
        try:
            handler(body)
        except _BadRequest as exc:
            self._send_json(400, {"error": str(exc)})
        except BackendError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as exc:  # a backend bug: report it to the client and the log
            logger.exception("backend error on %s %s", method, path)
            self._send_json(500, {"error": f"{type(exc).__name__}: {exc}"})

    # ---- generation ------------------------------------------------------------------------

    def _parse_generation(
        self, body: dict[str, Any], messages: Sequence[dict[str, Any]]
    ) -> ChatRequest:
        return parse_generation_request(body, messages)

    def _chat(self, body: dict[str, Any]) -> None:
        request = parse_chat_request(body)
        self._run_generation(request, chat=True, preload=not request.messages)

    def _generate(self, body: dict[str, Any]) -> None:
        prompt = body.get("prompt") or ""
        system = body.get("system")
        raw = body.get("raw")
        if not isinstance(prompt, str):
            raise _BadRequest("prompt must be a string")
        for name in ("system", "suffix", "template"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _BadRequest(f"{name} must be a string")  # was silently dropped
        if raw is not None and not isinstance(raw, bool):
            raise _BadRequest(f"raw must be true or false, got {raw!r}")
        template = body.get("template") or None
        context = body.get("context")
        if context is not None and not isinstance(context, list):
            raise _BadRequest("context must be a list of token ids")
        if raw and (template or system or context):
            # As Ollama: raw sends the prompt as it is, so these cannot apply (they were
            # silently dropped).
            raise _BadRequest("raw mode does not support template, system, or context")
        model = body.get("model")
        if (  # Ollama needs the model's "insert" capability (a template with .Suffix) for a
            # suffix; answering without it would ignore the text the answer must lead to.
            body.get("suffix") and isinstance(model, str) and model
            and "insert" not in backend_capabilities(self.owner.backend, model)
        ):
            raise BackendError(f"{model} does not support insert", status=400)
        messages: list[dict[str, Any]] = []
        if isinstance(system, str) and system and not raw:  # raw: the prompt alone, as Ollama
            messages.append({"role": "system", "content": system})
        user: dict[str, Any] = {"role": "user", "content": prompt}
        if body.get("images"):
            user["images"] = body["images"]
            check_message(user, "request")  # images: a list of base64 strings
        messages.append(user)
        request = dataclasses.replace(
            self._parse_generation(body, messages), raw=bool(raw), template=template,
            suffix=body.get("suffix") or None,
        )
        self._run_generation(request, chat=False, preload=not prompt)

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (EOF), without consuming its data."""
        try:
            # A selector, not select.select: that one fails for descriptors >= 1024 (a busy
            # process has them), which read as "gone" and cut every answer short.
            with selectors.DefaultSelector() as selector:
                selector.register(self.connection, selectors.EVENT_READ)
                readable = bool(selector.select(0))
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _run_generation(self, request: ChatRequest, *, chat: bool, preload: bool) -> None:
        timer = _Timer()
        created = now_iso()
        k = request.top_logprobs if request.logprobs else 0

        def piece(text: str, tokens: Sequence[GeneratedToken], done: bool) -> dict[str, Any]:
            logprobs = [_logprob_entry(t, k) for t in tokens] if request.logprobs else None
            return ollama_chunk(request.model, created, text, chat=chat, done=done,
                                logprobs=logprobs)

        if preload:
            # Ollama answers an empty chat / prompt by loading the model: done_reason "load".
            final = piece("", (), True)
            final["done_reason"] = "load"
            self._send_json(200, final)
            return

        gone = threading.Event()

        def client_gone() -> bool:
            # Remembers that the backend was told: its answer may have been cut short.
            if self._client_gone():
                gone.set()
            return gone.is_set()

        request = dataclasses.replace(request, client_gone=client_gone)
        reply: ChatReply = self.owner.backend.chat(request)
        tokens: Iterator[GeneratedToken] = iter(reply.tokens)
        # Pull the first token before sending headers, so a failure or the latency before it
        # happens while the HTTP status can still say "error" (as Ollama does).
        try:
            first: GeneratedToken | None = next(tokens)
        except StopIteration:
            first = None
        timer.mark_first_token()
        if gone.is_set():
            # The client hung up (EOF; a half-closed one may still read): what the backend
            # stopped early must not go out as a complete answer, so nothing does.
            self.close_connection = True
            _close_iterator(tokens)
            return

        def final_fields(eval_count: int) -> dict[str, Any]:
            fields: dict[str, Any] = {"done_reason": reply.done_reason}
            if not chat:
                fields["context"] = []
            fields.update(timer.durations())
            fields["prompt_eval_count"] = reply.prompt_tokens
            fields["eval_count"] = eval_count
            return fields

        def final_piece(eval_count: int) -> dict[str, Any]:
            return {**piece("", (), True), **final_fields(eval_count)}

        if not request.stream:
            collected = [first] if first is not None else []
            collected.extend(tokens)  # a BackendError here still becomes an HTTP error
            if gone.is_set():  # cut short for a client that hung up: no complete answer
                self.close_connection = True
                return
            obj = piece("".join(t.text for t in collected), collected, True)
            if chat and reply.tool_calls:
                obj["message"]["tool_calls"] = list(reply.tool_calls)
            obj.update(final_fields(len(collected)))
            self._send_json(200, obj)
            return

        self._stream(request, tokens, first, reply, piece, final_piece, chat=chat, gone=gone)

    def _stream(
        self,
        request: ChatRequest,
        tokens: Iterator[GeneratedToken],
        first: GeneratedToken | None,
        reply: ChatReply,
        piece: Callable[[str, Sequence[GeneratedToken], bool], dict[str, Any]],
        final_piece: Callable[[int], dict[str, Any]],
        *,
        chat: bool,
        gone: threading.Event,
    ) -> None:
        count = 0
        try:
            self._start_chunked("application/x-ndjson")
            token = first
            while token is not None:
                self._write_chunk(dumps_json(piece(token.text, [token], False)) + b"\n")
                count += 1
                token = next(tokens, None)
            if gone.is_set():
                # The backend stopped for a client that hung up: leave the stream unfinished
                # (no final line, no last chunk), so it never reads as a complete answer.
                self.close_connection = True
                _close_iterator(tokens)
                return
            if chat and reply.tool_calls:
                tool_piece = piece("", (), False)
                tool_piece["message"]["tool_calls"] = list(reply.tool_calls)
                self._write_chunk(dumps_json(tool_piece) + b"\n")
            self._write_chunk(dumps_json(final_piece(count)) + b"\n")
            self._end_chunked()
        except DISCONNECT_ERRORS:
            # The client hung up (timeout, or it stopped reading): stop generating quietly.
            self.close_connection = True
            _close_iterator(tokens)
        except Exception as exc:
            # Headers are out, so the status cannot change: Ollama sends an error line.
            if isinstance(exc, BackendError):
                message = exc.message
            else:
                logger.exception("backend error while streaming %s", request.model)
                message = f"{type(exc).__name__}: {exc}"
            _close_iterator(tokens)
            try:
                self._write_chunk(dumps_json({"error": message}) + b"\n")
                self._end_chunked()
            except DISCONNECT_ERRORS:
                self.close_connection = True

    # ---- embeddings and metadata -----------------------------------------------------------

    def _embed(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model is required")
        raw_input = body.get("input", "")
        inputs = [raw_input] if isinstance(raw_input, str) else raw_input
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise _BadRequest("input must be a string or a list of strings")
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 0
        ):  # was: silently ignored, or true read as 1
            raise _BadRequest(f"dimensions must be a non-negative integer, got {dimensions!r}")
        truncate = body.get("truncate")
        if truncate is not None and not isinstance(truncate, bool):
            raise _BadRequest(f"truncate must be true or false, got {truncate!r}")
        start = time.perf_counter_ns()
        gone = threading.Event()

        def client_gone() -> bool:
            if self._client_gone():
                gone.set()
            return gone.is_set()

        embed = self.owner.backend.embed
        extra = _accepted_keywords(
            embed, {"truncate": truncate is not False, "client_gone": client_gone}
        )
        try:
            vectors = embed(model, inputs, **extra) if inputs else []
        except BackendError:
            if not gone.is_set():
                raise
            vectors = []
        if gone.is_set():  # the backend stopped early for a client that hung up: no answer
            self.close_connection = True
            return
        if dimensions:
            vectors = [_truncate(v, dimensions) for v in vectors]
        self._send_json(
            200,
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": time.perf_counter_ns() - start,
                "load_duration": 0,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model is required")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _BadRequest("prompt must be a string")
        # Legacy endpoint: an empty prompt yields an empty embedding, as in Ollama.
        vector = self.owner.backend.embed(model, [prompt])[0] if prompt else []
        self._send_json(200, {"embedding": vector})

    def _tags(self, _body: Any) -> None:
        self._send_json(
            200, {"models": [model_card(name) for name in self.owner.backend.models()]}
        )

    def _ps(self, _body: Any) -> None:
        self._send_json(200, {"models": []})

    def _version(self, _body: Any) -> None:
        self._send_json(200, {"version": self.owner.version})

    def _root(self, _body: Any) -> None:
        self._send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _show(self, body: dict[str, Any]) -> None:
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest("model is required")
        if not any(_model_matches(name, m) for m in self.owner.backend.models()):
            raise BackendError(f"model '{name}' not found", status=404)
        card = model_card(name)
        self._send_json(
            200,
            {
                "license": "",
                "modelfile": f"FROM {name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": card["details"],
                "model_info": {"general.architecture": "scripted", "general.parameter_count": 0},
                "capabilities": backend_capabilities(self.owner.backend, name),
                "modified_at": card["modified_at"],
            },
        )


def _accepted_keywords(function: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``function`` takes as keyword arguments."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature (a builtin): offer nothing
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(offered)
    return {
        name: value for name, value in offered.items()
        if name in parameters and parameters[name].kind in (
            inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def _truncate(vector: Sequence[float], dimensions: int) -> list[float]:
    head = list(vector[:dimensions])
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm else head


def _close_iterator(iterator: Iterator[Any]) -> None:
    # Lets generator-based backends run their cleanup (e.g. free a model context).
    close = getattr(iterator, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.debug("error closing token iterator", exc_info=True)


class OllamaCompatibleServer(BackgroundServer):
    """Serve a :class:`ChatBackend` over Ollama's native HTTP API on a background thread.

    Args:
        backend: answers chat and embedding requests (e.g. ``ScriptedBackend``).
        host: interface to bind; keep the default ``127.0.0.1`` for tests.
        port: TCP port; ``0`` picks a free ephemeral port (read it from :attr:`url`).
        version: what ``/api/version`` reports.
        read_timeout: seconds a connection may stay silent while a request is expected or
            being received (then it is closed, so stalled clients cannot pile up); ``None``
            waits forever.
        max_body_bytes: larger request bodies are answered 413 without being read.

    Use as a context manager (``with OllamaCompatibleServer(b) as server: ...``) or call
    :meth:`start` / :meth:`stop`. The :attr:`backend` may be swapped while running, which lets
    a session-scoped server serve a fresh backend per test. Every request is appended to
    :attr:`requests` before it is handled.
    """

    _handler_class = _OllamaHandler
    _thread_name = "ollama-compatible-server"

    def __init__(
        self,
        backend: ChatBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        version: str = OLLAMA_VERSION,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not isinstance(backend, ChatBackend):
            raise InvalidTypeError(
                "backend must implement ChatBackend (chat, embed, models), "
                f"got {type(backend).__name__}"
            )
        super().__init__(host, port, read_timeout=read_timeout, max_body_bytes=max_body_bytes)
        self._backend = backend
        self.version = version
        self._log: list[RecordedRequest] = []
        self._log_lock = threading.Lock()

    @property
    def backend(self) -> ChatBackend:
        """The backend answering requests (assignable while running)."""
        return self._backend

    @backend.setter
    def backend(self, backend: ChatBackend) -> None:
        if not isinstance(backend, ChatBackend):
            raise InvalidTypeError(f"backend must implement ChatBackend, got {type(backend).__name__}")
        self._backend = backend

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of received requests (``method``, ``path``, parsed ``body``), oldest first."""
        with self._log_lock:
            return list(self._log)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for one path, e.g. ``server.requests_to("/api/chat")``."""
        return [r for r in self.requests if r["path"] == path]

    def clear_requests(self) -> None:
        """Forget all recorded requests."""
        with self._log_lock:
            self._log.clear()

    def _record(self, entry: RecordedRequest) -> None:
        with self._log_lock:
            self._log.append(entry)
