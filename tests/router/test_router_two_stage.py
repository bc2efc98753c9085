"""Two-stage routing (GSA pre-check, then logprob check) and learning from escalations, over
the real clients and a real Chroma store on disk."""

from __future__ import annotations

import math

import pytest
from langchain_ollama import ChatOllama, OllamaEmbeddings

from confidence_router import ConfidenceRoutedLLM
from confidence_router.knowledge import KnowledgeStore
from confidence_router.probe import SelfAssessmentProbe

KENYA = "Who was the second president of Kenya?"
FRANCE = "What is the capital of France?"


def _probe_for(question: str):
    """Matches the probe's request for ``question`` (not the answer request)."""
    return lambda request: (
        question in request.messages[-1]["content"]
        and "Respond with exactly one token" in request.messages[-1]["content"]
    )


def _answer_for(question: str):
    return lambda request: request.messages[-1]["content"] == question


@pytest.fixture
def store(tmp_path, monkeypatch, ollama_server):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-embed")
    with KnowledgeStore(embeddings, path=tmp_path / "kb") as opened:
        yield opened


@pytest.fixture
def cloud(bedrock_chat):
    return bedrock_chat()


@pytest.fixture
def router(ollama_server, cloud, store):
    local = ChatOllama(model="scripted-local", base_url=ollama_server.url)
    return ConfidenceRoutedLLM(
        local=local,
        cloud=cloud,
        precheck=SelfAssessmentProbe(model=local, store=store),
        precheck_threshold=0.5,
        knowledge_store=store,
        learn_from_escalations=True,
    )


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    ollama_backend.add_probe(_probe_for(KENYA), {"NO": -0.1, "YES": -2.5})
    ollama_backend.add_probe(_probe_for(FRANCE), {"YES": -0.05, "NO": -3.0})
    ollama_backend.add_answer(_answer_for(FRANCE), "Paris", logprobs=-0.05)
    ollama_backend.add_answer(_answer_for(KENYA), "Jomo Kenyatta", logprobs=-2.5)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    bedrock_server.add_answer("France", "Paris (cloud)")


def _chat_requests(ollama_server):
    return [r for r in ollama_server.requests if r["path"] == "/api/chat"]


def test_precheck_no_escalates_without_local_generation(router, scripted, ollama_server):
    message = router.invoke(KENYA)
    routing = message.response_metadata["routing"]
    assert message.content == "Daniel arap Moi"
    assert routing["decision"] == "cloud"
    assert routing["reason"] == "precheck"
    assert routing["precheck"]["p_yes"] == pytest.approx(1 / (1 + math.exp(2.4)))  # YES -2.5, NO -0.1
    assert routing["precheck"]["extraction_mode"] == "logprob_softmax"
    assert routing["signals"] is None  # no local answer was generated
    assert set(routing["latency_s"]) >= {"precheck", "cloud", "total"}
    assert "local" not in routing["latency_s"]
    requests = _chat_requests(ollama_server)
    assert len(requests) == 1  # only the one-token probe
    assert requests[0]["body"]["options"]["num_predict"] == 1


def test_precheck_no_with_early_exit_records_no_local_tokens(router, scripted, ollama_server):
    routing = router.invoke(KENYA, early_exit=True).response_metadata["routing"]
    assert routing["reason"] == "precheck"
    assert routing["early_exit"] == {"exited": False, "tokens": 0}
    assert len(_chat_requests(ollama_server)) == 1  # only the probe


def test_precheck_yes_then_logprob_check(router, scripted, ollama_server, bedrock_server):
    message = router.invoke(FRANCE)
    routing = message.response_metadata["routing"]
    assert message.content == "Paris"
    assert routing["decision"] == "local" and routing["reason"] == "confident"
    assert routing["precheck"]["p_yes"] > 0.9 and routing["precheck"]["escalate"] is False
    assert set(routing["latency_s"]) >= {"precheck", "local", "total"}
    assert len(_chat_requests(ollama_server)) == 2  # probe + answer
    assert bedrock_server.requests == []


def test_precheck_threshold_per_call(router, scripted):
    message = router.invoke(KENYA, precheck_threshold=0.0)
    routing = message.response_metadata["routing"]
    # the pre-check passes, so the logprob stage decides (and escalates: mean -2.5)
    assert routing["precheck"]["escalate"] is False
    assert routing["reason"] == "low_confidence"
    assert routing["local_answer"] == "Jomo Kenyatta"


def test_failed_precheck_never_blocks_the_query(router, scripted, ollama_backend):
    ollama_backend.fail(_probe_for(FRANCE), status=500, message="probe exploded")
    message = router.invoke(FRANCE)
    routing = message.response_metadata["routing"]
    assert message.content == "Paris"
    assert "probe exploded" in routing["precheck"]["error"]


def test_precheck_escalation_with_cloud_down_answers_locally(router, scripted, bedrock_server):
    bedrock_server.fail("Kenya", error_type="ServiceUnavailableException")
    message = router.invoke(KENYA, on_cloud_error="local")
    routing = message.response_metadata["routing"]
    assert message.content == "Jomo Kenyatta"
    assert routing["reason"] == "cloud_error" and routing["flagged"] is True


def test_stream_precheck_escalation(router, scripted):
    chunks = list(router.stream(KENYA))
    assert "".join(c.text for c in chunks) == "Daniel arap Moi"
    assert chunks[-1].response_metadata["routing"]["reason"] == "precheck"


async def test_async_two_stage(router, scripted):
    kept = await router.ainvoke(FRANCE)
    escalated = await router.ainvoke(KENYA)
    assert kept.content == "Paris"
    assert escalated.response_metadata["routing"]["reason"] == "precheck"
    chunks = [c async for c in router.astream(KENYA)]
    assert "".join(c.text for c in chunks) == "Daniel arap Moi"


def test_learning_from_escalation_round_trip(router, scripted, store, ollama_server):
    assert store.count() == 0
    first = router.invoke(KENYA)
    assert first.response_metadata["routing"]["learned"] is True
    entry = store.get_by_question(KENYA)
    assert entry.content == "Daniel arap Moi"
    assert entry.source == "cloud_escalation"
    assert entry.provenance["reason"] == "precheck"

    # Next time the probe retrieves the stored answer as a strong hit and shows it.
    hits = store.search(KENYA)
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score >= 0.7
    ollama_server.clear_requests()
    second = router.invoke(KENYA)
    precheck = second.response_metadata["routing"]["precheck"]
    assert precheck["had_retrieval"] is True and precheck["n_hits_used"] == 1
    probe_prompt = _chat_requests(ollama_server)[0]["body"]["messages"][-1]["content"]
    assert "Here is what you recall from your knowledge base:" in probe_prompt
    assert "Daniel arap Moi" in probe_prompt
    assert store.count() == 1  # the same question is updated, not duplicated


async def test_learning_on_async_path(router, scripted, store):
    await router.ainvoke(KENYA)
    assert store.get_by_question(KENYA).content == "Daniel arap Moi"


def test_unrelated_question_gets_the_bare_prompt(router, scripted, store, ollama_server):
    store.add("Which river flows through Kaunas?", "Neris and Nemunas")
    ollama_server.clear_requests()
    router.invoke(FRANCE)
    probe_prompt = _chat_requests(ollama_server)[0]["body"]["messages"][-1]["content"]
    assert probe_prompt == (
        "The user has asked the following question:\n" + FRANCE + "\n\nAre you confident you "
        "can answer this question correctly? Respond with exactly one token: YES or NO."
    )
