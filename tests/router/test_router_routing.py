"""ConfidenceRoutedLLM end to end: the unchanged ChatOllama and ChatBedrockConverse over real
HTTP to the project's test bed on 127.0.0.1."""

from __future__ import annotations

import math

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_ollama import ChatOllama

from confidence_router import (
    CloudEscalationError,
    ConfidenceRoutedLLM,
    LocalModelError,
    RoutingConfigError,
)

CLOUD_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture
def local(ollama_chat):
    # logprobs deliberately not set: the router must switch them on.
    return ollama_chat(temperature=0)


@pytest.fixture
def cloud(bedrock_chat):
    return bedrock_chat()


@pytest.fixture
def router(local, cloud):
    # The paper's signal, so the expected confidences below are sigmoid(2 * mean + 3); the
    # default signal (mean_min) is tested in test_router_signals.py.
    return ConfidenceRoutedLLM(local=local, cloud=cloud, signal="mean_logprob")


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    """Two questions: one the local model is sure about, one it is not."""
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)
    bedrock_server.add_answer("capital of France", "Paris (cloud)")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _aggregate(chunks):
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


def test_confident_answer_stays_local(router, scripted, ollama_server, bedrock_server):
    message = router.invoke("What is the capital of France?")
    routing = message.response_metadata["routing"]
    assert message.content == "Paris"
    assert routing["decision"] == "local"
    assert routing["reason"] == "confident"
    assert routing["confidence"] == pytest.approx(_sigmoid(2 * -0.05 + 3))
    assert routing["threshold"] == 0.7
    assert routing["signals"]["token_count"] == 1
    assert routing["signals"]["min_logprob"] == pytest.approx(-0.05)
    assert routing["latency_s"]["local"] > 0 and "cloud" not in routing["latency_s"]
    assert routing["usage"]["local"]["output_tokens"] == 1
    assert message.usage_metadata["output_tokens"] == 1
    assert bedrock_server.requests == []
    # The router asked the unchanged ChatOllama for logprobs over the wire.
    assert ollama_server.requests[-1]["body"]["logprobs"] is True


def test_low_confidence_escalates(router, scripted, bedrock_server):
    message = router.invoke("Who was the second president of Kenya?")
    routing = message.response_metadata["routing"]
    assert message.content == "Daniel arap Moi"
    assert routing["decision"] == "cloud"
    assert routing["reason"] == "low_confidence"
    assert routing["escalated"] is True
    assert routing["local_answer"] == "Jomo Kenyatta was"
    mean = (-2.0 - 3.1 - 2.6) / 3
    assert routing["confidence"] == pytest.approx(_sigmoid(2 * mean + 3))
    assert routing["signals"]["mean_logprob"] == pytest.approx(mean)
    assert routing["usage"]["local"]["output_tokens"] == 3
    assert routing["usage"]["cloud"]["input_tokens"] == 11
    assert message.usage_metadata["output_tokens"] == 4  # the returned (cloud) message's usage
    assert set(routing["latency_s"]) >= {"local", "cloud", "total"}
    assert len(bedrock_server.requests) == 1
    assert bedrock_server.requests[0]["model_id"] == CLOUD_MODEL


async def test_ainvoke(router, scripted):
    kept = await router.ainvoke("What is the capital of France?")
    escalated = await router.ainvoke("Who was the second president of Kenya?")
    assert kept.response_metadata["routing"]["decision"] == "local"
    assert escalated.content == "Daniel arap Moi"
    assert escalated.response_metadata["routing"]["decision"] == "cloud"


def test_batch_and_abatch(router, scripted):
    questions = ["What is the capital of France?", "Who was the second president of Kenya?"]
    results = router.batch(questions)
    assert [m.response_metadata["routing"]["decision"] for m in results] == ["local", "cloud"]
    assert [m.content for m in results] == ["Paris", "Daniel arap Moi"]


async def test_abatch(router, scripted):
    questions = ["Who was the second president of Kenya?", "What is the capital of France?"]
    results = await router.abatch(questions)
    assert [m.content for m in results] == ["Daniel arap Moi", "Paris"]


def test_stream_local_replays_buffered_chunks(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("Hamlet", "William Shakespeare wrote it", logprobs=-0.02)
    chunks = list(router.stream("Who wrote Hamlet?"))
    text_chunks = [c.content for c in chunks if c.content]
    assert "".join(text_chunks) == "William Shakespeare wrote it"
    assert len(text_chunks) >= 4  # streamed token by token, not as one blob
    total = _aggregate(chunks)
    assert total.response_metadata["routing"]["decision"] == "local"
    assert total.usage_metadata["output_tokens"] == 4
    assert total.response_metadata["model_name"] == "scripted-local"
    assert bedrock_server.requests == []


def test_stream_escalated_never_mixes_models(router, scripted):
    chunks = list(router.stream("Who was the second president of Kenya?"))
    text = "".join(c.text for c in chunks)
    assert text == "Daniel arap Moi"  # not a single local token leaked
    total = _aggregate(chunks)
    routing = total.response_metadata["routing"]
    assert routing["decision"] == "cloud"
    assert routing["local_answer"] == "Jomo Kenyatta was"
    assert routing["usage"]["cloud"]["output_tokens"] == 4
    assert chunks[-1].response_metadata["routing"] == routing  # decision arrives last


async def test_astream_both_paths(router, scripted):
    kept = [c async for c in router.astream("What is the capital of France?")]
    escalated = [c async for c in router.astream("Who was the second president of Kenya?")]
    assert "".join(c.content for c in kept) == "Paris"
    assert _aggregate(kept).response_metadata["routing"]["decision"] == "local"
    assert "".join(c.text for c in escalated) == "Daniel arap Moi"
    assert _aggregate(escalated).response_metadata["routing"]["decision"] == "cloud"


async def test_stream_events_bridge(router, scripted):
    events = [e async for e in router.astream_events("What is the capital of France?", version="v2")]
    names = [e["event"] for e in events]
    assert "on_chat_model_stream" in names
    customs = [e for e in events if e["event"] == "on_custom_event"]
    assert customs and customs[0]["name"] == "routing_decision"
    assert customs[0]["data"]["decision"] == "local"


# -- per-call configuration -------------------------------------------------------------------


def test_threshold_override_per_invoke(router, scripted):
    # confidence 0.943 passes 0.7 but not 0.95
    assert router.invoke("What is the capital of France?").content == "Paris"
    message = router.invoke("What is the capital of France?", threshold=0.95)
    assert message.content == "Paris (cloud)"
    assert message.response_metadata["routing"]["threshold"] == 0.95


def test_bind_override(router, scripted):
    strict = router.bind(threshold=0.95)
    assert strict.invoke("What is the capital of France?").content == "Paris (cloud)"
    lenient = router.bind(threshold=0.0)
    assert lenient.invoke("Who was the second president of Kenya?").content == "Jomo Kenyatta was"


def test_signal_knob_per_call(router, ollama_backend, bedrock_server):
    # mean -1.0 (0.73: keep) but one token at -2.94 (min 0.05: escalate)
    ollama_backend.add_answer("Westphalia", "It was 1648", logprobs=[-0.03, -0.03, -2.94])
    bedrock_server.add_answer("Westphalia", "1648")
    assert router.invoke("Westphalia?").response_metadata["routing"]["decision"] == "local"
    routed = router.invoke("Westphalia?", signal="min_logprob")
    assert routed.response_metadata["routing"]["decision"] == "cloud"
    assert routed.response_metadata["routing"]["signal"] == "min_logprob"


def test_configurable_fields_inside_lcel_chain(router, scripted):
    configurable = router.configurable_fields(
        threshold=ConfigurableField(id="threshold", name="Confidence threshold")
    )
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | configurable | StrOutputParser()
    question = {"question": "What is the capital of France?"}
    assert chain.invoke(question) == "Paris"
    strict = chain.with_config(configurable={"threshold": 0.99})
    assert strict.invoke(question) == "Paris (cloud)"
    assert chain.invoke(question) == "Paris"  # the default is untouched


def test_invalid_per_call_knob_is_a_clear_error(router, scripted):
    with pytest.raises(RoutingConfigError, match="threshold"):
        router.invoke("What is the capital of France?", threshold=1.7)
    with pytest.raises(RoutingConfigError, match="on_unknown"):
        router.invoke("What is the capital of France?", on_unknown="maybe")


def test_invalid_construction(local, cloud):
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceRoutedLLM(local=local, cloud=cloud, threshold=2)
    with pytest.raises(ValueError, match="signal must be one of"):
        ConfidenceRoutedLLM(local=local, cloud=cloud, signal="vibes")


# -- unknown confidence -----------------------------------------------------------------------


def test_no_logprobs_means_unknown_and_escalates(bedrock_server, cloud):
    # A local model that returns no logprobs at all (here: another Bedrock model).
    bedrock_server.add_answer("anything", "local-ish answer", model="local-bedrock")
    bedrock_server.add_answer("anything", "cloud answer")
    local = cloud.model_copy(update={"model_id": "local-bedrock"})
    router = ConfidenceRoutedLLM(local=local, cloud=cloud)
    message = router.invoke("anything")
    routing = message.response_metadata["routing"]
    assert message.content == "cloud answer"
    assert routing["reason"] == "confidence_unknown"
    assert routing["confidence"] is None
    assert routing["signals"]["unknown_reason"] == "no_logprobs"

    kept = router.invoke("anything", on_unknown="local")
    assert kept.content == "local-ish answer"
    assert kept.response_metadata["routing"]["reason"] == "confidence_unknown"


def test_empty_answer_is_unknown(router, ollama_backend, bedrock_server):
    ollama_backend.add_answer("silence", [])
    bedrock_server.add_answer("silence", "Something.")
    message = router.invoke("silence please")
    routing = message.response_metadata["routing"]
    assert message.content == "Something."
    assert routing["reason"] == "confidence_unknown"
    assert routing["signals"]["unknown_reason"] in {"empty_answer", "no_logprobs"}


# -- failures ---------------------------------------------------------------------------------


def test_local_down_escalates(router, ollama_backend, bedrock_server):
    ollama_backend.fail("France", status=500, message="model crashed")
    bedrock_server.add_answer("France", "Paris.")
    message = router.invoke("What is the capital of France?")
    routing = message.response_metadata["routing"]
    assert message.content == "Paris."
    assert routing["decision"] == "cloud"
    assert routing["reason"] == "local_error"
    assert "model crashed" in routing["local_error"]
    assert routing["confidence"] is None


def test_local_unreachable_escalates(cloud, bedrock_server):
    bedrock_server.add_answer("France", "Paris.")
    # A port nothing listens on: connection refused.
    dead = ChatOllama(model="m", base_url="http://127.0.0.1:9")
    message = ConfidenceRoutedLLM(local=dead, cloud=cloud).invoke("France?")
    assert message.response_metadata["routing"]["reason"] == "local_error"
    assert message.content == "Paris."


def test_local_timeout_escalates(ollama_server, ollama_backend, cloud, bedrock_server):
    ollama_backend.add_answer("slow", "eventually", latency=2.0)
    bedrock_server.add_answer("slow", "fast cloud")
    impatient = ChatOllama(
        model="scripted-local", base_url=ollama_server.url, client_kwargs={"timeout": 0.3}
    )
    message = ConfidenceRoutedLLM(local=impatient, cloud=cloud).invoke("slow question")
    routing = message.response_metadata["routing"]
    assert message.content == "fast cloud"
    assert routing["reason"] == "local_error"
    assert "Timeout" in routing["local_error"] or "timed out" in routing["local_error"]
    assert routing["latency_s"]["local"] < 1.5


def test_cloud_failure_raises_by_default(router, scripted, bedrock_server):
    bedrock_server.fail("Kenya", error_type="ServiceUnavailableException")
    with pytest.raises(CloudEscalationError) as caught:
        router.invoke("Who was the second president of Kenya?")
    error = caught.value
    assert "ServiceUnavailable" in str(error)
    assert error.routing["reason"] == "low_confidence"
    assert error.local_message.content == "Jomo Kenyatta was"


def test_cloud_failure_can_return_local_flagged(router, scripted, bedrock_server):
    bedrock_server.fail("Kenya", error_type="ThrottlingException")
    message = router.invoke("Who was the second president of Kenya?", on_cloud_error="local")
    routing = message.response_metadata["routing"]
    assert message.content == "Jomo Kenyatta was"
    assert routing["decision"] == "local"
    assert routing["reason"] == "cloud_error"
    assert routing["flagged"] is True
    assert "Throttling" in routing["cloud_error"]


def test_stream_cloud_failure_falls_back_without_mixing(router, scripted, bedrock_server):
    bedrock_server.fail("Kenya", error_type="ThrottlingException")
    chunks = list(router.stream("Who was the second president of Kenya?", on_cloud_error="local"))
    assert "".join(c.text for c in chunks) == "Jomo Kenyatta was"
    assert _aggregate(chunks).response_metadata["routing"]["reason"] == "cloud_error"


def test_both_down_raises_with_both_reasons(router, ollama_backend, bedrock_server):
    ollama_backend.fail("France", status=503, message="local gone")
    bedrock_server.fail("France", error_type="ServiceUnavailableException")
    with pytest.raises(CloudEscalationError, match="local gone") as caught:
        router.invoke("What is the capital of France?", on_cloud_error="local")
    assert caught.value.local_message is None


def test_local_down_without_cloud(local, ollama_backend):
    ollama_backend.fail("France", status=500, message="boom")
    with pytest.raises(LocalModelError, match="no cloud configured"):
        ConfidenceRoutedLLM(local=local).invoke("What is the capital of France?")


def test_without_cloud_reports_would_escalate(local, scripted):
    router = ConfidenceRoutedLLM(local=local)
    message = router.invoke("Who was the second president of Kenya?")
    routing = message.response_metadata["routing"]
    assert message.content == "Jomo Kenyatta was"
    assert routing["decision"] == "local"
    assert routing["would_escalate"] is True
    assert routing["flagged"] is True
    assert routing["escalation_skipped"] == "no cloud configured"


def test_allow_escalation_false_keeps_local(router, scripted, bedrock_server):
    message = router.invoke("Who was the second president of Kenya?", allow_escalation=False)
    assert message.content == "Jomo Kenyatta was"
    assert message.response_metadata["routing"]["escalation_skipped"] == "allow_escalation=False"
    assert bedrock_server.requests == []


# -- tracing ----------------------------------------------------------------------------------


class _Recorder(BaseCallbackHandler):
    def __init__(self):
        self.starts = []
        self.events = []
        self.ends = []

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw):
        self.starts.append({"run_id": run_id, "parent": parent_run_id, "name": kw.get("name"),
                            "tags": kw.get("tags")})

    def on_custom_event(self, name, data, *, run_id, **kw):
        self.events.append((name, data, run_id))

    def on_llm_end(self, response, *, run_id, parent_run_id=None, **kw):
        self.ends.append((run_id, response))


def test_children_are_traced_under_the_router_run(router, scripted):
    recorder = _Recorder()
    router.invoke("Who was the second president of Kenya?", config={"callbacks": [recorder]})
    root, *children = recorder.starts
    assert root["parent"] is None
    assert [c["parent"] for c in children] == [root["run_id"], root["run_id"]]
    assert [c["name"] for c in children] == ["local", "cloud"]
    assert "route:local-attempt" in children[0]["tags"]
    assert "route:escalated" in children[1]["tags"]
    (name, data, run_id), = recorder.events
    assert name == "routing_decision" and run_id == root["run_id"]
    assert data["decision"] == "cloud" and data["reason"] == "low_confidence"
    root_end = next(r for rid, r in recorder.ends if rid == root["run_id"])
    assert root_end.llm_output["routing"]["decision"] == "cloud"


def test_chunks_are_message_chunks(router, scripted):
    assert all(isinstance(c, AIMessageChunk) for c in router.stream("capital of France"))


def test_stream_children_are_traced_under_the_router_run(router, scripted):
    recorder = _Recorder()
    chunks = list(router.stream("Who was the second president of Kenya?",
                                config={"callbacks": [recorder]}))
    assert "".join(c.text for c in chunks) == "Daniel arap Moi"
    root, *children = recorder.starts
    assert [c["parent"] for c in children] == [root["run_id"], root["run_id"]]
    assert [c["name"] for c in children] == ["local", "cloud"]
    assert recorder.events[0][2] == root["run_id"]


async def test_astream_children_are_traced_under_the_router_run(router, scripted):
    recorder = _Recorder()
    chunks = [c async for c in router.astream("What is the capital of France?",
                                              config={"callbacks": [recorder]})]
    assert "".join(c.text for c in chunks) == "Paris"
    root, *children = recorder.starts
    assert [c["parent"] for c in children] == [root["run_id"]]
    assert recorder.events[0][1]["decision"] == "local"


KNOB_VALUES = {
    "threshold": 0.42,
    "signal": "min_logprob",
    "on_unknown": "local",
    "on_cloud_error": "local",
    "precheck_threshold": 0.33,
    "allow_escalation": False,
    "on_budget_exceeded": "raise",
    "early_exit": True,
}


def test_every_knob_is_configurable_in_lcel_and_per_invoke(router, scripted):
    from confidence_router import RoutingPolicy

    assert set(KNOB_VALUES) == set(RoutingPolicy.knob_names())
    configurable = router.configurable_fields(
        **{knob: ConfigurableField(id=knob) for knob in KNOB_VALUES}
    )
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | configurable
    for knob, value in KNOB_VALUES.items():
        via_config = chain.with_config(configurable={knob: value}).invoke({"q": "capital of France"})
        via_kwarg = router.invoke("capital of France", **{knob: value})
        for message in (via_config, via_kwarg):
            policy = message.response_metadata["routing"]["policy"]
            assert policy[knob] == value
            assert all(policy[k] == getattr(router, k) for k in KNOB_VALUES if k != knob)
