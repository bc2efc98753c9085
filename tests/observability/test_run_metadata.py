"""The routing decision as run metadata and tags on the router's own (parent) run, seen by a
real LangChain tracer (a ``BaseTracer`` collecting finished runs, as LangSmith's
``LangChainTracer`` is one), on the test bed."""

from __future__ import annotations

import uuid

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tracers.base import BaseTracer

from confidence_router import ConfidenceRoutedLLM, routing_run_metadata, routing_run_tags
from confidence_router.telemetry import annotate_run

FRANCE = "What is the capital of France?"
KENYA = "Who was the second president of Kenya?"


class CollectingTracer(BaseTracer):
    """Keeps every finished root run (children hang off ``child_runs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list = []

    def _persist_run(self, run) -> None:
        self.runs.append(run)


@pytest.fixture
def scripted(ollama_backend, bedrock_server):
    ollama_backend.add_answer("capital of France", "Paris", logprobs=[-0.05])
    ollama_backend.add_answer("Kenya", "Jomo Kenyatta was", logprobs=[-2.0, -3.1, -2.6])
    bedrock_server.add_answer("Kenya", "Daniel arap Moi", input_tokens=11, output_tokens=4)


@pytest.fixture
def router(ollama_chat, bedrock_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())


# -- the pure helpers, on real records ---------------------------------------------------------


def test_metadata_flattens_a_real_escalated_record(router, scripted):
    routing = router.invoke(KENYA).response_metadata["routing"]
    meta = routing_run_metadata(routing)
    assert meta["routing_decision"] == "cloud"
    assert meta["routing_reason"] == "low_confidence"
    assert meta["routing_confidence"] == routing["confidence"]
    assert meta["routing_threshold"] == 0.7
    assert meta["routing_escalated"] is True
    assert meta["routing_cloud_latency_s"] == routing["latency_s"]["cloud"]
    assert meta["routing_total_latency_s"] == routing["latency_s"]["total"]
    assert meta["routing_cloud_cost_usd"] == routing["cloud_cost_usd"] > 0
    # Scalars only (filterable), never the answers.
    assert all(isinstance(v, (str, bool, int, float)) for v in meta.values())
    assert "Jomo Kenyatta was" not in meta.values()
    assert routing_run_tags(routing) == [
        "routing:cloud",
        "routing:reason=low_confidence",
        "routing:escalated",
    ]


def test_unknown_values_are_left_out_not_zeroed():
    meta = routing_run_metadata(
        {
            "decision": "cloud",
            "reason": "local_error",
            "confidence": None,
            "cost_usd": float("nan"),
            "latency_s": {"total": 0.5},
        }
    )
    assert meta == {
        "routing_decision": "cloud",
        "routing_reason": "local_error",
        "routing_total_latency_s": 0.5,
    }
    assert routing_run_tags(
        {"decision": "local", "reason": "low_confidence", "would_escalate": True, "flagged": True}
    ) == [
        "routing:local",
        "routing:reason=low_confidence",
        "routing:would-escalate",
        "routing:flagged",
    ]
    with pytest.raises(TypeError):
        routing_run_metadata(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        routing_run_tags("cloud")  # type: ignore[arg-type]


# -- annotate_run on a real tracer's run ---------------------------------------------------------


class AnnotateOnEnd(BaseCallbackHandler):
    """Calls annotate_run from on_llm_end, before the tracer (next handler) ends the run."""

    def __init__(self, tracer: BaseTracer) -> None:
        self.tracer = tracer
        self.annotated: list[int] = []

    def on_llm_end(self, response, *, run_id, **kwargs):
        routing = response.llm_output["routing"]
        self.annotated.append(annotate_run([self, self.tracer], run_id, routing))


def test_annotate_run_writes_metadata_and_tags_onto_the_tracers_run(router, scripted):
    tracer = CollectingTracer()
    annotator = AnnotateOnEnd(tracer)
    router.invoke(
        KENYA,
        config={"callbacks": [annotator, tracer], "tags": ["mine"], "metadata": {"user": "u1"}},
    )
    (run,) = tracer.runs
    assert annotator.annotated == [1]
    meta = run.extra["metadata"]
    assert meta["routing_decision"] == "cloud" and meta["user"] == "u1"
    assert {"mine", "routing:cloud", "routing:escalated"} <= set(run.tags)
    # The tier child runs are not annotated: only the router's own run carries the decision.
    for child in run.child_runs:
        assert "routing_decision" not in child.extra.get("metadata", {})


def test_annotate_run_ignores_unknown_runs_and_non_tracers(router, scripted):
    tracer = CollectingTracer()
    assert annotate_run([tracer, object()], uuid.uuid4(), {"decision": "local"}) == 0
    assert annotate_run([tracer], None, {"decision": "local"}) == 0


# -- the router's parent run (needs the router to call annotate_run; see the report) --------------


@pytest.mark.parametrize("question,decision", [(FRANCE, "local"), (KENYA, "cloud")])
def test_router_run_carries_routing_metadata_and_tags(router, scripted, question, decision):
    tracer = CollectingTracer()
    router.invoke(question, config={"callbacks": [tracer]})
    (run,) = tracer.runs
    assert run.extra["metadata"]["routing_decision"] == decision
    assert f"routing:{decision}" in run.tags


async def test_async_and_streamed_router_runs_carry_routing_metadata(router, scripted):
    tracer = CollectingTracer()
    await router.ainvoke(KENYA, config={"callbacks": [tracer]})
    _ = [chunk async for chunk in router.astream(FRANCE, config={"callbacks": [tracer]})]
    _ = list(router.stream(KENYA, config={"callbacks": [tracer]}))
    assert [r.extra["metadata"].get("routing_decision") for r in tracer.runs] == [
        "cloud",
        "local",
        "cloud",
    ]
    assert all(any(t.startswith("routing:reason=") for t in r.tags) for r in tracer.runs)
