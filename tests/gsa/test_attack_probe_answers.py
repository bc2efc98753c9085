"""Attacks on P(YES) and on what the router does with it (README "Two-stage routing",
docs §2.3): odd tokenisations, missing or broken logprobs, empty answers, tool calls and
thinking, and the probe's own request shape. P(YES) must be a probability in [0, 1] (or the
probe raises), and the routing record must say what the probe saw.

The probe model is the real ``ChatOllama`` against the project's scripted Ollama server; for
logprob values the wire cannot carry (NaN, ±inf), LangChain's own fake chat model stands in
for the backend.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import ConfidenceRouterError, InvalidArgumentError
from confidence_router.gsa import (
    GSA_V2_PROMPT_TEMPLATE,
    GsaExtraction,
    GsaExtractionWarning,
    GsaScore,
    extract_p_yes,
)
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.testing import OllamaCompatibleServer, ScriptedBackend

FRANCE = "What is the capital of France?"


def _is_probe(request: Any) -> bool:
    return "Respond with exactly one token" in request.messages[-1]["content"]


def _is_answer(request: Any) -> bool:
    return request.messages[-1]["content"] == FRANCE


@pytest.fixture
def local(ollama_chat) -> ChatOllama:
    return ollama_chat()


def _probe_bodies(server: OllamaCompatibleServer) -> list[dict[str, Any]]:
    return [r["body"] for r in server.requests_to("/api/chat")
            if "Respond with exactly one token" in r["body"]["messages"][-1]["content"]]


# ---------------------------------------------------------------------- tokenisations


@pytest.mark.parametrize("token", ["YES", " YES", "Yes", " Yes", "yes", "Y", " y", "\tYES\n"])
def test_yes_spellings_read_from_logprobs(
    ollama_backend: ScriptedBackend, local: ChatOllama, token: str
) -> None:
    ollama_backend.add_answer(_is_probe, [token], top_logprobs=[[(token, -0.1), ("NO", -3.0)]])
    score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert score.extraction_mode == "logprob_softmax"
    assert score.p_yes == pytest.approx(1 / (1 + math.exp(-2.9)))


@pytest.mark.parametrize(
    ("tokens", "top", "mode", "p_yes"),
    [
        (["YES."], [("YES.", -0.1), ("NO.", -2.5)], "text_hard", 1.0),
        (["No", "."], [[("No", -0.2), ("Yes", -1.9)], [(".", -0.01)]], "logprob_softmax",
         1 / (1 + math.exp(1.7))),
        (["YE", "S"], [[("YE", -0.1), ("NE", -3.0)], [("S", -0.01)]], "text_hard", 1.0),
        (["NO"], [("NO", -0.05), ("Maybe", -3.0)], "logprob_softmax",
         1 / (1 + math.exp(20.0 - 0.05))),
        (["Sure"], [("Sure", -0.1), ("Maybe", -2.0)], "neutral", 0.5),
        (["**YES**"], [("**YES**", -0.1)], "neutral", 0.5),
    ],
    ids=["YES-dot", "No-then-dot", "split-YE-S", "YES-absent", "no-candidate", "markdown"],
)
def test_odd_answers_give_a_probability(
    ollama_backend: ScriptedBackend, local: ChatOllama,
    tokens: list[str], top: Any, mode: str, p_yes: float,
) -> None:
    per_token = [top] if len(tokens) == 1 else top
    ollama_backend.add_answer(_is_probe, tokens, top_logprobs=per_token)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert score.extraction_mode == mode
    assert score.p_yes == pytest.approx(p_yes, rel=1e-9, abs=1e-12)
    assert 0.0 <= score.p_yes <= 1.0
    neutral_warned = any(issubclass(w.category, GsaExtractionWarning) for w in caught)
    assert neutral_warned == (mode == "neutral")


# ---------------------------------------------------------------------- broken logprobs


def _fake(content: str, top: Any) -> GenericFakeChatModel:
    metadata = {"logprobs": [{"token": content, "logprob": -0.1, "top_logprobs": top}]}
    return GenericFakeChatModel(
        messages=iter([AIMessage(content=content, response_metadata=metadata)])
    )


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("content", "top", "mode", "p_yes"),
    [
        ("YES", [{"token": "YES", "logprob": NAN}, {"token": "NO", "logprob": NAN}],
         "text_hard", 1.0),
        ("NO", [{"token": "YES", "logprob": -INF}, {"token": "NO", "logprob": -INF}],
         "text_hard", 0.0),
        # A YES listed with +inf is garbled, not missing from the top-k (which would read it
        # as a certain NO): the logprob tier is skipped and the text decides.
        ("YES", [{"token": "YES", "logprob": INF}, {"token": "NO", "logprob": -0.1}],
         "text_hard", 1.0),
        ("YES", [{"token": "YES", "logprob": -INF}, {"token": "NO", "logprob": -0.1}],
         "logprob_softmax", 0.0),
        ("YES", [{"token": "YES", "logprob": -1e308}, {"token": "NO", "logprob": -1e308}],
         "logprob_softmax", 0.5),
        ("YES", [{"token": "YES", "logprob": "high"}, {"token": None, "logprob": -0.1}],
         "text_hard", 1.0),
        ("", [], "neutral", 0.5),
        ("", None, "neutral", 0.5),
    ],
    ids=["nan", "both-neg-inf", "pos-inf", "yes-neg-inf", "huge-negative", "garbage",
         "empty-answer", "no-top-list"],
)
def test_broken_logprobs_never_leave_0_1(
    content: str, top: Any, mode: str, p_yes: float
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GsaExtractionWarning)
        score = SelfAssessmentProbe(model=_fake(content, top)).invoke(FRANCE)
    assert score.extraction_mode == mode
    assert score.p_yes == pytest.approx(p_yes, abs=1e-12)
    assert 0.0 <= score.p_yes <= 1.0 and not math.isnan(score.p_yes)


def test_no_logprobs_at_all_reads_the_text() -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content="no")]))
    score = SelfAssessmentProbe(model=model).invoke(FRANCE)
    assert (score.extraction_mode, score.p_yes) == ("text_hard", 0.0)


@pytest.mark.parametrize("p_yes", [float("nan"), -0.01, 1.5, float("inf"), True, "0.5"])
def test_a_score_that_is_not_a_probability_cannot_be_built(p_yes: Any) -> None:
    """Before: GsaExtraction/GsaScore took any value, and a NaN P(YES) compares False with
    every threshold (the router would read it as confident)."""
    with pytest.raises(InvalidArgumentError, match="p_yes"):
        GsaExtraction(p_yes, None, None, "neutral", False)
    with pytest.raises(ConfidenceRouterError, match="p_yes"):
        GsaScore(p_yes=p_yes, extraction_mode="neutral", recognized=False, yes_logprob=None,
                 no_logprob=None, raw_text="", prompt_version="v", had_retrieval=False,
                 n_hits_used=0, latency_s=0.0)


def test_extract_p_yes_extremes_stay_in_range() -> None:
    for yes, no in [(0.0, -1e308), (-1e308, 0.0), (-745.0, -0.0), (5.0, -5.0)]:
        ext = extract_p_yes([("YES", yes), ("NO", no)], None)
        assert 0.0 <= ext.p_yes <= 1.0


# ---------------------------------------------------------------------- tool calls, thinking


def test_a_tool_call_answer_is_neutral_and_routed_locally_with_the_reason(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer, local: ChatOllama,
    bedrock_chat, bedrock_server,
) -> None:
    ollama_backend.add_answer(_is_probe, "", tool_calls=[{"name": "lookup",
                                                          "arguments": {"q": "France"}}])
    ollama_backend.add_answer(_is_answer, " Paris", logprobs=-0.05)
    router = ConfidenceRoutedLLM(local=local, cloud=bedrock_chat(),
                                 precheck=SelfAssessmentProbe(model=local))
    with pytest.warns(GsaExtractionWarning):
        message = router.invoke(FRANCE)
    routing = message.response_metadata["routing"]
    assert message.content == " Paris"
    assert routing["precheck"]["extraction_mode"] == "neutral"
    assert routing["precheck"]["p_yes"] == 0.5 and routing["precheck"]["escalate"] is False
    assert routing["decision"] == "local" and routing["reason"] == "confident"
    assert bedrock_server.requests == []
    assert len(ollama_server.requests_to("/api/chat")) == 2  # probe + answer


def test_a_model_with_bound_tools_is_probed_without_them(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer, local: ChatOllama
) -> None:
    """Before: ``local.bind_tools(...)`` was not recognised as a ChatOllama, so the probe
    sent the tools, no num_predict=1 and no logprobs (a full answer, read as text)."""

    def lookup(q: str) -> str:
        """Look something up."""
        return q

    ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0})
    score = SelfAssessmentProbe(model=local.bind_tools([lookup])).invoke(FRANCE)
    [body] = _probe_bodies(ollama_server)
    assert "tools" not in body or not body["tools"]
    assert body["options"]["num_predict"] == 1 and body["logprobs"] is True
    assert body["top_logprobs"] == 5
    assert score.extraction_mode == "logprob_softmax"


def test_thinking_is_switched_off_for_the_one_token_probe(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer, ollama_chat
) -> None:
    """Before: ``reasoning=True`` was copied into the probe, so a thinking model spent its
    single token thinking and the answer was empty (neutral)."""
    thinking = ollama_chat(reasoning=True, format="json")
    ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0})
    SelfAssessmentProbe(model=thinking).invoke(FRANCE)
    [body] = _probe_bodies(ollama_server)
    assert body.get("think") is False
    assert not body.get("format")  # a JSON format forces "{" as the first token
    assert (thinking.reasoning, thinking.format) == (True, "json")  # the caller's is untouched


def test_a_thinking_block_answer_is_neutral_and_flagged(
    ollama_backend: ScriptedBackend, local: ChatOllama
) -> None:
    ollama_backend.add_answer(_is_probe, ["<think>"], top_logprobs=[[("<think>", -0.01)]])
    with pytest.warns(GsaExtractionWarning):
        score = SelfAssessmentProbe(model=local).invoke(FRANCE)
    assert (score.extraction_mode, score.recognized, score.p_yes) == ("neutral", False, 0.5)
    assert score.raw_text == "<think>"


def test_a_thinking_content_block_is_not_read_as_the_answer() -> None:
    """A model used as given (e.g. Bedrock with extended thinking) answers in content blocks:
    only the text block is the answer, not the thinking that mentions NO."""
    message = AIMessage(content=[
        {"type": "thinking", "thinking": "NO idea at first, but on reflection..."},
        {"type": "reasoning_content", "reasoning_content": {"text": "NO"}},
        {"type": "text", "text": "YES"},
    ])
    model = GenericFakeChatModel(messages=iter([message]))
    score = SelfAssessmentProbe(model=model).invoke(FRANCE)
    assert (score.extraction_mode, score.p_yes, score.raw_text) == ("text_hard", 1.0, "YES")


# ---------------------------------------------------------------------- the router's use


@pytest.fixture
def routed(ollama_backend: ScriptedBackend, local: ChatOllama, bedrock_chat, bedrock_server):
    ollama_backend.add_answer(_is_answer, " Paris", logprobs=-0.05)
    bedrock_server.add_answer("France", "Paris (cloud)")

    def build(**overrides: Any) -> ConfidenceRoutedLLM:
        kwargs = {"local": local, "cloud": bedrock_chat(),
                  "precheck": SelfAssessmentProbe(model=local), **overrides}
        return ConfidenceRoutedLLM(**kwargs)

    return build


@pytest.mark.parametrize(
    ("distribution", "decision", "reason", "escalate"),
    [
        ({"YES": -0.05, "NO": -3.0}, "local", "confident", False),
        ({"NO": -0.05, "YES": -3.0}, "cloud", "precheck", True),
        ({" no": -0.05, "Maybe": -1.0}, "cloud", "precheck", True),  # YES absent
    ],
)
def test_router_skips_or_answers_by_p_yes_and_says_why(
    routed, ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer,
    distribution: dict[str, float], decision: str, reason: str, escalate: bool,
) -> None:
    ollama_backend.add_probe(_is_probe, distribution)
    routing = routed().invoke(FRANCE).response_metadata["routing"]
    assert (routing["decision"], routing["reason"]) == (decision, reason)
    assert routing["precheck"]["escalate"] is escalate
    assert routing["precheck"]["extraction_mode"] == "logprob_softmax"
    assert 0.0 <= routing["precheck"]["p_yes"] <= 1.0
    chats = ollama_server.requests_to("/api/chat")
    assert len(chats) == (1 if escalate else 2)  # the local answer was skipped on escalate
    assert chats[0]["body"]["messages"] == [
        {"role": "user", "content": GSA_V2_PROMPT_TEMPLATE.format(query=FRANCE)}
    ]


# ---------------------------------------------------------------------- faults


def test_hung_probe_times_out_and_the_query_is_answered_locally(
    routed, ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    hung = ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0}, latency=30.0)
    routing = routed(local_timeout=0.5).invoke(FRANCE).response_metadata["routing"]
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]
    assert routing["decision"] == "local" and routing["reason"] == "confident"
    assert hung.calls == 1
    assert len(ollama_server.requests_to("/api/chat")) == 2  # the hung probe + the answer


async def test_hung_probe_times_out_async(
    routed, ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer
) -> None:
    ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0}, latency=30.0)
    message = await routed(local_timeout=0.5).ainvoke(FRANCE)
    routing = message.response_metadata["routing"]
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]
    assert message.content == " Paris"
    assert len(ollama_server.requests_to("/api/chat")) == 2


def test_hung_probe_of_a_tool_bound_local_model_times_out_without_tools(
    ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer, local: ChatOllama,
    bedrock_chat,
) -> None:
    """The router's local_timeout reaches the probe's model also through a bind_tools()
    wrapper, and the probe request carries no tools."""

    def lookup(q: str) -> str:
        """Look something up."""
        return q

    tooled = local.bind_tools([lookup])
    ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0}, latency=30.0)
    ollama_backend.add_answer(_is_answer, " Paris", logprobs=-0.05)
    router = ConfidenceRoutedLLM(local=tooled, cloud=bedrock_chat(), local_timeout=0.5,
                                 precheck=SelfAssessmentProbe(model=tooled))
    routing = router.invoke(FRANCE).response_metadata["routing"]
    assert routing["precheck"]["error_kind"] == "timeout", routing["precheck"]
    [probe_body] = _probe_bodies(ollama_server)
    assert not probe_body.get("tools")
    assert probe_body["options"]["num_predict"] == 1


@pytest.mark.parametrize("after_tokens", [0, 1])
def test_probe_server_500_is_recorded_and_never_blocks(
    routed, ollama_backend: ScriptedBackend, ollama_server: OllamaCompatibleServer,
    after_tokens: int,
) -> None:
    ollama_backend.add_probe(_is_probe, {"YES": -0.1, "NO": -3.0})
    ollama_backend.fail(_is_probe, status=500, message="probe backend crashed",
                        after_tokens=after_tokens)
    message = routed().invoke(FRANCE)
    routing = message.response_metadata["routing"]
    assert message.content == " Paris"
    assert "probe backend crashed" in routing["precheck"]["error"]
    assert "p_yes" not in routing["precheck"]
    assert len(ollama_server.requests_to("/api/chat")) == 2


# ---------------------------------------------------------------------- custom pre-checks


def _custom_precheck(result: Any):
    """A user's own pre-check Runnable (the router accepts any Runnable)."""
    from langchain_core.runnables import RunnableLambda

    return RunnableLambda(lambda _query: result)


class _Score:
    def __init__(self, p_yes: Any) -> None:
        self.p_yes = p_yes


def test_router_refuses_a_nan_p_yes_from_a_custom_precheck(routed) -> None:
    routing = routed(precheck=_custom_precheck(_Score(float("nan")))).invoke(
        FRANCE).response_metadata["routing"]
    assert "p_yes in [0, 1]" in routing["precheck"]["error"]
    assert routing["decision"] == "local" and routing["reason"] == "confident"


@pytest.mark.parametrize("result", [{"p_yes": 0.9}, 0.9, None], ids=["dict", "float", "none"])
def test_router_survives_a_precheck_returning_a_non_score(routed, result: Any) -> None:
    message = routed(precheck=_custom_precheck(result)).invoke(FRANCE)
    assert message.content == " Paris"
    assert "error" in message.response_metadata["routing"]["precheck"]
