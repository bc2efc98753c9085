"""SelfAssessmentProbe end to end: the unchanged ChatOllama over HTTP to the project's fake
Ollama server (scripted YES/NO top logprobs), plus fake chat models for other shapes."""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_ollama import ChatOllama, OllamaEmbeddings

from confidence_router.errors import RoutingConfigError
from confidence_router.gsa import (
    GSA_V2_PROMPT_TEMPLATE,
    GSA_V2_QUESTION_LAST_VERSION,
    GSA_V2_VERSION,
    GSA_V3_VERSION,
    GsaExtractionWarning,
    GsaScore,
    Hit,
    build_gsa_prompt,
)
from confidence_router.knowledge import KnowledgeStore
from confidence_router.probe import (
    SelfAssessmentProbe,
    first_position_top_logprobs,
    message_text,
    prepare_probe_model,
)
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

MODEL = "qwen2.5:7b"
FRANCE = "What is the capital of France?"
SPIDER = "How many legs does a spider have?"


@pytest.fixture
def backend(gsa_backend: ScriptedBackend, gsa_server: OllamaCompatibleServer) -> ScriptedBackend:
    gsa_backend.reset()
    # Unscripted probes answer a plain NO (keeps tests free of neutral-extraction warnings).
    gsa_backend.set_default(["NO"], top_logprobs=[[("NO", -0.3), ("YES", -1.4)]])
    gsa_server.clear_requests()
    return gsa_backend


@pytest.fixture
def local(gsa_server: OllamaCompatibleServer) -> ChatOllama:
    # The caller's answering model: its own settings must survive the probe.
    return ChatOllama(base_url=gsa_server.url, model=MODEL, temperature=0.7, num_predict=512)


@pytest.fixture
def store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gsa_server: OllamaCompatibleServer
) -> Iterator[KnowledgeStore]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embeddings = OllamaEmbeddings(base_url=gsa_server.url, model=MODEL)
    with KnowledgeStore(embeddings, path=tmp_path / "kb") as opened:
        yield opened


def _chat_bodies(server: OllamaCompatibleServer) -> list[dict[str, Any]]:
    return [r["body"] for r in server.requests if r["path"] == "/api/chat"]


# ---------------------------------------------------------------------- tiers over HTTP


def test_logprob_softmax_and_request_shape(
    backend: ScriptedBackend, gsa_server: OllamaCompatibleServer, local: ChatOllama
) -> None:
    backend.add_probe("capital of France", {"YES": -0.1, "NO": -3.0})
    probe = SelfAssessmentProbe(model=local)
    score = probe.invoke(FRANCE)

    assert isinstance(score, GsaScore)
    assert score.extraction_mode == "logprob_softmax"
    assert round(score.p_yes, 4) == 0.9478
    assert (score.yes_logprob, score.no_logprob) == (-0.1, -3.0)
    assert score.raw_text == "YES"
    assert score.prompt_version == GSA_V3_VERSION
    assert not score.had_retrieval and score.n_hits_used == 0
    assert score.latency_s > 0 and score.retrieval_latency_s is None

    [body] = _chat_bodies(gsa_server)
    # one user message, no system prompt, exact v2 bytes (no store -> bare)
    assert body["messages"] == [
        {"role": "user", "content": GSA_V2_PROMPT_TEMPLATE.format(query=FRANCE)}
    ]
    assert body["options"]["temperature"] == 0.0
    assert body["options"]["num_predict"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    # the caller's instance was not modified
    assert (local.temperature, local.num_predict, local.logprobs) == (0.7, 512, None)


def test_pass2_and_one_sided_over_http(backend: ScriptedBackend, local: ChatOllama) -> None:
    backend.add_probe("capital of France", {" yes": -0.2, "Maybe": -2.0})
    score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert score.extraction_mode == "logprob_softmax"
    assert score.yes_logprob == -0.2 and score.no_logprob is None
    assert score.p_yes > 0.999999


def test_text_hard_when_top_list_has_no_candidate(
    backend: ScriptedBackend, local: ChatOllama
) -> None:
    # "No." is not a YES/NO candidate even after strip().upper() ("NO."), so tier 1 finds
    # nothing and the text decides.
    backend.add_answer("capital of France", ["No."], top_logprobs=[[("No.", -0.1)]])
    score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert score.extraction_mode == "text_hard"
    assert score.p_yes == 0.0 and score.recognized


def test_neutral_over_http(backend: ScriptedBackend, local: ChatOllama) -> None:
    backend.add_answer("capital of France", ["**YES**"], top_logprobs=[[("**YES**", -0.1)]])
    with pytest.warns(GsaExtractionWarning):
        score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert score.extraction_mode == "neutral"
    assert score.p_yes == 0.5 and not score.recognized
    assert score.raw_text == "**YES**"


# ---------------------------------------------------------------------- retrieval-conditional


def test_strong_hit_changes_the_prompt_sent(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
) -> None:
    store.add(FRANCE, "Paris is the capital of France.", source="cloud_escalation")
    store.add(SPIDER, "Eight.")
    backend.add_probe("capital of France", {"YES": -0.05, "NO": -4.0})
    gsa_server.clear_requests()

    score = SelfAssessmentProbe(model=local, store=store).invoke(FRANCE)

    assert score.had_retrieval and score.n_hits_used == 1
    assert score.n_hits_retrieved == 2
    assert score.retrieval_latency_s is not None
    [body] = _chat_bodies(gsa_server)
    sent = body["messages"][0]["content"]
    assert sent == score.prompt
    assert sent == (
        "The user has asked the following question:\nWhat is the capital of France?\n\n"
        "Here is what you recall from your knowledge base:\n"
        "1. (memory of: What is the capital of France?)\n   Paris is the capital of France.\n\n"
        "Are you confident you can answer this question correctly? "
        "Respond with exactly one token: YES or NO."
    )
    assert "Eight." not in sent
    # the query (stripped) was embedded with the store's embedder
    embeds = [r["body"] for r in gsa_server.requests if r["path"] == "/api/embed"]
    assert embeds and embeds[-1]["input"] == [FRANCE]


def test_weak_hit_sends_the_bare_prompt(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
) -> None:
    store.add(SPIDER, "Eight.")
    query = "Who painted the ceiling of the Sistine Chapel?"
    [hit] = store.search(query)
    assert hit.score is not None and hit.score < 0.70  # weak by construction
    gsa_server.clear_requests()

    score = SelfAssessmentProbe(model=local, store=store).invoke(query)

    assert not score.had_retrieval and score.n_hits_used == 0
    assert score.n_hits_retrieved == 1
    [body] = _chat_bodies(gsa_server)
    assert body["messages"][0]["content"] == GSA_V2_PROMPT_TEMPLATE.format(query=query)
    assert body["messages"][0]["content"] == build_gsa_prompt(query, version=GSA_V2_VERSION).text


@pytest.mark.parametrize("version", [GSA_V2_VERSION, GSA_V2_QUESTION_LAST_VERSION])
def test_v2_never_searches(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
    version: str,
) -> None:
    store.add(FRANCE, "Paris.")
    gsa_server.clear_requests()
    score = SelfAssessmentProbe(model=local, store=store, version=version).invoke(FRANCE)
    assert score.prompt_version == version and not score.had_retrieval
    assert [r["path"] for r in gsa_server.requests] == ["/api/chat"]


def test_precomputed_hits_skip_the_store(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
) -> None:
    gsa_server.clear_requests()
    probe = SelfAssessmentProbe(model=local, store=store)
    score = probe.invoke(
        {
            "query": FRANCE,
            "hits": [
                Hit("Paris.", 0.91, question="Capital of France?"),
                {"content": "Lyon.", "score": 0.40},
            ],
        }
    )
    assert score.n_hits_used == 1 and score.n_hits_retrieved == 2
    assert [r["path"] for r in gsa_server.requests] == ["/api/chat"]
    assert "1. (memory of: Capital of France?)\n   Paris." in score.prompt


def test_tau_is_applied_by_the_probe(backend: ScriptedBackend, local: ChatOllama) -> None:
    hits = [Hit("Paris.", 0.65, question="Capital of France?")]
    assert SelfAssessmentProbe(model=local).invoke({"query": FRANCE, "hits": hits}).n_hits_used == 0
    low_tau = SelfAssessmentProbe(model=local, tau=0.6)
    assert low_tau.invoke({"query": FRANCE, "hits": hits}).n_hits_used == 1


# ---------------------------------------------------------------------- async and batch


def test_ainvoke_uses_real_async_path(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
) -> None:
    store.add(FRANCE, "Paris.")
    backend.add_probe("capital of France", {"NO": -0.2, "YES": -1.8})
    probe = SelfAssessmentProbe(model=local, store=store)
    score = asyncio.run(probe.ainvoke(FRANCE))
    assert score.extraction_mode == "logprob_softmax"
    assert score.p_yes == pytest.approx(1 / (1 + math.exp(1.6)))
    assert score.had_retrieval and score.n_hits_used == 1


def test_batch_and_abatch(backend: ScriptedBackend, local: ChatOllama) -> None:
    backend.add_probe("capital of France", {"YES": -0.1, "NO": -3.0})
    backend.add_probe("spider", {"NO": -0.1, "YES": -3.0})
    probe = SelfAssessmentProbe(model=local)
    scores = probe.batch([FRANCE, SPIDER])
    assert [s.p_yes > 0.5 for s in scores] == [True, False]
    ascores = asyncio.run(probe.abatch([FRANCE, {"query": SPIDER}]))
    assert [s.p_yes > 0.5 for s in ascores] == [True, False]


# ---------------------------------------------------------------------- other model shapes


def _fake(*messages: AIMessage | str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter(messages))


def test_non_ollama_model_is_used_as_is_and_text_hard_without_logprobs() -> None:
    model = _fake(AIMessage(content=" Yes."))
    probe = SelfAssessmentProbe(model=model)
    assert probe.probe_model is model
    assert prepare_probe_model(model) is model
    score = probe.invoke(FRANCE)
    assert score.extraction_mode == "text_hard" and score.p_yes == 1.0


def test_openai_style_logprobs() -> None:
    metadata = {
        "logprobs": {
            "content": [
                {
                    "token": "NO",
                    "logprob": -0.3,
                    "top_logprobs": [
                        {"token": "NO", "logprob": -0.3},
                        {"token": "YES", "logprob": -1.5},
                    ],
                }
            ]
        }
    }
    score = SelfAssessmentProbe(model=_fake(AIMessage(content="NO", response_metadata=metadata)))
    result = score.invoke(FRANCE)
    assert result.extraction_mode == "logprob_softmax"
    assert (result.yes_logprob, result.no_logprob) == (-1.5, -0.3)


def test_dict_items_in_ollama_shape_and_only_first_position() -> None:
    metadata = {
        "logprobs": [
            {"token": "YES", "logprob": -0.4, "top_logprobs": [{"token": "YES", "logprob": -0.4}]},
            {"token": "NO", "logprob": -0.01, "top_logprobs": [{"token": "NO", "logprob": -0.01}]},
        ]
    }
    msg = AIMessage(content="YES NO", response_metadata=metadata)
    assert first_position_top_logprobs(msg) == [{"token": "YES", "logprob": -0.4}]
    result = SelfAssessmentProbe(model=_fake(msg)).invoke(FRANCE)
    assert result.no_logprob is None  # the second position is never looked at


def test_neutral_with_fake_model() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = SelfAssessmentProbe(model=_fake(AIMessage(content=""))).invoke(FRANCE)
    assert result.extraction_mode == "neutral" and result.p_yes == 0.5
    assert any(issubclass(w.category, GsaExtractionWarning) for w in caught)


def test_first_position_top_logprobs_absent_shapes() -> None:
    assert first_position_top_logprobs(AIMessage(content="x")) is None
    assert (
        first_position_top_logprobs(AIMessage(content="x", response_metadata={"logprobs": None}))
        is None
    )
    assert (
        first_position_top_logprobs(AIMessage(content="x", response_metadata={"logprobs": []}))
        is None
    )
    empty_top = {"logprobs": [{"token": "YES", "logprob": -0.1, "top_logprobs": []}]}
    assert first_position_top_logprobs(AIMessage(content="x", response_metadata=empty_top)) is None
    assert first_position_top_logprobs("plain string") is None


def test_message_text_shapes() -> None:
    assert message_text("YES") == "YES"
    assert message_text(AIMessage(content="NO")) == "NO"
    assert message_text(AIMessage(content=[{"type": "text", "text": "YE"}, "S"])) == "YES"


def test_bad_configuration_and_input() -> None:
    model = _fake(AIMessage(content="YES"))
    with pytest.raises(RoutingConfigError, match="unknown GSA version"):
        SelfAssessmentProbe(model=model, version="gsa-v1")
    with pytest.raises(RoutingConfigError, match="k must"):
        SelfAssessmentProbe(model=model, k=0)
    probe = SelfAssessmentProbe(model=_fake(*(AIMessage(content="YES") for _ in range(5))))
    with pytest.raises(TypeError):
        probe.invoke({"question": FRANCE})
    with pytest.raises(TypeError):
        probe.invoke(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        probe.invoke("   ")


def test_configure_model_false_keeps_the_instance(local: ChatOllama) -> None:
    probe = SelfAssessmentProbe(model=local, configure_model=False)
    assert probe.probe_model is local
    configured = SelfAssessmentProbe(model=local).probe_model
    assert isinstance(configured, ChatOllama) and configured is not local
    assert (configured.num_predict, configured.top_logprobs) == (1, 5)


def test_message_template_wraps_exact_prompt_bytes(backend: ScriptedBackend, gsa_server: OllamaCompatibleServer) -> None:
    template = "EXAMPLES\nQ: {prompt}\nA:"
    probe = SelfAssessmentProbe(model=ChatOllama(model=MODEL, base_url=gsa_server.url),
                                version=GSA_V2_VERSION, message_template=template)
    probe.invoke(FRANCE)
    sent = gsa_server.requests[-1]["body"]["messages"][-1]["content"]
    assert sent == template.replace("{prompt}", GSA_V2_PROMPT_TEMPLATE.format(query=FRANCE))
    with pytest.raises(RoutingConfigError, match="placeholder"):
        SelfAssessmentProbe(model=ChatOllama(model=MODEL), message_template="no slot")


# ---------------------------------------------------------------------- question-last order


def test_question_last_version_sends_its_own_bytes_with_and_without_knowledge(
    backend: ScriptedBackend,
    gsa_server: OllamaCompatibleServer,
    local: ChatOllama,
    store: KnowledgeStore,
) -> None:
    from confidence_router.gsa import (
        GSA_QUESTION_LAST_HEAD,
        GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE,
        GSA_V3_QUESTION_LAST_VERSION,
    )

    store.add(FRANCE, "Paris is the capital of France.")
    backend.add_probe("Paris is the capital", {"YES": -0.05, "NO": -4.0})
    probe = SelfAssessmentProbe(model=local, store=store, version=GSA_V3_QUESTION_LAST_VERSION)
    gsa_server.clear_requests()

    strong = probe.invoke(FRANCE)  # the stored question: a strong hit
    weak = probe.invoke(SPIDER)  # nothing strong in the store

    assert strong.prompt_version == weak.prompt_version == GSA_V3_QUESTION_LAST_VERSION
    assert strong.had_retrieval and not weak.had_retrieval
    assert strong.p_yes > 0.9 and weak.p_yes < 0.5  # the script saw the knowledge only once
    first, second = (body["messages"][0]["content"] for body in _chat_bodies(gsa_server))
    assert first == (
        GSA_QUESTION_LAST_HEAD + "Here is what you recall from your knowledge base:\n"
        "1. (memory of: What is the capital of France?)\n   Paris is the capital of France.\n\n"
        "The user has asked the following question:\nWhat is the capital of France?"
    )
    # No strong hit: byte for byte the bare question-last prompt (absence is not signalled).
    assert second == GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE.format(query=SPIDER)
    assert [r["path"] for r in gsa_server.requests].count("/api/embed") == 2  # both searched


def test_unknown_versions_are_refused(local: ChatOllama) -> None:
    with pytest.raises(RoutingConfigError, match="unknown GSA version"):
        SelfAssessmentProbe(model=local, version="gsa-v3-question-first")
