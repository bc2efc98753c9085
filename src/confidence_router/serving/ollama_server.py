"""An Ollama-compatible HTTP server (stdlib only) in front of a :class:`ChatBackend`.

The unchanged ``ChatOllama`` / ``OllamaEmbeddings`` / ``ollama.Client`` talk to it through
``base_url``; it speaks the subset of Ollama's native API that they use, including per-token
``logprobs`` (Ollama >= 0.12.11 wire format, see docs/integration-notes.md §2).

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
Errors are ``{"error": message}`` with the status of the backend's :class:`BackendError`
(the ``ollama`` client raises ``ResponseError`` carrying it); an error after tokens were
streamed is sent as an ``{"error": ...}`` line (``ResponseError`` with status ``-1``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

from confidence_router.serving.protocol import (
    OLLAMA_VERSION,
    BackendError,
    ChatBackend,
    ChatReply,
    ChatRequest,
    GeneratedToken,
    ProtocolError,
    model_card,
    now_iso,
    ollama_chunk,
    parse_chat_request,
    parse_generation_request,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["OLLAMA_VERSION", "OllamaCompatibleServer", "RecordedRequest"]

logger = logging.getLogger(__name__)

# Errors that mean "the client went away": expected when a client times out or stops
# reading a stream early; never worth a traceback.
_DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class RecordedRequest(TypedDict):
    """One entry of :attr:`OllamaCompatibleServer.requests`."""

    method: str
    path: str
    body: Any
    """The parsed JSON body (``None`` for GET requests or an unparsable body)."""


# ---------------------------------------------------------------------------------------------
# Shared plumbing for the fake servers: a ThreadingHTTPServer run on a background thread.
# ---------------------------------------------------------------------------------------------


class _QuietThreadingHTTPServer(ThreadingHTTPServer):
    """Daemon-threaded server that tracks open connections and keeps disconnects quiet."""

    daemon_threads = True
    # Handler threads must never keep the interpreter alive, and stop() must not wait for a
    # handler that is sleeping through injected latency.
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of clients beyond it saw refused or
    # reset connections. The kernel queues this many; past max_active, clients get a 503.
    request_queue_size = 1024
    max_active = 512

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.owner: Any = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            busy = len(self._connections) >= self.max_active
            if not busy:
                self._connections.add(request)
        if busy:
            # Answer rather than drop: the client sees why and may retry.
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: 29\r\n\r\n"
                    b'{"error":"server overloaded"}'
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down keep-alive connections so their handler threads exit promptly."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr for every exception, including
        # clients that hang up mid-stream (timeouts). Log real errors instead.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # includes all _DISCONNECT_ERRORS
            logger.debug("client %s disconnected: %r", client_address, exc)
            return
        logger.exception("unhandled error while serving %s", client_address)


class _BackgroundServer:
    """Base class: start/stop a :class:`_QuietThreadingHTTPServer` on a daemon thread.

    Subclasses set ``_handler_class``. Usable as a context manager; ``start()`` returns
    ``self`` so ``server = Fake().start()`` works in fixtures.
    """

    _handler_class: type[BaseHTTPRequestHandler]
    _thread_name = "fake-http-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._requested_port = port
        self._httpd: _QuietThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()

    def start(self) -> Self:
        """Bind the socket and serve on a daemon thread (idempotent). Returns ``self``."""
        with self._state_lock:
            if self._httpd is not None:
                return self
            httpd = _QuietThreadingHTTPServer(
                (self._host, self._requested_port), self._handler_class
            )
            httpd.owner = self
            thread = threading.Thread(
                # A short poll interval keeps stop() fast (shutdown waits for one poll).
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{self._thread_name}:{httpd.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._httpd, self._thread = httpd, thread
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and open connections (idempotent)."""
        with self._state_lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The bound TCP port (raises ``RuntimeError`` before :meth:`start`)."""
        httpd = self._httpd
        if httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() first")
        return int(httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``"http://127.0.0.1:54321"`` (raises ``RuntimeError`` before start)."""
        return f"http://{self._host}:{self.port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # pragma: no cover - best effort if a test forgot stop()
        httpd = getattr(self, "_httpd", None)
        if httpd is not None:
            with contextlib.suppress(OSError):
                httpd.server_close()


class _JSONRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler helpers: body reading, JSON replies, chunked streaming."""

    protocol_version = "HTTP/1.1"
    server_version = "confidence-router-fake"
    # Small replies on a kept-alive connection otherwise wait ~40 ms for the client's delayed
    # ACK (Nagle); that would add 40 ms to every measured latency.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr.
        logger.debug("%s - %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Skip optional trailers up to the blank line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except _DISCONNECT_ERRORS:
            self.close_connection = True

    def _send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(status, _dumps(obj), "application/json; charset=utf-8", headers)

    def _start_chunked(self, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        # One HTTP chunk per message; wfile is unbuffered, so each reaches the client now.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# The Ollama-compatible server.
# ---------------------------------------------------------------------------------------------


# A malformed request: reply 400 with the message (the shared protocol's error).
_BadRequest = ProtocolError


def _logprob_entry(token: GeneratedToken, k: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "token": token.text,
        "logprob": token.logprob,
        "bytes": list(token.text.encode("utf-8")),
    }
    if k > 0:
        # Ollama omits the field (omitempty) when top_logprobs is 0.
        entry["top_logprobs"] = [
            {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            for text, logprob in list(token.top_logprobs)[:k]
        ]
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


class _OllamaHandler(_JSONRequestHandler):
    server: _QuietThreadingHTTPServer

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
        raw = self._read_body()
        body: Any = None
        parse_error: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                parse_error = f"invalid JSON body: {exc}"
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
        except _DISCONNECT_ERRORS:
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
        if not isinstance(prompt, str):
            raise _BadRequest("prompt must be a string")
        messages: list[dict[str, Any]] = []
        if isinstance(system, str) and system:
            messages.append({"role": "system", "content": system})
        user: dict[str, Any] = {"role": "user", "content": prompt}
        if body.get("images"):
            user["images"] = body["images"]
        messages.append(user)
        request = self._parse_generation(body, messages)
        self._run_generation(request, chat=False, preload=not prompt)

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

        reply: ChatReply = self.owner.backend.chat(request)
        tokens: Iterator[GeneratedToken] = iter(reply.tokens)
        # Pull the first token before sending headers, so a failure or the latency before it
        # happens while the HTTP status can still say "error" (as Ollama does).
        try:
            first: GeneratedToken | None = next(tokens)
        except StopIteration:
            first = None
        timer.mark_first_token()

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
            obj = piece("".join(t.text for t in collected), collected, True)
            if chat and reply.tool_calls:
                obj["message"]["tool_calls"] = list(reply.tool_calls)
            obj.update(final_fields(len(collected)))
            self._send_json(200, obj)
            return

        self._stream(request, tokens, first, reply, piece, final_piece, chat=chat)

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
    ) -> None:
        count = 0
        try:
            self._start_chunked("application/x-ndjson")
            token = first
            while token is not None:
                self._write_chunk(_dumps(piece(token.text, [token], False)) + b"\n")
                count += 1
                token = next(tokens, None)
            if chat and reply.tool_calls:
                tool_piece = piece("", (), False)
                tool_piece["message"]["tool_calls"] = list(reply.tool_calls)
                self._write_chunk(_dumps(tool_piece) + b"\n")
            self._write_chunk(_dumps(final_piece(count)) + b"\n")
            self._end_chunked()
        except _DISCONNECT_ERRORS:
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
                self._write_chunk(_dumps({"error": message}) + b"\n")
                self._end_chunked()
            except _DISCONNECT_ERRORS:
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
        start = time.perf_counter_ns()
        vectors = self.owner.backend.embed(model, inputs) if inputs else []
        dimensions = body.get("dimensions")
        if isinstance(dimensions, int) and dimensions > 0:
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
                "capabilities": ["completion", "tools"],
                "modified_at": card["modified_at"],
            },
        )


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


class OllamaCompatibleServer(_BackgroundServer):
    """Serve a :class:`ChatBackend` over Ollama's native HTTP API on a background thread.

    Args:
        backend: answers chat and embedding requests (e.g. ``ScriptedBackend``).
        host: interface to bind; keep the default ``127.0.0.1`` for tests.
        port: TCP port; ``0`` picks a free ephemeral port (read it from :attr:`url`).
        version: what ``/api/version`` reports.

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
    ) -> None:
        if not isinstance(backend, ChatBackend):
            raise TypeError(
                "backend must implement ChatBackend (chat, embed, models), "
                f"got {type(backend).__name__}"
            )
        super().__init__(host, port)
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
            raise TypeError(f"backend must implement ChatBackend, got {type(backend).__name__}")
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
