"""The Ollama-compatible server (the test bed, and ``confidence-router serve``) attacked at the
HTTP level: broken framing, giant bodies, fields of the wrong JSON type, and a slow-loris
client that sends half a request and stalls. Every bad request gets a 4xx JSON answer (never a
dropped connection or a 500) and reaches no backend; a stalled client never holds up others."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from confidence_router.errors import InvalidArgumentError
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

CHAT = {"model": "scripted-local", "messages": [{"role": "user", "content": "hi"}],
        "stream": False}


def _raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                return received
            received += piece


def _status_and_body(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.fixture
def backend() -> ScriptedBackend:
    backend = ScriptedBackend()
    backend.set_default("Paris")
    return backend


@pytest.fixture
def server(backend):
    with OllamaCompatibleServer(backend, read_timeout=0.5, max_body_bytes=4096) as server:
        yield server


BODY = json.dumps(CHAT).encode()


@pytest.mark.parametrize(
    ("head", "status", "needle"),
    [
        (b"Content-Length: abc\r\n", 400, "Content-Length"),
        # A negative length used to read until the client hung up: a hang, not an answer.
        (b"Content-Length: -5\r\n", 400, "Content-Length"),
        # A huge declared length used to make the server allocate it (MemoryError, no answer).
        (b"Content-Length: 99999999999\r\n", 413, "larger than 4096"),
        (b"Transfer-Encoding: chunked\r\n", 400, "chunk size"),
    ],
)
def test_broken_framing_gets_a_json_error_not_a_dropped_connection(server, backend, head,
                                                                   status, needle):
    extra = b"zz\r\n" if b"chunked" in head else BODY
    reply = _raw_exchange(
        server.port, b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + extra
    )
    code, body = _status_and_body(reply)
    assert code == status
    assert needle in body["error"]
    assert backend.requests == []


def test_chunked_body_over_the_limit_is_413(server, backend):
    chunk = b"a" * 3000
    data = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n")
    code, body = _status_and_body(_raw_exchange(server.port, data))
    assert code == 413 and "larger than 4096" in body["error"]
    assert backend.requests == []


def test_body_at_the_limit_is_served(backend):
    with OllamaCompatibleServer(backend, max_body_bytes=len(BODY)) as server:
        assert httpx.post(server.url + "/api/chat", content=BODY).json()["message"]["content"] == "Paris"
    with OllamaCompatibleServer(backend, max_body_bytes=len(BODY) - 1) as server:
        assert httpx.post(server.url + "/api/chat", content=BODY).status_code == 413
    assert len(backend.requests) == 1


def test_wrong_content_type_is_still_json(server, backend):
    reply = httpx.post(server.url + "/api/chat", content=BODY, headers={"content-type": "text/plain"})
    assert reply.status_code == 200 and reply.json()["message"]["content"] == "Paris"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        # bool("no") is True: the request used to be streamed against the client's wish.
        ({"stream": "no"}, "stream must be true or false"),
        ({"logprobs": "yes"}, "logprobs must be true or false"),
        ({"tools": 5}, "tools must be a list"),                      # was a 500 TypeError
        ({"tools": [5]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
         "parameters must be an object"),
        ({"format": 5}, "format must be"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi", "images": "x"}]}, "images"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": 5},
                       {"role": "user", "content": "hi"}]}, "tool_calls"),
    ],
)
def test_fields_of_the_wrong_type_are_400_before_the_backend(server, backend, change, needle):
    reply = httpx.post(server.url + "/api/chat", json={**CHAT, **change})
    assert reply.status_code == 400
    assert needle in reply.json()["error"]
    assert backend.requests == []


@pytest.mark.parametrize(("change", "needle"),
                         [({"images": 5}, "images"), ({"system": 5}, "system must be a string")])
def test_generate_fields_of_the_wrong_type_are_400(server, backend, change, needle):
    reply = httpx.post(server.url + "/api/generate",
                       json={"model": "scripted-local", "prompt": "hi", "stream": False, **change})
    assert reply.status_code == 400 and needle in reply.json()["error"]
    assert backend.requests == []


def test_valid_odd_shapes_are_served(server, backend):
    messages = [{"role": "system", "content": None},
                {"role": "user"},
                {"role": "assistant", "content": "", "tool_calls": []},
                {"role": "user", "content": "hi", "images": []}]
    reply = httpx.post(server.url + "/api/chat", json={**CHAT, "messages": messages})
    assert reply.status_code == 200 and reply.json()["message"]["content"] == "Paris"
    assert len(backend.requests) == 1


def test_slow_loris_is_dropped_and_never_blocks_other_clients(server, backend):
    stalled = []
    for head in (b"POST /api/chat HTTP/1.1\r\nHost: x\r\n",                       # half the headers
                 b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"m"):  # half a body
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(head)
        stalled.append(sock)
    try:
        started = time.monotonic()
        reply = httpx.post(server.url + "/api/chat", json=CHAT, timeout=5)
        assert reply.json()["message"]["content"] == "Paris"
        assert time.monotonic() - started < 0.4  # served while both stall (read_timeout 0.5 s)
        # The server gives up on the silent clients after read_timeout and frees their threads.
        for sock in stalled:
            assert sock.recv(65536) == b""
        assert time.monotonic() - started < 4.0
    finally:
        for sock in stalled:
            sock.close()
    assert len(backend.requests) == 1  # neither half request reached the backend


@pytest.mark.parametrize("kwargs", [{"read_timeout": 0}, {"read_timeout": float("inf")},
                                    {"read_timeout": "1"}, {"max_body_bytes": 0},
                                    {"max_body_bytes": 1.5}])
def test_server_limits_are_validated(backend, kwargs):
    with pytest.raises(InvalidArgumentError):
        OllamaCompatibleServer(backend, **kwargs)


def test_json_nested_too_deeply_is_a_400_not_a_dropped_connection(server, backend):
    # json.loads raises RecursionError (not a ValueError): the connection used to close
    # without an answer.
    reply = httpx.post(server.url + "/api/chat", content=b"[" * 3000, timeout=5)
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]
    assert backend.requests == []


def test_stalled_clients_at_capacity_are_evicted_so_others_get_served(server, backend,
                                                                      monkeypatch):
    """With every slot taken by silent clients, newcomers get a 503; the silent ones used to
    keep their slots forever, now they are dropped after read_timeout."""
    monkeypatch.setattr(server._httpd, "max_active", 2)
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.1)
        assert httpx.post(server.url + "/api/chat", json=CHAT, timeout=5).status_code == 503
        deadline = time.monotonic() + 5
        while True:
            reply = httpx.post(server.url + "/api/chat", json=CHAT, timeout=5)
            if reply.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.status_code == 200 and reply.json()["message"]["content"] == "Paris"
    finally:
        for sock in stalled:
            sock.close()


class _OneAtATimeBackend(ScriptedBackend):
    """A backend that, like the embedded llama.cpp one, holds one lock while it streams the
    tokens of an answer (a model context serves one request at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self._model_lock = threading.Lock()

    def chat(self, request):
        reply = super().chat(request)
        tokens = reply.tokens

        def locked():
            with self._model_lock:
                yield from tokens

        reply.tokens = locked()
        return reply


def test_a_client_that_stops_reading_a_stream_does_not_block_the_next_one():
    backend = _OneAtATimeBackend()
    backend.set_default(["x" * 2000] * 10_000)   # 20 MB: far more than socket buffers hold
    backend.add_answer("second", "served")
    with OllamaCompatibleServer(backend, read_timeout=0.5) as server:
        body = json.dumps({"model": "scripted-local", "stream": True,
                           "messages": [{"role": "user", "content": "first"}]}).encode()
        with socket.socket() as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
            reader.connect(("127.0.0.1", server.port))
            reader.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(body), body))
            time.sleep(0.3)   # the server is now blocked writing to a client that never reads
            started = time.monotonic()
            reply = httpx.post(server.url + "/api/chat", timeout=10, json={
                "model": "scripted-local", "stream": False,
                "messages": [{"role": "user", "content": "second"}]})
            # Without a write timeout the lock was held for as long as the reader stalled.
            assert reply.json()["message"]["content"] == "served"
            assert time.monotonic() - started < 5


# ---- where the server differed from ``ollama serve`` (scripted backend) -----------------------


def test_show_reports_what_the_scripted_backend_answers(server, backend):
    """The scripted backend answers tools requests (with the scripted tool calls), so
    /api/show keeps reporting ["completion", "tools"]; nothing else (no "insert")."""
    import ollama

    backend.add_answer("weather", "", tool_calls=[{"name": "get_weather",
                                                   "arguments": {"city": "Paris"}}])
    client = ollama.Client(host=server.url)
    assert client.show("scripted-local").capabilities == ["completion", "tools"]
    reply = client.chat(model="scripted-local", messages=[{"role": "user", "content": "weather?"}],
                        tools=[{"type": "function", "function": {"name": "get_weather",
                                                                 "parameters": {}}}])
    assert reply.message.tool_calls[0].function.name == "get_weather"


def test_a_backend_without_capabilities_reports_completion_only(backend):
    import ollama

    class PlainBackend:  # the ChatBackend protocol alone, as a third-party backend writes it
        def chat(self, request):
            return backend.chat(request)

        def embed(self, model, inputs):
            return backend.embed(model, inputs)

        def models(self):
            return backend.models()

    with OllamaCompatibleServer(PlainBackend()) as plain:
        assert ollama.Client(host=plain.url).show("scripted-local").capabilities == [
            "completion"]
        # Its embed takes neither truncate nor client_gone: the server passes neither.
        vectors = httpx.post(plain.url + "/api/embed", timeout=10, json={
            "model": "scripted-local", "input": ["a", "b"], "truncate": False}).json()
        assert len(vectors["embeddings"]) == 2
    assert backend.embed_requests[-1] == ("scripted-local", ["a", "b"])


def test_generate_suffix_is_refused_without_the_insert_capability(server, backend):
    import ollama

    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="scripted-local", prompt="def f():", suffix="    return x")
    assert err.value.status_code == 400
    assert "does not support insert" in err.value.error
    assert backend.requests == []  # refused before the backend


def test_generate_template_reaches_the_backend_and_raw_refuses_it(server, backend):
    import ollama

    client = ollama.Client(host=server.url)
    reply = client.generate(model="scripted-local", prompt="hi", template="<<{{ .Prompt }}>>")
    assert reply.response == "Paris"
    (request,) = backend.requests
    assert request.template == "<<{{ .Prompt }}>>"
    assert request.messages[-1]["content"] == "hi"
    for fields in ({"template": "{{ .Prompt }}"}, {"system": "Be brief."}, {"context": [1, 2]}):
        reply = httpx.post(server.url + "/api/generate", timeout=10, json={
            "model": "scripted-local", "prompt": "hi", "raw": True, "stream": False, **fields})
        assert reply.status_code == 400
        assert reply.json()["error"] == "raw mode does not support template, system, or context"
    assert len(backend.requests) == 1


def test_embed_truncate_must_be_a_boolean(server, backend):
    reply = httpx.post(server.url + "/api/embed", timeout=10, json={
        "model": "scripted-local", "input": "a", "truncate": "no"})
    assert reply.status_code == 400 and "truncate" in reply.json()["error"]
    assert backend.embed_requests == []
    # The scripted embedding has no context length: truncate false changes nothing.
    reply = httpx.post(server.url + "/api/embed", timeout=10, json={
        "model": "scripted-local", "input": "a " * 1000, "truncate": False})
    assert reply.status_code == 200 and len(reply.json()["embeddings"]) == 1


def test_logprob_entries_show_a_tokens_own_bytes_when_the_backend_gives_them(server, backend):
    """A backend token carrying part of a character adds "" to the text; its entry shows
    the token itself (bytes, and U+FFFD as text), as the same token among the alternatives."""
    from confidence_router.serving.protocol import GeneratedToken

    smile = "\U0001F60A".encode()
    first = GeneratedToken("", -0.1, (("\ufffd", -0.1), ("a", -3.0)), smile[:2],
                           (smile[:2], b"a"))
    second = GeneratedToken("\U0001F60A", -0.2, (("\ufffd\ufffd", -0.2),), smile[2:],
                            (smile[2:],))
    backend.add_answer("emoji", [first, second])
    for stream in (False, True):
        reply = httpx.post(server.url + "/api/chat", timeout=10, json={
            "model": "scripted-local", "messages": [{"role": "user", "content": "emoji"}],
            "stream": stream, "logprobs": True, "top_logprobs": 2})
        objects = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
        assert "".join(o["message"]["content"] for o in objects) == "\U0001F60A"
        entries = [e for o in objects for e in o.get("logprobs") or ()]
        assert [(e["token"], e["bytes"]) for e in entries] == [
            ("\ufffd", list(smile[:2])), ("\ufffd\ufffd", list(smile[2:]))]
        assert [(t["token"], t["bytes"]) for t in entries[0]["top_logprobs"]] == [
            ("\ufffd", list(smile[:2])), ("a", [97])]
        assert entries[1]["top_logprobs"][0]["bytes"] == entries[1]["bytes"]
