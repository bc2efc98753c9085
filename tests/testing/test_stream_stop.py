"""A client that stops a stream early must stop the generation on the server.

The unchanged ChatOllama streams from the Ollama-compatible server; the test counts, on the
server side, how many tokens the ScriptedBackend actually produced.
"""

import asyncio
import time

import pytest
from langchain_ollama import ChatOllama

N_TOKENS = 200
TOKEN_DELAY = 0.01  # 200 tokens would take ~2 s to generate in full


def wait_until_idle(backend, timeout=5.0):
    """Wait until the produced-token count stops changing (the generator finished/closed)."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        count = backend.generated_tokens
        if count == last:
            return count
        last = count
        time.sleep(0.2)
    return backend.generated_tokens


@pytest.fixture
def long_answer(ollama_backend):
    ollama_backend.add_answer(
        "story", [f" w{i}" for i in range(N_TOKENS)], logprobs=-0.1, token_delay=TOKEN_DELAY
    )
    return ollama_backend


def test_full_stream_generates_every_token(long_answer, ollama_server):
    llm = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    text = "".join(chunk.text for chunk in llm.stream("Tell a story"))
    assert text.split() == [f"w{i}" for i in range(N_TOKENS)]
    assert long_answer.generated_tokens == N_TOKENS


def test_closing_a_sync_stream_stops_generation(long_answer, ollama_server):
    llm = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    stream = llm.stream("Tell a story")
    received = [next(stream) for _ in range(3)]
    assert [c.text for c in received] == [" w0", " w1", " w2"]
    stream.close()
    at_close = long_answer.generated_tokens
    produced = wait_until_idle(long_answer)
    # The server notices the closed connection at its next write or two.
    assert produced - at_close <= 3, (at_close, produced)
    assert produced < 20


def test_breaking_out_of_a_for_loop_stops_generation(long_answer, ollama_server):
    llm = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    for index, _chunk in enumerate(llm.stream("Tell a story")):
        if index == 2:
            break  # CPython closes the abandoned generator at once (reference counting)
    assert wait_until_idle(long_answer) < 20


async def test_closing_an_async_stream_stops_generation(long_answer, ollama_server):
    llm = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    stream = llm.astream("Tell a story")
    received = [await anext(stream) for _ in range(3)]
    assert [c.text for c in received] == [" w0", " w1", " w2"]
    await stream.aclose()
    at_close = long_answer.generated_tokens
    produced = await asyncio.to_thread(wait_until_idle, long_answer)
    assert produced - at_close <= 3, (at_close, produced)
    assert produced < 20


def test_server_serves_the_next_request_after_a_hang_up(long_answer, ollama_server):
    llm = ChatOllama(base_url=ollama_server.url, model="scripted-local")
    stream = llm.stream("Tell a story")
    next(stream)
    stream.close()
    long_answer.add_answer("France", " Paris")
    assert llm.invoke("Capital of France?").text == " Paris"
