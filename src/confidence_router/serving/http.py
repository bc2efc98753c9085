"""HTTP scaffolding shared by the project's servers (the Ollama-compatible server, the fake
bedrock-runtime): a threaded HTTP/1.1 server that tracks its connections, queues bursts and
keeps client disconnects quiet, a start/stop wrapper running it on a daemon thread, and a
request handler with JSON and chunked-streaming helpers. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confidence_router.errors import (
    ConfidenceRouterError,
    InvalidArgumentError,
    InvalidInputError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_READ_TIMEOUT_S",
    "DISCONNECT_ERRORS",
    "BackgroundServer",
    "JSONRequestHandler",
    "QuietThreadingHTTPServer",
    "RequestBodyError",
    "dumps_json",
    "loads_json",
]

logger = logging.getLogger("confidence_router.serving")

# Errors that mean "the client went away": expected when a client times out or stops
# reading a stream early; never worth a traceback.
DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

#: Largest request body accepted (413 above): base64 images make Ollama bodies large, but a
#: client must not make the server allocate whatever a ``Content-Length`` claims.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Seconds a connection may stay silent while the server waits for (the rest of) a request;
#: then it is closed. Without it a client that sends half a request and stalls (slow loris)
#: holds a handler thread forever, and enough of them fill ``max_active``.
DEFAULT_READ_TIMEOUT_S = 60.0


class RequestBodyError(ConfidenceRouterError):
    """The request's body framing is invalid (bad ``Content-Length`` or chunk size) or the
    body is too large. The handler has already answered (400 / 413) and closes the
    connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class QuietThreadingHTTPServer(ThreadingHTTPServer):
    """Daemon-threaded server that tracks open connections and keeps disconnects quiet."""

    daemon_threads = True
    # Handler threads must never keep the interpreter alive, and stop() must not wait for a
    # handler that is sleeping through injected latency.
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of clients beyond it saw refused or
    # reset connections. The kernel queues this many; past max_active, clients get a 503.
    request_queue_size = 1024
    max_active = 512

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        super().__init__(address, handler)
        self.owner: Any = None
        self.read_timeout = read_timeout
        self.max_body_bytes = max_body_bytes
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
        if isinstance(exc, OSError):  # includes all DISCONNECT_ERRORS
            logger.debug("client %s disconnected: %r", client_address, exc)
            return
        if isinstance(exc, RequestBodyError):  # already answered with 400 / 413
            logger.debug("bad request body from %s: %s", client_address, exc)
            return
        logger.exception("unhandled error while serving %s", client_address)


class BackgroundServer:
    """Base class: start/stop a :class:`QuietThreadingHTTPServer` on a daemon thread.

    Subclasses set ``_handler_class``. Usable as a context manager; ``start()`` returns
    ``self`` so ``server = Fake().start()`` works in fixtures.
    """

    _handler_class: type[BaseHTTPRequestHandler]
    _thread_name = "fake-http-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if read_timeout is not None and (
            isinstance(read_timeout, bool)
            or not isinstance(read_timeout, (int, float))
            or not math.isfinite(read_timeout)
            or read_timeout <= 0
        ):
            raise InvalidArgumentError(
                f"read_timeout must be a finite number of seconds > 0 or None, got {read_timeout!r}"
            )
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or (
            max_body_bytes < 1
        ):
            raise InvalidArgumentError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
        self._host = host
        self._requested_port = port
        self._read_timeout = read_timeout
        self._max_body_bytes = max_body_bytes
        self._httpd: QuietThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()

    def start(self) -> Self:
        """Bind the socket and serve on a daemon thread (idempotent). Returns ``self``."""
        with self._state_lock:
            if self._httpd is not None:
                return self
            httpd = QuietThreadingHTTPServer(
                (self._host, self._requested_port), self._handler_class,
                read_timeout=self._read_timeout, max_body_bytes=self._max_body_bytes,
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


class JSONRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler helpers: body reading, JSON replies, chunked streaming."""

    protocol_version = "HTTP/1.1"
    server_version = "confidence-router-fake"
    # Small replies on a kept-alive connection otherwise wait ~40 ms for the client's delayed
    # ACK (Nagle); that would add 40 ms to every measured latency.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        # Every read (request line, headers, body) and write fails after this many silent
        # seconds; BaseHTTPRequestHandler then closes the connection.
        self.connection.settimeout(getattr(self.server, "read_timeout", None))

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr.
        logger.debug("%s - %s", self.address_string(), format % args)

    def _body_error(self, status: int, message: str) -> RequestBodyError:
        """Answer ``status`` now (the rest of the body cannot be trusted: close the
        connection) and return the error to raise."""
        self.close_connection = True
        self._send_json(status, {"error": message}, {"Connection": "close"})
        return RequestBodyError(status, message)

    def _read_body(self) -> bytes:
        """The request body, at most the server's ``max_body_bytes``.

        Raises:
            RequestBodyError: an invalid ``Content-Length`` or chunk size (400) or a body
                larger than the limit (413); the client has been answered.
        """
        limit = int(getattr(self.server, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(1024).split(b";")[0].strip()
                try:
                    size = int(line or b"0", 16)
                except ValueError:
                    raise self._body_error(400, f"invalid chunk size {line[:40]!r}") from None
                if size < 0:
                    raise self._body_error(400, f"invalid chunk size {line[:40]!r}")
                if size == 0:
                    # Skip optional trailers up to the blank line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise self._body_error(413, f"request body larger than {limit} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        declared = (self.headers.get("Content-Length") or "0").strip()
        if not declared.isdigit():  # also rejects "-5", which would read until EOF
            raise self._body_error(400, f"invalid Content-Length {declared[:40]!r}")
        length = int(declared)
        if length > limit:
            raise self._body_error(413, f"request body larger than {limit} bytes")
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
        except DISCONNECT_ERRORS:
            self.close_connection = True

    def _send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(status, dumps_json(obj), "application/json; charset=utf-8", headers)

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


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the servers send it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads_json(raw: bytes) -> Any:
    """Parse a request body as JSON the way Go's decoder (Ollama's) reads it.

    Unlike ``json.loads``: ``Infinity`` / ``-Infinity`` / ``NaN`` are refused (not JSON; they
    reached option parsing as non-finite floats), and an unpaired UTF-16 surrogate escape
    (``"\\ud800"``) reads as U+FFFD instead of a surrogate code point that no UTF-8 encoder
    accepts (the prompt, or the reply echoing it, then failed).

    Raises:
        ValueError: invalid JSON (``json.JSONDecodeError``, ``UnicodeDecodeError``, or
            :class:`~confidence_router.errors.InvalidInputError` for NaN / Infinity).
        RecursionError: nested deeper than the parser's stack.
    """
    body = json.loads(raw, parse_constant=_reject_constant)
    if _SURROGATE_ESCAPE.search(raw):
        body = _without_lone_surrogates(body)
    return body


# A JSON escape of a UTF-16 surrogate ("\ud800"): only bodies with one need scrubbing.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    # Python's json reads Infinity / -Infinity / NaN; JSON (and Ollama's Go decoder) does
    # not, and a non-finite number would reach the option parsing as a float.
    raise InvalidInputError(f"{name} is not valid JSON")


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every unpaired UTF-16 surrogate in its strings replaced by U+FFFD.

    ``json.loads`` joins a valid escaped pair into one character but keeps a lone
    ``"\\ud800"`` as a surrogate code point, which cannot be encoded as UTF-8 (the prompt, the
    reply). Go's decoder, i.e. Ollama, reads it as U+FFFD; so does this server.
    """
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value
