"""The two-stage router (GSA probe, then the logprob check) attacked on every entry point, with
early exit and without, through the real ChatOllama / ChatBedrockConverse clients: probe
answers whose logprobs cannot be read (NaN, +inf on the wire), a probe server error, a hung
probe, an unreadable probe answer, a custom pre-check scoring outside [0, 1], and a knowledge
store present or absent. The README promises a failed probe never blocks a query (it is
recorded and the query answered locally); requests are counted at both fake servers.
"""

from __future__ import annotations

import asyncio
import math
import time
import warnings
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda
from langchain_ollama import OllamaEmbeddings

from confidence_router import ConfidenceRoutedLLM, Reason
from confidence_router.gsa import GsaExtractionWarning
from confidence_router.knowledge import KnowledgeStore
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.retry import RetryPolicy
from confidence_router.serving.protocol import GeneratedToken
from confidence_router.testing import InFlightBackend

PATHS = ("invoke", "stream", "ainvoke", "astream", "batch", "abatch")
CLOUD_TEXT = "cloud answer"
PROBE_CUE = "Respond with exactly one token"
NO_RETRY = RetryPolicy(max_attempts=1)
KEPT = [" Paris", " it", " is"]
LOW_AT_2 = [-0.05, -6.0, -0.05, -0.05]  # min_logprob exits after the 2nd token


def _merged(chunks: list[Any]) -> Any:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _routing(message: Any) -> dict[str, Any]:
    return message.response_metadata["routing"]


def _call(runnable: Any, path: str, question: str, **kwargs: Any) -> list[Any]:
    """One question through one entry point (twice for the batches)."""
    if path == "invoke":
        return [runnable.invoke(question, **kwargs)]
    if path == "stream":
        return [_merged(list(runnable.stream(question, **kwargs)))]
    if path == "batch":
        return runnable.batch([question, question], **kwargs)

    async def run() -> list[Any]:
        if path == "ainvoke":
            return [await runnable.ainvoke(question, **kwargs)]
        if path == "astream":
            return [_merged([c async for c in runnable.astream(question, **kwargs)])]
        return await runnable.abatch([question, question], **kwargs)

    return asyncio.run(run())


def _probe_for(question: str):
    return lambda request: (question in request.messages[-1]["content"]
                            and PROBE_CUE in request.messages[-1]["content"])


def _answer_for(question: str):
    return lambda request: request.messages[-1]["content"] == question


def _counts(ollama_server: Any, bedrock_server: Any) -> tuple[int, int, int]:
    """(probe requests, answer requests) at the fake Ollama, requests at the fake Bedrock."""
    bodies = [r["body"] for r in ollama_server.requests_to("/api/chat")]
    probes = sum(PROBE_CUE in b["messages"][-1]["content"] for b in bodies)
    return probes, len(bodies) - probes, len(bedrock_server.requests)


@pytest.fixture
def cloud(bedrock_chat, bedrock_server):
    bedrock_server.set_default(CLOUD_TEXT)
    return bedrock_chat(max_tokens=50)


@pytest.fixture
def two_stage(ollama_chat, cloud):
    def build(**fields: Any) -> ConfidenceRoutedLLM:
        local = ollama_chat()
        precheck = fields.pop("precheck", None) or SelfAssessmentProbe(model=local)
        return ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                   precheck=precheck, cloud_retry=NO_RETRY, **fields)

    return build


# =============================================================================================
# 1. a probe logprob the wire carries but that is no number: never read as a certain NO
# =============================================================================================

NAN, INF = float("nan"), float("inf")

GARBLED_PROBES = {
    "yes-nan": (("YES", NAN), ("NO", -1.0)),
    "yes-inf": (("YES", INF), ("NO", -0.1)),
    "no-nan": (("YES", -2.0), ("NO", NAN)),
}


@pytest.mark.parametrize("garbled", sorted(GARBLED_PROBES))
def test_a_probe_logprob_that_is_no_number_does_not_send_the_query_to_the_cloud(
    two_stage, ollama_backend, ollama_server, bedrock_server, garbled
):
    # The probe answered "YES", but a logprob of its first position is NaN / +inf on the wire.
    # Before: the garbled side counted as "not in the top-k" (logprob -20), so a NaN YES read
    # as a certain NO and the query went to the cloud without a local answer.
    question = f"Capital of France {garbled}?"
    top = GARBLED_PROBES[garbled]
    ollama_backend.add_answer(_probe_for(question), [GeneratedToken("YES", -0.1, top)])
    ollama_backend.add_answer(_answer_for(question), KEPT, logprobs=-0.05)
    router = two_stage()
    total = 0
    for path in PATHS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", GsaExtractionWarning)  # readable: "YES"
            messages = _call(router, path, question)
        total += len(messages)
        for message in messages:
            routing = _routing(message)
            precheck = routing["precheck"]
            assert precheck["extraction_mode"] == "text_hard", path
            assert precheck["p_yes"] == 1.0 and precheck["escalate"] is False
            assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENT
            assert message.text == "".join(KEPT)
    assert _counts(ollama_server, bedrock_server) == (total, total, 0)


# =============================================================================================
# 2. a failed probe never blocks the query: error, hang, unreadable, out of range
# =============================================================================================


def _script_failure(kind: str, backend: Any, question: str) -> None:
    if kind == "server_error":
        backend.fail(_probe_for(question), status=500, message="probe exploded")
    elif kind == "hang":
        backend.delay(_probe_for(question), 30.0)
        backend.add_probe(_probe_for(question), {"YES": -0.05, "NO": -3.0})
    elif kind == "unreadable":
        backend.add_answer(_probe_for(question), [GeneratedToken("maybe", -0.1, (
            ("maybe", -0.1), ("perhaps", -1.0)))])
    elif kind == "out_of_range":
        pass  # a custom pre-check's score (no request)


@pytest.mark.parametrize(("kind", "early_exit"), [
    ("server_error", False), ("server_error", True), ("hang", True), ("unreadable", False),
    ("out_of_range", True)])
def test_a_failed_probe_never_blocks_the_query_on_any_path(
    two_stage, ollama_backend, ollama_server, bedrock_server, kind, early_exit
):
    question = f"Capital of Kenya {kind}?"
    _script_failure(kind, ollama_backend, question)
    ollama_backend.add_answer(_answer_for(question), [f" w{i}" for i in range(4)],
                              logprobs=LOW_AT_2)
    fields: dict[str, Any] = {"local_timeout": 0.5} if kind == "hang" else {}
    if kind == "out_of_range":
        fields["precheck"] = RunnableLambda(lambda _query: type("S", (), {"p_yes": 1.5})())
    router = two_stage(**fields)
    total = 0
    for path in PATHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GsaExtractionWarning)
            messages = _call(router, path, question, early_exit=early_exit)
        total += len(messages)
        for message in messages:
            routing = _routing(message)
            precheck = routing["precheck"]
            where = (kind, path, early_exit)
            if kind == "unreadable":  # documented: neutral 0.5, which passes a threshold of 0.5
                assert precheck["extraction_mode"] == "neutral" and precheck["p_yes"] == 0.5
                assert precheck["escalate"] is False, where
            else:
                assert precheck["error"], where
                expected_kind = {"server_error": "transient", "hang": "timeout"}.get(kind)
                if expected_kind:
                    assert precheck["error_kind"] == expected_kind, (where, precheck)
            # The local answer was generated and decided as usual (it escalates: min -6).
            assert routing["decision"] == "cloud" and message.text == CLOUD_TEXT, where
            if early_exit:
                assert routing["reason"] == Reason.EARLY_EXIT, where
                assert routing["early_exit"] == {"exited": True, "tokens": 2}, where
            else:
                assert routing["reason"] == Reason.LOW_CONFIDENCE, where
                assert "early_exit" not in routing, where
            assert "local" in routing["latency_s"], where
    probes, answers, cloud_requests = _counts(ollama_server, bedrock_server)
    assert probes == (0 if kind == "out_of_range" else total)
    assert answers == total and cloud_requests == total


def test_a_hung_probe_is_cancelled_at_the_server(ollama_chat, cloud, ollama_server,
                                                 bedrock_server):
    backend = InFlightBackend()
    ollama_server.backend = backend
    backend.delay(_probe_for("hung?"), 30.0)
    backend.add_answer(_answer_for("hung?"), KEPT, logprobs=-0.05)
    local = ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, precheck=SelfAssessmentProbe(
        model=local), local_timeout=0.5, early_exit=True)
    for path in ("invoke", "ainvoke"):
        (message,) = _call(router, path, "hung?")
        assert _routing(message)["precheck"]["error_kind"] == "timeout"
        assert message.text == "".join(KEPT)
    deadline = time.monotonic() + 5
    while backend.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.in_flight == 0  # the probes' generations ended with their clients
    assert backend.started == 4 and bedrock_server.requests == []


# =============================================================================================
# 3. the probe and early exit together, with a knowledge store present or absent
# =============================================================================================


@pytest.fixture
def store(tmp_path, monkeypatch, ollama_server):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embeddings = OllamaEmbeddings(base_url=ollama_server.url, model="scripted-embed")
    with KnowledgeStore(embeddings, path=tmp_path / "kb") as opened:
        yield opened


@pytest.mark.parametrize(("path", "with_store"), [("invoke", False), ("astream", True)])
def test_probe_yes_then_early_exit_escalates_once_and_learns(
    ollama_chat, cloud, ollama_backend, ollama_server, bedrock_server, request, path,
    with_store
):
    question = "Who was the second president of Kenya?"
    ollama_backend.add_probe(_probe_for(question), {"YES": -0.1, "NO": -2.5})
    ollama_backend.add_answer(_answer_for(question), [f" w{i}" for i in range(4)],
                              logprobs=LOW_AT_2)
    bedrock_server.add_answer("Kenya", "Daniel arap Moi")
    local = ollama_chat()
    kb = request.getfixturevalue("store") if with_store else None
    router = ConfidenceRoutedLLM(
        local=local, cloud=cloud, signal="min_logprob", early_exit=True, cloud_retry=NO_RETRY,
        precheck=SelfAssessmentProbe(model=local, store=kb), knowledge_store=kb,
        learn_from_escalations=with_store)
    (message,) = _call(router, path, question)
    routing = _routing(message)
    assert routing["precheck"]["escalate"] is False
    assert routing["precheck"]["p_yes"] == pytest.approx(1 / (1 + math.exp(-2.4)))
    assert routing["early_exit"] == {"exited": True, "tokens": 2}
    assert routing["reason"] == Reason.EARLY_EXIT and message.text == "Daniel arap Moi"
    assert _counts(ollama_server, bedrock_server) == (1, 1, 1)
    if not with_store:
        assert "learned" not in routing
        return
    assert routing["learned"] is True
    entry = kb.get_by_question(question)
    assert entry.content == "Daniel arap Moi"
    assert entry.provenance["reason"] == Reason.EARLY_EXIT
    # The next probe shows the learned answer: with P(YES) high it answers locally again.
    (again,) = _call(router, path, question)
    assert _routing(again)["precheck"]["had_retrieval"] is True
    probe_prompts = [r["body"]["messages"][-1]["content"]
                     for r in ollama_server.requests_to("/api/chat")
                     if PROBE_CUE in r["body"]["messages"][-1]["content"]]
    assert "Daniel arap Moi" in probe_prompts[-1]
    assert kb.count() == 1


@pytest.mark.parametrize(("refusal", "path"), [("cloud_error", "astream"), ("budget", "invoke")])
def test_probe_no_then_cloud_refused_then_local_failing_is_a_typed_error(
    two_stage, ollama_backend, ollama_server, bedrock_server, refusal, path
):
    from confidence_router import CloudBudget
    from confidence_router.errors import ConfidenceRouterError

    question = "Who was the second president of Kenya?"
    ollama_backend.add_probe(_probe_for(question), {"NO": -0.1, "YES": -2.5})
    ollama_backend.fail(_answer_for(question), status=500, message="local is down too")
    if refusal == "cloud_error":
        bedrock_server.fail("Kenya", "ServiceUnavailableException")
    budget = CloudBudget(max_usd=1e-9 if refusal == "budget" else 5.0)
    router = two_stage(on_cloud_error="local", budget=budget)
    with pytest.raises(ConfidenceRouterError) as raised:
        _call(router, path, question)
    routing = raised.value.routing  # type: ignore[attr-defined]
    assert routing["precheck"]["escalate"] is True
    assert "local is down too" in str(raised.value) + str(routing.get("local_error"))
    assert _counts(ollama_server, bedrock_server) == (
        1, 1, 1 if refusal == "cloud_error" else 0)
    assert budget.reserved == 0


async def test_21_concurrent_two_stage_calls_with_early_exit_are_each_counted_once(
    two_stage, ollama_backend, ollama_server, bedrock_server
):
    # Three kinds, seven each: the probe says NO (cloud, no local answer); YES then an answer
    # that exits early (cloud); YES then a confident answer (local).
    kinds = {}
    for i in range(21):
        question = f"Concurrent question {i:02d}?"
        kind = ("no", "exit", "kept")[i % 3]
        kinds[question] = kind
        top = {"NO": -0.05, "YES": -3.0} if kind == "no" else {"YES": -0.05, "NO": -3.0}
        ollama_backend.add_probe(_probe_for(question), top)
        values = LOW_AT_2 if kind == "exit" else [-0.05] * 4
        ollama_backend.add_answer(_answer_for(question), [f" w{i}" for i in range(4)],
                                  logprobs=values, token_delay=0.01)
    router = two_stage(early_exit=True)

    async def one(i: int, question: str) -> Any:
        if i % 2:
            return await router.ainvoke(question)
        return _merged([c async for c in router.astream(question)])

    questions = list(kinds)
    messages = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    bodies = [r["body"]["messages"][-1]["content"] for r in ollama_server.requests_to("/api/chat")]
    cloud_asked = [r["last_user_text"] for r in bedrock_server.requests]
    for question, message in zip(questions, messages):
        routing, kind = _routing(message), kinds[question]
        probes = sum(question in b and PROBE_CUE in b for b in bodies)
        answers = bodies.count(question)
        assert probes == 1, question
        assert answers == (0 if kind == "no" else 1), question
        assert cloud_asked.count(question) == (0 if kind == "kept" else 1), question
        expected = {"no": (Reason.PRECHECK, {"exited": False, "tokens": 0}),
                    "exit": (Reason.EARLY_EXIT, {"exited": True, "tokens": 2}),
                    "kept": (Reason.CONFIDENT, {"exited": False, "tokens": 4})}[kind]
        assert (routing["reason"], routing["early_exit"]) == expected, question
        assert message.text == (CLOUD_TEXT if kind != "kept" else " w0 w1 w2 w3"), question
    assert len(bodies) == 21 + 14 and len(cloud_asked) == 14
