"""A local answer cut off mid-stream is a failed answer, never a served one.

Ollama ends every answer with a ``"done": true`` line. ChatOllama accepts a body that simply
ends (a connection closed without chunked framing: a proxy, a crashed server) and returns the
text so far, with its logprobs, as the whole answer; a confident prefix used to be kept and
served. These tests run the real ChatOllama against a raw HTTP server on 127.0.0.1 that writes
confident answer lines and closes the connection (with or without the final line), and the
real ChatBedrockConverse against the fake Bedrock, counting what both received.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM, Reason
from confidence_router.errors import LocalModelError

PATHS = ("invoke", "stream", "ainvoke", "astream", "batch", "abatch")
WORDS = [" Paris", " is", " the", " capital"]


class RawOllama:
    """Answers every ``/api/chat`` with confident NDJSON lines and closes the connection
    (HTTP/1.1, ``Connection: close``, no chunked framing); ``done`` adds Ollama's final line."""

    def __init__(self, *, done: bool) -> None:
        self.done = done
        self.chat_requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            self._write(conn)
        except OSError:  # the client hung up (the router stopped reading): nothing to do
            pass
        finally:
            conn.close()

    def _write(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(line.split(":", 1)[1]) for line in lines
                       if line.lower().startswith("content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        with self._lock:
            self.chat_requests += lines[0].startswith("POST /api/chat")
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Connection: close\r\n\r\n")
        for word in WORDS:
            line = {"model": "raw", "created_at": "2026-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": word}, "done": False,
                    "logprobs": [{"token": word, "logprob": -0.01, "bytes": None,
                                  "top_logprobs": [{"token": word, "logprob": -0.01}]}]}
            conn.sendall(json.dumps(line).encode() + b"\n")
        if self.done:
            final = {"model": "raw", "created_at": "2026-01-01T00:00:00Z",
                     "message": {"role": "assistant", "content": ""}, "done": True,
                     "done_reason": "stop", "prompt_eval_count": 5,
                     "eval_count": len(WORDS)}
            conn.sendall(json.dumps(final).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def raw_ollama(request: pytest.FixtureRequest) -> Iterator[RawOllama]:
    server = RawOllama(done=request.param)
    yield server
    server.close()


def _call(router: Any, path: str, question: str) -> list[Any]:
    if path == "invoke":
        return [router.invoke(question)]
    if path == "stream":
        chunks = list(router.stream(question))
        total = chunks[0]
        for chunk in chunks[1:]:
            total = total + chunk
        return [total]
    if path == "batch":
        return router.batch([question, question])

    async def run() -> list[Any]:
        if path == "ainvoke":
            return [await router.ainvoke(question)]
        if path == "astream":
            chunks = [c async for c in router.astream(question)]
            total = chunks[0]
            for chunk in chunks[1:]:
                total = total + chunk
            return [total]
        return await router.abatch([question, question])

    return asyncio.run(run())


def _router(raw: RawOllama, cloud: Any, **kwargs: Any) -> ConfidenceRoutedLLM:
    local = ChatOllama(base_url=raw.url, model="raw", temperature=0)
    return ConfidenceRoutedLLM(local=local, cloud=cloud, threshold=0.5, **kwargs)


@pytest.mark.parametrize("raw_ollama", [False], indirect=True)
@pytest.mark.parametrize("path", PATHS)
def test_a_cut_local_answer_escalates_as_a_disconnected_local_error(
    raw_ollama, bedrock_chat, bedrock_server, path
):
    bedrock_server.add_answer(None, "Paris.")
    answers = _call(_router(raw_ollama, bedrock_chat()), path, "Capital of France?")
    for answer in answers:
        routing = answer.response_metadata["routing"]
        assert answer.text == "Paris."  # the cloud's, not the cut " Paris is the capital"
        assert routing["decision"] == "cloud"
        assert routing["reason"] == Reason.LOCAL_ERROR
        assert routing["local_error_kind"] == "disconnected"
        assert routing["local_error"].startswith("IncompleteAnswerError: ")
        assert "final chunk" in routing["local_error"]
    assert raw_ollama.chat_requests == len(answers)
    assert len(bedrock_server.requests) == len(answers)


@pytest.mark.parametrize("raw_ollama", [True], indirect=True)
@pytest.mark.parametrize("path", PATHS)
def test_the_same_answer_with_its_final_line_is_kept_locally(
    raw_ollama, bedrock_chat, bedrock_server, path
):
    answers = _call(_router(raw_ollama, bedrock_chat()), path, "Capital of France?")
    for answer in answers:
        assert answer.text == "".join(WORDS)
        assert answer.response_metadata["routing"]["decision"] == "local"
    assert raw_ollama.chat_requests == len(answers)
    assert len(bedrock_server.requests) == 0


@pytest.mark.parametrize("raw_ollama", [False], indirect=True)
@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke", "astream"])
def test_a_cut_answer_is_an_error_when_it_cannot_escalate(raw_ollama, bedrock_chat,
                                                          bedrock_server, path):
    router = _router(raw_ollama, bedrock_chat(), allow_escalation=False)
    with pytest.raises(LocalModelError) as caught:
        _call(router, path, "Capital of France?")
    assert caught.value.routing is not None
    assert caught.value.routing["local_error_kind"] == "disconnected"
    assert len(bedrock_server.requests) == 0


@pytest.mark.parametrize("raw_ollama", [False], indirect=True)
def test_early_exit_on_a_cut_stream_still_escalates_once(raw_ollama, bedrock_chat,
                                                         bedrock_server):
    # With a threshold no token can reach, early exit stops at the first token: the answer
    # was stopped by the router, not cut, and escalates for its confidence.
    bedrock_server.add_answer(None, "Paris.")
    router = _router(raw_ollama, bedrock_chat(), early_exit=True, signal="min_logprob")
    answer = router.invoke("Capital of France?", threshold=0.999)
    routing = answer.response_metadata["routing"]
    assert answer.text == "Paris."
    assert routing["reason"] != Reason.LOCAL_ERROR
    assert routing["early_exit"]["exited"] is True
    assert len(bedrock_server.requests) == 1
