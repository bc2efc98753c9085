"""Acceptance audit of issue 11 ("Fast local path"), early exit on the scripted test bed.

Written from the issue text, independently of the feature's own tests: the ``early_exit`` knob
everywhere a knob can be set, early exit identical to running to the end for ``min_logprob``
(a property test through the real router and every entry point), the server really stopping,
the routing record's ``early_exit`` entry on every path, and the documented rules for the
mean- and sum-type signals. Real ChatOllama / ChatBedrockConverse clients against the project's
fake servers; the scripted backend counts the tokens it really produced.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.runnables import ConfigurableField
from langchain_ollama import ChatOllama

from confidence_router import CloudBudget, ConfidenceRoutedLLM, Reason, RoutingConfigError
from confidence_router.early_exit import early_exit_index
from confidence_router.errors import CloudEscalationError
from confidence_router.probe import SelfAssessmentProbe
from confidence_router.settings import RouterSettings
from confidence_router.signals import compute_signals, score_for

PATHS = ("invoke", "stream", "ainvoke", "astream", "batch", "abatch")
_unique = itertools.count()


def _merged(chunks: list[Any]) -> Any:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def _messages(router: Any, path: str, question: str, **kwargs: Any) -> list[Any]:
    """One routed call of ``question`` through ``path``; the answers (two for the batches)."""
    if path == "invoke":
        return [router.invoke(question, **kwargs)]
    if path == "stream":
        return [_merged(list(router.stream(question, **kwargs)))]
    if path == "batch":
        return router.batch([question, question], **kwargs)

    async def run() -> list[Any]:
        if path == "ainvoke":
            return [await router.ainvoke(question, **kwargs)]
        if path == "astream":
            return [_merged([c async for c in router.astream(question, **kwargs)])]
        return await router.abatch([question, question], **kwargs)

    return asyncio.run(run())


def _routing(message: Any) -> dict[str, Any]:
    return message.response_metadata["routing"]


def _wait_idle(backend: Any, timeout: float = 5.0) -> int:
    """The backend's produced-token count once it stopped changing."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        count = backend.generated_tokens
        if count == last:
            return count
        last = count
        time.sleep(0.15)
    return backend.generated_tokens


def _words(n: int) -> list[str]:
    return [f" w{i}" for i in range(n)]


@pytest.fixture
def local(ollama_chat):
    return ollama_chat()


@pytest.fixture
def cloud(bedrock_chat, bedrock_server):
    bedrock_server.set_default("cloud answer")
    return bedrock_chat(max_tokens=50)


# -- the knob, wherever knobs are set ----------------------------------------------------------

LOW_AT_3 = [-0.05, -0.05, -4.0, -0.05, -0.05, -0.05]  # min_logprob exits after token 3


@pytest.fixture
def low_answer(ollama_backend):
    ollama_backend.add_answer("obscure", _words(len(LOW_AT_3)), logprobs=LOW_AT_3)
    return ollama_backend


def _assert_exited(message: Any, tokens: int = 3) -> None:
    routing = _routing(message)
    assert routing["early_exit"] == {"exited": True, "tokens": tokens}
    assert routing["reason"] == Reason.EARLY_EXIT
    assert routing["decision"] == "cloud"
    assert routing["policy"]["early_exit"] is True
    assert message.text == "cloud answer"


def test_knob_per_call_constructor_and_bind(local, cloud, low_answer, bedrock_server):
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob")
    off = router.invoke("obscure")
    assert "early_exit" not in _routing(off) and _routing(off)["policy"]["early_exit"] is False
    assert _routing(off)["reason"] == Reason.LOW_CONFIDENCE
    _assert_exited(router.invoke("obscure", early_exit=True))
    _assert_exited(router.bind(early_exit=True).invoke("obscure"))
    on = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob", early_exit=True)
    _assert_exited(on.invoke("obscure"))
    # A per-call kwarg wins over the field.
    assert _routing(on.invoke("obscure", early_exit=False))["reason"] == Reason.LOW_CONFIDENCE


def test_knob_in_lcel_config(local, cloud, low_answer):
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob")
    configurable = router.configurable_fields(early_exit=ConfigurableField(id="early_exit"))
    _assert_exited(configurable.with_config(configurable={"early_exit": True}).invoke("obscure"))
    _assert_exited(configurable.invoke("obscure", config={"configurable": {"early_exit": True}}))
    default = configurable.invoke("obscure")
    assert _routing(default)["reason"] == Reason.LOW_CONFIDENCE
    streamed = _merged(list(configurable.with_config(
        configurable={"early_exit": True}).stream("obscure")))
    _assert_exited(streamed)


def test_knob_in_settings_and_environment(ollama_server, bedrock_server, low_answer,
                                          tmp_path):
    env = {
        "OLLAMA_HOST": ollama_server.url,
        "CONFIDENCE_ROUTER_LOCAL_MODEL": "scripted-local",
        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": bedrock_server.url,
        "AWS_REGION": "us-east-1",
        "CONFIDENCE_ROUTER_SIGNAL": "min_logprob",
    }
    bedrock_server.set_default("cloud answer")
    for value, expected in (("true", True), ("1", True), ("yes", True), ("false", False),
                            ("0", False), ("off", False)):
        settings_ = RouterSettings.from_env({**env, "CONFIDENCE_ROUTER_EARLY_EXIT": value})
        assert settings_.early_exit is expected
        assert settings_.policy().early_exit is expected
    assert RouterSettings.from_env(env).early_exit is False  # the default
    router = ConfidenceRoutedLLM.from_settings(
        environ={**env, "CONFIDENCE_ROUTER_EARLY_EXIT": "true"})
    assert router.early_exit is True
    _assert_exited(router.invoke("obscure"))
    assert RouterSettings(early_exit=True).to_dict()["early_exit"] is True
    assert RouterSettings.from_mapping({"early_exit": True}).early_exit is True
    saved = tmp_path / "router.json"
    RouterSettings(early_exit=True).save(saved)
    assert RouterSettings.from_file(saved).early_exit is True
    toml = tmp_path / "router.toml"
    toml.write_text("early_exit = true\n")
    assert RouterSettings.from_file(toml).early_exit is True


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, 1.0, "true", [True]])
def test_bad_knob_values_are_typed_errors_before_any_request(local, cloud, low_answer,
                                                              ollama_server, bedrock_server,
                                                              bad):
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob")
    with pytest.raises(RoutingConfigError, match="early_exit"):
        router.invoke("obscure", early_exit=bad)
    with pytest.raises(RoutingConfigError, match="early_exit"):
        list(router.stream("obscure", early_exit=bad))
    with pytest.raises(RoutingConfigError, match="early_exit"):
        asyncio.run(router.ainvoke("obscure", early_exit=bad))
    with pytest.raises(RoutingConfigError, match="early_exit"):
        ConfidenceRoutedLLM(local=local, cloud=cloud, early_exit=bad)
    configurable = router.configurable_fields(early_exit=ConfigurableField(id="ee"))
    with pytest.raises(RoutingConfigError, match="early_exit"):
        configurable.with_config(configurable={"ee": bad}).invoke("obscure")
    with pytest.raises(RoutingConfigError, match="early_exit"):
        RouterSettings(early_exit=bad)
    assert ollama_server.requests == [] and bedrock_server.requests == []


def test_misspelt_knob_names_the_right_one(local, cloud, ollama_server):
    router = ConfidenceRoutedLLM(local=local, cloud=cloud)
    with pytest.raises(RoutingConfigError, match="early_exit"):
        router.invoke("obscure", early_exti=True)
    with pytest.raises(RoutingConfigError, match="CONFIDENCE_ROUTER_EARLY_EXIT"):
        RouterSettings.from_env({"CONFIDENCE_ROUTER_EARLY_EXITS": "1"})
    assert ollama_server.requests == []


def test_knob_in_the_llamaindex_adapter(local, cloud, low_answer, ollama_server,
                                        bedrock_server):
    from llama_index.core.llms import ChatMessage

    from confidence_router.llamaindex import ConfidenceRoutedLlamaIndexLLM

    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob")
    llm = ConfidenceRoutedLlamaIndexLLM(router=router)
    messages = [ChatMessage(role="user", content="obscure")]
    response = llm.chat(messages, early_exit=True)
    assert response.message.content == "cloud answer"
    assert response.additional_kwargs["routing"]["early_exit"] == {"exited": True, "tokens": 3}
    completion = llm.complete("obscure", early_exit=True)
    assert completion.additional_kwargs["routing"]["reason"] == Reason.EARLY_EXIT
    last = list(llm.stream_chat(messages, early_exit=True))[-1]
    assert last.additional_kwargs["routing"]["early_exit"]["exited"] is True
    achat = asyncio.run(llm.achat(messages, early_exit=True))
    assert achat.additional_kwargs["routing"]["early_exit"]["exited"] is True
    always = ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"early_exit": True})
    assert always.chat(messages).additional_kwargs["routing"]["reason"] == Reason.EARLY_EXIT
    assert llm.chat(messages).additional_kwargs["routing"]["reason"] == Reason.LOW_CONFIDENCE
    ollama_server.clear_requests()
    bedrock_server.clear_requests()
    with pytest.raises(RoutingConfigError, match="early_exit"):
        llm.chat(messages, early_exit="yes")
    with pytest.raises(RoutingConfigError, match="early_exit"):
        list(llm.stream_complete("obscure", early_exit=2))
    with pytest.raises(RoutingConfigError):
        ConfidenceRoutedLlamaIndexLLM(router=router, router_kwargs={"early_exit": "no"})
    assert ollama_server.requests == [] and bedrock_server.requests == []


# -- min_logprob: early exit decides exactly as the full run, on every entry point ---------------

_logprob = st.one_of(
    st.floats(min_value=-0.6, max_value=0.0),  # confident tokens
    st.floats(min_value=-8.0, max_value=0.0),  # anything
    st.sampled_from([0.0, -1.0, -1.5, -1.7, -2.0]),
)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_logprob, min_size=1, max_size=12),
       threshold=st.floats(min_value=0.05, max_value=0.95), data=st.data())
def test_min_logprob_early_exit_decides_as_the_full_run(local, cloud, ollama_backend,
                                                        bedrock_server, path, values,
                                                        threshold, data):
    if data.draw(st.booleans(), label="a threshold exactly at a token's score"):
        at = data.draw(st.sampled_from(values), label="token")
        threshold = min(max(1 / (1 + math.exp(-(2 * at + 3))), 0.0), 1.0)
    question = f"question {next(_unique)} end"
    tokens = _words(len(values))
    ollama_backend.add_answer(question, tokens, logprobs=values)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 threshold=threshold)
    full = _routing(router.invoke(question))
    early = _messages(router, path, question, early_exit=True)
    expected_exit = early_exit_index("min_logprob", threshold, values)
    for message in early:
        routing = _routing(message)
        assert routing["decision"] == full["decision"]
        assert routing["escalated"] == full["escalated"]
        assert routing["would_escalate"] == full["would_escalate"]
        if expected_exit is None:
            assert routing["early_exit"] == {"exited": False, "tokens": len(values)}
            assert routing["confidence"] == full["confidence"]
        else:
            assert routing["early_exit"] == {"exited": True, "tokens": expected_exit}
            assert routing["reason"] == Reason.EARLY_EXIT
        if full["decision"] == "local":
            assert message.text == "".join(tokens)  # never a truncated local answer
            assert full["reason"] == Reason.CONFIDENT
        else:
            assert message.text == "cloud answer"


# -- stopping stops the work (counted by the server) ----------------------------------------------

N_LONG = 80


@pytest.mark.parametrize("path", PATHS)
def test_the_server_stops_generating_after_the_deciding_token(local, cloud, ollama_backend,
                                                              bedrock_server, path):
    values = [-0.05] * N_LONG
    values[4] = -6.0  # decides after 5 tokens
    ollama_backend.add_answer("long", _words(N_LONG), logprobs=values, token_delay=0.02)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob")
    before = _wait_idle(ollama_backend)
    cloud_before = len(bedrock_server.requests)
    messages = _messages(router, path, "long", early_exit=True)
    produced = _wait_idle(ollama_backend) - before
    for message in messages:
        assert _routing(message)["early_exit"] == {"exited": True, "tokens": 5}
        assert message.text == "cloud answer"
    assert len(bedrock_server.requests) - cloud_before == len(messages)
    # Each call stopped at the 5th token; the server may produce one or two more before it
    # sees the closed stream, never the whole answer.
    assert 5 * len(messages) <= produced <= 8 * len(messages), produced
    # Without early exit the whole answer is generated (the count is the server's).
    before = _wait_idle(ollama_backend)
    router.invoke("long")
    assert _wait_idle(ollama_backend) - before == N_LONG


# -- the record on every path -----------------------------------------------------------------


def test_record_when_kept_local(local, cloud, ollama_backend, bedrock_server):
    ollama_backend.add_answer("easy", ["Paris", " it", " is"], logprobs=-0.05)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 early_exit=True)
    for path in PATHS:
        for message in _messages(router, path, "easy"):
            routing = _routing(message)
            assert routing["decision"] == "local" and routing["reason"] == Reason.CONFIDENT
            assert routing["early_exit"] == {"exited": False, "tokens": 3}, path
            assert message.text == "Paris it is"
    assert bedrock_server.requests == []


def test_record_when_escalated_without_an_exit(local, cloud, ollama_backend, bedrock_server):
    # mean_logprob without a token cap never exits (documented); the full answer decides.
    ollama_backend.add_answer("vague", _words(4), logprobs=[-0.1, -5.0, -0.1, -0.1])
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="mean_logprob",
                                 early_exit=True)
    for path in PATHS:
        for message in _messages(router, path, "vague"):
            routing = _routing(message)
            assert routing["decision"] == "cloud" and routing["reason"] == Reason.LOW_CONFIDENCE
            assert routing["early_exit"] == {"exited": False, "tokens": 4}, path
            assert message.text == "cloud answer"


def test_record_when_the_precheck_skips_local_generation(ollama_server, ollama_backend, cloud,
                                                         bedrock_server):
    local = ChatOllama(model="scripted-local", base_url=ollama_server.url)
    ollama_backend.add_probe(lambda r: "Respond with exactly one token" in
                             r.messages[-1]["content"], {"NO": -0.05, "YES": -4.0})
    ollama_backend.add_answer("hard", _words(5), logprobs=-0.05)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 early_exit=True, precheck=SelfAssessmentProbe(model=local))
    for path in PATHS:
        for message in _messages(router, path, "hard"):
            routing = _routing(message)
            assert routing["reason"] == Reason.PRECHECK
            assert routing["early_exit"] == {"exited": False, "tokens": 0}, path
            assert message.text == "cloud answer"
    answers = [r for r in ollama_server.requests
               if "Respond with exactly one token" not in r["body"]["messages"][-1]["content"]]
    assert answers == []  # no local answer was generated at all


@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke", "astream"])
def test_record_on_cloud_failure_fall_back_after_an_exit(local, cloud, ollama_backend,
                                                         bedrock_server, path):
    tokens = _words(len(LOW_AT_3))
    ollama_backend.add_answer("obscure", tokens, logprobs=LOW_AT_3)
    bedrock_server.fail("obscure", "ServiceUnavailableException")
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 on_cloud_error="local", early_exit=True)
    (message,) = _messages(router, path, "obscure")
    routing = _routing(message)
    assert routing["reason"] == Reason.CLOUD_ERROR and routing["decision"] == "local"
    assert routing["flagged"] is True
    assert routing["early_exit"] == {"exited": True, "tokens": 3}
    assert message.text == "".join(tokens)  # the served fall-back is the whole answer
    # Raising instead: the error's record says the same.
    with pytest.raises(CloudEscalationError) as raised:
        router.invoke("obscure", on_cloud_error="raise")
    assert raised.value.routing["early_exit"] == {"exited": True, "tokens": 3}


def test_record_on_budget_refusal_after_an_exit(local, cloud, ollama_backend, bedrock_server):
    tokens = _words(len(LOW_AT_3))
    ollama_backend.add_answer("obscure", tokens, logprobs=LOW_AT_3)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 early_exit=True, budget=CloudBudget(max_usd=1e-9))
    for path in PATHS:
        for message in _messages(router, path, "obscure"):
            routing = _routing(message)
            assert routing["reason"] == Reason.BUDGET_EXCEEDED
            assert routing["early_exit"] == {"exited": True, "tokens": 3}, path
            assert message.text == "".join(tokens)
    assert bedrock_server.requests == []


def test_never_stops_an_answer_that_must_be_served(local, ollama_chat, cloud, ollama_backend,
                                                   bedrock_server):
    # No cloud, or the escalation guard keeps the query here: the local answer will be
    # served, so it runs to the end (the record says so, and the text is whole).
    tokens = _words(len(LOW_AT_3))
    ollama_backend.add_answer("obscure", tokens, logprobs=LOW_AT_3)
    no_cloud = ConfidenceRoutedLLM(local=local, signal="min_logprob", early_exit=True)
    guarded = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="min_logprob",
                                  early_exit=True, escalation_guard=lambda messages: "private")
    for router in (no_cloud, guarded):
        for path in PATHS:
            for message in _messages(router, path, "obscure"):
                routing = _routing(message)
                assert routing["early_exit"] == {"exited": False, "tokens": len(tokens)}
                assert routing["would_escalate"] is True and routing["flagged"] is True
                assert routing["decision"] == "local"
                assert message.text == "".join(tokens)
    assert bedrock_server.requests == []


@pytest.mark.parametrize("fallback", ["budget", "cloud_error"])
def test_record_describes_the_served_local_answer_after_an_exit(local, cloud, ollama_backend,
                                                                bedrock_server, fallback):
    tokens = _words(len(LOW_AT_3))
    ollama_backend.add_answer("obscure", tokens, logprobs=LOW_AT_3, prompt_tokens=7)
    if fallback == "budget":
        router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                     budget=CloudBudget(max_usd=1e-9))
    else:
        bedrock_server.fail("obscure", "ServiceUnavailableException")
        router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                     on_cloud_error="local")
    full = _routing(router.invoke("obscure"))
    early = _routing(router.invoke("obscure", early_exit=True))
    assert early["early_exit"]["exited"] is True
    assert early["signals"]["token_count"] == full["signals"]["token_count"] == len(tokens)
    assert early["usage"]["local"] is not None
    assert early["usage"]["local"]["output_tokens"] >= len(tokens)


# -- decisions identical: the blank answer with on_unknown="local" ------------------------------


def test_a_blank_answer_kept_under_on_unknown_local_is_not_escalated_early(local, cloud,
                                                                           ollama_backend,
                                                                           bedrock_server):
    ollama_backend.add_answer("blank", [" ", "\n", " "], logprobs=[-0.1, -5.0, -0.1])
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal="min_logprob",
                                 on_unknown="local")
    full = _routing(router.invoke("blank"))
    assert full["decision"] == "local" and full["reason"] == Reason.CONFIDENCE_UNKNOWN
    early = _routing(router.invoke("blank", early_exit=True))
    assert early["decision"] == full["decision"]
    assert bedrock_server.requests == []


# -- mean- and sum-type signals: the documented rules -----------------------------------------


def test_mean_logprob_exits_only_with_a_token_cap(ollama_chat, cloud, ollama_backend,
                                                  bedrock_server):
    values = [-6.0, -0.1, -0.1, -0.1]  # even 3 certain tokens cannot lift a mean of -6/4
    ollama_backend.add_answer("capped", _words(4), logprobs=values)
    uncapped = ConfidenceRoutedLLM(local=ollama_chat(), cloud=cloud, signal="mean_logprob",
                                   early_exit=True)
    routing = _routing(uncapped.invoke("capped"))
    assert routing["early_exit"] == {"exited": False, "tokens": 4}
    assert routing["reason"] == Reason.LOW_CONFIDENCE
    capped = ConfidenceRoutedLLM(local=ollama_chat(num_predict=4), cloud=cloud,
                                 signal="mean_logprob", early_exit=True)
    routing = _routing(capped.invoke("capped"))
    assert routing["early_exit"] == {"exited": True, "tokens": 1}
    assert routing["decision"] == "cloud"


@pytest.mark.parametrize("signal", ["mean_min", "mean_logprob"])
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_logprob, min_size=1, max_size=8),
       threshold=st.floats(min_value=0.05, max_value=0.95), spare=st.integers(0, 4),
       capped=st.booleans())
def test_mean_type_bounds_never_change_the_decision(ollama_chat, cloud, ollama_backend,
                                                    bedrock_server, signal, values, threshold,
                                                    spare, capped):
    # README: mean_min's bound needs no cap and never exits on an answer that would be kept;
    # mean_logprob's bound with the tier's true token cap (num_predict) is exact.
    question = f"question {next(_unique)} end"
    ollama_backend.add_answer(question, _words(len(values)), logprobs=values)
    local = ollama_chat(num_predict=len(values) + spare) if capped else ollama_chat()
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, threshold=threshold)
    full = _routing(router.invoke(question))
    early = _routing(router.invoke(question, early_exit=True))
    assert early["decision"] == full["decision"]
    expected = early_exit_index(signal, threshold, values,
                                max_tokens=len(values) + spare if capped else None)
    assert early["early_exit"] == (
        {"exited": False, "tokens": len(values)} if expected is None
        else {"exited": True, "tokens": expected})
    if expected is not None:
        # At the exit, the final score can no longer reach the threshold.
        assert score_for(compute_signals(values), signal) < threshold


def test_mean_min_exits_on_a_weak_token_without_a_cap(local, cloud, ollama_backend):
    values = [-0.05, -0.05, -5.0] + [-0.05] * 5
    ollama_backend.add_answer("weak", _words(len(values)), logprobs=values)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, early_exit=True)  # default mean_min
    routing = _routing(router.invoke("weak"))
    assert routing["signal"] == "mean_min"
    assert routing["early_exit"] == {"exited": True, "tokens": 3}
    assert routing["decision"] == "cloud"
    assert _routing(router.invoke("weak", early_exit=False))["decision"] == "cloud"


@pytest.mark.parametrize("signal", ["sum_logprob", "sum_min"])
def test_sum_type_signals_exit_exactly(local, cloud, ollama_backend, signal):
    # exp(sum) and exp((sum + min) / 2) can only fall as tokens arrive: the first token that
    # takes the score below the threshold decides, as for min_logprob.
    values = [-0.05, -0.05, -3.0] + [-0.01] * 5
    ollama_backend.add_answer("unsure", _words(len(values)), logprobs=values)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, early_exit=True)
    routing = _routing(router.invoke("unsure"))
    assert routing["early_exit"] == {"exited": True, "tokens": 3}
    assert routing["decision"] == _routing(router.invoke("unsure", early_exit=False))["decision"]


@pytest.mark.parametrize("signal", ["sum_logprob", "sum_min"])
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_logprob, min_size=1, max_size=8),
       threshold=st.floats(min_value=0.0, max_value=1.0))
def test_sum_type_exit_is_identical_to_the_full_decision(local, cloud, ollama_backend, signal,
                                                         values, threshold):
    question = f"question {next(_unique)} end"
    ollama_backend.add_answer(question, _words(len(values)), logprobs=values)
    router = ConfidenceRoutedLLM(local=local, cloud=cloud, signal=signal, threshold=threshold)
    full = _routing(router.invoke(question))
    early = _routing(router.invoke(question, early_exit=True))
    assert early["decision"] == full["decision"]
    assert early["early_exit"]["exited"] is (early_exit_index(signal, threshold, values)
                                             is not None)


@pytest.mark.parametrize("signal", ["sum_logprob", "sum_min", "min_logprob"])
@given(prefix=st.lists(_logprob, min_size=1, max_size=10),
       rest=st.lists(_logprob, max_size=10), threshold=st.floats(min_value=0.0, max_value=1.0))
def test_exact_rules_exit_only_when_no_continuation_can_be_kept(signal, prefix, rest,
                                                                threshold):
    from confidence_router.early_exit import EXACT_SIGNALS, should_exit_early

    assert signal in EXACT_SIGNALS
    final = score_for(compute_signals(prefix + rest), signal)
    if should_exit_early(signal, threshold, prefix):
        assert final < threshold  # whatever followed, the full answer escalates too
    # And the replay exits at the first token that decides, never later.
    index = early_exit_index(signal, threshold, prefix + rest)
    if final >= threshold:
        assert index is None
    elif index is not None:
        assert score_for(compute_signals((prefix + rest)[:index]), signal) < threshold
